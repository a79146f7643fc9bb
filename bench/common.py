"""What the workers share: the work spec, phase timing by wrapping callables, result files.

Standard library + torch only (and rlhf.tokens.sequences, which is torch only): this module is
imported inside bench/.venv-trl too.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def worker_args(description: str) -> argparse.Namespace:
    """Every worker reads a JSON spec and writes a JSON result."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", required=True, help="JSON file written by bench.run")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    return parser.parse_args()


def trl_cpu_args(seed: int, bf16: bool = False) -> dict[str, Any]:
    """The TRL config arguments every comparison here shares: a CPU run (fp32 unless `bf16`),
    no gradient checkpointing, the plain schedule (constant LR, no warm-up, no accumulation,
    gradients clipped at 1.0), a log line every step and nothing saved, reported or drawn."""
    return {
        "use_cpu": True,
        "bf16": bf16,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "seed": seed,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def self_peak_rss_mb() -> float:
    """This process's peak RSS (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseTimer:
    """Collects (phase, start, end) events from wrapped callables, grouped into iterations.

    Wrapping from the outside lets the same instrumentation time our loop and TRL's without
    editing either; the per-call overhead is two perf_counter() calls.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []
        self.marks: list[float] = []  # iteration start times
        self.shapes: list[dict[str, int]] = []  # one per generate call

    def mark_iteration(self) -> None:
        self.marks.append(time.perf_counter())

    def wrap(self, fn: Callable, phase: str | Callable[[], str]) -> Callable:
        """`phase` may be a function, called at run time (e.g. grad enabled -> train forward)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = phase() if callable(phase) else phase
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((name, start, time.perf_counter()))

        return timed

    def patch(self, owner: Any, attr: str, phase: str | Callable[[], str]) -> None:
        setattr(owner, attr, self.wrap(getattr(owner, attr), phase))

    def iteration_events(self, end: float) -> list[list[tuple[str, float, float]]]:
        """Events split at the iteration marks; the last iteration ends at `end`."""
        bounds = [*self.marks, end]
        return [
            [e for e in self.events if lo <= e[1] < hi] for lo, hi in zip(bounds[:-1], bounds[1:])
        ]


def step_time_callback(step_times: list[float], cpu_times: list[float] | None = None, label=""):
    """A transformers TrainerCallback appending each optimizer step's wall seconds (and the
    process's CPU seconds: on a shared machine they do not count the time others ran)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_args, **_kwargs):
            step_times.append(time.perf_counter() - self.t0)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - self.c0)
            if label:
                log(f"{label}: step {len(step_times) - 1} {step_times[-1]:.2f}s")

    return StepTimes()


def worker_main(description: str, run_ours: Callable, run_trl: Callable, rows: Callable) -> None:
    """A worker module's main for ours-vs-TRL stages: spec["impl"] picks the side;
    `rows(spec)` is the number of rows the run consumed."""
    args = worker_args(description)
    spec = read_json(args.spec)
    t0 = time.perf_counter()
    if spec["impl"] == "ours":
        result = run_ours(spec)
    else:
        result = run_trl(spec, Path(args.out).parent)
    result.update(rows=rows(spec), wall_s=time.perf_counter() - t0)
    write_json(args.out, result)


def phase_sum(events: list[tuple[str, float, float]], name: str) -> float:
    return sum(e - s for n, s, e in events if n == name)


def count_response_tokens(response_ids: Any, eos_id: int) -> int:
    """Tokens up to and including the first EOS per row (what both PPOs train on): the
    project's own EOS cut, which needs only torch."""
    from rlhf.tokens.sequences import response_mask

    return int(response_mask(response_ids, eos_id)[0].sum().item())


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
