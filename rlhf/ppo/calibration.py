"""The score's calibration on what the SFT policy writes, measured before iteration 1 (the
reward stage's, on human-written responses, leaves the SFT policy's score off centre).

The reference (SFT) policy answers the first `calibration_prompts` of a seeded shuffle of the
training prompts, sampled as the rollouts are (Ziegler et al. 2019 normalise the reward on
samples of the initial policy), and every calibrated reward model gets its own mean / std.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf.infra import distributed
from rlhf.ppo.prompts import Prompts
from rlhf.ppo.rollout import generate_reference
from rlhf.roles.actor_critic import ActorCritic, eval_mode


@torch.no_grad()
def sft_calibration(
    model: ActorCritic,
    reference: torch.nn.Module | None,
    sources: Any,
    tokenizer: Any,
    prompts: Prompts,
    recipe: Any,
    accelerator: Any,
) -> dict[str, dict[str, Any]]:
    """{member label: {"mean", "std", "n", "source"}} of each calibrated reward model's raw
    score (`sources.member_scores`) on SFT samples. Every rank gets the same result; a resumed
    run reads it from its checkpoint."""
    cfg = recipe.ppo
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(recipe.seed))
    pool = order[: cfg.calibration_prompts].tolist()
    mine = [pool[i] for i in distributed.rank_indices(len(pool), accelerator)]
    device = accelerator.device
    labels = list(sources.calibrations)
    torch.manual_seed(recipe.seed + 4242 + accelerator.process_index)
    scores = []
    for start in range(0, len(mine), cfg.batch_size):
        group = prompts.select(mine[start : start + cfg.batch_size])
        batch = group.padded(tokenizer.pad_token_id, device)
        with eval_mode(model), accelerator.autocast():
            roll = generate_reference(
                model, reference, batch["input_ids"], batch["attention_mask"], cfg, tokenizer
            )
        raw = sources.member_scores(group.messages, roll.texts, finished=roll.ended_with_eos)
        scores.append(torch.stack([raw[label] for label in labels], dim=1).to(device))
    local = torch.cat(scores) if scores else torch.zeros(0, len(labels), device=device)
    every = distributed.gather_evaluated(accelerator, local, len(pool)).double().cpu()
    return {label: _moments(every[:, j]) for j, label in enumerate(labels)}


def _moments(scores: torch.Tensor) -> dict[str, Any]:
    std = scores.std().item() if len(scores) > 1 else 1.0
    return {
        "mean": scores.mean().item(),
        "std": std if math.isfinite(std) and std > 0 else 1.0,
        "n": len(scores),
        "source": "sft_samples",
    }
