"""A second, independent reward model for evaluation: the reward stage rerun with the recipe's
`judge:` changes (by default the other half of the rankings and another seed), written to
<output_dir>/judge. PPO never trains against it, so its verdict on the PPO policy is not the
verdict of the model the policy learnt to please."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.data.split import prompt_text
from rlhf.infra.errors import UserError
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


def check_independent(recipe: Any) -> None:
    """Refuse (one line) a judge that trains on prompts the reward model trained on, unless
    the recipe allows it (judge.allow_prompt_overlap)."""
    judge = recipe.judge or JudgeConfig()
    if judge.allow_prompt_overlap:
        return
    ours = {prompt_text(item) for item in reward.load_datasets(judge_recipe(recipe))[0]}
    theirs = {prompt_text(item) for item in reward.load_datasets(recipe)[0]}
    if ours & theirs:
        raise UserError(
            f"judge: trains on {len(ours & theirs)} of the reward model's {len(theirs)} training "
            f"prompts (reward.subset: {recipe.reward.subset}, judge.subset: {judge.subset}), so "
            "it is not an independent judge: give them disjoint halves (first_half, "
            "second_half) or set judge.allow_prompt_overlap: true"
        )


def run(recipe: Any, resume: bool = False) -> Path:
    check_independent(recipe)
    return reward.run(judge_recipe(recipe), resume=resume, folder="judge")
