"""Token-length checks: a prompt longer than the limit leaves no room for a response."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from rlhf.data.split import prompt_text
from rlhf.data.validate import InvalidRow, RowPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)


def prompt_tokens(tokenizer: Any, prompt: list[dict]) -> int:
    """Length of the prompt as the model sees it: chat template plus the assistant header."""
    out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return len(out)


def check_lengths(
    items: Sequence[T], tokenizer: Any, max_length: int, on_invalid: str = "error"
) -> tuple[list[T], dict[str, int]]:
    """(items whose prompt fits in max_length tokens, skipped counts by reason).

    With on_invalid="error" the first over-long prompt raises a UserError naming its row.
    """
    policy = RowPolicy(on_invalid)
    cache: dict[str, int] = {}  # a ranking's K responses, or repeated prompts, render once
    kept = []
    for item in items:
        key = prompt_text(item)
        if key not in cache:
            cache[key] = prompt_tokens(tokenizer, item.prompt)
        n = cache[key]
        if n > max_length:
            detail = f"prompt is {n} tokens, longer than max_length {max_length}"
            policy.invalid(item.source, InvalidRow("prompt too long", detail))
            continue
        kept.append(item)
    return kept, dict(policy.skipped)


def fit_prompts(items: list[T], tokenizer: Any, max_length: int, policy: Any) -> list[T]:
    """A stage's length check under the recipe's `data` policy: over-long prompts are invalid
    rows (error with file:line, or skipped and logged), unless the recipe truncates them."""
    if policy.truncate_long_prompts or not items:
        return items
    kept, skipped = check_lengths(items, tokenizer, max_length, policy.on_invalid)
    if skipped:
        log.warning(
            "skipped %d prompts longer than max_length %d", sum(skipped.values()), max_length
        )
    return kept
