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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.chat import encode_prompt, pad_batch
from rlhf.errors import UserError


@dataclass
class Decoding:
    """How to pick tokens. Greedy unless beams or sampling are asked for; both combine."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    num_beams: int = 1

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise UserError(f"--num-beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise UserError(
                f"--temperature must be > 0 (for greedy decoding leave sampling off), "
                f"got {self.temperature}"
            )
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generation_config(self, pad_id: int, eos_ids: list[int], **extra: Any) -> Any:
        """A complete GenerationConfig (`complete_generation_config`), so a model folder's own
        defaults (a saved temperature, top_k=50, a repetition penalty) never change what the
        flags asked for. `extra`: more GenerationConfig fields (stop strings, outputs)."""
        settings: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "pad_token_id": pad_id,
            "eos_token_id": eos_ids,
            **extra,
        }
        if self.do_sample:
            settings.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return complete_generation_config(**settings)


# Every logits processor's setting at the value that switches it off. transformers 5 fills each
# generate() setting left unset from the model folder's generation_config.json (Qwen2.5 ships
# a repetition penalty, top-k and top-p), so an unset setting is not an inactive one.
NEUTRAL_GENERATION = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "diversity_penalty": 0.0,
}


def complete_generation_config(**settings: Any) -> Any:
    """A GenerationConfig in which only `settings` are active: every other logits processor is
    switched off explicitly. Use it with `own_generation_config`, so that settings transformers
    has no neutral value for are not filled from the model folder either."""
    from transformers import GenerationConfig

    return GenerationConfig(**{**NEUTRAL_GENERATION, **settings})


@contextmanager
def own_generation_config(model: torch.nn.Module, config: Any) -> Iterator[None]:
    """While open, `config` is the model's default generation config: generate() fills unset
    settings from it instead of from the folder's generation_config.json."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "generation_config"):  # not a transformers model: nothing to fill from
        yield
        return
    saved = inner.generation_config
    inner.generation_config = config
    try:
        yield
    finally:
        inner.generation_config = saved


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    # Asking for a temperature, top-k or top-p means sampling: silently ignoring them under
    # greedy decoding (what transformers does) surprises everyone.
    sampling_flags = (args.temperature, args.top_k, args.top_p)
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample or any(f is not None for f in sampling_flags),
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        num_beams=args.num_beams,
    )
    decoding.validate()
    return decoding


def pick_device(name: str | None) -> torch.device:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device available")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(model_dir: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, left-padding tokenizer): generation appends on the right, so the
    prompts must end at the same column."""
    from rlhf import models

    tokenizer = models.load_tokenizer(model_dir, padding_side="left")
    model = models.load_causal_lm(model_dir).to(device).eval()
    return model, tokenizer


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus whatever else the model folder says ends a turn."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


@torch.no_grad()
def generate(
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
    tokens afterwards (`rlhf eval compare` computes log-probs on them).

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
        responses = out[:, batch["input_ids"].shape[1] :].tolist()
        for messages, ids in zip(group, responses):
            # Everything after the first EOS is padding (shorter rows of the batch).
            end = next((i for i, t in enumerate(ids) if t in stops), None)
            kept = ids if end is None else ids[: end + 1]
            row = {
                "prompt": last_user_text(messages),
                "response": tokenizer.decode(kept, skip_special_tokens=True),
                "tokens": len(kept),
                "finished": end is not None,
            }
            if with_ids:
                row["ids"] = kept
            rows.append(row)
    return rows


def last_user_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else messages[-1]["content"]


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
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no weight-loading bars in logs and pipes
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name")
    prompts = read_prompts(args)
    model, tokenizer = load(args.model_dir, pick_device(args.device))
    rows = generate(
        model,
        tokenizer,
        prompts,
        decoding,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"generate: {len(rows)} responses -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0
