"""Resumable checkpoints, written atomically: a crash mid-save never leaves one that looks valid.

checkpoints/step-000040/   accelerate state (model or adapter, optimizer, RNG per rank) +
                           scheduler + trainer_state.json (counters, data position, KL ctl)
                           + VALID (written last, after fsync)
A save goes to `step-N.tmp/`, is fsynced, then renamed; only folders with VALID count.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def valid_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints (VALID written last), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "VALID").is_file()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """checkpoints/step-000040 -> 40."""
    return int(path.name.split("-")[1])


def latest_checkpoint(root: Path) -> Path | None:
    found = valid_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Any,
    root: Path,
    step: int,
    state: dict[str, Any],
    scheduler: Any = None,
    keep_last: int = 2,
) -> Path:
    """Every rank calls this (accelerate writes per-rank RNG state); rank 0 renames and prunes."""
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    # save_state ends with each rank writing its own RNG file, with no barrier after it: rank 0
    # must not rename the folder while another rank is still writing into it (seen under
    # FSDP2 on CPU ranks: "Parent directory .../step-000002.tmp does not exist" on rank 1).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / "VALID").write_text(str(step))
        _fsync_tree(final)
        for old in valid_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path, scheduler: Any = None) -> dict[str, Any]:
    """Restore model/optimizer/RNG (accelerate) and scheduler; return trainer_state.json."""
    accelerator.load_state(str(path))
    if scheduler is not None and (path / "scheduler_state.pt").is_file():
        # Our own file (a LambdaLR state: counters and floats), loaded without pickled code.
        scheduler.load_state_dict(torch.load(path / "scheduler_state.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
