"""The `accel` switch: `off`, and `auto` on any device but a CPU, leave every module, the
attention registry and malloc as they are; `auto` on a CPU opens the fast paths."""

import os
import subprocess
import sys

import pytest
import torch

from rlhf import accel
from rlhf.accel import apply
from rlhf.recipe import LoraConfig
from rlhf.roles import models


def _swapped(model: torch.nn.Module) -> list[str]:
    """Modules whose forward is an instance attribute (a fast path's swap)."""
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


def _sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _opened(model: torch.nn.Module) -> dict[str, object]:
    """What each of apply's contexts changes while open: swapped forwards, the sdpa entry."""
    seen = {}
    with apply.sampling(model, rows=2):
        seen["sampling"] = _swapped(model)
    sdpa = _sdpa()
    with apply.training(model):
        seen["training"] = _swapped(model)
        seen["sdpa replaced"] = _sdpa() is not sdpa
    assert not _swapped(model) and _sdpa() is sdpa  # each context undoes its changes on exit
    return seen


@pytest.fixture()
def lora_model(tiny_model_dir):
    model = models.load_causal_lm(tiny_model_dir)
    return models.apply_lora(model, LoraConfig(enabled=True, r=4)).eval()


@pytest.mark.fast_path
def test_auto_on_a_cpu_opens_the_fast_paths(lora_model):
    with accel.using("auto"):
        seen = _opened(lora_model)
    assert seen["sampling"]  # the lean LoRA forward (packing needs bf16 autocast)
    assert seen["training"] and seen["sdpa replaced"]  # lean LoRA, attention's gradient


@pytest.mark.parametrize("where", ["off", "auto-on-another-device"])
def test_off_and_other_devices_change_nothing(lora_model, where):
    if where == "auto-on-another-device":
        lora_model.to("meta")  # no CUDA here: any device that is not the CPU
    with accel.using("off" if where == "off" else "auto"):
        seen = _opened(lora_model)
    assert seen == {"sampling": [], "training": [], "sdpa replaced": False}


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


@pytest.mark.fast_path
def test_instance_forwards_nest_and_restore_the_enclosing_forward():
    from rlhf.accel.forwards import instance_forwards

    module = torch.nn.Identity()

    def outer(x):
        return x + 1

    with instance_forwards([(module, outer)]):
        with instance_forwards([(module, lambda x, inner=module.forward: inner(x) * 10)]):
            assert module(torch.tensor(1.0)) == 20  # (1 + 1) * 10: it called the outer one
        assert module(torch.tensor(1.0)) == 2
    assert module(torch.tensor(1.0)) == 1 and "forward" not in vars(module)
