"""SFT and reward-model throughput, ours vs TRL's SFTTrainer / RewardTrainer, on identical work.

Both get the same rows for one epoch: single-turn conversations from reward_data/sft (loss on
the answer), and best-vs-worst pairs from reward_data/rankings (Bradley-Terry); batch 8 (8
pairs = 16 sequences), max length 256, lr constant, grad clip 1.0, fp32, no gradient
checkpointing. Ours runs as a user runs it, `python -m rlhf.cli <stage> recipe.yaml`, and its
step times come from the run's metrics.jsonl (`timing/step`); TRL's from a step callback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from bench.common import read_json, summarize

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("sft", "reward")
LR = {"sft": 2e-5, "reward": 3e-5}  # the default recipe's


def prepare(scratch: Path, model_dir: Path, n_rows: int, batch_size: int = 8) -> dict:
    """Writes the rows and our recipe; returns the settings (token totals counted our way)."""
    folder = scratch / "trainers"
    folder.mkdir(parents=True, exist_ok=True)
    sft, pairs = bench_rows(n_rows)
    files = {"sft": folder / "sft.jsonl", "reward": folder / "pairs.jsonl"}
    for name, rows in (("sft", sft), ("reward", pairs)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Our stages evaluate before and after training (outside the step times): 8 rows.
    evals = {"sft": folder / "sft_eval.jsonl", "reward": folder / "pairs_eval.jsonl"}
    evals["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft[:8]))
    evals["reward"].write_text("".join(json.dumps(r) + "\n" for r in pairs[:8]))
    recipe = our_recipe(folder / "ours-run", model_dir, files, evals, batch_size)
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {
        "recipe": str(recipe_path),
        "output_dir": recipe["output_dir"],
        "files": {k: str(v) for k, v in files.items()},
        "rows": {"sft": len(sft), "reward": len(pairs)},
        "tokens": token_totals(model_dir, sft, pairs),
        "batch_size": batch_size,
        "max_length": 256,
        "lr": LR,
    }


def bench_rows(n_rows: int) -> tuple[list[dict], list[dict]]:
    """(single-turn SFT conversations, best-vs-worst pairs of the rankings), n_rows each."""
    sft = [json.loads(x) for x in (ROOT / "reward_data/sft/train.jsonl").read_text().splitlines()]
    sft = [r for r in sft if [m["role"] for m in r["messages"]] == ["user", "assistant"]][:n_rows]
    ranked = [
        json.loads(x) for x in (ROOT / "reward_data/rankings/train.jsonl").read_text().splitlines()
    ][:n_rows]
    pairs = [
        {
            "prompt": r["prompt"],
            "chosen": r["responses"][r["ranking"][0]],
            "rejected": r["responses"][r["ranking"][-1]],
        }
        for r in ranked
    ]
    return sft, pairs


def our_recipe(
    output_dir: Path, model_dir: Path, files: dict, evals: dict, batch_size: int
) -> dict:
    """Our recipe for the same work: one epoch, fp32, constant LR, the default recipe's LRs."""
    loop = {
        "epochs": 1,
        "batch_size": batch_size,
        "max_length": 256,
        "log_every": 1,
        "eval_every": 10**6,
    }
    optim = {"warmup_ratio": 0.0, "scheduler": "constant", "max_grad_norm": 1.0}
    return {
        "name": "bench-trainers",
        "output_dir": str(output_dir),
        "seed": 42,
        "precision": "fp32",
        "model": {"name": str(model_dir)},
        "sft": {
            **loop,
            "train": {"path": str(files["sft"])},
            "eval": {"path": str(evals["sft"])},
            "optim": {**optim, "lr": LR["sft"]},
        },
        "reward": {
            **loop,
            "train": {"path": str(files["reward"])},
            "eval": {"path": str(evals["reward"])},
            "init_from": str(model_dir),
            "calibration_size": 8,
            "optim": {**optim, "lr": LR["reward"]},
        },
    }


def token_totals(model_dir: Path, sft: list[dict], pairs: list[dict]) -> dict[str, int]:
    """Tokens of the rows as our stages encode them (max_length 256)."""
    from rlhf.roles import models
    from rlhf.tokens.chat import encode_prompt_response, encode_sft

    tok = models.load_tokenizer(str(model_dir))
    return {
        "sft": sum(len(encode_sft(tok, r["messages"], 256, True)["input_ids"]) for r in sft),
        "reward": sum(
            len(encode_prompt_response(tok, [{"role": "user", "content": p["prompt"]}], p[k], 256))
            for p in pairs
            for k in ("chosen", "rejected")
        ),
    }


def run_dir(prepared: dict, pair: int) -> Path:
    return Path(f"{prepared['output_dir']}-{pair}")


def command(
    impl: str, stage: str, prepared: dict, pair: int, spec_path: Path, out_path: Path
) -> list[str]:
    if impl == "ours":
        override = f"output_dir={run_dir(prepared, pair)}"
        return [sys.executable, "-m", "rlhf.cli", stage, prepared["recipe"], override]
    return [
        sys.executable,
        "-m",
        "bench.trl_trainers",
        "--spec",
        str(spec_path),
        "--out",
        str(out_path),
    ]


def trl_spec(stage: str, prepared: dict, model_dir: Path) -> dict:
    return {
        "stage": stage,
        "model": str(model_dir),
        "data": prepared["files"][stage],
        "batch_size": prepared["batch_size"],
        "max_length": prepared["max_length"],
        "lr": prepared["lr"][stage],
        "seed": 42,
    }


def ours_result(prepared: dict, stage: str, pair: int) -> dict:
    """Step times and losses from the run's own metrics.jsonl (one line per step)."""
    lines = (run_dir(prepared, pair) / stage / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x) for x in lines]
    steps = [m for m in steps if "timing/step" in m]
    return {
        "impl": "ours",
        "stage": stage,
        "step_times": [m["timing/step"] for m in steps],
        "tokens": prepared["tokens"][stage],
        "rows": prepared["rows"][stage],
        "losses": [m["train/loss"] for m in steps],
    }


def run_summary(result: dict) -> dict:
    """s/step (median over steps after the first, the warm-up) and tokens/s over the epoch."""
    times = result["step_times"]
    out = {
        "s_per_step": summarize(times[1:] or times)["median"],
        "epoch_s": sum(times),
        "tokens_per_s": result["tokens"] / max(sum(times), 1e-9),
        "steps": len(times),
    }
    if result.get("cpu_times"):  # the process's CPU seconds per step, where the worker has them
        cpu = result["cpu_times"]
        out["cpu_s_per_step"] = summarize(cpu[1:] or cpu)["median"]
    return out


def summarize_rows(runs: list[dict], stages: tuple[str, ...] = STAGES) -> list[dict]:
    out = []
    for stage in stages:
        for impl in ("ours", "trl"):
            mine = [r for r in runs if r["stage"] == stage and r["impl"] == impl and r["result"]]
            if not mine:
                continue
            per = [run_summary(r["result"]) for r in mine]
            out.append(
                {
                    "stage": stage,
                    "impl": impl,
                    "runs": len(mine),
                    "s_per_step": summarize([p["s_per_step"] for p in per]),
                    "epoch_s": summarize([p["epoch_s"] for p in per]),
                    "tokens_per_s": summarize([p["tokens_per_s"] for p in per]),
                    "cpu_s_per_step": summarize(
                        [p["cpu_s_per_step"] for p in per if "cpu_s_per_step" in p]
                    ),
                    "peak_rss_gb": summarize([r["peak_rss_mb"] / 1024 for r in mine]),
                    "tokens": mine[0]["result"]["tokens"],
                    "steps": per[0]["steps"],
                }
            )
    return out


def pair_ratios(runs: list[dict], stages: tuple[str, ...] = STAGES) -> dict:
    """ours / TRL per round, for s/step and peak RSS."""
    out = {}
    for stage in stages:
        ratios = {"s_per_step": [], "cpu_s_per_step": [], "peak_rss": []}
        for pair in sorted({r["pair"] for r in runs}):
            got = {
                r["impl"]: r
                for r in runs
                if r["stage"] == stage and r["pair"] == pair and r["result"] is not None
            }
            if {"ours", "trl"} <= got.keys():
                a, b = (run_summary(got[k]["result"]) for k in ("ours", "trl"))
                ratios["s_per_step"].append(a["s_per_step"] / b["s_per_step"])
                if "cpu_s_per_step" in a and "cpu_s_per_step" in b:
                    ratios["cpu_s_per_step"].append(a["cpu_s_per_step"] / b["cpu_s_per_step"])
                ratios["peak_rss"].append(got["ours"]["peak_rss_mb"] / got["trl"]["peak_rss_mb"])
        out[stage] = {k: summarize(v) for k, v in ratios.items()}
    return out


def load_result(impl: str, stage: str, prepared: dict, pair: int, out_path: Path) -> dict | None:
    if impl == "ours":
        return ours_result(prepared, stage, pair)
    return read_json(out_path) if out_path.exists() else None


def clean_up(impl: str, stage: str, prepared: dict, pair: int) -> None:
    import shutil

    folder = run_dir(prepared, pair) / stage / "model" if impl == "ours" else None
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
