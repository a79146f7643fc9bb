"""The answers people rank: k per prompt, sampled once from the policy and kept in a file.

The samples file (`<out stem>.samples.jsonl`, beside the rankings) holds one row per prompt:
{"prompt", "responses", "finished", "k", "model"}. A restart reads it instead of sampling
again; only prompts it does not hold yet are sampled (and the whole file is rewritten
atomically). Sampling is the PPO stage's own (rlhf.ppo.rollout.sample_rollout with the
recipe's ppo section: temperature, max_new_tokens, stop strings, lean or hf decoding).

A ranking needs distinct, non-empty answers (the reward data loader refuses a row with two
identical responses), so a prompt whose k answers repeat is sampled again for the missing
ones, a few rounds at most; a prompt left with fewer than 2 distinct answers is dropped.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.infra.errors import UserError

# Extra sampling rounds for prompts whose answers repeat or are empty.
RESAMPLE_ROUNDS = 4


@dataclass
class Item:
    """One prompt to rank: its messages and the sampled answers."""

    prompt: list[dict[str, str]]
    responses: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


def prompt_key(messages: list[dict[str, str]]) -> str:
    """The identity of a prompt, the same whether it was read as a string or as messages."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def prompt_value(messages: list[dict[str, str]]) -> Any:
    """How a prompt is written to the rankings file: a lone user turn as its text."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def samples_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".samples.jsonl")


def read_samples(path: Path, k: int, model: str) -> dict[str, Item]:
    """The items a samples file holds, by prompt key. Refuses one made with another k or model:
    its answers would not be the ones asked for."""
    from rlhf.data import validate as v

    items: dict[str, Item] = {}
    if not path.is_file():
        return items
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            messages = v.prompt(row["prompt"])
            if row["k"] != k or row["model"] != model:
                raise UserError(
                    f"{path}:{n}: sampled with --k {row['k']} from {row['model']}, not --k {k} "
                    f"from {model}: delete the file to sample again, or choose another --out"
                )
            items[prompt_key(messages)] = Item(messages, row["responses"], row["finished"])
        except (ValueError, KeyError, TypeError, v.InvalidRow) as e:
            raise UserError(f"{path}:{n}: not a samples row ({e}): delete the file") from None
    return items


def write_samples(path: Path, items: list[Item], k: int, model: str) -> None:
    """All rows at once, through a temporary file: a crash leaves the old file or the new one."""
    rows = [
        {"prompt": prompt_value(it.prompt), "responses": it.responses}
        | {"finished": it.finished, "k": k, "model": model}
        for it in items
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_answers(item: Item, texts: list[str], finished: list[bool], k: int) -> None:
    """Keep new answers that are non-empty and differ from those already kept, up to k."""
    for text, done in zip(texts, finished):
        if len(item.responses) < k and text.strip() and text not in item.responses:
            item.responses.append(text)
            item.finished.append(bool(done))


def sample_items(recipe: Any, model_dir: str, items: list[Item], k: int) -> None:
    """Fill each item with k distinct answers from the policy (fewer where it keeps repeating)."""
    import torch

    from rlhf.infra.runtime import frozen_weight_dtype, resolve_precision
    from rlhf.tools.generate import load, pick_device

    device = pick_device(None)
    policy, tokenizer = load(model_dir, device)
    dtype = frozen_weight_dtype(resolve_precision(recipe.precision))  # the autocast dtype
    torch.manual_seed(recipe.seed)
    rows_per_batch = max(k, recipe.eval.batch_size or recipe.ppo.batch_size)
    for _ in range(1 + RESAMPLE_ROUNDS):
        wanted = [it for it in items for _ in range(k - len(it.responses))]
        if not wanted:
            break
        for start in range(0, len(wanted), rows_per_batch):
            group = wanted[start : start + rows_per_batch]
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                texts, finished = sample_batch(policy, tokenizer, group, recipe.ppo, device)
            for it, text, done in zip(group, texts, finished):
                add_answers(it, [text], [done], k)
        print(f"label: sampled {len(wanted)} answers", file=sys.stderr)


def sample_batch(
    policy: Any, tokenizer: Any, group: list[Item], cfg: Any, device: Any
) -> tuple[list[str], list[bool]]:
    """One answer per row of `group`, with the PPO stage's sampler."""
    from rlhf.ppo.rollout import sample_rollout
    from rlhf.tokens.chat import encode_prompt, pad_batch

    batch = pad_batch(
        [encode_prompt(tokenizer, it.prompt, cfg.max_prompt_length) for it in group],
        tokenizer.pad_token_id,
        side="left",
    )
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    roll = sample_rollout(policy, ids, mask, cfg, tokenizer)
    return roll.texts, roll.ended_with_eos.tolist()


def rankable(items: list[Item]) -> list[Item]:
    """The items with at least 2 distinct answers; a line on stderr names how many are not."""
    kept = [it for it in items if len(it.responses) >= 2]
    if len(kept) < len(items):
        print(
            f"label: {len(items) - len(kept)} prompt(s) left out: fewer than 2 distinct "
            "non-empty answers",
            file=sys.stderr,
        )
    return kept
