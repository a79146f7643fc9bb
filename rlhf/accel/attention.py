"""Attention whose backward runs in matmuls on a CPU: the forward is sdpa's own kernel.

For a masked batch (left-padded prompts) torch's CPU sdpa runs its flash-attention kernel,
whose backward is slower there than recomputing the attention weights and differentiating
through matmuls (docs/performance.md). While `matmul_attention_backward()` is open, the
"sdpa" attention of transformers models does that: forward by the same F.scaled_dot_product_
attention call, bit for bit, and the gradient from

    P = softmax(s Q K^T + mask),  dV = P^T dO,  dP = dO V^T,
    dS = P * (dP - rowsum(dP * P)),  dQ = s dS K,  dK = s dS^T Q

(the attention backward as FlashAttention writes it: Dao et al. 2022, appendix B). Anything
else (no grad, not CPU, dropout, an additive or position-bias mask, decoding, a score matrix
over SCORES_LIMIT bytes) runs transformers' sdpa unchanged. The score matrix (B, H, T, S) is
a temporary of the backward only. Kept for backward: q, k, v in the dtype sdpa computes in
(bf16 under autocast, where the rotary embedding hands over fp32 q and k) and k, v once per
key/value head, not repeated per query head, and not the output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

SCORES_LIMIT = 64 * 2**20  # bytes of one fp32 (B, H, T, S) score matrix, recomputed in backward


class SdpaMatmulBackward(torch.autograd.Function):
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) forward; the
    gradient recomputed with matmuls. q: (B, H, T, D); k, v: (B, H / groups, T, D), each
    key/value head shared by `groups` query heads (grouped-query attention); mask: bool,
    broadcastable. Kept for backward: q, k, v as given (not repeated per query head) and the
    mask; not the output, which sdpa's backward reads (rowsum(dO * O)) but the softmax
    backward here does not (rowsum(dP * P))."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, groups=1):
        k_all, v_all = _per_query_head(k, groups), _per_query_head(v, groups)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale, ctx.groups = scale, groups
        return out

    @staticmethod
    def backward(ctx, d_out):
        # backward() called under autocast runs this under it too: the dtypes here are chosen
        with torch.autocast(d_out.device.type, enabled=False):
            return SdpaMatmulBackward._gradients(ctx, d_out)

    @staticmethod
    def _gradients(ctx, d_out):
        q, k, v, mask = ctx.saved_tensors
        s, groups = ctx.scale, ctx.groups
        k, v = _per_query_head(k, groups), _per_query_head(v, groups)
        acc = torch.promote_types(q.dtype, torch.float32)  # scores and softmax in fp32 at least
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(s)
        scores.masked_fill_(~mask, float("-inf"))
        # A query row that sees no key (padding) has output 0 in sdpa: weights 0, not NaN.
        p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
        d_v = torch.matmul(p.to(v.dtype).transpose(-1, -2), d_out)
        d_p = torch.matmul(d_out, v.transpose(-1, -2)).to(acc)
        # softmax's backward, P * (dP - rowsum(dP * P)), in the fused kernel autograd uses for
        # softmax (two passes over the scores instead of four)
        d_s = torch._softmax_backward_data(d_p, p, -1, acc).mul_(s).to(q.dtype)
        d_k = torch.matmul(d_s.transpose(-1, -2), q)
        return (
            torch.matmul(d_s, k),
            _sum_over_groups(d_k, groups),
            _sum_over_groups(d_v, groups),
            None,
            None,
            None,
        )


def _per_query_head(kv: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H / groups, T, D) -> (B, H, T, D): query head h reads key/value head h // groups
    (transformers' repeat_kv)."""
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _sum_over_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of _per_query_head: each key/value head sums its query heads' parts."""
    if groups == 1:
        return grad
    b, h, t, d = grad.shape
    return grad.view(b, h // groups, groups, t, d).sum(2)


def _applies(query, key, attention_mask, dropout, kwargs) -> bool:
    b, h, t, _ = query.shape
    keys = key.shape[2]  # t, or more when queries continue a cached prefix (shared_prefix.py)
    return (
        torch.is_grad_enabled()
        and query.device.type == "cpu"
        and dropout == 0.0
        and t > 1
        and keys >= t
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and b * h * t * keys * 4 <= SCORES_LIMIT
    )


def _attention(sdpa: Any):
    """transformers' attention-function signature, around its sdpa function `sdpa`."""

    def attention(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=None,
        is_causal=None,
        **kwargs,
    ):
        if not _applies(query, key, attention_mask, dropout, kwargs):
            return sdpa(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        # Under autocast, sdpa casts its inputs to the autocast dtype (from fp32 after the
        # rotary embedding): cast them here, so what is kept for backward is what sdpa
        # computes with, in half the bytes; the casts' backward gives fp32 gradients back.
        device = query.device.type
        if torch.is_autocast_enabled(device):
            low = torch.get_autocast_dtype(device)
            query, key, value = (
                t.to(low) if t.is_floating_point() else t for t in (query, key, value)
            )
        groups = getattr(module, "num_key_value_groups", 1)  # repeated inside, not kept
        out = SdpaMatmulBackward.apply(query, key, value, attention_mask, scaling, groups)
        return out.transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def matmul_attention_backward() -> Iterator[None]:
    """While open, transformers models with `attn_implementation="sdpa"` differentiate their
    attention with matmuls on a CPU (see the module docstring); their forward is unchanged."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", _attention(sdpa))
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", sdpa)
