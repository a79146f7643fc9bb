"""Conventions of token sequences that every stage and tool shares, each written once:

  * logits at position t predict token t + 1 (`response_slice`, `response_keep`);
  * log pi(token) and the entropy are taken at the sampling temperature, a few positions at a
    time (`logprobs_from_logits`, `entropy_from_logits`, `position_blocks`);
  * a response ends at its first end token, which it keeps (`response_mask`; N implementation
    details of RLHF with PPO, #4).

Torch only: the benchmark's TRL environment imports it too.
"""

from __future__ import annotations

import torch


def response_slice(prompt_len: int, response_len: int) -> slice:
    """The positions of a prompt + response sequence that predict the response: P-1 .. P+R-2."""
    return slice(prompt_len - 1, prompt_len + response_len - 1)


def response_keep(response_len: int) -> int:
    """How many trailing positions a forward over prompt+response must keep so that
    `[:, :response_len]` of them are the positions that predict the response (P-1 .. P+R-2)."""
    return response_len + 1


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(token) at the sampling temperature, in fp32 (N implementation details, #10):
    (..., V) logits and (...) tokens -> (...) log-probs, differentiable in the logits. Without
    autograd, a few positions at a time: no (..., V) fp32 temporaries."""
    if torch.is_grad_enabled() and logits.requires_grad:
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1)
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    view, picked = position_rows(out), position_rows(tokens)
    for at, block in position_blocks(logits):
        logp = torch.log_softmax(torch.div(block.float(), temperature), dim=-1)
        view[at] = logp.gather(-1, picked[at][:, None])[:, 0]
    return out


def position_rows(per_position: torch.Tensor) -> torch.Tensor:
    """A (..., R) tensor as (rows, R), a view where it can be, indexed by position_blocks."""
    if per_position.dim() > 1:
        return per_position.reshape(-1, per_position.shape[-1])
    return per_position[None]


def position_blocks(logits: torch.Tensor, rows: int = 8):
    """(index, (n <= rows, V) view) over the positions of (..., V) logits, never copied; the
    index addresses position_rows of the (...) shape."""
    lead = logits.reshape(-1, *logits.shape[-2:]) if logits.dim() > 2 else logits[None]
    for b in range(lead.shape[0]):
        for r in range(0, lead.shape[1], rows):
            at = (b, slice(r, r + rows))
            yield at, lead[at]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy of softmax(z), z = logits / T: logsumexp(z) - sum softmax(z) * z.
    (..., V) -> (...). Without autograd, a few positions at a time (no (..., V) temporaries)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        z = logits.float() / temperature
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    view = position_rows(out)
    for at, block in position_blocks(logits):
        z = torch.div(block.float(), temperature)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        view[at] = lse[:, 0] - (torch.exp(z - lse) * z).sum(-1)
    return out


def response_mask(
    response_ids: torch.Tensor, eos_id: int | list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first end token (any of `eos_id`, e.g. Llama 3's <|eot_id|>
    and <|end_of_text|>); (mask (B, R) float, ended_with_eos (B,) bool)."""
    ends = torch.tensor(
        eos_id if isinstance(eos_id, list) else [eos_id], device=response_ids.device
    )
    is_eos = torch.isin(response_ids, ends)
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    ended = is_eos.any(dim=1)
    return (~eos_seen_before).float(), ended
