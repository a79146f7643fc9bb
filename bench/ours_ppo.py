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

    from rlhf.algo.ppo import FixedKLController
    from rlhf.infra import training
    from rlhf.infra.runtime import frozen_weight_dtype, make_accelerator
    from rlhf.ppo.iteration import PPOContext, ppo_iteration
    from rlhf.ppo.prompts import Prompts
    from rlhf.ppo.roles import build_roles
    from rlhf.ppo.scorers import reward_model_scorer
    from rlhf.roles import models

    recipe = build_recipe(spec)
    cfg = recipe.ppo
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    path = spec["model"]

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
    ctx = PPOContext(model, reference, optimizer, scheduler, accelerator, tokenizer,
                     FixedKLController(cfg.kl_coef), cfg)  # fmt: skip

    timer = PhaseTimer()
    # Finer split of the update phase; the coarse phases come from ppo_iteration's own timing.
    timer.patch(accelerator, "backward", "backward")
    timer.patch(optimizer, "step", "optimizer")
    # and of the score phase: the reference's forward and the reward model's
    if reference is None:
        timer.patch(accelerator.unwrap_model(model), "reference_logits", "reference")
    else:
        timer.patch(reference, "forward", "reference")
    timed_reward_model = timer.wrap(reward_model, "reward")
    prompts = spec["prompts"]
    load_s = time.perf_counter() - t_start
    log(f"{spec['label']}: loaded in {load_s:.1f}s, mixed precision {accelerator.mixed_precision}")

    iterations = []
    for it in range(n_iters):
        # The same fixed batch order as the TRL worker: iteration i gets prompts [8i, 8i+8).
        rows = [prompts[(it * cfg.batch_size + j) % len(prompts)] for j in range(cfg.batch_size)]
        timer.mark_iteration()
        t0 = time.perf_counter()
        torch.manual_seed(spec["seed"] + it)
        batch = Prompts([r["messages"] for r in rows], [{}] * len(rows),
                        [r["input_ids"] for r in rows])  # fmt: skip

        def score_fn(roll, messages=batch.messages):
            return timed_reward_model(messages, roll.texts)

        gen = torch.Generator().manual_seed(spec["seed"] + 7 + it)
        roll, metrics = ppo_iteration(
            ctx, batch.padded(tokenizer.pad_token_id, device), score_fn, gen
        )
        total = time.perf_counter() - t0
        events = timer.iteration_events(time.perf_counter())[-1]
        row = {
            "total": total,
            "generate": metrics["timing/rollout"],
            "score": metrics["timing/score"],
            "update": metrics["timing/update"],
            "backward": common.phase_sum(events, "backward"),
            "optimizer": common.phase_sum(events, "optimizer"),
            "reference": common.phase_sum(events, "reference"),
            "reward": common.phase_sum(events, "reward"),
            "prompt_len": int(roll.prompt_ids.shape[1]),
            "response_len": int(roll.response_ids.shape[1]),
            "response_tokens": common.count_response_tokens(
                roll.response_ids, tokenizer.eos_token_id
            ),
        }
        row["train_forward_and_loss"] = row["update"] - row["backward"] - row["optimizer"]
        row["other"] = total - row["generate"] - row["score"] - row["update"]
        iterations.append(row)
        log(f"{spec['label']}: iteration {it} {total:.2f}s")

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
            "trainable_parameters": training.trainable_parameters(model)[0],
            "self_peak_rss_mb": common.self_peak_rss_mb(),
        },
    )


if __name__ == "__main__":
    main()
