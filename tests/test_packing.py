"""Packing: a packed row computes exactly what its examples compute one by one."""

import torch

from rlhf.algo.sft import n_targets, token_nll_sum
from rlhf.roles import models
from rlhf.tokens.chat import IGNORE_INDEX, encode_sft
from rlhf.tokens.packing import collate_packed, pack_rows


def _rows(tok, n=5):
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"What is {i} + {i * 3}?" + " Please." * i},
            {"role": "assistant", "content": f"It is {i + i * 3}."},
        ]
        rows.append(encode_sft(tok, messages, 128, True))
    return rows


def test_pack_rows_keeps_whole_examples_within_max_length(tiny_model_dir):
    rows = _rows(models.load_tokenizer(tiny_model_dir), 7)
    bins = pack_rows(rows, 128)
    assert sorted(id(r) for b in bins for r in b) == sorted(id(r) for r in rows)
    assert all(sum(len(r["input_ids"]) for r in b) <= 128 for b in bins)
    assert len(bins) < len(rows)


def test_packed_loss_equals_the_unpacked_loss(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_causal_lm(str(tiny_model_dir)).eval()
    rows = _rows(tok)
    with torch.no_grad():
        one_by_one = []
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            one_by_one.append(token_nll_sum(logits, torch.tensor([r["labels"]])))
        bins = pack_rows(rows, 96)
        assert len(bins) >= 2 and any(len(b) > 1 for b in bins)
        batch = collate_packed(bins, tok.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        packed = token_nll_sum(logits, batch["labels"])
    assert n_targets(batch["labels"]) == sum(
        (torch.tensor(r["labels"]) != IGNORE_INDEX).sum() for r in rows
    )
    torch.testing.assert_close(packed, torch.stack(one_by_one).sum(), rtol=1e-4, atol=1e-4)
    # Without the block mask the examples would see each other: the loss changes.
    plain = model(
        input_ids=batch["input_ids"], attention_mask=(batch["labels"] != -999).long()
    ).logits
    assert not torch.allclose(token_nll_sum(plain, batch["labels"]), packed, atol=1e-3)


def test_sft_stage_runs_with_packing(tmp_path):
    from rlhf.recipe import load_recipe
    from rlhf.stages import sft
    from tests.test_pipeline import _overrides, _write_data

    args = [*_overrides(tmp_path, _write_data(tmp_path)), "sft.packing=true", "sft.max_steps=2"]
    run = sft.run(load_recipe("recipes/tiny.yaml", args))
    import json

    info = json.loads((run / "run.json").read_text())
    assert info["packed_rows"] < info["train_examples"]
    assert (run / "COMPLETED").is_file()
