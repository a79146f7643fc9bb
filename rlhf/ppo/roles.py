"""The models PPO trains and holds still, built the way the recipe's ppo section asks: the
policy (full or LoRA), the reference (None with LoRA: the policy with its adapter disabled;
else a frozen copy on each rank's device, never prepared) and the value function (see
ActorCritic). In a bf16 / fp16 run the frozen matmul weights are stored in the autocast dtype.
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
    reference = None
    if cfg.lora.enabled:
        policy = models.apply_lora(policy, cfg.lora)  # reference = adapter disabled, no copy
        frozen_dtype = frozen_weight_dtype(
            accelerator.mixed_precision, distributed.sharding(accelerator)
        )
        # Not under FSDP / ZeRO-3: they flatten a layer's weights into one dtype per shard.
        if frozen_dtype and not distributed.is_sharded(accelerator):
            models.store_frozen_linears(policy, frozen_dtype)
    else:
        reference = frozen_copy(load_policy, accelerator)
    return ActorCritic(policy, critic, with_values=with_values), reference


def frozen_copy(load: Callable[[], torch.nn.Module], accelerator: Any) -> torch.nn.Module:
    """`load()` frozen on this rank's device, never sharded (even next to a ZeRO-3 / FSDP
    policy: rlhf/infra/distributed.py), without dropout, its matmul weights stored in the
    autocast dtype of a bf16 / fp16 run."""
    with distributed.unsharded_init(accelerator):
        model = load().to(accelerator.device).eval()
    model.requires_grad_(False)
    disable_dropout(model)
    frozen_dtype = frozen_weight_dtype(
        accelerator.mixed_precision, distributed.sharding(accelerator)
    )
    if frozen_dtype:
        models.store_frozen_linears(model, frozen_dtype)
    return model
