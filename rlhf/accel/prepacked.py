"""Linear layers whose weights are packed once for oneDNN while a model generates on CPU.

Under bf16 autocast on a CPU, each F.linear hands oneDNN a plain (out, in) weight, and oneDNN
first reorders it into its blocked layout, then multiplies. Decoding multiplies one token per
row, so the reorder costs as much as the multiply: on the bench machine (2-core EPYC, AVX-512
bf16), a 1536x576 weight at 8 rows took 87 us plain vs 55 us packed, SmolLM2's 49152x576 LM
head 4.1 ms vs 2.1 ms. Weights do not change while a batch is sampled, so each is packed once
per `prepacked_linears` block and every step reuses it. The operands are the same bf16 values,
and the outputs were bit-identical in every check on SmolLM2's shapes (tests/test_prepacked.py,
the bench's decode rows) but not always: the packed kernel sums in another order, and a sum
that lands within fp32 rounding of a midpoint between two bf16 values can round the other way.
Seen once (2026-11-29, session 13): the test LoRA (rank 4) of tests/test_prepacked.py built
after another test had moved the global RNG, whose lora_B of up_proj gave -0.212890625 packed
against -0.2119140625 from F.linear at one of 512 outputs (exact, in fp64: -0.21240231, 3e-9
from the midpoint; F.linear's is the correctly rounded one); the sampled tokens stayed the same.
The sampled logits are kept either way, so PPO's log-probs are those the tokens were drawn from.

Only where it is the same computation: on CPU, under bf16 autocast (the autocast dtype is
what F.linear would cast to), without grad, on plain (unsharded) weights. In fp32, PyTorch's
CPU linear runs MKL, and oneDNN's fp32 result differs in the last bits, so nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from rlhf.accel.forwards import instance_forwards
from rlhf.infra.runtime import cpu_supports_fast_bf16


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


@contextmanager
def prepacked_linears(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """While open, every packable nn.Linear of `model` multiplies with its weight cast to bf16
    and packed once; yields how many layers. `rows` is the row count oneDNN packs for (the
    decode batch size; any other count gives the same result).

    Open it inside the autocast and no_grad block that generates; outside bf16 autocast on
    CPU, or on a CPU without native bf16 (oneDNN's bf16 kernels, see
    runtime.cpu_supports_fast_bf16), it changes nothing. A layer called with grad enabled (the
    context leaked into training) runs its own forward.
    """
    if not packing_applies():
        yield 0
        return
    linears = (m for m in model.modules() if packable(m))
    with instance_forwards((m, _packed_forward(m, rows)) for m in linears) as n:
        yield n


def _packed_forward(module: torch.nn.Linear, rows: int):
    own_forward = type(module).forward.__get__(module)
    packed: dict[str, Any] = {}  # filled on first use: a layer never called costs nothing

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return own_forward(x)
        if not packed:
            packed["weight"] = pack_weight(module.weight, rows)
            bias = module.bias
            packed["bias"] = None if bias is None else bias.detach().to(torch.bfloat16)
        return packed_linear(x, packed["weight"], packed["bias"])

    return forward
