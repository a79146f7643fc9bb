"""The PPO update: epochs over shuffled minibatches of one rollout batch (Schulman et al. 2017).

loss = policy_loss + vf_coef * value_loss - entropy_coef * entropy, per micro-batch, with
gradient accumulation over `grad_accum` micro-batches per optimizer step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from rlhf.ppo.core import entropy_from_logits, masked_mean, policy_loss, value_loss
from rlhf.ppo.rollout import Rollout, logprobs_from_logits, response_keep
from rlhf.training import NonFiniteGuard, step_if_finite


def ppo_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Any,
    rollout: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cfg: Any,
    generator: torch.Generator,
    scheduler: Any = None,
    guard: NonFiniteGuard | None = None,
) -> dict[str, float]:
    """Runs cfg.ppo_epochs passes; returns the mean of each statistic over all micro-batches."""
    guard = guard or NonFiniteGuard()
    skipped_before = guard.skipped
    stats: dict[str, list[float]] = defaultdict(list)
    batch = rollout.mask.shape[0]
    micro = cfg.mini_batch_size // cfg.grad_accum
    R = rollout.response_ids.shape[1]
    model.train()
    epochs_run = minibatches_run = 0
    for _ in range(cfg.ppo_epochs):
        epochs_run += 1
        order = torch.randperm(batch, generator=generator)
        stop_early = False
        for start in range(0, batch, cfg.mini_batch_size):
            mini = order[start : start + cfg.mini_batch_size]
            minibatch_kl = []
            minibatches_run += 1
            for m_start in range(0, len(mini), micro):
                idx = mini[m_start : m_start + micro].to(rollout.mask.device)
                mb = rollout.select(idx)
                with accelerator.accumulate(model), accelerator.autocast():
                    logits, values = model(mb.input_ids, mb.attention_mask, keep=response_keep(R))
                    logits, values = logits[:, :R], values[:, :R]
                    logp = logprobs_from_logits(logits, mb.response_ids, cfg.temperature)
                    pg_loss, pg_stats = policy_loss(
                        logp, mb.logprobs, advantages[idx], mb.mask, cfg.cliprange
                    )
                    vf_loss, vf_stats = value_loss(
                        values, mb.values, returns[idx], mb.mask, cfg.cliprange_value
                    )
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if cfg.entropy_coef > 0:
                        entropy = masked_mean(
                            entropy_from_logits(logits.float() / cfg.temperature), mb.mask
                        )
                        loss = loss - cfg.entropy_coef * entropy
                    # A non-finite loss (or reward) still goes through backward on every rank;
                    # the synced gradient norm then decides, identically everywhere, to skip.
                    accelerator.backward(loss)
                    norm = step_if_finite(
                        accelerator, model, optimizer, cfg.optim.max_grad_norm, guard
                    )
                    if norm is not None:
                        stats["policy/grad_norm"].append(norm)
                if scheduler is not None and accelerator.sync_gradients:
                    scheduler.step()
                stats["policy/loss"].append(pg_loss.item())
                stats["value/loss"].append(vf_loss.item())
                stats["loss/total"].append(loss.item())
                stats["policy/clipfrac"].append(pg_stats["clipfrac"].item())
                stats["policy/approxkl"].append(pg_stats["approxkl"].item())
                stats["value/clipfrac"].append(vf_stats["clipfrac"].item())
                minibatch_kl.append(pg_stats["approxkl"].item())
            # Early stop as soon as one minibatch's update moved the policy too far from the
            # one that sampled the batch (N implementation details; TRL's PPO): checked per
            # minibatch, mean over ranks so that every rank stops at the same point.
            if cfg.target_kl_early_stop:
                kl = torch.tensor(sum(minibatch_kl) / len(minibatch_kl), device=accelerator.device)
                if accelerator.reduce(kl, "mean").item() > cfg.target_kl_early_stop:
                    stop_early = True
                    break
        if stop_early:
            break
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["policy/epochs_run"] = float(epochs_run)
    out["policy/minibatches_run"] = float(minibatches_run)
    out["skipped_steps"] = float(guard.skipped - skipped_before)
    return out
