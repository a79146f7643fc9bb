"""The models PPO trains and holds still: the policy, the reference it is kept close to, and the
value function, built the way the recipe's ppo section asks.

  policy     full fine-tuning, or LoRA (then the reference is the same weights with the
             adapter disabled: no copy)
  reference  None with LoRA, else a frozen full copy on each rank's device (never prepared,
             even next to a ZeRO-3 / FSDP policy: rlhf/infra/distributed.py)
  values     a head on the policy's backbone (shared), a separate critic initialised from a
             reward model, or none (the critic-free estimators)

In a bf16 / fp16 run the frozen matmul weights are stored in the autocast dtype: the same
numbers autocast would compute with, without the per-forward cast, in half the memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf.infra import distributed
from rlhf.infra.runtime import frozen_weight_dtype
from rlhf.roles import models
from rlhf.roles.actor_critic import ActorCritic, disable_dropout


def build_roles(
    cfg: Any,
    accelerator: Any,
    load_policy: Callable[[], torch.nn.Module],
    critic_dir: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[ActorCritic, torch.nn.Module | None]:
    """(actor-critic, frozen reference or None). `load_policy()` loads the starting policy
    (called twice without LoRA: the reference is a second copy); `critic_dir` is the reward
    model a separate critic starts from (ppo.value_model: separate)."""
    policy = load_policy()
    critic = None
    with_values = cfg.estimator == "gae"  # the critic-free estimators build no value function
    if with_values and cfg.value_model == "separate":
        critic = models.load_reward_model(critic_dir, attn_implementation=attn_implementation)
    frozen_dtype = frozen_weight_dtype(
        accelerator.mixed_precision, distributed.sharding(accelerator)
    )
    reference = None
    if cfg.lora.enabled:
        policy = models.apply_lora(policy, cfg.lora)  # reference = adapter disabled, no copy
        # Not under FSDP / ZeRO-3: they flatten a layer's weights into one dtype per shard.
        if frozen_dtype and not distributed.is_sharded(accelerator):
            models.store_frozen_linears(policy, frozen_dtype)
    else:
        with distributed.unsharded_init(accelerator):
            reference = load_policy().to(accelerator.device).eval()
        reference.requires_grad_(False)
        disable_dropout(reference)
        if frozen_dtype:
            models.store_frozen_linears(reference, frozen_dtype)
    return ActorCritic(policy, critic, with_values=with_values), reference
