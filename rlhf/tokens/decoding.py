"""How tokens are picked, written once for the stages and the tools: the decoding settings,
a complete GenerationConfig in which only those are active, the tokens that end a response,
and the command line's decoding flags.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.infra.errors import UserError


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
        for flag, value, ok, rule in (
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("--num-beams", self.num_beams, self.num_beams >= 1, ">= 1"),
            (
                "--temperature",
                self.temperature,
                self.temperature > 0,
                "> 0 (for greedy decoding leave sampling off)",
            ),
            ("--top-k", self.top_k, self.top_k >= 0, ">= 0"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
        ):
            if not ok:
                raise UserError(f"{flag} must be {rule}, got {value}")

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


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus whatever else the model folder says ends a turn."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def decoding_from_args(
    args: Any, sample_by_default: bool = False, temperature: float = 1.0
) -> Decoding:
    """The decoding flags of every command that generates, under one rule: asking for a
    temperature, top-k or top-p means sampling (silently ignoring them under greedy decoding,
    as transformers does, surprises everyone), so --greedy with any of them is refused.
    Without those flags a command samples at `temperature` when `sample_by_default` (or with
    --do-sample), else decodes greedily (with --num-beams: beam search)."""
    given = {
        flag: value
        for flag, value in (
            ("--temperature", args.temperature),
            ("--top-k", args.top_k),
            ("--top-p", args.top_p),
        )
        if value is not None
    }
    greedy = getattr(args, "greedy", False)
    if greedy and given:
        raise UserError(f"--greedy does not sample: drop {', '.join(given)}")
    sample = sample_by_default or getattr(args, "do_sample", False) or bool(given)
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample and not greedy,
        temperature=temperature if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        num_beams=getattr(args, "num_beams", 1),
    )
    decoding.validate()
    return decoding
