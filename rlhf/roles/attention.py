"""Attention whose backward runs in matmuls on a CPU: the forward is sdpa's own kernel.

For a masked batch (left-padded prompts) torch's CPU sdpa runs its flash-attention kernel,
whose backward took 9.5-10.4 ms per SmolLM2 layer at 8 x 96 tokens (bf16, 2 cores), where
recomputing the attention weights and differentiating through matmuls took 3.7-5.8 ms, with
about the same error against an fp64 reference; a PPO update of the bench went from 8.05 to
7.69 s (medians of 6 interleaved runs). While `matmul_attention_backward()` is open, the
"sdpa" attention of transformers models does that: forward by the same F.scaled_dot_product_
attention call, bit for bit, and the gradient from

    P = softmax(s Q K^T + mask),  dV = P^T dO,  dP = dO V^T,
    dS = P * (dP - rowsum(dP * P)),  dQ = s dS K,  dK = s dS^T Q

(the attention backward as FlashAttention writes it: Dao et al. 2022, appendix B). Anything
else (no grad, not CPU, dropout, an additive or position-bias mask, decoding, a score matrix
over SCORES_LIMIT bytes) runs transformers' sdpa unchanged. The score matrix (B, H, T, T) is
a temporary of the backward only: nothing more is kept for backward than sdpa keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

SCORES_LIMIT = 64 * 2**20  # bytes of one fp32 (B, H, T, T) score matrix, recomputed in backward


class SdpaMatmulBackward(torch.autograd.Function):
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) forward; the
    gradient recomputed with matmuls (q, k, v: (B, H, T, D); mask: bool, broadcastable)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, mask = ctx.saved_tensors
        s = ctx.scale
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 at least
        scores = torch.matmul(q, k.transpose(-1, -2)).to(acc).mul_(s)
        scores.masked_fill_(~mask, float("-inf"))
        # A query row that sees no key (padding) has output 0 in sdpa: weights 0, not NaN.
        p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
        d_v = torch.matmul(p.to(v.dtype).transpose(-1, -2), d_out)
        d_p = torch.matmul(d_out, v.transpose(-1, -2)).to(acc)
        # softmax's backward, P * (dP - rowsum(dP * P)), in the fused kernel autograd uses for
        # softmax (two passes over the scores instead of four)
        d_s = torch._softmax_backward_data(d_p, p, -1, acc).mul_(s).to(q.dtype)
        return torch.matmul(d_s, k), torch.matmul(d_s.transpose(-1, -2), q), d_v, None, None


def _applies(query, key, attention_mask, dropout, kwargs) -> bool:
    b, h, t, _ = query.shape
    return (
        torch.is_grad_enabled()
        and query.device.type == "cpu"
        and dropout == 0.0
        and t > 1
        and key.shape[2] == t
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and b * h * t * t * 4 <= SCORES_LIMIT
    )


def _attention(sdpa: Any):
    """transformers' attention-function signature, around its sdpa function `sdpa`."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  is_causal=None, **kwargs):  # fmt: skip
        if not _applies(query, key, attention_mask, dropout, kwargs):
            return sdpa(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)  # fmt: skip
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:  # as transformers' sdpa does on a CPU with a mask
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        out = SdpaMatmulBackward.apply(query, key, value, attention_mask, scaling)
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
