"""One PPO iteration, end to end, with the score as a pluggable function.

The stage passes a reward-model scorer; tests pass a programmatic reward. Steps follow
Ziegler et al. 2019 and "The N Implementation Details of RLHF with PPO" (Huang et al.):
  1. rollout   sample responses (KV cache), mask everything after the first EOS
  2. score     policy log-probs from the sampling logits; values, reference log-probs (one
               batched forward each over the response positions); the score
  3. shape     r_t = -beta * KL_t, + normalised score at the last response token
  4. GAE       advantages, returns = advantages + values; advantages whitened
               (or a critic-free estimator over each prompt's k samples: rlhf.algo.advantages)
  5. update    ppo_epochs over shuffled minibatches (rlhf.ppo.update)

Rows come grouped: with cfg.samples_per_prompt = k, rows i*k .. i*k+k-1 answer the same prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.algo.advantages import compute_advantages
from rlhf.algo.ppo import explained_variance, masked_mean
from rlhf.infra.distributed import gathered_for_generation, writable
from rlhf.infra.training import NonFiniteGuard
from rlhf.ppo.rollout import Rollout, sample_rollout, score_with_models
from rlhf.ppo.update import ppo_update
from rlhf.roles.actor_critic import eval_mode
from rlhf.roles.reward_sources import calibrate


def normalise_score(
    raw: torch.Tensor, ended_with_eos: torch.Tensor, cfg: Any, calibration: dict | None
) -> torch.Tensor:
    """Reward-model score -> the score PPO optimises: calibrated, clipped, EOS-penalised."""
    score = calibrate(raw, calibration)
    if cfg.score_clip:
        score = score.clamp(-cfg.score_clip, cfg.score_clip)
    return missing_eos_penalised(score, ended_with_eos, cfg.missing_eos_penalty)


def missing_eos_penalised(
    score: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Answers cut off at max_new_tokens (scored without an end-of-turn) lose `penalty`."""
    if penalty is None:
        return score
    return score - penalty * (~ended_with_eos.bool()).float()


@dataclass
class PPOContext:
    """What every iteration works with. `reference` None: the policy with its LoRA adapter
    off; `cfg`: the recipe's ppo section; `calibration`: normalise_score's."""

    model: torch.nn.Module
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    tokenizer: Any
    kl_ctl: Any
    cfg: Any
    calibration: dict | None = None
    guard: NonFiniteGuard | None = None


def ppo_iteration(
    ctx: PPOContext,
    prompts: dict[str, torch.Tensor],
    score_fn: Callable[[Rollout], torch.Tensor],
    generator: torch.Generator,
    value_only: bool = False,
    init_value_head: bool = False,
) -> tuple[Rollout, dict[str, float]]:
    """One iteration on `prompts` (left-padded input_ids and attention_mask on the device);
    returns the rollout (with .scores and .seq_kl) and this rank's metrics (not reduced).
    `generator` shuffles the minibatches; value_only: critic warm-up; init_value_head: see
    advantages_and_returns."""
    model, accelerator, cfg = ctx.model, ctx.accelerator, ctx.cfg
    unwrapped = accelerator.unwrap_model(model)
    times = [time.time()]

    # 1. rollout (ZeRO-3 / FSDP: parameters gathered, every rank in step; rlhf/infra/distributed.py)
    with eval_mode(model), gathered_for_generation(accelerator, model), accelerator.autocast():
        roll = sample_rollout(
            unwrapped.policy,
            prompts["input_ids"],
            prompts["attention_mask"],
            cfg,
            ctx.tokenizer,
            keep_sampling_outputs=True,
        )
    times.append(time.time())

    # 2. score
    with eval_mode(model), gathered_for_generation(accelerator, model):
        score_with_models(roll, unwrapped, ctx.reference, cfg.temperature, accelerator.autocast)
    roll.scores = score_fn(roll).float()
    score = normalise_score(roll.scores, roll.ended_with_eos, cfg, ctx.calibration)
    times.append(time.time())

    # 3. shaping and 4. advantages
    advantages, returns, kl = advantages_and_returns(ctx, roll, score, init_value_head)
    roll.seq_kl = (kl * roll.mask).sum(1)

    # 5. update
    stats = ppo_update(
        model,
        ctx.optimizer,
        accelerator,
        roll,
        advantages,
        returns,
        cfg,
        generator,
        ctx.scheduler,
        ctx.guard,
        kl_coef=ctx.kl_ctl.value,
        value_only=value_only,
    )
    times.append(time.time())
    return roll, {**iteration_metrics(ctx, roll, score, returns, times), **stats}


def advantages_and_returns(
    ctx: PPOContext, roll: Rollout, score: torch.Tensor, init_value_head: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(advantages, returns or None without a critic, per-token KL) of the rollout. With
    `init_value_head` the shared value head's bias first becomes the batch's mean return
    (ActorCritic.init_value_bias), the same on all ranks."""
    accelerator, cfg = ctx.accelerator, ctx.cfg
    unwrapped = accelerator.unwrap_model(ctx.model)

    def estimate() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return compute_advantages(
            cfg, score, roll.logprobs, roll.ref_logprobs, roll.values, roll.mask, ctx.kl_ctl.value
        )

    advantages, returns, kl = estimate()
    if init_value_head and returns is not None and unwrapped.value_head is not None:
        mean_return = accelerator.reduce(masked_mean(returns, roll.mask), "mean")
        with writable(accelerator, list(unwrapped.value_head.parameters())):
            unwrapped.init_value_bias(mean_return.item())
        # V = bias (the head's weights are still 0); not read back: sharded, it is a shard.
        roll.values = torch.full_like(roll.values, mean_return.item()) * roll.mask
        advantages, returns, kl = estimate()
    return advantages, returns, kl


def iteration_metrics(
    ctx: PPOContext,
    roll: Rollout,
    score: torch.Tensor,
    returns: torch.Tensor | None,
    times: list[float],
) -> dict[str, float]:
    """This rank's metrics of one iteration; `times`: its start and the ends of rollout,
    scoring and update."""
    t0, t_rollout, t_score, t_update = times
    kl_coef = ctx.kl_ctl.value
    non_score = -kl_coef * roll.seq_kl  # the KL part of each sequence's return
    lengths = roll.mask.sum(1)
    scheduler = ctx.scheduler
    metrics = {
        "objective/score": roll.scores.mean().item(),
        "objective/nonfinite_scores": float((~torch.isfinite(roll.scores)).sum()),
        "objective/score_std": roll.scores.std().item() if len(roll.scores) > 1 else 0.0,
        "objective/score_normalized": score.mean().item(),
        "objective/kl": roll.seq_kl.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (score + non_score).mean().item(),
        "objective/entropy": (roll.entropy * roll.mask).sum(1).mean().item(),
        "objective/entropy_per_token": masked_mean(roll.entropy, roll.mask).item(),
        "response/length_mean": lengths.mean().item(),
        "response/eos_rate": roll.ended_with_eos.float().mean().item(),
        "response/truncation_rate": (~roll.ended_with_eos).float().mean().item(),
        "kl_coef": float(kl_coef),
        "lr": scheduler.get_last_lr()[0] if scheduler is not None else ctx.cfg.optim.lr,
        "timing/rollout": t_rollout - t0,
        "timing/score": t_score - t_rollout,
        "timing/update": t_update - t_score,
        "timing/iteration": t_update - t0,
        "tokens_per_second": lengths.sum().item() / max(t_update - t0, 1e-9),
    }
    if returns is not None:  # only an estimator with a critic has a value function to judge
        metrics["value/explained_variance"] = explained_variance(
            roll.values, returns, roll.mask
        ).item()
    return metrics
