"""A lean sampling loop for causal LMs: prefill, then one token per step on a KV cache, rows
that have finished dropped from the batch.

What `model.generate(do_sample=True, temperature=T)` does, minus its per-token machinery
(logits processors, stopping-criteria objects, input preparation) and minus the rows that
are done: generate keeps decoding every row until the last one stops, so in a batch where
most answers end after 20 tokens and one runs to 48, most of the late steps decode padding.

"Exact" means: tokens drawn the way transformers' `_sample` draws them, from the same random
numbers. Its step is `probs = softmax(logits / T); torch.multinomial(probs, 1)` over the whole
batch on the global RNG, and torch's one-sample multinomial is `argmax(probs / q)` with
`q = empty_like(probs).exponential_(1)` (the exponential form of the Gumbel-max trick,
aten/src/ATen/native/Distributions.cpp). So each step draws `q` for the FULL batch shape
(B, V), as generate does (on a CPU through infra/exponential_noise.py, the same values drawn
faster), and the rows still decoding take their own rows of it: the stream,
and each row's noise, are generate's whatever rows were dropped, and the generator ends where
generate leaves it. The tokens are generate's wherever each row's logits do not depend on
which other rows share its batch (tests/test_decode.py checks fp32 and bf16 autocast). The
kept logits are the ones each token was sampled from, so PPO's log-probs describe the
sampling exactly either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.infra.exponential_noise import exponential_noise
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
    `eos_ids`; the call stops when every row has. Noise from torch's global RNG, as generate.
    compact: drop finished rows from the batch and the cache as they pile up. keep: also
    return the logits and LM-head inputs (zeros where a row had finished).
    """
    from transformers import DynamicCache

    B = prompt_ids.shape[0]
    device = prompt_ids.device
    eos = torch.tensor(list(eos_ids), device=device)
    kv = DynamicCache(config=model.config)  # sliding-window layers too (Gemma 3)
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    extra[cache_keyword(model)] = kv  # by the name this forward takes it: others swallow it
    rows = torch.arange(B, device=device)  # which original rows are in the batch
    attn = prompt_mask
    step_ids, step_pos = prompt_ids, positions_from_mask(prompt_mask)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    # keep: written in place each step; torch.empty, so steps never reached cost no memory.
    kept_logits = kept_hidden = None
    sampled = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)  # per row of the batch
    steps = 0
    # A prompt sampled k times (GRPO, RLOO) is prefilled once: see _forward. Not a batch of
    # one distinct row: one row alone can round differently (see _rows_to_keep).
    shared = distinct_rows(prompt_ids, prompt_mask)
    shared = shared if shared is not None and len(shared[0]) > 1 else None
    with lm_head_inputs(model) if keep else nullcontext() as seen:
        for t in range(max_new_tokens):
            spread = shared if t == 0 else None
            last, rows_out = _forward(model, kv, step_ids, attn, step_pos, extra, spread)
            logits = last.float()  # generate's `.to(copy=True, dtype=float32)`
            nxt = torch.where(unfinished, _draw(logits / temperature, rows, B), pad_id)
            tokens[rows, t] = nxt
            sampled[rows, t] = unfinished
            if keep:
                hidden = seen.pop()[rows_out, -1]
                if kept_logits is None:
                    kept_logits = last.new_empty(B, max_new_tokens, last.shape[-1])
                    kept_hidden = hidden.new_empty(B, max_new_tokens, hidden.shape[-1])
                kept_logits[rows, t] = last
                kept_hidden[rows, t] = hidden
            steps = t + 1
            unfinished &= ~torch.isin(nxt, eos)
            n_left = int(unfinished.sum())
            if n_left == 0:
                break
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
            if compact and rows.shape[0] - n_left >= max(1, COMPACT_FRACTION * rows.shape[0]):
                here = _rows_to_keep(unfinished, attn)
                kv.batch_select_indices(here)
                rows, unfinished, attn = rows[here], unfinished[here], attn[here]
                step_ids, step_pos = step_ids[here], step_pos[here]
    tokens = tokens[:, :steps]
    if not keep:
        return Decoded(tokens, None, None)
    # positions after a row had finished (dropped or not): no sample. Indices, not the bool mask:
    # `x[mask] = 0` runs masked_fill_ over all of x, (B, R, V) logits included (51 ms at batch
    # 64, 48 tokens, 40% unsampled), where index_put_ writes only those rows (10.5 ms).
    not_sampled = (~sampled[:, :steps]).nonzero(as_tuple=True)
    kept_logits, kept_hidden = kept_logits[:, :steps], kept_hidden[:, :steps]
    kept_logits.index_put_(not_sampled, kept_logits.new_zeros(()))
    kept_hidden.index_put_(not_sampled, kept_hidden.new_zeros(()))
    return Decoded(tokens, kept_logits, kept_hidden)


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


def _draw(scaled_logits: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """torch.multinomial(softmax(logits / T) of the full batch, 1), for the rows still here:
    the noise is drawn for all `batch` rows, as generate draws it."""
    probs = torch.softmax(scaled_logits, dim=-1)
    # torch's values, bit for bit; on a CPU in about a third of the time, and past the
    # generator's draws for the dropped rows without their arithmetic
    live = None if rows.shape[0] == batch else rows
    return torch.argmax(
        probs / exponential_noise((batch, probs.shape[-1]), probs.device, live), dim=-1
    )


def _rows_to_keep(unfinished: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The rows still decoding, plus one finished row where needed to keep the batch's kernels.

    transformers drops an all-ones attention mask (no padding left in the batch) and runs
    attention without one, which rounds differently from the masked kernel generate keeps
    using for the same rows; and a batch of one row gave other logits in the last bits
    (SmolLM2, bf16) than the same row among others. So a finished left-padded row stays when
    no decoding row is padded, and a finished row stays when only one decodes."""
    here = unfinished.nonzero().squeeze(1)
    done = (~unfinished).nonzero().squeeze(1)
    padded = ~attn.bool().all(1)
    if bool(padded.any()) and not bool(padded[here].any()):
        extra = done[padded[done]]
    elif here.numel() < 2:
        extra = done
    else:
        return here
    return torch.cat([here, extra[:1]]).sort().values
