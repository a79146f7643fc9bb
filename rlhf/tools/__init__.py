"""The commands that read finished runs: `rlhf generate`, `rlhf eval` (`evaluate`, `compare`),
`rlhf viz`, and `rlhf curves` (`curves`, `report`, `plotting`)."""
