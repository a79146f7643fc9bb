"""The reward-model score's calibration: applied once, measured on SFT samples for every
reward-model source, and every member of an ensemble calibrated before the combination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.infra.errors import UserError
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
    calibration = score_calibration(None, None, None, sources, None, None, recipe, None)
    total, _ = sources([[]] * 3, ["a", "b", "c"], [{}] * 3)
    score = normalise_score(total, torch.ones(3, dtype=torch.bool), recipe.ppo, calibration)
    assert score.tolist() == [0.0, 1.0, 2.0]


class _LengthScorer:
    """A 'reward model' scoring each text by its length, keeping every score it gave."""

    def __init__(self):
        self.given: list[float] = []

    def __call__(self, prompts, texts, finished):
        scores = [float(len(t)) for t in texts]
        self.given += scores
        return torch.tensor(scores)


def test_ppo_rewards_model_entries_are_calibrated_on_sft_samples(tmp_path, tiny_model_dir):
    """With `ppo.rewards` (as the default recipe), calibration_prompts 4: the SFT policy
    answers 4 prompts, and the reward model's term is (raw - mean) / std of its raw scores on
    those answers (sample std), not the stored mean 2, std 4. Functions are not calibrated."""
    from rlhf.infra.runtime import make_accelerator
    from rlhf.ppo.prompts import Prompts
    from rlhf.roles import models
    from rlhf.roles.actor_critic import ActorCritic
    from rlhf.tokens.chat import encode_prompt

    run = _reward_run(tmp_path, "reward", mean=2.0, std=4.0)
    recipe = load_recipe(
        "recipes/tiny.yaml",
        [
            f"ppo.rewards=[{{model: {run}}}, {{function: length, args: {{max: 3}}, weight: 0.5}}]",
            "ppo.calibration_prompts=4",
            "ppo.max_new_tokens=6",
            "seed=0",
        ],
    )
    scorer = _LengthScorer()
    sources = reward_sources.build(recipe, lambda model_dir: scorer)
    assert not sources.passthrough
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    policy = models.load_causal_lm(tiny_model_dir)
    reference = models.load_causal_lm(tiny_model_dir).eval()
    texts = [f"Question {i}?" for i in range(6)]
    messages = [[{"role": "user", "content": t}] for t in texts]
    prompts = Prompts(messages, [{}] * 6, [encode_prompt(tok, m, 64) for m in messages])
    accelerator = make_accelerator(recipe)
    got = score_calibration(
        None, ActorCritic(policy), reference, sources, tok, prompts, recipe, accelerator
    )
    assert got is None  # the sources apply it, not normalise_score
    sampled = torch.tensor(scorer.given, dtype=torch.float64)
    assert len(sampled) == 4 and sampled.std() > 0  # the SFT answers differ in length
    mean, std = sampled.mean().item(), sampled.std().item()

    # raw 9 and 2 (characters); the length function: 5 words, 2 over max 3 -> -2; 1 word -> 0
    total, _ = sources([[]] * 2, ["a b c d e", "ab"], [{}] * 2)
    expected = [(9 - mean) / std + 0.5 * -2.0, (2 - mean) / std]
    assert total.tolist() == pytest.approx(expected, rel=1e-6)


def _ensemble_recipe(tmp_path: Path, normalize: str, combine: str = "min"):
    a = _reward_run(tmp_path, "a", mean=2.0, std=4.0)
    b = _reward_run(tmp_path, "b", mean=100.0, std=10.0)
    entry = f"{{model: [{a}, {b}], combine: {combine}, normalize: {normalize}}}"
    return load_recipe("recipes/tiny.yaml", [f"ppo.rewards=[{entry}]"])


def test_an_ensemble_calibrates_each_member_before_combining(tmp_path):
    """Raw a = [2, 6, 10] (stored mean 2, std 4 -> [0, 1, 2]); raw b = [110, 100, 90] (mean
    100, std 10 -> [1, 0, -1]). The min of the calibrated scores is [0, 0, -1] and the mean
    [0.5, 0.5, 0.5]; a min of the raw scores would be a's [2, 6, 10] whatever b says.
    normalize: running then normalises the combination by its own running mean / std."""
    scores = {"a": [2.0, 6.0, 10.0], "b": [110.0, 100.0, 90.0]}
    for combine, expected in [("min", [0.0, 0.0, -1.0]), ("mean", [0.5, 0.5, 0.5])]:
        recipe = _ensemble_recipe(tmp_path / combine, "calibration", combine)
        sources = reward_sources.build(recipe, lambda d: _scorer(scores[d.parent.name]))
        total, _ = sources([[]] * 3, ["x", "y", "z"], [{}] * 3)
        assert total.tolist() == expected
    recipe = _ensemble_recipe(tmp_path / "running", "running")
    sources = reward_sources.build(recipe, lambda d: _scorer(scores[d.parent.name]))
    total, _ = sources([[]] * 3, ["x", "y", "z"], [{}] * 3)
    # [0, 0, -1]: running mean -1/3, sample std sqrt(1/3) -> [1, 1, -2] * sqrt(1/3)
    root = (1 / 3) ** 0.5
    assert total.tolist() == pytest.approx([root, root, -2 * root], rel=1e-6)


def test_an_ensemble_without_normalisation_is_refused_in_one_line(tmp_path):
    recipe = _ensemble_recipe(tmp_path, "none")
    with pytest.raises(
        UserError, match=r"ppo.rewards \(models\): .*normalize: calibration or running"
    ) as err:
        reward_sources.build(recipe, lambda d: _scorer(RAW))
    assert "\n" not in str(err.value)


def test_a_resumed_run_reads_its_calibrations_from_the_checkpoint(tmp_path):
    """Never re-measured: the checkpoint's per-model calibrations; an older checkpoint's
    single-model `calibration`."""
    run = _reward_run(tmp_path, "reward", mean=2.0, std=4.0)
    recipe = load_recipe("recipes/tiny.yaml", [f"ppo.reward_dir={run}"])
    saved = {"mean": 1.0, "std": 3.0, "n": 4, "source": "sft_samples"}
    for state in [{"reward_calibrations": {"reward": saved}}, {"calibration": saved}]:
        sources = reward_sources.build(recipe, lambda d: _scorer(RAW))
        assert score_calibration(state, None, None, sources, None, None, recipe, None) == saved
        assert sources.calibrations == {"reward": saved}
