"""The three stages chained on the tiny model: PPO reads SFT and reward outputs; role variants."""

import json
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rlhf.cli import main


def _write_data(root: Path) -> dict[str, Path]:
    rng = random.Random(0)
    paths = {k: root / f"{k}.jsonl" for k in ("sft", "rank", "prompts")}
    with open(paths["sft"], "w") as f:
        for _ in range(24):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {a} plus {b}?"},
                            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                        ]
                    }
                )
                + "\n"
            )
    with open(paths["rank"], "w") as f:
        for _ in range(16):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            f.write(
                json.dumps(
                    {
                        "prompt": f"What is {a} times {b}?",
                        "responses": [
                            f"It is {a * b}.",
                            "No idea.",
                            f"{a * b}, obviously, idiot.",
                            "Hm.",
                        ],
                        "ranking": [0, 3, 1, 2],
                    }
                )
                + "\n"
            )
    with open(paths["prompts"], "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"Tell me a fact about the number {i}."}) + "\n")
    return paths


def _overrides(root: Path, paths: dict[str, Path]) -> list[str]:
    return [
        f"output_dir={root / 'run'}",
        f"sft.train.path={paths['sft']}",
        "sft.eval=null",
        f"reward.train.path={paths['rank']}",
        "reward.eval=null",
        f"ppo.prompts.path={paths['prompts']}",
        f"ppo.eval_prompts.path={paths['prompts']}",
    ]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    args = _overrides(root, _write_data(root))
    # PPO before SFT exists: one line, exit 2, nothing that looks complete.
    assert main(["ppo", "recipes/tiny.yaml", *args]) == 2
    assert not (root / "run" / "ppo" / "COMPLETED").exists()
    for stage in ("sft", "reward"):
        assert main([stage, "recipes/tiny.yaml", *args]) == 0
    return root, args


@contextmanager
def accelerator_state_for(variant: list[str]):
    """accelerate's state is one per process and fixes its mixed precision; a variant with its
    own precision gets a fresh one, and the tests after it a fresh one again."""
    if not any(v.startswith("precision=") for v in variant):
        yield
        return
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "variant",
    [
        [],  # default: LoRA policy, reference = adapter disabled, shared value head
        ["ppo.value_model=separate"],  # critic initialised from the reward model
        ["ppo.lora.enabled=false", "ppo.kl_estimator=k3"],  # full FT + frozen reference copy
        ["precision=bf16"],  # LoRA base and reward model in bf16, adapter and head fp32
    ],
    ids=["lora-shared", "lora-separate-critic", "full-ft-frozen-ref", "lora-bf16-frozen"],
)
def test_ppo_role_variants_run_and_write_the_contract(pipeline, variant):
    root, args = pipeline
    with accelerator_state_for(variant):
        assert main(["ppo", "recipes/tiny.yaml", *args, *variant]) == 0
    ppo = root / "run" / "ppo"
    assert (ppo / "COMPLETED").is_file() and (ppo / "model" / "model.safetensors").is_file()
    info = json.loads((ppo / "run.json").read_text())
    assert info["status"] == "completed" and info["world_size"] == 1
    expected_ref = "frozen copy" if "ppo.lora.enabled=false" in variant else "lora-disabled"
    assert info["reference"] == expected_ref
    rows = [json.loads(x) for x in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "objective/score",
        "objective/score_normalized",
        "objective/kl",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/entropy",
        "kl_coef",
        "policy/loss",
        "policy/clipfrac",
        "policy/approxkl",
        "value/loss",
        "value/clipfrac",
        "value/explained_variance",
        "response/length_mean",
        "response/eos_rate",
        "response/truncation_rate",
        "lr",
        "timing/rollout",
        "timing/score",
        "timing/update",
        "timing/iteration",
        "tokens_per_second",
    ):
        assert key in rows[-1], key
    results = json.loads((ppo / "eval.json").read_text())
    for key in ("ppo_score_mean", "sft_score_mean", "win_rate", "kl_mean", "eos_rate"):
        assert key in results
    assert results["prompts_source"] == "eval_prompts"
    low, high = results["win_rate_ci95"]  # Wilson: never a single point, inside [0, 1]
    assert 0.0 <= low <= results["win_rate"] <= high <= 1.0 and low < high
    # The score is normalised on SFT samples scored before iteration 1 (4 in the tiny recipe).
    assert info["calibration"]["source"] == "sft_samples" and info["calibration"]["n"] == 4
    assert results["calibration"] == info["calibration"]
    assert (ppo / "samples.jsonl").is_file()
    # The saved policy is a plain transformers model (LoRA merged).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ppo / "model")
    assert not hasattr(model, "peft_config")
    # Saved in fp32 whatever the run's precision (a bf16 base is merged in fp32).
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    bf16 = "precision=bf16" in variant
    assert info["mixed_precision"] == ("bf16" if bf16 else "no")
    assert info["frozen_weights"] == ("bfloat16" if bf16 else "float32")


def test_ppo_refuses_an_unfinished_sft_dir(pipeline, capsys):
    root, args = pipeline
    (root / "run" / "sft" / "COMPLETED").rename(root / "run" / "sft" / "COMPLETED.bak")
    try:
        assert main(["ppo", "recipes/tiny.yaml", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no COMPLETED marker" in err
    finally:
        (root / "run" / "sft" / "COMPLETED.bak").rename(root / "run" / "sft" / "COMPLETED")


def test_curves_panels_get_data_from_real_sft_and_ppo_runs(pipeline, tmp_path):
    """Every dashboard panel reads names the stages really log (the judge panel aside: no
    stage logs a judge series; it is there for runs that add one)."""
    from rlhf.tools import curves

    root, args = pipeline
    sft_args = [a for a in args if a != "sft.eval=null" and not a.startswith("output_dir=")]
    sft_data = next(a.split("=", 1)[1] for a in args if a.startswith("sft.train.path="))
    sft_args += [f"output_dir={tmp_path / 'run'}", f"sft.eval.path={sft_data}"]
    assert main(["sft", "recipes/tiny.yaml", *sft_args]) == 0
    assert main(["ppo", "recipes/tiny.yaml", *args]) == 0
    for stage, run_dir, unfed in (
        ("sft", tmp_path / "run" / "sft", set()),
        ("ppo", root / "run" / "ppo", {"held-out judge"}),
    ):
        run = curves.load_run(run_dir)
        panels = dict(curves.panels_for(stage, [run]))
        assert set(panels) == {title for title, _ in curves.PANELS[stage]} - unfed, stage
        for owner, title, patterns in curves.OVERVIEW:
            if owner == stage:
                assert curves.match_series(list(run.series), patterns), title


def test_judge_is_a_second_reward_model_in_its_own_run_dir(pipeline, capsys):
    root, args = pipeline
    assert main(["judge", "recipes/tiny.yaml", *args, "--if-configured"]) == 0
    judge, reward = root / "run" / "judge", root / "run" / "reward"
    assert (judge / "COMPLETED").is_file() and (judge / "model" / "model.safetensors").is_file()
    info = json.loads((judge / "run.json").read_text())
    assert info["stage"] == "judge" and info["seed"] == 43  # tiny: seed 42 + offset 1
    assert json.loads((reward / "run.json").read_text())["seed"] == 42
    # Without a judge: section, --if-configured (what `make reward` passes) does nothing.
    (judge / "COMPLETED").unlink()
    assert main(["judge", "recipes/tiny.yaml", *args, "judge=null", "--if-configured"]) == 0
    assert "nothing to do" in capsys.readouterr().out and not (judge / "COMPLETED").exists()


def test_ppo_with_an_ensemble_a_function_and_judges(pipeline):
    """Several sources (a min-ensemble of reward models plus a function), a reward-model
    judge that exists and one that does not (skipped, with the reason in eval.json), and an
    evaluation batch of its own (eval.batch_size)."""
    root, args = pipeline
    extra = [
        'ppo.rewards=[{model: ["{output_dir}/reward", "{output_dir}/reward/model"], '
        "combine: min}, {function: length, args: {max: 3}, weight: 0.1}]",
        'eval.judges=[{model: "{output_dir}/reward", name: rm}, {model: "{output_dir}/judge"}]',
        "eval.samples_per_prompt=2",
        "eval.batch_size=3",  # sampling batches that do not divide the samples
    ]
    assert main(["ppo", "recipes/tiny.yaml", *args, *extra]) == 0
    ppo = root / "run" / "ppo"
    rows = [json.loads(x) for x in (ppo / "metrics.jsonl").read_text().splitlines()]
    for key in ("objective/score/models", "objective/score/length", "timing/score/models"):
        assert key in rows[-1], key
    # the ensemble of one model twice: min == mean == that model's calibrated score
    assert rows[-1]["objective/score/models/reward"] == rows[-1]["objective/score/models/reward_2"]
    results = json.loads((ppo / "eval.json").read_text())
    assert results["n_samples"] == 2 * results["n_prompts"]
    assert results["judges"]["rm"]["n"] == results["n_samples"]
    assert (
        "COMPLETED" in results["judges"]["judge"]["skipped"]
        or "does not exist" in (results["judges"]["judge"]["skipped"])
    )
    info = json.loads((ppo / "run.json").read_text())
    assert info["reward_sources"] == ["models", "length"]
    # each ensemble member calibrated on the same 4 SFT samples (ppo.calibration_prompts)
    calibrations = info["reward_calibrations"]
    assert list(calibrations) == ["models/reward", "models/reward_2"]
    assert calibrations["models/reward"] == calibrations["models/reward_2"]
    assert calibrations["models/reward"]["source"] == "sft_samples"
    assert calibrations["models/reward"]["n"] == 4
