"""Critic-free estimators (RLOO, GRPO, REINFORCE++) and the GAE critic warm-up: the math pinned
by hand, and each estimator through the real PPO loop on the tiny model."""

import json

import pytest
import torch

from rlhf.algo.advantages import compute_advantages
from rlhf.cli import main
from rlhf.infra.errors import UserError
from rlhf.infra.runtime import make_accelerator
from rlhf.infra.training import make_optimizer
from rlhf.ppo import FixedKLController, aggregate_loss, group_advantages, rloo_advantages
from rlhf.ppo.iteration import PPOContext, ppo_iteration
from rlhf.recipe import PPOConfig, Recipe, load_recipe
from rlhf.roles import models
from rlhf.roles.actor_critic import ActorCritic
from tests.ppo.tiny_policy import programmatic_score, small_vocab_policy
from tests.test_pipeline import _overrides, _write_data

# ------------------------------------------------------------------------------------- math


def _naive_rloo(scores, k):
    out = []
    for i, s in enumerate(scores):
        g = i // k
        others = [scores[j] for j in range(g * k, g * k + k) if j != i]
        out.append(s - sum(others) / len(others))
    return out


def _naive_group(scores, k, scale, eps=1e-6):
    out = []
    for i, s in enumerate(scores):
        g = scores[(i // k) * k : (i // k) * k + k]
        mean = sum(g) / k
        std = (sum((x - mean) ** 2 for x in g) / (k - 1)) ** 0.5  # the sample std
        out.append((s - mean) / (std + eps) if scale else s - mean)
    return out


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 4.0])
    # group [1, 2, 3]:   1 - (2+3)/2 = -1.5,  2 - (1+3)/2 = 0,  3 - (1+2)/2 = 1.5
    # group [10, 10, 4]: 10 - (10+4)/2 = 3 (twice),  4 - (10+10)/2 = -6
    assert rloo_advantages(scores, 3).tolist() == [-1.5, 0.0, 1.5, 3.0, 3.0, -6.0]
    # k = 2: the baseline is the other sample: [0.5, -0.5] -> [1, -1]; [2, 2] -> [0, 0]
    assert rloo_advantages(torch.tensor([0.5, -0.5, 2.0, 2.0]), 2).tolist() == [1, -1, 0, 0]


def test_group_advantages_by_hand():
    # [1, 3]: mean 2, sample variance (1 + 1) / (2 - 1) = 2 -> [-1, 1] / sqrt(2);
    # [5, 5]: std 0 -> [0, 0]
    out = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (2**0.5 + 1e-6)
    assert torch.allclose(out, expected, rtol=0, atol=1e-7)  # -0.70711, 0.70711, 0, 0
    # [0, 0, 0, 4]: mean 1, deviations [-1, -1, -1, 3], sample variance (1+1+1+9)/3 = 4, std 2
    # (the population std would be sqrt(12/4) = 1.732: advantages 1.15x larger)
    s = torch.tensor([0.0, 0.0, 0.0, 4.0])
    assert group_advantages(s, 4, scale=False).tolist() == [-1.0, -1.0, -1.0, 3.0]
    expected = torch.tensor([-0.5, -0.5, -0.5, 1.5]) * (2 / (2 + 1e-6))
    assert torch.allclose(group_advantages(s, 4), expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_group_estimators_match_a_naive_loop(k):
    scores = torch.randn(5 * k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    s = scores.tolist()
    assert torch.allclose(rloo_advantages(scores, k), torch.tensor(_naive_rloo(s, k)).double())
    for scale in (True, False):
        naive = torch.tensor(_naive_group(s, k, scale)).double()
        assert torch.allclose(group_advantages(scores, k, scale=scale), naive)


def test_group_estimators_reject_ragged_groups():
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 3)


def test_loss_aggregation_token_vs_sequence_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "token").item() == 2.5  # (1+2+3+4) / 4
    assert aggregate_loss(per_token, mask, "sequence").item() == 3.0  # (6/3 + 4/1) / 2


def _cfg(**kw):
    return PPOConfig(samples_per_prompt=2, batch_size=2, mini_batch_size=2, **kw)


# Two answers to one prompt, 2 tokens each. k1 KL: logp - ref = [[1, 0], [0, 0]]; beta 0.5.
LOGP = torch.zeros(2, 2)
REF = torch.tensor([[-1.0, 0.0], [0.0, 0.0]])
MASK = torch.ones(2, 2)
SCORE = torch.tensor([1.0, 0.0])


def test_rloo_folds_the_kl_into_the_sequence_reward():
    adv, returns, kl = compute_advantages(_cfg(estimator="rloo"), SCORE, LOGP, REF, None, MASK, 0.5)
    # rewards 1 - 0.5 * 1 = 0.5 and 0; leave-one-out: +0.5, -0.5 on every token
    assert adv.tolist() == [[0.5, 0.5], [-0.5, -0.5]]
    assert returns is None and kl.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    # KL in the loss instead: the reward is the score alone, 1 vs 0 -> +1, -1
    cfg = _cfg(estimator="rloo", kl_in="loss")
    assert compute_advantages(cfg, SCORE, LOGP, REF, None, MASK, 0.5)[0].tolist() == [
        [1.0, 1.0],
        [-1.0, -1.0],
    ]


def test_rloo_with_group_normalisation_divides_by_the_group_std():
    cfg = _cfg(estimator="rloo", kl_in="loss", advantage_norm="group")
    adv = compute_advantages(cfg, SCORE, LOGP, REF, None, MASK, 0.5)[0]
    # leave-one-out [+1, -1], group [1, 0] has sample std sqrt(0.5) -> +-sqrt(2) (up to eps)
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) * 2**0.5, atol=1e-5)


def test_grpo_group_normalised_and_dr_grpo_unscaled():
    cfg = _cfg(estimator="grpo")  # defaults: kl_in loss, advantage_norm group
    adv = compute_advantages(cfg, SCORE, LOGP, REF, None, MASK, 0.5)[0]
    # [1, 0]: mean 0.5, sample std sqrt(0.25 + 0.25) = sqrt(0.5) -> +-0.5 / sqrt(0.5) = +-0.70711
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) / 2**0.5, atol=1e-5)
    cfg = _cfg(estimator="grpo", scale_by_std=False)
    adv = compute_advantages(cfg, SCORE, LOGP, REF, None, MASK, 0.5)[0]
    assert adv.tolist() == [[0.5, 0.5], [-0.5, -0.5]]


def test_reinforce_pp_returns_to_go_with_group_baseline():
    cfg = _cfg(estimator="reinforce_pp", advantage_norm="none")
    adv, returns, _ = compute_advantages(cfg, SCORE, LOGP, REF, None, MASK, 0.5)
    # scores minus the group mean: [0.5, -0.5]; per-token rewards -0.5 * KL + score at the end:
    # row 0 [-0.5, 0.5], row 1 [0, -0.5]; returns-to-go (gamma 1): [0, 0.5], [-0.5, -0.5]
    assert adv.tolist() == [[0.0, 0.5], [-0.5, -0.5]]
    assert returns is None
    batch = compute_advantages(_cfg(estimator="reinforce_pp"), SCORE, LOGP, REF, None, MASK, 0.5)
    assert abs(batch[0].mean().item()) < 1e-6  # advantage_norm batch (its default) centres


def test_estimator_recipe_defaults_and_errors(tmp_path):
    assert PPOConfig(estimator="grpo", samples_per_prompt=4).kl_in == "loss"
    assert PPOConfig(estimator="grpo", samples_per_prompt=4).advantage_norm == "group"
    assert PPOConfig(estimator="rloo", samples_per_prompt=4).advantage_norm == "none"
    assert PPOConfig().advantage_norm == "batch" and PPOConfig().samples_per_prompt == 1
    bad = {
        "ppo.estimator=rloo": "needs samples_per_prompt >= 2",
        "ppo.samples_per_prompt=3": "must divide batch_size",
        "ppo.advantage_norm=group": "needs a sequence-level estimator",
        "ppo.estimator=banana": "ppo.estimator",
        "ppo.critic_warmup_iterations=2": "must be below iterations",
    }
    for override, message in bad.items():
        with pytest.raises(UserError) as e:
            load_recipe("recipes/tiny.yaml", [override])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------------------- the loop


def _setup(cfg, with_values):
    recipe = Recipe(precision="fp32", seed=0)
    accelerator = make_accelerator(recipe)
    model = ActorCritic(small_vocab_policy(), with_values=with_values)
    reference = small_vocab_policy().eval().requires_grad_(False)
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, reference, optimizer


def _iterate(setup, cfg, tok, it, prompt_ids, **kw):
    accelerator, model, reference, optimizer, kl_ctl = setup
    torch.manual_seed(it)
    ctx = PPOContext(model, reference, optimizer, None, accelerator, tok, kl_ctl, cfg)
    prompt_ids = prompt_ids.to(accelerator.device)  # the model's device (CUDA when present)
    batch = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}
    return ppo_iteration(ctx, batch, programmatic_score, torch.Generator().manual_seed(it), **kw)[1]


def _run(cfg, tok, iterations, with_values):
    setup = (*_setup(cfg, with_values), FixedKLController(cfg.kl_coef))
    n_prompts = cfg.batch_size // cfg.samples_per_prompt
    prompts = torch.randint(3, 64, (n_prompts, 6), generator=torch.Generator().manual_seed(0))
    prompt_ids = prompts.repeat_interleave(cfg.samples_per_prompt, 0)  # k consecutive rows
    history = [_iterate(setup, cfg, tok, it, prompt_ids) for it in range(iterations)]
    return setup[1], history


def test_rloo_learns_a_programmatic_reward_with_bounded_kl(tiny_model_dir):
    cfg = PPOConfig(
        estimator="rloo",
        samples_per_prompt=4,
        batch_size=32,
        mini_batch_size=16,
        ppo_epochs=2,
        max_new_tokens=8,
        temperature=1.0,
        kl_coef=0.05,
        normalize_score=False,
        optim={"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
    )
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    model, history = _run(cfg, tok, 20, with_values=False)
    scores = [m["objective/score"] for m in history]
    kls = [m["objective/kl"] for m in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.2, f"mean score did not rise: {first:.3f} -> {last:.3f}"
    assert max(kls) < 20.0, f"KL ran away: {max(kls):.2f}"
    assert not any(k.startswith("value/") for k in history[-1]), sorted(history[-1])
    assert model.value_head is None and model.critic is None


def test_critic_warmup_moves_only_the_value_head(tiny_model_dir):
    cfg = PPOConfig(
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=6,
        normalize_score=False,
        iterations=4,
        critic_warmup_iterations=2,
        optim={"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant", "weight_decay": 0.1},
    )
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    setup = (*_setup(cfg, with_values=True), FixedKLController(cfg.kl_coef))
    model = setup[1]
    policy_before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    prompt_ids = torch.randint(3, 64, (8, 6), generator=torch.Generator().manual_seed(0))
    heads = [model.value_head.weight.clone()]
    for it in range(3):
        warm = it < cfg.critic_warmup_iterations
        metrics = _iterate(
            setup, cfg, tok, it, prompt_ids, value_only=warm, init_value_head=it == 0
        )
        heads.append(model.value_head.weight.clone())
        policy_now = model.policy.state_dict()
        same = all(torch.equal(policy_before[k], policy_now[k]) for k in policy_before)
        assert "value/loss" in metrics and "value/explained_variance" in metrics
        if it == 0:
            # The bias starts at the first batch's mean return (a fraction in [0, 1] here).
            assert 0.0 < model.value_head.bias.item() < 1.0
        if it < 2:
            assert same, f"warm-up iteration {it} changed the policy"
            assert not torch.equal(heads[-1], heads[-2]), "value head did not train"
        else:
            assert not same, "the first policy iteration after warm-up left the policy alone"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimators")
    args = _overrides(root, _write_data(root))
    for stage in ("sft", "reward"):
        assert main([stage, "recipes/tiny.yaml", *args]) == 0
    return root, args


@pytest.mark.parametrize(
    "variant",
    [
        ["ppo.estimator=rloo", "ppo.samples_per_prompt=2"],
        ["ppo.estimator=grpo", "ppo.samples_per_prompt=4", "ppo.loss_aggregation=sequence"],
        ["ppo.estimator=reinforce_pp", "ppo.samples_per_prompt=2", "ppo.kl_in=loss"],
        ["ppo.critic_warmup_iterations=1"],
    ],
    ids=["rloo", "grpo", "reinforce_pp", "gae-warmup"],
)
def test_every_estimator_runs_through_the_ppo_stage(pipeline, variant):
    root, args = pipeline
    assert main(["ppo", "recipes/tiny.yaml", *args, *variant]) == 0
    ppo = root / "run" / "ppo"
    assert (ppo / "COMPLETED").is_file() and (ppo / "model" / "model.safetensors").is_file()
    logged = [json.loads(x) for x in (ppo / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "eval/kl" not in r]  # the judge curve's rows (eval_every: 1)
    assert [r["step"] for r in rows] == [1, 2]
    # every iteration but the last, whose point is the end-of-run evaluation
    assert [r["step"] for r in logged if "eval/kl" in r] == [1]
    critic = not any(v.startswith("ppo.estimator=") for v in variant)
    for r in rows:
        assert ("value/explained_variance" in r) == critic and ("value/loss" in r) == critic
        assert ("policy/kl_loss" in r) == any("grpo" in v or "kl_in=loss" in v for v in variant)
        for key in ("objective/score", "objective/kl", "policy/loss", "policy/approxkl"):
            assert key in r
    info = json.loads((ppo / "run.json").read_text())
    k = 4 if "ppo.samples_per_prompt=4" in variant else 2 if not critic else 1
    assert info["prompts_per_iteration"] == 4 // k and info["rollouts_per_iteration"] == 4
