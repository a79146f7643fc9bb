"""The HH-RLHF and OpenAssistant adapters: on small made-up files in the same formats (always),
and on the real files when they are present (../shared/data beside the repo in CI, or
$RLHF_DATA_ROOT); without them those tests skip, naming the missing file."""

from __future__ import annotations

from collections import Counter

from helpers_data import write_hh_fixture, write_lottery_fixture, write_oasst_fixture

from rlhf.data import load_comparisons, load_prompts
from rlhf.data.hh import parse_hh, parse_transcript
from rlhf.recipe import DataSource
from rlhf.tools.data_check import check_file
from tests.conftest import real_data_file


def real(name: str) -> str:
    return str(real_data_file(name))


def test_hh_pairs_on_fixture(tmp_path):
    result = load_comparisons(write_hh_fixture(tmp_path))
    assert result.format == "hh"  # detected from the first row
    assert result.rows == 4 and not result.skipped
    assert [r.num_pairs for r in result.items] == [1, 1, 1, 1]
    for r in result.items:
        roles = [m["role"] for m in r.prompt]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # strictly alternating
    assert [len(r.prompt) for r in result.items] == [1, 3, 1, 1]
    assert result.items[2].responses == [
        "",
        "Wait until dark and force the latch with a screwdriver.",
    ]
    assert result.items[3].prompt[0]["content"] == "What rhymes with orange?\n\nAsking for a poem."
    assert result.items[1].source.endswith("hh_harmless_pairs.jsonl.gz:2")


def test_oasst_trees_on_fixture(tmp_path):
    path = write_oasst_fixture(tmp_path)
    result = load_comparisons(path)
    assert result.format == "oasst" and result.rows == 3
    # tree 1: root (Smokey, Ash; the synthetic and the deleted reply dropped) and the nested
    # follow-up; tree 2: synthetic replies only, nothing; tree 3: one ranking.
    assert [r.ranked_responses() for r in result.items] == [
        ["Smokey.", "Ash."],
        ["It matches the colour of the fur.", "Because it sounds friendly."],
        ["Das weiß ich leider nicht.", "Zeit für Kaffee."],
    ]
    assert result.items[1].prompt == [
        {"role": "user", "content": "What is a good name for a grey cat?"},
        {"role": "assistant", "content": "Smokey."},
        {"role": "user", "content": "Why that one?"},
    ]
    assert sum(r.num_pairs for r in result.items) == 3
    keep = load_comparisons(DataSource(path=path, drop_synthetic=False))
    assert [len(r.responses) for r in keep.items] == [3, 2, 2, 2]
    assert sum(r.num_pairs for r in keep.items) == 3 + 1 + 1 + 1
    english = load_comparisons(DataSource(path=path, lang="en"))
    assert len(english.items) == 2 and all(r.source.endswith(":1") for r in english.items)


def test_prompt_lottery_on_fixture(tmp_path):
    result = load_prompts(write_lottery_fixture(tmp_path))
    assert [p.messages for p in result.items][1] == [
        {"role": "user", "content": "What is 17 times 23?"}
    ]
    assert len(result.items) == 3


def test_check_file_on_oasst_fixture(tmp_path):
    stats = check_file(write_oasst_fixture(tmp_path))
    assert stats["format"] == "oasst" and stats["pairs"] == 3 and stats["examples"] == 3
    assert stats["responses_per_prompt"] == {2: 3}


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
