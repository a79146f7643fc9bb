"""Anthropic HH-RLHF: {"chosen": transcript, "rejected": transcript} -> a pair.

A transcript is "\\n\\nHuman: ...\\n\\nAssistant: ..." turns. The two transcripts share every
turn but the last assistant reply, so the shared turns become the prompt and the two final
assistant turns become chosen and rejected.

The real data has a few quirks this handles rather than rejects:
  * turns with a stray role marker inside them give two consecutive turns of one role; those
    are joined (blank line between) so chat templates that require alternation still work;
  * an empty final reply ("Assistant: " and nothing after) is a recorded human judgement
    (the rater preferred silence to a harmful answer), so it is kept, unlike the empty
    responses the plain formats reject as broken rows.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf.data import validate as v
from rlhf.data.types import Message, Ranking

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(transcript: str, name: str = "transcript") -> list[Message]:
    """ "\\n\\nHuman: hi\\n\\nAssistant: hello" -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = _TURN.split(transcript)
    # parts = [text before the first marker, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise v.InvalidRow("invalid transcript", f"{name} must start with '\\n\\nHuman: '")
    turns: list[Message] = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        role, content = _ROLE[marker], content.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}".strip()
        else:
            turns.append({"role": role, "content": content})
    return turns


def parse_hh(row: Any, where: str) -> list[Ranking]:
    row = v.obj(row)
    chosen_text = v.text(v.require(row, "chosen"), "chosen")
    rejected_text = v.text(v.require(row, "rejected"), "rejected")
    chosen = parse_transcript(chosen_text, "chosen")
    rejected = parse_transcript(rejected_text, "rejected")
    if chosen == rejected:
        raise v.InvalidRow("chosen identical to rejected", "chosen is identical to rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    chosen_tail, rejected_tail = chosen[shared:], rejected[shared:]
    if not (
        prompt
        and len(chosen_tail) == len(rejected_tail) == 1
        and chosen_tail[0]["role"] == rejected_tail[0]["role"] == "assistant"
    ):
        raise v.InvalidRow(
            "invalid transcript",
            "chosen and rejected must share every turn but the final Assistant reply",
        )
    return [
        Ranking(prompt, [chosen_tail[0]["content"], rejected_tail[0]["content"]], [0, 1], where)
    ]
