"""Each fast path of rlhf/accel/ on against off, end to end: the default recipe's GRPO iteration.

One process runs the default recipe's PPO stage set-up (recipes/smollm2-135m.yaml: GRPO, 4
answers to each of 4 prompts, 48 new tokens, LoRA r 16 on all linears, bf16 autocast where the
CPU has it) from the prepared base model, which also serves as the reward model (the bench
measures cost, not learning). Then, round after round, it runs one iteration per variant:
`all`: every fast path; `all-X`: every fast path but X; `off`: `accel: off`. Variants run
interleaved inside each round, on the same prompts, so a busy neighbour hits them alike; the
table gives medians. docs/performance.md has the figures and the paths this deleted.
Switching a path off inside a process that has run it did not reproduce the stage's own
timing (docs/performance.md): confirm a deletion with `bench.versions`, a process per variant.

    python -m bench.accel_paths --rounds 3 --out accel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

PATHS = ("decode", "fused", "lean_lora", "attention")


def switch_off(path: str):
    """Undo-able patches that turn one fast path off; returns the undo function."""
    from rlhf.accel import apply
    from rlhf.ppo import rollout

    def null(*_args, **_kwargs):
        return nullcontext()

    targets = {
        "decode": [(rollout, "lean_decode_applies", lambda *a: False)],
        "fused": [(apply, "fused_projections", null)],
        "lean_lora": [(apply, "lean_lora_forward", null)],
        "attention": [(apply, "matmul_attention_backward", null)],
    }[path]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for owner, name, value in targets:
        setattr(owner, name, value)

    def undo():
        for owner, name, value in saved:
            setattr(owner, name, value)

    return undo


def setup(args):
    from rlhf import accel
    from rlhf.algo.ppo import FixedKLController
    from rlhf.infra import training
    from rlhf.infra.runtime import make_accelerator
    from rlhf.ppo.iteration import PPOContext
    from rlhf.ppo.roles import build_roles
    from rlhf.ppo.scorers import reward_model_scorer
    from rlhf.recipe import load_recipe
    from rlhf.roles import models
    from rlhf.tokens.chat import encode_prompt

    recipe = load_recipe(args.recipe, ["ppo.normalize_score=false"])
    cfg = recipe.ppo
    accel.use(recipe.accel)
    accelerator = make_accelerator(recipe)
    path = str(models.prepared_dir(recipe.model.name))
    tokenizer = models.load_tokenizer(path, padding_side="left")
    model, reference = build_roles(cfg, accelerator, lambda: models.load_causal_lm(path))
    scorer = reward_model_scorer(path, accelerator, recipe.reward.max_length)
    optimizer = training.make_optimizer(model, cfg.optim)
    scheduler = training.make_scheduler(optimizer, cfg.optim, 1000)
    model, optimizer = accelerator.prepare(model, optimizer)
    training.without_fp32_outputs(accelerator, model)
    ctx = PPOContext(
        model,
        reference,
        optimizer,
        scheduler,
        accelerator,
        tokenizer,
        FixedKLController(cfg.kl_coef),
        cfg,
    )
    lines = Path("reward_data/prompts/train.jsonl").read_text().splitlines()
    messages = [[{"role": "user", "content": json.loads(x)["prompt"]}] for x in lines if x]
    ids = [encode_prompt(tokenizer, m, cfg.max_prompt_length) for m in messages]
    return ctx, scorer, messages, ids, accelerator.mixed_precision


def one_iteration(ctx, scorer, messages, ids, round_index: int, seed: int) -> dict:
    import torch

    from rlhf.ppo.iteration import ppo_iteration
    from rlhf.ppo.prompts import Prompts

    cfg = ctx.cfg
    n = cfg.batch_size // cfg.samples_per_prompt
    # rows grouped by prompt, as the PPO stage builds them: k answers to each of n prompts
    rows = [
        (round_index * n + j) % len(ids) for j in range(n) for _ in range(cfg.samples_per_prompt)
    ]
    batch = Prompts([messages[r] for r in rows], [{}] * len(rows), [ids[r] for r in rows])
    torch.manual_seed(seed + round_index)
    msgs = batch.messages

    def score_fn(roll):
        return scorer(msgs, roll.texts)

    gen = torch.Generator().manual_seed(seed + 7 + round_index)
    t0 = time.perf_counter()
    roll, metrics = ppo_iteration(
        ctx, batch.padded(ctx.tokenizer.pad_token_id, "cpu"), score_fn, gen
    )
    return {
        "total": time.perf_counter() - t0,
        "rollout": metrics["timing/rollout"],
        "score": metrics["timing/score"],
        "update": metrics["timing/update"],
        "response_len": int(roll.response_ids.shape[1]),
    }


def run_variant(variant: str, ctx, scorer, messages, ids, round_index, seed) -> dict:
    from rlhf import accel

    undo = []
    if variant.startswith("all-"):
        undo.append(switch_off(variant[4:]))
    with accel.using("off" if variant == "off" else "auto"):
        try:
            return one_iteration(ctx, scorer, messages, ids, round_index, seed)
        finally:
            for u in undo:
                u()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/smollm2-135m.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(["all", "off", *(f"all-{x}" for x in PATHS)]))
    p.add_argument("--warmup", default="all,off", help="variants run once before the rounds")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from rlhf import accel

    if accel.forced_off():  # every variant would run the plain path under its own label
        raise SystemExit("bench.accel_paths compares the fast paths with off: unset RLHF_ACCEL")
    ctx, scorer, messages, ids, mixed = setup(args)
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for v in args.warmup.split(","):  # first-call allocations, both samplers
        run_variant(v, ctx, scorer, messages, ids, 0, args.seed)
    for r in range(args.rounds):
        for v in variants:
            row = run_variant(v, ctx, scorer, messages, ids, r + 1, args.seed)
            results[v].append(row)
            print(f"round {r} {v}: {row['total']:.2f}s", flush=True)
            args.out.write_text(json.dumps({"mixed_precision": mixed, "results": results}))
    base = statistics.median(x["total"] for x in results["all"])
    for v, rows in results.items():
        med = statistics.median(x["total"] for x in rows)
        print(f"{v:>20}: median {med:.2f}s  ({med / base - 1:+.1%} vs all)")


if __name__ == "__main__":
    main()
