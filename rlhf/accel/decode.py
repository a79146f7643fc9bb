"""A lean sampling loop for causal LMs: prefill, then one token per step on a KV cache, rows
that have finished dropped from the batch.

What `model.generate(do_sample=True, temperature=T)` computes, minus its per-token machinery
(logits processors, stopping-criteria objects, input preparation) and minus the rows that
are done: generate keeps decoding every row until the last one stops, so in a batch where
most answers end after 20 tokens and one runs to 48, most of the late steps decode padding.
Each step draws from softmax(logits / T) exactly (torch.multinomial on torch's global RNG,
so a seed gives the same tokens); the kept logits are the ones each token was drawn from, so
PPO's log-probs describe the sampling exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.roles.actor_critic import accepts_logits_to_keep, lm_head_inputs
from rlhf.roles.models import cache_keyword
from rlhf.roles.shared_prefix import distinct_rows
from rlhf.tokens.chat import positions_from_mask

# Drop finished rows once this fraction of the rows still in the batch has finished: selecting
# the cache's rows costs about a decode step, so compact a few times (geometrically), not
# after every EOS.
COMPACT_FRACTION = 0.25


@dataclass
class Decoded:
    response_ids: torch.Tensor  # (B, R): pad_id after each row's EOS, as generate fills them
    # (B, R, V) raw logits that sampled token t (keep), in the LM head's dtype: under bf16
    # autocast bf16, the values whose exact fp32 copy the token was drawn from, in half the memory
    logits: torch.Tensor | None
    hidden: torch.Tensor | None  # (B, R, H) the LM head's input at those positions (keep)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_ids: Sequence[int],
    pad_id: int,
    keep: bool = False,
    compact: bool = True,
) -> Decoded:
    """Sample up to `max_new_tokens` per row from softmax(logits / temperature).

    prompt_ids / prompt_mask: (B, P), left padded. A row stops after its first token in
    `eos_ids`; the call stops when every row has. Draws from torch's global RNG.
    compact: drop finished rows from the batch and the cache as they pile up. keep: also
    return the logits and LM-head inputs (zeros where a row had finished).
    """
    B, device = prompt_ids.shape[0], prompt_ids.device
    eos = torch.tensor(list(eos_ids), device=device)
    live = LiveRows.for_prompts(model, prompt_ids, prompt_mask)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    sampled = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    kept = Kept(B, max_new_tokens) if keep else None
    steps = 0
    # A prompt sampled k times (GRPO, RLOO) is prefilled once: see _forward.
    shared = distinct_rows(prompt_ids, prompt_mask)
    with lm_head_inputs(model) if keep else nullcontext() as seen:
        for t in range(max_new_tokens):
            last, rows_out = live.forward(model, shared if t == 0 else None)
            logits = last.float()  # generate's `.to(copy=True, dtype=float32)`
            nxt = torch.where(live.unfinished, _draw(logits / temperature), pad_id)
            tokens[live.rows, t] = nxt
            sampled[live.rows, t] = live.unfinished
            if keep:
                kept.write(live.rows, t, last, seen.pop()[rows_out, -1])
            steps = t + 1
            live.unfinished &= ~torch.isin(nxt, eos)
            n_left = int(live.unfinished.sum())
            if n_left == 0:
                break
            live.feed(nxt)
            if compact and live.finished_pile_up(n_left):
                live.drop_finished()
    tokens = tokens[:, :steps]
    return kept.decoded(tokens, sampled[:, :steps]) if keep else Decoded(tokens, None, None)


@dataclass
class LiveRows:
    """The rows still in the batch and what the next step feeds them: which original rows they
    are, their attention mask, the next input ids and positions, which have not finished yet,
    and the KV cache with the keyword arguments the forward takes it by."""

    rows: torch.Tensor
    attn: torch.Tensor
    step_ids: torch.Tensor
    step_pos: torch.Tensor
    unfinished: torch.Tensor
    kv: Any
    extra: dict[str, Any]

    @classmethod
    def for_prompts(
        cls, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> LiveRows:
        """Every row, before the prefill: the prompts, an empty cache."""
        from transformers import DynamicCache

        B, device = prompt_ids.shape[0], prompt_ids.device
        kv = DynamicCache(config=model.config)  # sliding-window layers too (Gemma 3)
        extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        extra[cache_keyword(model)] = kv  # by the name this forward takes it: others swallow it
        return cls(
            rows=torch.arange(B, device=device),
            attn=prompt_mask,
            step_ids=prompt_ids,
            step_pos=positions_from_mask(prompt_mask),
            unfinished=torch.ones(B, dtype=torch.bool, device=device),
            kv=kv,
            extra=extra,
        )

    def forward(self, model: torch.nn.Module, spread: Any = None) -> tuple[torch.Tensor, Any]:
        return _forward(model, self.kv, self.step_ids, self.attn, self.step_pos, self.extra, spread)

    def feed(self, nxt: torch.Tensor) -> None:
        """The sampled tokens are the next step's input, one position on."""
        self.attn = torch.cat([self.attn, self.attn.new_ones(self.attn.shape[0], 1)], dim=1)
        self.step_ids, self.step_pos = nxt[:, None], self.step_pos[:, -1:] + 1

    def finished_pile_up(self, n_left: int) -> bool:
        """Whether COMPACT_FRACTION of the rows in the batch (at least one) have finished."""
        n = self.rows.shape[0]
        return n - n_left >= max(1, COMPACT_FRACTION * n)

    def drop_finished(self) -> None:
        """Keep the unfinished rows only, in the batch and in the cache."""
        here = self.unfinished.nonzero().squeeze(1)
        self.kv.batch_select_indices(here)
        self.rows, self.unfinished, self.attn = (
            self.rows[here],
            self.unfinished[here],
            self.attn[here],
        )
        self.step_ids, self.step_pos = self.step_ids[here], self.step_pos[here]


class Kept:
    """keep: the raw logits each token was drawn from and the LM head's inputs, (B, R, .),
    written in place each step. torch.empty, allocated at the first step: steps never reached
    cost no memory."""

    def __init__(self, batch: int, max_new_tokens: int):
        self.shape = (batch, max_new_tokens)
        self.logits: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def write(self, rows: torch.Tensor, t: int, last: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = last.new_empty(*self.shape, last.shape[-1])
            self.hidden = hidden.new_empty(*self.shape, hidden.shape[-1])
        self.logits[rows, t] = last
        self.hidden[rows, t] = hidden

    def decoded(self, tokens: torch.Tensor, sampled: torch.Tensor) -> Decoded:
        """Decoded with the kept logits and hidden states, zeros at positions after a row had
        finished (dropped or not): no sample there."""
        # Indices, not the bool mask: `x[mask] = 0` runs masked_fill_ over all of x, (B, R, V)
        # logits included, where index_put_ writes only those rows.
        not_sampled = (~sampled).nonzero(as_tuple=True)
        steps = tokens.shape[1]
        logits, hidden = self.logits[:, :steps], self.hidden[:, :steps]
        logits.index_put_(not_sampled, logits.new_zeros(()))
        hidden.index_put_(not_sampled, hidden.new_zeros(()))
        return Decoded(tokens, logits, hidden)


def _forward(model, kv, ids, attn, pos, extra, spread=None) -> tuple[torch.Tensor, Any]:
    """One forward on the cache: the last position's logits and which output rows they are.

    spread (the prefill of a batch whose prompts repeat): (first, row) from distinct_rows. The
    distinct prompts run once and the cache is indexed out to every row: each row's keys,
    values and first logits are the ones a prefill of every row computes (rows do not mix),
    at 1/k of the work for a prompt sampled k times."""
    every = slice(None)
    first, row = spread if spread is not None else (every, every)
    out = model(
        input_ids=ids[first],
        attention_mask=attn[first],
        position_ids=pos[first],
        use_cache=True,
        **extra,
    )
    if spread is not None:
        kv.batch_select_indices(row)
    return out.logits[row, -1], row


def _draw(scaled_logits: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scaled_logits)."""
    return torch.multinomial(torch.softmax(scaled_logits, dim=-1), 1)[:, 0]
