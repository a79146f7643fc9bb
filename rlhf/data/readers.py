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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

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
    kind = file_type(path)
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{path}: data file not found")
    if kind == ".jsonl":
        yield from _jsonl(path, file)
    elif kind == ".json":
        yield from _json(path, file)
    else:
        yield from _parquet(path, file)


def _open_text(file: Path) -> io.TextIOBase:
    # utf-8-sig: tolerate the byte-order mark some editors write.
    if file.name.lower().endswith(".gz"):
        return gzip.open(file, "rt", encoding="utf-8-sig")
    return open(file, encoding="utf-8-sig")


def _jsonl(path: str, file: Path) -> Iterator[tuple[str, Any]]:
    lineno = 0
    try:
        with _open_text(file) as f:
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
        if file.name.lower().endswith(".gz"):
            with gzip.open(file, "rb") as f:
                return f.read()
        return file.read_bytes()
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
    for i, row in enumerate(data, start=1):
        yield f"{path}:row {i}", row


def _parquet(path: str, file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = _read_bytes(path, file)
    try:
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: unreadable parquet file ({str(e).splitlines()[0]})") from None
    for i, row in enumerate(rows, start=1):
        yield f"{path}:row {i}", row


def read_hub(path: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a Hugging Face hub dataset (needs network access or a warm datasets cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 (offline, unknown id, bad split: all one message)
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: not a local file, and the Hugging Face hub dataset could not be loaded "
            f"(hub unreachable or offline?): {first}"
        ) from None
    for i, row in enumerate(dataset, start=1):
        yield f"{path}[{split}]:row {i}", row
