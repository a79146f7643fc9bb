"""Every invalid row names its file and line; skip mode counts rows by reason instead."""

from __future__ import annotations

import gzip
import re

import pytest
from helpers_data import write_jsonl

from rlhf.data import check_lengths, load_comparisons, load_prompts, load_sft
from rlhf.infra.errors import UserError

GOOD_PAIR = {"prompt": "Q", "chosen": "a", "rejected": "b"}
GOOD_SFT = {"prompt": "Q", "completion": "A"}


def error_of(loader, path) -> str:
    with pytest.raises(UserError) as info:
        loader(path)
    return str(info.value)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "chosen is identical to rejected"),
        ({"prompt": "Q", "chosen": "a"}, "missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
        ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "chosen must be a string, got int"),
        (
            {"prompt": 5, "chosen": "a", "rejected": "b"},
            "prompt must be a string or a list of messages, got int",
        ),
        ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "chosen is empty"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt is empty"),
        (
            {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]},
            "ranking lists response 0 more than once",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [0, 1]},
            "ranking has 2 entries for 3 responses (missing [2])",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 2]},
            "ranking index 2 is out of range for 2 responses",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, "1"]},
            "ranking must be a list of response indices",
        ),
        (
            {"prompt": "Q", "responses": ["a"], "ranking": [0]},
            "a ranking needs at least 2 responses, got 1",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]},
            "responses 0 and 2 are identical",
        ),
        ({"prompt": "Q", "responses": ["a", ""], "ranking": [0, 1]}, "response 1 is empty"),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x"}],
                "chosen": "a",
                "rejected": "b",
            },
            "prompt must not end with an assistant message",
        ),
        (
            {"prompt": [{"role": "human", "content": "Q"}], "chosen": "a", "rejected": "b"},
            "prompt[0].role must be one of",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            "missing field 'prompt[0].content'",
        ),
    ],
)
def test_comparison_errors_name_file_and_line(tmp_path, bad, message):
    # The bad row is line 3, after a good row and a blank line: line numbers are file lines.
    path = tmp_path / "reward.jsonl"
    rows = (
        [GOOD_PAIR, "", bad]
        if "responses" not in bad
        else [{"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 1]}, "", bad]
    )
    write_jsonl(path, rows, raw=True)
    assert error_of(load_comparisons, str(path)).startswith(f"{path}:3: {message}")


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "the last message must be the assistant's reply, got role 'user'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": " "},
                ]
            },
            "the assistant's reply is empty",
        ),
        ({"messages": "hi"}, "messages must be a list of messages, got str"),
        ({"messages": []}, "messages is empty"),
        ({"prompt": "Q", "completion": ""}, "completion is empty"),
        ({"prompt": "Q", "completion": None}, "missing field 'completion'"),
        ({"instruction": 1, "output": "o"}, "instruction must be a string, got int"),
    ],
)
def test_sft_errors_name_file_and_line(tmp_path, bad, message):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    if "prompt" in bad:
        good = GOOD_SFT
    if "instruction" in bad:
        good = {"instruction": "i", "output": "o"}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, bad])
    assert error_of(load_sft, path) == f"{path}:2: {message}"


def test_malformed_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_PAIR, GOOD_PAIR, '{"prompt": "Q",'], raw=True)
    message = error_of(load_comparisons, path)
    assert message.startswith(f"{path}:3: malformed JSON")


def test_malformed_json_document(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n{"prompt": "Q"},\n{"prompt": }\n]')
    assert error_of(load_prompts, str(path)).startswith(f"{path}:3: malformed JSON")


def test_unreadable_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"this is not gzip data")
    assert "unreadable gzip file" in error_of(load_comparisons, str(path))
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'"a prompt"\n' * 1000)[:60])
    message = error_of(load_prompts, str(truncated))
    assert message.startswith(f"{truncated}:") and "unreadable gzip file" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert error_of(load_sft, str(path)) == f"{path}: no rows (the file or dataset is empty)"


def test_skip_mode_counts_reasons(tmp_path):
    rows = [
        GOOD_PAIR,
        "{not json",
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "", "rejected": "b"},
        {"prompt": "Q", "chosen": "a"},
        {"prompt": "R", "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "x.jsonl", rows, raw=True)
    result = load_comparisons(path, on_invalid="skip")
    assert [r.source for r in result.items] == [f"{path}:1", f"{path}:7"]
    assert result.rows == 7
    assert result.skipped == {
        "malformed JSON": 1,
        "chosen identical to rejected": 2,
        "empty response": 1,
        "missing field": 1,
    }
    assert result.skipped_summary() == (
        "skipped 5 rows: 2 chosen identical to rejected, 1 empty response, 1 malformed JSON, "
        "1 missing field"
    )


def test_skip_mode_detects_format_after_broken_first_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["{oops", GOOD_SFT], raw=True)
    result = load_sft(path, on_invalid="skip")
    assert result.format == "prompt_completion"
    assert result.skipped == {"malformed JSON": 1}


def test_nothing_left_after_skipping(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "a"}])
    message = error_of(lambda p: load_comparisons(p, on_invalid="skip"), path)
    assert message == f"{path}: no valid examples (skipped 1 row: 1 chosen identical to rejected)"


def test_bad_on_invalid_value(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_SFT])
    with pytest.raises(UserError, match="on_invalid must be 'error' or 'skip'"):
        load_sft(path, on_invalid="ignore")


class CharTokenizer:
    """One token per character of the rendered prompt: enough to test the length policy."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return {"input_ids": list(range(len(text)))}


def test_check_lengths_error_and_skip(tmp_path):
    rows = [{"prompt": "hi", "completion": "a"}, {"prompt": "x" * 50, "completion": "b"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    items = load_sft(path).items
    with pytest.raises(
        UserError, match=re.escape(f"{path}:2: prompt is 67 tokens, longer than max_length 30")
    ):
        check_lengths(items, CharTokenizer(), 30)
    kept, skipped = check_lengths(items, CharTokenizer(), 30, on_invalid="skip")
    assert kept == items[:1]
    assert skipped == {"prompt too long": 1}


def test_check_lengths_real_tokenizer(tmp_path, tiny_model_dir):
    from rlhf.roles.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    path = write_jsonl(tmp_path / "x.jsonl", ["short", "word " * 300])
    items = load_prompts(path).items
    kept, skipped = check_lengths(items, tok, 128, on_invalid="skip")
    assert kept == items[:1] and skipped == {"prompt too long": 1}
