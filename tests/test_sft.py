"""SFT: assistant-only labels under the real SmolLM2 chat template, and the stage on tiny data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import accel
from rlhf.recipe import load_recipe
from rlhf.roles import models
from rlhf.tokens.chat import IGNORE_INDEX, encode_sft, pad_batch


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return models.load_tokenizer(smollm2_dir)


def _labelled_text(tok, row):
    return tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])


def test_loss_only_on_assistant_turns(smol_tok):
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    row = encode_sft(smol_tok, messages, max_length=512)
    assert _labelled_text(smol_tok, row) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    full = encode_sft(smol_tok, messages, max_length=512, assistant_only=False)
    assert full["labels"] == full["input_ids"]
    # The system prompt the template adds, and the user turns, carry no loss.
    assert "SmolLM" in smol_tok.decode(row["input_ids"]) and "SmolLM" not in _labelled_text(
        smol_tok, row
    )


def test_turn_ends_survive_padding(smol_tok):
    """pad != eos, and masks come from lengths: <|im_end|> inside a prompt stays attended."""
    a = encode_sft(
        smol_tok,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        512,
    )
    b = encode_sft(
        smol_tok,
        [
            {"role": "user", "content": "Hi there, how are you today?"},
            {"role": "assistant", "content": "Fine."},
        ],
        512,
    )
    batch = pad_batch(
        [a["input_ids"], b["input_ids"]], smol_tok.pad_token_id, "right", [a["labels"], b["labels"]]
    )
    eos = smol_tok.eos_token_id
    n_eos = sum(t == eos for t in a["input_ids"])
    assert n_eos >= 3  # system, user and assistant turns all end with <|im_end|>
    assert int(((batch["input_ids"][0] == eos) & (batch["attention_mask"][0] == 1)).sum()) == n_eos
    assert int(batch["attention_mask"][0].sum()) == len(a["input_ids"])


def _write_sft(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i} plus {i}?"},
                            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                        ]
                    }
                )
                + "\n"
            )


def test_tiny_sft_stage_writes_the_run_directory_contract(tmp_path, matmul_attention_backwards):
    from rlhf.stages import sft

    _write_sft(tmp_path / "train.jsonl", 24)
    _write_sft(tmp_path / "eval.jsonl", 6)
    recipe = load_recipe(
        "recipes/tiny.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"sft.train.path={tmp_path / 'train.jsonl'}",
            f"sft.eval.path={tmp_path / 'eval.jsonl'}",
            "sft.max_steps=3",
        ],
    )
    run_dir = sft.run(recipe)
    # its training steps differentiate attention through matmuls (rlhf.accel.apply.training),
    # unless RLHF_ACCEL=off forces the plain path over the recipe's `accel: auto`
    assert bool(matmul_attention_backwards) == (not accel.forced_off())
    for name in (
        "recipe.yaml",
        "run.json",
        "metrics.jsonl",
        "eval.json",
        "COMPLETED",
        "tb",
        "model",
    ):
        assert (run_dir / name).exists(), name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["world_size"] == 1 and info["seed"] == 42
    assert {"torch", "transformers"} <= set(info["versions"])
    assert info["accel"] == ("off" if accel.forced_off() else "auto")  # the recipe's, or the env's
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["steps"] == 3 and results["perplexity"] < results["base_perplexity"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert all(r["stage"] == "sft" for r in rows)
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert not list((run_dir / "model").glob("*.bin"))

    # A fresh process loads the folder with plain transformers and generates.
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "d=sys.argv[1]; t=AutoTokenizer.from_pretrained(d); m=AutoModelForCausalLM.from_pretrained(d);"
        "x=t.apply_chat_template([{'role':'user','content':'hi'}], add_generation_prompt=True, return_tensors='pt', return_dict=True);"
        "print(m.generate(**x, max_new_tokens=3, do_sample=False).shape[1] > x['input_ids'].shape[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run_dir / "model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "True", out.stderr[-2000:]


@pytest.mark.parametrize("tied", [True, False])
def test_copy_token_embeddings_copies_the_input_and_the_lm_head_row(tied):
    """dst's row becomes src's in the input embedding and in the LM head (the same tensor when
    tied, its own row when not); every other row is left as it was."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(config)
    inputs_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    models.copy_token_embeddings(model, {7: 3, 9: 1})
    inputs = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert torch.equal(inputs[7], inputs_before[3]) and torch.equal(inputs[9], inputs_before[1])
    assert torch.equal(head[7], head_before[3]) and torch.equal(head[9], head_before[1])
    others = [i for i in range(40) if i not in (7, 9)]
    assert torch.equal(inputs[others], inputs_before[others])
    assert torch.equal(head[others], head_before[others])
    assert (head is inputs) == tied


def test_lm_head_on_answer_positions_gives_the_full_logits_loss_and_gradients(tiny_model_dir):
    """labelled_nll_sum (the LM head only where a labelled token follows) equals token_nll_sum
    over the full (B, T, V) logits, in value and in every parameter's gradient, with prompt
    labels masked and right padding; a batch without targets gives 0."""
    import torch

    from rlhf.algo.sft import token_nll_sum
    from rlhf.roles.labelled_nll import labelled_nll_sum

    torch.manual_seed(0)
    model = models.load_causal_lm(tiny_model_dir)
    ids = torch.randint(5, 500, (3, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[attention == 0] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}

    full = token_nll_sum(model(input_ids=ids, attention_mask=attention).logits, labels)
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    picked = labelled_nll_sum(model, batch)
    picked.backward()
    assert torch.allclose(picked, full, rtol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], rtol=1e-4, atol=1e-7), name
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone

    batch["labels"] = torch.full_like(labels, IGNORE_INDEX)
    assert labelled_nll_sum(model, batch).item() == 0.0


class _OneOfRanks:
    """Rank `rank` of `world`, run one after another in one process: a collective returns
    what every rank sent once each rank has sent (the caller runs the ranks twice)."""

    def __init__(self, rank: int, world: int, sent: dict):
        import contextlib
        from types import SimpleNamespace

        self.process_index, self.num_processes, self.sent = rank, world, sent
        self.device, self.state = "cpu", SimpleNamespace(distributed_type=None)
        self.autocast = contextlib.nullcontext

    def unwrap_model(self, model):
        return model

    def _all(self, kind: str, tensor):
        self.sent.setdefault(kind, {})[self.process_index] = tensor
        return [self.sent[kind].get(r, tensor) for r in range(self.num_processes)]

    def gather(self, tensor):
        import torch

        return torch.cat(self._all("gather", tensor))

    def reduce(self, tensor, reduction="sum"):
        return sum(self._all("reduce", tensor))


def test_sharded_held_out_perplexity_counts_each_row_once(tiny_model_dir, monkeypatch):
    """5 rows on 2 ranks under ZeRO-3 / FSDP: rank 1's share [1, 3] is padded with row 0 so
    both ranks run 3 forwards. The held-out loss is the 5 rows' (one process, one batch):
    row 0, whose answer is the longest, counts once."""
    import torch

    from rlhf.infra import distributed, training
    from rlhf.roles.labelled_nll import answer_nll
    from rlhf.stages import sft
    from rlhf.stages.runner import rank_batches

    torch.manual_seed(0)
    model = models.load_causal_lm(tiny_model_dir).eval()
    rows = []
    for length, prompt in [(16, 3), (7, 4), (9, 2), (6, 3), (8, 5)]:
        ids = torch.randint(5, 500, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    collate = lambda chunk: sft.collate_rows(chunk, pad_id=0)  # noqa: E731
    whole = answer_nll(model, [collate(rows)])
    expected = training.perplexity(*whole.tolist())["loss"]

    monkeypatch.setattr(distributed, "is_sharded", lambda accelerator=None: True)
    sent: dict = {}
    ranks = [_OneOfRanks(rank, 2, sent) for rank in range(2)]
    assert [distributed.rank_indices(5, r) for r in ranks] == [[0, 2, 4], [1, 3, 0]]
    loaders = [rank_batches(rows, 2, collate, r) for r in ranks]
    for _ in range(2):  # the first pass records what each rank sends
        got = [sft.evaluate(model, loaders[r], ranks[r], len(rows)) for r in range(2)]
    for rank in range(2):
        assert got[rank]["eval/loss"] == pytest.approx(expected, rel=1e-6, abs=0)
