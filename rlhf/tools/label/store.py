"""The rankings file people write to, and the queue of prompts they work through.

The file is the toolkit's rankings format, one row per prompt: {"prompt", "responses",
"ranking"} plus "annotator", "time" (UTC, ISO 8601), "seconds" spent on the item and
"all_bad". The reward stage's loader reads it as it is (extra keys are ignored).

Each row is appended with ONE write of the whole line to a file opened O_APPEND, then
fsync'd, under an exclusive flock: a crash leaves whole rows only, and two servers or two
tabs never interleave. Under the same lock the rows others appended since are read first,
so a prompt already ranked is refused instead of written twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf.infra.errors import UserError
from rlhf.tools.label.samples import Item, prompt_key, prompt_value

# A prompt shown to one tab is not shown to another for this long (unless nothing else is left).
HOLD_SECONDS = 600.0


class RankingsFile:
    """Append-only rankings rows; `keys` are the prompts ranked so far (by anyone)."""

    def __init__(self, path: Path):
        self.path = path
        self.keys: set[str] = set()
        self.offset = 0  # bytes of the file read into `keys`
        self.lock = threading.Lock()
        if path.suffix != ".jsonl":
            raise UserError(f"--out {path}: must be a .jsonl file (rows are appended)")
        if path.is_dir():
            raise UserError(f"--out {path} is a folder; give a file name")
        if path.is_file() and path.stat().st_size:
            self._check_format()
        self.refresh()

    def refresh(self) -> None:
        with self.lock:
            self._read_new()

    def _check_format(self) -> None:
        from rlhf import data

        try:
            data.load_comparisons(data.as_source(str(self.path), "rankings"))
        except UserError as e:
            raise UserError(f"--out is not a rankings file: {e}") from None

    def _read_new(self) -> None:
        """Add the complete lines appended since the last read (by us or anyone else)."""
        from rlhf.data.formats import parse_rankings

        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].decode("utf-8").splitlines():
            if line.strip():
                self.keys.add(prompt_key(parse_rankings(json.loads(line), "")[0].prompt))
        self.offset += end

    def append(self, row: dict[str, Any], key: str) -> bool:
        """Write `row` unless its prompt is ranked already; False when it was."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._read_new()
                if key in self.keys:
                    return False
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a last row written without its newline by hand
                write_whole(fd, line, size)
                self.keys.add(key)
                return True
            finally:
                os.close(fd)  # releases the flock


def write_whole(fd: int, line: bytes, size: int) -> None:
    """One write of the line, then fsync; a short write (disk full) is cut back off."""
    written = os.write(fd, line)
    if written != len(line):
        os.ftruncate(fd, size)
        raise OSError(f"short write ({written} of {len(line)} bytes): disk full?")
    os.fsync(fd)


class Queue:
    """Which prompt each tab gets next; skips (this session) and holds (per tab) in memory."""

    def __init__(self, items: list[Item], rankings: RankingsFile, annotator: str):
        self.items = items
        self.keys = [prompt_key(it.prompt) for it in items]
        self.rankings = rankings
        self.annotator = annotator
        self.skipped: list[int] = []
        self.holds: dict[int, tuple[str, float]] = {}
        self.lock = threading.Lock()

    def _ranked(self, i: int) -> bool:
        return self.keys[i] in self.rankings.keys

    def progress(self) -> dict[str, int]:
        self.rankings.refresh()
        ranked = sum(self._ranked(i) for i in range(len(self.items)))
        skipped = sum(not self._ranked(i) for i in set(self.skipped))
        total = len(self.items)
        return {"ranked": ranked, "skipped": skipped, "left": total - ranked - skipped}

    def next(self, tab: str) -> int | None:
        """The first prompt nobody ranked, skipped or holds; else one another tab holds."""
        with self.lock:
            self.progress()  # reads rows appended by others
            self.holds = {i: h for i, h in self.holds.items() if h[0] != tab}
            now = time.monotonic()
            open_ = [
                i for i in range(len(self.items)) if not self._ranked(i) and i not in self.skipped
            ]
            free = [
                i for i in open_ if now - self.holds.get(i, ("", -HOLD_SECONDS))[1] >= HOLD_SECONDS
            ]
            pick = (free or open_ or [None])[0]
            if pick is not None:
                self.holds[pick] = (tab, now)
            return pick

    def rank(self, i: int, ranking: Any, all_bad: bool, seconds: float) -> bool:
        """Append the row for item i; False when that prompt was ranked already."""
        from rlhf.data import validate as v

        item = self.items[i]
        order = v.check_ranking(ranking, len(item.responses))
        row = {
            "prompt": prompt_value(item.prompt),
            "responses": item.responses,
            "ranking": order,
            "annotator": self.annotator,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(float(seconds), 1),
            "all_bad": bool(all_bad),
        }
        written = self.rankings.append(row, self.keys[i])
        with self.lock:
            self.holds.pop(i, None)
            if i in self.skipped:
                self.skipped.remove(i)
        return written

    def skip(self, i: int) -> None:
        with self.lock:
            self.holds.pop(i, None)
            if i not in self.skipped:
                self.skipped.append(i)

    def unskip(self, i: int) -> None:
        """Undo a skip: the item is open again (the tab asks for it by id)."""
        with self.lock:
            if i in self.skipped:
                self.skipped.remove(i)

    def revisit(self) -> None:
        """Open every skipped item again."""
        with self.lock:
            self.skipped.clear()
