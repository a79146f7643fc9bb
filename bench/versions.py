"""The default recipe's GRPO iteration with this tree's code against another commit's, end to end.

Each variant runs the PPO stage (`python -m rlhf.cli ppo <recipe>`) for a few iterations in
a process of its own, from one run folder's `sft/` and `reward/` (linked into a fresh output
folder), and reads the seconds of each iteration from the `timing/iteration` its
metrics.jsonl logs. Variants: `base` (the commit's code in a git worktree, with the recipe as
that commit had it), `auto` and `off` (this tree, `accel: auto` and `accel: off`). They run
interleaved, round after round, so a busy neighbour hits them alike; the table gives each
one's median iteration (the first iteration of each run, its warm-up, left out) and its
mean answer length, since the work of an iteration grows with it.

    python -m bench.versions --base 266977a --from runs/smollm2-135m --out versions.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent
# Overrides both versions read alike: few iterations, a one-prompt final evaluation, and the
# current recipe's truncation penalty (an older recipe's would change the answers' lengths).
COMMON = ["ppo.eval_size=1", "eval.samples_per_prompt=1", "ppo.missing_eos_penalty=2.0"]
OURS = ["ppo.eval_every=1000000"]  # no judge curve inside the timed run


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(TREE), "worktree", "add", "--detach", str(where), commit],
        check=True,
        capture_output=True,
    )
    return where


def run_stage(code: Path, variant: str, args, out: Path) -> dict:
    """One PPO stage run with the code at `code`; its iterations' seconds and answer lengths."""
    out.mkdir(parents=True)
    for role in ("sft", "reward"):
        (out / role).symlink_to(args.from_dir.resolve() / role)
    cmd = [sys.executable, "-m", "rlhf.cli", "ppo", args.recipe, f"output_dir={out}"]
    cmd += [f"ppo.iterations={args.iterations}", f"seed={args.seed}", *COMMON]
    cmd += [] if variant == "base" else [*OURS, f"accel={variant}"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant}: exit {done.returncode}\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "timing/iteration" in r]
    return {
        "iteration_s": [r["timing/iteration"] for r in rows],
        "length_mean": statistics.mean(r["response/length_mean"] for r in rows),
    }


def summary(runs: list[dict]) -> dict:
    seconds = [s for run in runs for s in run["iteration_s"][1:]]
    return {
        "median_iteration_s": statistics.median(seconds),
        "runs_median_s": [statistics.median(run["iteration_s"][1:]) for run in runs],
        "length_mean": statistics.mean(run["length_mean"] for run in runs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        required=True,
        help="a run folder with sft/ and reward/ (e.g. runs/smollm2-135m)",
    )
    p.add_argument("--recipe", default="recipes/smollm2-135m.yaml")
    p.add_argument("--variants", default="base,auto,off")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        base = worktree(args.base, Path(tmp) / "base") if "base" in variants else None
        try:
            for r in range(args.rounds):
                for v in variants:
                    code = base if v == "base" else TREE
                    results[v].append(run_stage(code, v, args, Path(tmp) / f"{v}-{r}"))
                    last = results[v][-1]["iteration_s"][1:]
                    print(f"round {r} {v}: median {statistics.median(last):.2f}s", flush=True)
        finally:
            if base is not None:
                subprocess.run(
                    ["git", "-C", str(TREE), "worktree", "remove", "--force", str(base)],
                    check=False,
                )
    table = {v: summary(runs) for v, runs in results.items()}
    ref = table.get("base", next(iter(table.values())))["median_iteration_s"]
    for v, row in table.items():
        ratio = row["median_iteration_s"] / ref
        print(
            f"{v:>6}: median {row['median_iteration_s']:.2f}s ({ratio:.2f}x base), "
            f"answers {row['length_mean']:.1f} tokens"
        )
    args.out.write_text(
        json.dumps(
            {"args": {k: str(x) for k, x in vars(args).items()}, "summary": table, "runs": results},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
