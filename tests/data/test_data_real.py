"""The HH-RLHF and OpenAssistant adapters on the real files in ../shared/data beside the repo."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from rlhf.data import load_comparisons, load_prompts
from rlhf.data.check import check_file
from rlhf.data.hh import parse_hh, parse_transcript
from rlhf.recipe import DataSource

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def real(name: str) -> str:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real data file {name} not found in {DATA} (../shared/data beside the repo)")
    return str(path)


def test_hh_pairs():
    result = load_comparisons(real("hh_harmless_pairs.jsonl.gz"))
    assert result.format == "hh"
    assert result.rows == 1800 and not result.skipped
    assert len(result.items) == 1800
    assert sum(r.num_pairs for r in result.items) == 1800
    for r in result.items:
        roles = [m["role"] for m in r.prompt]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # strictly alternating
        assert r.responses[0] != r.responses[1]
    # Four chosen replies are empty in the source (silence preferred to a harmful answer).
    assert sum(r.responses[0] == "" for r in result.items) == 4


def test_oasst_trees():
    path = real("oasst_en_trees.jsonl")
    result = load_comparisons(path)
    assert result.format == "oasst"
    assert result.rows == 80
    assert sum(r.num_pairs for r in result.items) == 581
    assert sum(len(r.responses) for r in result.items) == 500  # 513 ranked, 13 synthetic
    # 4 trees (machine-written prompts) have only synthetic replies, so they give no rankings.
    assert len({r.source for r in result.items}) == 76
    for r in result.items:
        assert r.prompt[0]["role"] == "user" and r.prompt[-1]["role"] == "user"
    keep_synthetic = load_comparisons(DataSource(path=path, drop_synthetic=False))
    assert sum(len(r.responses) for r in keep_synthetic.items) == 513
    assert sum(r.num_pairs for r in keep_synthetic.items) == 597
    assert len({r.source for r in keep_synthetic.items}) == 80


def test_oasst_prompt_lottery():
    result = load_prompts(real("oasst_prompts_en.jsonl"))
    assert len(result.items) == 263
    assert all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in result.items)


def test_check_file_on_real_data():
    stats = check_file(real("oasst_en_trees.jsonl"))
    assert stats["format"] == "oasst" and stats["pairs"] == 581
    assert sum(stats["responses_per_prompt"].values()) == stats["examples"]
    assert set(stats["prompt_chars"]) == {"p50", "p90", "p99", "max"}


def test_multi_turn_transcript():
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
        "\n\nAssistant: Why did the chicken cross the road?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
        "\n\nAssistant: No.",
    }
    [pair] = parse_hh(row, "hh.jsonl:1")
    assert pair.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert pair.responses == ["Why did the chicken cross the road?", "No."]
    assert pair.ranking == [0, 1] and pair.source == "hh.jsonl:1"


def test_transcript_joins_repeated_roles():
    turns = parse_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d")
    assert turns == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
        {"role": "user", "content": "d"},
    ]
    assert Counter(t["role"] for t in turns) == {"user": 2, "assistant": 1}
