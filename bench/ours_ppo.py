"""Worker: this project's PPO iteration (rlhf.ppo.ppo_iteration) on the benchmark's work.

Roles are built by the PPO stage's own code (rlhf.ppo.roles.build_roles,
rlhf.ppo.scorers.reward_model_scorer), from the prepared base model (no SFT / reward run
needed: the benchmark measures cost, not learning):
  parity    full fine-tuning, frozen reference copy, separate value model initialised from the
            reward model (as TRL does), fp32, no gradient clipping (TRL's PPO does not clip)
  defaults  the recipe defaults: LoRA policy (reference = adapter disabled), shared-backbone
            value head, bf16 autocast where the CPU supports it (precision: auto)
Both do identical PPO work (batch, new tokens, epochs, minibatches, temperature, prompts).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench import common
from bench.common import PhaseTimer, log


def build_recipe(spec: dict):
    from rlhf.recipe import LoraConfig, OptimConfig, PPOConfig, Recipe

    parity = spec["variant"] == "parity"
    ppo = PPOConfig(
        batch_size=spec["batch_size"],
        mini_batch_size=spec["batch_size"] // spec["num_mini_batches"],
        ppo_epochs=spec["ppo_epochs"],
        max_prompt_length=spec["max_prompt_length"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"],
        kl_coef=spec["kl_coef"],
        normalize_score=False,  # no calibration file for the raw base model
        value_model="separate" if parity else "shared",
        lora=LoraConfig(enabled=not parity),
        optim=OptimConfig(
            lr=spec["lr"],
            warmup_ratio=0.0,
            scheduler="constant",
            max_grad_norm=None if parity else OptimConfig().max_grad_norm,
        ),
    )
    return Recipe(seed=spec["seed"], precision="fp32" if parity else "auto", ppo=ppo)


def main() -> None:
    args = common.worker_args(__doc__.splitlines()[0])
    spec = common.read_json(args.spec)
    t_start = time.perf_counter()

    from rlhf import accel
    from rlhf.infra import training
    from rlhf.infra.runtime import frozen_weight_dtype, make_accelerator

    recipe = build_recipe(spec)
    accel.use(recipe.accel)
    accelerator = make_accelerator(recipe)
    ctx, reward_model = build_context(spec, recipe, accelerator)
    timer = PhaseTimer()
    timed_reward_model = instrument(timer, ctx, reward_model)
    load_s = time.perf_counter() - t_start
    log(f"{spec['label']}: loaded in {load_s:.1f}s, mixed precision {accelerator.mixed_precision}")

    iterations = []
    for it in range(spec["warmup"] + spec["iterations"]):
        iterations.append(timed_iteration(ctx, spec, it, timer, timed_reward_model))
        log(f"{spec['label']}: iteration {it} {iterations[-1]['total']:.2f}s")

    common.write_json(
        args.out,
        {
            "label": spec["label"],
            "variant": spec["variant"],
            "load_s": load_s,
            "warmup": spec["warmup"],
            "iterations": iterations,
            "torch_threads": torch.get_num_threads(),
            "mixed_precision": accelerator.mixed_precision,
            "frozen_weights": str(
                frozen_weight_dtype(accelerator.mixed_precision) or torch.float32
            ).removeprefix("torch."),
            "trainable_parameters": training.trainable_parameters(ctx.model)[0],
            "self_peak_rss_mb": common.self_peak_rss_mb(),
        },
    )


def build_context(spec: dict, recipe: Any, accelerator: Any) -> tuple[Any, Any]:
    """(PPOContext, reward scorer) as the PPO stage builds them, from the spec's model."""
    from rlhf.algo.ppo import FixedKLController
    from rlhf.infra import training
    from rlhf.ppo.iteration import PPOContext
    from rlhf.ppo.roles import build_roles
    from rlhf.ppo.scorers import reward_model_scorer
    from rlhf.roles import models

    cfg, path = recipe.ppo, spec["model"]
    tokenizer = models.load_tokenizer(path, padding_side="left")
    # The PPO stage's own role builder and reward scorer (frozen weights in the autocast dtype
    # included); the critic and the reward model start from the base model here.
    model, reference = build_roles(
        cfg, accelerator, lambda: models.load_causal_lm(path), critic_dir=path
    )
    reward_model = reward_model_scorer(path, accelerator, recipe.reward.max_length)
    optimizer = training.make_optimizer(model, cfg.optim)
    n_iters = spec["warmup"] + spec["iterations"]
    scheduler = training.make_scheduler(optimizer, cfg.optim, n_iters * cfg.ppo_epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    training.without_fp32_outputs(accelerator, model)  # as the PPO stage does
    kl_ctl = FixedKLController(cfg.kl_coef)
    ctx = PPOContext(model, reference, optimizer, scheduler, accelerator, tokenizer, kl_ctl, cfg)
    return ctx, reward_model


def instrument(timer: PhaseTimer, ctx: Any, reward_model: Any) -> Any:
    """Time the update's backward and optimizer step, the reference's forward and the reward
    model (returned wrapped); the coarse phases come from ppo_iteration's own timing."""
    timer.patch(ctx.accelerator, "backward", "backward")
    timer.patch(ctx.optimizer, "step", "optimizer")
    if ctx.reference is None:
        timer.patch(ctx.accelerator.unwrap_model(ctx.model), "reference_logits", "reference")
    else:
        timer.patch(ctx.reference, "forward", "reference")
    return timer.wrap(reward_model, "reward")


def timed_iteration(
    ctx: Any, spec: dict, it: int, timer: PhaseTimer, reward_model: Any
) -> dict[str, float]:
    """PPO iteration `it` on the fixed batch order the TRL worker uses (iteration i gets
    prompts [8i, 8i+8)): its total and phase seconds, and its rollout's shapes."""
    from rlhf.ppo.iteration import ppo_iteration
    from rlhf.ppo.prompts import Prompts

    prompts, size, tokenizer = spec["prompts"], ctx.cfg.batch_size, ctx.tokenizer
    rows = [prompts[(it * size + j) % len(prompts)] for j in range(size)]
    timer.mark_iteration()
    t0 = time.perf_counter()
    torch.manual_seed(spec["seed"] + it)
    batch = Prompts([r["messages"] for r in rows], [{}] * len(rows), [r["input_ids"] for r in rows])

    def score_fn(roll, messages=batch.messages):
        return reward_model(messages, roll.texts)

    gen = torch.Generator().manual_seed(spec["seed"] + 7 + it)
    padded = batch.padded(tokenizer.pad_token_id, ctx.accelerator.device)
    roll, metrics = ppo_iteration(ctx, padded, score_fn, gen)
    total = time.perf_counter() - t0
    events = timer.iteration_events(time.perf_counter())[-1]
    row = {
        "total": total,
        "generate": metrics["timing/rollout"],
        "score": metrics["timing/score"],
        "update": metrics["timing/update"],
        **{
            k: common.phase_sum(events, k) for k in ("backward", "optimizer", "reference", "reward")
        },
        "prompt_len": int(roll.prompt_ids.shape[1]),
        "response_len": int(roll.response_ids.shape[1]),
        "response_tokens": common.count_response_tokens(roll.response_ids, tokenizer.eos_token_id),
    }
    row["train_forward_and_loss"] = row["update"] - row["backward"] - row["optimizer"]
    row["other"] = total - row["generate"] - row["score"] - row["update"]
    return row


if __name__ == "__main__":
    main()
