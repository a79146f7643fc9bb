"""PPO for RLHF. The public math API lives in `core`: pure tensor functions."""

from rlhf.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    shape_rewards,
    value_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "rloo_advantages",
    "shape_rewards",
    "value_loss",
]
