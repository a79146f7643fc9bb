"""The gated MLP of Llama-family models, `down(act(gate(x)) * up(x))`, keeping less for backward.

Autograd keeps three (tokens, intermediate) tensors per layer for `act(gate) * up`: gate for
the activation's backward, act(gate) and up for the product's. act(gate) is one elementwise
pass to recompute, so `GatedProduct` keeps gate and up only and recomputes it in backward:
71 MB less per micro-batch of the PPO bench (SmolLM2, 8 x 96 tokens, bf16; 30 layers x 2.4 MB).
Forward and backward are the same kernels in the same order as autograd's (silu / gelu and
their `*_backward`, two products), so values and gradients are bit-identical
(tests/test_gated_mlp.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.accel.forwards import instance_forwards

# transformers' MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLPS = frozenset(
    {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP", "GemmaMLP", "Gemma2MLP",
     "Gemma3MLP"}
)  # fmt: skip


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up for backward. act: "silu" or "gelu_tanh"."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return _activation(gate, act) * up

    @staticmethod
    def backward(ctx, d_out):
        gate, up = ctx.saved_tensors
        # the product's backward (aten mul_backward: grad * other), then the activation's
        d_act = d_out * up
        d_up = d_out * _activation(gate, ctx.act)
        if ctx.act == "silu":
            d_gate = torch.ops.aten.silu_backward(d_act, gate)
        else:
            d_gate = torch.ops.aten.gelu_backward(d_act, gate, approximate="tanh")
        return d_gate, d_up, None


def _activation(x: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(x) if act == "silu" else F.gelu(x, approximate="tanh")


def activation_name(act_fn: torch.nn.Module) -> str | None:
    """ "silu" / "gelu_tanh" for the activation modules transformers uses, else None."""
    name = type(act_fn).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name == "GELUTanh" and getattr(act_fn, "act", None) is not None:
        # its default form is F.gelu(approximate="tanh"); the Python formula rounds otherwise
        act = act_fn.act
        if getattr(act, "func", None) is F.gelu and act.keywords == {"approximate": "tanh"}:
            return "gelu_tanh"
    return None


@contextmanager
def recomputed_activations(model: torch.nn.Module) -> Iterator[int]:
    """While open, the gated MLPs of `model` (GATED_MLPS with a known activation) keep gate and
    up for backward instead of also act(gate); yields how many. down_proj's trainable matmuls
    (its LoRA A, or its weight when trained) keep act(gate) * up too, unless gradient
    checkpointing (whose own saved-tensor hooks this would shadow) is on: each keeps a note to
    recompute it from gate and up instead. Without grad it is the plain forward."""
    mlps = [m for m in model.modules() if type(m).__name__ in GATED_MLPS]
    acts = [(m, activation_name(getattr(m, "act_fn", None))) for m in mlps]
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    forwards = ((m, _forward(m, act, not checkpointing)) for m, act in acts if act is not None)
    with instance_forwards(forwards) as n:
        yield n


def _forward(mlp: torch.nn.Module, act: str, recompute_product: bool):
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # the class's order: gate first
        if not torch.is_grad_enabled():
            return mlp.down_proj(_activation(gate, act) * up)
        product = GatedProduct.apply(gate, up, act)
        if not recompute_product:
            return mlp.down_proj(product)
        with torch.autograd.graph.saved_tensors_hooks(*_product_hooks(product, gate, up, act)):
            return mlp.down_proj(product)

    return forward


class _Recompute(tuple):
    """What is kept in place of (a view of) the product: (shape, stride, storage offset)."""


def _product_hooks(product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str):
    """Saved-tensor hooks under which any tensor on the product's storage (the (B * T, I) view
    a linear keeps) is kept as a _Recompute note, and rebuilt in backward as
    _activation(gate) * up: the same kernels on the same inputs, the same bits. Only the
    storage's address is held here, not the product, so it is freed after the forward; gate
    and up are kept by GatedProduct anyway."""
    address, dtype = product.untyped_storage().data_ptr(), product.dtype

    def pack(t: torch.Tensor) -> Any:
        if t.dtype == dtype and t.untyped_storage().data_ptr() == address:
            return _Recompute((tuple(t.shape), t.stride(), t.storage_offset()))
        return t

    def unpack(kept: Any) -> torch.Tensor:
        if not isinstance(kept, _Recompute):
            return kept
        shape, stride, offset = kept
        return product_for_backward(gate, up, act).as_strided(shape, stride, offset)

    return pack, unpack


def product_for_backward(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up again, contiguous as GatedProduct's output was."""
    return (_activation(gate, act) * up).contiguous()
