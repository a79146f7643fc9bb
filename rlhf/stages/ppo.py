"""Stage 3: PPO against the reward model with a per-token KL penalty (InstructGPT step 3).

One iteration (Ziegler et al. 2019; "The N Implementation Details of RLHF with PPO"):
  1. rollout   prompts -> sampled responses (KV cache), masked after the first EOS
  2. score     policy / reference log-probs, values, reward-model score of (prompt, response)
  3. shape     r_t = -beta * KL_t, plus the (normalised) score at the last response token
  4. GAE       advantages and returns; advantages whitened over the batch (or, with
               ppo.estimator rloo / grpo / reinforce_pp, k samples per prompt and no critic)
  5. update    PPO epochs over minibatches: clipped policy + clipped value loss
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from rlhf import checkpoint, data, distributed, models, reward_sources, training
from rlhf.chat import encode_prompt, pad_batch
from rlhf.errors import UserError
from rlhf.policy_eval import evaluate_policy, generate_reference, reward_model_scorer
from rlhf.ppo.actor_critic import ActorCritic, disable_dropout, eval_mode
from rlhf.ppo.core import AdaptiveKLController, FixedKLController
from rlhf.ppo.iteration import ppo_iteration
from rlhf.ppo.rollout import Rollout
from rlhf.progress import Progress
from rlhf.rundir import RunDir, require_completed
from rlhf.runtime import frozen_weight_dtype, make_accelerator, run_info
from rlhf.signals import Interrupted, StopSignal
from rlhf.tracking import MetricsLogger, mean_across_ranks

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


class PromptSampler:
    """Deterministic prompt batches: iteration i on rank r always gets the same prompts, so a
    resumed run sees exactly what an uninterrupted one would. Ranks take disjoint slices."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed

    def indices(self, iteration: int) -> list[int]:
        per_iter = self.batch * self.world
        start = iteration * per_iter + self.rank * self.batch
        out = []
        for pos in range(start, start + self.batch):
            epoch, offset = divmod(pos, self.n)
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
            out.append(int(order[offset]))
        return out


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return seed * 1_000_003 + iteration * 1009 + rank


def run(recipe: Any, resume: bool = False) -> Path:
    cfg = recipe.ppo
    if cfg.prompts is None:
        raise UserError(f"{recipe._source}: ppo.prompts: missing required key")
    sft_dir, reward_dir = input_dirs(recipe)
    accelerator = make_accelerator(recipe, gradient_accumulation_steps=cfg.grad_accum)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = RunDir(recipe.stage_dir("ppo"), "ppo", recipe, accelerator.is_main_process, {})
    device = accelerator.device

    # --- tokenizers and prompts (validated before any model loads)
    policy_name = str(sft_dir / "model") if sft_dir else recipe.model.name
    tokenizer = models.load_tokenizer(
        policy_name,
        None if sft_dir else recipe.model.chat_template,
        recipe.model.trust_remote_code,
        padding_side="left",
    )
    reward_model_dirs = reward_sources.model_dirs(recipe)
    for model_dir in reward_model_dirs:
        models.load_tokenizer(str(model_dir))  # no chat template, no EOS: one line, now

    def load(source: Any) -> list[Any]:
        items = data.load_prompts(source, recipe.data.on_invalid).items
        return data.fit_prompts(items, tokenizer, cfg.max_prompt_length, recipe.data)

    train_items = load(cfg.prompts)
    eval_items = load(cfg.eval_prompts) if cfg.eval_prompts else []
    prompts = [p.messages for p in train_items]
    prompt_rows = [p.fields for p in train_items]
    prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]

    # --- roles
    attn = recipe.model.attn_implementation

    def load_policy() -> torch.nn.Module:
        if sft_dir:
            return models.load_causal_lm(policy_name, attn_implementation=attn)
        m = recipe.model
        return models.load_causal_lm(
            m.name,
            m.num_hidden_layers,
            m.trust_remote_code,
            revision=m.revision,
            attn_implementation=attn,
        )

    policy = load_policy()
    critic = None
    with_values = cfg.estimator == "gae"  # the critic-free estimators build no value function
    if with_values and cfg.value_model == "separate":
        critic = models.load_reward_model(str(reward_dir / "model"), attn_implementation=attn)
    # bf16 / fp16 runs keep frozen matmul weights in the autocast dtype (same numbers, no
    # per-forward cast, half the memory); trained weights and optimizer state stay fp32.
    frozen_dtype = frozen_weight_dtype(accelerator.mixed_precision)
    reference = None
    if cfg.lora.enabled:
        policy = models.apply_lora(policy, cfg.lora)  # reference = adapter disabled, no copy
        # Not under FSDP / ZeRO-3: they flatten a layer's weights into one dtype per shard.
        if frozen_dtype and not distributed.is_sharded(accelerator):
            models.store_frozen_linears(policy, frozen_dtype)
    else:
        # Frozen roles are never prepared: a plain full copy on each rank's device, even next
        # to a ZeRO-3 / FSDP policy (rlhf/distributed.py).
        with distributed.unsharded_init(accelerator):
            reference = load_policy().to(device).eval()
        reference.requires_grad_(False)
        disable_dropout(reference)
        if frozen_dtype:
            models.store_frozen_linears(reference, frozen_dtype)
    model = ActorCritic(policy, critic, with_values=with_values)

    def load_scorer(model_dir: Path) -> Any:
        return reward_model_scorer(model_dir, recipe, accelerator)

    sources = reward_sources.build(
        recipe, load_scorer, lambda t: accelerator.gather(t.to(device)).cpu()
    )
    stored_calibration = calibration = sources.calibration

    optimizer = training.make_optimizer(model, cfg.optim)
    # one optimizer step per minibatch: ppo_epochs * (batch / mini_batch) per iteration
    updates_per_iter = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    scheduler = training.make_scheduler(optimizer, cfg.optim, cfg.iterations * updates_per_iter)
    distributed.set_deepspeed_micro_batch(accelerator, cfg.mini_batch_size // cfg.grad_accum)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: ActorCritic = accelerator.unwrap_model(model)
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl.target, cfg.adaptive_kl.horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    k = cfg.samples_per_prompt
    # batch_size counts rollouts: batch_size / k prompts per rank, each repeated k times in
    # consecutive rows (one batched generate); every rank holds whole groups.
    sampler = PromptSampler(len(prompts), cfg.batch_size // k, rank, world, recipe.seed)
    trainable, total = training.trainable_parameters(model)
    out.info.update(
        run_info(accelerator),
        sft_dir=str(sft_dir) if sft_dir else None,
        policy=policy_name,
        reward_dir=str(reward_dir) if reward_dir else None,
        reward_sources=[src.name for src in sources.sources],
        batch_size_per_rank=cfg.batch_size,
        rollouts_per_iteration=cfg.batch_size * world,
        prompts_per_iteration=cfg.batch_size // k * world,
        estimator=cfg.estimator,
        effective_minibatch=cfg.mini_batch_size * world,
        prompts=len(prompts),
        trainable_parameters=trainable,
        parameters=total,
        reference="lora-disabled" if cfg.lora.enabled else "frozen copy",
        frozen_weights=str(frozen_dtype or torch.float32).removeprefix("torch."),
        calibration=calibration,
    )

    start_iter = 0
    ckpt = checkpoint.latest_checkpoint(out.checkpoints) if resume else None
    out.start(resume=ckpt is not None, resume_step=checkpoint.step_of(ckpt) if ckpt else None)
    if ckpt is not None:
        state = checkpoint.load_checkpoint(accelerator, ckpt, scheduler)
        start_iter = state["iteration"]
        kl_ctl.load_state_dict(state["kl_controller"])
        sources.load_state_dict(state.get("reward_sources", {}))
        calibration = state.get("calibration", calibration)  # never re-measured on resume
        log.info("resumed from %s (iteration %d)", ckpt, start_iter)
    elif stored_calibration and cfg.calibration_prompts:
        with distributed.gathered_for_generation(accelerator, model):
            calibration = sft_calibration(
                unwrapped, reference, sources, tokenizer, prompts, prompt_rows, prompt_ids,
                recipe, accelerator,
            )  # fmt: skip
    out.info["calibration"] = calibration
    if calibration:
        log.info(
            "ppo: score normalised by mean %.4f, std %.4f (%s; reward model's own: %s)",
            calibration["mean"],
            calibration["std"],
            calibration.get("source", "reward model"),
            stored_calibration,
        )
    logger = MetricsLogger(out.path, "ppo", recipe, accelerator)
    log.info(
        "ppo: %d prompts, %d iterations x %d rollouts (%d per rank x %d ranks), reference: %s",
        len(prompts),
        cfg.iterations,
        cfg.batch_size * world,
        cfg.batch_size,
        world,
        out.info["reference"],
    )

    progress = Progress(
        "ppo", cfg.iterations, start_iter, enabled=accelerator.is_main_process, unit="iteration"
    )
    guard = training.NonFiniteGuard(recipe.numerics.on_nonfinite, recipe.numerics.max_consecutive)
    stop = StopSignal().install()
    for iteration in range(start_iter, cfg.iterations):
        torch.manual_seed(iteration_seed(recipe.seed, iteration, rank))
        idx = [i for i in sampler.indices(iteration) for _ in range(k)]
        batch = pad_batch([prompt_ids[i] for i in idx], tokenizer.pad_token_id, side="left")
        batch_prompts = [prompts[i] for i in idx]
        batch_rows = [prompt_rows[i] for i in idx]
        source_metrics: dict[str, float] = {}

        def score_fn(
            roll: Rollout,
            batch_prompts: list = batch_prompts,
            batch_rows: list = batch_rows,
            into: dict = source_metrics,
        ) -> torch.Tensor:
            total, per_source = sources(
                batch_prompts, roll.texts, batch_rows, finished=roll.ended_with_eos
            )
            into.update(per_source)
            return total.to(device)

        gen = torch.Generator().manual_seed(iteration_seed(recipe.seed, iteration, rank) + 7)
        roll, metrics = ppo_iteration(
            model,
            reference,
            optimizer,
            scheduler,
            accelerator,
            tokenizer,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            score_fn,
            kl_ctl,
            cfg,
            gen,
            calibration,
            guard,
            value_only=iteration < cfg.critic_warmup_iterations,
            init_value_head=iteration == 0,
        )
        metrics = mean_across_ranks(accelerator, {**metrics, **source_metrics})
        # Ziegler et al. 2019: adapt beta toward the target KL (per-sequence KL, batch mean).
        kl_ctl.update(metrics["objective/kl"], cfg.batch_size * world)
        logger.log(iteration + 1, metrics)
        if (iteration + 1) % cfg.sample_every == 0:
            logger.log_samples(
                iteration + 1,
                [
                    {
                        "prompt": _last_user(batch_prompts[i]),
                        "response": roll.texts[i],
                        "score": float(roll.scores[i]),
                        "kl": float(roll.seq_kl[i]),
                    }
                    for i in range(min(4, len(roll.texts)))
                ],
            )
        progress.update(iteration + 1, score=metrics["objective/score"], kl=metrics["objective/kl"])
        signum = stop.requested(accelerator)
        done = iteration + 1
        if (cfg.save_every and done % cfg.save_every == 0 or signum) and done < cfg.iterations:
            saved = checkpoint.save_checkpoint(
                accelerator,
                out.checkpoints,
                done,
                {
                    "iteration": done,
                    "kl_controller": kl_ctl.state_dict(),
                    "reward_sources": sources.state_dict(),
                    "calibration": calibration,
                },
                scheduler,
                cfg.keep_last,
            )
            if signum:
                stop.restore()
                raise Interrupted(signum, saved)
    progress.close()
    stop.restore()

    with distributed.gathered_for_generation(accelerator, model):
        results = evaluate_policy(
            unwrapped,
            reference,
            sources,
            tokenizer,
            eval_items or train_items,
            recipe,
            accelerator,
            load_scorer,
            calibration,
        )
    results["prompts_source"] = "eval_prompts" if eval_items else "train_prompts"
    accelerator.wait_for_everyone()
    full = distributed.full_state_dict(accelerator, model, prefix="policy.")  # every rank
    if accelerator.is_main_process:
        card = training.model_card(
            "PPO policy",
            recipe,
            f"PPO for {cfg.iterations} iterations against {', '.join(out.info['reward_sources'])}, "
            f"KL penalty to `{policy_name}`. Held-out mean reward {results['ppo_score_mean']:.3f} "
            f"(SFT {results['sft_score_mean']:.3f}), win rate {results['win_rate']:.2f}.",
        )
        with out.staging(out.model_dir) as tmp:
            training.save_model(unwrapped.policy, tokenizer, tmp, cfg.merge_lora, card, full)
    logger.close()
    out.finish(results)
    accelerator.wait_for_everyone()
    log.info(
        "ppo: held-out score %.3f (SFT %.3f), win rate %.2f, KL %.2f",
        results["ppo_score_mean"],
        results["sft_score_mean"],
        results["win_rate"],
        results["kl_mean"],
    )
    return out.path


def _last_user(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


@torch.no_grad()
def sft_calibration(
    model: ActorCritic,
    reference: torch.nn.Module | None,
    sources: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
    prompt_rows: list[dict],
    prompt_ids: list[list[int]],
    recipe: Any,
    accelerator: Any,
) -> dict[str, Any]:
    """Mean / std of the reward model's score on what the SFT policy writes, before iteration 1.

    The reward stage measures its mean / std on human-written responses; normalising by those
    leaves the SFT policy's own score off centre. Here the reference (SFT) policy answers the
    first `calibration_prompts` of a seeded shuffle of the training prompts, sampled as the
    rollouts are (Ziegler et al. 2019 normalise the reward on samples of the initial policy).
    Every rank gets the same result; a resumed run reads it back from its checkpoint.
    """
    cfg = recipe.ppo
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(recipe.seed))
    pool = order[: cfg.calibration_prompts].tolist()
    mine = [pool[i] for i in distributed.rank_indices(len(pool), accelerator)]
    device = accelerator.device
    torch.manual_seed(recipe.seed + 4242 + accelerator.process_index)
    scores = []
    for start in range(0, len(mine), cfg.batch_size):
        group = mine[start : start + cfg.batch_size]
        batch = pad_batch([prompt_ids[i] for i in group], tokenizer.pad_token_id, side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with eval_mode(model), accelerator.autocast():
            roll = generate_reference(model, reference, ids, mask, cfg, tokenizer)
        raw, _ = sources(
            [prompts[i] for i in group],
            roll.texts,
            [prompt_rows[i] for i in group],
            training=False,
            finished=roll.ended_with_eos,
        )
        scores.append(raw.to(device))
    local = torch.cat(scores) if scores else torch.zeros(0, device=device)
    every = distributed.gather_evaluated(accelerator, local, len(pool)).double().cpu()
    std = every.std().item() if len(every) > 1 else 1.0
    return {
        "mean": every.mean().item(),
        "std": std if math.isfinite(std) and std > 0 else 1.0,
        "n": len(every),
        "source": "sft_samples",
    }
