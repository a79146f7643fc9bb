"""Each gated MLP of a padded batch run on the real tokens only.

A batch of sequences is padded to its longest one: prompts on the left, answers that end early
after their EOS. The MLP works position by position, and it is most of a layer's matmul work
(SmolLM2: gate, up and down hold 2.65M of a layer's 3.54M weights; q, k, v and o the rest).
Nothing a real position computes reads a pad position's MLP output: attention masks pads out
as keys, and a pad query feeds only its own position. So while `mlps_on_real_tokens(model,
attention_mask)` is open, each gated MLP takes the real rows of its (B, T, H) input, runs on
those N rows, and puts the result back in place, zeros at the pads.

Real positions get the values of the padded computation up to the rounding of a matmul over
fewer rows; pad positions (which every loss and score masks out) lose their MLP term, so
their outputs differ, and stay finite. Gradients reach the same weights through
index_select / index_copy. Where the mask has no pad, nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from rlhf.accel.forwards import instance_forwards
from rlhf.accel.gated_mlp import GATED_MLPS


@contextmanager
def mlps_on_real_tokens(
    model: torch.nn.Module, attention_mask: torch.Tensor | None
) -> Iterator[int]:
    """While open, the gated MLPs (GATED_MLPS) of `model` skip the positions where the (B, T)
    `attention_mask` is 0; yields how many MLPs do (0 when the mask has no pad). A forward
    whose MLP input is not (B, T, H) (a cached decode step) runs as before."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        yield 0
        return
    shape = tuple(attention_mask.shape)
    real = attention_mask.reshape(-1).nonzero().squeeze(1)
    mlps = [m for m in model.modules() if type(m).__name__ in GATED_MLPS]
    with instance_forwards((m, _on_rows(m.forward, real, shape)) for m in mlps) as n:
        yield n


def _on_rows(inner: Callable, real: torch.Tensor, shape: tuple[int, ...]) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[:2]) != shape:
            return inner(x)
        rows = x.reshape(-1, x.shape[-1])
        y = inner(rows.index_select(0, real)[None])[0]
        out = y.new_zeros(rows.shape[0], y.shape[-1])
        out[real] = y  # in place: one (B * T, H) tensor, not zeros and a copy of them
        return out.view(*shape, y.shape[-1])

    return forward
