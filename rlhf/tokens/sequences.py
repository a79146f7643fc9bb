"""Conventions of token sequences that every stage and tool shares, each written once:

  * logits at position t predict token t + 1 (`next_token_logits`, `next_token_targets`,
    `response_slice`, `response_keep`);
  * log pi(token) is a log-softmax at the sampling temperature, read at the token
    (`logprobs_from_logits`);
  * a response ends at its first end token, which it keeps; everything after is masked
    (`response_mask`; N implementation details of RLHF with PPO, #4).

Torch only: the benchmark's TRL environment imports it too.
"""

from __future__ import annotations

import torch


def next_token_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, T-1, V): the positions that predict a next token."""
    return logits[:, :-1]


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T-1): the tokens those positions predict (ids, labels or a mask)."""
    return ids[:, 1:]


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
    """log pi(token) at the sampling temperature: the PPO ratio must compare the distribution
    the tokens were sampled from (N implementation details, #10). Computed in fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


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
