"""`rlhf eval compare` (rlhf.tools.compare): policy A vs policy B, on the tiny random model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from rlhf.algo import stats
from rlhf.infra.errors import UserError
from rlhf.roles import models
from rlhf.tokens.decoding import Decoding
from rlhf.tools import compare
from tests.test_evaluate import run_cli, write_jsonl

PROMPTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Count to three, slowly please."}],
]


# -------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A 3M-parameter model gains nothing from intra-op threads, and they make it many times
    slower on a busy machine (a training run beside the tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model with a seeded, untrained score head and a stored calibration."""
    out = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_reward_model(tiny_model_dir)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "reward_calibration.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "n": 8}))
    return str(out)


@pytest.fixture(scope="module")
def uncalibrated_rm_dir(tmp_path_factory, tiny_rm_dir) -> str:
    """The same judge without a calibration file (and none in its config.json)."""
    out = tmp_path_factory.mktemp("tiny-rm-raw") / "model"
    shutil.copytree(tiny_rm_dir, out, ignore=shutil.ignore_patterns("reward_calibration.json"))
    return str(out)


@pytest.fixture(scope="module")
def other_policy_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model with perturbed weights: a different policy, same tokenizer."""
    out = tmp_path_factory.mktemp("tiny-other")
    torch.manual_seed(1)
    model = models.load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    models.load_tokenizer(tiny_model_dir).save_pretrained(out)
    return str(out)


def test_a_policy_against_itself_ties_everywhere_with_zero_kl(tiny_model_dir, tiny_rm_dir):
    summary, samples = compare.compare(
        tiny_model_dir,
        tiny_model_dir,
        PROMPTS,
        [tiny_rm_dir],
        reference=tiny_model_dir,
        decoding=Decoding(max_new_tokens=8, do_sample=True),
        seed=3,
        batch_size=2,
    )
    rm = summary["judges"][tiny_rm_dir]
    assert rm["win_rate"] == 0.5 and rm["ties"] == len(PROMPTS)
    assert rm["win_rate_ci95"] == [0.5, 0.5]  # every prompt a tie
    assert rm["a_mean"] == rm["b_mean"]
    # The policy's log-probs come from the logits it sampled from (KV-cached decoding), the
    # reference's from one forward: the same numbers up to float rounding.
    assert summary["a_kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert summary["kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert [s["a"] for s in samples] == [s["b"] for s in samples]
    # The stored calibration is applied exactly as PPO does: (raw - mean) / std.
    assert rm["calibration"]["mean"] == 0.5
    assert rm["a_calibrated_mean"] == pytest.approx((rm["a_mean"] - 0.5) / 2.0)


def test_a_function_judge_reads_the_prompt_rows_not_the_generated_ones(tiny_model_dir):
    spec = "tests.reward_fns:tag_length"
    summary, samples = compare.compare(
        tiny_model_dir,
        tiny_model_dir,
        PROMPTS[:2],
        [],
        decoding=Decoding(max_new_tokens=2),
        judges=[spec],
        rows=[{"tag": "ab"}, {"tag": "abcd"}],
    )
    assert [s["scores"][spec]["a"] for s in samples] == [2.0, 4.0]
    assert summary["judges"][spec]["b_mean"] == 3.0


def test_cli_two_policies_json_with_every_field(
    tmp_path, tiny_model_dir, other_policy_dir, tiny_rm_dir, uncalibrated_rm_dir
):
    # An SFT file: the prompt is the conversation without its final assistant turn, which
    # serves as the reference for BLEU / ROUGE.
    rows = [{"messages": [*p, {"role": "assistant", "content": "Hello there."}]} for p in PROMPTS]
    data = write_jsonl(tmp_path / "held_out.jsonl", rows)
    samples_path = tmp_path / "out" / "samples.jsonl"
    argv = [
        "eval", "compare", tiny_model_dir, other_policy_dir,
        "--prompts", data, "--reward-model", tiny_rm_dir, "--reward-model", uncalibrated_rm_dir,
        "--reference", tiny_model_dir, "--max-new-tokens", "6", "--batch-size", "2",
        "--temperature", "0.8", "--json", "--output", str(samples_path),
    ]  # fmt: skip
    rc, out, err = run_cli(argv)
    assert rc == 0, err
    got = json.loads(out)
    assert got["n_prompts"] == 3 and got["win_rate_ci_method"] == stats.CI_METHOD
    assert got["sampling"]["do_sample"] and got["sampling"]["temperature"] == 0.8
    assert got["kl_temperature"] == 0.8  # KL at the sampling temperature, as in PPO
    for prefix in ("a_", ""):
        assert 1 <= got[f"{prefix}response_length_mean"] <= 6
        assert 0 <= got[f"{prefix}eos_rate"] <= 1
    assert got["a_kl_mean"] == pytest.approx(0.0, abs=1e-4)  # A is the reference
    assert math.isfinite(got["kl_mean"]) and abs(got["kl_mean"]) > 1e-3
    calibrated, raw = got["judges"][tiny_rm_dir], got["judges"][uncalibrated_rm_dir]
    for rm in (calibrated, raw):
        assert rm["wins"] + rm["ties"] + rm["losses"] == 3 and rm["n_prompts"] == 3
        lo, hi = rm["win_rate_ci95"]
        assert 0 <= lo <= rm["win_rate"] <= hi <= 1
        assert math.isfinite(rm["a_mean"]) and math.isfinite(rm["b_mean"])
    # Same weights: same raw scores; only the calibrated one reports calibrated means.
    assert raw["b_mean"] == pytest.approx(calibrated["b_mean"], abs=1e-6)
    assert math.isfinite(calibrated["b_calibrated_mean"])
    assert raw["calibration"] is None and raw["b_calibrated_mean"] is None
    assert got["text_metrics"]["n_references"] == 3
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert len(samples) == 3 and samples[0]["reference"] == "Hello there."
    assert set(samples[0]["scores"][tiny_rm_dir]) == {"a", "b"} and "b_kl" in samples[0]
    # BLEU / ROUGE come from optional libraries: present -> numbers, absent -> one note each.
    for lib, key in (("sacrebleu", "bleu"), ("rouge_score", "rougeL")):
        try:
            __import__(lib)
        except ImportError:
            assert "not installed (pip install 'rlhf[eval]')" in err and lib in err
        else:
            assert 0 <= got["text_metrics"]["b"][key] <= 100


def test_cli_human_readable_greedy_without_reference(tmp_path, tiny_model_dir, tiny_rm_dir):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Bye"}])
    argv = ["eval", "compare", tiny_model_dir, tiny_model_dir, "--prompts", data]
    rc, out, err = run_cli([*argv, "--reward-model", tiny_rm_dir, "--greedy", "--limit", "1"])
    assert rc == 0, err
    assert (
        "1 prompts x 1 samples" in out and "greedy" in out and "win rate of B over A: 0.500" in out
    )
    assert "KL to reference" not in out


def test_cli_mistakes_are_one_line_exit_2(tmp_path, tiny_model_dir, tiny_rm_dir):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["eval", "compare", tiny_model_dir]
    cases = [
        (
            [*base, str(tmp_path / "missing"), "--prompts", data, "--reward-model", tiny_rm_dir],
            "no such folder",
        ),
        (
            [*base, tiny_model_dir, "--prompts", str(empty), "--reward-model", tiny_rm_dir],
            "no rows",
        ),
        ([*base, tiny_model_dir, "--prompts", data], "--reward-model"),
        ([*base, tiny_model_dir, "--reward-model", tiny_rm_dir], "--prompts"),
        ([*base, tiny_model_dir, "--prompts", data, "--reward-model", tiny_model_dir], "reward"),
        (
            [*base, tiny_model_dir, "--prompts", data, "--reward-model", tiny_rm_dir]
            + ["--greedy", "--temperature", "0.7"],
            "--greedy",
        ),
        (["eval", "reward", tiny_rm_dir, data, "--prompts", data], "only for"),
    ]
    for argv, needle in cases:
        rc, out, err = run_cli(argv)
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, (argv, err)
        assert needle in err and out == ""


def test_references_from_a_field_or_an_sft_file(tmp_path):
    from rlhf.data import load_prompts

    rows = [{"prompt": "a", "answer": "x"}, {"prompt": "b"}, {"prompt": "c", "answer": "z"}]
    loaded = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert compare.load_references(loaded, "answer") == ["x", None, "z"]
    assert compare.load_references(loaded, None) is None  # a prompts file has no replies
    with pytest.raises(UserError, match="no prompt row has a field 'gold'"):
        compare.load_references(loaded, "gold")
    bad = load_prompts(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": [1]}]))
    with pytest.raises(UserError, match="not a string"):
        compare.load_references(bad, "answer")
    # An SFT file: the final assistant turn, which load_prompts dropped from the prompt.
    sft = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}]
    loaded = load_prompts(write_jsonl(tmp_path / "s.jsonl", sft))
    assert compare.load_references(loaded, None) == ["r"]


# ------------------------------------------------------------------ sampling temperature


def _run_folder(path, stage: str, temperature: float):
    """A stage folder with the files default_temperature reads (run.json, recipe.yaml)."""
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"stage": stage, "status": "completed"}))
    (path / "recipe.yaml").write_text(f"name: x\nppo:\n  temperature: {temperature}\n")
    return path


def test_default_temperature_is_the_ppo_runs(tmp_path):
    sft = _run_folder(tmp_path / "a" / "sft", "sft", 0.7)  # its recipe has ppo: too
    ppo = _run_folder(tmp_path / "a" / "ppo", "ppo", 0.7)
    other = _run_folder(tmp_path / "b" / "ppo", "ppo", 0.9)
    got = compare.default_temperature(
        {"POLICY_A": str(sft / "model"), "POLICY_B": str(ppo / "model")}
    )
    assert got == (0.7, f"ppo.temperature of {ppo / 'recipe.yaml'}")
    plain = compare.default_temperature({"POLICY_A": str(sft / "model"), "POLICY_B": "tiny-llama"})
    assert plain == (1.0, "default: neither policy is a PPO run's model")
    with pytest.raises(
        UserError, match=r"different temperatures \(POLICY_A T=0.7 .*POLICY_B T=0.9"
    ):
        compare.default_temperature(
            {"POLICY_A": str(ppo / "model"), "POLICY_B": str(other / "model")}
        )


def test_cli_samples_at_the_ppo_policys_temperature(
    tmp_path, tiny_model_dir, other_policy_dir, tiny_rm_dir
):
    run = _run_folder(tmp_path / "run" / "ppo", "ppo", 0.6)
    shutil.copytree(other_policy_dir, run / "model")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    argv = ["eval", "compare", tiny_model_dir, str(run / "model"), "--prompts", data]
    rc, out, err = run_cli(
        [*argv, "--reward-model", tiny_rm_dir, "--max-new-tokens", "2", "--json"]
    )
    assert rc == 0, err
    got = json.loads(out)
    assert got["sampling"]["temperature"] == 0.6
    assert got["sampling"]["temperature_from"] == f"ppo.temperature of {run / 'recipe.yaml'}"
    assert f"sampling T=0.6 (ppo.temperature of {run / 'recipe.yaml'})" in compare.format_report(
        got
    )


def test_judge_rubric_reports_behaviour_rates_per_policy(tiny_model_dir, monkeypatch, capsys):
    """`--judge rubric`: the rate of each behaviour the rubric's classify reports, per policy,
    with intervals clustered by prompt. A fake classify stands in for rlhf.roles.rubric."""
    seen = []

    def classify(row: dict, text: str) -> dict:
        seen.append(row)
        return {"long": len(text) > 3, "refused": None}  # refused applies to no row here

    monkeypatch.setattr(compare, "rubric_classify", lambda: classify)
    summary, samples = compare.compare(
        tiny_model_dir,
        tiny_model_dir,
        PROMPTS,
        [],
        judges=["rubric"],
        decoding=Decoding(max_new_tokens=4, do_sample=True),
        samples_per_prompt=2,
    )
    long = summary["behaviour"]["long"]
    expected = sum(len(s["a"]) > 3 for s in samples) / 6
    assert long["n"] == 6 and long["a"] == long["b"] == expected
    assert 0 <= long["a_ci95"][0] <= expected <= long["a_ci95"][1] <= 1
    assert "refused" not in summary["behaviour"]  # applies to no sample
    assert seen[0]["prompt"] == PROMPTS[0] and len(seen) == 12  # 2 policies x 6 samples
    assert "judges" not in summary  # the rubric is not a scored judge
    assert "eval: b answered 6/6" in capsys.readouterr().err  # progress while it runs
