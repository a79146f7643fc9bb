"""The dpo stage (on the stage runner) on the tiny model; TRL's DPOTrainer is the cross-check
of its loss.

One SFT run feeds every DPO run here. The 4-way rankings of tests/test_pipeline.py's data give
6 pairs each under `all` and 3 under `best_vs_rest`.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.dpo_workers import trl_rows
from rlhf import accel
from rlhf.algo.dpo import LOSS_TYPES, pair_losses
from rlhf.cli import main
from rlhf.data.types import Ranking
from rlhf.roles import preference as pref
from tests.test_distributed import ACCELERATE, CPU_2PROC, _free_port
from tests.test_pipeline import _overrides, _write_data

CONTRACT = ("recipe.yaml", "run.json", "metrics.jsonl", "tb", "model", "eval.json", "COMPLETED")
# Full fine-tuning with a frozen reference copy: the most state to resume (weights + AdamW).
FULL = ["dpo.lora.enabled=false", "dpo.optim.lr=1e-4"]


def _cli(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhf.cli", "dpo", "recipes/tiny.yaml", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, **kw
    )


def _finish(args: list[str]) -> None:
    proc = _cli(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _comparable(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "time" and not k.startswith("timing/")}
        for r in _rows(run)
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A finished SFT run and the DPO overrides that read it and the test rankings."""
    root = tmp_path_factory.mktemp("dpo")
    paths = _write_data(root)
    assert main(["sft", "recipes/tiny.yaml", *_overrides(root, paths)]) == 0
    args = [
        f"dpo.sft_dir={root / 'run' / 'sft'}",
        f"dpo.train.path={paths['rank']}",
        "dpo.eval=null",  # eval_fraction 0.1 holds out rankings by prompt
    ]
    return root, args


# ------------------------------------------------------------------------------ pure parts


def test_pair_expansion_all_and_best_vs_rest_by_hand():
    ranking = Ranking(
        prompt=[{"role": "user", "content": "q"}],
        responses=["a", "b", "c", "d"],
        ranking=[2, 0, 3, 1],  # c > a > d > b
    )
    assert pref.ranked_pairs(ranking, "all") == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    assert pref.ranked_pairs(ranking, "best_vs_rest") == [(2, 0), (2, 3), (2, 1)]
    rows = trl_rows([ranking], "best_vs_rest")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("c", "a"),
        ("c", "d"),
        ("c", "b"),
    ]
    assert rows[0]["prompt"] == [{"role": "user", "content": "q"}]
    assert rows[0]["chosen"][0]["role"] == "assistant"
    pair = Ranking(prompt=[], responses=["x", "y"], ranking=[1, 0])
    assert pref.ranked_pairs(pair, "all") == pref.ranked_pairs(pair, "best_vs_rest") == [(1, 0)]


def test_implicit_reward_metrics_by_hand():
    chosen = torch.tensor([0.3, -0.1, 0.2, 0.0])
    rejected = torch.tensor([0.1, 0.1, 0.2, -0.4])
    # margins 0.2, -0.2, 0 (a tie counts half), 0.4 -> accuracy (1 + 0 + 0.5 + 1) / 4
    got = pref.implicit_reward_metrics(chosen, rejected)
    assert got["pairs"] == 4
    assert got["accuracy"] == pytest.approx(0.625)
    assert got["margin"] == pytest.approx(0.1)
    assert got["chosen_reward"] == pytest.approx(0.1)
    assert got["rejected_reward"] == pytest.approx(0.0)


def completion_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Sum of log pi(token) over each row's completion tokens (logits at t predict t + 1),
    from the full logits: what response_logps must equal."""
    token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])
    return (token_logps.squeeze(-1) * completion_mask[:, 1:]).sum(dim=1)


def test_completion_logps_sum_only_completion_tokens():
    # vocabulary 2, uniform logits except one position: log(1/2) per token unless stated
    logits = torch.zeros(1, 4, 2)
    logits[0, 2] = torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))])  # p(1) = 3/4
    input_ids = torch.tensor([[0, 1, 0, 1]])
    completion_mask = torch.tensor([[0, 0, 1, 1]])  # tokens 2 and 3 are the completion
    # token 2 (=0) from position 1: log 1/2; token 3 (=1) from position 2: log 3/4
    expected = torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.75))
    got = completion_logps(logits, input_ids, completion_mask)
    assert torch.allclose(got, expected.reshape(1))


def test_loss_types_are_names_trl_accepts():
    """Ours is a subset of TRL's DPOTrainer `loss_type`s, each the same loss under its name
    (tests/test_losses.py checks the values)."""
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(LOSS_TYPES) <= set(re.findall(r"`'(\w+)'`", help_text))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "override, says",
    [
        ("dpo.loss_type=bogus", "dpo.loss_type"),
        ("dpo.pairs=some", "dpo.pairs"),
        ("dpo.beta=0", "dpo.beta"),
        ("dpo.loss_type=exo_pair", "dpo.loss_type"),  # TRL's, not ours
    ],
)
def test_bad_dpo_settings_give_one_line_exit_2(override, says, capsys):
    assert main(["dpo", "recipes/tiny.yaml", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err


def test_dpo_without_a_finished_sft_run_is_one_line_exit_2(tmp_path, capsys):
    assert main(["dpo", "recipes/tiny.yaml", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dpo.sft_dir" in err
    assert not (tmp_path / "dpo" / "COMPLETED").exists()


# ------------------------------------------------------------------------------ the stage


def test_stage_completes_with_the_contract(sft, matmul_attention_backwards):
    root, args = sft
    out = root / "contract"
    assert main(["dpo", "recipes/tiny.yaml", *args, f"output_dir={out}"]) == 0  # LoRA default
    # its training steps differentiate attention through matmuls (rlhf.accel.apply.training),
    # unless RLHF_ACCEL=off forces the plain path over the recipe's `accel: auto`
    assert bool(matmul_attention_backwards) == (not accel.forced_off())
    run = out / "dpo"
    for name in CONTRACT:
        assert (run / name).exists(), name
    written = [p for p in run.rglob("*") if p.is_file() and p.name != "COMPLETED"]
    assert (run / "COMPLETED").stat().st_mtime >= max(p.stat().st_mtime for p in written)

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["world_size"] == 1
    assert info["pairs"] == "best_vs_rest" and info["loss_type"] == "sigmoid"
    assert info["reference"].startswith("adapter disabled")
    assert info["train_pairs"] == 3 * info["train_rankings"]  # 4-way rankings, best vs rest
    assert info["eval_pairs"] == 6 * info["eval_rankings"] > 0  # held out: always all pairs

    rows = _rows(run)
    keys = {k for r in rows for k in r}
    for key in (
        "train/loss",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/rewards/chosen",
        "lr",
        "eval/loss",
        "eval/rewards/margins",
    ):
        assert key in keys, key
    assert all(r["stage"] == "dpo" for r in rows)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert list((run / "tb").glob("events.*"))

    # Our implicit-reward evaluation agrees with TRL's own evaluation at the last step (same
    # pairs, equal batches, so the mean of TRL's batch means is the mean over pairs).
    results = json.loads((run / "eval.json").read_text())
    last_eval = [r for r in rows if "eval/rewards/margins" in r][-1]
    assert last_eval["step"] == results["steps"] == 4
    assert results["preference"]["pairs"] == info["eval_pairs"]
    assert results["preference"]["margin"] == pytest.approx(
        last_eval["eval/rewards/margins"], abs=1e-5
    )
    assert results["preference"]["margin"] != 0  # the policy moved away from the reference

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "model")  # merged LoRA, safetensors
    assert not any("lora" in name for name in _weights(run))
    sft_weights = _weights(root / "run" / "sft")
    assert any(not torch.equal(sft_weights[k], v) for k, v in _weights(run).items())
    assert model.config.num_hidden_layers >= 1


def test_all_pairs_expansion_counts_in_run_json(sft):
    root, args = sft
    out = root / "allpairs"
    assert main(["dpo", "recipes/tiny.yaml", *args, f"output_dir={out}", "dpo.pairs=all",
                 "dpo.max_steps=1"]) == 0  # fmt: skip
    info = json.loads((out / "dpo" / "run.json").read_text())
    assert info["pairs"] == "all" and info["train_pairs"] == 6 * info["train_rankings"]


@pytest.mark.parametrize(
    "loss_type, extra",
    [
        ("ipo", ["dpo.gradient_checkpointing=true"]),  # whole sequences: no KV cache
        ("hinge", ["precision=bf16"]),  # autocast
        ("robust", ["dpo.label_smoothing=0.1"]),
    ],
)
def test_each_loss_type_trains_from_pairs_and_rankings(sft, loss_type, extra):
    """Every dpo.loss_type runs the stage; hinge from a file of pairs (one pair a prompt), in
    bf16 autocast."""
    root, args = sft
    out = root / f"loss-{loss_type}"
    if loss_type == "hinge":
        pairs = root / "pairs.jsonl"
        rows = [{"prompt": f"Say {w}.", "chosen": f"{w}.", "rejected": "No."} for w in "abcdefgh"]
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = [*args, f"dpo.train.path={pairs}"]
    overrides = [f"output_dir={out}", f"dpo.loss_type={loss_type}", "dpo.max_steps=2", *extra]
    if "precision=bf16" in extra:
        _finish([*args, *overrides])  # a process of its own: accelerate's precision is global
    else:
        assert main(["dpo", "recipes/tiny.yaml", *args, *overrides]) == 0
    info = json.loads((out / "dpo" / "run.json").read_text())
    results = json.loads((out / "dpo" / "eval.json").read_text())
    assert info["loss_type"] == results["loss_type"] == loss_type
    if loss_type == "hinge":
        assert info["train_pairs"] == info["train_rankings"]  # a pair is a ranking of two
        assert info["mixed_precision"] == "bf16"
    losses = [r["train/loss"] for r in _rows(out / "dpo") if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(results["preference"]["loss"])


def test_eval_pairs_are_a_fixed_seeded_sample():
    from rlhf.stages.dpo import eval_subset

    rows = [{"i": i} for i in range(10)]
    picked = eval_subset(rows, 4, seed=3)
    assert len(picked) == 4 and picked == eval_subset(rows, 4, seed=3)
    assert [r["i"] for r in picked] == sorted(r["i"] for r in picked)  # held-out order kept
    assert picked != eval_subset(rows, 4, seed=4)
    assert eval_subset(rows, 0, seed=3) == rows == eval_subset(rows, 10, seed=3)


def test_judges_are_the_trained_reward_model_then_eval_judges():
    from rlhf.recipe import load_recipe
    from rlhf.stages.dpo import judge_entries

    recipe = load_recipe("recipes/tiny.yaml", ["output_dir=/x"])
    assert [(j.name, j.model) for j in judge_entries(recipe)] == [
        ("reward", "{output_dir}/reward"),
        ("judge", "{output_dir}/judge"),
    ]
    # already judged by the recipe (same folder once expanded): not twice
    again = load_recipe("recipes/tiny.yaml", ["output_dir=/x", "eval.judges=[{model: /x/reward}]"])
    assert [j.model for j in judge_entries(again)] == ["/x/reward"]


def test_eval_json_judges_the_policy_as_ppo_does(sft, tmp_path):
    """End of run: DPO vs SFT on held-out prompts sampled as PPO samples them, judged by the
    trained reward model (<output_dir>/reward, present) and eval.judges (absent: skipped), with
    answer accuracy, KL to the reference, length and EOS rate."""
    root, args = sft
    reward = [
        "reward.eval=null",
        "reward.max_steps=2",
        f"reward.train.path={root / 'rank.jsonl'}",
        f"reward.init_from={root / 'run' / 'sft' / 'model'}",
    ]
    assert main(["reward", "recipes/tiny.yaml", f"output_dir={tmp_path}", *reward]) == 0
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "What is 2 plus 3?", "answer": "5"},
        {"prompt": "Say something kind."},
        {"prompt": "What is the capital of France?", "answer": "Paris"},
        {"prompt": "What is 4 times 4?", "answer": "16"},
        {"prompt": "Beyond eval_size: never sampled.", "answer": "x"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["dpo", "recipes/tiny.yaml", *args, f"output_dir={tmp_path}", "dpo.max_steps=2",
                 f"dpo.eval_prompts.path={prompts}", "eval.samples_per_prompt=2"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    assert results["prompts_source"] == "dpo.eval_prompts"
    assert (results["n_prompts"], results["samples_per_prompt"], results["n_samples"]) == (4, 2, 8)
    assert results["sampling"]["temperature"] == 0.7  # ppo.temperature
    assert "win_rate" not in results  # no training score: every reward model is a judge

    rm = results["judges"]["reward"]
    assert rm["n"] == 8 and {"sft_mean", "dpo_mean"} <= set(rm)
    low, high = rm["win_rate_ci95"]  # clustered by prompt: 4 prompts of 2 samples
    assert 0.0 <= low <= rm["win_rate"] <= high <= 1.0 and rm["n_prompts"] == 4
    assert rm["wins"] + rm["ties"] + rm["losses"] == 8
    assert "does not exist" in results["judges"]["judge"]["skipped"]

    assert results["answer_accuracy"]["n"] == 3 * 2  # 3 of the 4 sampled prompts have answers
    assert {"sft", "dpo"} <= set(results["answer_accuracy"])
    # Sampled from the policy, scored against the adapter-disabled reference: a reference that
    # were the policy itself would give exactly 0.
    assert math.isfinite(results["kl_mean"]) and results["kl_mean"] != 0
    for side in ("", "sft_"):
        assert 1 <= results[f"{side}response_length_mean"] <= 8  # tiny: max_new_tokens 8
        assert 0 <= results[f"{side}eos_rate"] <= 1
    assert results["kl_temperature"] == 0.7  # the KL says the temperature it was measured at
    sample = results["samples"][0]
    assert {"prompt", "dpo", "sft", "dpo_kl", "dpo_tokens", "sft_finished"} <= set(sample)
    assert set(sample["scores"]) == {"reward"}  # the skipped judge scored nothing


@pytest.fixture(scope="module")
def uninterrupted(sft):
    root, args = sft
    run_args = [*args, *FULL, "dpo.max_steps=6", "dpo.save_every=1", f"output_dir={root / 'ref'}"]
    t0 = time.time()
    _finish(run_args)
    return root / "ref" / "dpo", time.time() - t0


def _assert_same_run(run: Path, ref: Path) -> None:
    ref_weights, weights = _weights(ref), _weights(run)
    assert ref_weights.keys() == weights.keys()
    assert all(torch.equal(ref_weights[k], v) for k, v in weights.items())

    # Equal up to the run's own folder, which skipped judges name in their message.
    def evaluation(folder: Path) -> dict:
        return json.loads((folder / "eval.json").read_text().replace(str(folder.parent), "<out>"))

    assert evaluation(run) == evaluation(ref)
    assert _comparable(run) == _comparable(ref)


def test_resume_after_sigkill_equals_the_uninterrupted_run(sft, uninterrupted):
    root, args = sft
    ref, _ = uninterrupted
    out = root / "killed"
    run_args = [*args, *FULL, "dpo.max_steps=6", "dpo.save_every=1", f"output_dir={out}"]
    proc = _cli(run_args)
    target = out / "dpo" / "checkpoints" / "step-000003" / "VALID"
    while not target.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / "dpo" / "COMPLETED").exists()
    _finish([*run_args, "--resume"])
    info = json.loads((out / "dpo" / "run.json").read_text())
    assert info["status"] == "completed"
    _assert_same_run(out / "dpo", ref)


def test_sigterm_leaves_a_resumable_checkpoint(sft, uninterrupted):
    root, args = sft
    ref, _ = uninterrupted
    out = root / "terminated"
    # no periodic checkpoints: the one on disk after SIGTERM is the stop checkpoint
    run_args = [*args, *FULL, "dpo.max_steps=6", f"output_dir={out}"]
    proc = _cli(run_args)
    metrics = out / "dpo" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and '"train/loss"' in metrics.read_text()):
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume" in err
    saved = list((out / "dpo" / "checkpoints").glob("step-*/VALID"))
    assert len(saved) == 1
    assert not (out / "dpo" / "COMPLETED").exists()
    _finish([*run_args, "--resume"])
    # the stop step differs from the uninterrupted run's saves, the result must not
    ref_weights, weights = _weights(ref), _weights(out / "dpo")
    assert all(torch.equal(ref_weights[k], v) for k, v in weights.items())


@pytest.mark.multiprocess
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(sft, tuning):
    """DDP: the same step; under LoRA the reference forward (adapter off) runs through DDP too."""
    root, args = sft
    runs = {n: root / f"dist{n}-{tuning}" for n in (1, 2)}
    tuned = FULL if tuning == "full" else ["dpo.lora.enabled=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    for nproc, out in runs.items():
        module_args = [
            "rlhf.cli", "dpo", "recipes/tiny.yaml", *args, *tuned, f"output_dir={out}",
            "dpo.max_steps=1", f"dpo.batch_size={4 // nproc}", "dpo.optim.warmup_ratio=0",
            "dpo.optim.lr=1e-3",
        ]  # fmt: skip
        if nproc == 1:
            cmd = [sys.executable, "-m", *module_args]
        else:
            cmd = [
                ACCELERATE, "launch", "--config_file", CPU_2PROC, "--num_processes", "2",
                "--main_process_port", str(_free_port()), "-m", *module_args,
            ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        info = json.loads((out / "dpo" / "run.json").read_text())
        assert info["world_size"] == nproc
        assert info["effective_batch_rankings"] == 4
    # The gradient first: Adam's first step is lr * g / (|g| + eps), blind to a gradient's
    # scale, so a rank count that rescaled it would show in the norm, not in the weights.
    first = {}
    for n, out in runs.items():
        rows = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
        first[n] = next(r for r in rows if "train/grad_norm" in r)
    assert first[1]["train/loss"] == pytest.approx(first[2]["train/loss"], rel=1e-5)
    assert first[1]["train/grad_norm"] == pytest.approx(first[2]["train/grad_norm"], rel=1e-4)
    one, two = _weights(runs[1] / "dpo"), _weights(runs[2] / "dpo")
    start = _weights(root / "run" / "sft")
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-4  # the step did something
    # and the same thing on 2 ranks: within 1% of a step, since an element whose gradient is
    # near 0 turns g / (|g| + eps) by the last bits of the reduction order (1 step: 0.15%)
    assert gap < 1e-2 * moved


def test_curves_and_report_show_a_dpo_run(uninterrupted, tmp_path):
    from rlhf.tools.curves import load_run, panels_for, render

    ref, _ = uninterrupted
    titles = [title for title, _ in panels_for("dpo", [load_run(ref)])]
    for title in ("loss", "preference accuracy", "reward margin", "implicit rewards"):
        assert title in titles
    margin = dict(panels_for("dpo", [load_run(ref)]))["reward margin"]
    assert margin == ["train/rewards/margins", "eval/rewards/margins"]
    result = render([ref], tmp_path / "curves")
    assert result["figures"]["dpo"].is_file() and "overview" not in result["figures"]
    html = result["report"].read_text()
    assert "<h2>dpo</h2>" in html and "best_vs_rest" in html and "preference" in html


# --------------------------------------------- our own pair loss on the reward stage batching


def test_our_ranking_batched_loss_equals_trl_dpo_trainer_loss(tiny_model_dir, tmp_path):
    """Our pair loss over the reward stage's batching (each of a ranking's K responses
    forwarded once, the shared prefix once) equals TRL's DPOTrainer sigmoid loss over the
    same pairs (two sequences per pair), with the LoRA adapter disabled as the reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf.recipe import LoraConfig
    from rlhf.roles import models

    rankings = [
        Ranking(
            prompt=[{"role": "user", "content": f"What is {a} times {b}?"}],
            responses=[f"It is {a * b}.", "No idea.", f"{a * b}, obviously, idiot.", "Hm."],
            ranking=[0, 3, 1, 2],
        )
        for a, b in ((3, 7), (12, 4))
    ]
    pair_rows = trl_rows(rankings, "all")
    tokenizer = models.load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    policy = models.load_causal_lm(tiny_model_dir)
    policy.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    config = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=len(pair_rows),
        loss_type=["sigmoid"],
        beta=0.1,
        max_length=128,
        bf16=False,
    )
    trainer = DPOTrainer(
        model=policy,
        args=config,
        train_dataset=Dataset.from_list(pair_rows),
        processing_class=tokenizer,
        peft_config=models.lora_config(lora),
    )
    model = trainer.model
    # A fresh adapter (B = 0) leaves policy == reference and every loss log 2: move it.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.eval()  # no dropout anywhere

    rows = [pref.encode_ranking(tokenizer, r, "all", max_length=128) for r in rankings]
    tokenized = trainer.train_dataset
    pairs = [(row, b, w) for row in rows for b, w in row["pairs"]]
    for i, (row, b, w) in enumerate(pairs):
        assert tokenized[i]["prompt_ids"] + tokenized[i]["chosen_ids"] == row["seqs"][b]
        assert tokenized[i]["prompt_ids"] + tokenized[i]["rejected_ids"] == row["seqs"][w]
        assert len(tokenized[i]["prompt_ids"]) == row["prompt_len"]

    with torch.no_grad():
        inputs = trainer.data_collator([tokenized[i] for i in range(len(tokenized))])
        trl_loss = trainer.compute_loss(model, inputs)
        batch = pref.collate_rankings(rows, tokenizer.pad_token_id)
        assert "prefix_ids" in batch  # the shared-prefix path is the one compared
        policy_logps = pref.response_logps(model, batch)
        with model.disable_adapter():
            ref_logps = pref.response_logps(model, batch)
        ours = pair_losses(policy_logps, ref_logps, batch, beta=0.1)
    assert ours.shape == (12,)
    assert abs(trl_loss.item() - math.log(2.0)) > 1e-3  # the comparison is not trivial
    assert ours.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)


def test_lora_reference_is_the_sft_model_with_the_adapter_disabled(sft):
    """Under LoRA (the tiny recipe's) the stage keeps one copy of the weights: the reference
    log-probs are the SFT model's own, computed without a graph, while the policy's moved."""
    from types import SimpleNamespace

    from rlhf.recipe import load_recipe
    from rlhf.roles import models
    from rlhf.stages.dpo import load_models, reference_logps

    root, args = sft
    recipe = load_recipe("recipes/tiny.yaml", args)
    init_from = root / "run" / "sft" / "model"
    policy, reference = load_models(recipe, init_from, accelerator=None)
    assert reference is None
    with torch.no_grad():  # a fresh adapter (B = 0) would leave the policy equal to SFT
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    tokenizer = models.load_tokenizer(str(init_from))
    ranking = Ranking(
        prompt=[{"role": "user", "content": "What is 3 times 7?"}],
        responses=["It is 21.", "No idea.", "Hm."],
        ranking=[0, 2, 1],
    )
    rows = [pref.encode_ranking(tokenizer, ranking, "all")]
    batch = pref.collate_rankings(rows, tokenizer.pad_token_id)
    model = pref.ResponseLogps(policy)
    ref = reference_logps(model, None, batch, SimpleNamespace(unwrap_model=lambda m: m))
    with torch.no_grad():
        sft_logps = pref.response_logps(models.load_causal_lm(str(init_from)).eval(), batch)
    assert not ref.requires_grad
    assert torch.allclose(ref, sft_logps, rtol=1e-5, atol=1e-5)
    policy_logps = model(batch)
    assert policy_logps.requires_grad and (policy_logps - sft_logps).abs().max() > 1e-3


def test_response_logps_shared_prefix_and_whole_sequences_equal_full_logits(tiny_model_dir):
    """Both batchings give each response's summed completion log-probs as completion_logps
    computes them from the full logits of the whole, unshared sequences."""
    from rlhf.roles import models
    from rlhf.tokens.chat import pad_batch

    tokenizer = models.load_tokenizer(tiny_model_dir)
    model = models.load_causal_lm(tiny_model_dir).eval()
    rankings = [
        Ranking(prompt=[{"role": "user", "content": q}], responses=rs, ranking=[1, 0, 2][: len(rs)])
        for q, rs in (
            ("Name a colour.", ["Red.", "Blue, or green.", "No."]),
            ("Hi?", ["Hello!", "Hm."]),
        )
    ]
    rows = [pref.encode_ranking(tokenizer, r, "all") for r in rankings]
    seqs = [s for row in rows for s in row["seqs"]]
    whole = pad_batch(seqs, tokenizer.pad_token_id, "right")
    starts = [row["prompt_len"] for row in rows for _ in row["seqs"]]
    cols = torch.arange(whole["input_ids"].shape[1])
    completion = whole["attention_mask"] * (cols[None] >= torch.tensor(starts)[:, None])
    with torch.no_grad():
        logits = model(**whole).logits
        expected = completion_logps(logits, whole["input_ids"], completion)
        for share in (True, False):
            batch = pref.collate_rankings(rows, tokenizer.pad_token_id, share_prefix=share)
            assert ("prefix_ids" in batch) == share
            got = pref.response_logps(model, batch)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (share, got, expected)
