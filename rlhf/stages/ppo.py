"""Stage 3: PPO against the reward model with a per-token KL penalty (InstructGPT step 3).

One iteration (Ziegler et al. 2019; "The N Implementation Details of RLHF with PPO"), in
rlhf/ppo/iteration.py:
  1. rollout   prompts -> sampled responses (KV cache), masked after the first EOS
  2. score     policy / reference log-probs, values, reward-model score of (prompt, response)
  3. shape     r_t = -beta * KL_t, plus the (normalised) score at the last response token
  4. GAE       advantages and returns; advantages whitened over the batch (or, with
               ppo.estimator rloo / grpo / reinforce_pp, k samples per prompt and no critic)
  5. update    PPO epochs over minibatches: clipped policy + clipped value loss
The loop, resume, checkpoints and the run folder are the stage runner's; here: the roles and
prompts, one iteration, and the held-out comparison with the SFT policy (rlhf/evaluation.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhf import data, evaluation
from rlhf.algo.ppo import AdaptiveKLController, FixedKLController
from rlhf.infra import distributed, training
from rlhf.infra.errors import UserError
from rlhf.infra.rundir import require_completed
from rlhf.infra.runtime import frozen_weight_dtype
from rlhf.infra.tracking import mean_across_ranks
from rlhf.ppo.calibration import sft_calibration
from rlhf.ppo.iteration import PPOContext, ppo_iteration
from rlhf.ppo.prompts import Prompts, PromptSampler, iteration_seed
from rlhf.ppo.roles import build_roles
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.scorers import SharedScorers, reward_model_scorer
from rlhf.roles import models, reward_sources
from rlhf.roles.actor_critic import ActorCritic
from rlhf.stages.runner import Cadence, StageRun
from rlhf.tokens.chat import last_user_text

log = logging.getLogger(__name__)


def input_dirs(recipe: Any) -> tuple[Path | None, Path | None]:
    """The SFT run folder (None with ppo.policy: base) and the reward run folder (None when no
    source needs the reward stage); each must have finished (COMPLETED)."""
    cfg = recipe.ppo
    sft_dir = None
    if cfg.policy == "sft":
        sft_dir = Path(cfg.sft_dir) if cfg.sft_dir else recipe.stage_dir("sft")
        require_completed(sft_dir, "ppo.sft_dir: the SFT run")
    reward_dir = None
    if cfg.rewards is None or cfg.value_model == "separate":
        reward_dir = reward_sources.legacy_reward_dir(recipe)
    return sft_dir, reward_dir


def run(recipe: Any, resume: bool = False) -> Path:
    cfg = recipe.ppo
    if cfg.prompts is None:
        raise UserError(f"{recipe._source}: ppo.prompts: missing required key")
    sft_dir, reward_dir = input_dirs(recipe)
    stage = StageRun(recipe, "ppo", grad_accum=cfg.grad_accum)
    accelerator = stage.accelerator
    # --- tokenizers and prompts (validated before any model loads)
    policy_name = policy_folder(sft_dir) or recipe.model.name
    tokenizer = load_tokenizers(recipe, policy_name, sft_dir)
    train_items = load_fitted(recipe, tokenizer, cfg.prompts)
    eval_items = load_fitted(recipe, tokenizer, cfg.eval_prompts) if cfg.eval_prompts else []
    prompts = Prompts.encode(train_items, tokenizer, cfg.max_prompt_length)
    # --- roles, reward sources, optimizer; the run folder, fresh or resumed
    roles = build_roles_and_optimizer(recipe, accelerator, sft_dir, reward_dir)
    kl_ctl = kl_controller(cfg, accelerator.num_processes)
    info = run_info_of(recipe, roles, accelerator, policy_name, sft_dir, reward_dir)
    first, calibration = begin(stage, resume, recipe, roles, kl_ctl, tokenizer, prompts, info)
    # --- train: one step is one PPO iteration (rollout, score, advantages, update)
    ctx = PPOContext(
        roles.model,
        roles.reference,
        roles.optimizer,
        roles.scheduler,
        accelerator,
        tokenizer,
        kl_ctl,
        cfg,
        calibration,
        stage.guard,
    )
    evaluate = policy_evaluator(recipe, ctx, roles.unwrapped, roles.sources, roles.load_scorer)
    curve = judge_curve(recipe, tokenizer, evaluate, eval_items or train_items)
    train(stage, ctx, prompts, roles.sources, recipe, first, curve)
    # --- evaluate and save
    results = final_results(evaluate, eval_items, train_items, cfg.eval_size, calibration)
    return save(stage, ctx, results, recipe, policy_name, info["reward_sources"])


def load_tokenizers(recipe: Any, policy_name: str, sft_dir: Path | None) -> Any:
    """The policy's tokenizer (left padding, for batched sampling). Every reward model's is
    loaded too, as it is, so that a model folder without one stops the run in one line before
    any model loads."""
    tokenizer = models.load_tokenizer(
        policy_name,
        None if sft_dir else recipe.model.chat_template,
        recipe.model.trust_remote_code,
        padding_side="left",
    )
    for model_dir in reward_sources.model_dirs(recipe):
        models.load_tokenizer(str(model_dir))
    return tokenizer


@dataclass
class RolesAndOptimizer:
    """The prepared actor-critic and its unwrapped form (training.without_fp32_outputs), the
    reference (None: the policy with its LoRA adapter off), the reward sources and the
    reward-model loader they share with the evaluation, optimizer and scheduler."""

    model: Any
    unwrapped: ActorCritic
    reference: torch.nn.Module | None
    sources: Any
    load_scorer: SharedScorers
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build_roles_and_optimizer(
    recipe: Any, accelerator: Any, sft_dir: Path | None, reward_dir: Path | None
) -> RolesAndOptimizer:
    """Policy (and critic), reference, reward sources, optimizer and scheduler, then
    accelerator.prepare, in this order."""
    cfg, device = recipe.ppo, accelerator.device
    critic_dir = str(reward_dir / "model") if reward_dir else None
    model, reference = build_roles(
        cfg,
        accelerator,
        partial(models.load_recipe_model, recipe.model, "lm", policy_folder(sft_dir)),
        critic_dir,
        recipe.model.attn_implementation,
    )
    # one copy of each reward model for training and evaluation (its judges included)
    load_scorer = SharedScorers(scorer_loader(recipe, accelerator))
    gather = lambda t: accelerator.gather(t.to(device)).cpu()  # noqa: E731
    sources = reward_sources.build(recipe, load_scorer, gather)
    optimizer = training.make_optimizer(model, cfg.optim)
    # one optimizer step per minibatch: ppo_epochs * (batch / mini_batch) per iteration
    updates_per_iter = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    scheduler = training.make_scheduler(optimizer, cfg.optim, cfg.iterations * updates_per_iter)
    distributed.set_deepspeed_micro_batch(accelerator, cfg.mini_batch_size // cfg.grad_accum)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = training.without_fp32_outputs(accelerator, model)
    return RolesAndOptimizer(
        model, unwrapped, reference, sources, load_scorer, optimizer, scheduler
    )


def begin(
    stage: StageRun,
    resume: bool,
    recipe: Any,
    roles: RolesAndOptimizer,
    kl_ctl: Any,
    tokenizer: Any,
    prompts: Prompts,
    info: dict[str, Any],
) -> tuple[int, dict | None]:
    """Start the run folder, fresh or resumed (with the KL controller's and the reward
    sources' state), and set the score's calibration. Returns (the iteration to go on from,
    the calibration normalise_score applies)."""
    cfg, accelerator, sources = recipe.ppo, stage.accelerator, roles.sources
    state = stage.begin(
        resume, roles.scheduler, **info, prompts=len(prompts), calibration=sources.calibration
    )
    if state is not None:
        kl_ctl.load_state_dict(state["kl_controller"])
        sources.load_state_dict(state.get("reward_sources", {}))
    calibration = score_calibration(
        state, roles.unwrapped, roles.reference, sources, tokenizer, prompts, recipe, accelerator
    )
    stage.out.info.update(calibration=calibration, reward_calibrations=sources.calibrations)
    log.info(
        "ppo: %d prompts, %d iterations x %d rollouts per rank, %d ranks, reference: %s",
        len(prompts),
        cfg.iterations,
        cfg.batch_size,
        accelerator.num_processes,
        info["reference"],
    )
    return (state or {}).get("iteration", 0), calibration


def train(
    stage: StageRun,
    ctx: PPOContext,
    prompts: Prompts,
    sources: Any,
    recipe: Any,
    first: int,
    curve: Callable[[], dict[str, float]] | None,
) -> None:
    """PPO iterations first+1 .. ppo.iterations on the stage runner's loop; a checkpoint
    holds the KL controller's and the reward sources' state beside the runner's."""
    cfg = ctx.cfg

    def state_of(n: int) -> dict[str, Any]:
        return {
            "iteration": n,
            "kl_controller": ctx.kl_ctl.state_dict(),
            "reward_sources": sources.state_dict(),
            "calibration": sources.calibrations,
        }

    stage.loop(
        first,
        cfg.iterations,
        iteration_step(stage, ctx, prompts, sources, recipe.seed),
        state_of,
        ctx.scheduler,
        Cadence(eval_every=cfg.eval_every, save_every=cfg.save_every, keep_last=cfg.keep_last),
        evaluate=curve,
        shown={"score": "objective/score", "kl": "objective/kl"},
        unit="iteration",
    )


def save(
    stage: StageRun,
    ctx: PPOContext,
    results: dict[str, Any],
    recipe: Any,
    policy_name: str,
    source_names: list[str],
) -> Path:
    """eval.json, the policy (its LoRA merged with ppo.merge_lora) and its model card."""
    cfg = ctx.cfg
    card = (
        "PPO policy",
        f"PPO for {cfg.iterations} iterations against {', '.join(source_names)}, KL penalty "
        f"to `{policy_name}`. Held-out mean reward {results['ppo_score_mean']:.3f} (SFT "
        f"{results['sft_score_mean']:.3f}), win rate {results['win_rate']:.2f}.",
    )
    path = stage.finish(
        results,
        ctx.model,
        ctx.tokenizer,
        card,
        cfg.merge_lora,
        lambda m: m.policy,
        prefix="policy.",
    )
    log.info(
        "ppo: held-out score %.3f (SFT %.3f), win rate %.2f, KL %.2f",
        results["ppo_score_mean"],
        results["sft_score_mean"],
        results["win_rate"],
        results["kl_mean"],
    )
    return path


def scorer_loader(recipe: Any, accelerator: Any) -> Callable[[Path], Callable]:
    """A reward-model folder -> its scorer, at reward.max_length with the recipe's attention."""
    return partial(
        reward_model_scorer,
        accelerator=accelerator,
        max_length=recipe.reward.max_length,
        attn_implementation=recipe.model.attn_implementation,
    )


def policy_evaluator(recipe: Any, ctx: PPOContext, unwrapped: Any, sources: Any, scorer: Any):
    """evaluate(prompts, final) -> (summary, samples): the PPO policy against the SFT policy
    (rlhf/evaluation.py) under the training score (with its missing-EOS penalty) and the eval
    judges; the final evaluation also reports the rubric's behaviour rates. Every rank calls it
    in step."""

    def training_score(m: list, t: list[str], rows: list[dict], f: list[bool]) -> Any:
        return sources(m, t, rows, training=False, finished=f)[0]

    def evaluate(prompts: list[Any], final: bool) -> tuple[dict[str, Any], list[dict]]:
        classify = evaluation.rubric_classify() if final else None
        scoring = evaluation.Scoring(
            recipe.eval.judges,
            scorer,
            recipe.output_dir,
            training_score,
            recipe.ppo.missing_eos_penalty,
            classify,
        )
        with distributed.gathered_for_generation(ctx.accelerator, ctx.model):
            return evaluation.evaluate_stage(
                unwrapped,
                ctx.reference,
                ctx.tokenizer,
                prompts,
                recipe,
                ctx.accelerator,
                scoring,
                "ppo",
                log.info if final else log.debug,
                None if final else 1,  # the judge curve: one answer per prompt and policy
            )

    return evaluate


def final_results(evaluate, eval_items, train_items, size, calibration) -> dict[str, Any]:
    """eval.json: the policy against SFT on the held-out prompts (else the training prompts),
    its first 8 samples side by side, and the score's calibration."""
    results, samples = evaluate((eval_items or train_items)[:size], final=True)
    results["samples"] = samples[:8]
    results["prompts_source"] = "eval_prompts" if eval_items else "train_prompts"
    if calibration:
        results["calibration"] = calibration
    return results


def judge_curve(recipe: Any, tokenizer: Any, evaluate: Callable, held_out: list[Any]) -> Any:
    """The runner's `evaluate` every ppo.eval_every iterations (None when 0): the policy
    against SFT on the first ppo.eval_curve_size valid prompts (ppo.valid_prompts; else the
    held-out prompts, said in the log), as eval/* metrics."""
    cfg = recipe.ppo
    if not cfg.eval_every:
        return None
    if cfg.valid_prompts is None:
        log.info("ppo: the judge curve uses ppo.eval_prompts (ppo.valid_prompts is not set)")
        prompts = held_out[: cfg.eval_curve_size]
    else:
        prompts = load_fitted(recipe, tokenizer, cfg.valid_prompts)[: cfg.eval_curve_size]

    def curve_point() -> dict[str, float]:
        began = time.monotonic()
        point = evaluation.curve_metrics(evaluate(prompts, final=False)[0])
        return {**point, "timing/eval_curve": time.monotonic() - began}

    return curve_point


def iteration_step(
    stage: StageRun, ctx: PPOContext, prompts: Prompts, sources: Any, seed: int
) -> Callable[[int, bool], dict[str, float]]:
    """The runner's step n: PPO iteration n-1 on this rank's prompts of that iteration, its
    metrics averaged over ranks, then the KL controller's update (and sample logging)."""
    cfg, accelerator, device = ctx.cfg, ctx.accelerator, ctx.accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    k = cfg.samples_per_prompt
    # batch_size counts rollouts: batch_size / k prompts per rank, each repeated k times in
    # consecutive rows (one batched generate); every rank holds whole groups.
    sampler = PromptSampler(len(prompts), cfg.batch_size // k, rank, world, seed)

    def step(n: int, log_due: bool) -> dict[str, float]:
        i = n - 1
        torch.manual_seed(iteration_seed(seed, i, rank))
        batch = prompts.select([j for j in sampler.indices(i) for _ in range(k)])
        per_source: dict[str, float] = {}

        def score_fn(roll: Rollout) -> torch.Tensor:
            total, parts = sources(
                batch.messages, roll.texts, batch.rows, finished=roll.ended_with_eos
            )
            per_source.update(parts)
            return total.to(device)

        generator = torch.Generator().manual_seed(iteration_seed(seed, i, rank) + 7)
        padded = batch.padded(ctx.tokenizer.pad_token_id, device)
        roll, metrics = ppo_iteration(
            ctx,
            padded,
            score_fn,
            generator,
            value_only=i < cfg.critic_warmup_iterations,
            init_value_head=i == 0,
        )
        metrics = mean_across_ranks(accelerator, {**metrics, **per_source})
        # Ziegler et al. 2019: adapt beta toward the target KL (per-sequence KL, batch mean).
        ctx.kl_ctl.update(metrics["objective/kl"], cfg.batch_size * world)
        if n % cfg.sample_every == 0:
            stage.logger.log_samples(n, sample_rows(batch, roll))
        return metrics

    return step


def kl_controller(cfg: Any, world: int = 1) -> AdaptiveKLController | FixedKLController:
    """Ziegler et al. 2019's adaptive beta toward a target KL, or a fixed beta. Warns when the
    horizon is so long that beta cannot move by 10% over the whole run."""
    if not cfg.adaptive_kl:
        return FixedKLController(cfg.kl_coef)
    ctl = AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl.target, cfg.adaptive_kl.horizon)
    per_iteration = cfg.batch_size * world  # the n_steps of each update (iteration_step)
    growth = ctl.reach(per_iteration, cfg.iterations) - 1
    if growth < 0.1:
        run = cfg.iterations * per_iteration
        log.warning(
            "ppo.adaptive_kl.horizon %d: %d rollouts in the run move beta by at most %.1f%%; "
            "a horizon of about the run's length lets it act",
            ctl.horizon,
            run,
            100 * growth,
        )
    return ctl


def load_fitted(recipe: Any, tokenizer: Any, source: Any) -> list[Any]:
    """A prompts source's items, each fitted to ppo.max_prompt_length."""
    items = data.load_prompts(source, recipe.data.on_invalid).items
    return data.fit_prompts(items, tokenizer, recipe.ppo.max_prompt_length, recipe.data)


def policy_folder(sft_dir: Path | None) -> str | None:
    """The starting policy's folder: the SFT run's model, or None: the recipe's model."""
    return str(sft_dir / "model") if sft_dir else None


def run_info_of(recipe, roles, accelerator, policy_name, sft_dir, reward_dir) -> dict:
    """What run.json records about this PPO run beside the runner's own keys."""
    cfg, world, sources = recipe.ppo, accelerator.num_processes, roles.sources
    trainable, total = training.trainable_parameters(roles.model)
    frozen_dtype = frozen_weight_dtype(
        accelerator.mixed_precision, distributed.sharding(accelerator)
    )
    return {
        "sft_dir": str(sft_dir) if sft_dir else None,
        "policy": policy_name,
        "reward_dir": str(reward_dir) if reward_dir else None,
        "reward_sources": [src.name for src in sources.sources],
        "batch_size_per_rank": cfg.batch_size,
        "rollouts_per_iteration": cfg.batch_size * world,
        "prompts_per_iteration": cfg.batch_size // cfg.samples_per_prompt * world,
        "estimator": cfg.estimator,
        "effective_minibatch": cfg.mini_batch_size * world,
        "trainable_parameters": trainable,
        "parameters": total,
        "reference": "lora-disabled" if cfg.lora.enabled else "frozen copy",
        "frozen_weights": str(frozen_dtype or torch.float32).removeprefix("torch."),
    }


def score_calibration(
    state, model, reference, sources, tokenizer, prompts, recipe, accelerator
) -> dict | None:
    """Set the calibration of every calibrated reward model in `sources`: a resumed run's
    (never re-measured), else one measured on SFT samples (ppo.calibration_prompts), else the
    reward model's stored one. Returns the single-model form's, which normalise_score applies
    (None with `ppo.rewards`: the sources apply theirs)."""
    stored = sources.calibrations
    if state is not None:  # each model's calibration; an older checkpoint's single model's
        saved = state.get("calibration") or {}
        legacy = isinstance(saved.get("mean"), float | int)
        sources.set_calibrations({"reward": saved} if legacy else saved)
    elif stored and recipe.ppo.calibration_prompts:
        with distributed.gathered_for_generation(accelerator, model):
            measured = sft_calibration(
                model, reference, sources, tokenizer, prompts, recipe, accelerator
            )
        sources.set_calibrations(measured)
    for label, cal in sources.calibrations.items():
        own = stored[label]
        log.info(
            "ppo: %s normalised by mean %.4f, std %.4f (%s; reward model's own: %s)",
            label,
            cal["mean"],
            cal["std"],
            cal.get("source", "reward model"),
            own,
        )
    return sources.calibration


def sample_rows(batch: Prompts, roll: Rollout) -> list[dict[str, Any]]:
    """The first few (prompt, response, score, KL) of an iteration, for samples.jsonl."""
    return [
        {
            "prompt": last_user_text(batch.messages[i]),
            "response": roll.texts[i],
            "score": float(roll.scores[i]),
            "kl": float(roll.seq_kl[i]),
        }
        for i in range(min(4, len(roll.texts)))
    ]
