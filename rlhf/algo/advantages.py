"""From scores and log-probs to per-token advantages, for every `ppo.estimator`.

gae           the critic's baseline (Schulman et al. 2016), KL per token in the reward.
rloo          REINFORCE leave-one-out (Ahmadian et al. 2024): a sequence-level reward, the
              mean of the prompt's other k-1 samples as baseline, the same advantage on
              every token of the answer.
grpo          group mean as baseline, divided by the group std (Shao et al. 2024, sec. 4.1.2).
reinforce_pp  REINFORCE++ (Hu 2025): per-token KL in the reward, returns-to-go (gamma, no
              critic), advantages normalised over the batch; with k > 1 the group's mean
              score is first subtracted from each score (REINFORCE++-baseline, same paper).

With `kl_in: reward` the rloo and grpo sequence reward is score - beta * sum_t KL_t, the KL
folded into the sequence reward as TRL's RLOOTrainer does; with `kl_in: loss` the reward is
the score alone and the update adds beta * k3 (GRPO, Shao et al. 2024 eq. 3) to the loss.

Shapes as in rlhf.algo.ppo: (B, T) per token, (B,) per sequence, B = n * k with each prompt's
k samples in consecutive rows.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.algo.ppo import (
    gae,
    group_advantages,
    group_std,
    kl_penalty,
    masked_mean,
    masked_whiten,
    rloo_advantages,
    shape_rewards,
)

CRITIC_FREE = ("rloo", "grpo", "reinforce_pp")


def sequence_advantages(rewards: torch.Tensor, estimator: str, k: int) -> torch.Tensor:
    """The baseline-subtracted sequence rewards of rloo / grpo, before any std scaling."""
    if estimator == "rloo":
        return rloo_advantages(rewards, k)
    if estimator == "grpo":
        return group_advantages(rewards, k, scale=False)
    raise ValueError(f"'{estimator}' has no sequence-level advantage")


def normalise_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, how: str, scale: bool
) -> torch.Tensor:
    """Per-token advantages over the batch: batch -> minus the batch mean, over the std when
    `scale` (the whitening of "N implementation details" #7); none -> unchanged."""
    if how == "batch":
        if scale:
            return masked_whiten(advantages, mask)
        return (advantages - masked_mean(advantages, mask)) * mask
    return advantages * mask


def compute_advantages(
    cfg: Any,
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """-> (advantages (B, T), returns (B, T) for the critic or None, per-token KL (B, T))."""
    beta = kl_coef if cfg.kl_in == "reward" else 0.0
    k = cfg.samples_per_prompt
    if cfg.estimator in ("gae", "reinforce_pp"):
        if cfg.estimator == "reinforce_pp" and k > 1:
            score = score - score.view(-1, k).mean(1).repeat_interleave(k)
        rewards, kl = shape_rewards(score, logprobs, ref_logprobs, mask, beta, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        if cfg.estimator == "gae":
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        else:  # returns-to-go: GAE with V = 0 and lambda = 1
            advantages, returns = gae(rewards, torch.zeros_like(rewards), mask, cfg.gamma, 1.0)
            returns = None
        advantages = normalise_advantages(advantages, mask, cfg.advantage_norm, cfg.scale_by_std)
        return advantages, returns, kl
    kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = score - beta * kl.sum(1)
    seq = sequence_advantages(rewards, cfg.estimator, k)
    if cfg.advantage_norm == "group" and cfg.scale_by_std:  # for grpo = group_advantages(scale)
        seq = seq / (group_std(rewards, k) + 1e-6)
    advantages = seq.unsqueeze(1).to(mask.dtype) * mask
    how = "none" if cfg.advantage_norm == "group" else cfg.advantage_norm
    return normalise_advantages(advantages, mask, how, cfg.scale_by_std), None, kl
