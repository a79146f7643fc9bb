"""Row validation: the checks every format shares, and the error-or-skip policy.

A parser raises `InvalidRow(reason, detail)` for a bad row. `RowPolicy` then either stops with
a one-line `UserError` naming the row ("data.jsonl:17: chosen is identical to rejected") or,
with on_invalid="skip", counts the row under its short `reason` so the stage can log
"skipped 3 rows: 2 empty response, 1 malformed JSON".
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rlhf.data.types import Message
from rlhf.infra.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
ON_INVALID = ("error", "skip")


class InvalidRow(Exception):
    """One row is unusable. `reason` groups skip counts; `detail` is the user-facing text."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


class RowPolicy:
    """Applies on_invalid to each bad row: raise at once ("error") or count it ("skip")."""

    def __init__(self, on_invalid: str = "error", keep_examples: int = 0):
        if on_invalid not in ON_INVALID:
            raise UserError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        self.on_invalid = on_invalid
        self.skipped: Counter[str] = Counter()
        # `rlhf data check` shows a few of the skipped rows' messages, not just counts.
        self.keep_examples = keep_examples
        self.examples: list[str] = []

    def invalid(self, where: str, err: InvalidRow) -> None:
        message = f"{where}: {err.detail}"
        if self.on_invalid == "error":
            raise UserError(message)
        self.skipped[err.reason] += 1
        if len(self.examples) < self.keep_examples:
            self.examples.append(message)


# ------------------------------------------------------------------------ field checks


def require(row: dict[str, Any], key: str, within: str = "") -> Any:
    """row[key], which must be present and not null; `within` names the row in the message."""
    if row.get(key) is None:
        name = f"{within}.{key}" if within else key
        raise InvalidRow("missing field", f"missing field '{name}'")
    return row[key]


def of_type(value: Any, kind: type, name: str, what: str) -> Any:
    """`value` if it is a `kind`, else the "wrong type" row error "{name} must be {what}"."""
    if not isinstance(value, kind):
        raise InvalidRow("wrong type", f"{name} must be {what}, got {_type(value)}")
    return value


def obj(row: Any) -> dict[str, Any]:
    return of_type(row, dict, "row", "a JSON object")


def text(value: Any, name: str) -> str:
    return of_type(value, str, name, "a string")


def response(value: Any, name: str) -> str:
    """A response string that must say something (whitespace alone is an empty response)."""
    value = text(value, name)
    if not value.strip():
        raise InvalidRow("empty response", f"{name} is empty")
    return value


def messages(value: Any, name: str) -> list[Message]:
    """A non-empty list of {"role", "content"} dicts, reduced to exactly those two keys."""
    if not of_type(value, list, name, "a list of messages"):
        reason = "empty prompt" if name == "prompt" else "empty messages"
        raise InvalidRow(reason, f"{name} is empty")
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        of_type(message, dict, where, "a message dict")
        role = text(require(message, "role", where), f"{where}.role")
        if role not in ROLES:
            raise InvalidRow(
                "wrong type", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        content = text(require(message, "content", where), f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def prompt(value: Any, name: str = "prompt") -> list[Message]:
    """A prompt given as a string or as messages -> messages, ending with a non-assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRow("empty prompt", f"{name} is empty")
        return [{"role": "user", "content": value}]
    out = messages(of_type(value, list, name, "a string or a list of messages"), name)
    if out[-1]["role"] == "assistant":
        # The policy would be asked to continue its own turn; the reply belongs in a response.
        raise InvalidRow("invalid prompt", f"{name} must not end with an assistant message")
    return out


def check_responses(responses: list[str]) -> None:
    """No two responses to one prompt may be the same text: the comparison would be void."""
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if r in seen:
            if len(responses) == 2:
                raise InvalidRow("chosen identical to rejected", "chosen is identical to rejected")
            raise InvalidRow("identical responses", f"responses {seen[r]} and {i} are identical")
        seen[r] = i


def check_ranking(ranking: Any, k: int) -> list[int]:
    """`ranking` must order all k responses exactly once: a permutation of range(k)."""
    if not isinstance(ranking, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ranking
    ):
        raise InvalidRow(
            "invalid ranking", f"ranking must be a list of response indices, got {ranking!r}"
        )
    seen: set[int] = set()
    for i in ranking:
        if not 0 <= i < k:
            raise InvalidRow(
                "invalid ranking", f"ranking index {i} is out of range for {k} responses"
            )
        if i in seen:
            raise InvalidRow("invalid ranking", f"ranking lists response {i} more than once")
        seen.add(i)
    if len(ranking) != k:
        missing = sorted(set(range(k)) - seen)
        raise InvalidRow(
            "invalid ranking",
            f"ranking has {len(ranking)} entries for {k} responses (missing {missing})",
        )
    return list(ranking)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
