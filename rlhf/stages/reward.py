"""Stage 2: a scalar reward model trained on human rankings (InstructGPT step 2, sec. 3.5).

A sequence-classification head (`num_labels=1`) on the SFT model (or `reward.init_from`), read
at the last real token, trained with the Bradley-Terry loss (rlhf.algo.ranking): a batch is a
set of prompts, each with its K ranked responses (each scored once) and all K(K-1)/2 pairs; a
prompt's loss is the mean over its pairs (InstructGPT's 1/C(K,2)), a step's the mean over the
prompts of the WHOLE optimizer step across micro-batches and ranks.

At the end the mean/std of the rewards of up to `calibration_size` training responses are
stored with the model (config.json `reward_calibration`, reward_calibration.json) so that PPO
can normalise scores.
"""

from __future__ import annotations

import logging
import random
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from rlhf import data
from rlhf.algo.ranking import prompt_losses
from rlhf.infra import distributed
from rlhf.infra.errors import UserError
from rlhf.infra.rundir import require_completed
from rlhf.roles import models
from rlhf.roles import reward_model as rm
from rlhf.stages.runner import (
    Objective,
    Prepared,
    StageRun,
    evaluating,
    prepare_supervised,
    shuffled_loader,
    train_supervised,
)

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
    keep = lambda items: half_of(items, cfg.subset)  # noqa: E731
    train, evals = data.load_train_eval(recipe, "reward", "comparisons", keep)
    extras: dict[str, list] = {}
    for source in cfg.extra_eval:
        name = source_name(source)
        while name in extras:
            name += "_"
        extras[name] = data.load_comparisons(source, recipe.data.on_invalid).items
    return train, evals, extras


def score_rows(
    scorer: torch.nn.Module,
    rows: list[dict],
    batch_size: int,
    pad_id: int,
    accelerator: Any,
    share_prefix: bool = False,
) -> list[list[float]]:
    """The scores of every row's responses, in order: each rank scores its share of the rows
    (rm.score_rankings), gathered so that each row counts once whatever the padding of the
    ranks' shares under sharding."""
    mine = distributed.rank_indices(len(rows), accelerator)
    with evaluating(accelerator, scorer) as unwrapped:
        scores = rm.score_rankings(
            unwrapped, [rows[i] for i in mine], batch_size, pad_id, accelerator.device, share_prefix
        )
    pairs = list(zip(mine, scores))
    by_index = dict(gather_object(pairs) if accelerator.num_processes > 1 else pairs)
    return [by_index[i] for i in range(len(rows))]


def evaluate_all(
    scorer: torch.nn.Module, sets: dict[str, list[dict]], cfg: Any, pad_id: int, accelerator: Any
) -> dict[str, dict[str, Any]]:
    """Ranking metrics of each non-empty set of rows, scored by score_rows."""
    results = {}
    for name, rows in sets.items():
        if rows:
            scores = score_rows(
                scorer, rows, cfg.batch_size, pad_id, accelerator, shares_prefix(cfg)
            )
            pairs, orders = [r["pairs"] for r in rows], [r["ranking"] for r in rows]
            results[name] = rm.ranking_metrics(scores, pairs, orders, cfg.margin)
    return results


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
    """Mean/std of the rewards of up to `calibration_size` training responses (seeded sample),
    each counted once; a prompt's sampled responses are scored together (score_rows), their
    shared prefix once with `share_prefix`."""
    where = [(r, k) for r, row in enumerate(train_rows) for k in range(len(row["seqs"]))]
    picked = random.Random(seed).sample(range(len(where)), min(cfg.calibration_size, len(where)))
    by_row: dict[int, list[int]] = {}
    for r, k in sorted(where[i] for i in picked):
        by_row.setdefault(r, []).append(k)
    rows = [
        {"seqs": [train_rows[r]["seqs"][k] for k in ks], "pairs": []} for r, ks in by_row.items()
    ]
    # A prompt brings only some of its responses: twice the training step's prompts a forward.
    scored = score_rows(scorer, rows, cfg.batch_size * 2, pad_id, accelerator, shares_prefix(cfg))
    return rm.calibration([s for row in scored for s in row])


def run(recipe: Any, resume: bool = False, folder: str = "reward") -> Path:
    """`folder` names the run folder: "judge" trains the second reward model (stages/judge.py)."""
    cfg = recipe.reward
    init_from = init_model_name(recipe)
    stage = StageRun(recipe, "reward", grad_accum=cfg.grad_accum, folder=folder)
    accelerator = stage.accelerator
    # --- data and tokenizer (all validation happens before the model loads)
    # The recipe's model gets its revision (a hub id); another folder (SFT's) does not.
    init_folder = None if init_from == recipe.model.name else init_from
    tokenizer = models.load_recipe_tokenizer(recipe.model, init_folder)
    pad_id = tokenizer.pad_token_id
    train_rows, eval_sets = encode_datasets(recipe, tokenizer)
    collate = partial(
        rm.collate_rankings, pad_id=pad_id, side="right", share_prefix=shares_prefix(cfg)
    )
    loader, generator = shuffled_loader(train_rows, cfg.batch_size, collate, recipe.seed)
    # --- model: scalar head, pooled at the last real token
    scorer = rm.RewardScorer(load_model(recipe, init_folder, tokenizer))
    prepared = prepare_supervised(accelerator, scorer, loader, cfg)
    scorer = prepared.model
    state = begin(stage, resume, prepared, init_from, train_rows, eval_sets)

    # --- train: one step is the Bradley-Terry loss of a window's prompts
    def evaluate_now() -> dict[str, dict[str, Any]]:
        return evaluate_all(scorer, eval_sets, cfg, pad_id, accelerator)

    base = evaluate_now() if state["step"] == 0 else {}
    stage.log(0, flat_metrics(base))
    objective = bradley_terry_objective(scorer, cfg)
    evaluate_flat = lambda: flat_metrics(evaluate_now())  # noqa: E731
    train_supervised(stage, prepared, cfg, generator, state, objective, evaluate_flat)

    # --- evaluate, calibrate and save
    final = evaluate_now()
    total_steps = prepared.total_steps
    stage.log(total_steps, flat_metrics(final))
    calib = calibrate(scorer, train_rows, cfg, pad_id, recipe.seed, accelerator)
    stage.log(total_steps, {"calibration/mean": calib["mean"], "calibration/std": calib["std"]})
    results = {
        **eval_results(base, final, calib),
        "steps": total_steps,
        "train_prompts": len(train_rows),
        "train_pairs": stage.out.info["train_pairs"],
        "skipped_batches": stage.guard.skipped,
    }
    return save(stage, results, calib, scorer, tokenizer, init_from)


def begin(
    stage: StageRun,
    resume: bool,
    prepared: Prepared,
    init_from: str,
    train_rows: list[dict],
    eval_sets: dict[str, list[dict]],
) -> dict[str, Any]:
    """Start (or resume) the run folder with run.json's account of the data; the trainer state
    to start from."""
    max_length = stage.recipe.reward.max_length
    eval_sizes = {k: len(v) for k, v in eval_sets.items()}
    state = prepared.begin(
        stage,
        resume,
        init_from=init_from,
        effective_batch_prompts=prepared.per_step,
        train_prompts=len(train_rows),
        train_pairs=sum(len(r["pairs"]) for r in train_rows),
        eval_prompts=eval_sizes,
        truncated_responses=sum(len(s) >= max_length for r in train_rows for s in r["seqs"]),
    )
    info = stage.out.info
    log.info(
        "reward: %d train prompts (%d pairs), eval %s, %d steps, effective batch %d prompts, "
        "%d responses truncated to %d tokens",
        len(train_rows),
        info["train_pairs"],
        eval_sizes,
        prepared.total_steps,
        prepared.per_step,
        info["truncated_responses"],
        max_length,
    )
    return state


def bradley_terry_objective(scorer: torch.nn.Module, cfg: Any) -> Objective:
    """A step's loss: the summed ranking losses of its prompts (algo.ranking), divided by
    their number."""

    def bradley_terry(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        scores = scorer(**rm.scorer_inputs(batch))
        per_prompt = prompt_losses(scores, batch, cfg.margin, cfg.center_coef)
        return per_prompt.sum(), step_stats(per_prompt, scores, batch)

    return Objective(lambda b: b["n_prompts"], bradley_terry, step_metrics)


def save(
    stage: StageRun,
    results: dict[str, Any],
    calib: dict[str, Any],
    scorer: Any,
    tokenizer: Any,
    init_from: str,
) -> Path:
    """The reward model's folder (its calibration in config.json and reward_calibration.json)
    with its card, eval.json and COMPLETED."""
    unwrapped = stage.accelerator.unwrap_model(scorer).model
    models.unwrap_peft(unwrapped).config.reward_calibration = calib
    text = (
        f"Scalar reward model (Bradley-Terry on ranked pairs), {results['steps']} steps from "
        f"`{init_from}`. Held-out pairwise accuracy {results['base_accuracy']} (initial) -> "
        f"{results.get('accuracy')} (this model). Rewards are read at the last token; "
        f"calibration (mean/std over {calib['n']} training responses) is in "
        "`reward_calibration.json` and `config.json`."
    )
    path = stage.finish(
        results,
        scorer,
        tokenizer,
        ("Reward model", text),
        stage.recipe.reward.merge_lora,
        lambda s: s.model,
        prefix="model.",
        extra_files={"reward_calibration.json": calib},
    )
    log.info(
        "reward: held-out accuracy %s (initial %s), calibration mean %.3f std %.3f",
        results.get("accuracy"),
        results["base_accuracy"],
        calib["mean"],
        calib["std"],
    )
    return path


def encode_datasets(recipe: Any, tokenizer: Any) -> tuple[list[dict], dict[str, list[dict]]]:
    """(training rankings, {"eval": .., "eval_<extra>": ..}) tokenized, each with >= 1 pair."""
    cfg = recipe.reward
    train_items, eval_items, extra_items = load_datasets(recipe)

    def fit(items: list) -> list:
        return data.fit_prompts(items, tokenizer, cfg.max_length, recipe.data)

    def encode(items: list) -> list[dict]:
        rows = [rm.encode_ranking(tokenizer, r, cfg.max_length) for r in items]
        return [r for r in rows if r["pairs"]]

    # Every set's length check first: an over-long prompt is named by its file and line even
    # when it landed in the held-out split and left the training set empty.
    train_items, eval_items = fit(train_items), fit(eval_items)
    extra_items = {name: fit(items) for name, items in extra_items.items()}
    train_rows = encode(train_items)
    if not train_rows:
        raise UserError(f"{cfg.train.path}: no ranking with at least one pair")
    eval_sets = {"eval": encode(eval_items)}
    eval_sets.update({f"eval_{name}": encode(items) for name, items in extra_items.items()})
    return train_rows, eval_sets


def load_model(recipe: Any, folder: str | None, tokenizer: Any) -> Any:
    """A sequence-classification model with one label (the reward head) on the recipe's model
    or `folder`, LoRA / checkpointing."""
    cfg = recipe.reward
    model = models.load_recipe_model(recipe.model, "reward", folder)
    # Plain transformers pooling (last token != pad) then agrees with ours (pad != eos here).
    model.config.pad_token_id = tokenizer.pad_token_id
    # SEQ_CLS: peft keeps the freshly initialised `score` head fully trainable (modules_to_save).
    return models.prepare_for_training(model, cfg.lora, cfg.gradient_checkpointing, "SEQ_CLS")


@torch.no_grad()
def step_stats(per_prompt: torch.Tensor, scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """[loss sum over prompts, correct pairs (ties half), pairs, margin sum, responses]."""
    d = (scores[batch["better"]] - scores[batch["worse"]]).double()
    correct = ((d > 0).double() + 0.5 * (d == 0).double()).sum()
    loss = per_prompt.detach().sum().double()
    pairs, responses = d.new_tensor(d.numel()), d.new_tensor(scores.numel())
    return torch.stack([loss, correct, pairs, d.sum(), responses])


def step_metrics(totals: torch.Tensor, prompts: torch.Tensor) -> dict[str, float]:
    """step_stats summed over a step's micro-batches and ranks -> the logged train/ metrics."""
    pairs = totals[2].clamp(min=1)
    return {
        "train/loss": (totals[0] / prompts.clamp(min=1)).item(),
        "train/accuracy": (totals[1] / pairs).item(),
        "train/mean_margin": (totals[3] / pairs).item(),
        "train/prompts": prompts.item(),
        "train/pairs": totals[2].item(),
        "train/responses": totals[4].item(),
    }


def eval_results(base: dict, final: dict, calib: dict) -> dict[str, Any]:
    """eval.json: the main held-out set's metrics at the top, the extra sets below."""
    return {
        **final.get("eval", {}),
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
    }
