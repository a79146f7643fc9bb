"""Reward models as scorers of (prompt, response) for the PPO stage's training sources and for
the evaluation's judges: one frozen copy per model, shared by both."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf.infra import distributed
from rlhf.infra.runtime import frozen_weight_dtype
from rlhf.ppo.rollout import reward_scores
from rlhf.roles import models
from rlhf.roles.actor_critic import disable_dropout

Scorer = Callable[..., torch.Tensor]  # (prompts, texts, finished) -> (B,) scores


def reward_model_scorer(
    model_dir: Path, accelerator: Any, max_length: int, attn_implementation: str | None = None
) -> Scorer:
    """A frozen reward model on this rank's device, scoring (prompt, response) as it was
    trained (max_length: reward.max_length)."""
    device = accelerator.device
    with distributed.unsharded_init(accelerator):
        rm = models.load_reward_model(str(model_dir), attn_implementation=attn_implementation)
        rm = rm.to(device).eval()
    rm.requires_grad_(False)
    disable_dropout(rm)
    frozen_dtype = frozen_weight_dtype(
        accelerator.mixed_precision, distributed.sharding(accelerator)
    )
    if frozen_dtype:  # bf16 runs: stored as autocast would round them (rlhf/roles/models.py)
        models.store_frozen_linears(rm, frozen_dtype)
    rm_tokenizer = models.load_tokenizer(str(model_dir))

    def scorer(batch_prompts: list, texts: list[str], finished: Any = None) -> torch.Tensor:
        autocast = accelerator.autocast
        return reward_scores(
            rm, rm_tokenizer, batch_prompts, texts, max_length, device, autocast, finished
        )

    return scorer


class SharedScorers:
    """`load_scorer` that loads each reward model once and remembers its recent scores.

    The PPO evaluation scores its samples with the training sources, and then with each judge;
    a judge that names a reward model the sources already use (the default recipe's
    `reward_model` judge, the trained reward model alone) would load a second copy and score
    the same batches again. Scores are remembered per whole batch (the same prompts, texts and
    finished flags in the same order): a reward model pads a batch to its longest text, so only
    the same batch is the same computation. The last `keep` batches per model are kept."""

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
