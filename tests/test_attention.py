"""rlhf.accel.attention: sdpa's forward, the gradient through matmuls (CPU training)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from rlhf.accel.attention import SdpaMatmulBackward, matmul_attention_backward
from rlhf.roles import models

pytestmark = pytest.mark.fast_path


@pytest.mark.parametrize("groups", [1, 3])
def test_the_matmul_gradient_is_sdpas_gradient_in_fp64(groups):
    """groups 3: 6 query heads share 2 key/value heads (grouped-query attention), and only
    the 2 are kept for backward."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 6, 4, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 6 // groups, 6, 4, dtype=torch.float64, generator=gen) for _ in "kv")
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False  # row 0 is left padded by 2: its first two queries see nothing
    d_out = torch.randn(2, 6, 6, 4, dtype=torch.float64, generator=gen)

    def sdpa(q, k, v):
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)

    runs = {
        "sdpa": sdpa,
        "ours": lambda q, k, v: SdpaMatmulBackward.apply(q, k, v, mask, 0.5, groups),
    }
    grads, kept = [], []
    for attend in runs.values():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.append(t.shape) or t, lambda t: t
        ):
            out = attend(*leaves)
        out.backward(d_out)
        grads.append((out.detach(), [t.grad for t in leaves]))
    if groups > 1:  # ours keeps k and v as given; sdpa's autograd keeps them repeated
        assert kept.count(torch.Size([2, 6 // groups, 6, 4])) == 2
        # sdpa's autograd keeps q, out and k, v repeated (4); ours q only (1)
        assert kept.count(torch.Size([2, 6, 6, 4])) == 4 + 1
    (sdpa_out, sdpa_grads), (ours_out, ours_grads) = grads
    assert torch.equal(sdpa_out, ours_out)  # the same forward call
    for ours, theirs in zip(ours_grads, sdpa_grads):
        assert not ours.isnan().any()  # the queries that see no key: weights 0, not NaN
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_queries_that_continue_a_cached_prefix_get_sdpas_gradient_in_fp64():
    """3 queries after a 4-token prefix (shared_prefix.py's second forward): the score matrix
    is 3 x 7, each query sees the prefix and the queries up to itself; row 0's prefix is left
    padded by 2 keys. The gradient is sdpa's."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 3, 4, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, 7, 4, dtype=torch.float64, generator=gen) for _ in "kv")
    mask = torch.ones(2, 1, 3, 7, dtype=torch.bool)
    mask[:, :, :, 4:] = torch.ones(3, 3, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False
    d_out = torch.randn(2, 6, 3, 4, dtype=torch.float64, generator=gen)
    grads = []
    for ours in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if ours:
            out = SdpaMatmulBackward.apply(*leaves, mask, 0.5, 3)
        else:
            k3, v3 = (t.repeat_interleave(3, dim=1) for t in leaves[1:])
            out = F.scaled_dot_product_attention(leaves[0], k3, v3, attn_mask=mask, scale=0.5)
        out.backward(d_out)
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(grads[1], grads[0]):
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


def test_under_bf16_autocast_it_keeps_bf16_and_its_gradients_are_as_close_as_sdpas(tiny_model_dir):
    """In a bf16-autocast model, sdpa computes in bf16 from the fp32 rotary outputs: ours casts
    them before the call and keeps the bf16 tensors for backward (half the bytes). The logits
    are sdpa's bit for bit, and every gradient is about as close to the fp64 model's as
    sdpa's own bf16 backward (within 1.5x its error, plus a bf16 step of the largest entry)."""
    import copy

    model = models.load_causal_lm(tiny_model_dir)
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0

    def run(m, ctx, autocast):
        m.zero_grad(set_to_none=True)
        kept = []
        with (
            ctx,
            autocast,
            torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t),
        ):
            logits = m(input_ids=ids, attention_mask=mask).logits
            logits.float()[mask.bool()].sin().sum().backward()  # under autocast, as PPO does
        grads = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
        return logits.detach(), grads, kept

    _, exact, _ = run(
        copy.deepcopy(model).double(), contextlib.nullcontext(), contextlib.nullcontext()
    )
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    sdpa_logits, sdpa_grads, _ = run(model, contextlib.nullcontext(), bf16())
    ours_logits, ours_grads, kept = run(model, matmul_attention_backward(), bf16())
    assert torch.equal(sdpa_logits, ours_logits)
    heads = model.config.num_attention_heads
    four_d = [
        t for t in kept if t.dim() == 4 and t.shape[1] in (heads, model.config.num_key_value_heads)
    ]
    assert four_d and all(t.dtype == torch.bfloat16 for t in four_d)  # q, k, v, out
    for name, ref in exact.items():
        top = ref.abs().max()
        sdpa_err = (sdpa_grads[name] - ref).abs().max()
        assert (ours_grads[name] - ref).abs().max() <= 1.5 * sdpa_err + top / 256, name
