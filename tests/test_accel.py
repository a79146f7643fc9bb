"""The `accel` switch: `off`, and `auto` on any device but a CPU, leave every module, the
attention registry and malloc as they are; `auto` on a CPU opens the fast paths."""

import pytest
import torch

from rlhf import accel
from rlhf.accel import apply, logprobs
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
    mask = torch.ones(2, 5, dtype=torch.long, device=next(model.parameters()).device)
    mask[0, :2] = 0
    seen = {}
    with apply.sampling(model, rows=2):
        seen["sampling"] = _swapped(model)
    sdpa = _sdpa()
    with apply.training(model):
        seen["training"] = _swapped(model)
        seen["sdpa replaced"] = _sdpa() is not sdpa
    with apply.padded(model, mask):
        seen["padded"] = _swapped(model)
    assert not _swapped(model) and _sdpa() is sdpa  # each context undoes its changes on exit
    return seen


@pytest.fixture()
def lora_model(tiny_model_dir):
    model = models.load_causal_lm(tiny_model_dir)
    return models.apply_lora(model, LoraConfig(enabled=True, r=4)).eval()


def test_auto_on_a_cpu_opens_the_fast_paths(lora_model):
    with accel.using("auto"):
        seen = _opened(lora_model)
    assert seen["sampling"]  # the lean LoRA forward (packing needs bf16 autocast)
    assert seen["training"] and seen["sdpa replaced"]  # lean LoRA, MLP recompute, attention
    assert seen["padded"]  # the MLPs on the real tokens only


@pytest.mark.parametrize("where", ["off", "auto-on-another-device"])
def test_off_and_other_devices_change_nothing(lora_model, where):
    if where == "auto-on-another-device":
        lora_model.to("meta")  # no CUDA here: any device that is not the CPU
    with accel.using("off" if where == "off" else "auto"):
        seen = _opened(lora_model)
    assert seen == {"sampling": [], "training": [], "sdpa replaced": False, "padded": []}


def test_the_switch_picks_the_log_prob_kernel(monkeypatch):
    calls = []
    real = logprobs.TokenLogprobs.apply
    monkeypatch.setattr(logprobs.TokenLogprobs, "apply", lambda *a: calls.append(1) or real(*a))
    logits, tokens = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    with accel.using("off"):
        plain = logprobs.token_logprobs(logits, tokens, 0.7)
    assert not calls
    with accel.using("auto"):
        fast = logprobs.token_logprobs(logits, tokens, 0.7)
    assert calls
    torch.testing.assert_close(fast, plain)
    assert not accel.applies("cuda") and not accel.applies(torch.device("meta"))


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_make_accelerator_sets_the_switch_and_the_allocator_only_when_on(mode, monkeypatch):
    from accelerate.state import AcceleratorState

    from rlhf.accel import allocator
    from rlhf.infra.runtime import make_accelerator
    from rlhf.recipe import Recipe

    kept = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: kept.append(1) or True)
    AcceleratorState._reset_state(reset_partial_state=True)
    with accel.using("auto"):  # restored after the test
        make_accelerator(Recipe(accel=mode, precision="fp32"))
        assert accel.mode() == mode
    AcceleratorState._reset_state(reset_partial_state=True)
    assert kept == ([1] if mode == "auto" and not torch.cuda.is_available() else [])


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="accel"):
        accel.use("fast")
