"""PPO for RLHF: the loop's parts (`prompts`, `roles`, `rollout`, `update`, `iteration`,
`calibration`, `scorers`), and the public math API, written in `rlhf.algo.ppo` as pure tensor
functions (the per-token entropy in `rlhf.tokens.sequences`) and importable from here:
`from rlhf.ppo import gae, policy_loss, ...`."""

from rlhf.algo.ppo import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
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
from rlhf.tokens.sequences import entropy_from_logits

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
