"""peft's LoRA forward without its per-call bookkeeping, and an autocast cast computed once
for the layers that read the same input.

peft's forward does argument checks, adapter lookups and dtype casts on every call, which cost
more than the rank-16 matmuls themselves when a batch of a few rows decodes one token at a
time on a CPU. The operations and their order here are peft's, so the numbers are identical.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from rlhf.accel.forwards import instance_forwards


@contextmanager
def lean_lora_forward(model: torch.nn.Module):
    """While open, each plain LoRA linear computes `base(x) + B(A(x)) * scale` directly,
    with peft's numbers under autocast too (see _lean_forward). Anything else (several or
    special adapters, dropout, merged or disabled adapters, extra arguments) goes through
    peft's own forward.
    """
    lean = []
    casts = _LastInputCast()
    for module in model.modules():
        name = plain_lora_adapter(module)
        if name is not None:
            lean.append((module, _lean_forward(module, name, casts)))
    with instance_forwards(lean):  # peft's forward again on exit
        yield


def plain_lora_adapter(module: torch.nn.Module) -> str | None:
    """The adapter name if `module` is a peft LoRA Linear over an nn.Linear computing
    `base(x) + B(A(x)) * scale` with one active adapter (no dropout, no variant such as DoRA);
    else None."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # no peft: nothing can be a LoRA layer
        return None
    if not isinstance(module, LoraLinear) or not isinstance(module.base_layer, torch.nn.Linear):
        return None
    names = [a for a in module.active_adapters if a in module.lora_A]
    if len(names) != 1 or names[0] in getattr(module, "lora_variant", {}):
        return None
    if not isinstance(module.lora_dropout[names[0]], torch.nn.Identity):
        return None
    return names[0]


def _lean_forward(module: torch.nn.Module, name: str, casts: _LastInputCast):
    """peft's LoRA Linear.forward for one plain adapter, without its bookkeeping:
    result = base(x); result + B(A(x cast to A's dtype)) * scale, cast back to result's dtype.

    Under autocast, peft casts a bf16 input (down_proj's) to A's fp32 and autocast casts it
    straight back to bf16 for the matmul: an exact round trip (every bf16 value is an fp32
    value), and so is its gradient, so it is skipped; the numbers stay peft's. An fp32 input
    (the norms' outputs, read by q, k, v or by gate and up) is cast to the autocast dtype once
    for all the layers that read it, where autocast casts it once per matmul (see
    _LastInputCast)."""
    peft_forward = type(module).forward.__get__(module)
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    scale = module.scaling[name]

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        low = torch.get_autocast_dtype(device) if autocast else None
        exact = x.dtype == lora_a.weight.dtype or x.dtype == low
        if args or kwargs or module.disable_adapters or module.merged or not exact:
            return peft_forward(x, *args, **kwargs)
        if autocast and x.dtype != low and x.is_floating_point():
            result = base(casts(x, low))
            return (result + lora_b(lora_a(casts(x, low))) * scale).to(result.dtype)
        result = base(x)
        return (result + lora_b(lora_a(x)) * scale).to(result.dtype)

    return forward


class _LastInputCast:
    """`x.to(dtype)` computed once for consecutive calls on the same tensor.

    Autocast casts a matmul's input on every call: the fp32 output of a norm read by q, k and
    v (base and LoRA A each) is cast six times per layer and, where grad is on, each LoRA A
    keeps its own bf16 copy for backward. Here the cast is computed once, and each reader gets
    its own autograd node (_CastForOneReader) whose backward casts that reader's gradient back
    to x's dtype, as autocast's cast would: the gradients reaching x are summed in x's dtype,
    not in bf16. Same values, same gradients (tests/ppo/test_scoring.py), and one bf16 copy
    kept for backward instead of one per reader. Remembers the last input only (by identity and version), so a
    tensor changed in place is cast again."""

    def __init__(self) -> None:
        self.last: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        last = self.last
        if last is None or last[0] is not x or last[1] != x._version or last[2].dtype != dtype:
            self.last = last = (x, x._version, x.detach().to(dtype))
        if not (torch.is_grad_enabled() and x.requires_grad):
            return last[2]
        return _CastForOneReader.apply(x, last[2])


class _CastForOneReader(torch.autograd.Function):
    """Forward: `low`, the precomputed cast of x. Backward: the gradient cast to x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None
