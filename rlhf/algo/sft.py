"""The supervised fine-tuning loss: next-token cross-entropy on the labelled tokens.

For a sequence x_1..x_T with labels y (y_t = IGNORE_INDEX where no loss is taken, e.g. the
prompt), the loss is the summed negative log-likelihood of each labelled token given the ones
before it (InstructGPT, Ouyang et al. 2022, sec. 3.5; the language-modelling objective of
Radford et al. 2018, eq. 1):

    L = - sum_{t >= 2, y_t labelled} log p(y_t | x_1..x_{t-1}),  p = softmax(logits_{t-1})

Sums, not means: the stage divides by the number of labelled tokens of the whole optimizer step.
"""

from __future__ import annotations

import torch

# The label of a position that carries no loss (torch's cross_entropy default ignore_index).
IGNORE_INDEX = -100


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """- sum_i log softmax(logits_i)[targets_i] over rows whose target is not IGNORE_INDEX;
    logits (N, V), targets (N,). Computed in fp32."""
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )


def nll_per_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """- log softmax(logits_i)[targets_i] for each row: (N,), in fp32 (0 where ignored)."""
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L above for a batch: logits (B, T, V) at position t predict labels (B, T) at t + 1."""
    predicting, predicted = logits[:, :-1], labels[:, 1:]
    return nll_sum(predicting.reshape(-1, predicting.shape[-1]), predicted.reshape(-1))


def n_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of labelled next-token targets (the denominator of token_nll_sum's mean)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
