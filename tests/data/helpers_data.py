"""Writers for small data files in tmp_path (imported by the data tests)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, rows: list[Any], raw: bool = False) -> str:
    """One row per line; with raw=True rows are written as given (for malformed lines)."""
    text = "".join(
        (row if raw and isinstance(row, str) else json.dumps(row)) + "\n" for row in rows
    )
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)
