"""Stage 2: a scalar reward model trained on human rankings (InstructGPT step 2, sec. 3.5).

An `AutoModelForSequenceClassification` head (`num_labels=1`) on the SFT model (or
`reward.init_from`), read at the last real token (`models.sequence_scores`, right or left
padding), trained with the Bradley-Terry loss of `rlhf.reward`:

  * a batch is a set of PROMPTS; each brings its K ranked responses and all K(K-1)/2 pairs;
    every response is scored once per step (one forward over the flattened responses);
  * a prompt's loss is the mean over its pairs and the step's loss the mean over its prompts
    (InstructGPT's 1/C(K,2)), normalised by the number of prompts in the WHOLE optimizer step
    across micro-batches and ranks, so 2 ranks x b prompts equals 1 rank x 2b (as sft.py does
    with tokens).

At the end the mean/std of the rewards of up to `calibration_size` training responses are
stored with the model (`model/config.json: reward_calibration` and
`model/reward_calibration.json`) so that PPO can normalise scores.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from rlhf import checkpoint, data, distributed, models, training
from rlhf import reward as rm
from rlhf.errors import UserError
from rlhf.progress import Progress
from rlhf.rundir import RunDir, require_completed, write_json_atomic
from rlhf.runtime import make_accelerator, run_info
from rlhf.signals import Interrupted, StopSignal
from rlhf.tracking import MetricsLogger

log = logging.getLogger(__name__)


def init_model_name(recipe: Any) -> str:
    """`reward.init_from`, else the finished SFT run's model (which must have COMPLETED)."""
    if recipe.reward.init_from:
        return recipe.reward.init_from
    sft_dir = require_completed(recipe.stage_dir("sft"), "sft run")
    return str(sft_dir / "model")


def source_name(source: Any) -> str:
    """A metric-key-safe name from a data source: `../x/oasst_en_trees.jsonl` -> oasst_en_trees.
    A hub source with a local copy is named after the copy, whether or not the copy is used."""
    name = Path(source.local or source.path).name
    for ext in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
        name = name.removesuffix(ext)
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "extra"


# The halves must not move with the seed: the judge (another seed) trains on the other one.
HALF_SPLIT_SALT = 0


def half_of(items: list, subset: str) -> list:
    """`reward.subset`: all items, or one of two disjoint halves, split by prompt."""
    if subset == "all":
        return items
    first, second = data.split_by_prompt(items, 0.5, HALF_SPLIT_SALT)
    return first if subset == "first_half" else second


def load_datasets(recipe: Any) -> tuple[list, list, dict[str, list]]:
    """(train rankings, eval rankings, {extra name: rankings}); eval never overlaps train."""
    cfg = recipe.reward
    if cfg.train is None:
        raise UserError(f"{recipe._source}: reward.train: missing required key")
    on_invalid = recipe.data.on_invalid
    train = half_of(data.load_comparisons(cfg.train, on_invalid).items, cfg.subset)
    if cfg.eval is not None:
        evals = data.load_comparisons(cfg.eval, on_invalid).items
    elif cfg.eval_fraction > 0:
        train, evals = data.split_by_prompt(train, cfg.eval_fraction, recipe.seed)
    else:
        evals = []
    extras: dict[str, list] = {}
    for source in cfg.extra_eval:
        name = source_name(source)
        while name in extras:
            name += "_"
        extras[name] = data.load_comparisons(source, on_invalid).items
    return train, evals, extras


def evaluate(
    scorer: torch.nn.Module,
    rows: list[dict],
    batch_size: int,
    pad_id: int,
    accelerator: Any,
    margin: float = 0.0,
    share_prefix: bool = False,
) -> dict[str, Any]:
    """Ranking metrics over `rows`; each rank scores a disjoint slice, gathered before the math."""
    # Score with the unwrapped module: ranks hold different numbers of rows, and a DDP forward
    # runs collectives (buffer broadcast) that would pair up wrongly and hang.
    wrapped, scorer = scorer, accelerator.unwrap_model(scorer)
    was_training = scorer.training
    scorer.eval()
    world = accelerator.num_processes
    mine = distributed.rank_indices(len(rows), accelerator)  # sharded: equal shares
    with accelerator.autocast(), distributed.gathered_for_generation(accelerator, wrapped):
        scores = rm.score_rankings(
            scorer, [rows[i] for i in mine], batch_size, pad_id, accelerator.device, share_prefix
        )
    gathered = (
        dict(gather_object(list(zip(mine, scores)))) if world > 1 else dict(zip(mine, scores))
    )
    scorer.train(was_training)
    ordered = [gathered[i] for i in range(len(rows))]
    pairs, orders = [r["pairs"] for r in rows], [r["ranking"] for r in rows]
    return rm.ranking_metrics(ordered, pairs, orders, margin)


def evaluate_all(
    scorer: torch.nn.Module, sets: dict[str, list[dict]], cfg: Any, pad_id: int, accelerator: Any
) -> dict[str, dict[str, Any]]:
    return {
        name: evaluate(
            scorer, rows, cfg.batch_size, pad_id, accelerator, cfg.margin, shares_prefix(cfg)
        )
        for name, rows in sets.items()
        if rows
    }


def shares_prefix(cfg: Any) -> bool:
    """Prefix sharing needs the KV cache, which transformers turns off under checkpointing."""
    return cfg.share_prefix and not cfg.gradient_checkpointing


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"eval": {"accuracy": ..}, "eval_oasst": {..}} -> {"eval/accuracy": .., ...}."""
    return {
        f"{name}/{key}": value
        for name, metrics in results.items()
        for key, value in metrics.items()
        if value is not None
    }


def calibrate(
    scorer: torch.nn.Module,
    train_rows: list[dict],
    cfg: Any,
    pad_id: int,
    seed: int,
    accelerator: Any,
) -> dict[str, float]:
    """Mean/std of the rewards of up to `calibration_size` training responses (seeded sample)."""
    seqs = [s for row in train_rows for s in row["seqs"]]
    picked = sorted(
        random.Random(seed).sample(range(len(seqs)), min(cfg.calibration_size, len(seqs)))
    )
    world = accelerator.num_processes
    mine = [seqs[picked[i]] for i in distributed.rank_indices(len(picked), accelerator)]
    wrapped = scorer
    scorer = accelerator.unwrap_model(scorer)  # uneven slices: no DDP collectives (see evaluate)
    was_training = scorer.training
    scorer.eval()
    with accelerator.autocast(), distributed.gathered_for_generation(accelerator, wrapped):
        scores = rm.score_sequences(scorer, mine, cfg.batch_size * 2, pad_id, accelerator.device)
    scorer.train(was_training)
    if world > 1:
        scores = gather_object(scores)
    return rm.calibration(scores)


def run(recipe: Any, resume: bool = False, stage: str = "reward") -> Path:
    """`stage` names the run folder: "judge" trains the second reward model (rlhf.stages.judge)."""
    cfg = recipe.reward
    init_from = init_model_name(recipe)
    accelerator = make_accelerator(recipe, gradient_accumulation_steps=cfg.grad_accum)
    out = RunDir(recipe.stage_dir(stage), stage, recipe, accelerator.is_main_process, {})

    # --- data and tokenizer (all validation happens before the model loads)
    # The revision pins the recipe's model (a hub id), not a local SFT folder.
    revision = recipe.model.revision if init_from == recipe.model.name else None
    tokenizer = models.load_tokenizer(
        init_from, recipe.model.chat_template, recipe.model.trust_remote_code, revision=revision
    )
    pad_id = tokenizer.pad_token_id
    train_items, eval_items, extra_items = load_datasets(recipe)
    fit = lambda items: data.fit_prompts(items, tokenizer, cfg.max_length, recipe.data)  # noqa: E731
    train_items, eval_items = fit(train_items), fit(eval_items)
    extra_items = {name: fit(items) for name, items in extra_items.items()}
    encode = lambda r: rm.encode_ranking(tokenizer, r, cfg.max_length)  # noqa: E731
    train_rows = [r for r in map(encode, train_items) if r["pairs"]]
    eval_sets = {"eval": [r for r in map(encode, eval_items) if r["pairs"]]}
    for name, items in extra_items.items():
        eval_sets[f"eval_{name}"] = [r for r in map(encode, items) if r["pairs"]]
    if not train_rows:
        raise UserError(f"{cfg.train.path}: no ranking with at least one pair")
    n_train_pairs = sum(len(r["pairs"]) for r in train_rows)
    n_truncated = sum(len(s) >= cfg.max_length for r in train_rows for s in r["seqs"])

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        return rm.collate_rankings(rows, pad_id, "right", shares_prefix(cfg))

    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader = DataLoader(
        train_rows, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=generator
    )

    # --- model: scalar head, pooled at the last real token
    model = models.load_reward_model(
        init_from,
        num_hidden_layers=recipe.model.num_hidden_layers,
        trust_remote_code=recipe.model.trust_remote_code,
        revision=revision,
        attn_implementation=recipe.model.attn_implementation,
    )
    # Plain transformers pooling (last token != pad) then agrees with ours (pad != eos here).
    model.config.pad_token_id = tokenizer.pad_token_id
    # SEQ_CLS: peft keeps the freshly initialised `score` head fully trainable (modules_to_save).
    model = training.prepare_for_training(model, cfg.lora, cfg.gradient_checkpointing, "SEQ_CLS")
    scorer = rm.RewardScorer(model)
    optimizer = training.make_optimizer(scorer, cfg.optim)
    scorer, optimizer, train_loader = accelerator.prepare(scorer, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    scheduler = training.make_scheduler(optimizer, cfg.optim, total_steps)
    world = accelerator.num_processes
    trainable, total = training.trainable_parameters(scorer)
    out.info.update(
        run_info(accelerator),
        init_from=init_from,
        effective_batch_prompts=cfg.batch_size * cfg.grad_accum * world,
        train_prompts=len(train_rows),
        train_pairs=n_train_pairs,
        eval_prompts={k: len(v) for k, v in eval_sets.items()},
        truncated_responses=n_truncated,
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
    logger = MetricsLogger(out.path, "reward", recipe, accelerator)
    log.info(
        "reward: %d train prompts (%d pairs), eval %s, %d steps, effective batch %d prompts "
        "(%d x %d x %d ranks), %d responses truncated to %d tokens",
        len(train_rows),
        n_train_pairs,
        {k: len(v) for k, v in eval_sets.items()},
        total_steps,
        cfg.batch_size * cfg.grad_accum * world,
        cfg.batch_size,
        cfg.grad_accum,
        world,
        n_truncated,
        cfg.max_length,
    )

    base = evaluate_all(scorer, eval_sets, cfg, pad_id, accelerator) if step == 0 else {}
    if base:
        logger.log(0, flat_metrics(base))
    guard = training.NonFiniteGuard(recipe.numerics.on_nonfinite, recipe.numerics.max_consecutive)
    stop = StopSignal().install()
    progress = Progress("reward", total_steps, step, enabled=accelerator.is_main_process)
    scorer.train()
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
            # Normalise by the prompts of the whole optimizer step across all ranks.
            step_prompts = accelerator.reduce(sum(b["n_prompts"] for b in group), "sum")
            # [loss sum over prompts, correct pairs (ties half), pairs, margin sum, responses]
            stats = torch.zeros(5, device=accelerator.device, dtype=torch.float64)
            for batch in training.accumulation_window(accelerator, group):
                with accelerator.accumulate(scorer), accelerator.autocast():
                    scores = scorer(**rm.scorer_inputs(batch))
                    per_prompt = rm.prompt_losses(scores, batch, cfg.margin, cfg.center_coef)
                    # accelerate divides by grad_accum and DDP averages over ranks: undo both.
                    loss = per_prompt.sum() * world * cfg.grad_accum / step_prompts.clamp(min=1)
                    accelerator.backward(loss)
                    grad_norm = training.step_if_finite(
                        accelerator, scorer, optimizer, cfg.optim.max_grad_norm, guard
                    )
                with torch.no_grad():
                    d = (scores[batch["better"]] - scores[batch["worse"]]).double()
                    stats += torch.stack(
                        [
                            per_prompt.detach().sum().double(),
                            ((d > 0).double() + 0.5 * (d == 0).double()).sum(),
                            torch.tensor(float(d.numel()), device=d.device, dtype=torch.float64),
                            d.sum(),
                            torch.tensor(
                                float(scores.numel()), device=d.device, dtype=torch.float64
                            ),
                        ]
                    )
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                totals = accelerator.reduce(stats, "sum")
                now = time.time()
                metrics = {
                    "train/loss": (totals[0] / step_prompts.clamp(min=1)).item(),
                    "train/accuracy": (totals[1] / totals[2].clamp(min=1)).item(),
                    "train/mean_margin": (totals[3] / totals[2].clamp(min=1)).item(),
                    "train/prompts": step_prompts.item(),
                    "train/pairs": totals[2].item(),
                    "train/responses": totals[4].item(),
                    "lr": scheduler.get_last_lr()[0],
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
            if step % cfg.eval_every == 0 and step < total_steps:
                logger.log(
                    step, flat_metrics(evaluate_all(scorer, eval_sets, cfg, pad_id, accelerator))
                )
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

    final = evaluate_all(scorer, eval_sets, cfg, pad_id, accelerator)
    if final:
        logger.log(step, flat_metrics(final))
    calib = calibrate(scorer, train_rows, cfg, pad_id, recipe.seed, accelerator)
    logger.log(step, {"calibration/mean": calib["mean"], "calibration/std": calib["std"]})
    main = final.get("eval", {})
    results: dict[str, Any] = {
        **main,
        "base_accuracy": base.get("eval", {}).get("accuracy"),
        "base": base.get("eval"),
        "extra_eval": {
            name.removeprefix("eval_"): {
                **metrics,
                "base_accuracy": base.get(name, {}).get("accuracy"),
            }
            for name, metrics in final.items()
            if name != "eval"
        },
        "calibration": calib,
        "steps": step,
        "train_prompts": len(train_rows),
        "train_pairs": n_train_pairs,
        "skipped_batches": guard.skipped,
    }
    accelerator.wait_for_everyone()
    full = distributed.full_state_dict(accelerator, scorer, prefix="model.")  # every rank
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(scorer).model
        models.unwrap_peft(inner).config.reward_calibration = calib
        card = training.model_card(
            "Reward model",
            recipe,
            f"Scalar reward model (Bradley-Terry on ranked pairs), {step} steps from "
            f"`{init_from}`. Held-out pairwise accuracy {results['base_accuracy']} (initial) -> "
            f"{results.get('accuracy')} (this model). Rewards are read at the last token; "
            f"calibration (mean/std over {calib['n']} training responses) is in "
            "`reward_calibration.json` and `config.json`.",
        )
        with out.staging(out.model_dir) as tmp:
            training.save_model(inner, tokenizer, tmp, cfg.merge_lora, card, full)
            write_json_atomic(tmp / "reward_calibration.json", calib)
    logger.close()
    out.finish(results)
    accelerator.wait_for_everyone()
    log.info(
        "reward: held-out accuracy %s (initial %s), calibration mean %.3f std %.3f",
        results.get("accuracy"),
        results["base_accuracy"],
        calib["mean"],
        calib["std"],
    )
    return out.path
