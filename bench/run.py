"""Benchmark harness entry point: `make bench ARGS='...'` or `python -m bench.run`.

  python -m bench.run --quick            tiny random model, 1 round, 2 iterations: smoke test
  python -m bench.run                    SmolLM2-135M, 3 interleaved rounds of every row
  python -m bench.run --only trl,parity --pairs 5
  python -m bench.run --model tiny-llama   the same rows on the tiny random model
  python -m bench.run --only sft,reward  SFT / reward-model steps, ours vs TRL's trainers
  python -m bench.run --only rloo        ppo.estimator=rloo vs TRL 1.16's RLOOTrainer
  python -m bench.run --only grpo        the default recipe's GRPO vs TRL 1.16's GRPOTrainer
  python -m bench.run --only dpo         a DPO step: TRL's DPOTrainer vs our dpo stage's step
                                         (the reward stage's batching, shared prefixes)
  python -m bench.run --only decode      sampling tokens/s vs batch size (8, 16, 32, 64),
                                         transformers' generate vs our rollout sampler
  python -m bench.run --e2e-log FILE     quote a `make sft reward ppo` timing file verbatim

Each measurement is a separate process (peak RSS per process from os.wait4), run one after the
other in rounds: ours-parity, trl, ours-defaults, ours-sft, trl-sft, ours-reward, trl-reward,
ours-parity, ... so slow drift of the machine hits every row alike. The TRL PPO worker runs in
bench/.venv-trl (trl 1.12, the last with PPO), created on first use; the SFT / reward trainer
comparison uses the project's own TRL (bench/trainers.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import decode, report, trainers
from bench.common import log, read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TRL_VENV = BENCH / ".venv-trl"
# trl 1.12.0 is the last release with trl.experimental.ppo; the rest pinned to what it was
# checked with (torch first, from the local CPU wheel, so nothing pulls a CUDA build).
TRL_PINS = [
    "trl==1.12.0",
    "transformers==5.23.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "peft==0.21.2",
]
TORCH_PIN = "torch==2.13.0"
# The OpenAssistant prompt lottery (one JSON string per line), third-party data kept out of the
# repository: in $RLHF_DATA_ROOT, else ../shared/data beside the repository (as in CI).
PROMPTS_FILE = (
    Path(os.environ.get("RLHF_DATA_ROOT") or ROOT.parent / "shared" / "data")
    / "oasst_prompts_en.jsonl"
)
ROWS = ("parity", "trl", "defaults")  # the order inside each round
# Ours and TRL's in one module each, bench/<stage>_workers.py.
WORKER_STAGES = ("rloo", "dpo", "grpo")
# The set-ups each worker stage runs, every one as ours and as TRL's. RLOO: "rloo" is full
# fine-tuning in fp32 on both sides (a frozen reference copy each); "rloo-lora" is LoRA r=16 on
# all linear layers on both sides, bf16 where `precision: auto` picks it (ours: the default
# recipe's set-up, reference = adapter disabled, bf16 frozen weights; TRL: its peft_config path
# and `bf16=True`).
# GRPO: "grpo-lora" only, the default recipe's set-up (LoRA r=16, bf16 where `precision: auto`
# picks it) against TRL's GRPOTrainer with its peft_config and `bf16=True`.
WORKER_VARIANTS = {"rloo": ("rloo", "rloo-lora"), "dpo": ("dpo",), "grpo": ("grpo-lora",)}


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round, few iterations")
    p.add_argument("--pairs", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument(
        "--model",
        choices=("smollm2-135m-instruct", "tiny-llama"),
        default=None,
        help="prepared model for every role (default: SmolLM2; tiny-llama with --quick)",
    )
    p.add_argument(
        "--only",
        default="matmul,parity,trl,defaults,sft,reward",
        help="comma list of: matmul, parity, defaults, ours (= parity,defaults), trl, sft, "
        "reward, rloo, dpo, grpo, decode",
    )
    p.add_argument(
        "--dpo-pairs",
        choices=("best_vs_rest", "all"),
        default="best_vs_rest",
        help="dpo row: how each 4-way ranking becomes pairs (default: the recipe's)",
    )
    p.add_argument(
        "--dpo-rankings", type=int, default=3, help="dpo row: rankings per optimizer step"
    )
    p.add_argument(
        "--trainer-rows", type=int, default=None, help="rows per SFT / reward epoch (default 48)"
    )
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("--results-md", type=Path, default=None, help="markdown file to append to")
    p.add_argument("--iterations", type=int, default=None, help="measured iterations / process")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations per process")
    p.add_argument("--prompts", type=Path, default=PROMPTS_FILE)
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--e2e-log", type=Path, default=None, help="`make sft reward ppo` timings")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with --only expanded and checked and the --quick defaults filled in."""
    p = argument_parser()
    args = p.parse_args(argv)
    only = set()
    for item in args.only.split(","):
        item = item.strip()
        only |= {"parity", "defaults"} if item == "ours" else {item}
    unknown = only - {"matmul", "decode", *ROWS, *trainers.STAGES, *WORKER_STAGES}
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}")
    args.only = only
    if only & set(ROWS) and not args.prompts.is_file():
        p.error(
            f"--prompts {args.prompts}: not found; the PPO rows need prompts, one JSON string "
            "per line (OpenAssistant's English prompt lottery): pass --prompts FILE or set "
            "RLHF_DATA_ROOT to the folder holding oasst_prompts_en.jsonl"
        )
    args.model = args.model or ("tiny-llama" if args.quick else "smollm2-135m-instruct")
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.trainer_rows = args.trainer_rows or (16 if args.quick else 48)
    args.iterations = args.iterations or (2 if args.quick else 3)
    # Smoke tests must not land in the committed results.
    args.out = args.out or (BENCH / "results" / ("tmp/quick" if args.quick else ""))
    args.results_md = args.results_md or (
        args.out / "RESULTS.md" if args.quick else BENCH / "RESULTS.md"
    )
    return args


def ensure_trl_venv() -> Path:
    """bench/.venv-trl with trl 1.12 (python -m venv + pip); reused when the pins match."""
    python = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / ".bench-pins"
    wanted = "\n".join([TORCH_PIN, *TRL_PINS])
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"creating {TRL_VENV} ({', '.join(TRL_PINS)})")
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *TRL_PINS], check=True)
    stamp.write_text(wanted)
    return python


def encode_prompts(model_dir: Path, path: Path, n: int, max_len: int) -> list[dict]:
    """Tokenised once here, so both workers get identical ids (chat template, <= max_len)."""
    from rlhf.roles import models
    from rlhf.tokens.chat import encode_prompt

    tokenizer = models.load_tokenizer(str(model_dir), padding_side="left")
    texts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    out = []
    for text in texts:
        messages = [{"role": "user", "content": text}]
        out.append({"messages": messages, "input_ids": encode_prompt(tokenizer, messages, max_len)})
    return out


# Environment variables that cap the instruction sets oneDNN, MKL and ATen's kernels use.
ISA_CAPS = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
)


def describe_machine() -> dict:
    import torch

    from rlhf.infra.runtime import resolve_precision

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = os.cpu_count()
    # What the CPU has, and what the run let the libraries use: an ISA capped by these
    # variables stands in for an older CPU (fp32 only) on this one.
    caps = {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}
    mixed = resolve_precision("auto")  # accelerate's spelling: "no" is fp32
    precision = "fp32" if mixed == "no" else mixed
    described = f"{cores} cores of {cpu}, {mem_gb:.0f} GB RAM, torch {torch.__version__}"
    described += f", precision auto = {precision}"
    if caps:
        described += ", ISA capped: " + " ".join(f"{k}={v}" for k, v in caps.items())
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gb": round(mem_gb, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu_avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "cpu_amx": bool(torch.cpu._is_amx_tile_supported()),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": caps,
        "precision_auto": precision,
        "description": described,
    }


def run_process(cmd: list[str], log_path: Path, timeout: int) -> tuple[int, float, float]:
    """Runs one worker; returns (exit code, peak RSS in MB of that process, wall seconds)."""
    start = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT)  # the TRL venv does not have this repo installed
    with log_path.open("w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)
        # wait4 reports this child's own rusage (RUSAGE_CHILDREN would be the max over all).
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rlhf.roles import models

    model_dir = models.prepared_dir(args.model)
    if not models.is_prepared(args.model):
        log(f"{args.model} is not prepared: run `make models` first")
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    scratch = args.out / "tmp" / stamp if not args.quick else args.out / stamp
    scratch.mkdir(parents=True, exist_ok=True)
    settings = ppo_settings(args, model_dir)
    # Only the PPO rows read the prompts (the RLOO row falls back to its own).
    prompts = (
        encode_prompts(model_dir, args.prompts, args.n_prompts, 64) if args.only & set(ROWS) else []
    )
    trl_python = ensure_trl_venv() if "trl" in args.only else None
    limit_samples = [measure_limits(args, scratch, "start")] if "matmul" in args.only else []
    stages = [st for st in trainers.STAGES if st in args.only]
    prepared = trainers.prepare(scratch, model_dir, args.trainer_rows) if stages else None
    worker_settings = {st: WORKER_SPECS[st](args, model_dir) for st in WORKER_STAGES}
    ppo = ({**settings, "prompts": prompts}, trl_python)
    runs, trainer_runs, worker_runs = run_rounds(
        args, model_dir, scratch, ppo, stages, prepared, worker_settings
    )
    # Sampling throughput: one process, its repeats interleaved inside (bench/decode.py).
    decode_section = run_decode(args, model_dir, scratch) if "decode" in args.only else None
    if limit_samples:
        limit_samples.append(measure_limits(args, scratch, "end"))
    machine_limits = best_limits(limit_samples)
    rows = report.summarize_rows(runs)
    trl_runs = [r["result"] for r in runs if r["row"] == "trl" and r["result"]]
    out = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node() or "unknown-host",
        "machine": describe_machine(),
        "machine_limits": machine_limits,
        "settings": settings,
        "rows": rows,
        "ratios": report.pair_ratios(runs),
        "efficiency": report.efficiency(rows, str(model_dir), settings, machine_limits),
        "sft_reward": trainer_section(prepared, trainer_runs) if prepared else None,
        **{
            stage: worker_section(worker_settings[stage], worker_runs[stage], stage)
            if worker_runs[stage]
            else None
            for stage in WORKER_STAGES
        },
        "decode": decode_section,
        "e2e": e2e_section(args.e2e_log),
        "notes": notes(trl_runs[0] if trl_runs else None),
        "runs": runs,
        "scratch": str(scratch),
    }
    path = report.write(out, args.out, args.results_md)
    log(f"wrote {path} and appended to {args.results_md}")
    workers = [r for rs in worker_runs.values() for r in rs]
    return exit_code([*runs, *trainer_runs, *workers, decode_section])


def exit_code(processes: list[dict | None]) -> int:
    """0 when every process that ran (None: not run) exited with 0, else 1."""
    return 0 if all(p["rc"] == 0 for p in processes if p is not None) else 1


def ppo_settings(args: argparse.Namespace, model_dir: Path) -> dict:
    """The PPO rows' shared settings, as the results record them."""
    return {
        "quick": args.quick,
        "model": str(model_dir),
        "prompts_file": str(args.prompts),
        "n_prompts": args.n_prompts,
        "max_prompt_length": 64,
        "batch_size": 8,
        "max_new_tokens": 32,
        "ppo_epochs": 4,
        "num_mini_batches": 1,
        "temperature": 0.7,
        "lr": 3e-6,  # TRL 1.12 PPOConfig's default
        "kl_coef": 0.05,
        "seed": 42,
        "warmup": args.warmup,
        "iterations": args.iterations,
        "pairs": args.pairs,
    }


def run_rounds(
    args: argparse.Namespace,
    model_dir: Path,
    scratch: Path,
    ppo: tuple[dict, Path | None],
    stages: list[str],
    prepared: dict | None,
    worker_settings: dict[str, dict],
) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """`--pairs` interleaved rounds, each running every selected row once:
    (PPO runs, SFT / reward runs, {worker stage: runs}). `ppo`: the PPO rows' spec (settings
    and prompts) and TRL's python."""
    runs, trainer_runs = [], []
    worker_runs: dict[str, list[dict]] = {stage: [] for stage in WORKER_STAGES}
    for pair in range(args.pairs):
        for row in (r for r in ROWS if r in args.only):
            runs.append(run_ppo_row(row, pair, *ppo, scratch, args))
        for stage in stages:
            for impl in ("ours", "trl"):
                trainer_runs.append(
                    run_trainer(impl, stage, pair, prepared, model_dir, scratch, args)
                )
        for stage in (st for st in WORKER_STAGES if st in args.only):
            for variant in WORKER_VARIANTS[stage]:
                for impl in ("ours", "trl"):
                    worker_runs[stage].append(
                        run_worker(
                            stage, impl, pair, worker_settings[stage], scratch, args, variant
                        )
                    )
    return runs, trainer_runs, worker_runs


def run_ppo_row(
    row: str,
    pair: int,
    ppo_spec: dict,
    trl_python: Path | None,
    scratch: Path,
    args: argparse.Namespace,
) -> dict:
    """One PPO row's process (TRL's in its own venv): its result, exit code, peak RSS, wall."""
    label = "trl" if row == "trl" else f"ours-{row}"
    spec = {**ppo_spec, "label": label, "variant": row}
    spec_path = scratch / f"{label}.{pair}.spec.json"
    out_path = scratch / f"{label}.{pair}.json"
    write_json(spec_path, spec)
    python = str(trl_python) if row == "trl" else sys.executable
    module = "bench.trl_ppo" if row == "trl" else "bench.ours_ppo"
    cmd = [python, "-m", module, "--spec", str(spec_path), "--out", str(out_path)]
    log(f"round {pair + 1}/{args.pairs}: {label}")
    rc, rss, wall = run_process(cmd, scratch / f"{label}.{pair}.log", args.timeout)
    result = read_json(out_path) if rc == 0 and out_path.exists() else None
    if result is None:
        log(f"{label} failed (rc {rc}), see {scratch / f'{label}.{pair}.log'}")
    else:
        medians = report.run_medians({"result": result, "batch_size": 8})
        log(f"{label}: {medians['total']:.2f} s/iteration, peak RSS {rss / 1024:.2f} GB")
    return {
        "row": label,
        "pair": pair,
        "rc": rc,
        "peak_rss_mb": rss,
        "wall_s": wall,
        "batch_size": ppo_spec["batch_size"],
        "result": result,
    }


def trainer_section(prepared: dict, trainer_runs: list[dict]) -> dict:
    """The SFT / reward rows of the results."""
    return {
        "settings": {k: prepared[k] for k in ("rows", "tokens", "batch_size", "max_length", "lr")},
        "rows": trainers.summarize_rows(trainer_runs),
        "ratios": trainers.pair_ratios(trainer_runs),
        "runs": trainer_runs,
    }


def worker_section(spec: dict, worker_runs: list[dict], stage: str) -> dict:
    """A worker stage's (RLOO, DPO) rows of the results."""
    return {
        "settings": {k: v for k, v in spec.items() if k not in ("prompts", "rankings")},
        "rows": trainers.summarize_rows(worker_runs, WORKER_VARIANTS[stage]),
        "ratios": trainers.pair_ratios(worker_runs, WORKER_VARIANTS[stage]),
        "runs": worker_runs,
    }


def e2e_section(e2e_log: Path | None) -> dict:
    """`make sft reward ppo` timings from --e2e-log, when given."""
    if not e2e_log:
        return {"summary": "not measured"}
    text = e2e_log.read_text().strip()
    summary = f"from {e2e_log}: " + "; ".join(text.splitlines())
    return {"file": str(e2e_log), "text": text, "summary": summary}


def run_decode(args: argparse.Namespace, model_dir: Path, scratch: Path) -> dict:
    """bench/decode.py in one process, `--pairs` interleaved repeats per batch size."""
    spec = decode.spec_for(model_dir, args.quick, args.pairs)
    spec_path, out_path = scratch / "decode.spec.json", scratch / "decode.json"
    write_json(spec_path, spec)
    cmd = [sys.executable, "-m", "bench.decode", "--spec", str(spec_path), "--out", str(out_path)]
    log(f"decode: tokens/s at batch sizes {spec['batch_sizes']}")
    rc, rss, wall = run_process(cmd, scratch / "decode.log", args.timeout)
    result = read_json(out_path) if rc == 0 and out_path.exists() else None
    if result is None:
        log(f"decode failed (rc {rc}), see {scratch / 'decode.log'}")
    settings = {k: v for k, v in spec.items() if k != "prompts"}
    return {"rc": rc, "peak_rss_mb": rss, "wall_s": wall, "spec": settings, "result": result}


def rloo_spec(args: argparse.Namespace, model_dir: Path) -> dict:
    """The RLOO row's work: k = 4 answers to each of 2 prompts per step (8 completions)."""
    texts = []
    if args.prompts.is_file():
        lines = args.prompts.read_text().splitlines()
        texts = [json.loads(x) for x in lines if x.strip()][: args.n_prompts]
    return {
        "model": str(model_dir),
        "prompts": texts or [f"Tell me one fact about the number {i}." for i in range(16)],
        "k": 4,
        "batch": 8,
        "steps": 1 + args.iterations,  # the summary leaves the first (warm-up) one out
        "max_prompt_length": 64,
        "max_new_tokens": 8 if args.quick else 32,
        "temperature": 0.7,
        "beta": 0.05,
        "lr": 3e-6,
        "seed": 42,
    }


def grpo_spec(args: argparse.Namespace, model_dir: Path) -> dict:
    """The GRPO row's work, the default recipe's iteration: k = 4 answers to each of 4 prompts
    of reward_data/prompts (16 completions) in optimizer steps of 8, 48 new tokens, T 0.7,
    kl_coef 0.1, LoRA lr 5e-4."""
    lines = (ROOT / "reward_data/prompts/train.jsonl").read_text().splitlines()
    return {
        "model": str(model_dir),
        "prompts": [json.loads(x)["prompt"] for x in lines if x.strip()],
        "k": 4,
        "batch": 16,
        "mini_batch": 8,
        "steps": 1 + args.iterations,  # the summary leaves the first (warm-up) one out
        "max_prompt_length": 128,
        "max_new_tokens": 8 if args.quick else 48,
        "temperature": 0.7,
        "beta": 0.1,
        "lr": 5e-4,
        "seed": 42,
    }


def dpo_spec(args: argparse.Namespace, model_dir: Path) -> dict:
    """The DPO row's work: the 4-way rankings of reward_data/, `--dpo-rankings` per step, as
    the smollm2-135m recipe trains (LoRA r 16, alpha 32, all linear layers; beta 0.1; max
    length 256)."""
    lines = (ROOT / "reward_data/rankings/train.jsonl").read_text().splitlines()
    steps = 1 + args.iterations  # the summary leaves the first (warm-up) one out
    rankings = [json.loads(x) for x in lines[: steps * args.dpo_rankings]]
    k = len(rankings[0]["responses"])
    return {
        "model": str(model_dir),
        "rankings": rankings,
        "rankings_per_step": args.dpo_rankings,
        "pairs": args.dpo_pairs,
        "pairs_per_step": args.dpo_rankings
        * (k * (k - 1) // 2 if args.dpo_pairs == "all" else k - 1),
        "steps": steps,
        "max_length": 256,
        "beta": 0.1,
        "lr": 5e-5,
        "lora_r": 16,
        "lora_alpha": 32,
        "seed": 42,
    }


# What each worker stage runs, from the command line and the prepared model.
WORKER_SPECS = {"rloo": rloo_spec, "dpo": dpo_spec, "grpo": grpo_spec}


def run_worker(
    stage: str,
    impl: str,
    pair: int,
    settings: dict,
    scratch: Path,
    args,
    variant: str | None = None,
) -> dict:
    """One process of bench/<stage>_workers.py (ours or TRL's) for one of the stage's set-ups
    (WORKER_VARIANTS, default the stage itself); its peak RSS from wait4."""
    variant = variant or stage
    name = f"{variant}-{impl}.{pair}"
    spec_path = scratch / f"{name}.spec.json"
    out_path = scratch / f"{name}.json"
    extra = {"lora": variant.endswith("-lora")} if stage in ("rloo", "grpo") else {}
    write_json(spec_path, {**settings, **extra, "impl": impl})
    cmd = [sys.executable, "-m", f"bench.{stage}_workers", "--spec", str(spec_path)]
    cmd += ["--out", str(out_path)]
    log(f"round {pair + 1}/{args.pairs}: {variant} {impl}")
    log_path = scratch / f"{name}.log"
    process = run_process(cmd, log_path, args.timeout)
    result = read_json(out_path) if process[0] == 0 and out_path.exists() else None
    return measured_row(f"{variant} {impl}", log_path, process, result, impl, variant, pair)


def measured_row(
    label: str,
    log_path: Path,
    process: tuple[int, float, float],
    result: dict | None,
    impl: str,
    stage: str,
    pair: int,
) -> dict:
    """A measured process's row, `process` being run_process's (rc, peak RSS, wall time); one
    log line says how it went."""
    rc, rss, wall = process
    if result is None:
        log(f"{label} failed (rc {rc}), see {log_path}")
    else:
        s = trainers.run_summary(result)
        log(f"{label}: {s['s_per_step']:.2f} s/step, peak RSS {rss / 1024:.2f} GB")
    row = {"impl": impl, "stage": stage, "pair": pair, "rc": rc, "peak_rss_mb": rss}
    return {**row, "wall_s": wall, "result": result}


def measure_limits(args: argparse.Namespace, scratch: Path, tag: str) -> dict | None:
    """Matmul peak and read bandwidth, in their own process (run before and after the rows)."""
    spec = {"matmul_n": 512 if args.quick else 2048, "repeats": 5 if args.quick else 10}
    spec["bandwidth_mib"] = 64 if args.quick else 1024
    write_json(scratch / "matmul.spec.json", spec)
    out = scratch / f"matmul-{tag}.json"
    cmd = [sys.executable, "-m", "bench.matmul", "--spec", str(scratch / "matmul.spec.json")]
    cmd += ["--out", str(out)]
    rc, _, _ = run_process(cmd, scratch / f"matmul-{tag}.log", args.timeout)
    if rc != 0:
        log(f"matmul failed (rc {rc}), see {scratch / f'matmul-{tag}.log'}")
        return None
    return read_json(out)


def best_limits(samples: list[dict | None]) -> dict | None:
    """The machine's limits: the best of the samples (a neighbour on a shared VM only ever
    slows a measurement down); every sample is kept alongside."""
    good = [x for x in samples if x]
    if not good:
        return None
    best = dict(good[0])
    for key in list(best):
        if key.endswith(("_gflops", "_gbs")):
            best[key] = max(x[key] for x in good)
    best["samples"] = good
    return best


def run_trainer(impl, stage, pair, prepared, model_dir, scratch, args) -> dict:
    """One SFT or reward-model epoch in its own process (ours: the CLI; TRL: its trainer)."""
    label = f"{impl}-{stage}"
    spec_path = scratch / f"{label}.{pair}.spec.json"
    out_path = scratch / f"{label}.{pair}.json"
    write_json(spec_path, trainers.trl_spec(stage, prepared, model_dir))
    cmd = trainers.command(impl, stage, prepared, pair, spec_path, out_path)
    log(f"round {pair + 1}/{args.pairs}: {label}")
    log_path = scratch / f"{label}.{pair}.log"
    process = run_process(cmd, log_path, args.timeout)
    ok = process[0] == 0
    result = trainers.load_result(impl, stage, prepared, pair, out_path) if ok else None
    trainers.clean_up(impl, stage, prepared, pair)  # saved models: ~0.5 GB each, not needed
    return measured_row(label, log_path, process, result, impl, stage, pair)


def notes(trl_result: dict | None) -> list[str]:
    out = [
        "TRL as shipped calls gc.collect() twice per iteration (column `gc` in the JSON), and "
        "empty_cache() several times (a no-op on CPU).",
        "Both take the policy's rollout log-probs from generate()'s logits. TRL's score phase "
        "runs 3 forwards (reference, value, reward) over the whole sequence; ours runs the "
        "critic, the reference with the LM head on the response positions only "
        "(logits_to_keep), and the reward model, which reads the text re-rendered through the "
        "chat template as the PPO stage does; ours-defaults takes the values from the hidden "
        "states generation computed (shared head), so it runs reference and reward only.",
        "TRL's PPO does not clip gradients; ours-parity runs with max_grad_norm off to match, "
        "ours-defaults with the recipe default (1.0).",
        "TRL runs with pad token <|endoftext|>: with SmolLM2's pad == eos it would treat every "
        "<|im_end|> inside the chat prompt as padding. Its shuffled dataloader is replaced by "
        "the fixed batch order ours uses, so both see identical batches.",
    ]
    if trl_result:
        opt = trl_result.get("optimizer_defaults", {})
        flags = ", ".join(f"{k}={opt[k]}" for k in ("fused", "foreach") if k in opt)
        out.append(
            f"TRL's optimizer: {trl_result.get('optimizer')} ({flags}); ours: torch AdamW "
            "(fused=True)."
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
