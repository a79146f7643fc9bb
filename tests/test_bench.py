"""The benchmark harness's arithmetic: FLOP accounting and the ours-vs-TRL summaries. (The
measurements themselves run under `make bench`, never in the test suite.)"""

import json
from pathlib import Path

import pytest

from bench import report, run, trainers
from bench.flops import Arch, ppo_flops

ARCH = Arch(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=100)
SMOLLM2_135M = Arch(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152)


def test_lm_head_is_counted_only_where_it_runs():
    full = ARCH.forward("lm", tokens=10, ctx=5)
    kept = ARCH.forward("lm", tokens=10, ctx=5, head_tokens=3)
    assert full - kept == 7 * 2 * ARCH.hidden * ARCH.vocab
    assert ARCH.forward("scalar", 10, 5) < kept  # a d x 1 head is almost free
    # LoRA: frozen weights need input gradients only (4 instead of 6 FLOPs per weight)
    full_ft = ARCH.train("lm", 10, 5)
    lora = ARCH.train("lm", 10, 5, lora=True)
    assert full_ft - lora == 10 * (2 * ARCH.body + 2 * ARCH.hidden * ARCH.vocab) - 10 * (
        6 * ARCH.lora_params()
    )


def test_ours_counts_fewer_flops_than_trl_for_the_same_rollouts():
    trl, parity, defaults = (
        ppo_flops(SMOLLM2_135M, v, batch=8, prompt=64, response=32, epochs=4)
        for v in ("trl", "parity", "defaults")
    )
    assert trl["generate"] == parity["generate"] == defaults["generate"]
    assert defaults["score"] < parity["score"] < trl["score"]
    assert defaults["update"] < parity["update"] < trl["update"]


def test_phase_splits_add_up_to_their_phase():
    batch, prompt, response, epochs = 8, 64, 32, 4
    parity, defaults = (
        ppo_flops(SMOLLM2_135M, v, batch, prompt, response, epochs) for v in ("parity", "defaults")
    )
    # defaults score = reference (LoRA disabled) + reward model, nothing else
    assert defaults["reference"] + defaults["reward"] == defaults["score"]
    assert parity["reference"] + parity["reward"] < parity["score"]  # + the critic's forward
    # full fine-tuning: the forward is 2 of the 6 FLOPs per weight, 1 of 3 attention terms
    assert abs(3 * parity["train_forward_and_loss"] - parity["update"]) < 1e-6 * parity["update"]
    # LoRA: forward 2N + 2L + attn, backward 2N + 4L + 2 attn per token (N frozen, L LoRA)
    tokens, ctx = batch * (prompt + response), (prompt + response) / 2
    gap = epochs * tokens * (2 * SMOLLM2_135M.lora_params() + SMOLLM2_135M.attention(ctx))
    assert defaults["backward"] - defaults["train_forward_and_loss"] == gap


def test_efficiency_skips_unmeasured_splits_and_bounds_bf16_rows_at_2_bytes(tmp_path):
    import json

    config = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2}
    config.update(num_key_value_heads=1, intermediate_size=16, vocab_size=100)
    (tmp_path / "config.json").write_text(json.dumps(config))
    timed = {k: {"median": 1.0} for k in ("generate", "score", "update", "reference")}
    row = {"total": 4.0, "prompt_len": {"median": 6}, "response_len": {"median": 4}, **timed}
    settings = {"batch_size": 2, "ppo_epochs": 1}
    machine = {"fp32_gflops": 100.0, "bf16_gflops": 400.0, "read_bandwidth_gbs": 1.0}
    rows = {"ours-defaults": {**row, "mixed_precision": "bf16"}, "trl": dict(row)}
    eff = report.efficiency(rows, str(tmp_path), settings, machine)
    assert set(eff["ours-defaults"]["phases"]) == {"generate", "score", "update", "reference"}
    assert eff["ours-defaults"]["peak_used"] == "bf16" and eff["trl"]["peak_used"] == "fp32"
    bf16_bound = eff["ours-defaults"]["generation_bandwidth_bound_s"]
    assert bf16_bound * 2 == eff["trl"]["generation_bandwidth_bound_s"]


def _run(impl, stage, pair, step_times, rss_mb, tokens=1000):
    result = {"step_times": step_times, "tokens": tokens, "impl": impl, "stage": stage}
    return {
        "impl": impl,
        "stage": stage,
        "pair": pair,
        "rc": 0,
        "peak_rss_mb": rss_mb,
        "result": result,
    }


def test_trainer_summaries_and_per_round_ratios():
    runs = [
        _run("ours", "sft", 0, [9.0, 2.0, 2.0, 4.0], 1000),
        _run("trl", "sft", 0, [9.0, 4.0, 4.0, 4.0], 2000),
        _run("ours", "sft", 1, [9.0, 3.0, 3.0, 3.0], 1000),
        _run("trl", "sft", 1, [9.0, 3.0, 3.0, 3.0], 1000),
    ]
    one = trainers.run_summary(runs[0]["result"])
    assert one["s_per_step"] == 2.0  # the first (warm-up) step is left out of the median
    assert one["tokens_per_s"] == 1000 / 17.0  # ... but counted in the epoch's throughput
    ratios = trainers.pair_ratios(runs)["sft"]
    assert ratios["s_per_step"] == {"median": 0.75, "min": 0.5, "max": 1.0}
    assert ratios["peak_rss"]["min"] == 0.5
    rows = trainers.summarize_rows(runs)
    assert [(r["stage"], r["impl"], r["runs"]) for r in rows] == [
        ("sft", "ours", 2),
        ("sft", "trl", 2),
    ]
    section = {
        "settings": {
            "rows": {"sft": 4, "reward": 4},
            "tokens": {},
            "batch_size": 8,
            "max_length": 256,
            "lr": {},
        },
        "rows": rows,
        "ratios": trainers.pair_ratios(runs),
        "runs": runs,
    }
    table = "\n".join(report.trainer_markdown(section))
    assert "| sft | ours | 2.50 (2.00-3.00) |" in table
    assert "0.75 (0.50-1.00)" in table
    assert "not measured" in report.trainer_markdown(None)[0]


def test_rloo_row_runs_ours_and_trl_on_the_tiny_model(tmp_path):
    """Smoke test of `make bench ARGS='--only rloo'`: both workers, the summary and the table."""
    import argparse

    from bench import run
    from rlhf.roles import models

    if not models.is_prepared("tiny-llama"):
        pytest.skip("tiny-llama is not prepared (make models)")
    args = argparse.Namespace(
        prompts=tmp_path / "none.jsonl", n_prompts=4, iterations=1, quick=True, pairs=1, timeout=600
    )
    settings = run.rloo_spec(args, models.prepared_dir("tiny-llama"))
    assert (settings["k"], settings["batch"], settings["steps"]) == (4, 8, 2)
    runs = [
        run.run_worker("rloo", impl, 0, settings, tmp_path, args, variant)
        for variant in run.WORKER_VARIANTS["rloo"]
        for impl in ("ours", "trl")
    ]
    for r in runs:
        log = tmp_path / f"{r['stage']}-{r['impl']}.0.log"
        assert r["rc"] == 0, log.read_text()[-2000:]
        assert len(r["result"]["step_times"]) == 2 and r["peak_rss_mb"] > 0
        assert r["result"]["tokens"] > 0 and r["result"]["stage"] == r["stage"]
    section = {  # as bench/run.py builds it
        "settings": settings,
        "runs": runs,
        "rows": trainers.summarize_rows(runs, run.WORKER_VARIANTS["rloo"]),
        "ratios": trainers.pair_ratios(runs, run.WORKER_VARIANTS["rloo"]),
    }
    assert [(r["stage"], r["impl"], r["steps"]) for r in section["rows"]] == [
        ("rloo", "ours", 2),
        ("rloo", "trl", 2),
        ("rloo-lora", "ours", 2),
        ("rloo-lora", "trl", 2),
    ]
    table = "\n".join(report.rloo_markdown(section))
    assert "| rloo | ours |" in table and "| rloo-lora | trl |" in table and "k=4" in table
    assert "not measured" in report.rloo_markdown(None)[0]


def test_grpo_row_runs_ours_and_trl_on_the_tiny_model(tmp_path):
    """Smoke test of `make bench ARGS='--only grpo'`: both workers on the default recipe's GRPO
    shape (k = 4 answers to 4 prompts, optimizer steps of 8), the summary and the table."""
    import argparse

    from bench import run
    from rlhf.roles import models

    if not models.is_prepared("tiny-llama"):
        pytest.skip("tiny-llama is not prepared (make models)")
    args = argparse.Namespace(iterations=1, quick=True, pairs=1, timeout=600)
    settings = run.grpo_spec(args, models.prepared_dir("tiny-llama"))
    assert (settings["k"], settings["batch"], settings["mini_batch"]) == (4, 16, 8)
    first = json.loads(Path("reward_data/prompts/train.jsonl").read_text().splitlines()[0])
    assert settings["steps"] == 2 and settings["prompts"][0] == first["prompt"]
    runs = [
        run.run_worker("grpo", impl, 0, settings, tmp_path, args, "grpo-lora")
        for impl in ("ours", "trl")
    ]
    for r in runs:
        log = tmp_path / f"grpo-lora-{r['impl']}.0.log"
        assert r["rc"] == 0, log.read_text()[-2000:]
        # TRL's two optimizer steps per iteration are summed into one iteration's time
        assert len(r["result"]["step_times"]) == 2 and r["peak_rss_mb"] > 0
        assert r["result"]["tokens"] > 0 and r["result"]["stage"] == "grpo-lora"
    section = {  # as bench/run.py builds it
        "settings": settings,
        "runs": runs,
        "rows": trainers.summarize_rows(runs, run.WORKER_VARIANTS["grpo"]),
        "ratios": trainers.pair_ratios(runs, run.WORKER_VARIANTS["grpo"]),
    }
    assert [(r["stage"], r["impl"]) for r in section["rows"]] == [
        ("grpo-lora", "ours"),
        ("grpo-lora", "trl"),
    ]
    table = "\n".join(report.grpo_markdown(section))
    assert "| grpo-lora | ours |" in table and "| grpo-lora | trl |" in table
    assert "k=4 answers to each of 4 prompts" in table and "GRPOTrainer" in table
    assert "not measured" in report.grpo_markdown(None)[0]


def test_grpo_worker_sums_trls_optimizer_steps_per_iteration():
    from bench.grpo_workers import per_iteration

    assert per_iteration([3.0, 1.0, 2.5, 0.5], 2) == [4.0, 3.0]
    assert per_iteration([3.0, 1.0, 2.0], 1) == [3.0, 1.0, 2.0]


def test_dpo_row_runs_ours_and_trl_on_the_tiny_model(tmp_path):
    """Smoke test of `make bench ARGS='--only dpo'`: both workers on the same pairs (the same
    first-step loss, log 2 with a fresh adapter), the summary and the table."""
    import argparse
    import math

    from bench import run
    from rlhf.roles import models

    if not models.is_prepared("tiny-llama"):
        pytest.skip("tiny-llama is not prepared (make models)")
    args = argparse.Namespace(
        iterations=1, dpo_rankings=1, dpo_pairs="best_vs_rest", pairs=1, timeout=600
    )
    settings = run.dpo_spec(args, models.prepared_dir("tiny-llama"))
    assert (settings["steps"], settings["pairs_per_step"], len(settings["rankings"])) == (2, 3, 2)
    runs = [run.run_worker("dpo", impl, 0, settings, tmp_path, args) for impl in ("ours", "trl")]
    for r in runs:
        assert r["rc"] == 0, (tmp_path / f"dpo-{r['impl']}.0.log").read_text()[-2000:]
        assert len(r["result"]["step_times"]) == 2 and r["peak_rss_mb"] > 0
        assert math.isclose(r["result"]["losses"][0], math.log(2.0), rel_tol=1e-4)
    # the shared prefix is read once per ranking, the pairs' sequences twice per pair by TRL
    assert runs[0]["result"]["tokens"] < runs[1]["result"]["tokens"]
    section = {
        "settings": {k: v for k, v in settings.items() if k != "rankings"},
        "rows": trainers.summarize_rows(runs, ("dpo",)),
        "ratios": trainers.pair_ratios(runs, ("dpo",)),
        "runs": runs,
    }
    table = "\n".join(report.dpo_markdown(section))
    assert "| ours |" in table and "| trl |" in table and "3 pairs (best_vs_rest)" in table
    assert "not measured" in report.dpo_markdown(None)[0]


def test_memory_table_per_rank_bytes_by_hand():
    from bench.memory_table import Shape, per_rank_gb

    b = {"weight": 4.0, "grad": 4.0, "adam": 8.0, "act_full": 0.0, "act_lora": 0.0}
    m = Shape("made-up", 1e9, 1024, 10, 256, 4096)
    # full fine-tuning, no activations: 16 P trained + 2 x 2 P frozen (bf16) = 20 GB
    assert per_rank_gb(m, b, False, "DDP", 4, False) == 20.0
    # ZeRO-2 on 4 ranks: 4 P + 12 P / 4 + 4 P = 11 GB; ZeRO-3 with sharded frozen: 20 / 4
    assert per_rank_gb(m, b, False, "ZeRO-2", 4, False) == 11.0
    assert per_rank_gb(m, b, False, "ZeRO-3", 4, True) == 5.0
    # LoRA r=16: per layer 16 x (2048 + 2 x 1280 + 2048 + 2 x 5120 + 5120) = 16 x 22,016 adapter
    # parameters; DDP: base 2 P + reward model 2 P + 16 bytes each
    lora = 10 * 16 * 22016
    assert m.lora_params() == lora
    assert per_rank_gb(m, b, True, "DDP", 2, False) == (4e9 + 16 * lora) / 1e9
    # the activation term: act x hidden x layers x 4096 tokens
    with_act = {**b, "act_full": 10.0}
    assert per_rank_gb(m, with_act, False, "DDP", 1, False) == 20.0 + 10 * 1024 * 10 * 4096 / 1e9


@pytest.mark.fast_path
def test_decode_row_samples_tokens_with_both_samplers_on_the_tiny_model(tmp_path):
    """Smoke test of `make bench ARGS='--only decode'`: the worker (our rollout sampler and
    transformers' generate, one seed) and the table."""
    import argparse

    from bench import decode, run
    from rlhf.roles import models

    if not models.is_prepared("tiny-llama"):
        pytest.skip("tiny-llama is not prepared (make models)")
    args = argparse.Namespace(quick=True, pairs=1, timeout=600)
    section = run.run_decode(args, models.prepared_dir("tiny-llama"), tmp_path)
    assert section["rc"] == 0, (tmp_path / "decode.log").read_text()[-2000:]
    points = section["result"]["points"]
    assert [p["batch_size"] for p in points] == [2, 4]
    for p in points:
        assert all(n > 0 for counts in p["sampled_tokens"].values() for n in counts)
        assert all(len(s) == 1 for s in p["seconds"].values())
    table = "\n".join(decode.markdown(section))
    assert "| 2 | " in table and "| 4 | " in table
    assert "not measured" in decode.markdown(None)[0]


def test_the_machine_block_says_which_instruction_sets_a_run_was_held_to(monkeypatch):
    for name in run.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    free = run.describe_machine()
    assert free["isa_caps"] == {} and "capped" not in free["description"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    capped = run.describe_machine()
    assert capped["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert capped["precision_auto"] == "fp32"  # no bf16 instructions for oneDNN: auto is fp32
    assert (
        "ISA capped: ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2" in capped["description"]
    )
    assert "precision auto = fp32" in capped["description"]


@pytest.mark.fast_path
def test_accel_paths_runs_each_variant_on_the_tiny_recipe(tmp_path, monkeypatch):
    """Smoke test of `python -m bench.accel_paths`: set-up from the recipe, one iteration per
    variant (every fast path, none, all but one), and the JSON it writes."""
    import sys

    from bench import accel_paths
    from rlhf.roles import models

    if not models.is_prepared("tiny-llama"):
        pytest.skip("tiny-llama is not prepared (make models)")
    out = tmp_path / "accel.json"
    argv = ["accel_paths", "--recipe", "recipes/tiny.yaml", "--rounds", "1"]
    argv += ["--variants", "all,off,all-decode", "--warmup", "all", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    accel_paths.main()
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["all", "all-decode", "off"]
    for rows in results.values():
        assert len(rows) == 1 and rows[0]["total"] > 0 and rows[0]["response_len"] > 0


def test_accel_paths_refuses_to_run_when_rlhf_accel_forces_off(tmp_path, monkeypatch):
    import sys

    from bench import accel_paths

    monkeypatch.setenv("RLHF_ACCEL", "off")
    monkeypatch.setattr(sys, "argv", ["accel_paths", "--out", str(tmp_path / "accel.json")])
    with pytest.raises(SystemExit, match="RLHF_ACCEL"):
        accel_paths.main()


def test_versions_summary_leaves_out_each_runs_warm_up_iteration():
    """bench.versions: the median over the runs' iterations after their first, by hand."""
    from bench import versions

    runs = [
        {"iteration_s": [30.0, 9.0, 8.0], "length_mean": 20.0},
        {"iteration_s": [40.0, 7.0, 10.0], "length_mean": 24.0},
    ]
    row = versions.summary(runs)
    assert row["median_iteration_s"] == 8.5  # median of 9, 8, 7, 10: the 30 and 40 left out
    assert row["runs_median_s"] == [8.5, 8.5]
    assert row["length_mean"] == 22.0
