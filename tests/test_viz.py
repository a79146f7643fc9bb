"""`rlhf viz attention` and `rlhf viz kl` on the tiny random model."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import pytest
import torch

from rlhf import cli
from rlhf.infra.errors import UserError
from rlhf.tools import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000
    with Image.open(path) as img:
        img.verify()


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return viz.load_eager(tiny_model_dir, torch.device("cpu"))


def test_attention_matrix_is_causal_and_rows_sum_to_one(eager):
    model, tokenizer = eager
    weights, labels, layer, head = viz.attention_matrix(model, tokenizer, "The cat sat.", -1, 1)
    n = len(labels)
    assert weights.shape == (n, n) and n >= 3
    assert (layer, head) == (model.config.num_hidden_layers - 1, 1)
    assert torch.allclose(weights.sum(-1), torch.ones(n), atol=1e-5)
    assert torch.all(weights.triu(diagonal=1) == 0)  # no token attends to the future
    assert "·sat" in labels  # spaces made visible


def test_attention_bad_layer_or_head_is_a_user_error(eager):
    model, tokenizer = eager
    with pytest.raises(UserError, match="layer"):
        viz.attention_matrix(model, tokenizer, "hi there", layer=7)
    with pytest.raises(UserError, match="head"):
        viz.attention_matrix(model, tokenizer, "hi there", head=99)


def test_cli_attention_writes_a_png(tmp_path: Path, tiny_model_dir):
    out = tmp_path / "attn.png"
    argv = ["viz", "attention", tiny_model_dir, "--text", "A $5 fee, paid twice.", "--out"]
    rc, stdout, err = run_cli([*argv, str(out), "--layer", "0", "--head", "2"])
    assert rc == 0, err
    assert_png(out)
    assert str(out) in stdout


def test_kl_against_itself_is_zero_everywhere(tmp_path: Path, tiny_model_dir):
    out = tmp_path / "kl.html"
    argv = ["viz", "kl", tiny_model_dir, "--reference", tiny_model_dir, "--prompt", "Say hi"]
    rc, stdout, err = run_cli([*argv, "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0, err
    assert_png(tmp_path / "kl.png")
    html = out.read_text()
    assert html.count('<span class="t"') >= 6 + 5  # response tokens + the legend's swatches
    assert "http://" not in html and "https://" not in html

    result = viz.kl_report(tiny_model_dir, tiny_model_dir, "Say hi", tmp_path / "again", 6)
    assert len(result["kl"]) == len(result["tokens"]) >= 1
    assert max(result["kl"]) < 1e-6
    assert max(abs(r) for r in result["log_ratio"]) < 1e-5


def test_kl_of_a_changed_policy_is_positive_and_matches_a_direct_sum(eager):
    reference, tokenizer = eager
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "layers.1" in name:
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(0)) * 0.5)
    prompt_ids, response_ids = viz.greedy_response(policy, tokenizer, "Tell me a story", 5)
    kl, _ = viz.token_kl(policy, reference, prompt_ids, response_ids)
    assert kl.shape == (len(response_ids),) and torch.all(kl > 0)
    # Position 0 of the response by hand: the distributions after the prompt.
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        p = torch.log_softmax(policy(ids).logits[0, -1].double(), -1)
        q = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
    assert kl[0].item() == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-6)


def test_kl_needs_reference_and_prompt(tiny_model_dir):
    rc, _, err = run_cli(["viz", "kl", tiny_model_dir, "--prompt", "x"])
    assert rc == 2 and "--reference" in err
