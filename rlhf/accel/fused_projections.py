"""While a model samples on a CPU in bf16: the projections that read the same input, fused,
their weights packed once for oneDNN (torch.ops.mkldnn) for the whole call.

A decode step multiplies one token per row, so each matmul costs about as much in per-call
overhead as in reading its weight. With LoRA on every linear, a SmolLM2 layer makes 21 calls
(each of q, k, v, o, gate, up, down: the base, A and B), three quarters of them rank-16
matmuls that read almost nothing. Here the siblings that read the same input are one group,
and a group is two matmuls:

    [base(x) | A(x)] = x @ [W_1; ...; W_n; A_1; ...; A_n]^T       (one packed weight)
    out              = base(x) + blockdiag(B_1, ..., B_n)(A(x)) * scale

with the groups (q, k, v), (gate, up), (o) and (down): 8 calls a layer instead of 21, and no
per-module LoRA bookkeeping (docs/performance.md has what it saves).

Bit for bit the numbers of the modules it replaces (peft's LoRA forward as
lean_lora.lean_lora_forward runs it, on weights packed for oneDNN): each output column of a oneDNN matmul
is the same dot product whatever other columns share the call, a block-diagonal B adds exact
zeros, and the scale and the sum are elementwise (tests/test_fused_projections.py compares
the sampled tokens, logits and LM-head inputs with the unfused path's).

The first member of a group to be called computes the whole group and keeps its siblings'
outputs for their calls on the same input tensor (by identity). With the adapters disabled
(the reference, or the SFT policy the evaluation samples) a group is its base columns alone,
as peft then computes base(x). Anything else (grad on, another input, a merged adapter) goes
to the member's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.accel.forwards import instance_forwards
from rlhf.accel.lean_lora import plain_lora_adapter
from rlhf.infra.runtime import cpu_supports_fast_bf16

# Sibling projections that read the same input in the transformers decoder layers we run
# (Llama, Qwen2, Mistral, Gemma); a layer that reads them from different inputs falls back.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))


def bf16_autocast_on_cpu() -> bool:
    """What F.linear on a CPU casts to is bf16 (cheap: for checks on every call)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def packing_applies() -> bool:
    """Packed bf16 weights compute what autocast's F.linear would: under bf16 autocast on a
    CPU with native bf16 (runtime.cpu_supports_fast_bf16, which reads the environment: check
    once per block, not per call)."""
    return bf16_autocast_on_cpu() and cpu_supports_fast_bf16()


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A (out, in) weight cast to bf16 (as autocast casts it) and reordered for oneDNN."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear under bf16 autocast, on a weight from pack_weight and a bf16 bias (or None):
    all three operands in bf16, as autocast casts them."""
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")


def packable(module: torch.nn.Module) -> bool:
    """An nn.Linear whose weight can be packed once: a plain 2-D tensor on the CPU."""
    if not isinstance(module, torch.nn.Linear):
        return False
    weight = module.weight
    return (
        type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor / ZeRO-3 shard
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.numel() > 0
    )


@dataclass
class _Parts:
    """One projection: its base linear and, for a plain LoRA adapter, A, B and the scale."""

    module: torch.nn.Module
    base: torch.nn.Linear
    lora_a: torch.nn.Linear | None = None
    lora_b: torch.nn.Linear | None = None
    scale: float | None = None
    adapter: str | None = None

    def adapter_state(self) -> str | None:
        """ "on": the adapter applies; "off": disabled (peft runs the base alone: the reference,
        the SFT policy); None: anything else (merged, another adapter): the module's own
        forward. A projection without LoRA is always "on"."""
        if self.lora_a is None:
            return "on"
        m = self.module
        if m.merged:
            return None
        if m.disable_adapters:
            return "off"
        return "on" if list(m.active_adapters) == [self.adapter] else None


def _parts(module: Any) -> _Parts | None:
    """What a projection computes, where this module can compute it; else None."""
    if packable(module):
        return _Parts(module, module)
    name = plain_lora_adapter(module)
    if name is None or not packable(module.base_layer):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if not (packable(a) and packable(b) and a.bias is None and b.bias is None):
        return None
    return _Parts(module, module.base_layer, a, b, float(module.scaling[name]), name)


class _Group:
    """Projections read from one input, computed by two packed matmuls."""

    def __init__(self, parts: Sequence[_Parts], rows: int):
        self.parts = list(parts)
        self.sizes = [p.base.out_features for p in parts]
        self.width = sum(self.sizes)  # the base columns; the A columns follow
        self.lora = parts[0].lora_a is not None
        weights = [p.base.weight for p in parts]
        if self.lora:
            weights += [p.lora_a.weight for p in parts]
        self.weight = pack_weight(torch.cat([w.detach().to(torch.bfloat16) for w in weights]), rows)
        if any(p.base.bias is not None for p in parts):
            biases = [
                p.base.bias if p.base.bias is not None else p.base.weight.new_zeros(n)
                for p, n in zip(parts, self.sizes)
            ]
            rank = sum(p.lora_a.out_features for p in parts) if self.lora else 0
            biases.append(torch.zeros(rank))
            self.bias = torch.cat([b.detach().to(torch.bfloat16) for b in biases])
        else:
            self.bias = None
        if self.lora:
            self.scale = parts[0].scale
            blocks = torch.block_diag(*[p.lora_b.weight.detach().float() for p in parts])
            self.lora_b = pack_weight(blocks, rows)
        self.input: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}

    def compute(self, x: torch.Tensor, adapter: bool = True) -> list[torch.Tensor]:
        y = packed_linear(x, self.weight, self.bias)
        if self.lora and adapter:
            # peft: result + lora_B(lora_A(x)) * scale, on every member's columns at once.
            z = packed_linear(y[..., self.width :], self.lora_b, None)
            y = y[..., : self.width] + z * self.scale
        elif self.lora:  # adapter disabled: peft's result is base(x), the first columns
            y = y[..., : self.width]
        return list(y.split(self.sizes, dim=-1))

    def forward_for(self, index: int, own_forward):
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.input is x and index in self.pending:
                out = self.pending.pop(index)
                if not self.pending:
                    self.input = None
                return out
            if (
                args
                or kwargs
                or torch.is_grad_enabled()
                or x.device.type != "cpu"
                or not x.is_floating_point()
                or not bf16_autocast_on_cpu()  # the CPU's bf16 was checked on entry
            ):
                return own_forward(x, *args, **kwargs)
            states = {p.adapter_state() for p in self.parts}
            if len(states) != 1 or None in states:
                return own_forward(x, *args, **kwargs)
            outs = self.compute(x, adapter=states == {"on"})
            self.pending = {i: o for i, o in enumerate(outs) if i != index}
            self.input = x if self.pending else None
            return outs[index]

        return forward


def _groups(model: torch.nn.Module, rows: int) -> list[_Group]:
    groups = []
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if any(m is None for m in members):
                continue
            parts = [_parts(m) for m in members]
            if any(p is None for p in parts):
                continue
            lora = {p.lora_a is not None for p in parts}
            scales = {p.scale for p in parts}
            if len(lora) == 1 and len(scales) == 1 and (True in lora or len(parts) > 1):
                groups.append(_Group(parts, rows))
    return groups


@contextmanager
def fused_projections(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """While open, the sibling projections of `model` (GROUPS) run as fused packed matmuls;
    yields how many groups. Open it inside the autocast, no_grad and lean-LoRA blocks that
    sample (rollout.sample_rollout); where packing does not apply (fp32, a CPU
    without native bf16, CUDA) it changes nothing. A lone projection without LoRA is left as it is
    (nothing to fuse)."""
    if not packing_applies():
        yield 0
        return
    groups = _groups(model, rows)
    replacements = [
        (p.module, group.forward_for(i, p.module.forward))
        for group in groups
        for i, p in enumerate(group.parts)
    ]
    with instance_forwards(replacements):
        yield len(groups)
