"""Generation with oneDNN-packed weights (rlhf.infra.prepacked): bit-identical to autocast's
F.linear, so the same seed samples the same tokens from the same logits."""

import copy
from types import SimpleNamespace

import pytest
import torch

from rlhf.accel import prepacked
from rlhf.infra.runtime import cpu_supports_fast_bf16
from rlhf.ppo.rollout import sample_rollout
from rlhf.roles import models

needs_bf16 = pytest.mark.skipif(
    not cpu_supports_fast_bf16(), reason="this CPU has no native bf16: packing is off there"
)


@pytest.fixture()
def lora_policy(random_lora):
    # lora_A comes from peft's init on the global RNG: seeded here, so that this adapter does
    # not depend on the tests run before it. Unseeded, after test_fused_projections' gemma3 or
    # qwen2 case, one packed output rounded the other way and the first test below failed: see
    # rlhf/accel/prepacked.py's docstring.
    torch.manual_seed(0)
    policy = random_lora(std=0.5, seed=1)  # a non-zero adapter, so its matmuls count
    models.store_frozen_linears(policy, torch.bfloat16)  # as the PPO stage stores them
    return policy


def _prompts():
    ids = torch.randint(5, 1000, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _rollout(policy, tokenizer, pack: bool, monkeypatch):
    if not pack:  # today's path: autocast's F.linear
        monkeypatch.setattr(prepacked, "cpu_supports_fast_bf16", lambda: False)
    cfg = SimpleNamespace(max_new_tokens=12, temperature=0.7, stop_strings=[])
    ids, mask = _prompts()
    torch.manual_seed(3)
    with torch.autocast("cpu", torch.bfloat16):
        roll = sample_rollout(policy, ids, mask, cfg, tokenizer, keep_sampling_outputs=True)
    monkeypatch.undo()
    return roll


@needs_bf16
def test_packed_sampling_draws_the_same_tokens_from_bit_identical_logits(
    lora_policy, tiny_model_dir, monkeypatch
):
    tokenizer = models.load_tokenizer(tiny_model_dir, padding_side="left")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    plain = _rollout(lora_policy, tokenizer, False, monkeypatch)
    monkeypatch.setattr(
        prepacked.torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a)
    )
    packed = _rollout(lora_policy, tokenizer, True, monkeypatch)
    assert calls, "sample_rollout did not use the packed weights"
    assert plain.response_ids.shape[1] == 12
    assert torch.equal(packed.response_ids, plain.response_ids)
    assert torch.equal(packed.sampling_logits, plain.sampling_logits)
    assert torch.equal(packed.sampling_hidden, plain.sampling_hidden)


@needs_bf16
def test_layers_get_their_own_forward_back_and_grad_bypasses_the_packed_weights(lora_policy):
    linears = [m for m in lora_policy.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(2, 5, linears[0].in_features)
    with torch.autocast("cpu", torch.bfloat16):
        with prepacked.prepacked_linears(lora_policy, rows=2) as n:
            assert n == len(linears)
            assert all("forward" in vars(m) for m in linears)
            trainable = next(m for m in linears if m.weight.requires_grad)  # a LoRA matrix
            y = trainable(torch.randn(2, 5, trainable.in_features))
            y.float().sum().backward()  # grad on: its own forward, so autograd sees it
        assert trainable.weight.grad is not None
        assert not any("forward" in vars(m) for m in linears)
    # Outside bf16 autocast nothing is patched (an fp32 run keeps PyTorch's own kernels).
    with prepacked.prepacked_linears(lora_policy, rows=2) as n:
        assert n == 0
    frozen = copy.deepcopy(linears[0]).float()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = torch.nn.functional.linear(x, frozen.weight, frozen.bias)
        with prepacked.prepacked_linears(frozen, rows=2):
            assert torch.equal(frozen(x), want)
