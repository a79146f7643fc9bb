"""DPO's data and bookkeeping around TRL's DPOTrainer: pairs from rankings, metric names, and
the held-out implicit-reward evaluation. The loss itself is TRL's (rlhf/stages/dpo.py).

The implicit reward of a response y to a prompt x is r(x, y) = beta * (log pi(y|x) -
log pi_ref(y|x)) (Rafailov et al. 2023, "Direct Preference Optimization", eq. 5); a pair is
ranked right when r(chosen) > r(rejected).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.data.types import Ranking
from rlhf.sequences import logprobs_from_logits, next_token_logits, next_token_targets


def ranked_pairs(ranking: Ranking, mode: str) -> list[tuple[int, int]]:
    """(better, worse) response indices. `all`: the K(K-1)/2 pairs the ranking implies;
    `best_vs_rest`: the best response against each of the K-1 others."""
    if mode == "all":
        return ranking.pairs()
    if mode == "best_vs_rest":
        best, *rest = ranking.ranking
        return [(best, worse) for worse in rest]
    raise ValueError(f"unknown pair expansion {mode!r}")


def preference_rows(rankings: list[Ranking], mode: str) -> list[dict[str, Any]]:
    """TRL's conversational preference rows: {"prompt": messages, "chosen": [assistant
    message], "rejected": [assistant message]}, one per pair."""
    return [
        {
            "prompt": r.prompt,
            "chosen": [{"role": "assistant", "content": r.responses[better]}],
            "rejected": [{"role": "assistant", "content": r.responses[worse]}],
        }
        for r in rankings
        for better, worse in ranked_pairs(r, mode)
    ]


# TRL / transformers log names that are not `train/<name>` in our key style.
RENAMED = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "learning_rate": "lr",
    "epoch": "epoch",
    "num_input_tokens_seen": "train/tokens_seen",  # in trainer_state.json: survives a resume
}
# Counters that a resume restarts, so a resumed run would log other values than one that was
# never stopped: TRL's `num_tokens` lives on the trainer object, not in its checkpoint
# (transformers' tokens_seen above replaces it); `train_loss`, the summary row's mean loss,
# averages over the steps of the last session only.
DROPPED = {"total_flos", "num_tokens", "eval_num_tokens", "train_loss"}
WALL_CLOCK = ("runtime", "samples_per_second", "steps_per_second", "tokens_per_second")


def contract_key(name: str) -> str | None:
    """A Trainer log name in our metrics.jsonl style (None: not a metric we keep).

    loss -> train/loss, rewards/margins -> train/rewards/margins, eval_rewards/accuracies ->
    eval/rewards/accuracies, eval_runtime -> timing/eval_runtime, train_runtime ->
    timing/train_runtime, learning_rate -> lr.
    """
    if name in DROPPED:
        return None
    if name in RENAMED:
        return RENAMED[name]
    for prefix in ("eval_", "train_"):
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if rest in WALL_CLOCK:
                return f"timing/{name}"
            return f"{prefix[:-1]}/{rest}"
    return f"train/{name}"


def contract_metrics(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in logs.items():
        key = contract_key(name)
        if key is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def completion_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Sum of log pi(token) over each row's completion tokens (logits at t predict t + 1)."""
    token_logps = logprobs_from_logits(next_token_logits(logits), next_token_targets(input_ids))
    return (token_logps * next_token_targets(completion_mask)).sum(dim=1)


def implicit_reward_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, float | int]:
    """Held-out preference accuracy (ties count half, as the reward stage counts them) and the
    mean implicit rewards and margin over all pairs."""
    margins = (chosen_rewards - rejected_rewards).double()
    n = margins.numel()
    if n == 0:
        return {"pairs": 0}
    correct = (margins > 0).double() + 0.5 * (margins == 0).double()
    return {
        "pairs": n,
        "accuracy": correct.mean().item(),
        "margin": margins.mean().item(),
        "chosen_reward": chosen_rewards.double().mean().item(),
        "rejected_reward": rejected_rewards.double().mean().item(),
    }
