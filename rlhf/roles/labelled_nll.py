"""The SFT loss on a model (rlhf.algo.sft), with the LM head run only on the positions that
predict a labelled token: prompt and padding positions never become (vocab)-wide logits (for
Gemma-3's 262k vocabulary the head is most of the per-token work). A forward pre-hook hands
the head those rows as one (1, N, H) sequence; the (wrapped) model is called as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch

from rlhf.algo.sft import IGNORE_INDEX, nll_per_target, nll_sum


def labelled_nll_sum(model: torch.nn.Module, batch: dict, **forward: Any) -> torch.Tensor:
    """algo.sft.token_nll_sum of the batch, the head on the labelled positions only."""
    logits, targets, _ = _labelled_logits(model, batch, **forward)
    return nll_sum(logits, targets)


def labelled_nll_rows(model: torch.nn.Module, batch: dict, **forward: Any) -> torch.Tensor:
    """labelled_nll_sum of each row of the batch: (B,), in float64."""
    logits, targets, predicts = _labelled_logits(model, batch, **forward)
    nll = nll_per_target(logits, targets).double()
    row_of = predicts.nonzero()[:, 0]  # the row of each predicting position, in logits' order
    return nll.new_zeros(predicts.shape[0]).index_add_(0, row_of, nll)


def _labelled_logits(
    model: torch.nn.Module, batch: dict, **forward: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V) in fp32, targets (N,), predicts (B, T)): the LM head on the N positions
    that predict a labelled token (`predicts`), with their targets."""
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX

    def keep_predicting_rows(_head: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][predicts].unsqueeze(0), *args[1:])

    hook = output_embeddings(model).register_forward_pre_hook(keep_predicting_rows)
    try:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward
        ).logits
    finally:
        hook.remove()
    targets = labels[:, 1:][predicts[:, :-1]]
    return logits[0].float(), targets, predicts


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head inside a DDP / DeepSpeed wrapper and a peft model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_output_embeddings()


def answer_nll(
    model: torch.nn.Module, batches: Iterable[dict], context: Callable[[], Any] = nullcontext
) -> torch.Tensor:
    """(summed NLL, number of targets) over the labelled tokens of `batches`, in float64 on
    the batches' device; each forward runs inside `context()` (autocast, gathered weights)."""
    return answer_nll_rows(model, batches, context).sum(0)


@torch.no_grad()
def answer_nll_rows(
    model: torch.nn.Module, batches: Iterable[dict], context: Callable[[], Any] = nullcontext
) -> torch.Tensor:
    """answer_nll per row, in the batches' order: (rows, 2) of (summed NLL, number of
    targets), float64 on the batches' device ((0, 2) on the CPU without batches)."""
    rows = []
    for batch in batches:
        with context():
            nll = labelled_nll_rows(model, batch)
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).double()
        rows.append(torch.stack([nll, targets], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)
