"""Metrics: metrics.jsonl (the contract), TensorBoard, and optional accelerate trackers.

Callers reduce metrics across ranks first (`mean_across_ranks`); only the main process writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


def mean_across_ranks(accelerator: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Average each scalar over all ranks (one all-reduce for the whole dict)."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


class MetricsLogger:
    def __init__(self, run_dir: Path, stage: str, recipe: Any, accelerator: Any):
        self.stage = stage
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.tb = None
        self.trackers = list(recipe.tracking.trackers)
        if self.is_main and recipe.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        if self.trackers:
            accelerator.init_trackers(
                recipe.tracking.project, config=recipe.model_dump(mode="json")
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        row = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **clean}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                if value is not None:
                    self.tb.add_scalar(key, value, step)
        if self.trackers:
            self.accelerator.log(clean, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A table of generations (prompt, response, score, kl) for this step."""
        if not self.is_main:
            return
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb is not None:
            text = "\n\n".join(
                f"**score {r.get('score', float('nan')):.3f}** {r['prompt'][-200:]!r} -> "
                f"{r['response']!r}"
                for r in rows[:4]
            )
            self.tb.add_text("samples", text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        # The trackers only: accelerate's end_training() would also destroy the process group,
        # before the stage's final barrier (rlhf.infra.distributed.leave_process_group ends it).
        for tracker in self.accelerator.trackers if self.trackers else []:
            tracker.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
