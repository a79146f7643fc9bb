"""MetricsLogger: metrics.jsonl / samples.jsonl rows, and TensorBoard files that TensorBoard's
own reader can load back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.infra.errors import UserError
from rlhf.infra.tracking import MetricsLogger, read_metrics


def make_recipe(output_dir: Path):
    from rlhf.recipe import Recipe, load_recipe

    try:
        return load_recipe("recipes/tiny.yaml", [f"output_dir={output_dir}"])
    except UserError:
        # The default recipe's data files (reward_data/) may not exist in this checkout;
        # the logger only reads the tracking section, which defaults alike.
        return Recipe(output_dir=str(output_dir))


def fake_accelerator(main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(is_main_process=main, num_processes=1)


def test_metrics_and_samples_rows_and_tensorboard_events(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = make_recipe(tmp_path)
    assert recipe.tracking.tensorboard and not recipe.tracking.trackers
    logger = MetricsLogger(tmp_path, "ppo", recipe, fake_accelerator())
    for step in range(1, 4):
        logger.log(step, {"objective/score": 0.5 * step, "objective/kl": float(step)})
    logger.log(4, {"objective/score": math.nan, "objective/kl": 4.0})  # non-finite -> null
    logger.log_samples(2, [{"prompt": "hi", "response": "hello", "score": 1.0, "kl": 0.1}])
    logger.close()

    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["stage"] == "ppo" and isinstance(rows[0]["time"], float)
    assert rows[1]["objective/score"] == 1.0 and rows[3]["objective/score"] is None
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 2, "prompt": "hi", "response": "hello", "score": 1.0, "kl": 0.1}]

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"objective/score", "objective/kl"} <= set(scalars)
    kl = acc.Scalars("objective/kl")
    assert [e.step for e in kl] == [1, 2, 3, 4]
    assert [e.value for e in kl] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    # The NaN score was not written: TensorBoard would draw it as a gap or a spike.
    assert [e.step for e in acc.Scalars("objective/score")] == [1, 2, 3]
    # The samples table is a text summary (stored as a tensor by the text plugin).
    assert any("samples" in tag for tag in acc.Tags()["tensors"])


def test_only_the_main_process_writes(tmp_path: Path):
    recipe = make_recipe(tmp_path)
    logger = MetricsLogger(tmp_path, "sft", recipe, fake_accelerator(main=False))
    logger.log(1, {"train/loss": 1.0})
    logger.log_samples(1, [{"prompt": "a", "response": "b"}])
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "samples.jsonl").exists()
    assert not (tmp_path / "tb").exists()
