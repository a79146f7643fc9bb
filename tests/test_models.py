import json
from pathlib import Path

import pytest
import torch

from rlhf.infra.errors import UserError
from rlhf.roles import models


def test_prepare_is_a_verified_noop_once_done(smollm2_dir):
    info = json.loads((Path(smollm2_dir) / "PREPARED.json").read_text())
    assert "Paris" in info["verify_greedy"]
    stamp = (Path(smollm2_dir) / "model.safetensors").stat().st_mtime
    assert models.prepare("smollm2-135m-instruct") == Path(smollm2_dir)
    assert (Path(smollm2_dir) / "model.safetensors").stat().st_mtime == stamp
    assert not list(Path(smollm2_dir).glob("*.bin")), "weights must be safetensors only"


def test_truncated_smollm2_loads_and_generates_stably(smollm2_dir):
    tok = models.load_tokenizer(smollm2_dir)
    model = models.load_causal_lm(smollm2_dir, num_hidden_layers=2)
    assert model.config.num_hidden_layers == 2
    text = models.verify_model(model, tok)  # finite logits, repeatable greedy generation
    assert isinstance(text, str)


def test_tokenizer_pad_is_distinct_from_eos(smollm2_dir):
    tok = models.load_tokenizer(smollm2_dir)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_last_token_index_left_right_and_no_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert models.last_token_index(right).tolist() == [2, 4]
    assert models.last_token_index(left).tolist() == [4, 4]


def test_unknown_names_and_offline_hub_ids_are_one_line_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="not a registered name"):
        models.resolve("./no/such/folder")
    with pytest.raises(UserError, match="unknown model short name"):
        models.prepare("gpt-17")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        models.resolve(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        models.load_tokenizer("nobody-xyz/not-a-model")


def test_a_stage_run_folder_stands_for_the_model_it_saved(tmp_path, tiny_model_dir):
    """runs/x/reward resolves to runs/x/reward/model (so `eval compare --reward-model
    runs/x/reward` works); a folder with neither config.json nor model/ is still an error."""
    import shutil

    stage = tmp_path / "reward"
    shutil.copytree(tiny_model_dir, stage / "model")
    (stage / "COMPLETED").write_text("")
    assert models.resolve(str(stage)) == str(stage / "model")
    assert models.resolve(str(stage / "model")) == str(stage / "model")
    (tmp_path / "other" / "model").mkdir(parents=True)
    with pytest.raises(UserError, match="not a model folder"):
        models.resolve(str(tmp_path / "other"))
