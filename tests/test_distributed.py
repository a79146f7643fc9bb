"""Two real CPU ranks (gloo) through `accelerate launch`: every stage runs with world_size 2, and
one optimizer step on 2 ranks x batch b equals 1 rank x batch 2b (SFT and reward)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_pipeline import _overrides, _write_data

pytestmark = pytest.mark.multiprocess
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _launch(stage: str, args: list[str], nproc: int, extra_env: dict | None = None) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", "rlhf.cli", stage, "recipes/tiny.yaml", *args]
    else:
        cmd = [
            ACCELERATE,
            "launch",
            "--config_file",
            "recipes/accelerate/cpu-2proc.yaml",
            "--num_processes",
            str(nproc),
            "-m",
            "rlhf.cli",
            stage,
            "recipes/tiny.yaml",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


def _run_info(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "run.json").read_text())


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run / stage / "model" / "model.safetensors")


def _metric(run: Path, stage: str, key: str) -> list[float]:
    rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, _write_data(root)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(data, stage):
    root, paths = data
    runs = {n: root / f"{stage}-{n}rank" for n in (1, 2)}
    for nproc, run in runs.items():
        args = _overrides(run.parent, paths)
        args[0] = f"output_dir={run}"
        batch = 4 if stage == "sft" else 2
        args += [
            f"{stage}.max_steps=1",
            f"{stage}.batch_size={batch * (2 // nproc)}",
            f"{stage}.optim.warmup_ratio=0",
            f"{stage}.optim.weight_decay=0",
        ]
        if stage == "reward":
            args += ["reward.init_from=tiny-llama"]
        _launch(stage, args, nproc)
    assert _run_info(runs[1], stage)["world_size"] == 1
    assert _run_info(runs[2], stage)["world_size"] == 2, "two ranks must really synchronise"
    # Same data, same loss normalisation: the gradient (its norm) and the step are the same.
    g1, g2 = _metric(runs[1], stage, "train/grad_norm"), _metric(runs[2], stage, "train/grad_norm")
    assert g1 and g1[0] == pytest.approx(g2[0], rel=1e-4)
    l1, l2 = _metric(runs[1], stage, "train/loss"), _metric(runs[2], stage, "train/loss")
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    w1, w2 = _weights(runs[1], stage), _weights(runs[2], stage)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ppo_runs_on_two_ranks(data):
    root, paths = data
    run = root / "ppo-2rank"
    args = _overrides(root, paths)
    args[0] = f"output_dir={run}"
    for stage in ("sft", "reward", "ppo"):
        _launch(stage, args, 2)
        assert _run_info(run, stage)["world_size"] == 2
    info = _run_info(run, "ppo")
    assert info["rollouts_per_iteration"] == 2 * 4
    assert (run / "ppo" / "COMPLETED").is_file()
