"""The reward-model score's calibration: applied once, measured on SFT samples for every
reward-model source, and every member of an ensemble calibrated before the combination."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf.ppo.iteration import normalise_score
from rlhf.recipe import load_recipe
from rlhf.roles import reward_sources
from rlhf.stages.ppo import score_calibration

RAW = [2.0, 6.0, 10.0]


def _reward_run(root: Path, name: str, mean: float, std: float) -> Path:
    """A finished reward run folder (COMPLETED, model/) with a stored calibration."""
    run = root / name
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "model" / "reward_calibration.json").write_text(json.dumps({"mean": mean, "std": std}))
    (run / "COMPLETED").write_text("")
    return run


def _scorer(values: list[float]):
    return lambda prompts, texts, finished: torch.tensor(values[: len(texts)])


def test_the_stored_calibration_is_applied_once_in_the_single_model_form(tmp_path):
    """calibration_prompts 0: the reward model's stored mean 2, std 4. Raw [2, 6, 10] is
    optimised as (raw - 2) / 4 = [0, 1, 2], not calibrated a second time."""
    run = _reward_run(tmp_path, "reward", mean=2.0, std=4.0)
    recipe = load_recipe(
        "recipes/tiny.yaml",
        [f"ppo.reward_dir={run}", "ppo.calibration_prompts=0", "ppo.score_clip=null"],
    )
    sources = reward_sources.build(recipe, lambda model_dir: _scorer(RAW))
    assert sources.passthrough
    stored = sources.calibration
    calibration = score_calibration(None, stored, None, None, sources, None, None, recipe, None)
    total, _ = sources([[]] * 3, ["a", "b", "c"], [{}] * 3)
    score = normalise_score(total, torch.ones(3, dtype=torch.bool), recipe.ppo, calibration)
    assert score.tolist() == [0.0, 1.0, 2.0]
