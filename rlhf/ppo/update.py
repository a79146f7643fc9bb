"""The PPO update: epochs over shuffled minibatches of one rollout batch (Schulman et al. 2017).

loss = policy_loss + vf_coef * value_loss - entropy_coef * entropy [+ kl_coef * k3 KL when
kl_in is loss], accumulated over `grad_accum` micro-batches per optimizer step. Each term is a
mean over the whole mini-batch on every rank: a token mean (DAPO, Yu et al. 2025) or, with
loss_aggregation sequence, a mean over its answers. Without a critic there is no value loss.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.accel import apply
from rlhf.algo.ppo import (
    aggregate_loss,
    aggregation_count,
    kl_penalty,
    policy_loss,
    value_loss,
)
from rlhf.infra.training import NonFiniteGuard, averaging_undone, step_if_finite
from rlhf.ppo.rollout import Rollout
from rlhf.tokens.sequences import entropy_from_logits, logprobs_from_logits, response_keep


@dataclass
class Learner:
    """What every optimizer step of the update works with (ppo_update's arguments)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Any
    cfg: Any
    scheduler: Any
    guard: NonFiniteGuard
    kl_coef: float
    value_only: bool


def ppo_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Any,
    rollout: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor | None,
    cfg: Any,
    generator: torch.Generator,
    scheduler: Any = None,
    guard: NonFiniteGuard | None = None,
    kl_coef: float = 0.0,
    value_only: bool = False,
) -> dict[str, float]:
    """Runs cfg.ppo_epochs passes; returns the mean of each statistic over all micro-batches.
    `returns` None: no critic, no value loss. `kl_coef` weighs the k3 loss term (kl_in: loss).
    value_only: the critic's warm-up, only the critic trains."""
    guard = guard or NonFiniteGuard()
    learner = Learner(model, optimizer, accelerator, cfg, scheduler, guard, kl_coef, value_only)
    skipped_before = guard.skipped
    stats: dict[str, list[float]] = defaultdict(list)
    batch = rollout.mask.shape[0]
    minibatches = shuffled_minibatches(batch, cfg.mini_batch_size, cfg.ppo_epochs, generator)
    model.train()
    epochs_run = minibatches_run = 0
    with apply.training(model):
        for epoch, mini in minibatches:
            epochs_run, minibatches_run = epoch + 1, minibatches_run + 1
            approxkl = train_minibatch(learner, rollout, advantages, returns, mini, stats)
            if cfg.target_kl_early_stop and moved_too_far(accelerator, approxkl, cfg):
                break
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["policy/epochs_run"] = float(epochs_run)
    out["policy/minibatches_run"] = float(minibatches_run)
    out["skipped_steps"] = float(guard.skipped - skipped_before)
    return out


def shuffled_minibatches(
    batch: int, size: int, epochs: int, generator: torch.Generator
) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, row indices) of every mini-batch: each epoch a fresh permutation of the batch,
    cut into mini-batches of `size` rows."""
    for epoch in range(epochs):
        order = torch.randperm(batch, generator=generator)
        for start in range(0, batch, size):
            yield epoch, order[start : start + size]


def moved_too_far(accelerator: Any, approxkl: float, cfg: Any) -> bool:
    """Early stop once a mini-batch's approximate KL (mean over ranks, so every rank stops
    together) exceeds cfg.target_kl_early_stop (N implementation details; TRL's PPO)."""
    kl = torch.tensor(approxkl, device=accelerator.device)
    return accelerator.reduce(kl, "mean").item() > cfg.target_kl_early_stop


def train_minibatch(
    learner: Learner,
    rollout: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor | None,
    mini: torch.Tensor,
    stats: dict[str, list[float]],
) -> float:
    """One optimizer step on the rollout's rows `mini`, accumulated over micro-batches of
    mini_batch_size / grad_accum rows; returns the mean approximate KL of its micro-batches."""
    cfg, device = learner.cfg, rollout.mask.device
    micro = cfg.mini_batch_size // cfg.grad_accum
    counts = minibatch_counts(learner.accelerator, rollout.mask[mini.to(device)])
    approxkl = []
    for start in range(0, len(mini), micro):
        idx = mini[start : start + micro].to(device)
        targets = (rollout.select(idx), advantages[idx], None if returns is None else returns[idx])
        approxkl.append(micro_batch_step(learner, targets, counts, stats))
    return sum(approxkl) / len(approxkl)


def micro_batch_step(
    learner: Learner,
    targets: tuple[Rollout, torch.Tensor, torch.Tensor | None],
    counts: MiniBatchCounts,
    stats: dict[str, list[float]],
) -> float:
    """Loss and backward of one micro-batch (rows, advantages, returns), the optimizer step
    on the mini-batch's last (accelerator.accumulate); returns its approximate KL."""
    model, accelerator, cfg = learner.model, learner.accelerator, learner.cfg
    with accelerator.accumulate(model), accelerator.autocast():
        loss, pg_loss, pg_stats = micro_batch_loss(learner, *targets, stats, counts)
        # A non-finite loss (or reward) still goes through backward on every rank; the synced
        # gradient norm then decides, identically everywhere, to skip.
        accelerator.backward(loss)
        if learner.value_only:
            for p in accelerator.unwrap_model(model).policy.parameters():
                p.grad = None
        norm = step_if_finite(
            accelerator, model, learner.optimizer, cfg.optim.max_grad_norm, learner.guard
        )
        if norm is not None:
            stats["policy/grad_norm"].append(norm)
    if learner.scheduler is not None and accelerator.sync_gradients:
        learner.scheduler.step()
    stats["policy/loss"].append(pg_loss.item())
    stats["loss/total"].append(loss.item())
    stats["policy/clipfrac"].append(pg_stats["clipfrac"].item())
    approxkl = pg_stats["approxkl"].item()
    stats["policy/approxkl"].append(approxkl)
    return approxkl


def micro_batch_loss(
    learner: Learner,
    mb: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor | None,
    stats: dict[str, list[float]],
    counts: MiniBatchCounts,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, policy loss, policy statistics) of one micro-batch; value and KL-loss
    statistics go to `stats`. Each loss is this micro-batch's share of the mini-batch mean
    (`counts`) times counts.undo, so the mean over micro-batches and ranks is that mean."""
    cfg, value_only = learner.cfg, learner.value_only
    R = mb.response_ids.shape[1]
    logits, values = learner.model(
        mb.input_ids, mb.attention_mask, keep=response_keep(R), detach_values=value_only
    )
    logits = logits[:, :R]
    logp = logprobs_from_logits(logits, mb.response_ids, cfg.temperature)
    how, undo = cfg.loss_aggregation, counts.undo
    pg_loss, pg_stats = policy_loss(
        logp, mb.logprobs, advantages, mb.mask, cfg.cliprange, how, counts.of(how)
    )
    pg_loss = pg_loss * undo
    loss = pg_loss
    if cfg.kl_in == "loss":
        # GRPO (Shao et al. 2024, eq. 4): k3 = r - log r - 1, r = pi_ref / pi.
        kl = kl_penalty(logp, mb.ref_logprobs, "k3")
        kl_loss = aggregate_loss(kl, mb.mask, how, counts.of(how)) * undo
        loss = loss + learner.kl_coef * kl_loss
        stats["policy/kl_loss"].append(kl_loss.item())
    if returns is not None:
        vf_loss, vf_stats = value_loss(
            values[:, :R], mb.values, returns, mb.mask, cfg.cliprange_value, counts.tokens
        )
        vf_loss = vf_loss * undo
        loss = loss + cfg.vf_coef * vf_loss
        stats["value/loss"].append(vf_loss.item())
        stats["value/clipfrac"].append(vf_stats["clipfrac"].item())
    if value_only:
        # 0 * the policy terms keeps every parameter in the graph (DDP); the policy's (zero)
        # gradients are dropped after backward, so it is not stepped.
        loss = vf_loss + 0.0 * loss
    if cfg.entropy_coef > 0 and not value_only:
        entropy = entropy_from_logits(logits, cfg.temperature)
        entropy = aggregate_loss(entropy, mb.mask, "token", counts.tokens) * undo
        loss = loss - cfg.entropy_coef * entropy
    return loss, pg_loss, pg_stats


@dataclass(frozen=True)
class MiniBatchCounts:
    """A mini-batch's response tokens and answers over its micro-batches and all ranks (what
    its losses are means over), and averaging_undone (rlhf.infra.training)."""

    tokens: torch.Tensor
    answers: torch.Tensor
    undo: int

    def of(self, how: str) -> torch.Tensor:
        """The count a loss aggregated `how` (token, sequence) divides by."""
        return self.answers if how == "sequence" else self.tokens


def minibatch_counts(accelerator: Any, mask: torch.Tensor) -> MiniBatchCounts:
    """MiniBatchCounts of the mini-batch whose rows on this rank have response `mask` (a
    collective)."""
    local = torch.stack([aggregation_count(mask, "token"), aggregation_count(mask, "sequence")])
    tokens, answers = accelerator.reduce(local.float(), "sum")
    return MiniBatchCounts(tokens, answers, averaging_undone(accelerator))
