"""Progress of a training loop: a tqdm bar on a terminal, INFO lines everywhere else.

Without a terminal (CI logs, nohup, `make ... > log`) a bar is invisible or a wall of carriage
returns, and a long stage looks hung. There, one line goes to the log every ~10% of the steps,
at most one per 30 s, and always at the first and the last step: step (or iteration) / total,
the main loss or score, the time elapsed and an estimate of the time left.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """12 -> "12s", 62 -> "1m02s", 3720 -> "1h02m"."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta_seconds(done: int, remaining: int, elapsed: float) -> float | None:
    """Time left at the mean pace so far; None before the first step is done."""
    if done <= 0:
        return None
    return remaining * elapsed / done


class Progress:
    """`update(step, loss=...)` after each step (absolute step count, so resumes just work).

    `total` steps in all, `initial` already done (a resumed run); `enabled` is False on every
    rank but the main one. `tty` and `clock` are for tests."""

    def __init__(
        self,
        stage: str,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "step",
    ):
        self.stage, self.total, self.initial, self.unit = stage, total, initial, unit
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = tqdm(total=total, initial=initial, desc=stage, disable=not (enabled and tty))
        self.log_lines = enabled and not tty
        self.every_steps = max(1, math.ceil(total * 0.1))
        self.clock = clock
        self.start = clock()
        self.last_line: float | None = None  # time of the last line written
        self.next_step = initial + 1  # the first step always gets a line
        self.values: dict[str, float] = {}
        self.lines: list[str] = []  # what was logged, for tests

    def note(self, **values: float) -> None:
        """Values shown from now on (the loss of the step just logged, ...)."""
        self.values.update(values)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in self.values.items()})

    def update(self, step: int, **values: float) -> None:
        if values:
            self.note(**values)
        self.bar.update(step - self.bar.n)
        if self.log_lines and self._due(step):
            self._write(step)

    def _due(self, step: int) -> bool:
        if step >= self.total or self.last_line is None:
            return True
        return step >= self.next_step and self.clock() - self.last_line >= 30.0

    def _write(self, step: int) -> None:
        now = self.clock()
        elapsed = now - self.start
        eta = eta_seconds(step - self.initial, self.total - step, elapsed)
        shown = "".join(f", {k} {v:.4g}" for k, v in self.values.items())
        line = (
            f"{self.stage}: {self.unit} {step}/{self.total} ({100 * step / max(1, self.total):.0f}%)"
            f"{shown}, elapsed {format_duration(elapsed)}, "
            f"ETA {'?' if eta is None else format_duration(eta)}"
        )
        log.info(line)
        self.lines.append(line)
        self.last_line = now
        self.next_step = step + self.every_steps

    def close(self) -> None:
        self.bar.close()
