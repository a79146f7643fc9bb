"""The training prompts of a PPO run and which of them each iteration answers.

Deterministic batches: iteration i on rank r always gets the same prompts and the same seeds,
so a resumed run sees exactly what an uninterrupted one would. Ranks take disjoint slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.tokens.chat import encode_prompt, pad_batch


@dataclass
class Prompts:
    """Chat prompts, their rows' other fields (e.g. `answer`) and their token ids."""

    messages: list[list[dict]]
    rows: list[dict]
    ids: list[list[int]]

    @classmethod
    def encode(cls, items: list[Any], tokenizer: Any, max_length: int) -> Prompts:
        messages = [p.messages for p in items]
        ids = [encode_prompt(tokenizer, m, max_length) for m in messages]
        return cls(messages, [p.fields for p in items], ids)

    def __len__(self) -> int:
        return len(self.messages)

    def select(self, idx: list[int]) -> Prompts:
        return Prompts(
            [self.messages[i] for i in idx], [self.rows[i] for i in idx], [self.ids[i] for i in idx]
        )

    def padded(self, pad_id: int, device: Any) -> dict[str, torch.Tensor]:
        """Left-padded input_ids and attention_mask on `device` (generation appends right)."""
        batch = pad_batch(self.ids, pad_id, side="left")
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


class PromptSampler:
    """Prompt indices of iteration i on one rank: a seeded reshuffle every pass over the data."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed

    def indices(self, iteration: int) -> list[int]:
        per_iter = self.batch * self.world
        start = iteration * per_iter + self.rank * self.batch
        out = []
        for pos in range(start, start + self.batch):
            epoch, offset = divmod(pos, self.n)
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
            out.append(int(order[offset]))
        return out


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return seed * 1_000_003 + iteration * 1009 + rank
