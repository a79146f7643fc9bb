"""The `accel` switch: `auto` opens the fast paths on a CPU only; `off` and RLHF_ACCEL=off close
them everywhere."""

import os
import subprocess
import sys

import pytest
import torch

from rlhf import accel


@pytest.mark.fast_path
def test_auto_applies_on_a_cpu_only():
    assert accel.applies("cpu") and accel.applies(torch.device("cpu"))
    assert not accel.applies("cuda") and not accel.applies(torch.device("meta"))
    with accel.using("off"):
        assert not accel.applies("cpu")


@pytest.mark.parametrize("accel_mode", ["auto", "off"])
def test_a_stage_run_sets_the_switch_from_the_recipe(accel_mode, tmp_path):
    from accelerate.state import AcceleratorState

    from rlhf.recipe import Recipe
    from rlhf.stages.runner import StageRun

    AcceleratorState._reset_state(reset_partial_state=True)
    with accel.using("auto" if accel_mode == "off" else "off"):  # restored after the test
        StageRun(Recipe(accel=accel_mode, precision="fp32", output_dir=str(tmp_path)), "sft")
        assert accel.mode() == accel_mode
    AcceleratorState._reset_state(reset_partial_state=True)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="accel"):
        accel.use("fast")


def test_rlhf_accel_off_wins_over_what_the_recipe_asks(monkeypatch):
    monkeypatch.setenv("RLHF_ACCEL", "off")
    with accel.using("auto"):  # what a stage does for a recipe's `accel: auto`
        assert accel.mode() == "off" and not accel.applies("cpu")


@pytest.mark.parametrize("value", ["auto", ""])
def test_rlhf_accel_auto_or_empty_leaves_the_choice_to_the_recipe(monkeypatch, value):
    monkeypatch.setenv("RLHF_ACCEL", value)
    for mode in ("auto", "off"):
        with accel.using(mode):
            assert accel.mode() == mode


def test_a_bad_rlhf_accel_stops_a_stage_process_with_one_line(tmp_path):
    """The stage's own process reads the environment, before any model is built."""
    cmd = [sys.executable, "-m", "rlhf.cli", "sft", "recipes/tiny.yaml", f"output_dir={tmp_path}"]
    env = {**os.environ, "RLHF_ACCEL": "fast"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == "error: RLHF_ACCEL='fast' is not one of auto, off"
