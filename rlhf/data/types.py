"""The canonical in-memory examples every stage works with, whatever file format they came from.

A message is `{"role": str, "content": str}`. A prompt is always a list of messages (a string
prompt becomes one user message), so stages only ever apply a chat template to message lists.
Each example keeps `source` ("file:line") so that later checks can still name the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Message = dict[str, str]


@dataclass
class SFTExample:
    """A conversation to imitate; the last message is the assistant reply being taught."""

    messages: list[Message]
    source: str = ""

    @property
    def prompt(self) -> list[Message]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Ranking:
    """K >= 2 responses to one prompt, ordered by human preference.

    `ranking` holds indices into `responses`, best first. A pair (chosen, rejected) is a Ranking
    with K = 2 whose ranking is [0, 1].
    """

    prompt: list[Message]
    responses: list[str]
    ranking: list[int]
    source: str = ""

    def pairs(self) -> list[tuple[int, int]]:
        """Every (better_idx, worse_idx) the ranking implies: K(K-1)/2 of them."""
        order = self.ranking
        return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]

    @property
    def num_pairs(self) -> int:
        return len(self.pairs())

    def ranked_responses(self) -> list[str]:
        """The responses, best first."""
        return [self.responses[i] for i in self.ranking]


@dataclass
class Prompt:
    """A conversation for the policy to continue (PPO rollouts). `fields` holds the row's
    other keys (e.g. a reference `answer`), which reward functions receive."""

    messages: list[Message]
    source: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> list[Message]:
        # Same name as on the other types, so splits and checks treat all three alike.
        return self.messages


T = TypeVar("T")


@dataclass
class LoadResult(Generic[T]):
    """What a loader returns: the valid items and a count of skipped rows per reason."""

    items: list[T]
    path: str
    format: str = "auto"
    rows: int = 0  # rows read, valid or not
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def skipped_summary(self) -> str:
        """ "skipped 3 rows: 2 empty response, 1 malformed JSON" (empty string if none)."""
        if not self.skipped:
            return ""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"skipped {total} row{'s' if total != 1 else ''}: {reasons}"
