"""`rlhf eval reward` and `rlhf eval perplexity` (rlhf.tools.evaluate), on the tiny random model."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from rlhf import cli
from rlhf.algo import sft as sft_loss
from rlhf.roles import models
from rlhf.tokens.chat import encode_sft, pad_batch
from rlhf.tools import evaluate
from tests.conftest import real_data_file


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CONVERSATIONS = [
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
    ],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6."},
    ],
]


def test_perplexity_matches_the_sft_token_nll(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in CONVERSATIONS])
    rc, out, _ = run_cli(["eval", "perplexity", tiny_model_dir, path, "--json"])
    assert rc == 0
    got = json.loads(out)
    # The same number by hand: summed answer-token NLL over answer tokens, one batch.
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_causal_lm(tiny_model_dir).eval()
    rows = [encode_sft(tok, c, 512) for c in CONVERSATIONS]
    batch = pad_batch(
        [r["input_ids"] for r in rows], tok.pad_token_id, "right", [r["labels"] for r in rows]
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = sft_loss.token_nll_sum(logits, batch["labels"]).item()
    n = int(sft_loss.n_targets(batch["labels"]))
    assert got["n_tokens"] == n and got["n_conversations"] == 2
    assert got["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # A random model over a 49k vocabulary is close to uniform.
    assert got["perplexity"] > 1000


def test_sft_module_still_exposes_the_moved_helpers():
    from rlhf.stages import sft

    assert sft.token_nll_sum is sft_loss.token_nll_sum and sft.n_targets is sft_loss.n_targets


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model with a (seeded, untrained) scalar head, saved as a reward-model folder."""
    out = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_reward_model(tiny_model_dir)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_eval_reward_refuses_a_model_without_a_trained_head(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    rc, _, err = run_cli(["eval", "reward", tiny_model_dir, path])
    assert rc == 2 and "not a reward model" in err and err.count("\n") == 1


def test_eval_reward_on_pairs_and_rankings(tmp_path, tiny_rm_dir):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"Say hi {i}", "chosen": "Hello!", "rejected": "No."} for i in range(4)],
    )
    rc, out, _ = run_cli(["eval", "reward", tiny_rm_dir, pairs, "--json"])
    assert rc == 0
    got = json.loads(out)
    assert got["n_pairs"] == 4 and got["n_prompts"] == 4 and 0 <= got["accuracy"] <= 1
    assert "kendall_tau" not in got
    rankings = write_jsonl(
        tmp_path / "rankings.jsonl",
        [{"prompt": "Colour?", "responses": ["red", "blue", "green"], "ranking": [2, 0, 1]}] * 2,
    )
    rc, out, _ = run_cli(
        ["eval", "reward", tiny_rm_dir, rankings, "--format", "rankings", "--json"]
    )
    got = json.loads(out)
    assert got["n_pairs"] == 6 and got["n_rankings"] == 2
    assert -1 <= got["kendall_tau"] <= 1 and got["top1"] in (0.0, 1.0)
    # The human-readable form prints one "key: value" line per number.
    rc, out, _ = run_cli(["eval", "reward", tiny_rm_dir, rankings, "--limit", "1"])
    assert rc == 0 and "accuracy" in out and "n_pairs: 3" in out.replace("  ", "")


def test_eval_reward_batch_size_does_not_change_the_numbers(tmp_path, tiny_rm_dir):
    rows = [
        {
            "prompt": f"Question {i}" + " with context" * i,
            "responses": ["a", "bb bb", "c c c"],
            "ranking": [0, 1, 2],
        }
        for i in range(5)
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    one = evaluate.reward_accuracy_cli(tiny_rm_dir, path, batch_size=1)
    many = evaluate.reward_accuracy_cli(tiny_rm_dir, path, batch_size=4)
    assert one["accuracy"] == many["accuracy"]
    assert one["mean_margin"] == pytest.approx(many["mean_margin"], abs=1e-5)


def test_eval_reward_user_mistakes_are_one_line_exit_2(tmp_path, tiny_rm_dir):
    rc, _, err = run_cli(["eval", "reward", tiny_rm_dir, str(tmp_path / "missing.jsonl")])
    assert rc == 2 and err.count("\n") == 1 and "not found" in err
    rc, _, err = run_cli(["eval", "reward", str(tmp_path), str(tmp_path / "x.jsonl")])
    assert rc == 2 and err.count("\n") == 1
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    rc, _, err = run_cli(["eval", "reward", tiny_rm_dir, path, "--limit", "0"])
    assert rc == 2 and "--limit" in err


def test_eval_reward_on_real_hh_and_oasst(tiny_rm_dir):
    hh_file, oasst_file = (
        real_data_file("hh_harmless_pairs.jsonl.gz"),
        real_data_file("oasst_en_trees.jsonl"),
    )
    hh = evaluate.reward_accuracy_cli(
        tiny_rm_dir,
        str(hh_file),
        fmt="hh",
        limit=4,
        max_length=128,
    )
    assert hh["n_pairs"] == 4 and "kendall_tau" not in hh
    oasst = evaluate.reward_accuracy_cli(
        tiny_rm_dir,
        str(oasst_file),
        fmt="oasst",
        limit=2,
        max_length=128,
    )
    assert oasst["n_prompts"] >= 2 and oasst["n_pairs"] >= oasst["n_prompts"]
