"""The CPU fast path, a layer over the plain code that one recipe key switches off.

`accel: off` runs the plain path everywhere: transformers' `generate` and
`log_softmax(logits / T)` + `gather`. `accel: auto` (the default) samples with the lean
sampling loop of `decode.py` where it was measured to pay: on a CPU only, so on a GPU `auto`
is `off`. docs/performance.md has what it does and what it gains end to end, and the paths
that were measured and deleted.

The switch is process-wide: the stage runner sets it from the recipe (`use(recipe.accel)`),
and the fast path asks `applies(device)` before it changes anything. `RLHF_ACCEL=off` in the
environment wins over the recipe and over `use`, in every process (`make test-plain`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rlhf.infra.errors import UserError

MODES = ("auto", "off")
_mode = ["auto"]


def use(mode: str) -> None:
    """Set the process's switch: "auto" (fast paths where measured: CPU) or "off"."""
    if mode not in MODES:
        raise ValueError(f"accel: {mode!r} is not one of {', '.join(MODES)}")
    forced_off()  # a bad RLHF_ACCEL fails here, before any model is built
    _mode[0] = mode


def forced_off() -> bool:
    """RLHF_ACCEL=off: the plain path whatever the recipe or `use` says; auto (or unset) leaves
    the choice to them."""
    value = os.environ.get("RLHF_ACCEL") or "auto"
    if value not in MODES:
        raise UserError(f"RLHF_ACCEL={value!r} is not one of {', '.join(MODES)}")
    return value == "off"


def mode() -> str:
    return "off" if forced_off() else _mode[0]


def applies(device: torch.device | str) -> bool:
    """The fast paths run for tensors on `device`: switched on, and a CPU (none was measured
    on a GPU)."""
    return mode() == "auto" and torch.device(device).type == "cpu"


@contextmanager
def using(mode: str) -> Iterator[None]:
    """The switch set to `mode` while open (tests run both paths)."""
    before = _mode[0]
    use(mode)
    try:
        yield
    finally:
        _mode[0] = before
