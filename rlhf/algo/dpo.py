"""DPO and its variants (`dpo.loss_type`), from summed sequence log-probs.

For a chosen (c) and a rejected (r) response to one prompt, with the policy's (logp) and the
frozen reference's (ref) summed response log-probs, the losses are functions of

    delta = (logp_c - ref_c) - (logp_r - ref_r)

beta * (logp - ref) is a response's implicit reward (Rafailov et al. 2023, eq. 5). The names
are TRL's DPOTrainer `loss_type`s; tests/test_losses.py checks each against TRL's on the same
numbers.
"""

from __future__ import annotations

import torch
from torch.nn.functional import logsigmoid


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: -log sigmoid(beta delta) (Rafailov et al. 2023, eq. 7). With label smoothing eps,
    conservative DPO: the preference is taken as flipped with probability eps (Mitchell 2023,
    "A note on DPO with noisy preferences")."""
    eps = label_smoothing
    return -(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO, unbiased under preferences flipped with probability eps (Chowdhury et al.
    2024, "Provably Robust DPO"): ((1 - eps) l(delta) - eps l(-delta)) / (1 - 2 eps),
    l = -log sigmoid(beta .)."""
    eps = label_smoothing
    clean, flipped = -logsigmoid(beta * delta), -logsigmoid(-beta * delta)
    return ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC's calibration hinge, max(0, 1 - beta delta) (Zhao et al. 2023, "SLiC-HF")."""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (delta - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17, beta their tau), on log-ratios
    averaged per response token (`pair_losses`), as the paper's results were computed."""
    return (delta - 1 / (2 * beta)) ** 2


LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def pair_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    batch: dict[str, torch.Tensor],
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The `loss_type` loss of every pair of a batch, (N,), in fp32: the (R,) sequence log-probs
    indexed by the pairs' `better` and `worse` (N,) response indices. `ipo` divides each
    log-ratio by the response's `response_tokens` (R,). The batch's loss is their mean."""
    logratio = (policy_logps - ref_logps).float()
    if loss_type == "ipo":
        logratio = logratio / batch["response_tokens"].clamp(min=1)
    delta = logratio[batch["better"]] - logratio[batch["worse"]]
    if loss_type == "sigmoid":
        return sigmoid_loss(delta, beta, label_smoothing)
    if loss_type == "robust":
        return robust_loss(delta, beta, label_smoothing)
    if loss_type == "hinge":
        return hinge_loss(delta, beta)
    if loss_type == "ipo":
        return ipo_loss(delta, beta)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")
