"""Every training loss of rlhf.algo outside PPO, pinned by values computed by hand:
SFT cross-entropy (algo/sft.py), Bradley-Terry and the K-way ranking loss (algo/ranking.py),
DPO and its variants (algo/dpo.py), those also against TRL's DPOTrainer on the same log-probs
(and in tests/test_dpo.py on a model). PPO/GRPO's are in tests/ppo/."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algo import dpo, ranking, sft

LOG2 = math.log(2.0)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), by the definition."""
    return math.log(1.0 + math.exp(x))


# ------------------------------------------------------------------------------------ SFT


def sft_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 4 tokens over a 2-token vocabulary. Row 0: position 0's logits (0, 0)
    give p = 1/2 to label 1 (-log = log 2); position 1's (ln 3, 0) give p = 3/4 to label 0
    (-log = log 4/3); position 2 predicts an ignored label; position 3 predicts nothing (NaN
    logits there must not matter). Row 1 has no labelled token."""
    ign, nan = sft.IGNORE_INDEX, float("nan")
    logits = torch.tensor(
        [
            [[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0], [nan, nan]],
            [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [nan, nan]],
        ]
    )
    labels = torch.tensor([[7, 1, 0, ign], [ign, ign, ign, ign]])
    return logits, labels


def test_sft_loss_is_the_summed_nll_of_the_labelled_next_tokens():
    logits, labels = sft_batch()
    want = LOG2 + math.log(4.0 / 3.0)  # 0.693147 + 0.287682 = 0.980829
    assert sft.token_nll_sum(logits, labels).item() == pytest.approx(want, abs=1e-6)
    assert int(sft.n_targets(labels)) == 2


def test_sft_per_target_nll_and_sum_agree_by_hand():
    targets = torch.tensor([1, 0, sft.IGNORE_INDEX])
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]])
    per = sft.nll_per_target(logits, targets)
    assert per.tolist() == pytest.approx([LOG2, math.log(4.0 / 3.0), 0.0], abs=1e-6)
    assert sft.nll_sum(logits, targets).item() == pytest.approx(per.sum().item(), abs=1e-6)


def test_sft_loss_gradient_is_softmax_minus_one_hot_on_labelled_positions():
    logits, labels = sft_batch()
    logits = logits.nan_to_num(0.0).requires_grad_()
    sft.token_nll_sum(logits, labels).backward()
    # d(-log softmax(z)[y])/dz = softmax(z) - onehot(y): (1/2 - 0, 1/2 - 1) and (3/4 - 1, 1/4).
    assert logits.grad[0, 0].tolist() == pytest.approx([0.5, -0.5], abs=1e-6)
    assert logits.grad[0, 1].tolist() == pytest.approx([-0.25, 0.25], abs=1e-6)
    assert logits.grad[0, 2:].abs().sum().item() == 0.0 and logits.grad[1].abs().sum() == 0.0


# ------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_loss_hand_computed():
    better, worse = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.5, 2.0, 1.0])
    # -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413; -log sigmoid(-1.5) = 1.701413;
    # -log sigmoid(0) = log 2 = 0.693147.
    got = ranking.bradley_terry_loss(better, worse)
    assert torch.allclose(got, torch.tensor([0.201413, 1.701413, 0.693147]), atol=1e-6)
    # margin 1: -log sigmoid(1.5 - 1) = log(1 + e^-0.5) = 0.474077
    assert ranking.bradley_terry_loss(better[:1], worse[:1], margin=1.0).item() == pytest.approx(
        0.474077, abs=1e-6
    )


# ---------------------------------------------------------------------- K-way ranking


def two_prompts() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prompt 0 ranks 3 responses, scored 2, 1, 0 (best first): pairs (0,1), (0,2), (1,2) with
    gaps 1, 2, 1. Prompt 1 ranks 2 responses, both scored 0."""
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0])
    batch = {
        "better": torch.tensor([0, 0, 1, 3]),
        "worse": torch.tensor([1, 2, 2, 4]),
        "pair_prompt": torch.tensor([0, 0, 0, 1]),
        "row_prompt": torch.tensor([0, 0, 0, 1, 1]),
        "n_prompts": torch.tensor(2),
    }
    return scores, batch


def test_ranking_loss_is_the_mean_over_a_prompts_pairs_then_over_prompts():
    scores, batch = two_prompts()
    # prompt 0: (log(1+e^-1) + log(1+e^-2) + log(1+e^-1)) / C(3,2)
    #         = (0.313262 + 0.126928 + 0.313262) / 3 = 0.251151; prompt 1: log 2 = 0.693147
    k3 = (2 * softplus(-1.0) + softplus(-2.0)) / 3
    got = ranking.prompt_losses(scores, batch)
    assert got.tolist() == pytest.approx([k3, LOG2], abs=1e-6)
    assert k3 == pytest.approx(0.251151, abs=1e-6)
    # Each prompt weighs 1/2, although prompt 0 brings 3 of the 4 pairs.
    assert ranking.batch_loss(scores, batch).item() == pytest.approx((k3 + LOG2) / 2, abs=1e-6)


def test_ranking_loss_margin_and_centring_term():
    scores, batch = two_prompts()
    # margin 1: the gaps become 0, 1, 0 -> (2 log 2 + log(1 + e^-1)) / 3; prompt 1: log(1 + e)
    got = ranking.prompt_losses(scores, batch, margin=1.0)
    want = [(2 * LOG2 + softplus(-1.0)) / 3, softplus(1.0)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    # centring 0.1: + 0.1 * (mean score)^2 = 0.1 * 1^2 for prompt 0, 0 for prompt 1
    plain = ranking.prompt_losses(scores, batch)
    centred = ranking.prompt_losses(scores, batch, center_coef=0.1)
    assert (centred - plain).tolist() == pytest.approx([0.1, 0.0], abs=1e-6)


def test_segment_mean_gives_zero_for_an_empty_group():
    got = ranking.segment_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
    assert got.tolist() == [2.0, 0.0, 5.0]


# ------------------------------------------------------------------------------------- DPO


def test_dpo_sigmoid_loss_by_hand():
    # delta = (-1 - -2) - (-3 - -2.5) = 1.5; beta 0.5 -> -log sigmoid(0.75) = log(1 + e^-0.75)
    delta = (torch.tensor([-1.0, -4.0]) - torch.tensor([-2.0, -7.0])) - (
        torch.tensor([-3.0, -4.0]) - torch.tensor([-2.5, -7.0])
    )
    got = dpo.sigmoid_loss(delta, beta=0.5)
    # the second pair: policy and reference agree on both answers -> log 2
    assert got.tolist() == pytest.approx([softplus(-0.75), LOG2], rel=1e-6)


def test_dpo_variants_by_hand():
    delta = torch.tensor([1.5, 3.0])
    # conservative DPO, eps 0.1: 0.9 log(1 + e^-0.75) + 0.1 log(1 + e^0.75)
    #   = 0.9 * 0.386871 + 0.1 * 1.136871 = 0.461871
    assert dpo.sigmoid_loss(delta[:1], 0.5, 0.1).item() == pytest.approx(0.461871, abs=1e-6)
    # robust, eps 0.1: (0.9 * 0.386871 - 0.1 * 1.136871) / 0.8 = 0.293121
    assert dpo.robust_loss(delta[:1], 0.5, 0.1).item() == pytest.approx(0.293121, abs=1e-6)
    # hinge: max(0, 1 - 0.75) = 0.25; max(0, 1 - 1.5) = 0
    assert dpo.hinge_loss(delta, 0.5).tolist() == pytest.approx([0.25, 0.0], abs=1e-7)
    # IPO, beta 0.5 (target 1 / (2 beta) = 1): (1.5 - 1)^2 = 0.25, (3 - 1)^2 = 4
    assert dpo.ipo_loss(delta, 0.5).tolist() == pytest.approx([0.25, 4.0], abs=1e-7)


def test_dpo_ipo_averages_each_log_ratio_over_its_response_tokens():
    batch = {
        "better": torch.tensor([0]),
        "worse": torch.tensor([1]),
        "response_tokens": torch.tensor([4, 1]),
    }
    # log-ratios 1 and -0.5 over 4 and 1 tokens: delta = 0.25 + 0.5 = 0.75 -> (0.75 - 1)^2
    got = dpo.pair_losses(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5]), batch, 0.5, "ipo")
    assert got.tolist() == pytest.approx([0.0625], abs=1e-7)


def test_dpo_ranking_pairs_index_each_responses_logprob():
    policy = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.5, -2.0])
    batch = {"better": torch.tensor([0, 0]), "worse": torch.tensor([1, 2])}
    got = dpo.pair_losses(policy, ref, batch, beta=0.5)
    # (0, 1): margin (1) - (-0.5) = 1.5 -> log(1 + e^-0.75) = 0.386871
    # (0, 2): margin (1) - (0) = 1 -> log(1 + e^-0.5) = 0.474077
    assert got.tolist() == pytest.approx([0.386871, 0.474077], abs=1e-6)
    got.sum().backward()
    # d/dlogp_c of -log sigmoid(beta m) = -beta sigmoid(-beta m), summed over response 0's pairs
    s1, s2 = 1 / (1 + math.exp(0.75)), 1 / (1 + math.exp(0.5))
    assert policy.grad.tolist() == pytest.approx([-0.5 * (s1 + s2), 0.5 * s1, 0.5 * s2], abs=1e-6)


def trl_dpo_loss(
    policy: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor, loss_type: str, **config
) -> float:
    """TRL's DPOTrainer loss (its `_compute_loss`) on given summed log-probs: chosen rows
    then rejected rows, as its collator stacks them. The model is a stand-in that returns
    per-token log-probs summing to `policy` over `tokens` completion tokens per row."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    rows, width = len(policy), int(tokens.max()) + 1
    completion = (torch.arange(width)[None] >= width - tokens[:, None]).long()
    per_token = completion[:, 1:] * (policy / tokens)[:, None]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    trainer = object.__new__(DPOTrainer)  # the loss alone: no model, no data
    same = lambda x: x  # noqa: E731
    vars(trainer).update(
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        use_weighting=False,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics=defaultdict(lambda: defaultdict(list)),
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather=same, gather_for_metrics=same),
    )
    vars(trainer).update(config)
    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref[: rows // 2],
        "ref_rejected_logps": ref[rows // 2 :],
    }
    return trainer._compute_loss(lambda **kw: outputs, inputs, False).item()


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_dpo_losses_equal_trls_on_the_same_log_probs(loss_type):
    # three pairs: responses 0-2 chosen, 3-5 rejected, of 3, 1, 2, 2, 3, 1 completion tokens
    policy = torch.tensor([-4.0, -1.5, -2.0, -6.0, -3.5, -0.5])
    ref = torch.tensor([-5.0, -1.0, -2.5, -5.0, -4.0, -1.5])
    tokens = torch.tensor([3, 1, 2, 2, 3, 1])
    batch = {"better": torch.arange(3), "worse": torch.arange(3, 6), "response_tokens": tokens}
    smoothing = 0.2 if loss_type == "robust" else 0.0
    ours = dpo.pair_losses(policy, ref, batch, 0.3, loss_type, smoothing).mean().item()
    theirs = trl_dpo_loss(policy, ref, tokens, loss_type, beta=0.3, label_smoothing=smoothing)
    assert abs(ours - math.log(2.0)) > 1e-3  # not the trivial value at delta = 0
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7)
