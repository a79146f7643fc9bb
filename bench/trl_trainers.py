"""Worker: TRL's SFTTrainer or RewardTrainer on the spec's rows (the project's own TRL).

Run by bench/run.py in the main venv; the rows, batch size, length limit, learning rate and
schedule are the ones our stage gets (bench/trainers.py). TRL's SFTConfig ships bf16=True and
gradient_checkpointing=True; both are turned off here, since ours runs fp32 (this CPU has no
bf16) without checkpointing. Everything else is as shipped (its fused AdamW included).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.common import (
    log,
    read_json,
    step_time_callback,
    trl_cpu_args,
    worker_args,
    write_json,
)


def main() -> None:
    args = worker_args(__doc__.splitlines()[0])
    spec = read_json(args.spec)
    t_start = time.perf_counter()

    import torch
    import trl
    from transformers import AutoTokenizer

    torch.manual_seed(spec["seed"])
    path = spec["model"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    # SmolLM2's pad is its EOS <|im_end|>, which also closes every chat turn: TRL's reward
    # pooling (last token != pad) would then read the wrong token. Ours uses the same pad.
    tokenizer.pad_token = "<|endoftext|>"
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    common = {
        **trl_cpu_args(spec["seed"]),
        "output_dir": str(Path(args.out).parent / f"trl-{spec['stage']}-out"),
        "per_device_train_batch_size": spec["batch_size"],
        "learning_rate": spec["lr"],
        "num_train_epochs": 1,
        "max_length": spec["max_length"],
        "eval_strategy": "no",
    }
    build = sft_trainer if spec["stage"] == "sft" else reward_trainer
    trainer, config, lengths = build(path, tokenizer, rows, common)
    step_times: list[float] = []
    trainer.add_callback(step_time_callback(step_times))
    load_s = time.perf_counter() - t_start
    log(f"trl-{spec['stage']}: loaded in {load_s:.1f}s, {len(lengths)} rows")
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    write_json(
        args.out,
        {
            "impl": "trl",
            "trl": trl.__version__,
            "stage": spec["stage"],
            "step_times": step_times,
            "tokens": sum(lengths),
            "rows": len(lengths),
            "losses": losses,
            "optimizer": type(
                trainer.optimizer.optimizer
                if hasattr(trainer.optimizer, "optimizer")
                else trainer.optimizer
            ).__name__,
            "optim": str(config.optim),
            "load_s": load_s,
        },
    )


def sft_trainer(path: str, tokenizer: Any, rows: list[dict], common: dict) -> tuple:
    """(TRL's SFTTrainer, its config, tokens per row) on conversational prompt/completion rows:
    the loss falls on the answer tokens, as in ours."""
    import trl
    from datasets import Dataset

    data = Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    )
    config = trl.SFTConfig(**common, packing=False, completion_only_loss=True)
    trainer = trl.SFTTrainer(
        model=path, args=config, train_dataset=data, processing_class=tokenizer
    )
    return trainer, config, [len(x) for x in trainer.train_dataset["input_ids"]]


def reward_trainer(path: str, tokenizer: Any, rows: list[dict], common: dict) -> tuple:
    """(TRL's RewardTrainer, its config, tokens per pair) on conversational preference pairs."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = trl.RewardConfig(**common)
    trainer = trl.RewardTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer
    )
    tokenized = trainer.train_dataset
    lengths = [len(x) + len(y) for x, y in zip(tokenized["chosen_ids"], tokenized["rejected_ids"])]
    return trainer, config, lengths


if __name__ == "__main__":
    main()
