"""Modules running another forward while a context is open (an instance attribute over the
class's forward), restored on exit: how the lean LoRA forward and the fused projections
swap in their own forwards without subclassing transformers' or peft's
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
    Hooks still run: only `forward` changes, not `__call__`. Contexts nest: a replacement may
    call the forward it replaces (read as `module.forward` before), and on exit each module
    gets back what it had: an enclosing context's forward, or the class's."""
    patched = []
    try:
        for module, forward in replacements:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield len(patched)
    finally:
        for module, before in reversed(patched):
            if before is None:
                del module.forward  # the class's forward again
            else:
                module.forward = before
