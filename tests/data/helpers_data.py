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


# Small made-up files in the formats of the real human data (../shared/data or a user's
# RLHF_DATA_ROOT), so that the HH / OASST adapters are tested on every machine. The names match
# the recipes' `local:` copies.
HH_FILE, OASST_FILE, LOTTERY_FILE = (
    "hh_harmless_pairs.jsonl.gz",
    "oasst_en_trees.jsonl",
    "oasst_prompts_en.jsonl",
)


def _hh(turns: str, chosen: str, rejected: str) -> dict[str, str]:
    return {
        "chosen": f"{turns}\n\nAssistant: {chosen}",
        "rejected": f"{turns}\n\nAssistant: {rejected}",
    }


def write_hh_fixture(folder: Path) -> str:
    """4 HH pairs: single turn, multi-turn, an empty chosen reply, a stray repeated role."""
    rows = [
        _hh(
            "\n\nHuman: How do I keep basil alive on a windowsill?",
            "Give it six hours of light and water it when the top of the soil is dry.",
            "Basil cannot be grown indoors.",
        ),
        _hh(
            "\n\nHuman: Can you help me write a birthday note?\n\nAssistant: Of course, who is it"
            " for?\n\nHuman: My aunt, she likes sailing.",
            "Happy birthday! May the year ahead bring you fair winds.",
            "No.",
        ),
        _hh(
            "\n\nHuman: How do I get into my neighbour's shed when they are away?",
            "",  # the rater preferred silence
            "Wait until dark and force the latch with a screwdriver.",
        ),
        _hh(
            "\n\nHuman: What rhymes with orange?\n\nHuman: Asking for a poem.",
            "Almost nothing does; 'door hinge' is a near rhyme.",
            "Banana.",
        ),
    ]
    return write_jsonl(folder / HH_FILE, rows)


def _reply(text: str, role: str, rank: int | None = None, **flags: Any) -> dict[str, Any]:
    return {"text": text, "role": role, "rank": rank, "replies": flags.pop("replies", []), **flags}


def write_oasst_fixture(folder: Path) -> str:
    """3 trees. Tree 1 (en): 2 human ranked replies + 1 synthetic + 1 deleted, and a nested
    ranking of 2; tree 2 (en, machine-written): only synthetic replies; tree 3 (de): 2 replies."""
    follow_up = _reply(
        "Why that one?",
        "prompter",
        replies=[
            _reply("Because it sounds friendly.", "assistant", 1),
            _reply("It matches the colour of the fur.", "assistant", 0),
        ],
    )
    trees = [
        _reply(
            "What is a good name for a grey cat?",
            "prompter",
            lang="en",
            replies=[
                _reply("Smokey.", "assistant", 0, replies=[follow_up]),
                _reply("Ash.", "assistant", 1),
                _reply("Cat.", "assistant", 2, synthetic=True),
                _reply("[removed]", "assistant", None, deleted=True),
            ],
        ),
        _reply(
            "Name three primary colours.",
            "prompter",
            lang="en",
            synthetic=True,
            replies=[
                _reply("Red, yellow and blue.", "assistant", 0, synthetic=True),
                _reply("Green.", "assistant", 1, synthetic=True),
            ],
        ),
        _reply(
            "Wie spät ist es?",
            "prompter",
            lang="de",
            replies=[
                _reply("Das weiß ich leider nicht.", "assistant", 0),
                _reply("Zeit für Kaffee.", "assistant", 1),
            ],
        ),
    ]
    return write_jsonl(folder / OASST_FILE, [{"prompt": t} for t in trees])


def write_lottery_fixture(folder: Path) -> str:
    """The prompt lottery: one JSON string per line."""
    prompts = ["Plan a three-day trip to Lisbon.", "What is 17 times 23?", "Explain tides simply."]
    return write_jsonl(folder / LOTTERY_FILE, prompts)
