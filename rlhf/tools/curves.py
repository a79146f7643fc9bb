"""Training curves: PNG dashboards, health alarms and an HTML report from run directories.

  rlhf curves RUN_DIR [RUN_DIR ...] [--out DIR]      any stage folders; same stages overlay
  rlhf curves runs/a [runs/b ...]                    pipeline folders: their stage folders
  rlhf curves --recipe RECIPE [key=value ...]        <output_dir>/{sft,reward,ppo,dpo}

Reads only the run-directory contract (metrics.jsonl, samples.jsonl, eval.json, recipe.yaml,
run.json), never the training code, so it works on old runs and on runs still in progress.
Writes <out>/<stage>.png per stage, overview.png for a whole pipeline, and report.html.

The health alarms are pure functions over metric series (check_kl, check_entropy, ...), so
they are easy to test and to reuse from a notebook.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import yaml

from rlhf.infra.errors import UserError
from rlhf.tools.plotting import pyplot, save_figure

STAGES = ("sft", "reward", "ppo", "dpo")
PIPELINE = ("sft", "reward", "ppo")  # the stages the overview page needs

# One dashboard panel = (title, patterns). Patterns are exact names or fnmatch globs; a panel
# appears only when some series matches, so the same table serves old and new runs.
PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [
        ("loss", ["train/loss", "eval/loss"]),
        ("eval perplexity", ["eval/perplexity"]),
        ("learning rate", ["lr"]),
        ("grad norm", ["train/grad_norm"]),
    ],
    "reward": [
        ("loss", ["train/loss", "eval/loss", "*/loss"]),
        ("accuracy", ["train/accuracy", "eval/accuracy", "*/accuracy"]),
        ("margin", ["train/mean_margin", "eval/mean_margin", "*/mean_margin"]),
        ("Kendall tau", ["*/kendall_tau"]),
        ("learning rate", ["lr"]),
        ("grad norm", ["train/grad_norm"]),
    ],
    "ppo": [
        ("score (reward model)", ["objective/score"]),
        ("score sources", ["objective/score/*"]),
        (
            "rewards",
            ["objective/score_normalized", "objective/rlhf_reward", "objective/non_score_reward"],
        ),
        ("KL to reference", ["objective/kl"]),
        ("KL coefficient", ["kl_coef"]),
        ("entropy", ["objective/entropy"]),
        ("response length", ["response/length_mean"]),
        ("EOS rate", ["response/eos_rate"]),
        ("policy", ["policy/clipfrac", "policy/approxkl"]),
        ("value loss", ["value/loss"]),
        ("explained variance", ["value/explained_variance"]),
        (
            "judge curve: win rate over SFT; KL",
            ["eval/rm_win_rate", "eval/judge_*", "judge/*", "eval/kl"],
        ),
        ("timing (s)", ["timing/*"]),
        ("tokens / second", ["tokens_per_second"]),
    ],
    # DPO (TRL's metric names in our key style; rewards are the implicit beta * log-ratios)
    "dpo": [
        ("loss", ["train/loss", "eval/loss"]),
        (
            "preference accuracy",
            ["train/rewards/accuracies", "eval/rewards/accuracies", "eval/preference/accuracy"],
        ),
        ("reward margin", ["train/rewards/margins", "eval/rewards/margins"]),
        ("implicit rewards", ["*/rewards/chosen", "*/rewards/rejected"]),
        ("log-probs", ["train/logps/*", "eval/logps/*"]),
        ("entropy", ["train/entropy", "eval/entropy"]),
        ("learning rate", ["lr"]),
        ("grad norm", ["train/grad_norm"]),
    ],
}

# The pipeline overview: the one or two curves per stage that say whether it worked.
OVERVIEW: list[tuple[str, str, list[str]]] = [
    ("sft", "SFT: loss", ["train/loss", "eval/loss"]),
    ("sft", "SFT: eval perplexity", ["eval/perplexity"]),
    ("reward", "reward: accuracy", ["train/accuracy", "eval/accuracy", "*/accuracy"]),
    ("ppo", "PPO: score", ["objective/score"]),
    ("ppo", "PPO: KL to reference", ["objective/kl"]),
    ("ppo", "PPO: response length", ["response/length_mean"]),
]

MIN_POINTS_TO_SMOOTH = 10

# Series that are bookkeeping, not curves.
SKIP = {"stage", "step", "time", "epoch"}


# ------------------------------------------------------------------------------ reading runs


@dataclass
class Series:
    steps: list[float]
    values: list[float]


@dataclass
class Run:
    path: Path
    label: str
    stage: str
    series: dict[str, Series]
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_text: str | None = None
    eval: dict[str, Any] | None = None
    info: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file. A run that died mid-write leaves a torn last line: skip it
    rather than refuse to plot everything before it."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return [row for row in map(parse_json, lines) if isinstance(row, dict)]


def series_from_rows(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """metrics.jsonl rows -> one step-sorted series per numeric key.

    A resumed run logs the steps after its last checkpoint a second time; the later row wins,
    so the curve shows what the finished run actually did.
    """
    by_key: dict[str, dict[float, float]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            by_key.setdefault(key, {})[float(step)] = float(value)
    out = {}
    for key, points in by_key.items():
        steps = sorted(points)
        out[key] = Series(steps, [points[s] for s in steps])
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    data = parse_json(path.read_text()) if path.is_file() else None
    return data if isinstance(data, dict) else None


def pipeline_order(stages: Iterable[str]) -> list[str]:
    """sft, reward, ppo first (those present), then any other stage names alphabetically."""
    stages = set(stages)
    return [s for s in STAGES if s in stages] + sorted(stages - set(STAGES))


RUN_FILES = ("metrics.jsonl", "run.json", "recipe.yaml", "eval.json")


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in RUN_FILES)


def pipeline_stage_dirs(path: Path) -> list[Path]:
    """The run folders inside a pipeline folder (a recipe's output_dir), pipeline order first."""
    if not path.is_dir() or is_run_dir(path):
        return []
    found = {p.name: p for p in path.iterdir() if is_run_dir(p)}
    return [found[name] for name in pipeline_order(found)]


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders as given; a pipeline folder (runs/smollm2-135m) becomes its stage folders,
    so that several pipelines overlay stage by stage."""
    out: list[Path] = []
    for path in map(Path, paths):
        out.extend(pipeline_stage_dirs(path) or [path])
    return out


def load_run(path: str | Path, label: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not is_run_dir(path):
        raise UserError(
            f"{path}: not a run directory (no metrics.jsonl, run.json or recipe.yaml) nor a "
            "pipeline folder with sft, reward or ppo run folders inside"
        )
    rows = read_jsonl(path / "metrics.jsonl")
    info = _read_json(path / "run.json")
    recipe_text = (path / "recipe.yaml").read_text() if (path / "recipe.yaml").is_file() else None
    try:
        recipe = yaml.safe_load(recipe_text or "") or {}
    except yaml.YAMLError:
        recipe = {}
    # The stage is whatever the run says it was; the folder name is only a fallback.
    stage = next((r["stage"] for r in rows if isinstance(r.get("stage"), str)), None)
    stage = stage or (info or {}).get("stage") or path.name
    return Run(
        path=path,
        label=label or str(path),
        stage=str(stage),
        series=series_from_rows(rows),
        recipe=recipe if isinstance(recipe, dict) else {},
        recipe_text=recipe_text,
        eval=_read_json(path / "eval.json"),
        info=info,
        samples=read_jsonl(path / "samples.jsonl"),
    )


def dotted_get(mapping: dict[str, Any], dotted: str) -> Any:
    """mapping["a"]["b"] for "a.b"; None where a level is missing."""
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


# ---------------------------------------------------------------------------- health alarms


@dataclass
class Alarm:
    name: str  # kl_high | entropy_collapse | length_explosion | eos_falling | judge_disagrees
    # | critic_not_learning | win_rate_inconclusive
    metric: str  # the series whose panel shows it
    message: str
    spans: list[tuple[float, float]]  # (first step, last step) of each flagged stretch
    run: str = ""


def flagged_spans(steps: Sequence[float], flags: Sequence[bool]) -> list[tuple[float, float]]:
    """Contiguous flagged points -> [(first step, last step), ...]."""
    spans: list[tuple[float, float]] = []
    start = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            spans.append((steps[start], steps[i - 1]))
            start = None
    return spans


def alarm_if(
    name: str,
    metric: str,
    steps: Sequence[float],
    flags: Sequence[bool],
    message: Callable[[float], str],
) -> Alarm | None:
    """An Alarm over the flagged stretches, `message` given the first flagged step; None when
    nothing is flagged."""
    if not any(flags):
        return None
    first = next(s for s, f in zip(steps, flags) if f)
    return Alarm(name, metric, message(first), flagged_spans(steps, flags))


# Where the KL and length alarms fire: KL above KL_FACTOR x the adaptive controller's target,
# or without one above KL_MEDIAN_FACTOR x the run's median; a mean response length above
# LENGTH_FACTOR x its first value, or at max_new_tokens for LENGTH_PATIENCE logged steps.
KL_FACTOR = 2.0
KL_MEDIAN_FACTOR = 3.0
LENGTH_FACTOR = 3.0
LENGTH_PATIENCE = 3


def check_kl(
    steps: Sequence[float], kl: Sequence[float], target: float | None = None
) -> Alarm | None:
    """KL far above the adaptive controller's target (> KL_FACTOR x target). Without a target,
    far above the run's own typical KL (> KL_MEDIAN_FACTOR x its median)."""
    if not kl:
        return None
    if target is not None and target > 0:
        limit, why = KL_FACTOR * target, f"{KL_FACTOR:g}x the target {target:g}"
    else:
        median = statistics.median(kl)
        if len(kl) < 3 or median <= 0:
            return None  # too few points, or a KL still around 0: no baseline to compare to
        limit, why = KL_MEDIAN_FACTOR * median, f"{KL_MEDIAN_FACTOR:g}x its median {median:.3g}"
    return alarm_if(
        "kl_high",
        "objective/kl",
        steps,
        [v > limit for v in kl],
        lambda first: (
            f"KL far above target: reached {max(kl):.3g} (limit {limit:.3g} = {why}) "
            f"from step {first:g}; the policy is drifting from the reference "
            "(raise kl_coef or lower the learning rate)"
        ),
    )


def check_entropy(
    steps: Sequence[float],
    entropy: Sequence[float],
    fraction: float = 0.2,
    metric: str = "objective/entropy",
) -> Alarm | None:
    """Entropy collapse: below `fraction` of its first value."""
    if len(entropy) < 2 or entropy[0] <= 0:
        return None
    return alarm_if(
        "entropy_collapse",
        metric,
        steps,
        [v < fraction * entropy[0] for v in entropy],
        lambda first: (
            f"entropy collapse: {metric} fell to {min(entropy):.3g}, below "
            f"{fraction:.0%} of its first value {entropy[0]:.3g}, from step {first:g}; the policy "
            "is becoming deterministic (mode collapse)"
        ),
    )


def check_length(
    steps: Sequence[float], length: Sequence[float], max_new_tokens: int | None = None
) -> Alarm | None:
    """Response length exploding: > LENGTH_FACTOR x its first value, or at max_new_tokens (mean
    length >= 95% of it) for LENGTH_PATIENCE consecutive logged steps (all if fewer)."""
    if not length:
        return None
    grown = [length[0] > 0 and v > LENGTH_FACTOR * length[0] for v in length]
    need = min(LENGTH_PATIENCE, len(length))
    capped = [False] * len(length)
    run = 0
    for i, v in enumerate(length):
        run = run + 1 if max_new_tokens and v >= 0.95 * max_new_tokens else 0
        if run >= need:
            capped[i - run + 1 : i + 1] = [True] * run  # the whole stretch, not just its tail
    if not any(grown) and not any(capped):
        return None
    if any(capped):
        what = (
            f"responses hit max_new_tokens ({max_new_tokens}) for {need}+ consecutive steps "
            f"from step {steps[capped.index(True)]:g}: they are being truncated"
        )
    else:
        what = (
            f"response length grew to {max(length):.3g}, over {LENGTH_FACTOR:g}x its first "
            f"value {length[0]:.3g}, from step {steps[grown.index(True)]:g}"
        )
    flags = [g or c for g, c in zip(grown, capped)]
    message = (
        f"response length exploding: {what} (the policy may be exploiting a length bias "
        "of the reward model)"
    )
    return Alarm("length_explosion", "response/length_mean", message, flagged_spans(steps, flags))


def check_eos(steps: Sequence[float], eos: Sequence[float], threshold: float = 0.5) -> Alarm | None:
    """EOS rate falling: below `threshold` after having been at or above it."""
    best_before = accumulate(eos, max, initial=-math.inf)
    return alarm_if(
        "eos_falling",
        "response/eos_rate",
        steps,
        [v < threshold <= best for v, best in zip(eos, best_before)],
        lambda first: (
            f"EOS rate falling: {min(eos):.0%} of responses end with EOS (was "
            f"{max(eos):.0%}) from step {first:g}; responses run into max_new_tokens "
            "(consider ppo.missing_eos_penalty)"
        ),
    )


def trend(steps: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares change over the run in units of the series' own spread: about +3.5 for a
    clean rise, around 0 for noise. Comparable between series of different scales."""
    if len(set(steps)) < 2 or statistics.pstdev(values) == 0:
        return 0.0
    slope = statistics.linear_regression(steps, values).slope
    return slope * (max(steps) - min(steps)) / statistics.pstdev(values)


def check_judge(
    score_steps: Sequence[float],
    score: Sequence[float],
    judge_steps: Sequence[float],
    judge: Sequence[float],
    judge_name: str = "judge",
    min_trend: float = 0.5,
    score_name: str = "objective/score",
) -> Alarm | None:
    """The trained reward model's score (or win rate) rises while a held-out judge falls:
    reward hacking."""
    if len(score) < 3 or len(judge) < 3:
        return None
    score_trend, judge_trend = trend(score_steps, score), trend(judge_steps, judge)
    if not (score_trend > min_trend and judge_trend < -min_trend):
        return None
    peak = judge_steps[max(range(len(judge)), key=lambda i: judge[i])]
    return Alarm(
        "judge_disagrees",
        judge_name,
        f"score rising while the held-out judge disagrees: {score_name} went "
        f"{score[0]:.3g} -> {score[-1]:.3g} but {judge_name} {judge[0]:.3g} -> {judge[-1]:.3g}; "
        "the policy is probably exploiting the reward model",
        [(peak, judge_steps[-1])],
    )


def reward_hacking_alarms(series: dict[str, Series]) -> list[Alarm]:
    """check_judge for each judge series (eval/judge_*, judge/*) against the trained reward
    model's win rate over SFT on the same prompts (eval/rm_win_rate, the judge curve), else
    against its training score (objective/score)."""
    score_name = "eval/rm_win_rate" if "eval/rm_win_rate" in series else "objective/score"
    score = series.get(score_name)
    if score is None:
        return []
    alarms = [
        check_judge(*astuple(score), *astuple(series[name]), name, score_name=score_name)
        for name in match_series(list(series), ["eval/judge_*", "judge/*"])
    ]
    return [a for a in alarms if a is not None]


def check_critic(steps: Sequence[float], explained_variance: Sequence[float]) -> Alarm | None:
    """A critic that never learns: explained variance at or below 0 on average over the last
    half of the run (a value function no better than a constant; its GAE baseline is noise)."""
    if len(explained_variance) < 2:
        return None
    half = len(explained_variance) // 2
    tail, tail_steps = explained_variance[half:], steps[half:]
    mean = sum(tail) / len(tail)
    if mean > 0:
        return None
    return Alarm(
        "critic_not_learning",
        "value/explained_variance",
        f"critic not learning: value/explained_variance averages {mean:.3g} (<= 0) over the "
        f"last half of the run (steps {tail_steps[0]:g}-{tail_steps[-1]:g}); the GAE baseline "
        "is noise (try ppo.critic_warmup_iterations, or a critic-free ppo.estimator)",
        [(tail_steps[0], tail_steps[-1])],
    )


def check_win_rate(results: dict[str, Any] | None) -> list[Alarm]:
    """End-of-run win rate over the SFT policy whose 95% interval includes 0.5: the judge
    cannot tell the two policies apart. eval.json's `win_rate_ci95` (the trained reward
    model) and each `judges[name]["win_rate_ci95"]`."""
    results = results or {}
    judges = results.get("judges") if isinstance(results.get("judges"), dict) else {}
    entries = [("the trained reward model", results)] + [
        (f"judge {name}", entry)
        for name, entry in sorted(judges.items())
        if isinstance(entry, dict)
    ]
    out = []
    for who, entry in entries:
        rate, ci = entry.get("win_rate"), entry.get("win_rate_ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and ci[0] <= 0.5 <= ci[1]:
            shown = f"{float(rate):.2f} " if isinstance(rate, (int, float)) else ""
            message = (
                f"win rate inconclusive under {who}: {shown}[{ci[0]:.2f}, {ci[1]:.2f}] includes "
                "0.5; this judge cannot tell the PPO policy from the SFT policy"
            )
            out.append(Alarm("win_rate_inconclusive", "eval/win_rate", message, []))
    return out


def check_run(run: Run) -> list[Alarm]:
    """Every alarm whose series the run logged; thresholds come from its recipe.yaml."""
    s = run.series
    alarms: list[Alarm | None] = []
    if "objective/kl" in s:
        # Only the adaptive controller has a target; a fixed kl_coef falls back to the median.
        target = dotted_get(run.recipe, "ppo.adaptive_kl.target")
        target = float(target) if isinstance(target, (int, float)) else None
        alarms.append(check_kl(*astuple(s["objective/kl"]), target))
    # Per-token entropy when logged: the per-sequence sum also falls when responses merely get
    # shorter, which the length alarm already covers.
    entropy = next((n for n in ("objective/entropy_per_token", "objective/entropy") if n in s), "")
    if entropy:
        alarm = check_entropy(*astuple(s[entropy]), metric=entropy)
        if alarm is not None and "objective/entropy" in s:
            alarm.metric = "objective/entropy"  # the panel that shows it
        alarms.append(alarm)
    if "response/length_mean" in s:
        max_new = dotted_get(run.recipe, "ppo.max_new_tokens")
        alarms.append(check_length(*astuple(s["response/length_mean"]), max_new or None))
    if "response/eos_rate" in s:
        alarms.append(check_eos(*astuple(s["response/eos_rate"])))
    alarms.extend(reward_hacking_alarms(s))
    if "value/explained_variance" in s:  # only estimators with a critic log it
        alarms.append(check_critic(*astuple(s["value/explained_variance"])))
    alarms.extend(check_win_rate(run.eval))
    out = [a for a in alarms if a is not None]
    for alarm in out:
        alarm.run = run.label
    return out


# -------------------------------------------------------------------------------- plotting


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style smoothing, debiased so the first points are not pulled towards 0."""
    out, last = [], 0.0
    for n, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**n) if weight > 0 else v)
    return out


def match_series(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Names matching the patterns, in pattern order (train before eval before extras).
    `*_std` series are bands around their mean, never curves of their own."""
    out: list[str] = []
    for pattern in patterns:
        for name in sorted(names):
            if name.endswith("_std") or name in out:
                continue
            if fnmatch.fnmatch(name, pattern):
                out.append(name)
    return out


def panels_for(stage: str, runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """The panels for a stage's dashboard, only those with data."""
    names = sorted({name for run in runs for name in run.series})
    if stage in PANELS:
        spec = PANELS[stage]
    else:
        # A stage we do not know: one panel per metric prefix ("train/...", "eval/...").
        prefixes = sorted({n.split("/")[0] for n in names if not n.endswith("_std")})
        spec = [(p, [p, f"{p}/*"]) for p in prefixes]
    return [(title, found) for title, patterns in spec if (found := match_series(names, patterns))]


SECOND_AXIS = ("eval/kl",)  # drawn on a right-hand axis when it shares a panel
LINE_STYLES = ["-", "--", ":", "-."]  # one per series when several runs share a panel


def draw_panel(
    ax: Any,
    title: str,
    names: Sequence[str],
    runs: Sequence[Run],
    smoothing: float,
    alarms: Sequence[Alarm] = (),
    guides: Sequence[tuple[str, float, str]] = (),
) -> None:
    """Each series smoothed (solid) over its raw values (faint). One run: a colour per series;
    several runs: a colour per run and a line style per series, so runs stay comparable."""
    several = len(runs) > 1
    twin = ax.twinx() if any(n in SECOND_AXIS for n in names) and len(names) > 1 else None
    left: list[float] = []  # the values drawn on the left-hand axis
    for r, run in enumerate(runs):
        for k, name in enumerate(names):
            ser = run.series.get(name)
            if ser is None or not ser.values:
                continue
            on = twin if twin is not None and name in SECOND_AXIS else ax
            left += ser.values if on is ax else []
            color, style, label = series_look(r, k, run.label, name, several, len(names))
            std = run.series.get(f"{name}_std")
            draw_series(on, ser, std, smoothing, color, style, label)
    # Losses of a random model start orders of magnitude above where they end.
    if left and min(left) > 0 and max(left) / min(left) > 1e3:
        ax.set_yscale("log")
    draw_guides(ax, names, guides)
    flagged = mark_alarms(ax, names, alarms, several)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)  # "+8.6e1" offsets collide with titles
    ax.set_title(title, color="red" if flagged else "black", fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.set_xlabel("step", fontsize=8)
    draw_legend(ax, twin, names, several)


def series_look(
    r: int, k: int, run_label: str, name: str, several: bool, n_names: int
) -> tuple[str, str, str]:
    """(colour, line style, legend label) of series k of run r: one run, a colour per series;
    several, a colour per run and a line style per series."""
    color = f"C{(r if several else k) % 10}"
    if not several:
        return color, "-", name
    label = run_label if n_names == 1 else f"{run_label}: {name}"
    return color, LINE_STYLES[k % len(LINE_STYLES)], label


def draw_series(
    ax: Any,
    ser: Series,
    std: Series | None,
    smoothing: float,
    color: str,
    style: str,
    label: str,
) -> None:
    """One series: its EMA (solid, dots when there are few points) over the raw values
    (faint), and a band of one standard deviation when `std` has the same steps."""
    # A handful of eval points smoothed would mostly show the EMA's lag: draw them raw.
    weight = smoothing if len(ser.values) >= MIN_POINTS_TO_SMOOTH else 0.0
    smooth = ema(ser.values, weight)
    if weight > 0:
        ax.plot(ser.steps, ser.values, color=color, alpha=0.25, linewidth=1)
    marker = "o" if len(ser.values) <= 12 else None
    ax.plot(
        ser.steps,
        smooth,
        color=color,
        linestyle=style,
        label=label,
        marker=marker,
        markersize=3,
        linewidth=1.6,
    )
    if std is not None and std.steps == ser.steps:
        below = [m - s for m, s in zip(ser.values, std.values)]
        above = [m + s for m, s in zip(ser.values, std.values)]
        ax.fill_between(ser.steps, below, above, color=color, alpha=0.12, linewidth=0)


def draw_legend(ax: Any, twin: Any, names: Sequence[str], several: bool) -> None:
    """One legend for both axes (when there is more than one line to tell apart); the
    second axis, when there is one, labelled at the right."""
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:  # the KL on its own scale, at the right
        twin.set_ylabel(", ".join(n for n in names if n in SECOND_AXIS), fontsize=8)
        twin.tick_params(labelsize=8)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles and (several or len(names) > 1):
        ax.legend(handles, labels, fontsize=7, loc="best")


def draw_guides(ax: Any, names: Sequence[str], guides: Sequence[tuple[str, float, str]]) -> None:
    """Horizontal threshold lines (metric, y, label) for the panel's metrics."""
    # Thresholds only where the data comes near them: a KL target of 6 would flatten a KL
    # curve that stays around 0.2 into a line at the bottom of the panel.
    y_lo, y_hi = ax.get_ylim()
    for metric, y, text in guides:
        if metric in names and y_lo <= y <= y_hi:
            ax.axhline(y, color="gray", linestyle="--", linewidth=1)
            ax.annotate(
                text,
                (1, y),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=7,
                color="gray",
            )


def mark_alarms(ax: Any, names: Sequence[str], alarms: Sequence[Alarm], several: bool) -> list:
    """Shade where the panel's metrics raised an alarm and name the alarms; returns them."""
    flagged = [a for a in alarms if a.metric in names]
    for alarm in flagged:
        for start, end in alarm.spans:
            if start == end:
                ax.axvline(start, color="red", alpha=0.5, linewidth=2)
            else:
                ax.axvspan(start, end, color="red", alpha=0.12, linewidth=0)
    if flagged:
        tags = ", ".join(sorted({f"{a.name} ({a.run})" if several else a.name for a in flagged}))
        ax.text(
            0.02,
            0.97,
            f"ALARM: {tags}",
            transform=ax.transAxes,
            color="red",
            fontsize=8,
            va="top",
            fontweight="bold",
            bbox={"facecolor": "white", "alpha": 0.8, "pad": 1.5, "edgecolor": "none"},
        )
    return flagged


def guide_lines(runs: Sequence[Run]) -> list[tuple[str, float, str]]:
    """Horizontal lines for the thresholds the alarms use: (metric, y, label)."""
    out: list[tuple[str, float, str]] = []
    for run in runs:
        target = dotted_get(run.recipe, "ppo.adaptive_kl.target")
        if isinstance(target, (int, float)):
            out.append(("objective/kl", float(target), "KL target"))
        max_new = dotted_get(run.recipe, "ppo.max_new_tokens")
        if isinstance(max_new, (int, float)) and run.stage == "ppo":
            out.append(("response/length_mean", float(max_new), "max_new_tokens"))
    if any(run.stage == "ppo" for run in runs):
        out.append(("response/eos_rate", 0.5, "50%"))
    return list(dict.fromkeys(out))  # several runs with one recipe: one line


def plot_panels(
    panels: Sequence[tuple[str, list[str], Sequence[Run]]],
    path: Path,
    title: str,
    ncols: int,
    smoothing: float,
    alarms: Sequence[Alarm],
) -> Path:
    """One PNG of (title, series names, runs) panels, the alarms listed under them."""
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = pyplot().subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows + 0.8), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (panel, names, runs) in zip(axes.flat, panels):
        draw_panel(ax, panel, names, runs, smoothing, alarms, guide_lines(runs))
    fig.suptitle(title, fontsize=12, fontweight="bold")
    bottom = 0.0
    if alarms:
        by_run: dict[str, list[str]] = {}
        for alarm in alarms:
            by_run.setdefault(alarm.run, []).append(alarm.name)
        width_chars = int(fig.get_figwidth() * 13)  # about 13 characters per inch at 9 pt
        lines = [f"ALARMS {run}: {', '.join(names)}" for run, names in by_run.items()]
        text = "\n".join(textwrap.fill(line, width_chars) for line in lines)
        fig.text(0.5, 0.005, text, ha="center", va="bottom", color="red", fontsize=9)
        bottom = (text.count("\n") + 1) * 0.17 / fig.get_figheight()
    return save_figure(fig, path, dpi=90, rect=(0, bottom + 0.01, 1, 0.97))


def plot_stage(
    stage: str,
    runs: Sequence[Run],
    path: Path,
    smoothing: float = 0.6,
    alarms: Sequence[Alarm] = (),
) -> Path | None:
    """One dashboard PNG for the runs of one stage (overlaid). None when nothing was logged."""
    panels = [(title, names, runs) for title, names in panels_for(stage, runs)]
    if not panels:
        return None
    title = f"{stage}: {', '.join(r.label for r in runs)}"
    return plot_panels(panels, path, title, 4 if len(panels) > 9 else 3, smoothing, alarms)


def plot_overview(
    by_stage: dict[str, list[Run]],
    path: Path,
    smoothing: float = 0.6,
    alarms: Sequence[Alarm] = (),
) -> Path | None:
    """The whole pipeline on one page: SFT loss, RM accuracy, PPO score / KL / length."""
    panels = []
    for stage, title, patterns in OVERVIEW:
        runs = by_stage.get(stage, [])
        names = match_series(sorted({n for r in runs for n in r.series}), patterns)
        if names:
            panels.append((title, names, runs))
    if not panels:
        return None
    title = "pipeline overview: SFT -> reward model -> PPO"
    return plot_panels(panels, path, title, 3, smoothing, alarms)


# ------------------------------------------------------------------------------ entry point


def group_by_stage(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by stage, pipeline order first."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.stage, []).append(run)
    return {s: groups[s] for s in pipeline_order(groups)}


def render(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    smoothing: float = 0.6,
    report: bool = True,
) -> dict[str, Any]:
    """Load the runs, check their health, write the PNGs (and report.html).

    Returns {"runs", "alarms", "figures": {name: path}, "report": path | None}.
    """
    if not 0 <= smoothing < 1:
        raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    alarms = [a for run in runs for a in check_run(run)]
    by_stage = group_by_stage(runs)
    figures: dict[str, Path] = {}
    if all(s in by_stage for s in PIPELINE):
        path = plot_overview(by_stage, out_dir / "overview.png", smoothing, alarms)
        if path is not None:
            figures["overview"] = path
    for stage, stage_runs in by_stage.items():
        stage_alarms = [a for a in alarms if any(a.run == r.label for r in stage_runs)]
        path = plot_stage(stage, stage_runs, out_dir / f"{stage}.png", smoothing, stage_alarms)
        if path is not None:
            figures[stage] = path
    report_path = None
    if report:
        from rlhf.tools.report import write_report

        report_path = write_report(out_dir / "report.html", by_stage, figures, alarms, smoothing)
    return {"runs": runs, "alarms": alarms, "figures": figures, "report": report_path}


def recipe_run_dirs(recipe_path: str, overrides: Sequence[str]) -> tuple[Path, list[Path]]:
    """(output_dir, its stage folders that exist) for `rlhf curves --recipe`."""
    from rlhf.recipe import Recipe, apply_override, read_recipe_yaml

    # The merged YAML, not the validated recipe: plotting a finished run must not need its
    # training data files to still be there.
    data = read_recipe_yaml(Path(recipe_path))
    for override in overrides:
        apply_override(data, override)
    output_dir = Path(str(data.get("output_dir") or Recipe.model_fields["output_dir"].default))
    dirs = [output_dir / s for s in STAGES if (output_dir / s).is_dir()]
    if not dirs:
        raise UserError(
            f"{output_dir}: no sft, reward, ppo or dpo run folders yet (run a stage first)"
        )
    return output_dir, dirs


def main(args: argparse.Namespace) -> int:
    paths = list(args.run_dirs or [])
    if args.recipe:
        overrides = [p for p in paths if "=" in p]
        stray = [p for p in paths if "=" not in p]
        if stray:
            raise UserError(f"with --recipe, give overrides (key=value), not run folders: {stray}")
        output_dir, run_dirs = recipe_run_dirs(args.recipe, overrides)
        default_out = output_dir / "curves"
    else:
        if not paths:
            raise UserError("give one or more run folders, or --recipe RECIPE")
        run_dirs = expand_run_dirs(paths)
        # One pipeline: its own curves/ (as --recipe); else beside the first folder given.
        one_pipeline = len(paths) == 1 and bool(pipeline_stage_dirs(Path(paths[0])))
        default_out = (
            Path(paths[0]) / "curves" if one_pipeline else Path(paths[0]).parent / "curves"
        )
    out_dir = Path(args.out) if args.out else default_out
    result = render(run_dirs, out_dir, args.smoothing, report=not args.no_report)
    for alarm in result["alarms"]:
        print(f"ALARM {alarm.run}: {alarm.message}", file=sys.stderr)
    for name, path in result["figures"].items():
        print(f"{name}: {path}")
    if result["report"] is not None:
        print(f"report: {result['report']}")
    if not result["figures"]:
        print("no metrics logged yet: nothing to plot", file=sys.stderr)
    return 0
