"""Clean stops on SIGINT / SIGTERM: finish the current step, save a checkpoint, exit non-zero.

The handler only sets a flag; the training loops look at it between steps (never mid-step, so
the checkpoint is consistent) through `StopSignal.requested(accelerator)`, which agrees across
ranks: a signal that reached one rank stops all of them at the same step. A second SIGINT
falls back to Python's default (KeyboardInterrupt at once).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


class Interrupted(Exception):
    """Raised by a stage after its stop checkpoint is written; the CLI exits 128 + signum."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; {where}; continue with --resume"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignal:
    """`with StopSignal() as stop:` ... `stop.requested(accelerator)` between steps."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        self.signum = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signal() needs it
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self, accelerator: Any = None) -> int | None:
        """The signal number if any rank was signalled, else None (a collective when N > 1)."""
        local = self.signum or 0
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([local], device=accelerator.device)
            local = int(accelerator.reduce(flag, "max").item())
        return local or None
