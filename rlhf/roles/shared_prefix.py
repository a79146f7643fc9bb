"""Rows that start with the same tokens run those tokens once (k samples of a prompt in GRPO
and RLOO, a prompt's ranked responses in DPO and reward-model training).

Causal attention makes a prefix's keys and values independent of what follows, so one forward
over the distinct prefixes, its KV cache indexed out to the rows, and one forward over the
rest of each row give the flat forward's hidden states (to float rounding); gradients flow
through the cache into the prefix forward.
"""

from __future__ import annotations

import torch

from rlhf.roles.models import cache_keyword, padded_forward
from rlhf.tokens.chat import positions_from_mask


def distinct_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, L) rows -> (first, row_prefix): the index of each distinct row's first occurrence,
    (U,) in order of appearance, and which of them each row is, (B,), so that
    `input_ids[first][row_prefix] == input_ids`; None when every row is distinct."""
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    if n == rows.shape[0]:
        return None
    # torch.unique numbers rows in sorted order; renumber them by first appearance
    position = torch.arange(rows.shape[0], device=rows.device)
    first_seen = torch.full((n,), rows.shape[0], device=rows.device, dtype=torch.long)
    first_seen = first_seen.scatter_reduce(0, inverse, position, reduce="amin")
    order = torch.argsort(first_seen)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=rows.device)
    return first_seen[order], rank[inverse]


def prefix_shared_hidden(
    model: torch.nn.Module,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    row_prefix: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's last hidden states of the P prefixes, (P, Lp, H), and of the R rows
    that continue them, (R, T, H): row i is prefix[row_prefix[i]] followed by input_ids[i].
    model: a transformers task model (causal LM, sequence classifier). Prefixes left padded,
    the continuations right padded."""
    backbone = getattr(model, model.base_model_prefix)
    name = cache_keyword(backbone)  # the output field has the argument's name
    out = padded_forward(backbone, prefix_ids, prefix_mask, use_cache=True)
    cache = getattr(out, name)
    cache.batch_select_indices(row_prefix)
    full_mask = torch.cat([prefix_mask[row_prefix], attention_mask], dim=1)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=positions_from_mask(full_mask)[:, prefix_ids.shape[1] :],
        use_cache=True,
        **{name: cache},
    ).last_hidden_state
    return out.last_hidden_state, hidden
