"""The CPU fast paths, a layer over the plain code that one recipe key switches off.

`accel: off` runs the plain path everywhere: transformers' generate, log_softmax + gather,
unmodified peft and transformers modules, glibc's malloc as it is. `accel: auto` (the default)
adds the fast paths where they were measured to pay: on a CPU only, so on a GPU `auto` is
`off`. Each fast path is a module here, and `rlhf.accel.apply` is the one place the loops
open them; docs/performance.md has what each does and what it gained end to end.

The switch is process-wide: the stage runner sets it from the recipe (`use(recipe.accel)`),
and every fast path asks `applies(device)` before it changes anything. `RLHF_ACCEL=off` in the
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
