"""Stage 1: supervised fine-tuning on chat data (InstructGPT step 1), on accelerate.

Our own loop rather than TRL's SFTTrainer: the loss is normalised by the number of target
tokens in the WHOLE optimizer step (all micro-batches, all ranks), so 2 ranks x batch b equals
1 rank x 2b exactly and gradient accumulation does not overweight short batches; the same loop
resumes from our checkpoints; and nothing hides in a trainer.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rlhf import checkpoint, data, distributed, models, training
from rlhf.chat import IGNORE_INDEX, encode_sft, pad_batch
from rlhf.packing import collate_packed, pack_rows
from rlhf.progress import Progress
from rlhf.rundir import RunDir
from rlhf.runtime import make_accelerator, run_info
from rlhf.signals import Interrupted, StopSignal
from rlhf.tracking import MetricsLogger
from rlhf.training import n_targets, token_nll_sum

log = logging.getLogger(__name__)


def load_datasets(recipe: Any) -> tuple[list, list]:
    cfg = recipe.sft
    if cfg.train is None:
        from rlhf.errors import UserError

        raise UserError(f"{recipe._source}: sft.train: missing required key")
    train = data.load_sft(cfg.train, recipe.data.on_invalid).items
    if cfg.eval is not None:
        evals = data.load_sft(cfg.eval, recipe.data.on_invalid).items
    else:
        train, evals = data.split_by_prompt(train, cfg.eval_fraction, recipe.seed)
    return train, evals


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: list[dict], accelerator: Any) -> dict[str, float]:
    """Held-out loss and perplexity over answer tokens, summed across ranks before dividing."""
    # Unwrapped: ranks may hold different numbers of batches, and a DDP forward runs
    # collectives (buffer broadcast) that would then pair up wrongly and hang.
    wrapped, model = model, accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:  # sharded: same number of batches on every rank (rank_indices)
        with accelerator.autocast(), distributed.gathered_for_generation(accelerator, wrapped):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        totals[0] += token_nll_sum(logits, batch["labels"]).double()
        totals[1] += n_targets(batch["labels"]).double()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def run(recipe: Any, resume: bool = False) -> Path:
    cfg = recipe.sft
    accelerator = make_accelerator(recipe, gradient_accumulation_steps=cfg.grad_accum)
    out = RunDir(recipe.stage_dir("sft"), "sft", recipe, accelerator.is_main_process, {})

    # --- data and tokenizer (all validation happens before the model loads)
    tokenizer = models.load_tokenizer(
        cfg.init_from or recipe.model.name,
        recipe.model.chat_template,
        recipe.model.trust_remote_code,
        revision=None if cfg.init_from else recipe.model.revision,
    )
    train_items, eval_items = load_datasets(recipe)
    train_items = data.fit_prompts(train_items, tokenizer, cfg.max_length, recipe.data)
    eval_items = data.fit_prompts(eval_items, tokenizer, cfg.max_length, recipe.data)
    keep_end = recipe.data.truncate_long_prompts  # over-long: keep the answer, drop the start

    def encode(ex: Any) -> dict[str, list[int]]:
        return encode_sft(tokenizer, ex.messages, cfg.max_length, cfg.assistant_only_loss, keep_end)

    train_rows = [
        r for r in map(encode, train_items) if any(t != IGNORE_INDEX for t in r["labels"])
    ]
    eval_rows = [r for r in map(encode, eval_items) if any(t != IGNORE_INDEX for t in r["labels"])]
    if not train_rows:
        from rlhf.errors import UserError

        raise UserError(f"{cfg.train.path}: no example has answer tokens within max_length")

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(
            [r["input_ids"] for r in rows],
            tokenizer.pad_token_id,
            "right",
            [r["labels"] for r in rows],
        )

    train_data, train_collate = train_rows, collate
    if cfg.packing:  # batch_size then counts packed rows of up to max_length tokens
        train_data = pack_rows(train_rows, cfg.max_length)
        train_collate = lambda bins: collate_packed(bins, tokenizer.pad_token_id)  # noqa: E731
    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader = DataLoader(
        train_data,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=train_collate,
        generator=generator,
    )

    # --- model
    model = models.load_causal_lm(
        cfg.init_from or recipe.model.name,
        num_hidden_layers=recipe.model.num_hidden_layers,
        trust_remote_code=recipe.model.trust_remote_code,
        revision=None if cfg.init_from else recipe.model.revision,
        attn_implementation=recipe.model.attn_implementation,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = training.prepare_for_training(model, cfg.lora, cfg.gradient_checkpointing, "CAUSAL_LM")
    optimizer = training.make_optimizer(model, cfg.optim)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Eval rows are split by rank without padding (a prepared loader would repeat rows to even
    # out the ranks and count them twice); the sums are reduced across ranks.
    eval_loader = [
        {k: v.to(accelerator.device) for k, v in collate(chunk).items()}
        for chunk in _chunks(
            [eval_rows[i] for i in distributed.rank_indices(len(eval_rows), accelerator)],
            cfg.batch_size,
        )
    ]
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    scheduler = training.make_scheduler(optimizer, cfg.optim, total_steps)
    world = accelerator.num_processes
    trainable, total = training.trainable_parameters(model)
    out.info.update(
        run_info(accelerator),
        effective_batch=cfg.batch_size * cfg.grad_accum * world,
        train_examples=len(train_rows),
        packed_rows=len(train_data) if cfg.packing else None,
        eval_examples=len(eval_rows),
        total_steps=total_steps,
        trainable_parameters=trainable,
        parameters=total,
    )

    step, epoch, batches_done = 0, 0, 0
    ckpt = checkpoint.latest_checkpoint(out.checkpoints) if resume else None
    out.start(resume=ckpt is not None, resume_step=checkpoint.step_of(ckpt) if ckpt else None)
    if ckpt is not None:
        state = checkpoint.load_checkpoint(accelerator, ckpt, scheduler)
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        log.info("resumed from %s (step %d)", ckpt, step)
    logger = MetricsLogger(out.path, "sft", recipe, accelerator)
    log.info(
        "sft: %d train / %d eval conversations, %d steps, effective batch %d (%d x %d x %d ranks)",
        len(train_rows),
        len(eval_rows),
        total_steps,
        cfg.batch_size * cfg.grad_accum * world,
        cfg.batch_size,
        cfg.grad_accum,
        world,
    )

    base_eval = evaluate(model, eval_loader, accelerator) if eval_rows and step == 0 else {}
    if base_eval:
        logger.log(0, base_eval)
    guard = training.NonFiniteGuard(recipe.numerics.on_nonfinite, recipe.numerics.max_consecutive)
    stop = StopSignal().install()
    progress = Progress("sft", total_steps, step, enabled=accelerator.is_main_process)
    model.train()
    t_last = time.time()
    while step < total_steps:
        generator.manual_seed(recipe.seed + epoch)  # epoch e always sees the same order
        batches = iter(
            accelerator.skip_first_batches(train_loader, batches_done)
            if batches_done
            else train_loader
        )
        while step < total_steps:
            group = [b for _, b in zip(range(cfg.grad_accum), batches)]
            if not group:
                break
            batches_done += len(group)
            # Normalise by the target tokens of the whole optimizer step across all ranks.
            step_tokens = accelerator.reduce(sum(n_targets(b["labels"]) for b in group), "sum")
            loss_sum = torch.zeros((), device=accelerator.device)
            for batch in training.accumulation_window(accelerator, group):
                with accelerator.accumulate(model), accelerator.autocast():
                    logits = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        position_ids=batch.get("position_ids"),  # packing restarts positions
                    ).logits
                    nll = token_nll_sum(logits, batch["labels"])
                    # accelerate divides by grad_accum and DDP averages over ranks: undo both.
                    loss = nll * world * cfg.grad_accum / step_tokens.clamp(min=1)
                    accelerator.backward(loss)
                    grad_norm = training.step_if_finite(
                        accelerator, model, optimizer, cfg.optim.max_grad_norm, guard
                    )
                loss_sum += nll.detach()
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                global_loss = accelerator.reduce(loss_sum, "sum") / step_tokens.clamp(min=1)
                now = time.time()
                metrics = {
                    "train/loss": global_loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "train/tokens": step_tokens.item(),
                    "epoch": epoch + batches_done / max(1, len(train_loader)),
                    "timing/step": (now - t_last) / cfg.log_every,
                    "train/skipped_batches": guard.skipped,
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                logger.log(step, metrics)
                t_last = now
                progress.note(loss=metrics["train/loss"])
            progress.update(step)
            if eval_rows and step % cfg.eval_every == 0 and step < total_steps:
                logger.log(step, evaluate(model, eval_loader, accelerator))
            signum = stop.requested(accelerator)
            if (cfg.save_every and step % cfg.save_every == 0 or signum) and step < total_steps:
                saved = checkpoint.save_checkpoint(
                    accelerator,
                    out.checkpoints,
                    step,
                    {"step": step, "epoch": epoch, "batches_done": batches_done},
                    scheduler,
                    cfg.keep_last,
                )
                if signum:
                    stop.restore()
                    raise Interrupted(signum, saved)
        if step < total_steps:
            epoch, batches_done = epoch + 1, 0
    progress.close()
    stop.restore()

    final_eval = evaluate(model, eval_loader, accelerator) if eval_rows else {}
    if final_eval:
        logger.log(step, final_eval)
    results = {
        "base_perplexity": base_eval.get("eval/perplexity"),
        "perplexity": final_eval.get("eval/perplexity"),
        "eval_loss": final_eval.get("eval/loss"),
        "steps": step,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "skipped_batches": guard.skipped,
    }
    accelerator.wait_for_everyone()
    full = distributed.full_state_dict(accelerator, model)  # every rank: a collective if sharded
    if accelerator.is_main_process:
        card = training.model_card(
            "SFT model",
            recipe,
            f"Supervised fine-tuning, {step} steps. Held-out perplexity "
            f"{results['base_perplexity']} (base) -> {results['perplexity']} (this model).",
        )
        with out.staging(out.model_dir) as tmp:
            training.save_model(
                accelerator.unwrap_model(model), tokenizer, tmp, cfg.merge_lora, card, full
            )
    logger.close()
    out.finish(results)
    accelerator.wait_for_everyone()
    log.info(
        "sft: perplexity %.3f (base %.3f)",
        results["perplexity"] or float("nan"),
        results["base_perplexity"] or float("nan"),
    )
    return out.path
