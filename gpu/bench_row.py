"""One timed PPO iteration (GAE, then GRPO) on the tiny random model, on CUDA when present.

Prints one JSON line per estimator: device, precision, the seconds of the measured iteration
and of its rollout / scoring / update phases, and response tokens per second. One warm-up
iteration runs first (CUDA kernels load, caches fill). A smoke row for gpu/check.sh, not a
benchmark: bench/run.py measures the real workloads.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlhf.infra.runtime import make_accelerator
from rlhf.infra.training import make_optimizer
from rlhf.ppo import FixedKLController
from rlhf.ppo.iteration import PPOContext, ppo_iteration
from rlhf.recipe import LoraConfig, PPOConfig, Recipe
from rlhf.roles import models
from rlhf.roles.actor_critic import ActorCritic


def length_score(roll) -> torch.Tensor:
    """A programmatic reward (response length): the row measures cost, not learning."""
    return roll.mask.sum(1).float() / roll.mask.shape[1]


def context(estimator: str, precision: str, batch: int, new_tokens: int) -> PPOContext:
    cfg = PPOConfig(
        estimator=estimator,
        samples_per_prompt=1 if estimator == "gae" else 4,
        batch_size=batch,
        mini_batch_size=batch // 2,
        max_new_tokens=new_tokens,
        normalize_score=False,
    )
    accelerator = make_accelerator(Recipe(precision=precision, seed=0))
    name = models.resolve("tiny-llama")
    tokenizer = models.load_tokenizer(name, padding_side="left")
    policy = models.apply_lora(models.load_causal_lm(name), LoraConfig(enabled=True, r=8))
    model = ActorCritic(policy)
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl = FixedKLController(cfg.kl_coef)
    return PPOContext(model, None, optimizer, None, accelerator, tokenizer, kl, cfg)


def timed_iteration(ctx: PPOContext, seed: int) -> dict[str, float]:
    device = ctx.accelerator.device
    torch.manual_seed(seed)
    prompts = torch.randint(3, 1000, (ctx.cfg.batch_size, 24), device=device)
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, metrics = ppo_iteration(ctx, batch, length_score, torch.Generator().manual_seed(seed))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    for estimator in ("gae", "grpo"):
        ctx = context(estimator, args.precision, args.batch, args.new_tokens)
        timed_iteration(ctx, seed=0)  # warm-up
        m = timed_iteration(ctx, seed=1)
        row = {
            "row": f"ppo-{estimator}",
            "device": str(ctx.accelerator.device),
            "precision": args.precision,
            "batch": args.batch,
            "max_new_tokens": args.new_tokens,
            "iteration_s": round(m["seconds"], 4),
            "rollout_s": round(m["timing/rollout"], 4),
            "score_s": round(m["timing/score"], 4),
            "update_s": round(m["timing/update"], 4),
            "tokens_per_s": round(m["tokens_per_second"], 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
