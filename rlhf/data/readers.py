"""Reading rows from local files (.jsonl, .json, .parquet, each optionally .gz) and the hub.

`read_rows` yields (where, row) with `where` naming the row for error messages: "x.jsonl:17"
(a line), "x.json:row 3" / "x.parquet:row 3" (a list element or table row), or
"owner/name[train]:row 3" for a hub dataset. A line that is not JSON yields a `BadLine` in
place of the row, so the caller's error-or-skip policy decides; problems with the file as a
whole (unreadable gzip, not UTF-8, empty) are UserErrors at once.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from unittest import mock

from rlhf.infra.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


@dataclass
class BadLine:
    """A JSONL line that did not parse."""

    error: str


def file_type(path: str) -> str:
    """ ".jsonl" | ".json" | ".parquet" from the name, looking through a trailing ".gz"."""
    name = path.lower().removesuffix(".gz")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise UserError(
        f"{path}: unsupported data file type (use .jsonl, .json or .parquet, optionally .gz)"
    )


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Every row of a local data file, in order, with its location."""
    read = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}[file_type(path)]
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{path}: data file not found")
    yield from read(path, file)


def _open(file: Path) -> BinaryIO:
    return gzip.open(file, "rb") if file.name.lower().endswith(".gz") else open(file, "rb")


def numbered(where: str, rows: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """("where:row 1", row), ... for rows that have no line numbers."""
    return ((f"{where}:row {i}", row) for i, row in enumerate(rows, start=1))


def _jsonl(path: str, file: Path) -> Iterator[tuple[str, Any]]:
    lineno = 0
    try:
        # utf-8-sig: tolerate the byte-order mark some editors write.
        with io.TextIOWrapper(_open(file), encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):  # noqa: B007 (lineno used after the loop)
                if not line.strip():
                    continue  # blank lines (a trailing newline, spacing) are not rows
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", BadLine(f"malformed JSON ({e.msg}, column {e.colno})")
                    continue
                yield f"{path}:{lineno}", row
    except _GZIP_ERRORS as e:
        raise UserError(f"{path}:{lineno + 1}: unreadable gzip file ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}:{lineno + 1}: not UTF-8 text") from None


def _read_bytes(path: str, file: Path) -> bytes:
    try:
        with _open(file) as f:
            return f.read()
    except _GZIP_ERRORS as e:
        raise UserError(f"{path}: unreadable gzip file ({e})") from None


def _json(path: str, file: Path) -> Iterator[tuple[str, Any]]:
    raw = _read_bytes(path, file)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        # One document: a syntax error anywhere makes the whole file unusable.
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json data file must hold a list of rows")
    yield from numbered(path, data)


def _parquet(path: str, file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = _read_bytes(path, file)
    try:
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: unreadable parquet file ({str(e).splitlines()[0]})") from None
    yield from numbered(path, rows)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connect: without this, an offline
    datasets.load_dataset retries for about half a minute before it gives up."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _offline_mode(offline: bool) -> ExitStack:
    """Datasets and huggingface_hub read HF_HUB_OFFLINE once, at import: set their copies, so
    that an unreachable hub fails at once (a warm datasets cache still answers)."""
    import datasets.config
    from huggingface_hub import constants

    stack = ExitStack()
    for module in (datasets.config, constants) if offline else ():
        stack.enter_context(mock.patch.object(module, "HF_HUB_OFFLINE", True))
    return stack


class HubUnavailable(UserError):
    """A hub dataset could not be loaded; the message is one short line."""


def read_hub(path: str, split: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    """Rows of a Hugging Face hub dataset (needs network access or a warm datasets cache).

    The dataset is loaded before this returns, so an unreachable hub raises HubUnavailable here
    rather than at the first row."""
    import datasets

    offline = not hub_reachable()
    try:
        with _offline_mode(offline):
            dataset = datasets.load_dataset(path, data_dir=data_dir, split=split)
    except Exception as e:  # noqa: BLE001 (offline, unknown id, bad split: all one message)
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        reason = "hub unreachable (offline)" if offline else first
        raise HubUnavailable(reason) from None
    where = f"{path}[{split}]" if data_dir is None else f"{path}/{data_dir}[{split}]"
    return numbered(where, dataset)
