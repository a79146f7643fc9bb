"""Reliability: clean stops on SIGTERM / SIGINT, non-finite values never reach the weights."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.infra import training
from rlhf.infra.errors import NumericalFault
from rlhf.infra.runtime import make_accelerator
from rlhf.recipe import Recipe
from rlhf.roles import model_folder
from tests.test_pipeline import _overrides, _write_data


def _train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in rows if "train/loss" in r]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_a_checkpoint_and_resume_finishes(tmp_path, signum):
    paths = _write_data(tmp_path)
    args = [*_overrides(tmp_path, paths), "sft.max_steps=100000", "sft.eval_every=100000"]
    cmd = [sys.executable, "-m", "rlhf.cli", "sft", "recipes/tiny.yaml", *args]
    run = tmp_path / "run" / "sft"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(_train_rows(run)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(signum).name}" in last and "--resume" in last
    assert "Traceback" not in err
    assert not (run / "COMPLETED").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "VALID").is_file()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert stopped_at >= 3 and [r["step"] for r in _train_rows(run)][-1] == stopped_at

    # Resume and finish a couple of steps later.
    resume = [*args[:-2], f"sft.max_steps={stopped_at + 2}", "--resume"]
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "sft", "recipes/tiny.yaml", *resume],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "COMPLETED").is_file()
    steps = [r["step"] for r in _train_rows(run)]
    assert steps == list(range(1, stopped_at + 3))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_non_finite_loss_skips_the_step_and_never_touches_the_weights():
    accelerator = make_accelerator(Recipe(precision="fp32"))
    model, optimizer = _model_and_optimizer()
    model, optimizer = accelerator.prepare(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    guard = training.NonFiniteGuard("skip", max_consecutive=3)
    x = torch.ones(2, 4)
    accelerator.backward(model(x).sum() * float("nan"))
    assert training.step_if_finite(accelerator, model, optimizer, 1.0, guard) != 0.0
    assert guard.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # the bad gradient is gone
    # A finite step afterwards works and resets the consecutive count.
    accelerator.backward(model(x).sum())
    training.step_if_finite(accelerator, model, optimizer, 1.0, guard)
    assert guard.consecutive == 0 and guard.skipped == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_finite_in_stop_mode_or_too_often_stops_the_run():
    with pytest.raises(NumericalFault, match="on_nonfinite=stop"):
        training.NonFiniteGuard("stop").ok(torch.tensor(float("inf")))
    guard = training.NonFiniteGuard("skip", max_consecutive=2)
    assert guard.ok(torch.tensor(float("nan"))) is False
    with pytest.raises(NumericalFault, match="2 steps in a row"):
        guard.ok(torch.tensor(float("nan")))


def test_nan_weights_are_never_saved(tmp_path, tiny_model_dir):
    from rlhf.roles import models

    model = models.load_causal_lm(str(tiny_model_dir))
    tok = models.load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(NumericalFault):
        model_folder.save_model(model, tok, tmp_path / "out", True, "card")
    assert not (tmp_path / "out" / "model.safetensors").exists()
