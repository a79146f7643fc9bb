"""Reward model: Bradley-Terry loss, ranking batching and normalisation, pooling, metrics, stage."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from rlhf import accel
from rlhf.algo import ranking as ranking_loss
from rlhf.data.types import Ranking
from rlhf.roles import models
from rlhf.roles import reward_model as rm

USER = [{"role": "user", "content": "Name a colour."}]


def ranking(k: int, prompt: str = "Name a colour.") -> Ranking:
    """K responses whose human order is 0 (best), 1, ..., K-1."""
    return Ranking(
        [{"role": "user", "content": prompt}], [f"answer {i}" for i in range(k)], list(range(k))
    )


def fake_row(k: int) -> dict:
    """An encoded ranking without a tokenizer: K one-token sequences, best first."""
    r = ranking(k)
    return {"seqs": [[i + 1] for i in range(k)], "pairs": r.pairs(), "ranking": r.ranking}


# ------------------------------------------------------------------------------------ the loss


def test_loss_gradient_pushes_better_up_and_worse_down():
    scores = torch.tensor([0.0, 0.0], requires_grad=True)
    batch = rm.collate_rankings([fake_row(2)], pad_id=0)
    ranking_loss.batch_loss(scores, batch).backward()
    # d/dr_b of -log sigmoid(r_b - r_w) at 0 = -(1 - sigmoid(0)) = -0.5
    assert scores.grad.tolist() == pytest.approx([-0.5, 0.5])


def test_center_term_is_squared_mean_reward_of_the_prompt():
    scores = torch.tensor([3.0, 1.0])
    batch = rm.collate_rankings([fake_row(2)], pad_id=0)
    plain = ranking_loss.batch_loss(scores, batch)
    centred = ranking_loss.batch_loss(scores, batch, center_coef=0.1)
    # log(1 + e^-2) = 0.126928; mean reward 2 -> 0.1 * 2^2 = 0.4
    assert plain.item() == pytest.approx(0.126928, abs=1e-6)
    assert centred.item() - plain.item() == pytest.approx(0.4, abs=1e-6)


# ---------------------------------------------------------------- rankings, batching, weights


def test_ranking_of_four_gives_six_pairs_in_one_batch():
    r = ranking(4)
    assert r.num_pairs == 6 and len(r.pairs()) == 6
    assert set(r.pairs()) == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    batch = rm.collate_rankings([fake_row(4), fake_row(2)], pad_id=0)
    # One row per RESPONSE (4 + 2), not two per pair (2 * 7).
    assert batch["input_ids"].shape[0] == 6
    assert batch["better"].shape[0] == batch["worse"].shape[0] == 7
    assert batch["pair_prompt"].tolist() == [0] * 6 + [1]
    assert batch["row_prompt"].tolist() == [0, 0, 0, 0, 1, 1]
    # The second prompt's pair indexes its own rows (offset 4).
    assert (batch["better"][-1].item(), batch["worse"][-1].item()) == (4, 5)


def test_each_response_is_scored_once_per_batch(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_reward_model(tiny_model_dir)
    rows_seen = []
    hook = model.model.register_forward_pre_hook(
        lambda m, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    rows = [rm.encode_ranking(tok, ranking(k, f"prompt {k}"), 64) for k in (4, 3, 2)]
    batch = rm.collate_rankings(rows, tok.pad_token_id)
    scores = rm.RewardScorer(model)(batch["input_ids"], batch["attention_mask"])
    loss = ranking_loss.batch_loss(scores, batch)
    loss.backward()
    hook.remove()
    assert rows_seen == [4 + 3 + 2]  # one forward, one row per response
    assert batch["better"].numel() == 6 + 3 + 1


def test_shared_prefix_length_leaves_each_response_a_token():
    assert rm.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert rm.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical: last token stays
    assert rm.shared_prefix_length([[7, 1], [8, 1]]) == 0


def _prefix_rankings(tok, sizes=((1, 4), (3, 3), (6, 2)), max_length=128):
    """Prompts of different lengths with responses of different lengths."""
    return [
        rm.encode_ranking(
            tok,
            Ranking(
                [{"role": "user", "content": " ".join(f"w{j}" for j in range(4 * n))}],
                [f"answer {'x ' * (i * n)}{i}" for i in range(k)],
                list(range(k)),
            ),
            max_length,
        )
        for n, k in sizes
    ]


def test_a_batch_without_a_shared_prefix_stays_flat(tiny_model_dir):
    """Responses truncated from the left (long prompt) may share no first token: flat batch."""
    tok = models.load_tokenizer(tiny_model_dir)
    rows = _prefix_rankings(tok, ((1, 4), (12, 3)), max_length=48)
    assert any(len(s) == 48 for r in rows for s in r["seqs"])
    assert rm.shared_prefix_length(rows[1]["seqs"]) == 0
    batch = rm.collate_rankings(rows, tok.pad_token_id, share_prefix=True)
    assert "prefix_ids" not in batch
    assert torch.equal(batch["input_ids"], rm.collate_rankings(rows, tok.pad_token_id)["input_ids"])


@pytest.mark.parametrize("lora", [False, True])
def test_prefix_shared_scores_and_gradients_equal_the_flat_forward(tiny_model_dir, lora):
    from rlhf.recipe import LoraConfig

    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_reward_model(tiny_model_dir)
    if lora:
        model = models.apply_lora(model, LoraConfig(enabled=True, r=4), "SEQ_CLS")
    rows = _prefix_rankings(tok)
    flat = rm.collate_rankings(rows, tok.pad_token_id)
    shared = rm.collate_rankings(rows, tok.pad_token_id, share_prefix=True)
    assert "prefix_ids" in shared and "prefix_ids" not in flat
    assert shared["input_ids"].numel() + shared["prefix_ids"].numel() < flat["input_ids"].numel()
    scorer = rm.RewardScorer(model)
    grads = []
    for batch in (flat, shared):
        scorer.zero_grad()
        scores = scorer(**rm.scorer_inputs(batch))
        ranking_loss.batch_loss(scores, batch).backward()
        grads.append(
            {n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None}
        )
        if batch is flat:
            flat_scores = scores.detach()
    torch.testing.assert_close(scores.detach(), flat_scores, rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5)
    # evaluation batches the same way, in its own order
    got = rm.score_rankings(scorer, rows, 3, tok.pad_token_id, share_prefix=True)
    want = rm.score_rankings(scorer, rows, 3, tok.pad_token_id)
    assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-4)


def test_k9_prompt_weighs_the_same_as_a_k2_prompt():
    """InstructGPT's 1/C(K,2): a prompt's loss is the mean over its pairs."""
    # K=9 prompt: every pair has margin 2 -> each pair loss log(1 + e^-2).
    k9 = torch.tensor([float(8 - i) * 2 for i in range(9)])  # 16, 14, ..., 0: adjacent gap 2
    batch9 = rm.collate_rankings([fake_row(9)], pad_id=0)
    per_pair = ranking_loss.bradley_terry_loss(k9[batch9["better"]], k9[batch9["worse"]])
    assert batch9["better"].numel() == 36
    assert ranking_loss.batch_loss(k9, batch9).item() == pytest.approx(
        per_pair.mean().item(), rel=1e-6
    )

    # A K=9 prompt next to a K=2 prompt: each is half of the batch loss, not 36/37 and 1/37.
    k2 = torch.tensor([0.0, 0.0])
    both = rm.collate_rankings([fake_row(9), fake_row(2)], pad_id=0)
    expected = 0.5 * per_pair.mean().item() + 0.5 * math.log(2.0)
    assert ranking_loss.batch_loss(torch.cat([k9, k2]), both).item() == pytest.approx(
        expected, rel=1e-6
    )

    # One K=9 prompt beside nine K=2 prompts is 1 of 10 prompts (weight 1/10), although it
    # brings 36 of the 45 pairs: (L9 + 9 L2) / 10, not (36 L9 + 9 L2) / 45 (pair weighting).
    batch = rm.collate_rankings([fake_row(9)] + [fake_row(2)] * 9, pad_id=0)
    loss = ranking_loss.batch_loss(torch.cat([k9, torch.zeros(18)]), batch).item()
    assert loss == pytest.approx((per_pair.mean().item() + 9 * math.log(2.0)) / 10, rel=1e-6)
    pair_weighted = (per_pair.sum().item() + 9 * math.log(2.0)) / 45
    assert abs(loss - pair_weighted) > 0.1


def test_prompt_losses_split_across_micro_batches_add_up():
    """Summed per-prompt losses / total prompts is the same however the prompts are split."""
    torch.manual_seed(0)
    rows = [fake_row(k) for k in (2, 5, 3, 4)]
    scores = [torch.randn(len(r["seqs"])) for r in rows]
    whole = ranking_loss.batch_loss(torch.cat(scores), rm.collate_rankings(rows, 0))
    parts = sum(
        ranking_loss.prompt_losses(
            torch.cat(scores[i : i + 2]), rm.collate_rankings(rows[i : i + 2], 0)
        ).sum()
        for i in (0, 2)
    )
    assert (parts / 4).item() == pytest.approx(whole.item(), rel=1e-6)


# ------------------------------------------------------------------------------------ pooling


def test_last_token_index_with_and_without_padding():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert models.last_token_index(mask).tolist() == [1, 3, 3]


def test_scores_are_the_same_with_left_and_right_padding(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_reward_model(tiny_model_dir).eval()
    rows = [rm.encode_ranking(tok, ranking(3, "a much longer prompt " * 5), 128)]
    rows.append(rm.encode_ranking(tok, ranking(2, "short"), 128))
    seqs = [s for r in rows for s in r["seqs"]]
    assert len({len(s) for s in seqs}) > 1  # there is padding to do
    scorer = rm.RewardScorer(model)
    with torch.no_grad():
        right = scorer(**rm.pad_batch(seqs, tok.pad_token_id, "right"))
        left = scorer(**rm.pad_batch(seqs, tok.pad_token_id, "left"))
        alone = torch.cat([scorer(**rm.pad_batch([s], tok.pad_token_id)) for s in seqs])
    assert torch.allclose(left, right, atol=1e-5)
    assert torch.allclose(alone, right, atol=1e-5)
    # With pad_token_id set (pad != eos), transformers' own pooling agrees on right padding.
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        own = model(**rm.pad_batch(seqs, tok.pad_token_id, "right")).logits[:, 0]
    assert torch.allclose(own, right, atol=1e-5)


def test_lora_seq_cls_keeps_the_score_head_trainable(tiny_model_dir):
    from rlhf.recipe import LoraConfig

    model = models.load_reward_model(tiny_model_dir)
    model = models.prepare_for_training(model, LoraConfig(enabled=True, r=4), False, "SEQ_CLS")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert models.score_head(models.unwrap_peft(model)) is not None


# ------------------------------------------------------------------------------------ metrics


def test_calibration_scores_each_sampled_response_once_sharing_its_prompts_prefix(
    tiny_model_dir,
):
    """The stage's calibration: the seeded sample of training responses, each scored once, the
    sampled responses of a prompt together with their common prefix run once; the mean/std of
    scoring each sampled sequence on its own, flat."""
    import random
    from types import SimpleNamespace

    from accelerate import Accelerator

    from rlhf.stages.reward import calibrate
    from rlhf.tokens.chat import pad_batch

    tok = models.load_tokenizer(tiny_model_dir)
    rows = _prefix_rankings(tok, ((1, 4), (3, 3), (6, 2), (2, 4)))
    scorer = rm.RewardScorer(models.load_reward_model(tiny_model_dir)).eval()
    calls = []
    forward = scorer.forward
    scorer.forward = lambda **kw: calls.append(sorted(kw)) or forward(**kw)
    cfg = SimpleNamespace(calibration_size=9, batch_size=1, share_prefix=True,
                          gradient_checkpointing=False)  # fmt: skip
    with torch.no_grad():
        got = calibrate(scorer, rows, cfg, tok.pad_token_id, 7, Accelerator(cpu=True))
    del scorer.forward  # the class's again
    flat = [s for row in rows for s in row["seqs"]]  # 13 sequences, the sample picks 9
    picked = random.Random(7).sample(range(len(flat)), 9)
    with torch.no_grad():  # each picked sequence alone, unpadded
        alone = [scorer(**rm.scorer_inputs(pad_batch([flat[i]], tok.pad_token_id))).item()
                 for i in picked]  # fmt: skip
    assert got["n"] == 9
    assert got["mean"] == pytest.approx(sum(alone) / 9, abs=1e-5)
    assert got["std"] == pytest.approx(torch.tensor(alone).std(unbiased=False).item(), abs=1e-5)
    # one forward per 2 prompts (2 x batch_size) that have a sampled response, with prefixes
    prompt_of = [p for p, row in enumerate(rows) for _ in row["seqs"]]
    prompts = len({prompt_of[i] for i in picked})
    assert len(calls) == -(-prompts // 2) and all("prefix_ids" in kw for kw in calls)


def test_kendall_tau_on_known_permutations():
    order = [0, 1, 2, 3]
    assert rm.kendall_tau([4.0, 3.0, 2.0, 1.0], order) == 1.0
    assert rm.kendall_tau([1.0, 2.0, 3.0, 4.0], order) == -1.0
    # One adjacent swap: 5 concordant, 1 discordant of 6 -> 4/6.
    assert rm.kendall_tau([4.0, 2.0, 3.0, 1.0], order) == pytest.approx(2 / 3)
    # The human order is a permutation of indices: response 2 best, then 0, then 1.
    assert rm.kendall_tau([5.0, 1.0, 9.0], [2, 0, 1]) == 1.0
    # A tie is neither concordant nor discordant: (2 - 0) / 3.
    assert rm.kendall_tau([1.0, 1.0, 0.0], [0, 1, 2]) == pytest.approx(2 / 3)


def test_ranking_metrics():
    rows = [fake_row(2), fake_row(2), fake_row(3)]
    scores = [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0, 2.0]]
    m = rm.ranking_metrics(scores, [r["pairs"] for r in rows], [r["ranking"] for r in rows])
    # pairs: right, tie (half), then three wrong -> 1.5 / 5
    assert m["accuracy"] == pytest.approx(0.3)
    assert m["n_pairs"] == 5 and m["n_prompts"] == 3
    assert m["mean_margin"] == pytest.approx((1 + 0 - 1 - 2 - 1) / 5)
    # loss: per prompt mean of -log sigmoid(d), then mean over prompts
    nls = [math.log1p(math.exp(-d)) for d in (1.0, 0.0, -1.0, -2.0, -1.0)]
    assert m["loss"] == pytest.approx((nls[0] + nls[1] + sum(nls[2:]) / 3) / 3)
    assert m["kendall_tau"] == -1.0 and m["top1"] == 0.0 and m["n_rankings"] == 1
    assert rm.top1_agreement([2.0, 2.0, 0.0], [0, 1, 2]) == 0.5
    pairs_only = rm.ranking_metrics([[1.0, 0.0]], [[(0, 1)]], [[0, 1]])
    assert "kendall_tau" not in pairs_only and pairs_only["accuracy"] == 1.0


def test_calibration_stats():
    c = rm.calibration([1.0, 3.0])
    assert c == {"mean": 2.0, "std": 1.0, "n": 2}


# --------------------------------------------------------------------------------- the stage


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def ranking_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        k = 2 + i % 3
        responses = [f"My answer {j} about item {i}: " + COLOURS[(i + j) % 8] for j in range(k)]
        rows.append(
            {
                "prompt": f"Question {i}: name a colour.",
                "responses": responses,
                "ranking": list(range(k))[::-1] if i % 2 else list(range(k)),
            }
        )
    return rows


@pytest.fixture
def tiny_reward_data(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ranking_rows(12))
    test = write_jsonl(tmp_path / "test.jsonl", ranking_rows(5, offset=100))
    pairs = write_jsonl(
        tmp_path / "extra_pairs.jsonl",
        [
            {"prompt": f"Say hi {i}", "chosen": "Hello there!", "rejected": "Go away."}
            for i in range(3)
        ],
    )
    return {"train": train, "test": test, "pairs": pairs}


# The other stages' shipped data is not needed here (and may not be built yet).
OTHER_STAGES_OFF = ["sft.train=null", "sft.eval=null", "ppo.prompts=null", "ppo.eval_prompts=null"]


def tiny_recipe(tmp_path, paths, *extra):
    from rlhf.recipe import load_recipe

    return load_recipe(
        "recipes/tiny.yaml",
        [
            *OTHER_STAGES_OFF,
            f"output_dir={tmp_path / 'run'}",
            "reward.init_from=tiny-llama",
            f"reward.train.path={paths['train']}",
            f"reward.eval.path={paths['test']}",
            f"reward.extra_eval=[{{path: {paths['pairs']}, format: pairs}}]",
            *extra,
        ],
    )


def test_reward_stage_end_to_end(tmp_path, tiny_reward_data, matmul_attention_backwards):
    from transformers import AutoModelForSequenceClassification

    from rlhf import cli
    from rlhf.stages import reward as stage

    run_dir = stage.run(tiny_recipe(tmp_path, tiny_reward_data))
    # its training steps differentiate attention through matmuls (rlhf.accel.apply.training),
    # unless RLHF_ACCEL=off forces the plain path over the recipe's `accel: auto`
    assert bool(matmul_attention_backwards) == (not accel.forced_off())
    assert run_dir == tmp_path / "run" / "reward"
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "eval.json", "COMPLETED", "tb"):
        assert (run_dir / name).exists(), name
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["train_prompts"] == 12
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["stage"] == "reward" for m in metrics)
    train_steps = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train_steps] == [1, 2, 3, 4]
    assert all(m["train/prompts"] == 2 for m in train_steps)
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    assert "eval_extra_pairs/accuracy" in evals[-1] and "eval/kendall_tau" in evals[-1]

    result = json.loads((run_dir / "eval.json").read_text())
    assert result["n_prompts"] == 5 and result["n_pairs"] == 3 + 6 + 1 + 3 + 6  # K = 3, 4, 2, 3, 4
    assert 0.0 <= result["accuracy"] <= 1.0 and "kendall_tau" in result and "top1" in result
    assert result["extra_eval"]["extra_pairs"]["n_pairs"] == 3
    assert result["base_accuracy"] is not None and result["steps"] == 4

    # Calibration stored twice, and the saved model loads with plain transformers.
    model_dir = run_dir / "model"
    calib = json.loads((model_dir / "reward_calibration.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert config["reward_calibration"] == calib == result["calibration"]
    assert calib["n"] == 32 and calib["std"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == models.load_tokenizer(str(model_dir)).pad_token_id

    # `rlhf eval reward --json` on the held-out file reproduces the stage's final numbers.
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(
            [
                "eval",
                "reward",
                str(model_dir),
                tiny_reward_data["test"],
                "--format",
                "rankings",
                "--max-length",
                "128",
                "--json",
            ]
        )
    assert rc == 0
    printed = json.loads(buf.getvalue())
    assert printed["n_pairs"] == result["n_pairs"] and printed["n_prompts"] == 5
    assert printed["accuracy"] == pytest.approx(result["accuracy"])
    assert printed["kendall_tau"] == pytest.approx(result["kendall_tau"])
    assert printed["mean_margin"] == pytest.approx(result["mean_margin"], abs=1e-4)


def test_reward_stage_lora_saves_a_merged_model_with_the_trained_head(tmp_path, tiny_reward_data):
    from transformers import AutoModelForSequenceClassification

    from rlhf.stages import reward as stage

    recipe = tiny_recipe(
        tmp_path,
        tiny_reward_data,
        "reward.lora.enabled=true",
        "reward.lora.r=4",
        "reward.extra_eval=[]",
        "reward.max_steps=2",
    )
    run_dir = stage.run(recipe)
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert not list((run_dir / "model").glob("adapter_*"))
    initial = []
    for _ in range(2):  # the stage seeds the RNG (recipe.seed) right before loading the model
        torch.manual_seed(recipe.seed)
        initial.append(models.load_reward_model("tiny-llama").score.weight)
    assert torch.equal(initial[0], initial[1])
    assert not torch.equal(model.score.weight, initial[0])  # the head was trained and saved


def test_default_init_requires_a_completed_sft_run(tmp_path, tiny_reward_data):
    from rlhf.infra.errors import UserError
    from rlhf.recipe import load_recipe
    from rlhf.stages import reward as stage

    recipe = load_recipe(
        "recipes/tiny.yaml",
        [
            *OTHER_STAGES_OFF,
            f"output_dir={tmp_path}",
            f"reward.train.path={tiny_reward_data['train']}",
            f"reward.eval.path={tiny_reward_data['test']}",
        ],
    )
    with pytest.raises(UserError, match="sft run"):
        stage.run(recipe)
    (tmp_path / "sft").mkdir()
    with pytest.raises(UserError, match="COMPLETED"):
        stage.run(recipe)


def test_source_name_for_metric_keys():
    from rlhf.recipe import DataSource
    from rlhf.stages.reward import source_name

    assert (
        source_name(DataSource.model_construct(path="../x/oasst_en_trees.jsonl"))
        == "oasst_en_trees"
    )
    assert source_name(DataSource.model_construct(path="a/hh-pairs.jsonl.gz")) == "hh_pairs"
    assert source_name(DataSource.model_construct(path="Anthropic/hh-rlhf")) == "hh_rlhf"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


SAME_STEP = ["reward.extra_eval=[]", "reward.max_steps=3", "reward.eval_every=100"]


def assert_same_training(a: Path, b: Path) -> None:
    """Same loss and gradient norm (before clipping) at every step, and the same weights.

    The gradient norm is what catches a normalisation slip (Adam hides a constant factor in the
    weights); the weights only differ by Adam-amplified float noise from different padding.
    """
    rows = [
        [
            m
            for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in m
        ]
        for d in (a, b)
    ]
    assert len(rows[0]) == len(rows[1]) == 3
    for x, y in zip(*rows):
        assert x["train/prompts"] == y["train/prompts"] == 2
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5)
        assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], rel=1e-4)
    assert _max_diff(_weights(a), _weights(b)) < 1e-4  # lr 1e-3: an update is ~1e-3


def test_grad_accum_two_of_one_prompt_equals_a_batch_of_two(tmp_path, tiny_reward_data):
    """The loss is normalised by the prompts of the whole optimizer step, not per micro-batch."""
    from rlhf.stages import reward as stage

    big = stage.run(
        tiny_recipe(tmp_path / "a", tiny_reward_data, *SAME_STEP, "reward.batch_size=2")
    )
    accum = stage.run(
        tiny_recipe(
            tmp_path / "b",
            tiny_reward_data,
            *SAME_STEP,
            "reward.batch_size=1",
            "reward.grad_accum=2",
        )
    )
    assert_same_training(big, accum)
    a, b = (json.loads((d / "eval.json").read_text()) for d in (big, accum))
    assert a["accuracy"] == b["accuracy"]
    assert a["mean_margin"] == pytest.approx(b["mean_margin"], abs=1e-5)


@pytest.mark.multiprocess
def test_two_ranks_of_one_prompt_equal_one_rank_of_two(tmp_path, tiny_reward_data):
    import os
    import socket
    import subprocess
    import sys

    from rlhf.stages import reward as stage

    one = stage.run(
        tiny_recipe(tmp_path / "one", tiny_reward_data, *SAME_STEP, "reward.batch_size=2")
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [
        *OTHER_STAGES_OFF,
        f"output_dir={tmp_path / 'two'}",
        "reward.init_from=tiny-llama",
        f"reward.train.path={tiny_reward_data['train']}",
        f"reward.eval.path={tiny_reward_data['test']}",
        *SAME_STEP,
        "reward.batch_size=1",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["ACCELERATE_USE_CPU"] = "true"
    launcher = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [
            str(launcher),
            "launch",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            "-m",
            "rlhf.cli",
            "reward",
            "recipes/tiny.yaml",
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "reward"
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert_same_training(one, two)
    a, b = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert a["n_pairs"] == b["n_pairs"] and a["accuracy"] == b["accuracy"]
    assert a["calibration"]["n"] == b["calibration"]["n"]
    assert a["calibration"]["mean"] == pytest.approx(b["calibration"]["mean"], abs=1e-4)


def test_scores_under_bf16_autocast_are_not_rounded_to_bf16(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_reward_model(tiny_model_dir).eval()
    seqs = rm.encode_ranking(tok, ranking(4), 64)["seqs"]
    batch = rm.pad_batch(seqs, tok.pad_token_id)
    scorer = rm.RewardScorer(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer(**batch)
    assert scores.dtype == torch.float32
    assert not torch.equal(scores, scores.to(torch.bfloat16).float())  # more than 8 bits


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path, tiny_reward_data):
    from rlhf.stages import reward as stage

    args = [*SAME_STEP, "reward.max_steps=4", "reward.save_every=2"]
    straight = stage.run(tiny_recipe(tmp_path / "a", tiny_reward_data, *args))
    assert (straight / "checkpoints" / "step-000002" / "VALID").is_file()
    # Pretend the run died after step 2: only the checkpoint remains, then resume.
    resumed_dir = tmp_path / "b" / "run" / "reward"
    stage.run(tiny_recipe(tmp_path / "b", tiny_reward_data, *args))
    for name in ("COMPLETED", "eval.json"):
        (resumed_dir / name).unlink()
    import shutil

    shutil.rmtree(resumed_dir / "model")
    stage.run(tiny_recipe(tmp_path / "b", tiny_reward_data, *args), resume=True)
    assert (resumed_dir / "COMPLETED").is_file()
    assert _max_diff(_weights(straight), _weights(resumed_dir)) < 1e-6
    steps = [
        m["step"]
        for m in map(json.loads, (resumed_dir / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in m
    ]
    # The rows the first run wrote after the checkpoint are dropped, then recomputed.
    assert steps == [1, 2, 3, 4]
    rows = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    loss = lambda rs: [r["train/loss"] for r in rs if "train/loss" in r]  # noqa: E731
    assert loss(rows) == pytest.approx(loss(first), abs=1e-6)


def test_score_rankings_returns_scores_in_input_order():
    rows = [
        {"seqs": [[1] * n for n in lengths], "pairs": [(0, 1)], "ranking": [0, 1]}
        for lengths in ([9, 2], [1, 1], [5, 7])
    ]

    def fn(input_ids, attention_mask):  # score = length of the row
        return attention_mask.sum(dim=1).float()

    assert rm.score_rankings(fn, rows, 2, 0) == [[9.0, 2.0], [1.0, 1.0], [5.0, 7.0]]


def test_reward_halves_are_disjoint_by_prompt_and_cover_everything():
    from types import SimpleNamespace

    from rlhf.stages.reward import half_of

    items = [SimpleNamespace(prompt=f"question {i % 10}", id=i) for i in range(40)]
    first, second = half_of(items, "first_half"), half_of(items, "second_half")
    prompts = lambda rows: {r.prompt for r in rows}  # noqa: E731
    assert prompts(first) and prompts(second) and not prompts(first) & prompts(second)
    assert sorted(r.id for r in first + second) == list(range(40))
    assert half_of(items, "all") == items
    assert half_of(items, "first_half") == first  # deterministic


def test_judge_recipe_takes_the_other_half_and_another_seed():
    from rlhf.recipe import load_recipe
    from rlhf.stages.judge import judge_recipe

    recipe = load_recipe("recipes/smollm2-135m.yaml", ["seed=7"])
    assert recipe.reward.subset == "first_half" and recipe.judge is not None
    judge = judge_recipe(recipe)
    assert (judge.seed, judge.reward.subset) == (8, "second_half")
    assert (recipe.seed, recipe.reward.subset) == (7, "first_half")  # the original untouched
    custom = judge_recipe(
        load_recipe("recipes/smollm2-135m.yaml", ["judge.seed_offset=5", "judge.subset=all"])
    )
    assert (custom.seed, custom.reward.subset) == (47, "all")


def test_judge_refuses_to_train_on_the_reward_models_prompts_unless_allowed(tmp_path, capsys):
    """The tiny recipe's reward model trains on all rankings and its judge on the second half,
    so every judge prompt is one of the reward model's. `rlhf judge` refuses that in one line (exit 2, no
    run folder) unless judge.allow_prompt_overlap says so, as recipes/tiny.yaml does; the
    default recipe's disjoint halves pass."""
    from rlhf.cli import main
    from rlhf.recipe import load_recipe
    from rlhf.stages.judge import check_independent

    args = ["judge", "recipes/tiny.yaml", f"output_dir={tmp_path}"]
    assert main([*args, "judge.allow_prompt_overlap=false"]) == 2
    err = capsys.readouterr().err
    found = re.search(r"trains on (\d+) of the reward model's (\d+) training prompts", err)
    rows = Path("reward_data/rankings/train.jsonl").read_text().splitlines()
    n_prompts = len({json.loads(row)["prompt"] for row in rows})
    assert err.count("\n") == 1 and found, err
    assert int(found[2]) == n_prompts and 0 < int(found[1]) < n_prompts
    assert "judge.allow_prompt_overlap: true" in err and "Traceback" not in err
    assert not (tmp_path / "judge").exists()
    check_independent(load_recipe("recipes/tiny.yaml", []))  # allowed explicitly
    check_independent(load_recipe("recipes/smollm2-135m.yaml", []))  # disjoint halves
