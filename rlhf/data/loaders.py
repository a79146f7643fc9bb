"""load_sft / load_comparisons / load_prompts: a DataSource -> validated canonical examples;
load_train_eval: a stage's train and eval examples.

Every loader reads rows (readers.py), picks the format (given, or detected from the first row
that parses), turns each row into examples (formats.py, hh.py, oasst.py) and applies the
on_invalid policy to bad rows. An empty file, or nothing left after skipping, is an error:
a stage that trained on zero examples would only fail later and less clearly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlhf.data import formats, hh, oasst
from rlhf.data.readers import BadLine, HubUnavailable, read_hub, read_rows
from rlhf.data.source import DATA_FORMATS, DATA_ROOT_ENV, DataSource, looks_like_local_path
from rlhf.data.split import split_by_prompt
from rlhf.data.types import LoadResult, Prompt, Ranking, SFTExample
from rlhf.data.validate import InvalidRow, RowPolicy
from rlhf.infra.errors import UserError

Parser = Callable[[Any, str], list]


def as_source(
    source: DataSource | str | Path, fmt: str = "auto", limit: int | None = None
) -> DataSource:
    """Accept a plain path (or hub id) wherever a DataSource is expected; `limit`: its first
    rows only (a command line's --limit)."""
    if isinstance(source, DataSource):
        return source
    path = str(source)
    if fmt not in DATA_FORMATS:
        raise UserError(f"unknown data format '{fmt}' (choose from {', '.join(DATA_FORMATS)})")
    if looks_like_local_path(path) and not Path(path).expanduser().exists():
        raise UserError(f"{path}: data file not found")
    try:
        return DataSource(path=path, format=fmt, limit=limit)
    except ValidationError as e:
        raise UserError(f"{path}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def load_sft(source: DataSource | str, on_invalid: str = "error") -> LoadResult[SFTExample]:
    return load(source, "sft", on_invalid)


def load_comparisons(source: DataSource | str, on_invalid: str = "error") -> LoadResult[Ranking]:
    return load(source, "comparisons", on_invalid)


def load_prompts(source: DataSource | str, on_invalid: str = "error") -> LoadResult[Prompt]:
    """Prompts from a prompts file, or the prompts of any SFT or comparison data."""
    return load(source, "prompts", on_invalid)


def load_train_eval(
    recipe: Any, stage: str, kind: str, keep: Callable[[list], list] = list
) -> tuple[list, list]:
    """(train, eval) examples of a stage's `train`, `eval` and `eval_fraction`: eval from its
    own source, else the prompts eval_fraction holds out of train (none at 0), so eval never
    shares a prompt with train. `keep` picks from the train source first (reward.subset)."""
    cfg = getattr(recipe, stage)
    if cfg.train is None:
        raise UserError(f"{recipe._source}: {stage}.train: missing required key")
    on_invalid = recipe.data.on_invalid
    train = keep(load(cfg.train, kind, on_invalid).items)
    if cfg.eval is not None:
        return train, load(cfg.eval, kind, on_invalid).items
    return split_by_prompt(train, cfg.eval_fraction, recipe.seed)


def load(
    source: DataSource | str, kind: str, on_invalid: str = "error", policy: RowPolicy | None = None
) -> LoadResult:
    """Load `kind` ("sft" | "comparisons" | "prompts") examples; `policy` lets callers keep
    the skipped rows' messages (rlhf data check)."""
    source = as_source(source)
    policy = policy or RowPolicy(on_invalid)
    path, rows = source_rows(source)

    # The format comes from the first row that parses (lines before it may be broken JSON).
    head: list[tuple[str, Any]] = []
    for where, row in rows:
        head.append((where, row))
        if not isinstance(row, BadLine):
            break
    rows = itertools.chain(head, rows)
    fmt, parse = source.format, None
    if head and not isinstance(head[-1][1], BadLine):
        where, first = head[-1]
        if fmt == "auto":
            fmt = _detect(first, where, kind)
        if fmt == "oasst" and isinstance(first, dict) and "message_id" in first:
            rows = oasst.assemble_trees(rows)  # the hub's flat messages: rebuild the trees
        parse = _parser(fmt, kind, source)

    items: list = []
    n_rows = 0
    for where, row in itertools.islice(rows, source.limit):
        n_rows += 1
        if isinstance(row, BadLine):
            policy.invalid(where, InvalidRow("malformed JSON", row.error))
            continue
        try:
            items.extend(parse(row, where))
        except InvalidRow as err:
            policy.invalid(where, err)

    result = LoadResult(items, path, fmt, n_rows, dict(policy.skipped))
    if n_rows == 0:
        raise UserError(f"{path}: no rows (the file or dataset is empty)")
    if not items:
        summary = result.skipped_summary()
        raise UserError(f"{path}: no valid examples" + (f" ({summary})" if summary else ""))
    return result


def source_rows(source: DataSource) -> tuple[str, Iterator[tuple[str, Any]]]:
    """(what is read, its rows): a local file; a hub dataset's local copy when it exists;
    else the hub itself. Without network or copy: one line on where to get the data."""
    if looks_like_local_path(source.path):
        return source.path, read_rows(source.path)
    if source.local and Path(source.local).expanduser().is_file():
        return source.local, read_rows(source.local)
    try:
        return source.path, read_hub(source.path, source.split, source.data_dir)
    except HubUnavailable as e:
        raise UserError(no_data_message(source, str(e))) from None


def no_data_message(source: DataSource, reason: str) -> str:
    """Where to get a hub dataset that could not be loaded, and how to point at a copy."""
    key = f"{source.key}: " if source.key else ""
    sub = f", data_dir {source.data_dir}" if source.data_dir else ""
    path_key = f"{source.key}.path" if source.key else "the source's path"
    copy = "no local copy"
    if source.local and Path(source.local).expanduser().is_absolute():
        copy = f"no local copy at {source.local}"
    elif source.local:
        copy = f"no local copy ({DATA_ROOT_ENV} and data.root unset)"
    point = f"{path_key}=<file>"
    if source.local:
        name = Path(source.local).name
        point = f"{DATA_ROOT_ENV}=<folder with {name}> (or data.root=<folder>), or {point}"
    return (
        f"{key}{source.path} ({source.split} split{sub}): {reason}, {copy}; get it from "
        f"https://huggingface.co/datasets/{source.path} (loads by itself with network "
        f"access) or point the recipe at a local copy: {point}"
    )


def _detect(row: Any, where: str, kind: str) -> str:
    fmt = formats.detect_format(row)
    if fmt is None:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise UserError(
            f"{where}: cannot tell the data format from this row ({keys}); "
            f"set the source's format ({', '.join(DATA_FORMATS[1:])})"
        )
    if kind == "sft" and fmt == "prompts" and isinstance(row, dict):
        # {"prompt": ...} alone is a prompts row; for SFT the completion is what is missing.
        return "prompt_completion"
    return fmt


def _parser(fmt: str, kind: str, source: DataSource) -> Parser:
    """The row parser for `fmt`, adapted to the examples `kind` asks for."""
    parsers: dict[str, Parser] = {
        "messages": formats.parse_messages,
        "prompt_completion": formats.parse_prompt_completion,
        "alpaca": formats.parse_alpaca,
        "pairs": formats.parse_pairs,
        "rankings": formats.parse_rankings,
        "hh": hh.parse_hh,
        "oasst": partial(oasst.parse_tree, drop_synthetic=source.drop_synthetic, lang=source.lang),
        "prompts": formats.parse_prompts,
    }
    have = formats.kind_of(fmt)
    if have == kind:
        return parsers[fmt]
    if kind == "prompts":
        if fmt == "messages":
            return formats.parse_prompts  # a conversation to continue, reply dropped if any
        # Any SFT or comparison data also holds prompts (e.g. PPO on the reward data's prompts).
        return lambda row, where: [Prompt(x.prompt, x.source) for x in parsers[fmt](row, where)]
    raise UserError(
        f"{source.path}: format '{fmt}' holds {have} data, but this stage needs {kind} data"
    )
