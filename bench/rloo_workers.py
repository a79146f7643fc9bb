"""Worker: one RLOO run, ours (ppo.estimator=rloo) or TRL's RLOOTrainer, on identical work.

Both: the prepared model as policy (full fine-tuning, fp32, a frozen reference copy), the same
model with a 1-output sequence-classification head as reward model, the same prompts (chat
template), k samples per prompt, `batch` completions per optimizer step (batch / k prompts),
one pass over each batch (TRL num_iterations=1, ours ppo_epochs=1, one minibatch), the same
max new tokens, temperature, KL coefficient (both fold beta * KL into the sequence reward),
learning rate (constant), clip 1.0. Times per iteration include generation and scoring (TRL
generates inside its training step); the first `warmup` iterations are left out by the
summary. Peak RSS is measured by bench/run.py around the process.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import log, read_json, step_timer, worker_args, write_json


def run_ours(spec: dict) -> dict:
    from rlhf import models, training
    from rlhf.chat import encode_prompt, pad_batch
    from rlhf.ppo.actor_critic import ActorCritic, disable_dropout
    from rlhf.ppo.core import FixedKLController
    from rlhf.ppo.iteration import PPOContext, ppo_iteration
    from rlhf.ppo.rollout import reward_scores
    from rlhf.recipe import LoraConfig, OptimConfig, PPOConfig, Recipe
    from rlhf.runtime import make_accelerator

    k, batch = spec["k"], spec["batch"]
    cfg = PPOConfig(
        estimator="rloo",
        samples_per_prompt=k,
        batch_size=batch,
        mini_batch_size=batch,
        ppo_epochs=1,
        max_prompt_length=spec["max_prompt_length"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"],
        kl_coef=spec["beta"],
        normalize_score=False,
        lora=LoraConfig(enabled=False),
        optim=OptimConfig(lr=spec["lr"], warmup_ratio=0.0, scheduler="constant"),
    )
    recipe = Recipe(seed=spec["seed"], precision="fp32", ppo=cfg)
    accelerator = make_accelerator(recipe)
    path = spec["model"]
    tokenizer = models.load_tokenizer(path, padding_side="left")
    reward_tokenizer = models.load_tokenizer(path)
    reference = models.load_causal_lm(path).eval().requires_grad_(False)
    disable_dropout(reference)
    model = ActorCritic(models.load_causal_lm(path), with_values=False)
    reward_model = models.load_reward_model(path).eval().requires_grad_(False)
    disable_dropout(reward_model)
    optimizer = training.make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = PPOContext(model, reference, optimizer, None, accelerator, tokenizer,
                     FixedKLController(cfg.kl_coef), cfg)  # fmt: skip
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
            return reward_scores(
                reward_model,
                reward_tokenizer,
                [messages[i] for i in rows],
                roll.texts,
                recipe.reward.max_length,
                accelerator.device,
                accelerator.autocast,
            )

        roll, _ = ppo_iteration(
            ctx, padded, score_fn, torch.Generator().manual_seed(spec["seed"] + 7 + it)
        )
        step_times.append(time.perf_counter() - t0)
        tokens += int(roll.mask.sum())
        log(f"ours-rloo: iteration {it} {step_times[-1]:.2f}s")
    return {"impl": "ours", "stage": "rloo", "step_times": step_times, "tokens": tokens}


def run_trl(spec: dict, out_dir: Path) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

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
    config = trl.RLOOConfig(
        output_dir=str(out_dir / "trl-rloo-out"),
        num_generations=spec["k"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        beta=spec["beta"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_steps=spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=spec["seed"],
        disable_tqdm=True,
    )
    trainer = trl.RLOOTrainer(
        model=path,
        reward_funcs=[reward_model],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        reward_processing_classes=[reward_tokenizer],
    )
    step_times: list[float] = []
    trainer.add_callback(step_timer(TrainerCallback, step_times))
    trainer.train()
    lengths = [
        e["completions/mean_length"]
        for e in trainer.state.log_history
        if "completions/mean_length" in e
    ]
    return {
        "impl": "trl",
        "trl": trl.__version__,
        "stage": "rloo",
        "step_times": step_times,
        "tokens": int(sum(lengths) * spec["batch"]),
    }


def main() -> None:
    args = worker_args(__doc__.splitlines()[0])
    spec = read_json(args.spec)
    t0 = time.perf_counter()
    if spec["impl"] == "ours":
        result = run_ours(spec)
    else:
        result = run_trl(spec, Path(args.out).parent)
    result.update(rows=spec["steps"] * spec["batch"], wall_s=time.perf_counter() - t0)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
