"""Offline evaluation behind `rlhf eval`: reward-model accuracy on comparisons, perplexity.

  rlhf eval reward MODEL_DIR DATA [--format hh|oasst|pairs|rankings] [--json]
  rlhf eval perplexity MODEL_DIR SFT_DATA

Both reuse the stages' own functions (ranking metrics, pooling, token NLL), so a number printed
here means exactly what the same number in a run's eval.json means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rlhf import data as datalib
from rlhf import models, training
from rlhf import reward as rm
from rlhf.chat import IGNORE_INDEX, encode_sft, pad_batch
from rlhf.errors import UserError


def _source(path: str, fmt: str = "auto", limit: int | None = None) -> Any:
    """A DataSource for a CLI path or hub id (one-line UserError when it is missing)."""
    source = datalib.as_source(path, fmt)
    return source.model_copy(update={"limit": limit}) if limit is not None else source


def _check_model_dir(model_dir: str) -> None:
    path = Path(model_dir)
    if path.exists() and not (path / "config.json").is_file():
        hint = (
            " (a LoRA adapter folder? save with merge_lora: true)"
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise UserError(f"{model_dir}: not a model folder (no config.json){hint}")


def _require_reward_head(model_dir: str) -> None:
    """A causal LM (e.g. an SFT model) would get a RANDOM score head: refuse, in one line."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(models.resolve(model_dir))
    except OSError:
        return  # a hub id we cannot reach: load_reward_model reports it
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(
            f"{model_dir}: not a reward model ({', '.join(archs)}); its score head would be "
            "random. Train one with `rlhf reward` or pass a *ForSequenceClassification model"
        )


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
    _check_model_dir(model_dir)
    source = _source(data, fmt, limit)
    rankings = datalib.load_comparisons(source, "error").items
    if not rankings:
        raise UserError(f"{data}: no comparisons found")
    tokenizer = models.load_tokenizer(model_dir)
    _require_reward_head(model_dir)
    model = models.load_reward_model(model_dir)
    result = reward_accuracy(model, tokenizer, rankings, batch_size, max_length)
    calibration = getattr(model.config, "reward_calibration", None)
    if calibration:
        result["calibration_mean"] = calibration.get("mean")
        result["calibration_std"] = calibration.get("std")
    return {"model": str(model_dir), "data": str(data), **result}


@torch.no_grad()
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
    nll, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = pad_batch(
            [r["input_ids"] for r in chunk],
            tokenizer.pad_token_id,
            "right",
            [r["labels"] for r in chunk],
        )
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        labels = batch["labels"].to(device)
        nll += training.token_nll_sum(logits, labels).item()
        tokens += int(training.n_targets(labels))
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "n_conversations": len(rows),
        "n_tokens": tokens,
    }


def perplexity_cli(model_dir: str, data: str, max_length: int = 512) -> dict[str, Any]:
    """`rlhf eval perplexity`: a causal LM folder on an SFT (chat) file."""
    if max_length < 8:
        raise UserError("--max-length must be >= 8")
    _check_model_dir(model_dir)
    examples = datalib.load_sft(_source(data), "error").items
    if not examples:
        raise UserError(f"{data}: no conversations found")
    tokenizer = models.load_tokenizer(model_dir)
    model = models.load_causal_lm(model_dir)
    result = perplexity(model, tokenizer, [ex.messages for ex in examples], max_length)
    return {"model": str(model_dir), "data": str(data), **result}
