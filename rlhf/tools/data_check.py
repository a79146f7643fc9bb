"""`rlhf data check FILE`: validate a data file and describe it.

Checking reads the whole file in skip mode, so one run reports every kind of problem (with a
few example rows) instead of stopping at the first, and then gives the statistics a user needs
to pick settings: rows, implied pairs, responses per prompt, and length percentiles (tokens
with a tokenizer, characters without).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from rlhf.data import formats
from rlhf.data.lengths import prompt_tokens
from rlhf.data.loaders import as_source, load, source_rows
from rlhf.data.readers import BadLine
from rlhf.data.types import Ranking
from rlhf.data.validate import RowPolicy
from rlhf.infra.errors import UserError

EXAMPLES_SHOWN = 5


def check_file(
    path: str, fmt: str = "auto", tokenizer: str | None = None, recipe: str | None = None
) -> dict[str, Any]:
    """Statistics of a data file; raises UserError when it holds no valid examples."""
    source = as_source(path, fmt)
    kind = _kind(source)
    policy = RowPolicy("skip", keep_examples=EXAMPLES_SHOWN)
    try:
        result = load(source, kind, policy=policy)
    except UserError as e:
        if not policy.examples:
            raise
        # Nothing valid at all: name the first bad row (file:line), not just the counts.
        n = sum(policy.skipped.values())
        raise UserError(f"{policy.examples[0]} ({n} invalid row(s), no valid example)") from e
    items = result.items

    stats: dict[str, Any] = {"path": result.path, "format": result.format, "kind": kind}
    stats["rows"] = result.rows
    stats["examples"] = len(items)
    if result.skipped:
        stats["skipped"] = result.skipped
        stats["skipped_examples"] = policy.examples
    if kind == "comparisons":
        stats["pairs"] = sum(r.num_pairs for r in items)
        stats["responses_per_prompt"] = dict(
            sorted(Counter(len(r.responses) for r in items).items())
        )

    loaded_recipe = None
    if recipe is not None:
        from rlhf.recipe import load_recipe

        loaded_recipe = load_recipe(recipe)
    tok = _tokenizer(tokenizer, loaded_recipe)

    prompts = [_prompt_length(item.prompt, tok) for item in items]
    responses = [_response_length(r, tok) for item in items for r in _responses(item)]
    unit = "tokens" if tok is not None else "chars"
    stats[f"prompt_{unit}"] = percentiles(prompts)
    if responses:
        stats[f"response_{unit}"] = percentiles(responses)
    if loaded_recipe is not None and tok is not None:
        section = {"sft": loaded_recipe.sft, "comparisons": loaded_recipe.reward}
        limit = section[kind].max_length if kind in section else loaded_recipe.ppo.max_prompt_length
        stats["max_length"] = limit
        stats["prompts_over_max_length"] = sum(n > limit for n in prompts)
    return stats


def _tokenizer(name: str | None, recipe: Any) -> Any:
    """--tokenizer, else the recipe model's; None (count characters) without either."""
    if name is None and recipe is None:
        return None
    from rlhf.roles import models

    return models.load_tokenizer(name) if name else models.load_recipe_tokenizer(recipe.model)


def _kind(source: Any) -> str:
    """The kind of data in the file: from the format, or detected from the first good row."""
    if source.format != "auto":
        return formats.kind_of(source.format)
    _, rows = source_rows(source)
    for _, row in rows:
        if not isinstance(row, BadLine):
            fmt = formats.detect_format(row)
            return formats.kind_of(fmt) if fmt else "prompts"  # load() reports the bad row
    return "prompts"  # empty or all broken: load() says so


def _responses(item: Any) -> list[str]:
    if isinstance(item, Ranking):
        return item.responses
    if hasattr(item, "response"):
        return [item.response]
    return []


def _prompt_length(prompt: list[dict], tok: Any) -> int:
    if tok is None:
        return sum(len(m["content"]) for m in prompt)
    return prompt_tokens(tok, prompt)


def _response_length(response: str, tok: Any) -> int:
    if tok is None:
        return len(response)
    return len(tok(response, add_special_tokens=False)["input_ids"])


def percentiles(values: list[int]) -> dict[str, int]:
    """p50/p90/p99/max by the nearest-rank method (values are counts, so keep them whole)."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: int) -> int:
        return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}
