"""Stage 1: supervised fine-tuning on chat data (InstructGPT step 1), on the stage runner
(rlhf/stages/runner.py): here the data, the model, the step and the evaluation.

Our own loop rather than TRL's SFTTrainer: the loss is normalised by the answer tokens of the
WHOLE optimizer step (all micro-batches, all ranks), so 2 ranks x batch b equals 1 rank x 2b
and gradient accumulation does not overweight short batches.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rlhf import data
from rlhf.algo.sft import n_targets
from rlhf.algo.sft import token_nll_sum as token_nll_sum  # re-exported: its old home
from rlhf.infra import distributed, training
from rlhf.infra.errors import UserError
from rlhf.roles import models
from rlhf.roles.labelled_nll import answer_nll_rows, labelled_nll_sum
from rlhf.stages.runner import (
    Objective,
    StageRun,
    evaluating,
    prepare_supervised,
    rank_batches,
    shuffled_loader,
    train_supervised,
)
from rlhf.tokens.chat import IGNORE_INDEX, encode_sft, pad_batch
from rlhf.tokens.packing import collate_packed, pack_rows

log = logging.getLogger(__name__)


def encode_rows(recipe: Any, tokenizer: Any, items: list) -> list[dict]:
    """Tokenized conversations with answer tokens inside max_length (labels on answers only;
    an over-long prompt keeps its end when data.truncate_long_prompts)."""
    cfg = recipe.sft
    items = data.fit_prompts(items, tokenizer, cfg.max_length, recipe.data)
    keep_end = recipe.data.truncate_long_prompts
    rows = [
        encode_sft(tokenizer, ex.messages, cfg.max_length, cfg.assistant_only_loss, keep_end)
        for ex in items
    ]
    return [r for r in rows if any(t != IGNORE_INDEX for t in r["labels"])]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: list[dict], accelerator: Any, n_rows: int
) -> dict[str, float]:
    """Held-out loss and perplexity over the answer tokens of `n_rows` rows, `loader` this
    rank's rank_batches of them; each row's sums are gathered by its index, so a row that pads
    a rank's share under ZeRO-3 / FSDP counts once."""
    with evaluating(accelerator, model) as unwrapped:
        per_row = answer_nll_rows(unwrapped, loader).to(accelerator.device)
    totals = distributed.gather_evaluated(accelerator, per_row, n_rows).sum(0)
    got = training.perplexity(totals[0].item(), totals[1].item())
    return {"eval/loss": got["loss"], "eval/perplexity": got["perplexity"]}


def run(recipe: Any, resume: bool = False) -> Path:
    cfg = recipe.sft
    stage = StageRun(recipe, "sft", grad_accum=cfg.grad_accum)
    accelerator = stage.accelerator
    # --- data and tokenizer (all validation happens before the model loads)
    tokenizer = models.load_recipe_tokenizer(recipe.model, cfg.init_from)
    train_rows, eval_rows = encode_datasets(recipe, tokenizer)
    embedding_sources = token_embedding_sources(cfg, tokenizer)
    collate = partial(collate_rows, pad_id=tokenizer.pad_token_id)
    loader, generator, packed = train_loader(cfg, train_rows, collate, tokenizer, recipe.seed)
    # --- model
    model = load_model(recipe, tokenizer, embedding_sources)
    prepared = prepare_supervised(accelerator, model, loader, cfg)
    model = prepared.model
    eval_loader = rank_batches(eval_rows, cfg.batch_size, collate, accelerator)
    state = prepared.begin(
        stage,
        resume,
        effective_batch=prepared.per_step,
        train_examples=len(train_rows),
        packed_rows=packed,
        eval_examples=len(eval_rows),
    )
    log.info(
        "sft: %d train / %d eval conversations, %d steps, effective batch %d",
        len(train_rows),
        len(eval_rows),
        prepared.total_steps,
        prepared.per_step,
    )

    # --- train: one step is the summed token NLL of a window over its answer tokens
    def evaluate_now() -> dict[str, float]:
        return evaluate(model, eval_loader, accelerator, len(eval_rows)) if eval_rows else {}

    base_eval = evaluate_now() if state["step"] == 0 else {}
    stage.log(0, base_eval)
    train_supervised(stage, prepared, cfg, generator, state, nll_objective(model), evaluate_now)
    final_eval = evaluate_now()
    stage.log(prepared.total_steps, final_eval)
    results = {
        "base_perplexity": base_eval.get("eval/perplexity"),
        "perplexity": final_eval.get("eval/perplexity"),
        "eval_loss": final_eval.get("eval/loss"),
        "steps": prepared.total_steps,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "skipped_batches": stage.guard.skipped,
    }
    return save(stage, results, model, tokenizer)


def encode_datasets(recipe: Any, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows), tokenized; stops when no training row has an answer."""
    train_items, eval_items = data.load_train_eval(recipe, "sft", "sft")
    train_rows = encode_rows(recipe, tokenizer, train_items)
    eval_rows = encode_rows(recipe, tokenizer, eval_items)
    if not train_rows:
        raise UserError(f"{recipe.sft.train.path}: no example has answer tokens within max_length")
    return train_rows, eval_rows


def nll_objective(model: torch.nn.Module) -> Objective:
    """A step's loss: the summed NLL of its answer tokens, divided by their number."""

    def nll(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # packing restarts positions; the LM head runs on the answer positions only
        loss = labelled_nll_sum(model, batch, position_ids=batch.get("position_ids"))
        return loss, loss.detach()

    def summarise(nll_sum: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        return {"train/loss": (nll_sum / tokens.clamp(min=1)).item(), "train/tokens": tokens.item()}

    return Objective(lambda b: n_targets(b["labels"]), nll, summarise)


def save(stage: StageRun, results: dict[str, Any], model: Any, tokenizer: Any) -> Path:
    """The model folder with its card, eval.json and COMPLETED."""
    card = (
        "SFT model",
        f"Supervised fine-tuning, {results['steps']} steps. Held-out perplexity "
        f"{results['base_perplexity']} (base) -> {results['perplexity']} (this model).",
    )
    path = stage.finish(results, model, tokenizer, card, stage.recipe.sft.merge_lora)
    log.info(
        "sft: perplexity %.3f (base %.3f)",
        results["perplexity"] or math.nan,
        results["base_perplexity"] or math.nan,
    )
    return path


def collate_rows(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    return pad_batch(ids, pad_id, "right", labels)


def train_loader(
    cfg: Any, rows: list[dict], collate: Any, tokenizer: Any, seed: int
) -> tuple[DataLoader, torch.Generator, int | None]:
    """(shuffled loader, its generator, number of packed rows or None). With packing,
    batch_size counts packed rows of up to max_length tokens."""
    if not cfg.packing:
        return *shuffled_loader(rows, cfg.batch_size, collate, seed), None
    packed = pack_rows(rows, cfg.max_length)
    collate = partial(collate_packed, pad_id=tokenizer.pad_token_id)
    return *shuffled_loader(packed, cfg.batch_size, collate, seed), len(packed)


def load_model(
    recipe: Any, tokenizer: Any, embedding_sources: dict[int, int] | None = None
) -> torch.nn.Module:
    """The model to fine-tune (sft.init_from or the recipe's), its embedding rows copied as
    `embedding_sources` (token_embedding_sources) says, with LoRA / checkpointing."""
    cfg = recipe.sft
    model = models.load_recipe_model(recipe.model, "lm", cfg.init_from)
    model.config.pad_token_id = tokenizer.pad_token_id
    models.copy_token_embeddings(model, embedding_sources or {})
    return models.prepare_for_training(model, cfg.lora, cfg.gradient_checkpointing, "CAUSAL_LM")


def token_embedding_sources(cfg: Any, tokenizer: Any) -> dict[int, int]:
    """sft.init_token_embeddings as token ids, dst -> src; each must be one known token."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for dst, src in cfg.init_token_embeddings.items():
        for token in (dst, src):
            if token not in vocab:
                raise UserError(
                    f"sft.init_token_embeddings: '{token}' is not one token of the tokenizer"
                )
        ids[vocab[dst]] = vocab[src]
    return ids
