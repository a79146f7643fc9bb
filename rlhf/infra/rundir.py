"""The run directory contract (DESIGN.md): one folder per stage under the recipe's output_dir.

  recipe.yaml    resolved recipe       run.json     provenance + status
  metrics.jsonl  one object per step   tb/          TensorBoard events
  checkpoints/   resumable state       model/       save_pretrained folder
  eval.json      final numbers         COMPLETED    written last, only on success

Only the main process writes. `COMPLETED` is removed when a stage (re)starts, so a folder
whose run died never looks finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf.infra.errors import UserError

PACKAGES = ("rlhf", "torch", "transformers", "trl", "peft", "accelerate", "datasets")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def require_completed(path: Path, what: str) -> Path:
    """A later stage refuses an earlier stage's folder unless it finished (one-line error)."""
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist: run that stage first")
    if not (path / "COMPLETED").is_file():
        raise UserError(f"{what} {path} has no COMPLETED marker: that run did not finish")
    return path


def mark_failed(path: Path, reason: str) -> None:
    """Record a crash in run.json (status failed) if the stage had started writing there."""
    run_json = Path(path) / "run.json"
    try:
        info = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return
    if info.get("status") == "running":
        info.update(status="failed", reason=reason, end_time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(run_json, info)


def _truncate_jsonl_after(path: Path, step: int) -> None:
    """Keep the rows with "step" <= `step` (and drop a torn last line); atomic rewrite."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by the crash
        if row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunDir:
    """Lifecycle of one stage's folder. Use as a context manager around the stage body."""

    def __init__(self, path: Path, stage: str, recipe: Any, is_main: bool, info: dict):
        self.path = Path(path)
        self.stage = stage
        self.recipe = recipe
        self.is_main = is_main
        self.info = dict(info)  # world_size, device, dtype ...
        self.started = time.time()

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def _run_json(self, status: str, **extra: Any) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": status,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "recipe_file": getattr(self.recipe, "_source", None),
            "git_commit": _git_commit(),
            "versions": _versions(),
            "python": platform.python_version(),
            "host": platform.node(),
            "seed": self.recipe.seed,
            **self.info,
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            **extra,
        }

    def start(self, resume: bool = False, resume_step: int | None = None) -> None:
        """Fresh start: clear what an earlier run left. Resume from the checkpoint of step
        `resume_step`: keep the logs up to that step and drop the rows the crashed run wrote
        after it (they are about to be recomputed), so the log reads like one clean run."""
        if not self.is_main:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output_dir: cannot write to {self.path} ({e.strerror})") from None
        (self.path / "COMPLETED").unlink(missing_ok=True)
        if resume and resume_step is not None:
            for log_file in ("metrics.jsonl", "samples.jsonl"):
                _truncate_jsonl_after(self.path / log_file, resume_step)
        if not resume:
            for stale in ("metrics.jsonl", "eval.json", "samples.jsonl"):
                (self.path / stale).unlink(missing_ok=True)
            for stale_dir in ("tb", "model", "checkpoints"):
                shutil.rmtree(self.path / stale_dir, ignore_errors=True)
        (self.path / "recipe.yaml").write_text(self.recipe.to_yaml())
        write_json_atomic(self.path / "run.json", self._run_json("running"))

    def finish(self, eval_results: dict[str, Any]) -> None:
        if not self.is_main:
            return
        write_json_atomic(self.path / "eval.json", eval_results)
        end = time.time()
        write_json_atomic(
            self.path / "run.json",
            self._run_json(
                "completed",
                end_time=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end)),
                wall_seconds=round(end - self.started, 1),
            ),
        )
        (self.path / "COMPLETED").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))

    @contextmanager
    def staging(self, final: Path):
        """Yield a temporary folder that becomes `final` by one rename when the block succeeds."""
        tmp = final.with_name(final.name + ".partial")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        yield tmp
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
