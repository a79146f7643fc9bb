"""`rlhf data check`: statistics and problems of a data file."""

from __future__ import annotations

import pytest
from helpers_data import write_jsonl

from rlhf.infra.errors import UserError
from rlhf.tools.data_check import check_file, percentiles


def test_check_comparisons_reports_skips_and_histogram(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": "good answer", "rejected": "bad"},
        {"prompt": "Q2", "chosen": "x", "rejected": "x"},
        {"prompt": "Q3", "responses": ["a", "bb", "ccc"], "ranking": [2, 1, 0]},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    stats = check_file(path)
    assert stats["format"] == "pairs" and stats["kind"] == "comparisons"
    assert stats["rows"] == 3 and stats["examples"] == 1  # pairs parser: rankings row invalid
    assert stats["skipped"] == {"chosen identical to rejected": 1, "missing field": 1}
    assert stats["skipped_examples"][0] == f"{path}:2: chosen is identical to rejected"


def test_check_rankings_stats(tmp_path):
    rows = [
        {"prompt": "Q1", "responses": ["a", "bb"], "ranking": [0, 1]},
        {"prompt": "Q22", "responses": ["a", "bb", "ccc"], "ranking": [2, 1, 0]},
    ]
    stats = check_file(write_jsonl(tmp_path / "r.jsonl", rows), fmt="rankings")
    assert stats["pairs"] == 1 + 3
    assert stats["responses_per_prompt"] == {2: 1, 3: 1}
    assert stats["prompt_chars"] == {"p50": 2, "p90": 3, "p99": 3, "max": 3}
    assert stats["response_chars"]["max"] == 3
    assert "skipped" not in stats


def test_check_sft_with_tokenizer(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hello there", "completion": "hi"}])
    stats = check_file(path, tokenizer=tiny_model_dir)
    assert stats["kind"] == "sft"
    assert stats["response_tokens"]["max"] >= 1
    assert stats["prompt_tokens"]["p50"] > stats["response_tokens"]["p50"]


def test_check_prompts_and_errors(tmp_path):
    stats = check_file(write_jsonl(tmp_path / "p.jsonl", ["a", "bbb"]))
    assert stats["kind"] == "prompts" and "response_chars" not in stats
    with pytest.raises(UserError, match="unknown data format 'csv'"):
        check_file(str(tmp_path / "p.jsonl"), fmt="csv")


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([]) == {}
