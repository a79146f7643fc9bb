"""The DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).

From summed sequence log-probs of the policy (logp) and the frozen reference (ref) on a
chosen (c) and a rejected (r) response to one prompt:

    loss = -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))

beta * (logp - ref) is the response's implicit reward (eq. 5). TRL's DPOTrainer `sigmoid`
loss_type is this with no label smoothing (tests/test_dpo.py checks the two agree).
"""

from __future__ import annotations

import torch


def dpo_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The loss above per pair, in fp32."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin.float())


def ranking_pair_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    batch: dict[str, torch.Tensor],
    beta: float,
) -> torch.Tensor:
    """dpo_pair_loss of every pair of a batch of ranked responses, (N,): the (R,) sequence
    log-probs indexed by the pairs' `better` and `worse` (N,) response indices. The batch's
    loss is their mean (as TRL's)."""
    b, w = batch["better"], batch["worse"]
    return dpo_pair_loss(policy_logps[b], policy_logps[w], ref_logps[b], ref_logps[w], beta)
