"""`rlhf generate`: answer prompts with a model folder, one JSON object per line.

  rlhf generate runs/x/ppo/model --prompt "Tell me a joke"                  greedy
  rlhf generate MODEL --prompts prompts.jsonl --num-beams 4                 beam search
  rlhf generate MODEL --prompt "..." --temperature 0.7 --top-p 0.9 --seed 1 sampling

Output rows: {"prompt", "response", "tokens", "finished"}: `tokens` counts the generated
tokens (the closing EOS included), `finished` says whether the model stopped by itself
rather than at --max-new-tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from rlhf.infra.errors import UserError
from rlhf.tokens.chat import encode_prompt, last_user_text, pad_batch
from rlhf.tokens.decoding import Decoding, decoding_from_args, eos_ids, own_generation_config
from rlhf.tokens.sequences import response_mask


def pick_device(name: str | None) -> torch.device:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device available")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet_loading_in_pipes() -> None:
    """No weight-loading progress bars in logs and pipes (a terminal keeps them)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def write_jsonl(path: str, rows: list[dict[str, Any]], what: str) -> None:
    """--output: the rows as JSON lines (creating the folder); `what` they are, on stderr."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(jsonl(rows), encoding="utf-8")
    print(f"{what} -> {path}", file=sys.stderr)


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def load(model_dir: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, left-padding tokenizer): generation appends on the right, so the
    prompts must end at the same column."""
    from rlhf.roles import models

    tokenizer = models.load_tokenizer(model_dir, padding_side="left")
    model = models.load_causal_lm(model_dir).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    decoding: Decoding,
    batch_size: int = 8,
    max_prompt_length: int = 1024,
    seed: int = 0,
    progress: bool = False,
    with_ids: bool = False,
) -> list[dict[str, Any]]:
    """Chat-templated prompts -> [{"prompt", "response", "tokens", "finished"}], in order.
    `with_ids` adds "ids": the generated token ids (EOS included), for scoring those exact
    tokens afterwards (`rlhf viz kl`).

    Greedy and beam search are deterministic. Sampling draws from torch's global generator,
    seeded once here, so the same seed, prompts and batch size give the same text.
    """
    from tqdm.auto import tqdm

    decoding.validate()
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    stops = eos_ids(model, tokenizer)
    config = decoding.generation_config(tokenizer.pad_token_id, stops)
    torch.manual_seed(seed)
    rows: list[dict[str, Any]] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        group = prompts[start : start + batch_size]
        batch = pad_batch(
            [encode_prompt(tokenizer, p, max_prompt_length) for p in group],
            tokenizer.pad_token_id,
            side="left",
        )
        with own_generation_config(model, config):
            out = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                generation_config=config,
            )
        responses = out[:, batch["input_ids"].shape[1] :]
        # Everything after the first EOS is padding (shorter rows of the batch).
        masks, ended = response_mask(responses, stops)
        for messages, ids, n, finished in zip(
            group, responses.tolist(), masks.sum(1).long().tolist(), ended.tolist()
        ):
            kept = ids[:n]
            row = {
                "prompt": last_user_text(messages),
                "response": tokenizer.decode(kept, skip_special_tokens=True),
                "tokens": len(kept),
                "finished": finished,
            }
            rows.append(row | {"ids": kept} if with_ids else row)
    return rows


def read_prompts(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    if args.prompt is not None:
        return [[{"role": "user", "content": args.prompt}]]
    from rlhf import data

    items = data.load_prompts(args.prompts).items
    if not items:
        raise UserError(f"{args.prompts}: no prompts")
    return [p.messages for p in items]


def main(args: argparse.Namespace) -> int:
    decoding = decoding_from_args(args)
    quiet_loading_in_pipes()
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name")
    prompts = read_prompts(args)
    model, tokenizer = load(args.model_dir, pick_device(args.device))
    rows = generate_responses(
        model,
        tokenizer,
        prompts,
        decoding,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    if args.output:
        write_jsonl(args.output, rows, f"generate: {len(rows)} responses")
    else:
        sys.stdout.write(jsonl(rows))
    return 0
