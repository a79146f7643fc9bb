"""log pi(token) at a temperature, a block of positions at a time, keeping one value per
position for backward: tokens.sequences.logprobs_from_logits with less memory.
"""

from __future__ import annotations

import torch

from rlhf import accel
from rlhf.tokens.sequences import logprobs_from_logits, position_blocks, position_rows


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """logprobs_from_logits(logits, tokens, temperature): by TokenLogprobs where the fast paths
    apply, else the plain log_softmax and gather."""
    if accel.applies(logits.device):
        return TokenLogprobs.apply(logits, tokens, temperature)
    return logprobs_from_logits(logits, tokens, temperature)


class TokenLogprobs(torch.autograd.Function):
    """log softmax(z)[token] with z = logits / T, computed a block of positions at a time.

    The plain composition (fp32 copy, divide, log_softmax, gather) writes several (B, R, V)
    fp32 tensors and keeps the log-softmax for backward. Here each block of rows is a small
    fp32 temporary, only logsumexp(z) (one value per position) is saved, and the backward
    writes d/dlogits = (onehot(token) - softmax(z)) * g / T straight in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        tok = position_rows(tokens)
        lse = torch.empty(tok.shape, dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        for at, block in position_blocks(logits):
            z = torch.div(block.float(), temperature)  # a new tensor, also for fp32 logits
            lse[at] = torch.logsumexp(z, dim=-1)
            picked[at] = z.gather(-1, tok[at][:, None])[:, 0]
        ctx.save_for_backward(logits, tok, lse)
        ctx.temperature = temperature
        return (picked - lse).reshape(tokens.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, tok, lse = ctx.saved_tensors
        T = ctx.temperature
        g = grad_out.reshape(tok.shape).float() / T  # dz / dlogits = 1 / T
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for (at, block), (_, out) in zip(position_blocks(logits), position_blocks(grad)):
            softmax = torch.div(block.float(), T).sub_(lse[at][:, None]).exp_()
            gb = g[at][:, None]
            out.copy_(softmax.mul_(-gb).scatter_add_(-1, tok[at][:, None], gb))
        return grad, None, None
