"""`rlhf generate` on the tiny random model: every decoding strategy, determinism, the CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.infra.errors import UserError
from rlhf.tokens import decoding
from rlhf.tokens.decoding import Decoding
from rlhf.tools import generate

PROMPTS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Name three colours, please."}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
    ],
]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch

    return generate.load(tiny_model_dir, torch.device("cpu"))


def run(tiny, decoding: Decoding, seed: int = 0, batch_size: int = 2) -> list[dict]:
    model, tokenizer = tiny
    return generate.generate_responses(model, tokenizer, PROMPTS, decoding, batch_size, seed=seed)


def texts(rows: list[dict]) -> list[str]:
    return [r["response"] for r in rows]


def test_greedy_is_deterministic_and_well_formed(tiny):
    first = run(tiny, Decoding(max_new_tokens=6))
    assert texts(first) == texts(run(tiny, Decoding(max_new_tokens=6), seed=123))
    assert [r["prompt"] for r in first] == ["Hi!", "Name three colours, please.", "And 3 + 3?"]
    for row in first:
        assert set(row) == {"prompt", "response", "tokens", "finished"}
        assert 1 <= row["tokens"] <= 6


def test_beam_search_is_deterministic(tiny):
    beam = Decoding(max_new_tokens=6, num_beams=3)
    assert texts(run(tiny, beam)) == texts(run(tiny, beam, seed=99))


def test_sampling_is_reproducible_with_a_seed(tiny):
    sample = Decoding(max_new_tokens=8, do_sample=True, temperature=1.0)
    a, b, c = run(tiny, sample, seed=1), run(tiny, sample, seed=1), run(tiny, sample, seed=2)
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)


@pytest.mark.parametrize(
    "decoding",
    [
        Decoding(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20),
        Decoding(max_new_tokens=5, do_sample=True, top_p=0.9),
        Decoding(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=50, top_p=0.95),
        Decoding(max_new_tokens=5, do_sample=True, num_beams=2),  # beam sampling
    ],
    ids=["temperature+top_k", "top_p", "temperature+top_k+top_p", "beam+sampling"],
)
def test_sampling_combinations_are_reproducible(tiny, decoding):
    a, b = run(tiny, decoding, seed=5), run(tiny, decoding, seed=5)
    assert texts(a) == texts(b) and len(a) == len(PROMPTS)


def test_top_k_1_sampling_equals_greedy(tiny):
    greedy = run(tiny, Decoding(max_new_tokens=6))
    assert texts(run(tiny, Decoding(max_new_tokens=6, do_sample=True, top_k=1))) == texts(greedy)


def test_sampling_flags_imply_sampling_and_bad_values_are_user_errors():
    def args(**kw) -> argparse.Namespace:
        base = dict(max_new_tokens=8, do_sample=False, temperature=None, top_k=None, top_p=None)
        return argparse.Namespace(**{**base, "num_beams": 1, **kw})

    assert not decoding.decoding_from_args(args()).do_sample
    assert decoding.decoding_from_args(args(temperature=0.7)).do_sample
    assert decoding.decoding_from_args(args(top_p=0.9)).do_sample
    config = decoding.decoding_from_args(args(do_sample=True)).generation_config(0, [2])
    assert config.top_k == 0 and config.temperature == 1.0  # no hidden top_k=50
    for bad in (dict(temperature=0.0), dict(top_p=1.5), dict(num_beams=0), dict(top_k=-1)):
        with pytest.raises(UserError):
            decoding.decoding_from_args(args(**bad))


def test_cli_prompts_file_to_jsonl(tmp_path: Path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["one", "two", "three"])
        + json.dumps({"prompt": PROMPTS[2]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    argv = ["generate", tiny_model_dir, "--prompts", str(prompts), "--max-new-tokens", "4"]
    rc, stdout, _ = run_cli([*argv, "--batch-size", "3", "--output", str(out)])
    assert rc == 0 and stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["one", "two", "three", "And 3 + 3?"]
    assert all(r["tokens"] <= 4 for r in rows)


def test_cli_single_prompt_to_stdout(tiny_model_dir):
    argv = ["generate", tiny_model_dir, "--prompt", "Hello", "--max-new-tokens", "3"]
    rc, out, _ = run_cli([*argv, "--temperature", "0.9", "--seed", "7"])
    again = run_cli([*argv, "--temperature", "0.9", "--seed", "7"])[1]
    assert rc == 0 and out == again
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["prompt"] == "Hello" and row["tokens"] <= 3


def test_cli_errors_are_one_line(tmp_path: Path, tiny_model_dir):
    rc, _, err = run_cli(["generate", tiny_model_dir, "--prompt", "x", "--top-p", "0"])
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert rc == 2


def test_one_decoding_rule_for_generate_and_compare():
    """generate decodes greedily unless asked to sample; compare samples unless --greedy; both
    read the sampling flags the same way, and --greedy with a sampling flag is refused."""

    def args(**kw) -> argparse.Namespace:
        base = dict(max_new_tokens=8, temperature=None, top_k=None, top_p=None)
        return argparse.Namespace(**{**base, **kw})

    compare_default = decoding.decoding_from_args(args(greedy=False), True, temperature=0.7)
    assert compare_default.do_sample and compare_default.temperature == 0.7
    assert not decoding.decoding_from_args(args(greedy=True), True).do_sample
    assert decoding.decoding_from_args(args(greedy=False, top_k=5), True).top_k == 5
    assert decoding.decoding_from_args(args(do_sample=False, top_k=5)).do_sample
    with pytest.raises(UserError, match="--greedy does not sample: drop --top-p"):
        decoding.decoding_from_args(args(greedy=True, top_p=0.9), True)
