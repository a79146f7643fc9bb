"""Every tensor a PPO iteration creates follows the model's device (tests/device_tracking.py):
sampling noise, masks, position ids, advantages, reward scores and KL statistics. Runs on the
CPU, where a hard-coded `cpu` would otherwise pass unnoticed."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from rlhf.infra.runtime import make_accelerator
from rlhf.infra.training import make_optimizer
from rlhf.ppo import FixedKLController
from rlhf.ppo.iteration import PPOContext, ppo_iteration
from rlhf.ppo.rollout import reward_scores
from rlhf.recipe import LoraConfig, PPOConfig, Recipe
from rlhf.roles import models
from rlhf.roles.actor_critic import ActorCritic
from tests.device_tracking import MODEL_DEVICE, ModelDeviceMode

CHAT = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Hi?"}]]


class OnModelDevice:
    """The accelerator, reporting the model device as its own (as on a GPU)."""

    device = MODEL_DEVICE

    def __init__(self, accelerator) -> None:
        self._accelerator = accelerator

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def tiny_iteration(tiny_model_dir: str, estimator: str):
    """A one-iteration PPO context on tiny-llama with LoRA (the reference: adapter off), two
    chat prompts and a reward model scoring the responses through `reward_scores`."""
    cfg = PPOConfig(
        estimator=estimator,
        samples_per_prompt=2 if estimator == "gae" else 4,
        batch_size=8,
        mini_batch_size=4,
        grad_accum=2,
        max_new_tokens=6,
        target_kl_early_stop=1e6,
        missing_eos_penalty=1.0,
        score_clip=5.0,
    )
    torch.manual_seed(0)
    accelerator = make_accelerator(Recipe(precision="fp32", seed=0))
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    policy = models.apply_lora(models.load_causal_lm(tiny_model_dir), LoraConfig(enabled=True, r=4))
    model = ActorCritic(policy)
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    reward_model = models.load_reward_model(tiny_model_dir).eval()
    reward_model.config.pad_token_id = tok.pad_token_id
    rows = [CHAT[i % 2] for i in range(cfg.batch_size)]
    prompts = tok.apply_chat_template(
        rows, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt"
    )
    batch = {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"]}

    def score(roll):
        device = roll.response_ids.device
        scores = reward_scores(
            reward_model, tok, rows, roll.texts, 128, device, nullcontext, roll.ended_with_eos
        )
        return scores

    calibration = {"mean": 0.5, "std": 2.0}
    kl_ctl = FixedKLController(0.05)
    ctx = PPOContext(
        model, None, optimizer, None, OnModelDevice(accelerator), tok, kl_ctl, cfg, calibration
    )
    return ctx, batch, score


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_every_tensor_of_an_iteration_follows_the_model_device(
    tiny_model_dir, estimator, monkeypatch
):
    from transformers import PreTrainedModel

    # transformers' hub kernels (train() / eval() re-kernelize) would look for a real GPU.
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", lambda *args, **kwargs: None)
    # The tracker computes on the CPU: with a GPU present the accelerator would pick it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ctx, batch, score = tiny_iteration(tiny_model_dir, estimator)
    with ModelDeviceMode() as mode:
        roll, metrics = ppo_iteration(ctx, batch, score, torch.Generator().manual_seed(0))
        assert roll.response_ids.device == MODEL_DEVICE
        assert roll.scores.device == MODEL_DEVICE
    assert mode.faults == [], "\n".join(mode.faults)
    assert math.isfinite(metrics["objective/kl"]) and math.isfinite(metrics["policy/loss"])


def planted(device_arg):
    """Code as it should be (device_arg: the model's device) or with the device hard-coded."""
    x = torch.ones(3, device=MODEL_DEVICE)
    return x + torch.zeros(3, device=device_arg or x.device)


def test_the_tracker_catches_a_hard_coded_cpu_and_a_forgotten_device():
    with ModelDeviceMode() as mode:
        planted(None)
    assert mode.faults == []
    with ModelDeviceMode() as mode:
        planted("cpu")
    assert any("zeros(device='cpu')" in f for f in mode.faults)
    assert any("mixes a host tensor (3,)" in f for f in mode.faults)
    with ModelDeviceMode() as mode:
        x = torch.ones(3, device=MODEL_DEVICE)
        y = x * torch.arange(3)  # no device: on a GPU this is a host tensor
    assert y.tolist() == [0.0, 1.0, 2.0]
    assert len(mode.faults) == 1 and "mul mixes a host tensor (3,)" in mode.faults[0]
    with ModelDeviceMode() as mode:
        rows = torch.arange(4)  # no device
        rows[torch.ones(2, dtype=torch.long, device=MODEL_DEVICE)]
    assert mode.faults == ["?: a host tensor (4,) indexed by a model-device one"]


def test_the_tracker_allows_what_cuda_allows():
    with ModelDeviceMode() as mode:
        x = torch.arange(6.0, device=MODEL_DEVICE)
        idx = torch.tensor([0, 2])  # a host index
        picked = x[idx] * torch.tensor(2.0)  # and a 0-dim host tensor
        moved = torch.ones(2).to(x.device) + picked
        host_sum = x.cpu() + torch.ones(6)
    assert mode.faults == []
    assert moved.tolist() == [1.0, 5.0] and host_sum.sum().item() == 21.0
