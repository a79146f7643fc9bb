"""DPO's policy side: ranked responses batched as the reward stage batches them, and their
summed response log-probs (the loss: rlhf.algo.dpo; the stage: rlhf/stages/dpo.py). A batch
holds a prompt's K ranked responses once each, their shared prefix computed once, and every
pair of the ranking indexes those sequence log-probs.

The implicit reward of a response y to a prompt x is r(x, y) = beta * (log pi(y|x) -
log pi_ref(y|x)) (Rafailov et al. 2023, "Direct Preference Optimization", eq. 5); a pair is
ranked right when r(chosen) > r(rejected).
"""

from __future__ import annotations

from os.path import commonprefix
from typing import Any

import torch

from rlhf.data.types import Ranking
from rlhf.roles import reward_model as reward
from rlhf.roles.models import backbone_hidden_states, unwrap_peft
from rlhf.roles.shared_prefix import prefix_shared_hidden
from rlhf.tokens.chat import render_ids
from rlhf.tokens.sequences import logprobs_from_logits


def ranked_pairs(ranking: Ranking, mode: str) -> list[tuple[int, int]]:
    """(better, worse) response indices. `all`: the K(K-1)/2 pairs the ranking implies;
    `best_vs_rest`: the best response against each of the K-1 others."""
    if mode == "all":
        return ranking.pairs()
    if mode == "best_vs_rest":
        best, *rest = ranking.ranking
        return [(best, worse) for worse in rest]
    raise ValueError(f"unknown pair expansion {mode!r}")


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


def encode_ranking(
    tokenizer: Any, ranking: Ranking, mode: str, max_length: int | None = None
) -> dict[str, Any]:
    """A ranking -> the reward stage's row ({"seqs": K token lists, "pairs"}) plus
    "prompt_len", where the responses' tokens start. Tokens as TRL's DPOTrainer makes them:
    the completion starts where prompt + reply rendered whole diverges from the prompt
    rendered with the generation header; longer sequences keep their start."""
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
        "prompt_len": min(len(commonprefix([prompt, s])) for s in seqs),
    }


def collate_rankings(
    rows: list[dict[str, Any]], pad_id: int, share_prefix: bool = True
) -> dict[str, torch.Tensor]:
    """reward.collate_rankings, shared prefixes capped at each prompt's length (off: whole
    sequences, e.g. under gradient checkpointing, which turns the KV cache off), plus
    `completion_mask`, (R, T): which of input_ids are response tokens, `response_tokens`, (R,):
    how many, and `n_pairs`, (): the number of pairs."""
    batch = reward.collate_rankings(rows, pad_id, share_prefix=share_prefix)
    prompt_len = torch.tensor([row["prompt_len"] for row in rows])[batch["row_prompt"]]
    start = torch.zeros_like(prompt_len)  # where input_ids begin in the whole sequence
    if "prefix_mask" in batch:
        start = batch["prefix_mask"].sum(1)[batch["row_prompt"]]
    position = start[:, None] + torch.arange(batch["input_ids"].shape[1])
    batch["completion_mask"] = batch["attention_mask"] * (position >= prompt_len[:, None])
    batch["response_tokens"] = batch["completion_mask"].sum(1)
    batch["n_pairs"] = torch.tensor(batch["better"].numel())
    return batch


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log pi(token) over each response's completion tokens, (R,): prefixes once, the
    responses on their cache, the LM head on the completion positions only."""
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


class ResponseLogps(torch.nn.Module):
    """batch -> response_logps of the (possibly LoRA) causal LM: the module accelerate prepares,
    so that DDP, FSDP and ZeRO-3 see one forward that contains the LM head."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return response_logps(self.model, batch)
