"""Regression tests for five bugs that silently changed results; each failed before its fix."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf.recipe import load_recipe
from rlhf.roles import models
from rlhf.tokens.chat import encode_sft, pad_batch, positions_from_mask


def _write_sft(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


# 1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decode", ["hf", "lean"])
def test_rollout_samples_with_temperature_only_whatever_the_model_folder_says(
    tiny_model_dir, tmp_path, decode
):
    """A folder whose generation_config.json asks for repetition penalty, top-k and top-p must
    not change how PPO samples: the log-probs assume log_softmax(logits / T). generate gets a
    complete config (only temperature active); our loop never reads the folder's config."""
    from transformers.generation.logits_process import TemperatureLogitsWarper

    from rlhf.ppo.rollout import sample_rollout, score_with_models
    from rlhf.roles.actor_critic import ActorCritic, causal_lm_logits
    from rlhf.tokens.sequences import response_slice

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(do_sample=True, repetition_penalty=1.3, top_k=5, top_p=0.5)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    tok = models.load_tokenizer(str(folder), padding_side="left")
    policy = models.load_causal_lm(str(folder)).eval()
    assert policy.generation_config.top_k == 5  # the folder's settings are really loaded
    reference = models.load_causal_lm(str(folder)).eval()
    processors = []
    original = policy._get_logits_processor

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        processors.extend(out)
        return out

    policy._get_logits_processor = capture
    cfg = SimpleNamespace(
        temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=8, stop_strings=[], decode=decode
    )
    prompts = [[{"role": "user", "content": f"Say something about {w}."}] for w in "abcd"]
    from rlhf.tokens.chat import encode_prompt

    batch = pad_batch([encode_prompt(tok, p, 64) for p in prompts], tok.pad_token_id, "left")
    torch.manual_seed(0)
    roll = sample_rollout(
        policy, batch["input_ids"], batch["attention_mask"], cfg, tok, keep_sampling_outputs=True
    )
    used = [type(p) for p in processors]
    assert used == ([TemperatureLogitsWarper] if decode == "hf" else []), processors
    raw = roll.sampling_logits
    score_with_models(roll, ActorCritic(policy), reference, 0.7, contextlib.nullcontext)
    with torch.no_grad():
        logits = causal_lm_logits(policy, roll.input_ids, roll.attention_mask)
    window = logits[:, response_slice(batch["input_ids"].shape[1], roll.response_ids.shape[1])]
    expected = torch.log_softmax(window / 0.7, -1)
    expected = expected.gather(-1, roll.response_ids.unsqueeze(-1)).squeeze(-1)
    m = roll.mask.bool()
    torch.testing.assert_close(roll.logprobs[m], expected[m], rtol=1e-4, atol=1e-4)
    # top_k=5 was not applied: on a random model some sampled token lies outside the top 5.
    rank = (raw > raw.gather(-1, roll.response_ids.unsqueeze(-1))).sum(-1)
    assert (rank[m] >= 5).any()


# 2 ------------------------------------------------------------------------------------------
def _sft_run(tmp_path: Path, name: str, n: int, batch: int, accum: int) -> tuple:
    from rlhf.stages import sft

    _write_sft(tmp_path / "train.jsonl", n)
    _write_sft(tmp_path / "eval.jsonl", 2)
    recipe = load_recipe(
        "recipes/tiny.yaml",
        [
            f"output_dir={tmp_path / name}",
            f"sft.train.path={tmp_path / 'train.jsonl'}",
            f"sft.eval.path={tmp_path / 'eval.jsonl'}",
            "sft.max_steps=null",
            "sft.epochs=1",
            f"sft.batch_size={batch}",
            f"sft.grad_accum={accum}",
            "sft.eval_every=1000",
        ],
    )
    with _count_steps() as steps:
        run_dir = sft.run(recipe)
    from safetensors.torch import load_file

    return len(steps), load_file(run_dir / "model" / "model.safetensors")


@contextlib.contextmanager
def _count_steps():
    """Counts real AdamW steps (accelerate's wrapper skips the inner step when not syncing)."""
    steps: list = []
    real_step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", counted)
        yield steps


def _reward_run(tmp_path: Path, n: int, accum: int) -> tuple:
    from rlhf.stages import reward
    from tests.test_reward import ranking_rows, tiny_recipe, write_jsonl

    tmp_path.mkdir()
    paths = {
        "train": write_jsonl(tmp_path / "train.jsonl", ranking_rows(n)),
        "test": write_jsonl(tmp_path / "test.jsonl", ranking_rows(2, offset=100)),
        "pairs": None,
    }
    recipe = tiny_recipe(
        tmp_path,
        paths,
        "reward.extra_eval=[]",
        "reward.max_steps=null",
        "reward.epochs=1",
        "reward.batch_size=1",
        f"reward.grad_accum={accum}",
        "reward.eval_every=1000",
    )
    with _count_steps() as steps:
        reward.run(recipe)
    return len(steps), None


def test_grad_accum_steps_the_optimizer_once_per_window(tmp_path):
    """With grad_accum k the optimizer steps once per k micro-batches, the epoch's last
    (possibly partial) window included; 1 rank x accum 2 x batch b == 1 rank x batch 2b."""
    for n, accum, expected in ((6, 2, 3), (7, 4, 2), (6, 4, 2)):
        count, _ = _sft_run(tmp_path, f"n{n}k{accum}", n, 1, accum)
        assert count == expected, f"{n} batches, grad_accum {accum}: {count} optimizer steps"
    count, _ = _reward_run(tmp_path / "rm", 11, 4)  # 11 prompts: windows 4, 4, 3
    assert count == 3, f"reward, 11 batches, grad_accum 4: {count} optimizer steps"
    _, accumulated = _sft_run(tmp_path, "b2k2", 8, 2, 2)
    _, whole = _sft_run(tmp_path, "b4k1", 8, 4, 1)
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-5, msg=key)


# 3 ------------------------------------------------------------------------------------------
def test_packing_trains_no_target_across_example_boundaries(tiny_model_dir):
    """assistant_only_loss false: a packed row has the targets and loss of its examples."""
    from rlhf.algo.sft import n_targets, token_nll_sum
    from rlhf.tokens.packing import collate_packed, pack_rows

    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_causal_lm(tiny_model_dir).eval()
    rows = [
        encode_sft(
            tok,
            [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": "An answer " * (i + 1)},
            ],
            128,
            assistant_only=False,
        )
        for i in range(3)
    ]
    bins = pack_rows(rows, 512)
    assert len(bins) == 1 and len(bins[0]) == 3
    packed = collate_packed(bins, tok.pad_token_id)
    plain = pad_batch(
        [r["input_ids"] for r in rows], tok.pad_token_id, "right", [r["labels"] for r in rows]
    )
    assert int(n_targets(packed["labels"])) == int(n_targets(plain["labels"]))
    with torch.no_grad():
        p_logits = model(
            input_ids=packed["input_ids"],
            attention_mask=packed["attention_mask"],
            position_ids=packed["position_ids"],
        ).logits
        u_logits = model(
            input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]
        ).logits
    torch.testing.assert_close(
        token_nll_sum(p_logits, packed["labels"]),
        token_nll_sum(u_logits, plain["labels"]),
        rtol=1e-4,
        atol=1e-4,
    )


# 4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sharded", [True, False])
@pytest.mark.parametrize("n,world", [(5, 2), (7, 3), (4, 3), (6, 4), (1, 2), (8, 4)])
def test_sharded_evaluation_counts_each_prompt_once(n, world, sharded, monkeypatch):
    """Under ZeRO-3 / FSDP the ranks' shares are padded with repeated prompts (every rank runs
    as many forwards); the gathered evaluation must hold each prompt exactly once, in order."""
    from rlhf.infra import distributed

    monkeypatch.setattr(distributed, "is_sharded", lambda accelerator=None: sharded)
    shares = []
    for rank in range(world):
        acc = SimpleNamespace(process_index=rank, num_processes=world)
        shares.append(torch.tensor(distributed.rank_indices(n, acc), dtype=torch.float32))
    sent: dict[int, torch.Tensor] = {}

    class Ranks:  # all_gather: what every rank sends, concatenated in rank order
        num_processes = world

        def __init__(self, rank):
            self.process_index = rank

        def gather(self, tensor):
            sent[self.process_index] = tensor
            if len(sent) < world:  # first pass: record what each rank sends
                return torch.cat([tensor] * world)
            assert len({len(t) for t in sent.values()}) == 1, "all_gather needs equal sizes"
            return torch.cat([sent[r] for r in range(world)])

        gather_for_metrics = gather

    for rank in range(world):  # first pass: each rank sends its share
        distributed.gather_evaluated(Ranks(rank), shares[rank], n)
    for rank in range(world):
        got = distributed.gather_evaluated(Ranks(rank), shares[rank], n)
        assert got.tolist() == list(range(n)), f"rank {rank}: {got.tolist()}"


# 5 ------------------------------------------------------------------------------------------
def test_reward_scores_ignore_padding_on_absolute_position_models():
    """GPT-2 adds learned absolute position embeddings: left padding must not shift them."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        num_labels=1,
        pad_token_id=0,
    )
    model = GPT2ForSequenceClassification(config).eval()
    seq = torch.tensor([[5, 9, 13, 7, 22]])
    ones = torch.ones_like(seq)
    pad = torch.zeros((1, 3), dtype=torch.long)
    left = (torch.cat([pad, seq], 1), torch.cat([pad, ones], 1))
    right = (torch.cat([seq, pad], 1), torch.cat([ones, pad], 1))
    with torch.no_grad():
        plain = models.sequence_scores(model, seq, ones)
        for ids, mask in (left, right):
            torch.testing.assert_close(
                models.sequence_scores(model, ids, mask), plain, rtol=1e-5, atol=1e-5
            )
    assert positions_from_mask(left[1]).tolist() == [[0, 0, 0, 0, 1, 2, 3, 4]]


def test_an_optimizer_over_matrices_only_has_no_empty_group():
    """LoRA alone (GRPO, no value head) trains no bias or norm. An empty no-decay group was
    dropped by ZeRO-3's optimizer, and the LR scheduler then stepped two groups against one
    (SmolLM2 PPO on 2 ZeRO-3 CPU ranks: "zip() argument 2 is longer than argument 1")."""
    from rlhf.infra.training import make_optimizer, make_scheduler
    from rlhf.recipe import OptimConfig

    matrices = torch.nn.Sequential(
        torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False)
    )
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    optimizer = make_optimizer(matrices, cfg)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert len(optimizer.param_groups[0]["params"]) == 2
    with_bias = make_optimizer(torch.nn.Linear(4, 3), cfg)
    assert [g["weight_decay"] for g in with_bias.param_groups] == [0.1, 0.0]
    scheduler = make_scheduler(optimizer, cfg, total_steps=4)
    optimizer.step()
    scheduler.step()
    assert len(scheduler.get_last_lr()) == 1
