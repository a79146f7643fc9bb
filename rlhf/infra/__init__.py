"""What every stage runs on: the accelerator and precision (`runtime`), sharding (`distributed`),
the run directory (`rundir`), checkpoints, clean stops (`signals`), metrics (`tracking`),
progress, the shared training pieces (`training`) and the user-error type (`errors`)."""
