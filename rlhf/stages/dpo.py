"""Direct preference optimisation (Rafailov et al. 2023) from the same rankings as the reward
stage, on the stage runner (rlhf/stages/runner.py).

  * policy and reference: the finished SFT run's model (`dpo.sft_dir`). With LoRA the
    reference is the policy with its adapter disabled, without LoRA a frozen full copy.
  * data: K-way rankings as all K(K-1)/2 pairs or the best against each other (`dpo.pairs`),
    batched as the reward stage batches them (rlhf/roles/preference.py); held-out: all pairs.
  * the loss: rlhf.algo.dpo on the summed response log-probs, a step's loss the mean over the
    pairs of the WHOLE optimizer step, across micro-batches and ranks.
  * evaluation: the implicit reward on a fixed sample of held-out pairs (`dpo.eval_pairs`),
    then the comparison with SFT on held-out prompts (rlhf/evaluation.py), as PPO's.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhf import data, evaluation
from rlhf.algo.dpo import pair_losses
from rlhf.infra import distributed
from rlhf.infra.errors import UserError
from rlhf.infra.rundir import require_completed
from rlhf.recipe import EvalJudgeConfig
from rlhf.roles import models, reward_sources
from rlhf.roles import preference as pref
from rlhf.roles.actor_critic import ActorCritic, disable_dropout
from rlhf.stages.ppo import load_fitted, scorer_loader
from rlhf.stages.runner import (
    Objective,
    Prepared,
    StageRun,
    evaluating,
    prepare_supervised,
    rank_batches,
    shuffled_loader,
    train_supervised,
)

log = logging.getLogger(__name__)


def sft_model_dir(recipe: Any) -> Path:
    cfg = recipe.dpo
    sft_dir = Path(cfg.sft_dir) if cfg.sft_dir else recipe.stage_dir("sft")
    return require_completed(sft_dir, "dpo.sft_dir: the SFT run") / "model"


# ------------------------------------------------------------------------------------ data


def eval_subset(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed seeded sample of `size` held-out pairs (all when 0 or fewer exist): they are
    scored every eval_every steps, so their count sets what an eval costs."""
    if size == 0 or size >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in sorted(order[:size].tolist())]


def pair_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """An encoded ranking's pairs, one row of two responses each (better first)."""
    return [
        {
            "seqs": [row["seqs"][b], row["seqs"][w]],
            "pairs": [(0, 1)],
            "prompt_len": row["prompt_len"],
        }
        for b, w in row["pairs"]
    ]


@dataclass
class Pairs:
    """What the stage trains and evaluates on, every check done before a model loads."""

    train_rows: list[dict]  # encoded rankings with their `dpo.pairs`
    eval_rankings: int
    held_out: int  # every held-out pair
    eval_rows: list[dict]  # the sample of them scored, one pair a row
    eval_prompts: list  # for the generation eval

    @property
    def train_pairs(self) -> int:
        return sum(len(r["pairs"]) for r in self.train_rows)


def load_pairs(recipe: Any, tokenizer: Any) -> Pairs:
    cfg = recipe.dpo
    train_items, eval_items = data.load_train_eval(recipe, "dpo", "comparisons")
    fit = lambda items: data.fit_prompts(items, tokenizer, cfg.max_length, recipe.data)  # noqa: E731
    train_items, eval_items = fit(train_items), fit(eval_items)

    def encode(items: list, mode: str) -> list[dict]:
        rows = [pref.encode_ranking(tokenizer, r, mode, cfg.max_length) for r in items]
        return [r for r in rows if r["pairs"]]

    train_rows = encode(train_items, cfg.pairs)
    if not train_rows:
        raise UserError(f"{cfg.train.path}: no ranking with at least two responses")
    held_out = [p for row in encode(eval_items, "all") for p in pair_rows(row)]
    eval_rows = eval_subset(held_out, cfg.eval_pairs, recipe.seed)
    # the generation eval's prompts: dpo.eval_prompts, else ppo.eval_prompts (or none)
    source = cfg.eval_prompts or recipe.ppo.eval_prompts
    prompts = load_fitted(recipe, tokenizer, source) if source else []
    return Pairs(train_rows, len(eval_items), len(held_out), eval_rows, prompts)


# ---------------------------------------------------------------------------------- models


def load_models(recipe: Any, init_from: Path, accelerator: Any) -> tuple[Any, Any]:
    """(policy, frozen reference): the SFT weights with dropout off (the policy with LoRA /
    checkpointing), the reference a second copy, or None under LoRA (the adapter disabled)."""
    cfg = recipe.dpo
    load = partial(models.load_recipe_model, recipe.model, "lm", str(init_from))
    policy = load()
    disable_dropout(policy)
    policy = models.prepare_for_training(policy, cfg.lora, cfg.gradient_checkpointing, "CAUSAL_LM")
    if cfg.lora.enabled:
        return policy, None
    with distributed.unsharded_init(accelerator):
        reference = load().to(accelerator.device).eval()
    disable_dropout(reference)
    return policy, reference.requires_grad_(False)


def reference_logps(model: Any, reference: Any, batch: dict, accelerator: Any) -> torch.Tensor:
    """The reference's response_logps under no_grad: the frozen copy, or the prepared policy
    `model` (wrapped: the forward every rank runs in step) with its adapter disabled."""
    with torch.no_grad():
        if reference is not None:
            return pref.response_logps(reference, batch)
        with accelerator.unwrap_model(model).model.disable_adapter():
            return model(batch)


def dpo_objective(model: Any, reference: Any, cfg: Any, accelerator: Any) -> Objective:
    """A step's loss: the summed pair losses of its rankings, divided by the step's pairs."""

    def loss_and_stats(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ref = reference_logps(model, reference, batch, accelerator)
        policy = model(batch)
        losses = pair_losses(policy, ref, batch, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        return losses.sum(), step_stats(losses, policy, ref, batch, cfg.beta)

    return Objective(lambda b: b["n_pairs"], loss_and_stats, step_metrics)


@torch.no_grad()
def step_stats(
    losses: torch.Tensor, policy: torch.Tensor, ref: torch.Tensor, batch: dict, beta: float
) -> torch.Tensor:
    """[loss, chosen reward, rejected reward, correct (ties half), chosen logp, rejected logp],
    each summed over the batch's pairs."""
    better, worse = batch["better"], batch["worse"]
    rewards = beta * (policy - ref).double()
    chosen, rejected = rewards[better], rewards[worse]
    correct = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    sums = [losses.double(), chosen, rejected, correct, policy[better], policy[worse]]
    return torch.stack([x.double().sum() for x in sums])


def step_metrics(totals: torch.Tensor, pairs: torch.Tensor) -> dict[str, float]:
    """step_stats summed over a step's micro-batches and ranks -> the logged train/ metrics."""
    mean = (totals / pairs.clamp(min=1)).tolist()
    return {
        "train/loss": mean[0],
        "train/rewards/chosen": mean[1],
        "train/rewards/rejected": mean[2],
        "train/rewards/margins": mean[1] - mean[2],
        "train/rewards/accuracies": mean[3],
        "train/logps/chosen": mean[4],
        "train/logps/rejected": mean[5],
        "train/pairs": pairs.item(),
    }


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def implicit_reward_eval(
    model: Any, reference: Any, batches: list[dict], n_pairs: int, cfg: Any, accelerator: Any
) -> dict[str, Any]:
    """Loss, preference accuracy and margins of the implicit reward on the `n_pairs` held-out
    pairs, `batches` this rank's rank_batches of them, gathered by index."""
    per_pair = [torch.zeros(0, 3, dtype=torch.float64, device=accelerator.device)]
    with evaluating(accelerator, model) as unwrapped:
        policy = unwrapped.model
        for batch in batches:
            logps = pref.response_logps(policy, batch)
            with policy.disable_adapter() if reference is None else nullcontext():
                ref = pref.response_logps(policy if reference is None else reference, batch)
            losses = pair_losses(logps, ref, batch, cfg.beta, cfg.loss_type, cfg.label_smoothing)
            rewards = cfg.beta * (logps - ref).double()
            chosen, rejected = rewards[batch["better"]], rewards[batch["worse"]]
            per_pair.append(torch.stack([losses.double(), chosen, rejected], dim=1))
    values = distributed.gather_evaluated(accelerator, torch.cat(per_pair), n_pairs).cpu()
    metrics = pref.implicit_reward_metrics(values[:, 1], values[:, 2])
    return {**metrics, "loss": values[:, 0].mean().item()} if n_pairs else metrics


def eval_log(preference: dict[str, Any]) -> dict[str, float]:
    """The implicit-reward evaluation as eval/ curves, named as the train/ ones."""
    if not preference.get("pairs"):
        return {}
    return {
        "eval/loss": preference["loss"],
        "eval/rewards/chosen": preference["chosen_reward"],
        "eval/rewards/rejected": preference["rejected_reward"],
        "eval/rewards/margins": preference["margin"],
        "eval/rewards/accuracies": preference["accuracy"],
    }


def judge_entries(recipe: Any) -> list[Any]:
    """eval.judges with the trained reward model first (ppo.reward_dir, default
    <output_dir>/reward; skipped when absent): DPO never saw it, PPO trains against it."""
    reward = recipe.ppo.reward_dir or "{output_dir}/reward"
    expand = lambda p: reward_sources.expand_path(p, recipe.output_dir)  # noqa: E731
    judges = list(recipe.eval.judges)
    if any(j.model is not None and expand(j.model) == expand(reward) for j in judges):
        return judges
    return [EvalJudgeConfig(model=reward, name="reward"), *judges]


def generation_eval(
    model: Any, reference: Any, recipe: Any, tokenizer: Any, prompts: list, accelerator: Any
) -> dict[str, Any]:
    """DPO policy vs the SFT policy on held-out prompts, exactly as the PPO stage evaluates:
    same sampling, seeds, judges, answer accuracy, KL to the reference, length, EOS rate.
    `reference` None: the policy with its adapter off."""
    # No training score: every reward model is a judge here.
    scoring = evaluation.Scoring(
        judge_entries(recipe),
        scorer_loader(recipe, accelerator),
        recipe.output_dir,
        classify=evaluation.rubric_classify(),
    )
    policy = accelerator.unwrap_model(model).model
    # FSDP2: the root's own parameters stay gathered for the whole generation; ZeRO-3's hooks
    # gather layer by layer by themselves. Every rank generates in step.
    with distributed.gathered_for_generation(accelerator, model):
        results, samples = evaluation.evaluate_stage(
            ActorCritic(policy, with_values=False),
            reference,
            tokenizer,
            prompts[: recipe.ppo.eval_size],
            recipe,
            accelerator,
            scoring,
            "dpo",
            log.info,
        )
    # DPO trains at temperature 1; its samples and KL are at the PPO stage's temperature.
    log.info(
        "dpo: KL to the SFT policy %.3f, measured at temperature %g (ppo.temperature)",
        results["kl_mean"],
        results["kl_temperature"],
    )
    return {**results, "samples": samples[:8]}


# ----------------------------------------------------------------------------------- stage


def run(recipe: Any, resume: bool = False) -> Path:
    cfg = recipe.dpo
    init_from = sft_model_dir(recipe)
    stage = StageRun(recipe, "dpo", grad_accum=cfg.grad_accum)
    accelerator = stage.accelerator
    # --- data and tokenizer (all validation happens before the model loads)
    tokenizer = models.load_recipe_tokenizer(recipe.model, str(init_from))
    pairs = load_pairs(recipe, tokenizer)
    # Prefix sharing needs the KV cache, which transformers turns off under checkpointing.
    collate = partial(
        pref.collate_rankings,
        pad_id=tokenizer.pad_token_id,
        share_prefix=not cfg.gradient_checkpointing,
    )
    loader, generator = shuffled_loader(pairs.train_rows, cfg.batch_size, collate, recipe.seed)
    # --- models: the policy inside the module accelerate prepares, the reference beside it
    policy, reference = load_models(recipe, init_from, accelerator)
    prepared = prepare_supervised(accelerator, pref.ResponseLogps(policy), loader, cfg)
    model = prepared.model
    eval_batches = rank_batches(pairs.eval_rows, cfg.batch_size, collate, accelerator)
    state = begin(stage, resume, prepared, init_from, pairs, reference)

    # --- train: one step is the pair losses of a window's rankings
    def evaluate_now() -> dict[str, Any]:
        if not pairs.eval_rows:
            return {}
        n = len(pairs.eval_rows)
        return implicit_reward_eval(model, reference, eval_batches, n, cfg, accelerator)

    objective = dpo_objective(model, reference, cfg, accelerator)
    evaluate_logged = lambda: eval_log(evaluate_now())  # noqa: E731
    train_supervised(stage, prepared, cfg, generator, state, objective, evaluate_logged)

    # --- evaluate and save
    results: dict[str, Any] = {}
    if pairs.eval_rows:
        results["preference"] = evaluate_now()
        preference_log = {f"eval/preference/{k}": v for k, v in results["preference"].items()}
        stage.log(prepared.total_steps, {**eval_log(results["preference"]), **preference_log})
    if pairs.eval_prompts:
        results.update(
            generation_eval(model, reference, recipe, tokenizer, pairs.eval_prompts, accelerator)
        )
        results["prompts_source"] = "dpo.eval_prompts" if cfg.eval_prompts else "ppo.eval_prompts"
    results.update(
        steps=prepared.total_steps,
        pairs=cfg.pairs,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        train_pairs=pairs.train_pairs,
        skipped_batches=stage.guard.skipped,
    )
    return save(stage, results, model, tokenizer, init_from)


def begin(
    stage: StageRun, resume: bool, prepared: Prepared, init_from: Path, pairs: Pairs, reference: Any
) -> dict[str, Any]:
    """Start (or resume) the run folder with run.json's account of the run; the trainer state
    to start from."""
    cfg, accelerator = stage.recipe.dpo, stage.accelerator
    state = prepared.begin(
        stage,
        resume,
        init_from=str(init_from),
        pairs=cfg.pairs,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        reference="adapter disabled (LoRA)" if reference is None else "frozen copy of init_from",
        # the elements each rank holds (collectives): the policy sharded under FSDP / ZeRO-3,
        # the frozen reference a full copy on every rank
        parameters_per_rank=distributed.parameters_per_rank(accelerator, prepared.model),
        reference_parameters_per_rank=(
            None if reference is None else distributed.parameters_per_rank(accelerator, reference)
        ),
        effective_batch_rankings=prepared.per_step,
        train_rankings=len(pairs.train_rows),
        train_pairs=pairs.train_pairs,
        eval_rankings=pairs.eval_rankings,
        eval_pairs=len(pairs.eval_rows),
        held_out_pairs=pairs.held_out,
        eval_prompts=min(len(pairs.eval_prompts), stage.recipe.ppo.eval_size),
    )
    log.info(
        "dpo (%s, beta %g): %d train rankings -> %d pairs (%s), %d eval pairs, %d steps, "
        "effective batch %d rankings",
        cfg.loss_type,
        cfg.beta,
        len(pairs.train_rows),
        pairs.train_pairs,
        cfg.pairs,
        len(pairs.eval_rows),
        prepared.total_steps,
        prepared.per_step,
    )
    return state


def save(
    stage: StageRun, results: dict[str, Any], model: Any, tokenizer: Any, init_from: Path
) -> Path:
    """model/ (the policy, LoRA merged when dpo.merge_lora) with its card, eval.json and
    COMPLETED."""
    cfg = stage.recipe.dpo
    accuracy = results.get("preference", {}).get("accuracy")
    card = (
        "DPO policy",
        f"Direct preference optimisation (loss `{cfg.loss_type}`, beta {cfg.beta}), "
        f"{results['steps']} steps from `{init_from}` on {results['train_pairs']} pairs "
        f"({cfg.pairs}). Held-out preference accuracy of the implicit reward: {accuracy}.",
    )
    path = stage.finish(
        results, model, tokenizer, card, cfg.merge_lora, lambda m: m.model, prefix="model."
    )
    log.info("dpo: held-out preference accuracy %s", accuracy)
    return path
