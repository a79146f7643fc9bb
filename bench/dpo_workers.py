"""Worker: DPO optimizer steps, TRL's DPOTrainer or our DPO stage's step.

Both: the prepared model as policy, one LoRA adapter (the reference is the same weights with
the adapter disabled), fp32, no gradient checkpointing, no dropout, the same rankings in the
same order, `rankings_per_step` rankings per optimizer step expanded to the same pairs (all
K(K-1)/2 or the best against each other), sigmoid loss with the same beta, AdamW (fused) with
a constant learning rate and no weight decay, clip 1.0.

  trl:  DPOTrainer, its batch the step's pairs: one policy forward + backward and one
        reference forward over [chosen; rejected], two whole sequences per pair.
  ours: the loss of rlhf/stages/dpo.py (`dpo_objective`), on its batches: each ranking's
        shared prefix once and each of its K responses once per model, every pair indexing
        those sequence log-probs.

Step times: TRL's from a step callback, ours around the same work (batch, forwards, backward,
clip, optimizer), each as wall seconds and as this process's CPU seconds (on a shared machine
the wall time counts whatever else ran, the CPU time does not); the summary leaves the first
(warm-up) step out. Peak RSS is measured by
bench/run.py around the process.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import log, step_time_callback, trl_cpu_args, worker_main


def step_rankings(spec: dict) -> list[list[dict]]:
    """The rankings of each step, in order: `rankings_per_step` consecutive ones."""
    n = spec["rankings_per_step"]
    rows = spec["rankings"]
    return [rows[(s * n) % len(rows) :][:n] for s in range(spec["steps"])]


def to_rankings(rows: list[dict]) -> list:
    from rlhf.data.types import Ranking

    return [
        Ranking(
            prompt=[{"role": "user", "content": r["prompt"]}],
            responses=r["responses"],
            ranking=r["ranking"],
        )
        for r in rows
    ]


def trl_rows(rankings: list, mode: str) -> list[dict]:
    """TRL's conversational preference rows, one per pair (`mode`: all, best_vs_rest):
    {"prompt": messages, "chosen": [assistant message], "rejected": [assistant message]}."""
    from rlhf.roles.preference import ranked_pairs

    def reply(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    return [
        {"prompt": r.prompt, "chosen": reply(r.responses[b]), "rejected": reply(r.responses[w])}
        for r in rankings
        for b, w in ranked_pairs(r, mode)
    ]


def lora(spec: dict):
    from rlhf.recipe import LoraConfig

    return LoraConfig(enabled=True, r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=0.0)


def run_ours(spec: dict) -> dict:
    from accelerate import Accelerator

    from rlhf.infra import training
    from rlhf.recipe import DPOStageConfig, ModelConfig, OptimConfig
    from rlhf.roles import models
    from rlhf.roles import preference as dpo
    from rlhf.stages.dpo import dpo_objective, load_models

    torch.manual_seed(spec["seed"])
    cfg = DPOStageConfig(pairs=spec["pairs"], beta=spec["beta"], lora=lora(spec))
    recipe = SimpleNamespace(dpo=cfg, model=ModelConfig(name=spec["model"]))
    tokenizer = models.load_tokenizer(spec["model"])
    accelerator = Accelerator(cpu=True)
    policy, reference = load_models(recipe, spec["model"], accelerator)
    model = dpo.ResponseLogps(policy)
    optimizer = training.make_optimizer(model, OptimConfig(lr=spec["lr"], weight_decay=0.0))
    objective = dpo_objective(model, reference, cfg, accelerator)
    model.train()
    steps = [
        [dpo.encode_ranking(tokenizer, r, spec["pairs"], spec["max_length"]) for r in rankings]
        for rankings in map(to_rankings, step_rankings(spec))
    ]
    step_times, cpu_times, losses, tokens = [], [], [], 0
    for i, rows in enumerate(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = dpo.collate_rankings(rows, tokenizer.pad_token_id)
        loss_sum, _ = objective.loss_and_stats(batch)
        loss = loss_sum / objective.weight(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(loss.item())
        tokens += sum(int(batch[k].sum()) for k in ("attention_mask", "prefix_mask") if k in batch)
        log(f"ours-dpo: step {i} {step_times[-1]:.2f}s loss {losses[-1]:.4f}")
    return {
        "impl": "ours",
        "stage": "dpo",
        "step_times": step_times,
        "cpu_times": cpu_times,
        "losses": losses,
        "tokens": tokens,
    }


def run_trl(spec: dict, out_dir: Path) -> dict:
    import trl
    from datasets import Dataset

    from rlhf.roles import models

    torch.manual_seed(spec["seed"])
    path = spec["model"]
    tokenizer = models.load_tokenizer(path)
    policy = models.load_causal_lm(path)
    policy.config.pad_token_id = tokenizer.pad_token_id
    per_step = [trl_rows(to_rankings(r), spec["pairs"]) for r in step_rankings(spec)]
    batch = len(per_step[0])
    assert all(len(rows) == batch for rows in per_step), "every step needs as many pairs"
    config = trl.DPOConfig(
        **trl_cpu_args(spec["seed"]),
        output_dir=str(out_dir / "trl-dpo-out"),
        per_device_train_batch_size=batch,
        train_sampling_strategy="sequential",  # the same pairs per step as ours
        learning_rate=spec["lr"],
        weight_decay=0.0,
        max_steps=spec["steps"],
        max_length=spec["max_length"],
        loss_type=["sigmoid"],
        beta=spec["beta"],
    )
    trainer = trl.DPOTrainer(
        model=policy,
        args=config,
        train_dataset=Dataset.from_list([row for rows in per_step for row in rows]),
        processing_class=tokenizer,
        peft_config=models.lora_config(lora(spec)),
    )
    step_times: list[float] = []
    cpu_times: list[float] = []
    trainer.add_callback(step_time_callback(step_times, cpu_times, "trl-dpo"))
    trainer.train()
    data = trainer.train_dataset
    tokens = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    )
    return {
        "impl": "trl",
        "trl": trl.__version__,
        "stage": "dpo",
        "step_times": step_times,
        "cpu_times": cpu_times,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "tokens": tokens,
    }


def main() -> None:
    rows = lambda spec: spec["steps"] * spec["rankings_per_step"]  # noqa: E731
    worker_main(__doc__.splitlines()[0], run_ours, run_trl, rows)


if __name__ == "__main__":
    main()
