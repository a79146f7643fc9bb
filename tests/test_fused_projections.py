"""Sibling projections fused into two packed matmuls while sampling (rlhf.accel.fused_projections):
every projection's output bit-identical to its own module's, so the same seed samples the same
tokens from the same logits."""

from types import SimpleNamespace

import pytest
import torch

from rlhf.accel import apply
from rlhf.accel import fused_projections as fp
from rlhf.accel.lean_lora import lean_lora_forward
from rlhf.infra.runtime import cpu_supports_fast_bf16
from rlhf.ppo.rollout import sample_rollout
from rlhf.roles import models

pytestmark = pytest.mark.fast_path

needs_bf16 = pytest.mark.skipif(
    not cpu_supports_fast_bf16(), reason="this CPU has no native bf16: packing (and fusing) is off"
)


@pytest.fixture()
def lora_policy(random_lora):
    policy = random_lora(std=0.5, seed=1)  # non-zero B matrices, so the adapter counts
    models.store_frozen_linears(policy, torch.bfloat16)  # as the PPO stage stores them
    return policy


def _qwen2_with_biases():
    """A random Qwen2 (bias on q, k and v, none on o): the fused bias path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    from rlhf.recipe import LoraConfig

    policy = models.apply_lora(model, LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return policy.eval()


def _rollout(policy, tokenizer, fuse: bool, monkeypatch, adapter: bool = True):
    if not fuse:
        monkeypatch.setattr(apply, "fused_projections", lambda model, rows: _none())
    cfg = SimpleNamespace(max_new_tokens=12, temperature=0.7, stop_strings=[])
    ids = torch.randint(5, 1000, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    torch.manual_seed(3)
    # adapter off: the SFT policy, as the evaluation and the calibration sample it
    with torch.autocast("cpu", torch.bfloat16), _none() if adapter else policy.disable_adapter():
        roll = sample_rollout(policy, ids, mask, cfg, tokenizer, keep_sampling_outputs=True)
    monkeypatch.undo()
    return roll, torch.random.get_rng_state()


class _none:
    def __enter__(self):
        return 0

    def __exit__(self, *exc):
        return False


@needs_bf16
@pytest.mark.parametrize("adapter", [True, False], ids=["adapter", "adapter-disabled"])
def test_fused_sampling_draws_the_same_tokens_from_bit_identical_logits(
    adapter, lora_policy, tiny_model_dir, monkeypatch
):
    tokenizer = models.load_tokenizer(tiny_model_dir, padding_side="left")
    plain, plain_rng = _rollout(lora_policy, tokenizer, False, monkeypatch, adapter)
    calls = []
    real = fp._Group.compute
    monkeypatch.setattr(
        fp._Group,
        "compute",
        lambda self, x, adapter: calls.append(adapter) or real(self, x, adapter),
    )
    fused, fused_rng = _rollout(lora_policy, tokenizer, True, monkeypatch, adapter)
    # 2 layers x 4 groups, at the prefill and at each of the 11 later steps.
    assert calls == [adapter] * 8 * 12
    assert plain.response_ids.shape[1] == 12
    assert torch.equal(fused.response_ids, plain.response_ids)
    assert torch.equal(fused.sampling_logits, plain.sampling_logits)
    assert torch.equal(fused.sampling_hidden, plain.sampling_hidden)
    assert torch.equal(fused_rng, plain_rng)


def _members_outputs(model, group, x):
    parent = next(m for m in model.modules() if all(hasattr(m, n) for n in group))
    return [getattr(parent, n)(x) for n in group]


@needs_bf16
@pytest.mark.parametrize("rows", [1, 8, 60, 300])
@pytest.mark.parametrize("arch", ["llama-lora", "qwen2-lora-bias", "llama-no-lora"])
def test_each_projection_is_its_own_modules_output_bit_for_bit(
    arch, rows, random_lora, tiny_model_dir
):
    if arch == "llama-lora":
        model = random_lora(std=0.5, seed=2)
    elif arch == "qwen2-lora-bias":
        model = _qwen2_with_biases()
    else:
        model = models.load_causal_lm(tiny_model_dir).eval()
    lora = arch != "llama-no-lora"
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(rows)
    inputs = {
        ("q_proj", "k_proj", "v_proj"): torch.randn(rows, 1, hidden, generator=gen),  # fp32 norm
        ("gate_proj", "up_proj"): torch.randn(rows, 1, hidden, generator=gen),
        ("o_proj",): torch.randn(rows, 1, hidden, generator=gen).bfloat16(),  # bf16 attention
        ("down_proj",): torch.randn(
            rows, 1, model.config.intermediate_size, generator=gen
        ).bfloat16(),
    }
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), lean_lora_forward(model):
        want = {g: _members_outputs(model, g, x) for g, x in inputs.items()}
        with fp.fused_projections(model, rows) as n:
            # A lone projection without LoRA is nothing to fuse.
            assert n == model.config.num_hidden_layers * (4 if lora else 2)
            got = {g: _members_outputs(model, g, x) for g, x in inputs.items()}
    for g in inputs:
        for name, w, o in zip(g, want[g], got[g]):
            assert o.dtype == w.dtype == torch.bfloat16
            assert torch.equal(o, w), f"{arch} {name} at {rows} rows"


@needs_bf16
def test_a_disabled_adapter_grad_and_another_input_take_the_modules_own_forward(random_lora):
    model = random_lora(std=0.5, seed=4)
    attn = next(m for m in model.modules() if hasattr(m, "q_proj"))
    hidden = model.config.hidden_size
    x, other = torch.randn(3, 1, hidden), torch.randn(3, 1, hidden)
    with torch.autocast("cpu", torch.bfloat16), lean_lora_forward(model):
        with torch.no_grad():
            want_k_other = attn.k_proj(other)
            with model.disable_adapter():
                want_base_q = attn.q_proj(x)
        with torch.no_grad(), fp.fused_projections(model, 3):
            q = attn.q_proj(x)  # computes q, k and v on x
            assert torch.equal(attn.k_proj(other), want_k_other)  # not x's k
            with model.disable_adapter():  # the reference: the base alone
                assert torch.equal(attn.q_proj(x), want_base_q)
            assert not torch.equal(q, want_base_q)
        with fp.fused_projections(model, 3):  # grad on (training): autograd must see it
            y = attn.q_proj(x)
            assert y.requires_grad
            y.float().sum().backward()
    assert attn.q_proj.lora_A["default"].weight.grad is not None
    assert not any("forward" in vars(m) for m in model.modules())
    # Outside bf16 autocast nothing is fused (fp32 keeps PyTorch's own kernels).
    with fp.fused_projections(model, 3) as n:
        assert n == 0


def _gemma3_with_lora():
    """A random Gemma-3 (q and k norms after the projections, sliding-window layers, GELU MLP)
    with a LoRA adapter on every linear."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from rlhf.recipe import LoraConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="sdpa",
    )  # fmt: skip
    policy = models.apply_lora(Gemma3ForCausalLM(config), LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return policy.eval()


@needs_bf16
@pytest.mark.parametrize("make", [_gemma3_with_lora, _qwen2_with_biases], ids=["gemma3", "qwen2"])
def test_other_architectures_sample_the_same_tokens_and_logits_fused(make, monkeypatch):
    from rlhf.accel import decode

    model = make()
    ids = torch.randint(5, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def sample(fuse: bool):
        torch.manual_seed(5)
        with torch.autocast("cpu", torch.bfloat16), lean_lora_forward(model):
            with fp.fused_projections(model, 3) if fuse else _none():
                return decode.sample(model, ids, mask, 10, 0.7, [299], 0, keep=True)

    plain = sample(False)
    with torch.autocast("cpu", torch.bfloat16), fp.fused_projections(model, 3) as n:
        assert n == 2 * 4
    calls = []
    real = fp._Group.compute
    monkeypatch.setattr(
        fp._Group, "compute", lambda self, x, adapter: calls.append(1) or real(self, x, adapter)
    )
    fused = sample(True)
    assert len(calls) == 8 * plain.response_ids.shape[1]  # every group at every step
    assert torch.equal(fused.response_ids, plain.response_ids)
    assert torch.equal(fused.logits, plain.logits)
    assert torch.equal(fused.hidden, plain.hidden)
