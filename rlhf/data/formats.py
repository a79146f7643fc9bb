"""The plain row formats: one JSON object per example -> canonical examples.

SFT:          {"messages": [...]} | {"prompt": str|messages, "completion": str}
              | Alpaca {"instruction", "input"?, "output"}
comparisons:  pairs {"prompt"?, "chosen", "rejected"} | rankings {"prompt", "responses", "ranking"}
prompts:      {"prompt": str|messages} | a bare JSON string

The public-dataset adapters (HH-RLHF transcripts, OpenAssistant trees) live in hh.py and
oasst.py. Each parser takes (row, where) and returns a list of examples, or raises InvalidRow.
"""

from __future__ import annotations

from typing import Any

from rlhf.data import validate as v
from rlhf.data.types import Message, Prompt, Ranking, SFTExample

SFT_FORMATS = ("messages", "prompt_completion", "alpaca")
COMPARISON_FORMATS = ("pairs", "rankings", "hh", "oasst")


def kind_of(fmt: str) -> str:
    """Which stage's data a format holds: "sft", "comparisons" or "prompts"."""
    if fmt in SFT_FORMATS:
        return "sft"
    if fmt in COMPARISON_FORMATS:
        return "comparisons"
    return "prompts"


def detect_format(row: Any) -> str | None:
    """Guess the format from one row's keys; None when nothing fits."""
    if isinstance(row, str):
        return "prompts"
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if isinstance(row.get("prompt"), dict) and "replies" in row["prompt"]:
        return "oasst"  # a whole OpenAssistant message tree per row
    if {"message_id", "parent_id", "role", "text"} <= row.keys():
        return "oasst"  # the hub's flat OpenAssistant messages (oasst1), one per row
    if "chosen" in row and "rejected" in row:
        chosen = row["chosen"]
        if "prompt" not in row and isinstance(chosen, str) and "\n\nHuman:" in chosen:
            return "hh"
        return "pairs"
    if "responses" in row and "ranking" in row:
        return "rankings"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "prompt" in row:
        return "prompts"
    return None


# ------------------------------------------------------------------------------------- SFT


def parse_messages(row: Any, where: str) -> list[SFTExample]:
    conversation = v.messages(v.require(v.obj(row), "messages"), "messages")
    return [_sft(conversation, where)]


def parse_prompt_completion(row: Any, where: str) -> list[SFTExample]:
    row = v.obj(row)
    prompt = v.prompt(v.require(row, "prompt"))
    completion = v.response(v.require(row, "completion"), "completion")
    return [_sft([*prompt, {"role": "assistant", "content": completion}], where)]


def parse_alpaca(row: Any, where: str) -> list[SFTExample]:
    row = v.obj(row)
    instruction = v.text(v.require(row, "instruction"), "instruction")
    extra = row.get("input") or ""  # optional; null and "" both mean "no input"
    extra = v.text(extra, "input")
    output = v.response(v.require(row, "output"), "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if not user.strip():
        raise v.InvalidRow("empty prompt", "instruction is empty")
    return [
        _sft([{"role": "user", "content": user}, {"role": "assistant", "content": output}], where)
    ]


def _sft(conversation: list[Message], where: str) -> SFTExample:
    last = conversation[-1]
    if last["role"] != "assistant":
        raise v.InvalidRow(
            "last message not assistant",
            f"the last message must be the assistant's reply, got role '{last['role']}'",
        )
    if not last["content"].strip():
        raise v.InvalidRow("empty response", "the assistant's reply is empty")
    return SFTExample(conversation, where)


# ----------------------------------------------------------------------------- comparisons


def parse_pairs(row: Any, where: str) -> list[Ranking]:
    row = v.obj(row)
    chosen, rejected = v.require(row, "chosen"), v.require(row, "rejected")
    prompt = v.prompt(row["prompt"]) if row.get("prompt") is not None else None
    if isinstance(chosen, list) or isinstance(rejected, list):
        # Conversational pairs: each side is messages ending with the assistant's reply; the
        # turns before it are the prompt (when no explicit prompt is given).
        chosen_prompt, chosen = _split_reply(chosen, "chosen")
        rejected_prompt, rejected = _split_reply(rejected, "rejected")
        if chosen_prompt != rejected_prompt:
            raise v.InvalidRow(
                "invalid prompt", "chosen and rejected continue different conversations"
            )
        if prompt is not None and chosen_prompt and chosen_prompt != prompt:
            raise v.InvalidRow("invalid prompt", "chosen does not continue the given prompt")
        if prompt is None and chosen_prompt:
            prompt = v.prompt(chosen_prompt)
    else:
        chosen, rejected = v.response(chosen, "chosen"), v.response(rejected, "rejected")
    if prompt is None:
        raise v.InvalidRow("missing field", "missing field 'prompt'")
    v.check_responses([chosen, rejected])
    return [Ranking(prompt, [chosen, rejected], [0, 1], where)]


def _split_reply(value: Any, name: str) -> tuple[list[Message], str]:
    conversation = v.messages(value, name)
    if conversation[-1]["role"] != "assistant":
        raise v.InvalidRow("invalid messages", f"{name} must end with an assistant message")
    return conversation[:-1], v.response(conversation[-1]["content"], name)


def parse_rankings(row: Any, where: str) -> list[Ranking]:
    row = v.obj(row)
    prompt = v.prompt(v.require(row, "prompt"))
    responses = v.of_type(v.require(row, "responses"), list, "responses", "a list")
    if len(responses) < 2:
        raise v.InvalidRow(
            "fewer than 2 responses", f"a ranking needs at least 2 responses, got {len(responses)}"
        )
    responses = [v.response(r, f"response {i}") for i, r in enumerate(responses)]
    ranking = v.check_ranking(v.require(row, "ranking"), len(responses))
    v.check_responses(responses)
    return [Ranking(prompt, responses, ranking, where)]


# --------------------------------------------------------------------------------- prompts


def parse_prompts(row: Any, where: str) -> list[Prompt]:
    if isinstance(row, str):
        return [Prompt(v.prompt(row), where)]
    row = v.obj(row)
    if "prompt" not in row and "messages" in row:
        # A conversation to continue; a trailing assistant reply (an SFT row) is dropped.
        conversation = v.messages(row["messages"], "messages")
        if conversation[-1]["role"] == "assistant":
            conversation = conversation[:-1]
        return [Prompt(v.prompt(conversation, "messages"), where, _extra_fields(row))]
    return [Prompt(v.prompt(v.require(row, "prompt")), where, _extra_fields(row))]


def _extra_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The row's keys besides the prompt itself, for reward functions (e.g. `answer`)."""
    return {k: value for k, value in row.items() if k not in ("prompt", "messages")}
