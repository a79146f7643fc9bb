"""Offline evaluation behind `rlhf eval`: reward-model accuracy on comparisons, perplexity.

  rlhf eval reward MODEL_DIR DATA [--format hh|oasst|pairs|rankings] [--json]
  rlhf eval perplexity MODEL_DIR SFT_DATA

Both reuse the stages' own functions (ranking metrics, pooling, token NLL), so a number printed
here means exactly what the same number in a run's eval.json means.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf import data as datalib
from rlhf.infra import training
from rlhf.infra.errors import UserError
from rlhf.roles import models
from rlhf.roles import reward_model as rm
from rlhf.roles.labelled_nll import answer_nll
from rlhf.tokens.chat import IGNORE_INDEX, encode_sft, pad_batch


@torch.no_grad()
def reward_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    rankings: list,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, Any]:
    """Pairwise accuracy, margin, reward statistics (and Kendall tau / top-1 for K > 2)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [rm.encode_ranking(tokenizer, r, max_length) for r in rankings]
    rows = [r for r in rows if r["pairs"]]
    scorer = rm.RewardScorer(model)
    pad_id = tokenizer.pad_token_id
    scores = rm.score_rankings(scorer, rows, batch_size, pad_id, device, share_prefix=True)
    return rm.ranking_metrics(scores, [r["pairs"] for r in rows], [r["ranking"] for r in rows])


def reward_accuracy_cli(
    model_dir: str,
    data: str,
    fmt: str = "auto",
    batch_size: int = 8,
    max_length: int = 512,
    limit: int | None = None,
) -> dict[str, Any]:
    """`rlhf eval reward`: a reward model folder scored on a comparisons file (or hub id)."""
    if batch_size < 1 or max_length < 8:
        raise UserError("--batch-size must be >= 1 and --max-length >= 8")
    if limit is not None and limit < 1:
        raise UserError("--limit must be >= 1")
    models.resolve(model_dir)  # a missing folder, an adapter folder: one line, now
    source = datalib.as_source(data, fmt, limit)
    rankings = datalib.load_comparisons(source, "error").items
    if not rankings:
        raise UserError(f"{data}: no comparisons found")
    tokenizer = models.load_tokenizer(model_dir)
    models.require_reward_head(model_dir)
    model = models.load_reward_model(model_dir)
    result = reward_accuracy(model, tokenizer, rankings, batch_size, max_length)
    calibration = getattr(model.config, "reward_calibration", None)
    if calibration:
        result["calibration_mean"] = calibration.get("mean")
        result["calibration_std"] = calibration.get("std")
    return {"model": str(model_dir), "data": str(data), **result}


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: list[list[dict]],
    max_length: int = 512,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Token-level perplexity over assistant tokens (the SFT stage's own eval/loss)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [encode_sft(tokenizer, m, max_length) for m in conversations]
    rows = [r for r in rows if any(t != IGNORE_INDEX for t in r["labels"][1:])]

    def padded(chunk: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels = [r["input_ids"] for r in chunk], [r["labels"] for r in chunk]
        batch = pad_batch(ids, tokenizer.pad_token_id, "right", labels)
        return {k: v.to(device) for k, v in batch.items()}

    chunks = (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    nll, tokens = answer_nll(model, (padded(chunk) for chunk in chunks)).tolist()
    return {
        **training.perplexity(nll, tokens),
        "n_conversations": len(rows),
        "n_tokens": int(tokens),
    }


def perplexity_cli(model_dir: str, data: str, max_length: int = 512) -> dict[str, Any]:
    """`rlhf eval perplexity`: a causal LM folder on an SFT (chat) file."""
    if max_length < 8:
        raise UserError("--max-length must be >= 8")
    models.resolve(model_dir)
    examples = datalib.load_sft(datalib.as_source(data), "error").items
    if not examples:
        raise UserError(f"{data}: no conversations found")
    tokenizer = models.load_tokenizer(model_dir)
    model = models.load_causal_lm(model_dir)
    result = perplexity(model, tokenizer, [ex.messages for ex in examples], max_length)
    return {"model": str(model_dir), "data": str(data), **result}
