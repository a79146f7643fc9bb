"""report.html: one self-contained file per set of runs, readable offline and mailable.

PNGs are embedded as base64 data URIs and the CSS is inline, so the file references nothing
outside itself. Everything that came from a run (recipe text, generations, commands) is
HTML-escaped: a model's output is untrusted text.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf import __version__

# The run.json fields worth a glance, in this order; everything else stays in run.json.
RUN_FIELDS = (
    "status",
    "reason",
    "command",
    "recipe_file",
    "git_commit",
    "start_time",
    "end_time",
    "wall_seconds",
    "world_size",
    "device",
    "mixed_precision",
    "seed",
    "parameters",
    "trainable_parameters",
    "total_steps",
    "effective_batch",
    "train_examples",
    "eval_examples",
    "prompts",
    "rollouts_per_iteration",
    "reference",
    "sft_dir",
    "reward_dir",
    "init_from",
    "pairs",
    "loss_type",
    "beta",
    "train_pairs",
    "eval_pairs",
)

MAX_SAMPLE_STEPS = 100  # the newest iterations' samples; long runs would make a huge page

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1500px; padding: 0 16px; color: #222; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 40px; }
.meta { color: #666; font-size: 13px; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 600px; font-family: ui-monospace, monospace; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 12px; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
.alarms { background: #fff0f0; border: 1px solid #e99; padding: 8px 16px; }
.ok { background: #f0fff0; border: 1px solid #9c9; padding: 8px 16px; }
.alarm-name { color: #b00; font-weight: 600; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists of records are left for their own table."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def key_value_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = []
    for key, value in pairs:
        cls = "num" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        rows.append(f'<tr><th>{esc(key)}</th><td class="{cls}">{esc(fmt(value))}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def records_table(records: Sequence[dict[str, Any]], text_columns: Sequence[str] = ()) -> str:
    columns = list(dict.fromkeys(key for record in records for key in record))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = [
        "<tr>" + "".join(cell(record.get(c, ""), c in text_columns) for c in columns) + "</tr>"
        for record in records
    ]
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def cell(value: Any, text: bool) -> str:
    """A table cell: strings (and `text` columns) as preformatted text, numbers right-aligned."""
    if text or isinstance(value, str):
        return f'<td class="text">{esc(value)}</td>'
    return f'<td class="num">{esc(fmt(value))}</td>'


def eval_section(results: dict[str, Any]) -> str:
    """eval.json: scalars as one table, each list of records (held-out samples) as another."""
    scalars, tables = [], []
    for key, value in flatten(results).items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            tables.append(
                f"<details><summary>{esc(key)} ({len(value)})</summary>"
                f"{records_table(value)}</details>"
            )
        else:
            scalars.append((key, value))
    return "".join(([key_value_table(scalars)] if scalars else []) + tables)


def samples_section(samples: Sequence[dict[str, Any]]) -> str:
    """samples.jsonl grouped by iteration; the newest one open."""
    by_step: dict[Any, list[dict[str, Any]]] = {}
    for row in samples:
        by_step.setdefault(row.get("step"), []).append(row)
    steps = list(by_step)
    note = ""
    if len(steps) > MAX_SAMPLE_STEPS:
        note = f"<p class='meta'>showing the last {MAX_SAMPLE_STEPS} of {len(steps)} steps</p>"
        steps = steps[-MAX_SAMPLE_STEPS:]
    parts = [note]
    for i, step in enumerate(steps):
        rows = [{k: v for k, v in r.items() if k != "step"} for r in by_step[step]]
        is_open = " open" if i == len(steps) - 1 else ""
        parts.append(
            f"<details{is_open}><summary>step {esc(step)} ({len(rows)} samples)</summary>"
            f"{records_table(rows, text_columns=('prompt', 'response'))}</details>"
        )
    return "".join(parts)


def run_section(run: Any) -> str:
    parts = [f"<h3>{esc(run.label)}</h3>"]
    if run.info:
        pairs = [(k, run.info[k]) for k in RUN_FIELDS if k in run.info]
        versions = run.info.get("versions") or {}
        if versions:
            pairs.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
        parts.append("<h4>run.json</h4>" + key_value_table(pairs))
    else:
        parts.append("<p class='meta'>no run.json</p>")
    if run.eval:
        parts.append("<h4>final evaluation (eval.json)</h4>" + eval_section(run.eval))
    else:
        parts.append("<p class='meta'>no eval.json (the run has not finished)</p>")
    if run.series:
        rows = [
            {"metric": name, "last value": s.values[-1], "at step": int(s.steps[-1])}
            for name, s in sorted(run.series.items())
            if s.values
        ]
        parts.append(
            "<details><summary>last logged value of every metric</summary>"
            + records_table(rows)
            + "</details>"
        )
    if run.recipe_text:
        parts.append(
            "<details><summary>resolved recipe (recipe.yaml)</summary>"
            f"<pre>{esc(run.recipe_text)}</pre></details>"
        )
    if run.samples:
        parts.append("<h4>sampled generations (samples.jsonl)</h4>" + samples_section(run.samples))
    return "".join(parts)


def alarms_section(alarms: Sequence[Any]) -> str:
    if not alarms:
        return "<div class='ok'>No health alarms.</div>"
    items = "".join(
        f"<li><span class='alarm-name'>{esc(a.name)}</span> [{esc(a.run)}] {esc(a.message)}</li>"
        for a in alarms
    )
    return f"<div class='alarms'><b>Health alarms</b><ul>{items}</ul></div>"


def build_html(
    by_stage: dict[str, list[Any]],
    figures: dict[str, Path],
    alarms: Sequence[Any],
    smoothing: float,
) -> str:
    runs = [run for stage_runs in by_stage.values() for run in stage_runs]
    labels = ", ".join(run.label for run in runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>rlhf report: {esc(labels)}</title><style>{CSS}</style></head><body>",
        "<h1>rlhf training report</h1>",
        f"<p class='meta'>runs: {esc(labels)}<br>generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}"
        f" by rlhf {esc(__version__)}; curves smoothed with EMA {smoothing:g} "
        "(raw values faint behind)</p>",
        alarms_section(alarms),
    ]
    if "overview" in figures:
        parts.append("<h2>pipeline overview</h2>" + image(figures["overview"], "overview"))
    for stage, stage_runs in by_stage.items():
        parts.append(f"<h2>{esc(stage)}</h2>")
        if stage in figures:
            parts.append(image(figures[stage], f"{stage} dashboard"))
        else:
            parts.append("<p class='meta'>no metrics logged</p>")
        parts.extend(run_section(run) for run in stage_runs)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: Path,
    by_stage: dict[str, list[Any]],
    figures: dict[str, Path],
    alarms: Sequence[Any],
    smoothing: float = 0.6,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_html(by_stage, figures, alarms, smoothing), encoding="utf-8")
    return path
