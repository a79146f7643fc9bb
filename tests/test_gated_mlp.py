"""rlhf.roles.gated_mlp: act(gate) * up recomputed in backward, bit-identical to autograd's."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from rlhf.accel.gated_mlp import GatedProduct, activation_name, recomputed_activations
from rlhf.roles import models


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_product_is_autograds_bit_for_bit(act, dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up, d_out = (torch.randn(4, 7, 12, generator=gen).to(dtype) for _ in range(3))
    fn = F.silu if act == "silu" else lambda x: F.gelu(x, approximate="tanh")
    runs = []
    for product in (lambda g, u: fn(g) * u, lambda g, u: GatedProduct.apply(g, u, act)):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, kept=kept: kept.append(t) or t, lambda t: t
        ):
            out = product(g, u)
        out.backward(d_out)
        runs.append((out.detach(), g.grad, u.grad, len(kept)))
    (out_a, dg_a, du_a, kept_a), (out_b, dg_b, du_b, kept_b) = runs
    assert torch.equal(out_a, out_b) and torch.equal(dg_a, dg_b) and torch.equal(du_a, du_b)
    assert (kept_a, kept_b) == (3, 2)  # gate, act(gate), up -> gate, up


def test_a_model_keeps_one_tensor_less_per_layer_with_the_same_logits_and_gradients(
    tiny_model_dir, monkeypatch
):
    """The tiny Llama under bf16 autocast, as the PPO update runs it: each MLP keeps one
    (tokens, intermediate) tensor less, and down_proj (trained here) rebuilds its input in
    backward instead of keeping it; logits and every gradient are bit-identical."""
    from rlhf.accel import gated_mlp

    rebuilt = []
    product = gated_mlp.product_for_backward
    monkeypatch.setattr(
        gated_mlp, "product_for_backward", lambda *a: rebuilt.append(1) or product(*a)
    )
    model = models.load_causal_lm(tiny_model_dir)
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    inter = model.config.intermediate_size
    runs = []
    for ctx in (contextlib.nullcontext(), recomputed_activations(model)):
        model.zero_grad(set_to_none=True)
        kept = []
        with ctx as patched, torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t, kept=kept: kept.append(t) or t, lambda t: t
            ):
                logits = model(input_ids=ids, attention_mask=mask).logits
        logits.float()[mask.bool()].sin().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        wide = sum(1 for t in kept if t.shape[-1] == inter and t.dim() == 3)
        runs.append((logits.detach(), grads, wide, patched))
    (plain, plain_grads, plain_wide, _), (ours, ours_grads, ours_wide, patched) = runs
    layers = model.config.num_hidden_layers
    assert patched == layers
    assert len(rebuilt) == layers  # once per layer, for down_proj's weight gradient
    assert plain_wide - ours_wide == layers
    assert torch.equal(plain, ours)
    assert plain_grads.keys() == ours_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(ours_grads[name], grad), name
    assert "forward" not in vars(model.model.layers[0].mlp)  # the class's forward again


def test_only_known_activations_are_recomputed():
    from transformers.activations import ACT2FN

    assert activation_name(ACT2FN["silu"]) == "silu"
    assert activation_name(torch.nn.SiLU()) == "silu"
    assert activation_name(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert activation_name(ACT2FN["gelu"]) is None
    assert activation_name(torch.nn.ReLU()) is None


def test_with_gradient_checkpointing_the_product_is_kept_as_autograd_keeps_it(
    tiny_model_dir, monkeypatch
):
    """Gradient checkpointing has saved-tensor hooks of its own, which the product's would
    shadow: with it on, down_proj keeps its input as usual, and training still matches."""
    from rlhf.accel import gated_mlp

    rebuilt = []
    product = gated_mlp.product_for_backward
    monkeypatch.setattr(
        gated_mlp, "product_for_backward", lambda *a: rebuilt.append(1) or product(*a)
    )
    model = models.load_causal_lm(tiny_model_dir).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for ctx in (contextlib.nullcontext(), recomputed_activations(model)):
        model.zero_grad(set_to_none=True)
        with ctx:
            model(input_ids=ids).logits.sin().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert not rebuilt
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
