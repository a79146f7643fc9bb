"""DPO's data and bookkeeping around TRL's DPOTrainer: pairs from rankings, metric names, and
the held-out implicit-reward evaluation. The stage trains with TRL's loss (rlhf/stages/dpo.py).

Also the reward stage's batching for DPO (the loss: rlhf.algo.dpo), which the bench times
against TRL's step: a prompt's K ranked responses in one batch, their shared prefix computed
once, each response forwarded once per model (policy; reference), and every pair of the ranking
indexing those sequence log-probs. TRL forwards the chosen and the rejected sequence of each pair, so a
response in several pairs is computed several times, each with the whole prompt.

The implicit reward of a response y to a prompt x is r(x, y) = beta * (log pi(y|x) -
log pi_ref(y|x)) (Rafailov et al. 2023, "Direct Preference Optimization", eq. 5); a pair is
ranked right when r(chosen) > r(rejected).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.data.types import Ranking
from rlhf.roles import reward_model as reward
from rlhf.roles.models import backbone_hidden_states, unwrap_peft
from rlhf.roles.shared_prefix import prefix_shared_hidden
from rlhf.tokens.chat import render_ids
from rlhf.tokens.sequences import logprobs_from_logits, next_token_logits, next_token_targets


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


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_ranking(
    tokenizer: Any, ranking: Ranking, mode: str, max_length: int | None = None
) -> dict[str, Any]:
    """A ranking -> the reward stage's row ({"seqs": K token lists, "pairs"}) plus
    "prompt_len", where the responses' tokens start.

    Tokens as TRL's DPOTrainer makes them, so both losses see the same sequences: the prompt
    rendered with the generation header, prompt + reply rendered whole, and the completion
    starting where the two diverge. Longer sequences keep their start (TRL's keep_start).
    """
    prompt = render_ids(tokenizer, ranking.prompt, add_generation_prompt=True)
    seqs = [
        render_ids(tokenizer, [*ranking.prompt, {"role": "assistant", "content": r}], False)
        for r in ranking.responses
    ]
    if max_length is not None:
        seqs = [s[:max_length] for s in seqs]
    return {
        "seqs": seqs,
        "pairs": ranked_pairs(ranking, mode),
        "prompt_len": min(common_prefix_length(prompt, s) for s in seqs),
    }


def collate_rankings(
    rows: list[dict[str, Any]], pad_id: int, share_prefix: bool = True
) -> dict[str, torch.Tensor]:
    """reward.collate_rankings, shared prefixes capped at each prompt's length (off: whole
    sequences, e.g. under gradient checkpointing, which turns the KV cache off), plus
    `completion_mask`, (R, T): which of input_ids are response tokens."""
    batch = reward.collate_rankings(rows, pad_id, share_prefix=share_prefix)
    prompt_len = torch.tensor([row["prompt_len"] for row in rows])[batch["row_prompt"]]
    start = torch.zeros_like(prompt_len)  # where input_ids begin in the whole sequence
    if "prefix_mask" in batch:
        start = batch["prefix_mask"].sum(1)[batch["row_prompt"]]
    position = start[:, None] + torch.arange(batch["input_ids"].shape[1])
    batch["completion_mask"] = batch["attention_mask"] * (position >= prompt_len[:, None])
    return batch


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log pi(token) over each response's completion tokens, (R,), one forward per
    batch: prefixes once, the responses on their cache (roles/shared_prefix.py). The LM
    head runs on the completion positions only, not the (R, T, vocab) logits of every one."""
    model = unwrap_peft(model)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    if "prefix_ids" in batch:
        prefix, hidden = prefix_shared_hidden(
            model,
            batch["prefix_ids"],
            batch["prefix_mask"],
            batch["row_prompt"],
            ids,
            batch["attention_mask"],
        )
        # The last prefix position predicts the first token after it (left padding puts every
        # prefix's last token in the last column).
        hidden = torch.cat([prefix[batch["row_prompt"], -1:], hidden[:, :-1]], dim=1)
    else:
        hidden = backbone_hidden_states(model, ids, batch["attention_mask"])[:, :-1]
        ids, mask = ids[:, 1:], mask[:, 1:]
    picked = mask.bool()
    logits = model.get_output_embeddings()(hidden[picked])
    token_logps = logprobs_from_logits(logits, ids[picked], temperature=1.0)
    row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(picked)[picked]
    return torch.zeros(ids.shape[0], device=ids.device).index_add(0, row, token_logps)
