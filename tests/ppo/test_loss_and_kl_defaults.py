"""PPO defaults that used to weigh or log something other than what they said: the token mean
over a whole mini-batch, the KL estimator in the loss, and an adaptive KL that can act."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rlhf.algo.ppo import aggregate_loss
from rlhf.cli import main
from rlhf.infra.errors import UserError
from rlhf.infra.runtime import make_accelerator
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.update import ppo_update
from rlhf.recipe import PPOConfig, Recipe, load_recipe
from rlhf.roles.actor_critic import ActorCritic
from rlhf.stages.ppo import kl_controller
from tests.ppo.tiny_policy import small_vocab_policy

# ------------------------------------------------------------- token mean over micro-batches

# Two answers: row 0 has 3 real tokens (per-token losses 1, 2, 3), row 1 has 1 (loss 4).
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_micro_batches_divided_by_the_mini_batch_count_add_up_to_its_mean_by_hand():
    # One batch: token mean (1 + 2 + 3 + 4) / 4 = 2.5; sequence mean (6/3 + 4/1) / 2 = 3.
    assert aggregate_loss(PER_TOKEN, MASK, "token").item() == 2.5
    assert aggregate_loss(PER_TOKEN, MASK, "sequence").item() == 3.0
    rows = [slice(0, 1), slice(1, 2)]  # one micro-batch per row
    # Each micro-batch over its own count, then averaged (the old way): (6/3 + 4/1) / 2 = 3,
    # so the 1-token answer's token weighs 3x each token of the 3-token answer.
    own = [aggregate_loss(PER_TOKEN[r], MASK[r], "token").item() for r in rows]
    assert sum(own) / 2 == 3.0
    # Over the mini-batch's 4 tokens: 6/4 + 4/4 = 2.5; over its 2 answers: 2/2 + 4/2 = 3.
    assert [aggregate_loss(PER_TOKEN[r], MASK[r], "token", total=4).item() for r in rows] == [
        1.5,
        1.0,
    ]
    assert [aggregate_loss(PER_TOKEN[r], MASK[r], "sequence", total=2).item() for r in rows] == [
        1.0,
        2.0,
    ]


def test_gradient_of_two_micro_batches_is_the_token_mean_gradient_by_hand():
    # Per-token loss w * x with x the values above: d(token mean)/dw = (1+2+3+4)/4 = 2.5.
    w = torch.tensor(1.0, requires_grad=True)
    for r in (slice(0, 1), slice(1, 2)):
        aggregate_loss(w * PER_TOKEN[r], MASK[r], "token", total=4).backward()
    assert w.grad.item() == 2.5


# Four answers with 1, 2, 3 and 6 real tokens: any two micro-batches of two rows hold different
# numbers of tokens (3 vs 9, 4 vs 8, 7 vs 5).
LENGTHS, P, R, VOCAB = [1, 2, 3, 6], 3, 6, 64


def _ragged_rollout() -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    n = len(LENGTHS)
    mask = (torch.arange(R) < torch.tensor(LENGTHS)[:, None]).float()
    rollout = Rollout(
        prompt_ids=torch.randint(3, VOCAB, (n, P), generator=g),
        prompt_mask=torch.ones(n, P, dtype=torch.long),
        response_ids=torch.randint(3, VOCAB, (n, R), generator=g),
        mask=mask,
        logprobs=-4.0 + 0.1 * torch.randn(n, R, generator=g),
        ref_logprobs=-4.0 + 0.1 * torch.randn(n, R, generator=g),
        values=0.1 * torch.randn(n, R, generator=g),
    )
    advantages = torch.randn(n, R, generator=g) * mask
    return rollout, advantages, (advantages + rollout.values) * mask


def _sgd_step(grad_accum: int, **cfg) -> dict[str, torch.Tensor]:
    """The parameters after one ppo_update (one epoch, one mini-batch of all 4 rows) with SGD
    at lr 1: initial weights minus the gradient."""
    accelerator = make_accelerator(Recipe(precision="fp32", seed=0), grad_accum)
    config = PPOConfig(
        batch_size=4,
        mini_batch_size=4,
        grad_accum=grad_accum,
        ppo_epochs=1,
        entropy_coef=0.01,
        **cfg,
    )
    model = ActorCritic(small_vocab_policy(seed=0, vocab=VOCAB))
    torch.manual_seed(1)
    torch.nn.init.normal_(model.value_head.weight, std=0.1)  # a non-trivial value gradient
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    rollout, advantages, returns = _ragged_rollout()
    critic = returns if config.estimator == "gae" else None
    gen = torch.Generator().manual_seed(0)
    ppo_update(model, optimizer, accelerator, rollout, advantages, critic, config, gen, kl_coef=0.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "cfg",
    [
        {},  # gae: policy, value and entropy terms, token mean
        {"estimator": "grpo", "samples_per_prompt": 2},  # + the k3 KL loss term
        {"estimator": "grpo", "samples_per_prompt": 2, "loss_aggregation": "sequence"},
    ],
    ids=["gae-token", "grpo-token", "grpo-sequence"],
)
def test_two_micro_batches_step_like_one_batch_holding_every_token(cfg):
    one, two = _sgd_step(1, **cfg), _sgd_step(2, **cfg)
    initial = ActorCritic(small_vocab_policy(seed=0, vocab=VOCAB)).state_dict()
    moved = [k for k in initial if k in one and not torch.equal(initial[k], one[k])]
    assert len(moved) > 5  # the step did something
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- kl_estimator with kl_in loss


def test_kl_in_loss_defaults_to_k3_and_refuses_another_estimator(tmp_path, capsys):
    assert PPOConfig(estimator="grpo", samples_per_prompt=2).kl_estimator == "k3"
    assert PPOConfig(kl_in="loss").kl_estimator == "k3"
    assert PPOConfig().kl_estimator == "k1"  # gae: the KL in the reward
    assert PPOConfig(estimator="grpo", samples_per_prompt=2, kl_in="reward").kl_estimator == "k1"
    grpo = ["ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.kl_estimator=k1"]
    with pytest.raises(UserError, match="ppo.kl_estimator: k1 with kl_in: loss"):
        load_recipe("recipes/tiny.yaml", grpo)
    rc = main(["ppo", "recipes/tiny.yaml", f"output_dir={tmp_path / 'run'}", *grpo])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "ppo.kl_estimator" in err, err


# ---------------------------------------------------------------------------- adaptive KL


def test_adaptive_kl_moves_beta_at_the_scale_of_a_run_by_hand():
    adaptive = {"target": 6.0, "horizon": 160}
    cfg = PPOConfig(batch_size=16, iterations=30, kl_coef=0.05, adaptive_kl=adaptive)
    ctl = kl_controller(cfg, world=1)
    # KL 3 vs target 6: error clip(3/6 - 1) = -0.2 (at the clip); K = 16 / 160 = 0.1:
    # beta = 0.05 * (1 - 0.02) = 0.049
    ctl.update(3.0, 16)
    assert ctl.value == pytest.approx(0.049, rel=1e-12)
    # KL 6.6: error 0.1; beta = 0.049 * (1 + 0.01) = 0.04949
    ctl.update(6.6, 16)
    assert ctl.value == pytest.approx(0.04949, rel=1e-12)
    # Over the 30 iterations it can grow by up to 1.02 ** 30 = 1.81x
    assert ctl.reach(16, 30) == pytest.approx(1.02**30)


def test_an_adaptive_kl_too_slow_for_the_run_is_reported(caplog):
    cfg = PPOConfig(batch_size=16, iterations=30, adaptive_kl={"target": 6.0, "horizon": 10000})
    with caplog.at_level(logging.WARNING, logger="rlhf.stages.ppo"):
        kl_controller(cfg, world=1)
    # 30 updates of 16 rollouts: (1 + 0.2 * 16 / 10000) ** 30 = 1.0096, at most 1.0% up
    assert "ppo.adaptive_kl.horizon 10000: 480 rollouts in the run move beta by at most 1.0%" in (
        caplog.text
    )


def test_shipped_recipes_have_no_adaptive_kl_that_cannot_act():
    for path in sorted(Path("recipes").glob("*.yaml")):
        cfg = load_recipe(path).ppo
        if cfg.adaptive_kl is not None:  # one rank: the fewest rollouts per iteration
            # the most beta can grow: (1 + 0.2 * rollouts per iteration / horizon) ** iterations
            reach = (1 + 0.2 * cfg.batch_size / cfg.adaptive_kl.horizon) ** cfg.iterations
            assert reach > 1.1, f"{path}: beta moves {reach - 1:.1%} at most"
