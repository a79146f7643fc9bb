"""Worker: one GRPO run, ours (ppo.estimator=grpo) or TRL's GRPOTrainer, on identical work.

The default recipe's GRPO shape on both sides: the prepared model as policy with LoRA r=16
(alpha 32) on all linear layers, bf16 where `precision: auto` picks it, the reference being
the adapter disabled; the same model with a 1-output sequence-classification head as reward
model; k answers to each of batch / k prompts of reward_data/prompts per iteration, taken in
file order; one pass, in optimizer steps of `mini_batch` completions; the same max new
tokens, temperature, KL coefficient (k3 in the loss on both sides), learning rate (constant)
and clip 1.0. TRL generates with transformers' `generate` (no vLLM). Times per iteration
include generation and scoring; the first `warmup` iterations are left out by the summary.
Peak RSS is measured by bench/run.py around the process.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import trl_cpu_args, worker_main
from bench.rloo_workers import run_ours as run_critic_free
from bench.rloo_workers import train_trl


def run_ours(spec: dict) -> dict:
    return run_critic_free({**spec, "estimator": "grpo"})


def run_trl(spec: dict, out_dir: Path) -> dict:
    import trl

    from rlhf.infra.runtime import resolve_precision

    steps_per_iteration = spec["batch"] // spec["mini_batch"]
    config = trl.GRPOConfig(
        **trl_cpu_args(spec["seed"], bf16=spec["lora"] and resolve_precision("auto") == "bf16"),
        output_dir=str(out_dir / "trl-grpo-out"),
        learning_rate=spec["lr"],
        beta=spec["beta"],
        max_steps=spec["steps"] * steps_per_iteration,
        # one generation of k answers to each of batch / k prompts, then one pass over them in
        # optimizer steps of mini_batch completions
        per_device_train_batch_size=spec["mini_batch"],
        steps_per_generation=steps_per_iteration,
        num_generations=spec["k"],
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        shuffle_dataset=False,  # prompts in file order, as ours takes them
        use_vllm=False,
    )
    step_times, lengths = train_trl(trl.GRPOTrainer, spec, config)
    return {
        "impl": "trl",
        "trl": trl.__version__,
        "stage": "grpo-lora" if spec["lora"] else "grpo",
        "step_times": per_iteration(step_times, steps_per_iteration),
        # TRL logs one mean completion length per generation, of `batch` completions
        "tokens": int(sum(lengths) * spec["batch"]),
    }


def per_iteration(step_times: list[float], steps: int) -> list[float]:
    """Optimizer-step times summed per iteration (TRL generates in the first of its steps)."""
    return [sum(step_times[i : i + steps]) for i in range(0, len(step_times), steps)]


def main() -> None:
    rows = lambda spec: spec["steps"] * spec["batch"]  # noqa: E731
    worker_main(__doc__.splitlines()[0], run_ours, run_trl, rows)


if __name__ == "__main__":
    main()
