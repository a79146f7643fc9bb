"""SFT packing: several short conversations share one row of up to max_length tokens.

The examples in a row stay independent: positions restart at 0 for each one, and a 4D
block-diagonal causal mask (passed as given to eager and SDPA attention) stops attention
across example boundaries, so a packed row computes what the examples compute one by one.
"""

from __future__ import annotations

import torch

from rlhf.tokens.chat import IGNORE_INDEX


def pack_rows(rows: list[dict], max_length: int) -> list[list[dict]]:
    """Greedy first-fit in order (deterministic): each bin holds whole examples, total <= max."""
    bins: list[list[dict]] = []
    sizes: list[int] = []
    for row in rows:
        n = len(row["input_ids"])
        for i, used in enumerate(sizes):
            if used + n <= max_length:
                bins[i].append(row)
                sizes[i] += n
                break
        else:
            bins.append([row])
            sizes.append(n)
    return bins


def collate_packed(bins: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Bins -> input_ids, labels, position_ids (B, T) and a (B, 1, T, T) block-causal mask."""
    width = max(sum(len(r["input_ids"]) for r in b) for b in bins)
    n = len(bins)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # which example owns each column
    for b, rows in enumerate(bins):
        start = 0
        for s, row in enumerate(rows):
            k = len(row["input_ids"])
            ids[b, start : start + k] = torch.tensor(row["input_ids"])
            labels[b, start : start + k] = torch.tensor(row["labels"])
            # An example's first token is never a target (nothing before it in the example);
            # labelled, the previous example's last position would learn to predict it.
            labels[b, start] = IGNORE_INDEX
            positions[b, start : start + k] = torch.arange(k)
            segment[b, start : start + k] = s
            start += k
        positions[b, start:] = torch.arange(width - start)  # padding: any valid position
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    real = (segment >= 0)[:, :, None] & (segment >= 0)[:, None, :]
    # Padding rows attend to themselves only, so no row of the softmax is empty (no NaN).
    keep = (same & real & causal) | torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(n, 1, width, width)
    mask.masked_fill_(~keep[:, None], torch.finfo(torch.float32).min)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
