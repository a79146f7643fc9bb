"""The reward model: batching of ranked responses, the scorer, metrics (its loss, Bradley-Terry
over every pair of a prompt's K ranked responses, is rlhf.algo.ranking).

A prompt's pairs stay in ONE batch and each response is scored ONCE, then the pairs are
indexed, as InstructGPT does. Metrics take plain lists, so the stage (gathered across ranks)
and `rlhf eval reward` share them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from os.path import commonprefix
from typing import Any

import torch

from rlhf.roles import models
from rlhf.roles.shared_prefix import prefix_shared_hidden
from rlhf.tokens.chat import encode_prompt_response, pad_batch

# ------------------------------------------------------------------------------------ encoding


def encode_ranking(tokenizer: Any, ranking: Any, max_length: int) -> dict[str, Any]:
    """A data.Ranking -> {"seqs": K token lists, "pairs": [(better, worse)], "ranking":
    best-first order}. Long sequences keep their END, where the reward is read."""
    seqs = [
        encode_prompt_response(tokenizer, ranking.prompt, response, max_length)
        for response in ranking.responses
    ]
    return {
        "seqs": seqs,
        "pairs": [tuple(p) for p in ranking.pairs()],
        "ranking": list(ranking.ranking),
    }


def collate_rankings(
    rows: Sequence[dict[str, Any]], pad_id: int, side: str = "right", share_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """Prompts -> one padded batch of ALL their responses, plus the pairs as row indices.

    input_ids / attention_mask: (R, T), R = sum of K over the prompts (one row per response).
    better / worse / pair_prompt: (N,) row of the better and worse response, prompt of the pair.
    row_prompt: (R,) prompt of each row. n_prompts: () the number of prompts.

    share_prefix: the batch holds each prompt's shared prefix (the tokens its K responses
    start with) ONCE, prefix_ids / prefix_mask (P, Lp) left padded, and input_ids /
    attention_mask only the rest of each response (right padded). A row's optional
    `prompt_len` caps its shared prefix.
    """
    seqs, better, worse, pair_prompt, row_prompt = [], [], [], [], []
    for p, row in enumerate(rows):
        offset = len(seqs)
        seqs.extend(row["seqs"])
        row_prompt.extend([p] * len(row["seqs"]))
        for b, w in row["pairs"]:
            better.append(offset + b)
            worse.append(offset + w)
            pair_prompt.append(p)
    prefix_lens = [0]
    if share_prefix and side == "right":
        prefix_lens = [shared_prefix_length(row["seqs"], row.get("prompt_len")) for row in rows]
    if min(prefix_lens) > 0:
        batch = pad_batch(
            [seq[prefix_lens[p] :] for seq, p in zip(seqs, row_prompt)], pad_id, "right"
        )
        prefix = pad_batch(
            [row["seqs"][0][:n] for row, n in zip(rows, prefix_lens)], pad_id, "left"
        )
        batch["prefix_ids"], batch["prefix_mask"] = prefix["input_ids"], prefix["attention_mask"]
    else:
        batch = pad_batch(seqs, pad_id, side)
    batch["better"] = torch.tensor(better, dtype=torch.long)
    batch["worse"] = torch.tensor(worse, dtype=torch.long)
    batch["pair_prompt"] = torch.tensor(pair_prompt, dtype=torch.long)
    batch["row_prompt"] = torch.tensor(row_prompt, dtype=torch.long)
    batch["n_prompts"] = torch.tensor(len(rows), dtype=torch.long)
    return batch


def shared_prefix_length(seqs: Sequence[Sequence[int]], cap: int | None = None) -> int:
    """Tokens every sequence starts with, leaving at least one token of each after it (the
    reward is read at the last token, which must be computed with the response), and at most
    `cap` (DPO scores the response tokens, which must all come after the prefix)."""
    limit = min(len(s) for s in seqs) - 1
    if cap is not None:
        limit = min(limit, cap)
    return min(len(commonprefix([list(s) for s in seqs])), limit)


def scorer_inputs(batch: dict[str, torch.Tensor], device: Any = None) -> dict[str, torch.Tensor]:
    """The tensors RewardScorer.forward takes, from a collate_rankings batch."""
    keys = ["input_ids", "attention_mask"]
    if "prefix_ids" in batch:
        keys += ["prefix_ids", "prefix_mask", "row_prompt"]
    return {k: batch[k].to(device) if device is not None else batch[k] for k in keys}


class RewardScorer(torch.nn.Module):
    """(input_ids, attention_mask) -> reward at the last real token, (B, T) -> (B,): the
    (possibly LoRA) sequence-classification model as ONE forward for DDP and autocast."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # the score head runs in fp32 (models.score_at_last_token)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        row_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of whole sequences, or (prefix_*, row_prompt given) of responses that
        continue their prompt's shared prefix (collate_rankings(share_prefix=True))."""
        model = models.unwrap_peft(self.model)
        if prefix_ids is None:
            return models.sequence_scores(model, input_ids, attention_mask)
        _, hidden = prefix_shared_hidden(
            model, prefix_ids, prefix_mask, row_prompt, input_ids, attention_mask
        )
        return models.score_at_last_token(model, hidden, attention_mask)


@torch.no_grad()
def score_rankings(
    score_fn: Callable[..., torch.Tensor],
    rows: Sequence[dict[str, Any]],
    batch_size: int,
    pad_id: int,
    device: Any = "cpu",
    share_prefix: bool = False,
) -> list[list[float]]:
    """Scores of every response of every prompt, `batch_size` prompts per forward, batched
    in order of length (less padding) and returned in the input order. share_prefix: see
    collate_rankings (score_fn must then be a RewardScorer)."""
    order = sorted(range(len(rows)), key=lambda i: max(map(len, rows[i]["seqs"])))
    out: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate_rankings([rows[i] for i in idx], pad_id, share_prefix=share_prefix)
        scores = score_fn(**scorer_inputs(batch, device))
        flat = scores.float().cpu().tolist()
        for i in idx:
            k = len(rows[i]["seqs"])
            out[i], flat = flat[:k], flat[k:]
    return out


# ------------------------------------------------------------------------------------- metrics


def kendall_tau(scores: Sequence[float], ranking: Sequence[int]) -> float:
    """Kendall's tau between the model's scores and a best-first human order of K responses:
    (concordant - discordant) / C(K,2), a tie in scores counting as neither."""
    k = len(ranking)
    if k < 2:
        raise ValueError("kendall_tau needs at least 2 ranked responses")
    concordant = discordant = 0
    for i in range(k):
        for j in range(i + 1, k):
            d = scores[ranking[i]] - scores[ranking[j]]
            concordant += d > 0
            discordant += d < 0
    return (concordant - discordant) / (k * (k - 1) / 2)


def top1_agreement(scores: Sequence[float], ranking: Sequence[int]) -> float:
    """1 if the highest-scored response is the human's best (1/t if it ties with t-1 others)."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return 1.0 / len(tied) if ranking[0] in tied else 0.0


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and population std, or Nones without values."""
    return (statistics.fmean(values), statistics.pstdev(values)) if values else (None, None)


def _neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x)) if x > -30 else -x


def ranking_metrics(
    scores: Sequence[Sequence[float]],
    pairs: Sequence[Sequence[tuple[int, int]]],
    rankings: Sequence[Sequence[int]],
    margin: float = 0.0,
) -> dict[str, float | int | None]:
    """Metrics over prompts, given each prompt's scores, pairs and best-first order.

    loss: the Bradley-Terry loss as in training (mean over a prompt's pairs, then over
    prompts). accuracy: over all pairs, a tie counts half. chosen_* / rejected_*: mean and
    std of the better / worse reward over pairs. kendall_tau, top1: over prompts with K > 2.
    """
    correct, margins, chosen, rejected = 0.0, [], [], []
    taus, tops, losses = [], [], []
    for s, prs, order in zip(scores, pairs, rankings):
        if prs:
            losses.append(sum(_neg_log_sigmoid(s[b] - s[w] - margin) for b, w in prs) / len(prs))
        for b, w in prs:
            d = s[b] - s[w]
            correct += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
            margins.append(d)
            chosen.append(s[b])
            rejected.append(s[w])
        if len(order) > 2:
            taus.append(kendall_tau(s, order))
            tops.append(top1_agreement(s, order))
    n_pairs = len(margins)
    chosen_mean, chosen_std = _mean_std(chosen)
    rejected_mean, rejected_std = _mean_std(rejected)
    out: dict[str, float | int | None] = {
        "loss": sum(losses) / len(losses) if losses else None,
        "accuracy": correct / n_pairs if n_pairs else None,
        "n_pairs": n_pairs,
        "n_prompts": len(scores),
        "mean_margin": sum(margins) / n_pairs if n_pairs else None,
        "chosen_mean": chosen_mean,
        "chosen_std": chosen_std,
        "rejected_mean": rejected_mean,
        "rejected_std": rejected_std,
    }
    if taus:
        out["kendall_tau"] = sum(taus) / len(taus)
        out["top1"] = sum(tops) / len(tops)
        out["n_rankings"] = len(taus)
    return out


def calibration(scores: Sequence[float]) -> dict[str, float | int]:
    """Mean and (population) std of rewards, stored with the model so PPO can normalise."""
    mean, std = _mean_std([float(s) for s in scores])
    if mean is None:
        raise ValueError("calibration needs at least one score")
    return {"mean": mean, "std": std, "n": len(scores)}
