"""Worker: one RLOO run, ours (ppo.estimator=rloo) or TRL's RLOOTrainer, on identical work.

Both: the prepared model as policy (full fine-tuning, fp32, a frozen reference copy; or, with
`lora` in the spec, LoRA r=16 on all linear layers in bf16 where `precision: auto` picks it,
the reference being the adapter disabled), the same model with a 1-output sequence-
classification head as reward model, the same prompts (chat template), k samples per prompt,
`batch` completions per optimizer step (batch / k prompts), one pass over each batch (TRL
num_iterations=1, ours ppo_epochs=1, one minibatch), the same max new tokens, temperature, KL
coefficient (both fold beta * KL into the sequence reward), learning rate (constant), clip 1.0.
Times per iteration include generation and scoring (TRL generates inside its training step);
the first `warmup` iterations are left out by the summary. Peak RSS is measured by bench/run.py
around the process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.common import log, step_time_callback, trl_cpu_args, worker_main


def run_ours(spec: dict) -> dict:
    """Our PPO iteration with spec["estimator"] (default rloo; grpo: bench/grpo_workers.py)."""
    from rlhf import accel
    from rlhf.algo.ppo import FixedKLController
    from rlhf.infra import training
    from rlhf.infra.runtime import make_accelerator
    from rlhf.ppo.iteration import PPOContext, ppo_iteration
    from rlhf.roles import models
    from rlhf.roles.actor_critic import ActorCritic
    from rlhf.tokens.chat import encode_prompt, pad_batch

    k, batch = spec["k"], spec["batch"]
    recipe = rloo_recipe(spec)
    cfg = recipe.ppo
    accel.use(recipe.accel)
    accelerator = make_accelerator(recipe)
    tokenizer = models.load_tokenizer(spec["model"], padding_side="left")
    policy, reference, score = load_roles(spec, recipe, accelerator)
    model = ActorCritic(policy, with_values=False)
    optimizer = training.make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = FixedKLController(cfg.kl_coef)
    ctx = PPOContext(model, reference, optimizer, None, accelerator, tokenizer, kl_ctl, cfg)
    messages = [[{"role": "user", "content": p}] for p in spec["prompts"]]
    ids = [encode_prompt(tokenizer, m, cfg.max_prompt_length) for m in messages]
    step_times, tokens, per_iter = [], 0, batch // k
    for it in range(spec["steps"]):
        chosen = [(it * per_iter + j) % len(ids) for j in range(per_iter)]
        rows = [i for i in chosen for _ in range(k)]  # k consecutive rows per prompt
        t0 = time.perf_counter()
        torch.manual_seed(spec["seed"] + it)
        padded = pad_batch([ids[i] for i in rows], tokenizer.pad_token_id, side="left")

        def score_fn(roll, rows=rows):
            return score([messages[i] for i in rows], roll.texts)

        roll, _ = ppo_iteration(
            ctx, padded, score_fn, torch.Generator().manual_seed(spec["seed"] + 7 + it)
        )
        step_times.append(time.perf_counter() - t0)
        tokens += int(roll.mask.sum())
        log(f"ours-{cfg.estimator}: iteration {it} {step_times[-1]:.2f}s")
    stage = f"{cfg.estimator}-lora" if spec["lora"] else cfg.estimator
    return {"impl": "ours", "stage": stage, "step_times": step_times, "tokens": tokens}


def rloo_recipe(spec: dict) -> Any:
    """Our recipe for the spec's work (k samples per prompt, one PPO epoch); the estimator is
    spec["estimator"], rloo by default (grpo: bench/grpo_workers.py)."""
    from rlhf.recipe import LoraConfig, OptimConfig, PPOConfig, Recipe

    batch = spec["batch"]
    cfg = PPOConfig(
        estimator=spec.get("estimator", "rloo"),
        samples_per_prompt=spec["k"],
        batch_size=batch,
        mini_batch_size=spec.get("mini_batch", batch),
        ppo_epochs=1,
        max_prompt_length=spec["max_prompt_length"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"],
        kl_coef=spec["beta"],
        normalize_score=False,
        lora=LoraConfig(enabled=spec["lora"], r=16, alpha=32, target_modules="all-linear"),
        optim=OptimConfig(lr=spec["lr"], warmup_ratio=0.0, scheduler="constant"),
    )
    return Recipe(seed=spec["seed"], precision="auto" if spec["lora"] else "fp32", ppo=cfg)


def load_roles(spec: dict, recipe: Any, accelerator: Any) -> tuple[Any, Any, Any]:
    """(policy, reference or None, score(messages, texts)): all from the spec's model."""
    from rlhf.infra.runtime import frozen_weight_dtype
    from rlhf.ppo.rollout import reward_scores
    from rlhf.roles import models
    from rlhf.roles.actor_critic import disable_dropout

    path = spec["model"]
    reward_tokenizer = models.load_tokenizer(path)
    reward_model = models.load_reward_model(path).eval().requires_grad_(False)
    disable_dropout(reward_model)
    if spec["lora"]:  # as the PPO stage sets up LoRA: no reference copy, frozen weights in bf16
        reference = None
        policy = models.apply_lora(models.load_causal_lm(path), recipe.ppo.lora)
        frozen = frozen_weight_dtype(accelerator.mixed_precision)
        if frozen:
            models.store_frozen_linears(policy, frozen)
            models.store_frozen_linears(reward_model, frozen)
    else:
        reference = models.load_causal_lm(path).eval().requires_grad_(False)
        disable_dropout(reference)
        policy = models.load_causal_lm(path)

    def score(messages: list, texts: list[str]) -> torch.Tensor:
        return reward_scores(
            reward_model,
            reward_tokenizer,
            messages,
            texts,
            recipe.reward.max_length,
            accelerator.device,
            accelerator.autocast,
        )

    return policy, reference, score


def trl_inputs(spec: dict) -> tuple[Any, Any, Any, Any]:
    """(tokenizer, reward tokenizer, reward model, prompt dataset) for a TRL trainer on the
    spec's model, seeded."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(spec["seed"])
    path = spec["model"]
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    reward_tokenizer = AutoTokenizer.from_pretrained(path)
    # SmolLM2's pad is its EOS <|im_end|>: TRL's reward pooling (last token != pad) would read
    # the wrong token (as in bench/trl_trainers.py). Ours pools at the last real token.
    reward_tokenizer.pad_token = "<|endoftext|>"
    reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}]} for p in spec["prompts"]]
    )
    return tokenizer, reward_tokenizer, reward_model, data


def train_trl(trainer_class: Any, spec: dict, config: Any) -> tuple[list[float], list[float]]:
    """Train TRL's `trainer_class` (RLOOTrainer, GRPOTrainer) under `config` on trl_inputs(spec):
    (each optimizer step's seconds, each logged mean completion length)."""
    tokenizer, reward_tokenizer, reward_model, data = trl_inputs(spec)
    trainer = trainer_class(
        model=spec["model"],
        reward_funcs=[reward_model],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        reward_processing_classes=[reward_tokenizer],
        peft_config=lora_config(spec),
    )
    step_times: list[float] = []
    trainer.add_callback(step_time_callback(step_times))
    trainer.train()
    log = trainer.state.log_history
    return step_times, [e["completions/mean_length"] for e in log if "completions/mean_length" in e]


def run_trl(spec: dict, out_dir: Path) -> dict:
    import trl

    from rlhf.infra.runtime import resolve_precision

    config = trl.RLOOConfig(
        **trl_cpu_args(spec["seed"], bf16=spec["lora"] and resolve_precision("auto") == "bf16"),
        output_dir=str(out_dir / "trl-rloo-out"),
        learning_rate=spec["lr"],
        beta=spec["beta"],
        max_steps=spec["steps"],
        # each step: k answers to each of batch / k prompts, one pass over them
        per_device_train_batch_size=spec["batch"],
        num_generations=spec["k"],
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
    )
    step_times, lengths = train_trl(trl.RLOOTrainer, spec, config)
    return {
        "impl": "trl",
        "trl": trl.__version__,
        "stage": "rloo-lora" if spec["lora"] else "rloo",
        "step_times": step_times,
        "tokens": int(sum(lengths) * spec["batch"]),
    }


def lora_config(spec: dict):
    """TRL's LoRA set-up for the `lora` variant (the same r, alpha and layers as ours), else None."""
    if not spec["lora"]:
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def main() -> None:
    rows = lambda spec: spec["steps"] * spec["batch"]  # noqa: E731
    worker_main(__doc__.splitlines()[0], run_ours, run_trl, rows)


if __name__ == "__main__":
    main()
