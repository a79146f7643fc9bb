"""Benchmark harness: this project's PPO vs TRL 1.12's PPOTrainer, and vs this machine.

`python -m bench.run` (or `make bench`) is the entry point. Every measurement runs in its own
subprocess so that peak RSS per process is measurable and A/B runs do not share warm state.
Modules imported by the TRL worker (`common`) use only the standard library and torch: the
TRL worker runs in a separate venv (bench/.venv-trl) that does not have this project installed.
"""
