"""A second, independent reward model for evaluation: the reward stage rerun with the recipe's
`judge:` changes (by default the other half of the rankings and another seed), written to
<output_dir>/judge. PPO never trains against it, so its verdict on the PPO policy is not the
verdict of the model the policy learnt to please."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.recipe import JudgeConfig
from rlhf.stages import reward


def judge_recipe(recipe: Any) -> Any:
    """The recipe the judge trains with: reward.subset and seed from the `judge:` section."""
    judge = recipe.judge or JudgeConfig()
    out = recipe.model_copy(deep=True)
    out.seed = recipe.seed + judge.seed_offset
    out.reward.subset = judge.subset
    out._source = recipe._source
    return out


def run(recipe: Any, resume: bool = False) -> Path:
    return reward.run(judge_recipe(recipe), resume=resume, folder="judge")
