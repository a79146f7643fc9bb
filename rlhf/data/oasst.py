"""OpenAssistant message trees -> one Ranking per parent with >= 2 ranked assistant replies.

A tree row is {"prompt": message}; a message has "text", "role" ("prompter" | "assistant")
and "replies" (messages, recursively); "rank" 0 is the best sibling reply. The prompt of a
Ranking is the conversation from the root down to the parent.

Deleted messages, and with drop_synthetic machine-written ones, are skipped with their whole
subtree. With `lang`, only trees whose prompt is in that language are kept. The hub's oasst1
is flat (one message per row, with parent_id): `assemble_trees` rebuilds the trees first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from rlhf.data import validate as v
from rlhf.data.types import Message, Ranking

_ROLE = {"prompter": "user", "assistant": "assistant"}


def parse_tree(
    row: Any, where: str, drop_synthetic: bool = True, lang: str | None = None
) -> list[Ranking]:
    root = v.of_type(v.require(v.obj(row), "prompt"), dict, "prompt", "a message tree")
    if root.get("deleted") or (lang is not None and root.get("lang", lang) != lang):
        return []
    out: list[Ranking] = []
    _walk(root, [], where, drop_synthetic, out)
    return out


def _message(node: dict[str, Any]) -> Message:
    role = node.get("role")
    if role not in _ROLE:
        raise v.InvalidRow(
            "wrong type", f"message role must be prompter or assistant, got {role!r}"
        )
    return {"role": _ROLE[role], "content": v.text(v.require(node, "text"), "message text")}


def _walk(
    node: dict[str, Any],
    path: list[Message],
    where: str,
    drop_synthetic: bool,
    out: list[Ranking],
) -> None:
    conversation = [*path, _message(node)]
    replies = v.of_type(node.get("replies") or [], list, "replies", "a list")
    kept = [
        r
        for r in replies
        if isinstance(r, dict)
        and not r.get("deleted")
        and not (drop_synthetic and r.get("synthetic"))
    ]
    ranked = [r for r in kept if r.get("role") == "assistant" and r.get("rank") is not None]
    if len(ranked) >= 2 and conversation[-1]["role"] != "assistant":
        responses = [v.response(r.get("text"), "ranked reply") for r in ranked]
        # Best first; `sorted` is stable, so tied ranks keep the file's order.
        ranking = sorted(range(len(ranked)), key=lambda i: ranked[i]["rank"])
        v.check_responses(responses)
        out.append(Ranking(conversation, responses, ranking, where))
    for reply in kept:
        _walk(reply, conversation, where, drop_synthetic, out)


def assemble_trees(rows: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Flat messages (message_id, parent_id, ...) -> ("where" of the root, {"prompt": tree}).

    Trees come out after all rows are read, since a reply may precede its parent.
    """
    nodes: dict[str, dict[str, Any]] = {}
    roots: list[tuple[str, dict[str, Any]]] = []
    children: dict[str, list[dict[str, Any]]] = {}
    for where, row in rows:
        if not isinstance(row, dict) or "message_id" not in row:
            yield where, row  # broken lines pass through to the caller's error-or-skip policy
            continue
        node = {**row, "replies": []}
        nodes[row["message_id"]] = node
        if row.get("parent_id") is None:
            roots.append((where, node))
        else:
            children.setdefault(row["parent_id"], []).append(node)
    for parent_id, kids in children.items():
        if parent_id in nodes:  # orphans (parent outside this split or limit) are dropped
            nodes[parent_id]["replies"].extend(kids)
    for where, root in roots:
        yield where, {"prompt": root}
