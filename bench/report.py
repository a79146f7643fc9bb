"""Summaries of the raw runs: medians, min-max, per-pair ratios vs TRL, FLOP efficiency; files.

Writes <out>/<YYYY-MM-DD>-<host>.json (raw runs + summary) and appends a markdown section to
the RESULTS.md it is given. Nothing here measures: a number missing from the runs stays missing.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import decode
from bench.common import summarize
from bench.flops import Arch, generation_bound_s, ppo_flops

PHASES = (
    "total",
    "generate",
    "score",
    "reference",
    "reward",
    "update",
    "train_forward_and_loss",
    "backward",
    "optimizer",
    "gc",
    "other",
)
ROW_TITLES = {
    "ours-parity": "ours, parity (full FT, frozen reference copy, separate value model, fp32)",
    "trl": "TRL 1.12 PPOTrainer as shipped (fp32)",
    # precision "auto": bf16 autocast only where the CPU runs it natively; the title says which
    "ours-defaults": "ours, defaults (LoRA reference, shared value head, precision auto: {mp})",
}


def _measured(run: dict) -> list[dict]:
    result = run.get("result") or {}
    return result.get("iterations", [])[result.get("warmup", 0) :]


def run_medians(run: dict) -> dict[str, float]:
    """Per process: the median of each metric over its measured (post-warm-up) iterations."""
    iters = _measured(run)
    out: dict[str, float] = {}
    for key in (*PHASES, "prompt_len", "response_len", "response_tokens"):
        values = [it[key] for it in iters if it.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    if iters:
        out["response_tokens_per_s"] = statistics.median(
            it["response_tokens"] / it["total"] for it in iters
        )
        out["sequence_tokens_per_s"] = statistics.median(
            run["batch_size"] * (it["prompt_len"] + it["response_len"]) / it["total"]
            for it in iters
        )
    return out


def summarize_rows(runs: list[dict]) -> dict[str, Any]:
    """Per row: median/min/max across processes of the per-process medians, and peak RSS."""
    rows: dict[str, Any] = {}
    for name in dict.fromkeys(r["row"] for r in runs):
        ok = [r for r in runs if r["row"] == name and r["rc"] == 0 and _measured(r)]
        per_run = [run_medians(r) for r in ok]
        row: dict[str, Any] = {
            "title": ROW_TITLES.get(name, name),
            "runs_ok": len(ok),
            "runs_failed": sum(1 for r in runs if r["row"] == name) - len(ok),
            "peak_rss_mb": summarize([r["peak_rss_mb"] for r in ok]),
        }
        for key in per_run[0] if per_run else []:
            row[key] = summarize([m[key] for m in per_run if key in m])
        if ok:
            row["mixed_precision"] = ok[0]["result"].get("mixed_precision", "no")
            mp = {"no": "fp32", "bf16": "bf16 autocast"}.get(row["mixed_precision"], "?")
            row["title"] = row["title"].format(mp=mp)
        rows[name] = row
    return rows


def pair_ratios(runs: list[dict], baseline: str = "trl") -> dict[str, Any]:
    """Ratio row / baseline within each pair (same pair index), then summarised."""
    ratios: dict[str, Any] = {}
    pairs = sorted({r["pair"] for r in runs})
    for name in dict.fromkeys(r["row"] for r in runs):
        if name == baseline:
            continue
        per_pair: dict[str, list[float]] = {"seconds_per_iteration": [], "peak_rss": []}
        for p in pairs:
            a = [r for r in runs if r["row"] == name and r["pair"] == p and r["rc"] == 0]
            b = [r for r in runs if r["row"] == baseline and r["pair"] == p and r["rc"] == 0]
            if not (a and b and _measured(a[0]) and _measured(b[0])):
                continue
            ma, mb = run_medians(a[0]), run_medians(b[0])
            per_pair["seconds_per_iteration"].append(ma["total"] / mb["total"])
            per_pair["peak_rss"].append(a[0]["peak_rss_mb"] / b[0]["peak_rss_mb"])
        ratios[name] = {
            k: {"per_pair": v, **(summarize(v) or {})} for k, v in per_pair.items() if v
        }
    return ratios


def efficiency(rows: dict, model_dir: str, settings: dict, machine: dict | None) -> dict:
    """FLOPs per phase, achieved GFLOP/s and the fraction of this run's matmul peak."""
    if not machine:
        return {}
    arch = Arch.from_config(model_dir)
    out = {}
    for name, row in rows.items():
        if not row.get("total"):
            continue
        variant = "trl" if name == "trl" else name.removeprefix("ours-")
        P, R = row["prompt_len"]["median"], row["response_len"]["median"]
        flops = ppo_flops(arch, variant, settings["batch_size"], P, R, settings["ppo_epochs"])
        bf16 = row.get("mixed_precision") == "bf16"
        peak = machine["bf16_gflops" if bf16 else "fp32_gflops"]
        phases = {}
        for phase, f in flops.items():
            if phase not in row:  # a split this implementation's worker does not time
                continue
            seconds = row[phase]["median"]
            achieved = f / seconds / 1e9 if seconds else None
            phases[phase] = {
                "gflop": f / 1e9,
                "seconds": seconds,
                "gflops": achieved,
                "fraction_of_peak": achieved / peak if achieved else None,
            }
        # A bf16 row stores its frozen weights and KV cache in bf16 (models.store_frozen_linears)
        bound = generation_bound_s(
            arch, settings["batch_size"], P, R, machine["read_bandwidth_gbs"], 2 if bf16 else 4
        )
        out[name] = {
            "peak_used": "bf16" if bf16 else "fp32",
            "peak_gflops": peak,
            "phases": phases,
            "generation_bandwidth_bound_s": bound,
            "generation_vs_bound": row["generate"]["median"] / bound,
        }
    return out


def _fmt(s: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if not s:
        return "-"
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: the header, its rule, then one line a row."""
    return [table_row(header), table_row(["---"] * len(header)), *map(table_row, rows)]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def measured_trl_version(section: dict) -> str:
    """The TRL version the section's TRL processes reported ("?" when none finished)."""
    runs = section["runs"]
    return next((r["result"].get("trl") for r in runs if r["impl"] == "trl" and r["result"]), "?")


def ratio_cells(ratio: dict, keys: tuple[str, ...]) -> list[str]:
    """Ours / TRL for each key ("-" on TRL's own rows, which pass {})."""
    return [_fmt(ratio.get(key)) for key in keys]


def markdown(report: dict) -> str:
    s, m = report["settings"], report.get("machine_limits")
    lines = [
        f"## {report['date']} {report['host']}{' (quick smoke test)' if s.get('quick') else ''}",
        "",
        f"Machine: {report['machine']['description']}. "
        + (
            f"Matmul peak {m['matmul_n']}x{m['matmul_n']}: fp32 {m['fp32_gflops']:.0f}, "
            f"bf16 {m['bf16_gflops']:.0f} GFLOP/s; read bandwidth {m['read_bandwidth_gbs']:.1f} "
            f"GB/s (best of {len(m.get('samples', [m]))} measurements: before and after the rows)."
            if m
            else "Matmul peak not measured in this run."
        ),
    ]
    if report["rows"]:  # the PPO rows ran
        lines += ["", *ppo_rows_markdown(report)]
    else:
        lines += ["", "PPO rows (parity, trl, defaults): not measured in this run."]
    lines += ["", *trainer_markdown(report.get("sft_reward")), ""]
    lines += [*rloo_markdown(report.get("rloo")), ""]
    lines += [*dpo_markdown(report.get("dpo")), ""]
    lines += [*grpo_markdown(report.get("grpo")), ""]
    lines += [*decode.markdown(report.get("decode")), ""]
    lines += [f"End to end (`make sft reward ppo`): {report['e2e']['summary']}.", ""]
    for note in report.get("notes", []) if report["rows"] else []:  # notes on the PPO rows
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n\n"


def ppo_rows_markdown(report: dict) -> list[str]:
    """The PPO rows: seconds and peak RSS per iteration, and matmul efficiency per phase."""
    s = report["settings"]
    lines = [
        f"Work: {Path(s['model']).name} as policy, reference, reward and value model; "
        f"{s['n_prompts']} prompts from {Path(s['prompts_file']).name} (chat template, left "
        f"padding, <= {s['max_prompt_length']} tokens, fixed batch order); batch "
        f"{s['batch_size']}, {s['max_new_tokens']} new tokens, {s['ppo_epochs']} PPO epochs, "
        f"{s['num_mini_batches']} minibatch, temperature {s['temperature']}. Each process: "
        f"{s['warmup']} warm-up + {s['iterations']} measured iterations; {s['pairs']} "
        "interleaved rounds. Cells: median (min-max) across processes of each process's median.",
        "",
    ]
    header = ["row", "s / iteration", "generate", "score", "update", "response tok/s"]
    header += ["peak RSS GB", "ratio vs TRL: time", "ratio vs TRL: RSS"]
    lines += table_lines(header, [])
    for name, row in report["rows"].items():
        cells = [row["title"], *(_fmt(row.get(k)) for k in ("total", "generate", "score"))]
        cells += [_fmt(row.get("update")), _fmt(row.get("response_tokens_per_s"), 1)]
        cells.append(_fmt(row.get("peak_rss_mb"), 2, 1 / 1024))
        ratio = report["ratios"].get(name, {})
        lines.append(table_row(cells + ratio_cells(ratio, ("seconds_per_iteration", "peak_rss"))))
        if row["runs_failed"]:
            lines.append(f"| ({name}: {row['runs_failed']} failed process(es)) | | | | | | | | |")
    if report.get("efficiency"):
        lines += ["", *table_lines(["row", "phase", "GFLOP", "GFLOP/s", "of matmul peak"], [])]
        for name, eff in report["efficiency"].items():
            for phase, p in eff["phases"].items():
                frac = p["fraction_of_peak"]
                lines.append(
                    f"| {name} | {phase} | {p['gflop']:.0f} | {p['gflops']:.1f} "
                    f"| {frac:.0%} of {eff['peak_used']} |"
                )
            lines.append(
                f"| {name} | generate vs bandwidth bound | | | "
                f"{eff['generation_vs_bound']:.1f}x the {eff['generation_bandwidth_bound_s']:.2f}"
                " s bound |"
            )
    return lines


def comparison_markdown(
    section: dict | None,
    missing: str,
    intro: Callable[[dict, str], str],
    header: list[str],
    cells: Callable[[dict, dict], list[str]],
) -> list[str]:
    """A section that compares ours with TRL: "`missing`: not measured" when it did not run,
    else intro(settings, TRL's version), a blank line and the table, cells(section, row) a row."""
    if not section or not section["rows"]:
        return [f"{missing}: not measured in this run."]
    rows = [cells(section, row) for row in section["rows"]]
    text = intro(section["settings"], measured_trl_version(section))
    return [text, "", *table_lines(header, rows)]


def ours_ratio(section: dict, row: dict) -> dict:
    """The ratios of our row of a set-up (stage) to TRL's; {} for TRL's row."""
    return section["ratios"].get(row["stage"], {}) if row["impl"] == "ours" else {}


RATIOS = ["ratio vs TRL: time", "ratio vs TRL: RSS"]  # the last columns: ours / TRL's


def trainer_markdown(section: dict | None) -> list[str]:
    """SFT and reward-model epochs vs TRL's SFTTrainer / RewardTrainer."""
    header = ["stage", "impl", "s / step", "tokens / s", "epoch s", "peak RSS GB", *RATIOS]
    missing = "SFT / reward-model throughput vs TRL's trainers"
    return comparison_markdown(section, missing, trainer_intro, header, trainer_cells)


def trainer_intro(st: dict, trl_version: str) -> str:
    return (
        f"SFT and reward model vs TRL {trl_version} SFTTrainer / RewardTrainer, identical work: "
        f"one epoch over {st['rows']['sft']} single-turn conversations (loss on the answer) / "
        f"{st['rows']['reward']} best-vs-worst pairs from reward_data/, batch {st['batch_size']} "
        f"(pairs: {2 * st['batch_size']} sequences), max length {st['max_length']}, fp32, no "
        "gradient checkpointing, constant lr, clip 1.0. s/step: median over the steps after "
        "the first; tokens/s: the epoch's real (unpadded) tokens over the summed step times."
    )


def trainer_cells(section: dict, row: dict) -> list[str]:
    cells = [row["stage"], row["impl"], _fmt(row["s_per_step"])]
    cells += [_fmt(row["tokens_per_s"], 0), _fmt(row["epoch_s"], 1), _fmt(row["peak_rss_gb"])]
    return cells + ratio_cells(ours_ratio(section, row), ("s_per_step", "peak_rss"))


def rloo_markdown(section: dict | None) -> list[str]:
    """ppo.estimator=rloo vs TRL's RLOOTrainer: s/iteration and peak RSS, ours / TRL, for the
    full fine-tuning fp32 set-up (`rloo`) and the LoRA bf16 one (`rloo-lora`)."""
    header = ["set-up", "impl", "s / iteration", "peak RSS GB", *RATIOS]
    missing = "RLOO vs TRL's RLOOTrainer"
    return comparison_markdown(section, missing, rloo_intro, header, rloo_cells)


def rloo_intro(st: dict, trl_version: str) -> str:
    prompts = st["batch"] // st["k"]
    return (
        f"RLOO (ppo.estimator=rloo) vs TRL RLOOTrainer, identical work: k={st['k']} answers to "
        f"each of {prompts} prompts per iteration ({st['batch']} completions), "
        f"{st['max_new_tokens']} new tokens, one pass, beta {st['beta']}. `rloo`: full "
        "fine-tuning, fp32, a reference copy on both sides; `rloo-lora`: LoRA r=16 on all linear "
        "layers, bf16 where `precision: auto` picks it, the reference = the adapter disabled. "
        "s / iteration: median over the iterations after the first (warm-up)."
    )


def rloo_cells(section: dict, row: dict) -> list[str]:
    cells = [row["stage"], row["impl"], _fmt(row["s_per_step"]), _fmt(row["peak_rss_gb"])]
    return cells + ratio_cells(ours_ratio(section, row), ("s_per_step", "peak_rss"))


def grpo_markdown(section: dict | None) -> list[str]:
    """ppo.estimator=grpo (the default recipe's set-up) vs TRL's GRPOTrainer: s/iteration and
    peak RSS, ours / TRL."""
    header = ["set-up", "impl", "s / iteration", "peak RSS GB", *RATIOS]
    missing = "GRPO vs TRL's GRPOTrainer"
    return comparison_markdown(section, missing, grpo_intro, header, rloo_cells)


def grpo_intro(st: dict, trl_version: str) -> str:
    prompts = st["batch"] // st["k"]
    return (
        f"GRPO (ppo.estimator=grpo, the default recipe's set-up) vs TRL {trl_version} "
        f"GRPOTrainer (generate, no vLLM), identical work: k={st['k']} answers to each of "
        f"{prompts} prompts of reward_data/prompts per iteration ({st['batch']} completions, "
        f"optimizer steps of {st['mini_batch']}), {st['max_new_tokens']} new tokens, one pass, "
        f"beta {st['beta']} (k3 in the loss), lr {st['lr']}; LoRA r=16 on all linear layers, "
        "bf16 where `precision: auto` picks it, the reference = the adapter disabled. "
        "s / iteration: median over the iterations after the first (warm-up)."
    )


def dpo_markdown(section: dict | None) -> list[str]:
    """One DPO optimizer step: TRL's DPOTrainer vs our dpo stage's step."""
    header = ["impl", "s / step", "CPU s / step", "tokens / step", "peak RSS GB"]
    header += ["first-step loss", "ratio vs TRL: time", "ratio vs TRL: CPU time"]
    header += ["ratio vs TRL: RSS"]
    missing = "DPO step vs TRL's DPOTrainer"
    return comparison_markdown(section, missing, dpo_intro, header, dpo_cells)


def dpo_intro(st: dict, trl_version: str) -> str:
    return (
        f"DPO step, TRL {trl_version} DPOTrainer vs ours (rlhf/stages/dpo.py's step: the same "
        "sigmoid loss on the reward stage's batching, each ranking's shared prefix once and each "
        f"response once per model), identical work: {st['rankings_per_step']} 4-way rankings "
        f"per optimizer step -> {st['pairs_per_step']} pairs ({st['pairs']}), LoRA r "
        f"{st['lora_r']} alpha {st['lora_alpha']} on all linear layers, reference = adapter "
        f"disabled, fp32, beta {st['beta']}, constant lr {st['lr']}, clip 1.0. s / step: median "
        "over the steps after the first (warm-up), wall and the process's CPU seconds (all its "
        "threads; on a shared machine the wall time also counts what others ran). Tokens / "
        "step: what each model's forward reads (TRL: the two whole sequences of every pair; "
        "ours: each prefix once, then each response's rest)."
    )


def dpo_cells(section: dict, row: dict) -> list[str]:
    first = next(r["result"] for r in section["runs"] if r["impl"] == row["impl"] and r["result"])
    loss = f"{first['losses'][0]:.4f}" if first.get("losses") else "-"
    cells = [row["impl"], _fmt(row["s_per_step"]), _fmt(row["cpu_s_per_step"])]
    cells += [f"{row['tokens'] / row['steps']:.0f}", _fmt(row["peak_rss_gb"]), loss]
    ratio = section["ratios"].get("dpo", {}) if row["impl"] == "ours" else {}
    return cells + ratio_cells(ratio, ("s_per_step", "cpu_s_per_step", "peak_rss"))


def write(report: dict, out_dir: Path, results_md: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{report['date']}-{report['host']}.json"
    n = 1
    while path.exists():  # several runs on one day: keep them all
        n += 1
        path = out_dir / f"{report['date']}-{report['host']}-{n}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    results_md.parent.mkdir(parents=True, exist_ok=True)
    if not results_md.exists():
        results_md.write_text("# Benchmark results\n\nAppended by `make bench` (bench/run.py).\n\n")
    with results_md.open("a") as f:
        f.write(markdown(report))
    return path
