"""Worker: TRL 1.12's trl.experimental.ppo.PPOTrainer, as shipped, on the benchmark's work.

Runs inside bench/.venv-trl (trl==1.12.0, the last release with PPO). Settings that make the
work identical to ours, and why:
  - use_cpu=True, bf16=False: the config defaults refuse to start on CPU; fp32 like parity.
  - pad token <|endoftext|>: TRL builds attention masks as `ids != pad`; with SmolLM2's
    shipped pad == eos (<|im_end|>) it would mask every <|im_end|> inside the chat prompt.
  - stop_token="eos": mask everything after the first EOS, as ours does.
  - num_sample_generations=0: no extra sampling on the eval set (ours does none per iteration);
    an eval dataset must still be passed or the trainer cannot be built.
  - the train dataloader is replaced by the fixed batch order both workers use (TRL shuffles);
    batch width decides the cost of an iteration, so both must see the same batches.
Phases are timed by wrapping TRL's module-level functions and the optimizer/accelerator from
the outside; TRL's code is not modified. As shipped it also calls gc.collect() twice per
iteration (timed here as "gc").
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from bench.common import (
    PhaseTimer,
    count_response_tokens,
    log,
    phase_sum,
    read_json,
    self_peak_rss_mb,
    worker_args,
    write_json,
)


class FixedOrderBatches:
    """Replaces TRL's shuffled DataLoader: batch i is prompts [8i, 8i+8), left padded."""

    def __init__(self, prompts: list[dict], batch_size: int, pad_id: int, timer: PhaseTimer):
        self.prompts, self.batch_size, self.pad_id, self.timer = prompts, batch_size, pad_id, timer

    def __iter__(self):
        n = len(self.prompts)
        for start in range(0, n, self.batch_size):
            # TRL's train loop fetches one batch at the top of each iteration: mark it here.
            self.timer.mark_iteration()
            rows = [self.prompts[(start + j) % n]["input_ids"] for j in range(self.batch_size)]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            yield {"input_ids": ids}


class TimedGC:
    """Stands in for the `gc` module inside trl's ppo_trainer, timing gc.collect()."""

    def __init__(self, timer: PhaseTimer):
        import gc

        self.collect = timer.wrap(gc.collect, "gc")


def main() -> None:
    args = worker_args(__doc__.splitlines()[0])
    spec = read_json(args.spec)
    t_start = time.perf_counter()

    import transformers
    import trl
    from transformers import AutoTokenizer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    tokenizer.pad_token = "<|endoftext|>"  # see the module docstring
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    trainer = build_trainer(spec, tokenizer)
    timer = PhaseTimer()
    trainer.dataloader = FixedOrderBatches(
        spec["prompts"], spec["batch_size"], tokenizer.pad_token_id, timer
    )
    instrument(trainer, ppo_module, timer, tokenizer.eos_token_id)
    load_s = time.perf_counter() - t_start
    log(f"{spec['label']}: loaded in {load_s:.1f}s (trl {trl.__version__})")

    trainer.train()
    write_json(
        args.out,
        {
            "label": spec["label"],
            "variant": "trl",
            "load_s": load_s,
            "warmup": spec["warmup"],
            "iterations": iteration_rows(timer, spec["label"]),
            "torch_threads": torch.get_num_threads(),
            "trl_version": trl.__version__,
            "transformers_version": transformers.__version__,
            "optimizer": type(trainer.optimizer.optimizer).__name__,
            "optimizer_defaults": {
                k: v
                for k, v in trainer.optimizer.optimizer.defaults.items()
                if isinstance(v, (bool, int, float, str, type(None)))
            },
            "self_peak_rss_mb": self_peak_rss_mb(),
        },
    )


def build_trainer(spec: dict, tokenizer: Any) -> Any:
    """TRL's PPOTrainer on the spec's prompts and settings: policy, reference, reward model
    and value model all loaded from the spec's model, in fp32."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    path = spec["model"]

    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def scalar_model():
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )

    n_iters = spec["warmup"] + spec["iterations"]
    prompts = spec["prompts"]
    train = Dataset.from_dict({"input_ids": [p["input_ids"] for p in prompts]})
    evaluation = Dataset.from_dict({"input_ids": [p["input_ids"] for p in prompts[:8]]})
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"),
        use_cpu=True,
        bf16=False,
        seed=spec["seed"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=spec["num_mini_batches"],
        num_ppo_epochs=spec["ppo_epochs"],
        response_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        learning_rate=spec["lr"],
        kl_coef=spec["kl_coef"],
        total_episodes=n_iters * spec["batch_size"],
        stop_token="eos",
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    return PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=causal_lm(),
        ref_model=causal_lm(),
        reward_model=scalar_model(),
        value_model=scalar_model(),
        train_dataset=train,
        eval_dataset=evaluation,
    )


def instrument(trainer: Any, ppo_module: Any, timer: PhaseTimer, eos_id: int) -> None:
    """Time TRL's phases from the outside, and record each rollout's shapes in timer.shapes."""
    # Module-level functions train() looks up at call time: wrap them in place.
    timer.patch(ppo_module, "batch_generation", "generate")
    timer.patch(ppo_module, "get_reward", "score")
    # forward() serves the reference (no grad) and the training forward (grad).
    timer.patch(
        ppo_module, "forward", lambda: "train_forward" if torch.is_grad_enabled() else "score"
    )
    timer.patch(trainer.accelerator, "backward", "backward")
    timer.patch(trainer.optimizer, "step", "optimizer")
    ppo_module.gc = TimedGC(timer)
    generate_fn = ppo_module.batch_generation

    def record_shapes(*a, **kw):
        query_responses, logits = generate_fn(*a, **kw)
        queries = a[1]
        response = query_responses[:, queries.shape[1] :]
        timer.shapes.append(
            {
                "prompt_len": int(queries.shape[1]),
                "response_len": int(response.shape[1]),
                "response_tokens": count_response_tokens(response, eos_id),
            }
        )
        return query_responses, logits

    ppo_module.batch_generation = record_shapes


def iteration_rows(timer: PhaseTimer, label: str) -> list[dict]:
    """Each iteration's total and phase seconds, with its rollout's shapes."""
    per_iter = timer.iteration_events(time.perf_counter())
    bounds = [*timer.marks, time.perf_counter()]
    iterations = []
    for i, events in enumerate(per_iter):
        row = {"total": bounds[i + 1] - bounds[i]}
        for name in ("generate", "score", "train_forward", "backward", "optimizer", "gc"):
            row[name] = phase_sum(events, name)
        # The update phase spans the first training forward to the last optimizer step.
        train = [(s, e) for n, s, e in events if n in ("train_forward", "backward", "optimizer")]
        row["update"] = max(e for _, e in train) - min(s for s, _ in train) if train else 0.0
        row["train_forward_and_loss"] = row["update"] - row["backward"] - row["optimizer"]
        row["other"] = row["total"] - row["generate"] - row["score"] - row["update"]
        row.update(timer.shapes[i] if i < len(timer.shapes) else {})
        iterations.append(row)
        log(f"{label}: iteration {i} {row['total']:.2f}s")
    return iterations


if __name__ == "__main__":
    main()
