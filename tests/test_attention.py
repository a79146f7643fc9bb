"""rlhf.roles.attention: sdpa's forward, the gradient through matmuls (CPU training)."""

import contextlib

import torch
import torch.nn.functional as F

from rlhf.roles import models
from rlhf.roles.attention import SdpaMatmulBackward, matmul_attention_backward


def test_the_matmul_gradient_is_sdpas_gradient_in_fp64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False  # row 0 is left padded by 2: its first two queries see nothing
    d_out = torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=gen)
    runs = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5),
        "ours": lambda q, k, v: SdpaMatmulBackward.apply(q, k, v, mask, 0.5),
    }
    grads = []
    for attend in runs.values():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        out.backward(d_out)
        grads.append((out.detach(), [t.grad for t in leaves]))
    (sdpa_out, sdpa_grads), (ours_out, ours_grads) = grads
    assert torch.equal(sdpa_out, ours_out)  # the same forward call
    for ours, theirs in zip(ours_grads, sdpa_grads):
        assert not ours.isnan().any()  # the queries that see no key: weights 0, not NaN
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def _graph_names(tensor: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_a_model_trains_through_it_with_sdpas_forward_and_gradients(tiny_model_dir):
    """The tiny Llama (grouped-query attention), left-padded: inside the context the same
    logits, gradients within fp32 rounding, and the attention's backward is ours; outside it,
    transformers' sdpa is back."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = models.load_causal_lm(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    runs = []
    for ctx in (contextlib.nullcontext(), matmul_attention_backward()):
        model.zero_grad(set_to_none=True)
        with ctx:
            logits = model(input_ids=ids, attention_mask=mask).logits
            names = _graph_names(logits)
        logits[mask.bool()].sin().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append((logits.detach(), grads, names))
    (plain, plain_grads, plain_names), (ours, ours_grads, our_names) = runs
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    assert "SdpaMatmulBackwardBackward" in our_names
    assert "SdpaMatmulBackwardBackward" not in plain_names
    assert torch.equal(plain, ours)
    assert plain_grads.keys() == ours_grads.keys()
    for name, grad in plain_grads.items():
        # fp32 rounding: within 1e-5 of the largest entry of each gradient
        assert (ours_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
