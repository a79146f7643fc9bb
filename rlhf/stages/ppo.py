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
prompts, one iteration, and the held-out comparison with the SFT policy (rlhf/ppo/policy_eval.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhf import data
from rlhf.algo.ppo import AdaptiveKLController, FixedKLController
from rlhf.infra import distributed, training
from rlhf.infra.errors import UserError
from rlhf.infra.rundir import require_completed
from rlhf.infra.runtime import frozen_weight_dtype
from rlhf.infra.tracking import mean_across_ranks
from rlhf.ppo.calibration import sft_calibration
from rlhf.ppo.iteration import PPOContext, ppo_iteration
from rlhf.ppo.policy_eval import SharedScorers, evaluate_policy, reward_model_scorer
from rlhf.ppo.prompts import Prompts, PromptSampler, iteration_seed
from rlhf.ppo.roles import build_roles
from rlhf.ppo.rollout import Rollout
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
    accelerator, device = stage.accelerator, stage.device
    # --- tokenizers and prompts (validated before any model loads)
    policy_name = str(sft_dir / "model") if sft_dir else recipe.model.name
    tokenizer = models.load_tokenizer(
        policy_name,
        None if sft_dir else recipe.model.chat_template,
        recipe.model.trust_remote_code,
        padding_side="left",
    )
    for model_dir in reward_sources.model_dirs(recipe):
        models.load_tokenizer(str(model_dir))  # no chat template, no EOS: one line, now
    train_items, eval_items = load_prompt_items(recipe, tokenizer)
    prompts = Prompts.encode(train_items, tokenizer, cfg.max_prompt_length)
    # --- roles, reward sources, optimizer
    critic_dir = str(reward_dir / "model") if reward_dir else None
    model, reference = build_roles(cfg, accelerator, partial(load_policy, recipe, sft_dir),
                                   critic_dir, recipe.model.attn_implementation)  # fmt: skip
    # One copy of each reward model for training and evaluation (its judges included).
    load_scorer = SharedScorers(
        partial(reward_model_scorer, recipe=recipe, accelerator=accelerator)
    )
    gather = lambda t: accelerator.gather(t.to(device)).cpu()  # noqa: E731
    sources = reward_sources.build(recipe, load_scorer, gather)
    optimizer = training.make_optimizer(model, cfg.optim)
    # one optimizer step per minibatch: ppo_epochs * (batch / mini_batch) per iteration
    updates_per_iter = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    scheduler = training.make_scheduler(optimizer, cfg.optim, cfg.iterations * updates_per_iter)
    distributed.set_deepspeed_micro_batch(accelerator, cfg.mini_batch_size // cfg.grad_accum)
    model, optimizer = accelerator.prepare(model, optimizer)
    # every forward below runs inside accelerator.autocast(): no fp32 copies of the logits
    unwrapped: ActorCritic = training.without_fp32_outputs(accelerator, model)
    kl_ctl = kl_controller(cfg)
    info = run_info_of(recipe, model, sources, accelerator, policy_name, sft_dir, reward_dir)
    state = stage.begin(resume, scheduler, **info, prompts=len(prompts),
                        calibration=sources.calibration)  # fmt: skip
    if state is not None:
        kl_ctl.load_state_dict(state["kl_controller"])
        sources.load_state_dict(state.get("reward_sources", {}))
    calibration = score_calibration(
        state, unwrapped, reference, sources, tokenizer, prompts, recipe, accelerator
    )
    stage.out.info["calibration"] = calibration
    stage.out.info["reward_calibrations"] = sources.calibrations
    log.info("ppo: %d prompts, %d iterations x %d rollouts per rank, %d ranks, reference: %s",
             len(prompts), cfg.iterations, cfg.batch_size, accelerator.num_processes,
             info["reference"])  # fmt: skip

    # --- train: one step is one PPO iteration (rollout, score, advantages, update)
    ctx = PPOContext(model, reference, optimizer, scheduler, accelerator, tokenizer, kl_ctl,
                     cfg, calibration, stage.guard)  # fmt: skip

    def state_of(n: int) -> dict[str, Any]:
        return {"iteration": n, "kl_controller": kl_ctl.state_dict(),
                "reward_sources": sources.state_dict(), "calibration": calibration,
                "reward_calibrations": sources.calibrations}  # fmt: skip

    stage.loop((state or {}).get("iteration", 0), cfg.iterations,
               iteration_step(stage, ctx, prompts, sources, recipe.seed), state_of, scheduler,
               Cadence(save_every=cfg.save_every, keep_last=cfg.keep_last),
               shown={"score": "objective/score", "kl": "objective/kl"}, unit="iteration")  # fmt: skip

    # --- evaluate and save
    with distributed.gathered_for_generation(accelerator, model):
        results = evaluate_policy(unwrapped, reference, sources, tokenizer,
                                  eval_items or train_items, recipe, accelerator, load_scorer,
                                  calibration)  # fmt: skip
    results["prompts_source"] = "eval_prompts" if eval_items else "train_prompts"
    card = ("PPO policy", f"PPO for {cfg.iterations} iterations against "
            f"{', '.join(info['reward_sources'])}, KL penalty to `{policy_name}`. Held-out mean "
            f"reward {results['ppo_score_mean']:.3f} (SFT {results['sft_score_mean']:.3f}), win "
            f"rate {results['win_rate']:.2f}.")  # fmt: skip
    path = stage.finish(results, model, tokenizer, card, cfg.merge_lora, lambda m: m.policy,
                        prefix="policy.")  # fmt: skip
    log.info("ppo: held-out score %.3f (SFT %.3f), win rate %.2f, KL %.2f",
             results["ppo_score_mean"], results["sft_score_mean"], results["win_rate"],
             results["kl_mean"])  # fmt: skip
    return path


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
            total, parts = sources(batch.messages, roll.texts, batch.rows,
                                   finished=roll.ended_with_eos)  # fmt: skip
            per_source.update(parts)
            return total.to(device)

        generator = torch.Generator().manual_seed(iteration_seed(seed, i, rank) + 7)
        padded = batch.padded(ctx.tokenizer.pad_token_id, device)
        roll, metrics = ppo_iteration(ctx, padded, score_fn, generator,
                                      value_only=i < cfg.critic_warmup_iterations,
                                      init_value_head=i == 0)  # fmt: skip
        metrics = mean_across_ranks(accelerator, {**metrics, **per_source})
        # Ziegler et al. 2019: adapt beta toward the target KL (per-sequence KL, batch mean).
        ctx.kl_ctl.update(metrics["objective/kl"], cfg.batch_size * world)
        if n % cfg.sample_every == 0:
            stage.logger.log_samples(n, sample_rows(batch, roll))
        return metrics

    return step


def kl_controller(cfg: Any) -> AdaptiveKLController | FixedKLController:
    """Ziegler et al. 2019's adaptive beta toward a target KL, or a fixed beta."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl.target, cfg.adaptive_kl.horizon)
    return FixedKLController(cfg.kl_coef)


def load_prompt_items(recipe: Any, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """(training prompts, held-out prompts or []), each fitted to ppo.max_prompt_length."""
    cfg = recipe.ppo

    def load(source: Any) -> list[Any]:
        items = data.load_prompts(source, recipe.data.on_invalid).items
        return data.fit_prompts(items, tokenizer, cfg.max_prompt_length, recipe.data)

    return load(cfg.prompts), load(cfg.eval_prompts) if cfg.eval_prompts else []


def load_policy(recipe: Any, sft_dir: Path | None) -> torch.nn.Module:
    """The starting policy: the SFT run's model, or the recipe's model (ppo.policy: base)."""
    m = recipe.model
    if sft_dir:
        return models.load_causal_lm(
            str(sft_dir / "model"), attn_implementation=m.attn_implementation
        )
    return models.load_causal_lm(m.name, m.num_hidden_layers, m.trust_remote_code,
                                 revision=m.revision, attn_implementation=m.attn_implementation)  # fmt: skip


def run_info_of(recipe, model, sources, accelerator, policy_name, sft_dir, reward_dir) -> dict:
    """What run.json records about this PPO run beside the runner's own keys."""
    cfg, world = recipe.ppo, accelerator.num_processes
    trainable, total = training.trainable_parameters(model)
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
    if state is not None:
        legacy = {"reward": state["calibration"]} if state.get("calibration") else {}
        sources.set_calibrations(state.get("reward_calibrations", legacy))
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
