"""Train/eval split by prompt, stable under adding rows.

Each distinct prompt lands in one split, decided by a hash of (seed, prompt): no prompt is in
both splits (an eval score on a trained prompt would flatter the model), a ranking's responses
stay together, and adding or removing rows never moves the other prompts, as a shuffle would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def prompt_text(item: Any) -> str:
    """The canonical text of an example's prompt (its messages as JSON)."""
    return json.dumps(item.prompt, ensure_ascii=False, sort_keys=True)


def _score(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)


def split_by_prompt(items: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): about `eval_fraction` of the distinct prompts go to eval.

    Items keep their order within each split. When eval_fraction > 0 and there are at least
    two prompts, each split gets at least one, so a small data set still has an eval set.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    texts = [prompt_text(item) for item in items]
    scores = {text: _score(seed, text) for text in texts}
    held_out = {text for text, score in scores.items() if score < eval_fraction}
    if eval_fraction > 0 and len(scores) >= 2:
        by_score = sorted(scores, key=scores.__getitem__)
        if not held_out:
            held_out = {by_score[0]}
        elif len(held_out) == len(scores):
            held_out.discard(by_score[-1])
    train = [item for item, text in zip(items, texts) if text not in held_out]
    evals = [item for item, text in zip(items, texts) if text in held_out]
    return train, evals
