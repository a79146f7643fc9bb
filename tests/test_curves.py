"""`rlhf curves`: dashboards, the HTML report and the health alarms, on synthetic run folders."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.tools import curves
from rlhf.tools.curves import (
    check_critic,
    check_entropy,
    check_eos,
    check_judge,
    check_kl,
    check_length,
    check_win_rate,
    ema,
    flagged_spans,
    load_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------- synthetic run folders


def write_run(
    path: Path,
    stage: str,
    rows: list[dict],
    recipe: str,
    eval_results: dict | None = None,
    samples: list[dict] | None = None,
) -> Path:
    """A run folder as the stages write it (the DESIGN.md contract), from plain data."""
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"stage": stage, "time": 1.0e9 + i, **row}) for i, row in enumerate(rows)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "recipe.yaml").write_text(recipe)
    info = {"stage": stage, "status": "completed", "command": f"rlhf {stage} recipes/x.yaml"}
    info.update(seed=42, world_size=1, device="cpu", versions={"torch": "2.13.0"})
    (path / "run.json").write_text(json.dumps(info))
    if eval_results is not None:
        (path / "eval.json").write_text(json.dumps(eval_results))
    if samples is not None:
        (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (path / "COMPLETED").write_text("done\n")
    return path


def sft_rows(offset: float = 0.0) -> list[dict]:
    rows = []
    for step in range(1, 31):
        loss = 3.0 * math.exp(-step / 10) + 1.0 + 0.1 * math.sin(step) + offset
        rows.append({"step": step, "train/loss": loss, "lr": 1e-4, "train/grad_norm": 2.0 / step})
        if step % 10 == 0:
            rows.append({"step": step, "eval/loss": loss + 0.1, "eval/perplexity": math.exp(loss)})
    return rows


def reward_rows() -> list[dict]:
    rows = []
    for step in range(1, 21):
        acc = 0.5 + 0.02 * step
        rows.append(
            {"step": step, "train/loss": 0.7 - 0.01 * step, "train/accuracy": acc,
             "train/mean_margin": 0.05 * step, "lr": 3e-5}
        )  # fmt: skip
        if step % 5 == 0:
            rows.append(
                {"step": step, "eval/loss": 0.7 - 0.008 * step, "eval/accuracy": acc - 0.05,
                 "eval/mean_margin": 0.04 * step, "eval/kendall_tau": 0.02 * step,
                 "eval_oasst/accuracy": acc - 0.1}
            )  # fmt: skip
    return rows


def ppo_rows(kl_growth: float = 1.0) -> list[dict]:
    """20 iterations of a run that goes wrong: KL climbs past 2x its target, entropy
    collapses, responses grow to max_new_tokens and stop ending with EOS, and a held-out judge
    falls while the reward-model score rises."""
    rows = []
    for it in range(1, 21):
        rows.append(
            {
                "step": it,
                "objective/score": 0.1 * it,
                "objective/score_std": 0.3,
                "objective/score_normalized": 0.05 * it,
                "objective/kl": kl_growth * it,
                "kl_coef": 0.05,
                "objective/rlhf_reward": 0.04 * it,
                "objective/non_score_reward": -0.01 * it,
                "objective/entropy": 30.0 - 1.45 * it,
                "objective/entropy_per_token": 2.0 - 0.097 * it,
                "response/length_mean": min(10.0 + 3 * it, 48.0),
                "response/eos_rate": max(1.0 - 0.06 * it, 0.0),
                "policy/clipfrac": 0.1,
                "policy/approxkl": 0.01,
                "value/loss": 1.0 / it,
                "value/explained_variance": 0.5,
                "timing/rollout": 1.0,
                "timing/update": 2.0,
                "tokens_per_second": 100.0,
                "lr": 1e-5,
                "eval/judge_win_rate": 0.6 - 0.01 * it,
            }
        )
    return rows


PPO_RECIPE = """name: synthetic-recipe
output_dir: {out}
ppo:
  max_new_tokens: 48
  kl_coef: 0.05
  adaptive_kl: {{target: 6.0, horizon: 10000}}
"""

SAMPLES = [
    {"step": it, "prompt": f"question {it} <b>bold</b> & co", "response": f"answer {i} at {it}",
     "score": 0.1 * it, "kl": 0.5}
    for it in (1, 2, 20)
    for i in range(2)
]  # fmt: skip


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "synthetic"
    recipe = PPO_RECIPE.format(out=root)
    write_run(root / "sft", "sft", sft_rows(), recipe, {"perplexity": 3.1, "eval_loss": 1.13})
    write_run(
        root / "reward",
        "reward",
        reward_rows(),
        recipe,
        {"accuracy": 0.85, "kendall_tau": 0.4, "extra_eval": {"oasst": {"accuracy": 0.7}}},
    )
    ppo_eval = {
        "win_rate": 0.6,
        "win_rate_ci95": [0.4, 0.8],
        "samples": [{"prompt": "held-out <i>p</i>", "ppo": "x", "ppo_score": 1.0}],
    }
    write_run(root / "ppo", "ppo", ppo_rows(), recipe, ppo_eval, SAMPLES)
    return root


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 400 and img.size[1] > 300


# -------------------------------------------------------------------------- dashboards, report


def test_pipeline_renders_a_dashboard_per_stage_and_an_overview(pipeline: Path):
    import matplotlib.image

    runs = [pipeline / s for s in ("sft", "reward", "ppo")]
    result = curves.render(runs, pipeline / "curves")
    assert set(result["figures"]) == {"overview", "sft", "reward", "ppo"}
    for path in result["figures"].values():
        assert_png(path)
        assert matplotlib.image.imread(path).ndim == 3
    assert result["report"] == pipeline / "curves" / "report.html"


def test_report_is_self_contained_and_has_series_recipe_and_samples(pipeline: Path):
    runs = [pipeline / s for s in ("sft", "reward", "ppo")]
    html = curves.render(runs, pipeline / "curves")["report"].read_text()
    for series in ("eval/perplexity", "train/accuracy", "eval_oasst/accuracy", "objective/kl"):
        assert series in html
    assert "name: synthetic-recipe" in html and "adaptive_kl" in html  # the recipe text
    assert "answer 1 at 20" in html  # a sampled generation
    # Generations are escaped, never markup.
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html and "<b>bold</b>" not in html
    assert "held-out &lt;i&gt;p&lt;/i&gt;" in html  # eval.json's samples table
    assert "win_rate_ci95" in html and "0.85" in html  # eval.json numbers
    assert "rlhf ppo recipes/x.yaml" in html  # run.json highlights
    # One file: every image is a data URI, and nothing points at the network.
    assert html.count('src="data:image/png;base64,') == 4
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", html)
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html


def test_alarms_are_listed_in_the_report_and_printed(pipeline: Path):
    rc, out, err = run_cli(["curves", str(pipeline / "ppo")])
    assert rc == 0
    names = {"kl_high", "entropy_collapse", "length_explosion", "eos_falling", "judge_disagrees"}
    names.add("win_rate_inconclusive")  # eval.json: win rate 0.6 [0.4, 0.8]
    for name in names:
        assert name in (pipeline / "curves" / "report.html").read_text()
    assert err.count("ALARM") == len(names)
    assert "KL far above target" in err
    assert f"ppo: {pipeline / 'curves' / 'ppo.png'}" in out  # default: <parent>/curves


def test_healthy_run_has_no_alarms(tmp_path: Path):
    rows = [
        {"step": it, "objective/kl": 1.0 + 0.05 * it, "objective/entropy": 20.0,
         "response/length_mean": 20.0, "response/eos_rate": 0.95, "objective/score": 0.1 * it}
        for it in range(1, 11)
    ]  # fmt: skip
    run = write_run(tmp_path / "ppo", "ppo", rows, PPO_RECIPE.format(out=tmp_path))
    assert curves.check_run(load_run(run)) == []


def test_overlay_of_two_runs_labels_both(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = write_run(tmp_path / "a" / "sft", "sft", sft_rows(), "name: a\n")
    b = write_run(tmp_path / "b" / "sft", "sft", sft_rows(offset=0.5), "name: b\n")
    runs = [load_run(a), load_run(b)]
    fig, ax = plt.subplots()
    curves.draw_panel(ax, "loss", ["train/loss", "eval/loss"], runs, smoothing=0.6)
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert f"{a}: train/loss" in labels and f"{b}: train/loss" in labels
    assert f"{a}: eval/loss" in labels and f"{b}: eval/loss" in labels
    result = curves.render([a, b], tmp_path / "out")
    assert set(result["figures"]) == {"sft"}  # one stage, overlaid; not a pipeline
    assert_png(result["figures"]["sft"])


def test_curves_recipe_uses_output_dir_and_its_stage_folders(pipeline: Path, tmp_path: Path):
    # tiny.yaml's data files may not exist: --recipe must still find output_dir.
    rc, out, err = run_cli(["curves", "--recipe", "recipes/tiny.yaml", f"output_dir={pipeline}"])
    assert rc == 0, err
    for name in ("overview.png", "sft.png", "reward.png", "ppo.png", "report.html"):
        assert (pipeline / "curves" / name).is_file()
    rc, _, err = run_cli(["curves", "--recipe", "recipes/tiny.yaml", f"output_dir={tmp_path}/x"])
    assert rc == 2 and "no sft, reward, ppo or dpo run folders" in err


def test_curves_on_a_pipeline_folder_plots_its_stage_folders(pipeline: Path):
    rc, out, err = run_cli(["curves", str(pipeline)])
    assert rc == 0, err
    for name in ("overview", "sft", "reward", "ppo"):
        assert f"{name}: {pipeline / 'curves' / name}.png" in out  # default: <pipeline>/curves
        assert_png(pipeline / "curves" / f"{name}.png")
    html = (pipeline / "curves" / "report.html").read_text()
    assert f"runs: {pipeline / 'sft'}, {pipeline / 'reward'}, {pipeline / 'ppo'}" in html


def test_two_pipeline_folders_overlay_stage_by_stage(pipeline: Path):
    other = pipeline.parent / "other-model"
    write_run(other / "sft", "sft", sft_rows(offset=0.5), "name: other\n")
    write_run(other / "ppo", "ppo", ppo_rows(kl_growth=0.5), "name: other\n")
    (other / "curves").mkdir()  # an earlier dashboard folder is not a run
    assert curves.expand_run_dirs([pipeline, other]) == [
        pipeline / "sft",
        pipeline / "reward",
        pipeline / "ppo",
        other / "sft",
        other / "ppo",
    ]
    rc, out, err = run_cli(["curves", str(pipeline), str(other)])
    assert rc == 0, err
    out_dir = pipeline.parent / "curves"  # beside the pipelines
    for name in ("overview", "sft", "reward", "ppo"):
        assert_png(out_dir / f"{name}.png")
    result = curves.render(curves.expand_run_dirs([pipeline, other]), out_dir)
    by_stage = curves.group_by_stage(result["runs"])
    assert [r.label for r in by_stage["sft"]] == [str(pipeline / "sft"), str(other / "sft")]
    assert [r.label for r in by_stage["ppo"]] == [str(pipeline / "ppo"), str(other / "ppo")]
    html = (out_dir / "report.html").read_text()
    assert str(other / "ppo") in html and str(pipeline / "ppo") in html


def test_user_mistakes_are_one_line_errors(tmp_path: Path):
    rc, _, err = run_cli(["curves", str(tmp_path / "missing")])
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["curves"])
    assert rc == 2
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["curves", str(tmp_path / "empty")])
    assert rc == 2 and "not a run directory" in err and "nor a pipeline folder" in err


def test_torn_last_line_and_resumed_steps(tmp_path: Path):
    run = write_run(tmp_path / "sft", "sft", sft_rows()[:5], "name: x\n")
    with open(run / "metrics.jsonl", "a") as f:
        # A resumed run re-logs step 2; a crash leaves half a line.
        f.write(json.dumps({"stage": "sft", "step": 2, "train/loss": 9.0}) + "\n")
        f.write('{"stage": "sft", "step": 6, "train/lo')
    series = load_run(run).series["train/loss"]
    assert series.steps == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert series.values[1] == 9.0  # the later row wins


# -------------------------------------------------------------------------------- pure pieces


def test_ema_is_debiased_and_zero_weight_is_raw():
    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert ema([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])  # no pull towards 0
    smooth = ema([0.0, 10.0], 0.5)
    assert 0.0 < smooth[1] < 10.0


def test_flagged_spans():
    steps = [1, 2, 3, 4, 5, 6]
    assert flagged_spans(steps, [False, True, True, False, True, True]) == [(2, 3), (5, 6)]
    assert flagged_spans(steps, [False] * 6) == []


def test_kl_alarm_against_target_and_median():
    steps = list(range(10))
    assert check_kl(steps, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], target=6.0) is None  # <= 2x target
    alarm = check_kl(steps, [1, 2, 3, 4, 5, 6, 7, 8, 13, 14], target=6.0)
    assert alarm is not None and alarm.name == "kl_high" and alarm.spans == [(8, 9)]
    # No target: 3x the median.
    assert check_kl(steps, [2.0] * 10) is None
    alarm = check_kl(steps, [2.0] * 8 + [7.0, 9.0])
    assert alarm is not None and alarm.spans == [(8, 9)]


def test_entropy_collapse_alarm():
    steps = list(range(6))
    assert check_entropy(steps, [2.0, 1.8, 1.5, 1.2, 1.0, 0.5]) is None  # 25% of the start
    alarm = check_entropy(steps, [2.0, 1.8, 1.0, 0.5, 0.3, 0.1])
    assert alarm is not None and alarm.spans == [(4, 5)]


def test_length_alarm_growth_and_max_new_tokens():
    steps = list(range(6))
    assert check_length(steps, [10, 12, 15, 20, 25, 29], max_new_tokens=64) is None
    grown = check_length(steps, [10, 12, 20, 31, 40, 45], max_new_tokens=64)
    assert grown is not None and grown.spans == [(3, 5)]
    # At the cap for 3 steps in a row, though never 3x the first value.
    capped = check_length(steps, [40, 45, 48, 48, 47.8, 30], max_new_tokens=48)
    assert capped is not None and capped.spans == [(2, 4)] and "truncated" in capped.message
    # Touching the cap once is not "consistently".
    assert check_length(steps, [40, 48, 40, 48, 40, 40], max_new_tokens=48) is None


def test_eos_alarm_needs_a_fall_from_above():
    steps = list(range(5))
    alarm = check_eos(steps, [0.9, 0.8, 0.6, 0.4, 0.3])
    assert alarm is not None and alarm.spans == [(3, 4)]
    assert check_eos(steps, [0.1, 0.2, 0.3, 0.2, 0.1]) is None  # never was higher
    assert check_eos(steps, [0.9, 0.8, 0.7, 0.6, 0.55]) is None


def test_judge_alarm_when_score_and_judge_move_apart():
    steps = list(range(8))
    rising = [0.1 * i for i in steps]
    falling = [0.7 - 0.02 * i for i in steps]
    alarm = check_judge(steps, rising, steps, falling, "eval/judge_win_rate")
    assert alarm is not None and alarm.metric == "eval/judge_win_rate"
    assert check_judge(steps, rising, steps, [0.5 + 0.01 * i for i in steps]) is None  # agrees
    noisy = [0.5, 0.52, 0.49, 0.51, 0.5, 0.52, 0.49, 0.51]
    assert check_judge(steps, rising, steps, noisy) is None  # no trend


def test_check_run_reads_thresholds_from_the_recipe(tmp_path: Path):
    rows = [{"step": it, "objective/kl": float(it)} for it in range(1, 11)]
    # Target 6: KL 10 is below 2x target -> no alarm; target 2: alarm from KL 5 on.
    run = write_run(tmp_path / "a", "ppo", rows, "ppo: {adaptive_kl: {target: 6.0}}\n")
    assert curves.check_run(load_run(run)) == []
    run = write_run(tmp_path / "b", "ppo", rows, "ppo: {adaptive_kl: {target: 2.0}}\n")
    (alarm,) = curves.check_run(load_run(run))
    assert alarm.spans == [(5.0, 10.0)] and alarm.run == str(run)


def test_panels_match_extra_accuracy_series_and_skip_std():
    runs = [curves.Run(Path("r"), "r", "reward", curves.series_from_rows(reward_rows()))]
    panels = dict(curves.panels_for("reward", runs))
    assert panels["accuracy"] == ["train/accuracy", "eval/accuracy", "eval_oasst/accuracy"]
    assert panels["margin"] == ["train/mean_margin", "eval/mean_margin"]
    ppo = [curves.Run(Path("p"), "p", "ppo", curves.series_from_rows(ppo_rows()))]
    names = [n for _, group in curves.panels_for("ppo", ppo) for n in group]
    assert "objective/score" in names and "objective/score_std" not in names


# ------------------------------------------------------------------- the real stage's metric names


def test_every_reward_panel_gets_data_from_a_real_reward_run(tmp_path: Path):
    """The panels read the names the reward stage really logs (not names a fixture made up)."""
    from rlhf.stages import reward as stage
    from tests.test_reward import ranking_rows, tiny_recipe, write_jsonl

    paths = {
        "train": write_jsonl(tmp_path / "train.jsonl", ranking_rows(12)),
        "test": write_jsonl(tmp_path / "test.jsonl", ranking_rows(5, offset=100)),
        "pairs": write_jsonl(
            tmp_path / "extra_pairs.jsonl",
            [{"prompt": f"Hi {i}", "chosen": "Hello!", "rejected": "Go away."} for i in range(3)],
        ),
    }
    run_dir = stage.run(tiny_recipe(tmp_path, paths))
    run = load_run(run_dir)
    assert run.stage == "reward"
    panels = dict(curves.panels_for("reward", [run]))
    assert set(panels) == {title for title, _ in curves.PANELS["reward"]}, panels
    assert panels["margin"] == [
        "train/mean_margin",
        "eval/mean_margin",
        "eval_extra_pairs/mean_margin",
    ]
    margin = run.series["train/mean_margin"]
    assert margin.steps == [1.0, 2.0, 3.0, 4.0] and all(map(math.isfinite, margin.values))
    assert run.series["eval/mean_margin"].steps == [0.0, 2.0, 4.0]
    overview = [title for st, title, patterns in curves.OVERVIEW if st == "reward"
                if curves.match_series(list(run.series), patterns)]  # fmt: skip
    assert overview == ["reward: accuracy"]


def test_critic_alarm_on_the_last_half_of_explained_variance():
    steps = list(range(1, 11))
    # Learns early, then stays at or below 0: the last half (steps 6-10) averages -0.2.
    never = [0.3, 0.2, 0.1, 0.0, -0.1, -0.1, -0.2, -0.3, -0.2, -0.2]
    alarm = check_critic(steps, never)
    assert alarm is not None and alarm.name == "critic_not_learning"
    assert alarm.spans == [(6, 10)] and "-0.2" in alarm.message
    # Negative at first (a fresh head), positive over the last half: a critic that learnt.
    learns = [-1.2, -0.8, -0.5, -0.2, -0.1, 0.1, 0.2, 0.3, 0.3, 0.4]
    assert check_critic(steps, learns) is None
    assert check_critic([1], [-1.0]) is None  # one point: no "last half" to judge


def test_critic_alarm_only_when_the_run_logged_a_critic(tmp_path: Path):
    rows = [{"step": it, "objective/score": 0.1 * it, "value/explained_variance": -0.5}
            for it in range(1, 7)]  # fmt: skip
    run = write_run(tmp_path / "gae" / "ppo", "ppo", rows, "name: x\n")
    assert [a.name for a in curves.check_run(load_run(run))] == ["critic_not_learning"]
    rows = [{"step": it, "objective/score": 0.1 * it} for it in range(1, 7)]  # e.g. rloo
    run = write_run(tmp_path / "rloo" / "ppo", "ppo", rows, "name: x\n")
    assert curves.check_run(load_run(run)) == []


def test_win_rate_alarm_for_each_interval_that_includes_one_half():
    results = {
        "win_rate": 0.61,
        "win_rate_ci95": [0.44, 0.78],  # includes 0.5: fires
        "judges": {
            "judge": {"sft_mean": 0.1, "ppo_mean": 0.3, "win_rate": 0.7,
                      "win_rate_ci95": [0.56, 0.82], "n": 128},  # above 0.5: quiet
            "hh": {"win_rate": 0.46, "win_rate_ci95": [0.39, 0.54], "n": 128},  # fires
        },
    }  # fmt: skip
    alarms = check_win_rate(results)
    assert [a.name for a in alarms] == ["win_rate_inconclusive"] * 2
    assert "trained reward model" in alarms[0].message and "[0.44, 0.78]" in alarms[0].message
    assert "judge hh" in alarms[1].message
    assert check_win_rate({"win_rate": 0.7, "win_rate_ci95": [0.56, 0.82]}) == []
    assert check_win_rate({"win_rate": 0.3, "win_rate_ci95": [0.2, 0.45]}) == []  # clearly worse
    assert check_win_rate({"win_rate_ci95": [0.5, 0.6]}) != []  # a bound at 0.5 includes it
    assert check_win_rate(None) == [] and check_win_rate({"perplexity": 3.0}) == []


def test_reward_hacking_alarm_compares_the_two_win_rates_of_the_judge_curve():
    from rlhf.tools.curves import Series, reward_hacking_alarms

    steps = [5.0, 10.0, 15.0, 20.0]
    rm_rising = Series(steps, [0.55, 0.6, 0.68, 0.75])
    judge_falling = Series(steps, [0.56, 0.52, 0.47, 0.41])
    score_flat = Series(steps, [1.0, 1.0, 1.0, 1.0])
    series = {
        "eval/rm_win_rate": rm_rising,
        "eval/judge_win_rate/judge": judge_falling,
        "objective/score": score_flat,
        "eval/kl": Series(steps, [0.1, 0.4, 0.9, 1.5]),
    }
    (alarm,) = reward_hacking_alarms(series)
    assert alarm.name == "judge_disagrees" and alarm.metric == "eval/judge_win_rate/judge"
    assert "eval/rm_win_rate went 0.55 -> 0.75" in alarm.message and alarm.spans == [(5.0, 20.0)]
    # Both win rates rise: no alarm. Without the curve, the training score is compared.
    agreeing = {**series, "eval/judge_win_rate/judge": Series(steps, [0.5, 0.55, 0.6, 0.7])}
    assert reward_hacking_alarms(agreeing) == []
    without_curve = {"objective/score": score_flat, "judge/x": judge_falling}
    assert reward_hacking_alarms(without_curve) == []  # a flat score is not hacking
    assert reward_hacking_alarms({"eval/judge_win_rate/judge": judge_falling}) == []


def test_the_judge_curve_panel_draws_three_lines_with_the_kl_on_a_second_axis(tmp_path):
    from rlhf.tools.curves import Run, Series, draw_panel, pyplot

    steps = [1.0, 2.0, 3.0]
    series = {
        "eval/rm_win_rate": Series(steps, [0.5, 0.6, 0.7]),
        "eval/judge_win_rate/judge": Series(steps, [0.5, 0.45, 0.4]),
        "eval/kl": Series(steps, [0.0, 2.0, 5.0]),
    }
    run = Run(tmp_path, "run", "ppo", series, {}, None)
    fig, ax = pyplot().subplots()
    draw_panel(ax, "judge curve", list(series), [run], smoothing=0.0)
    (twin,) = [a for a in fig.axes if a is not ax]
    assert len(ax.get_lines()) == 2 and len(twin.get_lines()) == 1
    assert twin.get_lines()[0].get_ydata().tolist() == [0.0, 2.0, 5.0]
    assert len(ax.get_legend().get_texts()) == 3
