"""The reward model's losses: Bradley-Terry on one pair, and the K-way ranking loss.

Bradley & Terry 1952; InstructGPT (Ouyang et al. 2022, sec. 3.5, eq. 1): for a prompt with K
ranked responses and scores r_k,

    loss(prompt) = 1/C(K,2) * sum over its pairs (better, worse) of
                   -log sigmoid(r(better) - r(worse) - margin)
                   + center_coef * mean_k(r_k)^2

  * a prompt's loss is the MEAN over its pairs (InstructGPT's 1/C(K,2)), and a batch's loss the
    MEAN over prompts, so a K=9 prompt weighs as much as a K=2 prompt;
  * `margin` (Llama 2, Touvron et al. 2023, eq. 2) asks for a gap of at least `margin`;
  * the centring term (Eisenstein et al. 2023, "Helping or Herding") keeps rewards near zero;
    it is the squared mean reward of a prompt's responses, (r+ + r-)^2 / 4 for K=2.

A batch holds R scored responses of P prompts and N pairs that index them: `better`, `worse`
(N,) response indices, `pair_prompt` (N,) and `row_prompt` (R,) prompt indices, `n_prompts`.
"""

from __future__ import annotations

import torch


def bradley_terry_loss(
    better: torch.Tensor, worse: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """Per-pair -log sigmoid(r_better - r_worse - margin) (Bradley-Terry; InstructGPT eq. 1)."""
    return -torch.nn.functional.logsigmoid(better.float() - worse.float() - margin)


def segment_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of `values` per group `index` in [0, n): (M,), (M,) -> (n,). Empty groups give 0."""
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, values)
    counts = torch.bincount(index, minlength=n).clamp(min=1).to(values.dtype)
    return sums / counts


def prompt_losses(
    scores: torch.Tensor,
    batch: dict[str, torch.Tensor],
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """loss(prompt) above for each prompt of the batch: (R,) scores -> (P,)."""
    n = int(batch["n_prompts"])
    scores = scores.float()
    pair_loss = bradley_terry_loss(scores[batch["better"]], scores[batch["worse"]], margin)
    loss = segment_mean(pair_loss, batch["pair_prompt"], n)
    if center_coef:
        loss = loss + center_coef * segment_mean(scores, batch["row_prompt"], n) ** 2
    return loss


def batch_loss(
    scores: torch.Tensor, batch: dict[str, torch.Tensor], **loss_args: float
) -> torch.Tensor:
    """Mean over prompts of `prompt_losses` (margin, center_coef), for a single micro-batch on
    a single rank. (The stage divides summed prompt losses by the prompts of the whole step.)"""
    return prompt_losses(scores, batch, **loss_args).mean()
