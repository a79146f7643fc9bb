"""rlhf.roles.real_token_mlp: the gated MLPs of a padded batch run on its real tokens only, with
the padded computation's values and gradients at the real positions."""

from __future__ import annotations

import torch

from rlhf.accel.forwards import instance_forwards
from rlhf.accel.gated_mlp import recomputed_activations
from rlhf.accel.real_token_mlp import mlps_on_real_tokens
from rlhf.roles import models
from rlhf.tokens.chat import positions_from_mask


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded prompt
    mask[1, 7:] = 0  # an answer that ended early, padded after it
    return ids, mask


def _run(model, ids, mask, real_only: bool, recompute: bool = False):
    model.zero_grad()
    outer = recomputed_activations(model) if recompute else instance_forwards([])
    with outer, mlps_on_real_tokens(model, mask if real_only else None) as n:
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
        ).logits
    real = mask.bool()
    (logits[real].float().square().mean()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return n, logits.detach(), grads


def test_real_positions_get_the_padded_values_and_gradients(tiny_model_dir):
    model = models.load_causal_lm(tiny_model_dir).float()
    ids, mask = _batch()
    seen = []
    hook = model.model.layers[0].mlp.gate_proj.register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape))
    )
    _, dense, dense_grads = _run(model, ids, mask, real_only=False)
    n, sparse, sparse_grads = _run(model, ids, mask, real_only=True)
    hook.remove()
    n_real = int(mask.sum())  # 30 positions - 4 - 3 pads = 23
    assert n_real == 23
    assert n == len(model.model.layers)
    assert seen == [(3, 10, model.config.hidden_size), (1, n_real, model.config.hidden_size)]
    real = mask.bool()
    torch.testing.assert_close(sparse[real], dense[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(sparse).all()  # pads lose their MLP term, and stay finite
    assert not torch.allclose(sparse[~real], dense[~real])
    assert dense_grads.keys() == sparse_grads.keys()
    for name, g in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_nested_in_the_recomputed_activations_both_apply_and_both_are_undone(tiny_model_dir):
    model = models.load_causal_lm(tiny_model_dir).float()
    ids, mask = _batch()
    _, dense, dense_grads = _run(model, ids, mask, real_only=False)
    n, sparse, sparse_grads = _run(model, ids, mask, real_only=True, recompute=True)
    assert n == len(model.model.layers)
    real = mask.bool()
    torch.testing.assert_close(sparse[real], dense[real], rtol=1e-5, atol=1e-5)
    for name, g in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    mlp = model.model.layers[0].mlp
    assert "forward" not in vars(mlp)  # the class's forward again


def test_an_unpadded_mask_or_another_shape_leaves_the_forward_alone(tiny_model_dir):
    model = models.load_causal_lm(tiny_model_dir).float()
    ids, mask = _batch()
    with mlps_on_real_tokens(model, torch.ones_like(mask)) as n:
        assert n == 0
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 1, model.config.hidden_size)  # a KV-cached decode step's input
    with torch.no_grad(), mlps_on_real_tokens(model, mask) as n:
        assert n > 0 and "forward" in vars(mlp)
        inside = mlp(x)
    assert torch.equal(inside, mlp(x))


def test_instance_forwards_nest_and_restore_the_enclosing_forward():
    module = torch.nn.Identity()

    def outer(x):
        return x + 1

    with instance_forwards([(module, outer)]):
        with instance_forwards([(module, lambda x, inner=module.forward: inner(x) * 10)]):
            assert module(torch.tensor(1.0)) == 20  # (1 + 1) * 10: it called the outer one
        assert module(torch.tensor(1.0)) == 2
    assert module(torch.tensor(1.0)) == 1 and "forward" not in vars(module)
