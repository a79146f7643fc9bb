"""Stage 3: PPO against the reward model with a per-token KL penalty (InstructGPT step 3).

One iteration (Ziegler et al. 2019; "The N Implementation Details of RLHF with PPO"):
  1. rollout   prompts -> sampled responses (KV cache), masked after the first EOS
  2. score     policy / reference log-probs, values, reward-model score of (prompt, response)
  3. shape     r_t = -beta * KL_t, plus the (normalised) score at the last response token
  4. GAE       advantages and returns; advantages whitened over the batch
  5. update    PPO epochs over minibatches: clipped policy + clipped value loss
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf import checkpoint, data, distributed, models, training
from rlhf.chat import encode_prompt, pad_batch
from rlhf.errors import UserError
from rlhf.ppo.actor_critic import ActorCritic, disable_dropout, eval_mode
from rlhf.ppo.core import AdaptiveKLController, FixedKLController
from rlhf.ppo.iteration import ppo_iteration
from rlhf.ppo.rollout import Rollout, generate, reward_scores, score_with_models
from rlhf.rundir import RunDir, require_completed
from rlhf.runtime import make_accelerator, run_info
from rlhf.signals import Interrupted, StopSignal
from rlhf.stats import wilson_interval
from rlhf.tracking import MetricsLogger, mean_across_ranks

log = logging.getLogger(__name__)


def input_dirs(recipe: Any) -> tuple[Path, Path]:
    """The SFT and reward run folders PPO reads; both must have finished (COMPLETED)."""
    cfg = recipe.ppo
    sft_dir = Path(cfg.sft_dir) if cfg.sft_dir else recipe.stage_dir("sft")
    reward_dir = Path(cfg.reward_dir) if cfg.reward_dir else recipe.stage_dir("reward")
    require_completed(sft_dir, "ppo.sft_dir: the SFT run")
    require_completed(reward_dir, "ppo.reward_dir: the reward run")
    return sft_dir, reward_dir


def load_calibration(reward_model_dir: Path) -> dict[str, float] | None:
    path = reward_model_dir / "reward_calibration.json"
    return json.loads(path.read_text()) if path.is_file() else None


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
    tokenizer = models.load_tokenizer(str(sft_dir / "model"), padding_side="left")
    reward_tokenizer = models.load_tokenizer(str(reward_dir / "model"))
    if reward_tokenizer.chat_template is None:
        raise UserError(f"{reward_dir}/model: reward tokenizer has no chat template")

    def load(source: Any) -> list[list[dict]]:
        items = data.load_prompts(source, recipe.data.on_invalid).items
        items = data.fit_prompts(items, tokenizer, cfg.max_prompt_length, recipe.data)
        return [p.messages for p in items]

    prompts = load(cfg.prompts)
    eval_prompts = load(cfg.eval_prompts) if cfg.eval_prompts else []
    prompt_ids = [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in prompts]

    # --- roles
    attn = recipe.model.attn_implementation
    policy = models.load_causal_lm(str(sft_dir / "model"), attn_implementation=attn)
    critic = None
    if cfg.value_model == "separate":
        critic = models.load_reward_model(str(reward_dir / "model"), attn_implementation=attn)
    reference = None
    if cfg.lora.enabled:
        policy = models.apply_lora(policy, cfg.lora)  # reference = adapter disabled, no copy
    else:
        # Frozen roles are never prepared: a plain full copy on each rank's device, even next
        # to a ZeRO-3 / FSDP policy (rlhf/distributed.py).
        with distributed.unsharded_init(accelerator):
            reference = models.load_causal_lm(str(sft_dir / "model"), attn_implementation=attn)
            reference = reference.to(device).eval()
        reference.requires_grad_(False)
        disable_dropout(reference)
    model = ActorCritic(policy, critic)
    with distributed.unsharded_init(accelerator):
        reward_model = (
            models.load_reward_model(str(reward_dir / "model"), attn_implementation=attn)
            .to(device)
            .eval()
        )
    reward_model.requires_grad_(False)
    disable_dropout(reward_model)
    stored_calibration = load_calibration(reward_dir / "model") if cfg.normalize_score else None
    calibration = stored_calibration

    optimizer = training.make_optimizer(model, cfg.optim)
    # one optimizer step per minibatch: ppo_epochs * (batch / mini_batch) per iteration
    updates_per_iter = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    scheduler = training.make_scheduler(optimizer, cfg.optim, cfg.iterations * updates_per_iter)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: ActorCritic = accelerator.unwrap_model(model)
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl.target, cfg.adaptive_kl.horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    sampler = PromptSampler(len(prompts), cfg.batch_size, rank, world, recipe.seed)
    trainable, total = training.trainable_parameters(model)
    out.info.update(
        run_info(accelerator),
        sft_dir=str(sft_dir),
        reward_dir=str(reward_dir),
        batch_size_per_rank=cfg.batch_size,
        rollouts_per_iteration=cfg.batch_size * world,
        effective_minibatch=cfg.mini_batch_size * world,
        prompts=len(prompts),
        trainable_parameters=trainable,
        parameters=total,
        reference="lora-disabled" if cfg.lora.enabled else "frozen copy",
        reward_model_calibration=stored_calibration,
    )

    start_iter = 0
    ckpt = checkpoint.latest_checkpoint(out.checkpoints) if resume else None
    out.start(resume=ckpt is not None, resume_step=checkpoint.step_of(ckpt) if ckpt else None)
    if ckpt is not None:
        state = checkpoint.load_checkpoint(accelerator, ckpt, scheduler)
        start_iter = state["iteration"]
        kl_ctl.load_state_dict(state["kl_controller"])
        calibration = state.get("calibration", calibration)  # never re-measured on resume
        log.info("resumed from %s (iteration %d)", ckpt, start_iter)
    elif cfg.normalize_score and cfg.calibration_prompts:
        with distributed.gathered_for_generation(accelerator, model):
            calibration = sft_calibration(
                unwrapped,
                reference,
                reward_model,
                reward_tokenizer,
                tokenizer,
                prompts,
                prompt_ids,
                recipe,
                accelerator,
            )
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

    bar = tqdm(
        total=cfg.iterations,
        initial=start_iter,
        desc="ppo",
        disable=not (accelerator.is_main_process and sys.stderr.isatty()),
    )
    guard = training.NonFiniteGuard(recipe.numerics.on_nonfinite, recipe.numerics.max_consecutive)
    stop = StopSignal().install()
    for iteration in range(start_iter, cfg.iterations):
        torch.manual_seed(iteration_seed(recipe.seed, iteration, rank))
        idx = sampler.indices(iteration)
        batch = pad_batch([prompt_ids[i] for i in idx], tokenizer.pad_token_id, side="left")
        batch_prompts = [prompts[i] for i in idx]

        def score_fn(roll: Rollout, batch_prompts: list = batch_prompts) -> torch.Tensor:
            return reward_scores(
                reward_model,
                reward_tokenizer,
                batch_prompts,
                roll.texts,
                recipe.reward.max_length,
                device,
                accelerator.autocast,
                roll.ended_with_eos,
            )

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
        )
        metrics = mean_across_ranks(accelerator, metrics)
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
        bar.update(1)
        bar.set_postfix(
            score=f"{metrics['objective/score']:.3f}", kl=f"{metrics['objective/kl']:.2f}"
        )
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
                    "calibration": calibration,
                },
                scheduler,
                cfg.keep_last,
            )
            if signum:
                stop.restore()
                raise Interrupted(signum, saved)
    bar.close()
    stop.restore()

    with distributed.gathered_for_generation(accelerator, model):
        results = evaluate_policy(
            unwrapped,
            reference,
            reward_model,
            reward_tokenizer,
            tokenizer,
            eval_prompts or prompts,
            recipe,
            accelerator,
            calibration,
            "eval_prompts" if eval_prompts else "train_prompts",
        )
    accelerator.wait_for_everyone()
    full = distributed.full_state_dict(accelerator, model, prefix="policy.")  # every rank
    if accelerator.is_main_process:
        card = training.model_card(
            "PPO policy",
            recipe,
            f"PPO for {cfg.iterations} iterations against `{reward_dir}/model`, KL penalty to "
            f"`{sft_dir}/model`. Mean reward on {results['prompts_source']} "
            f"{results['ppo_score_mean']:.3f} "
            f"(SFT {results['sft_score_mean']:.3f}), win rate {results['win_rate']:.2f}.",
        )
        with out.staging(out.model_dir) as tmp:
            training.save_model(unwrapped.policy, tokenizer, tmp, cfg.merge_lora, card, full)
    logger.close()
    out.finish(results)
    accelerator.wait_for_everyone()
    log.info(
        "ppo: score on %s %.3f (SFT %.3f), win rate %.2f, KL %.2f",
        results["prompts_source"],
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
def evaluate_policy(
    model: ActorCritic,
    reference: torch.nn.Module | None,
    reward_model: torch.nn.Module,
    reward_tokenizer: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
    recipe: Any,
    accelerator: Any,
    calibration: dict | None,
    prompts_source: str = "eval_prompts",
) -> dict[str, Any]:
    """PPO policy vs the SFT policy on `prompts` (`prompts_source`: ppo.eval_prompts, or the
    training prompts when none are set), same sampling settings and seed, both scored by the
    reward model; win rate with a 95% Wilson interval."""
    cfg = recipe.ppo
    rank = accelerator.process_index
    pool = prompts[: cfg.eval_size]  # sharded: every rank gets as many prompts (in step)
    chosen = [pool[i] for i in distributed.rank_indices(len(pool), accelerator)]
    device = accelerator.device
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("ppo", "sft", "kl", "len", "eos")}
    samples = []
    for start in range(0, len(chosen), cfg.batch_size):
        group = chosen[start : start + cfg.batch_size]
        batch = pad_batch(
            [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in group],
            tokenizer.pad_token_id,
            side="left",
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        for which in ("ppo", "sft"):
            torch.manual_seed(recipe.seed + 12345 + start + rank)
            with eval_mode(model), accelerator.autocast():
                if which == "ppo":
                    roll = generate(model.policy, ids, mask, cfg, tokenizer, keep=True)
                    score_with_models(roll, model, reference, cfg.temperature, accelerator.autocast)
                    rows["kl"].append(((roll.logprobs - roll.ref_logprobs) * roll.mask).sum(1))
                    rows["len"].append(roll.mask.sum(1))
                    rows["eos"].append(roll.ended_with_eos.float())
                else:
                    roll = _generate_reference(model, reference, ids, mask, cfg, tokenizer)
            scores = reward_scores(
                reward_model,
                reward_tokenizer,
                group,
                roll.texts,
                recipe.reward.max_length,
                device,
                accelerator.autocast,
                roll.ended_with_eos,
            )
            rows[which].append(scores)
            if which == "ppo":
                samples.extend(
                    {"prompt": _last_user(p), "ppo": t, "ppo_score": float(s)}
                    for p, t, s in zip(group, roll.texts, scores)
                )
            else:
                for s_row, t, s in zip(samples[-len(group) :], roll.texts, scores):
                    s_row.update(sft=t, sft_score=float(s))
    cat = {k: torch.cat(v) if v else torch.zeros(0, device=device) for k, v in rows.items()}
    # Each prompt once: the padded shares of a sharded run repeat some (rlhf/distributed.py).
    gathered = {k: distributed.gather_evaluated(accelerator, v, len(pool)) for k, v in cat.items()}
    n = len(gathered["ppo"])
    wins = (gathered["ppo"] > gathered["sft"]).float() + 0.5 * (
        gathered["ppo"] == gathered["sft"]
    ).float()
    win_rate = wins.mean().item() if n else float("nan")
    result = {
        "n_prompts": n,
        "prompts_source": prompts_source,
        "ppo_score_mean": gathered["ppo"].mean().item(),
        "sft_score_mean": gathered["sft"].mean().item(),
        "win_rate": win_rate,
        "win_rate_ci95": list(wilson_interval(wins.sum().item(), n)) if n else None,
        "kl_mean": gathered["kl"].mean().item(),
        "response_length_mean": gathered["len"].mean().item(),
        "eos_rate": gathered["eos"].mean().item(),
        "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p},
        "samples": samples[:8],
    }
    if calibration:
        result["calibration"] = calibration
    return result


@torch.no_grad()
def sft_calibration(
    model: ActorCritic,
    reference: torch.nn.Module | None,
    reward_model: torch.nn.Module,
    reward_tokenizer: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
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
            roll = _generate_reference(model, reference, ids, mask, cfg, tokenizer)
        scores.append(
            reward_scores(
                reward_model,
                reward_tokenizer,
                [prompts[i] for i in group],
                roll.texts,
                recipe.reward.max_length,
                device,
                accelerator.autocast,
                roll.ended_with_eos,
            )
        )
    local = torch.cat(scores) if scores else torch.zeros(0, device=device)
    every = distributed.gather_evaluated(accelerator, local, len(pool)).double().cpu()
    std = every.std().item() if len(every) > 1 else 1.0
    return {
        "mean": every.mean().item(),
        "std": std if math.isfinite(std) and std > 0 else 1.0,
        "n": len(every),
        "source": "sft_samples",
    }


def _generate_reference(model, reference, ids, mask, cfg, tokenizer) -> Rollout:
    """Sample from the SFT policy: the adapter-disabled policy, or the frozen reference copy."""
    if reference is None:
        with model.adapter_disabled():
            return generate(model.policy, ids, mask, cfg, tokenizer)
    return generate(reference, ids, mask, cfg, tokenizer)
