"""Modules running another forward while a context is open (an instance attribute over the
class's forward), restored on exit: how the lean LoRA forward, prepacked linears and the
gated-MLP recompute swap in their own forwards without subclassing transformers' or peft's
modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def instance_forwards(
    replacements: Iterable[tuple[torch.nn.Module, Callable]],
) -> Iterator[int]:
    """While open, each (module, forward) pair's module calls `forward`; yields how many.
    Hooks still run: only `forward` changes, not `__call__`."""
    patched = []
    try:
        for module, forward in replacements:
            module.forward = forward
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the class's forward again
