"""Every supported format and container (.jsonl, .json, .parquet, .gz) -> canonical examples."""

from __future__ import annotations

import gzip
import json

import pytest
from helpers_data import write_jsonl

from rlhf.data import Prompt, Ranking, SFTExample, load_comparisons, load_prompts, load_sft
from rlhf.infra.errors import UserError
from rlhf.recipe import DataSource

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]


def test_messages(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CHAT, "id": 7}])
    result = load_sft(path)
    assert result.format == "messages"
    assert result.items == [SFTExample(CHAT, f"{path}:1")]
    assert result.items[0].prompt == CHAT[:2]
    assert result.items[0].response == "Hello!"


def test_message_extra_keys_are_dropped(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a", "name": "x"}, CHAT[2]]}]
    item = load_sft(write_jsonl(tmp_path / "x.jsonl", rows)).items[0]
    assert item.messages[0] == {"role": "user", "content": "a"}


def test_prompt_completion_string_and_messages(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "completion": "4"},
        {"prompt": CHAT[:2], "completion": "Hello!"},
    ]
    items = load_sft(write_jsonl(tmp_path / "pc.jsonl", rows)).items
    assert items[0].messages == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert items[1].messages == CHAT


def test_alpaca(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say bye", "output": "bye"},
    ]
    result = load_sft(write_jsonl(tmp_path / "alpaca.jsonl", rows))
    assert result.format == "alpaca"
    assert [x.prompt[0]["content"] for x in result.items] == [
        "Translate\n\nbonjour",
        "Say hi",
        "Say bye",
    ]


def test_pairs(tmp_path):
    rows = [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]
    result = load_comparisons(write_jsonl(tmp_path / "p.jsonl", rows))
    assert result.format == "pairs"
    r = result.items[0]
    assert r == Ranking([{"role": "user", "content": "Q?"}], ["good", "bad"], [0, 1], r.source)
    assert r.pairs() == [(0, 1)] and r.num_pairs == 1


def test_conversational_pairs_with_implicit_prompt(tmp_path):
    rows = [
        {
            "chosen": [*CHAT[:2], {"role": "assistant", "content": "good"}],
            "rejected": [*CHAT[:2], {"role": "assistant", "content": "bad"}],
        },
        {
            "prompt": CHAT[:2],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
    ]
    items = load_comparisons(write_jsonl(tmp_path / "c.jsonl", rows)).items
    for r in items:
        assert r.prompt == CHAT[:2]
        assert r.responses == ["good", "bad"]


def test_rankings_and_pairs(tmp_path):
    rows = [{"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}]
    r = load_comparisons(write_jsonl(tmp_path / "r.jsonl", rows)).items[0]
    assert r.ranked_responses() == ["c", "a", "b"]
    assert r.pairs() == [(2, 0), (2, 1), (0, 1)]
    assert r.num_pairs == 3


def test_prompts_string_messages_and_bare_strings(tmp_path):
    rows = [{"prompt": "one"}, {"prompt": CHAT[:2]}, "three"]
    result = load_prompts(write_jsonl(tmp_path / "prompts.jsonl", rows))
    assert result.format == "prompts"
    assert [p.messages for p in result.items] == [
        [{"role": "user", "content": "one"}],
        CHAT[:2],
        [{"role": "user", "content": "three"}],
    ]
    assert isinstance(result.items[0], Prompt)


def test_prompts_from_comparison_data(tmp_path):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}]
    result = load_prompts(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert result.items[0].messages == [{"role": "user", "content": "Q"}]


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": CHAT}, "messages"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
    ],
)
def test_auto_detects_sft(tmp_path, row, fmt):
    assert load_sft(write_jsonl(tmp_path / "a.jsonl", [row])).format == fmt


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}, "rankings"),
        (
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: a",
                "rejected": "\n\nHuman: hi\n\nAssistant: b",
            },
            "hh",
        ),
        (
            {
                "prompt": {
                    "text": "hi",
                    "role": "prompter",
                    "replies": [
                        {"text": "a", "role": "assistant", "rank": 0, "replies": []},
                        {"text": "b", "role": "assistant", "rank": 1, "replies": []},
                    ],
                }
            },
            "oasst",
        ),
    ],
)
def test_auto_detects_comparisons(tmp_path, row, fmt):
    result = load_comparisons(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert result.format == fmt
    assert len(result.items) == 1


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    result = load_prompts(DataSource(path=path, format="prompts"))
    assert result.format == "prompts"
    assert result.items[0].messages == [{"role": "user", "content": "p"}]


def test_undetectable_row(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"foo": 1}])
    with pytest.raises(UserError, match=rf"^{path}:1: cannot tell the data format"):
        load_sft(path)


def test_wrong_kind_of_data(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="holds comparisons data, but this stage needs sft data"):
        load_sft(path)


def test_gzip_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl.gz", [{"prompt": "p", "completion": "c"}] * 3)
    assert len(load_sft(path).items) == 3


def test_json_list_and_gz(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    plain = tmp_path / "a.json"
    plain.write_text(json.dumps(rows))
    zipped = tmp_path / "a.json.gz"
    zipped.write_bytes(gzip.compress(json.dumps(rows).encode()))
    for path in (plain, zipped):
        result = load_comparisons(str(path))
        assert len(result.items) == 2
        assert result.items[1].source == f"{path}:row 2"


def test_parquet_and_gz(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": CHAT}, {"messages": CHAT[1:]}]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    zipped = tmp_path / "a.parquet.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    for p in (path, zipped):
        result = load_sft(str(p))
        assert [x.messages for x in result.items] == [CHAT, CHAT[1:]]


def test_parquet_alpaca_with_null_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"instruction": "a", "input": None, "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [x.prompt[0]["content"] for x in load_sft(str(path)).items] == ["a", "c\n\nd"]


def test_limit_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('"one"\n\n"two"\n"three"\n')
    result = load_prompts(DataSource(path=str(path), limit=2))
    assert [p.source for p in result.items] == [f"{path}:1", f"{path}:3"]


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_sft(str(tmp_path / "nope.jsonl"))
    other = tmp_path / "a.csv"
    other.write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported data file type"):
        load_sft(str(other))


def test_hub_failure_is_a_user_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="someone/some-dataset .*: hub unreachable"):
        load_comparisons("someone/some-dataset")


def test_hub_rows_and_flat_oasst(monkeypatch):
    """The hub's oasst1 is one message per row: trees are rebuilt from parent_id."""
    import datasets

    def msg(mid, parent, role, text, rank=None):
        return {
            "message_id": mid,
            "parent_id": parent,
            "role": role,
            "text": text,
            "rank": rank,
            "deleted": False,
            "synthetic": False,
        }

    rows = [
        msg("a1", "r", "assistant", "first", 1),
        msg("r", None, "prompter", "hello"),
        msg("a2", "r", "assistant", "second", 0),
    ]
    seen = {}

    def fake(path, split, data_dir=None):
        seen.update(path=path, split=split)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake)
    result = load_comparisons(DataSource(path="OpenAssistant/oasst1", split="validation"))
    assert seen == {"path": "OpenAssistant/oasst1", "split": "validation"}
    assert result.format == "oasst"
    [r] = result.items
    assert r.prompt == [{"role": "user", "content": "hello"}]
    assert r.ranked_responses() == ["second", "first"]
    assert r.source == "OpenAssistant/oasst1[validation]:row 2"
