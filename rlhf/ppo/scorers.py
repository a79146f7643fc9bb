"""Reward models as scorers of (prompt, response) for the PPO stage's training sources and for
the evaluation's judges: one frozen copy per model, shared by both."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhf.ppo.roles import frozen_copy
from rlhf.ppo.rollout import reward_scores
from rlhf.roles import models

Scorer = Callable[..., torch.Tensor]  # (prompts, texts, finished) -> (B,) scores


def reward_model_scorer(
    model_dir: Path, accelerator: Any, max_length: int, attn_implementation: str | None = None
) -> Scorer:
    """A frozen reward model on this rank's device, scoring (prompt, response) as it was
    trained (max_length: reward.max_length)."""
    load = partial(
        models.load_reward_model, str(model_dir), attn_implementation=attn_implementation
    )
    rm, rm_tokenizer = frozen_copy(load, accelerator), models.load_tokenizer(str(model_dir))

    def scorer(prompts: list, texts: list[str], finished: Any = None) -> torch.Tensor:
        device, autocast = accelerator.device, accelerator.autocast
        return reward_scores(
            rm, rm_tokenizer, prompts, texts, max_length, device, autocast, finished
        )

    return scorer


class SharedScorers:
    """`load_scorer` that loads each reward model once and remembers the scores of its last
    `keep` batches, so a judge that names a model the training sources use (the default
    recipe's `reward_model` judge) neither loads it twice nor scores the same batch again.
    Whole batches only: a reward model pads a batch to its longest text."""

    def __init__(self, load: Callable[[Path], Scorer], keep: int = 256):
        self.load, self.keep = load, keep
        self.loaded: dict[Path, Scorer] = {}

    def __call__(self, model_dir: Path) -> Scorer:
        key = Path(model_dir).resolve()
        if key not in self.loaded:
            self.loaded[key] = self._remembering(self.load(model_dir))
        return self.loaded[key]

    def _remembering(self, scorer: Scorer) -> Scorer:
        seen: OrderedDict[str, torch.Tensor] = OrderedDict()

        def remembered(prompts: list, texts: list[str], finished: Any = None) -> torch.Tensor:
            flags = None if finished is None else [bool(f) for f in finished]
            key = json.dumps([prompts, texts, flags], sort_keys=True, default=str)
            if key in seen:
                seen.move_to_end(key)
                return seen[key].clone()
            scores = scorer(prompts, texts, finished)
            seen[key] = scores.detach().clone()
            if len(seen) > self.keep:
                seen.popitem(last=False)
            return scores

        return remembered
