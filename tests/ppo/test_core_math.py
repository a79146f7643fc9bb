"""The public PPO math (rlhf.ppo), pinned two ways:

1. against values worked out by hand on small tensors (the arithmetic is in the comments), and
2. against naive per-element Python loops on random inputs whose masks, like real rollouts,
   are a prefix of ones per row (1 up to and including the first EOS, 0 after; empty rows too).

Conventions pinned here: everything is masked (garbage after EOS never leaks in); the score lands
on the last real token; GAE does not bootstrap past the last real token (V = 0 there, also for
truncated answers); variances for whitening are unbiased; losses are means over real tokens.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf.algo.ppo import last_index
from rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)
from rlhf.tokens.sequences import logprobs_from_logits

F64 = torch.float64
SEEDS = [0, 1, 2, 3, 4]
ESTIMATORS = ["k1", "k2", "k3", "abs"]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def close(a: torch.Tensor, expected, atol: float = 1e-9) -> None:
    torch.testing.assert_close(a, torch.as_tensor(expected, dtype=a.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Random masked inputs and the naive loop re-implementations
# ---------------------------------------------------------------------------------------------


def random_batch(seed: int, B: int = 6, T: int = 7):
    """Random per-token tensors and a prefix mask with lengths 0..T (row 0 empty, row 1 full).

    Positions after each row's end hold large garbage: a leak would change every result."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    garbage = 1e3 * (1 - mask)

    def rand(scale=1.0):
        return torch.randn(B, T, generator=g, dtype=F64) * scale + garbage

    return {
        "mask": mask,
        "lengths": lengths.tolist(),
        "logp": rand(0.5) - 1.0,
        "ref_logp": rand(0.5) - 1.0,
        "values": rand(),
        "old_values": rand(),
        "returns": rand(),
        "advantages": rand(),
        "score": torch.randn(B, generator=g, dtype=F64),
    }


def naive_kl(lp: float, ref: float, estimator: str) -> float:
    if estimator == "k1":
        return lp - ref  # log(pi / pi_ref)
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    if estimator == "k3":
        r = math.exp(ref - lp)  # pi_ref / pi
        return (r - 1) - math.log(r)
    return abs(lp - ref)


def naive_shape(score, logp, ref_logp, lengths, beta, estimator):
    B, T = logp.shape
    rewards = [[0.0] * T for _ in range(B)]
    kls = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for i in range(lengths[b]):
            kls[b][i] = naive_kl(logp[b, i].item(), ref_logp[b, i].item(), estimator)
            rewards[b][i] = -beta * kls[b][i]
        if lengths[b] > 0:
            rewards[b][lengths[b] - 1] += score[b].item()
    return rewards, kls


def naive_gae(rewards, values, lengths, gamma, lam):
    """GAE written the textbook way, one sequence at a time, only over its real tokens."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        running = 0.0
        for i in reversed(range(n)):
            next_v = values[b][i + 1] if i + 1 < n else 0.0  # episode ends: no bootstrap
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            running = delta + gamma * lam * running
            adv[b][i] = running
            ret[b][i] = running + values[b][i]
    return adv, ret


def real_tokens(x: torch.Tensor, lengths) -> list[float]:
    return [x[b, i].item() for b in range(x.shape[0]) for i in range(lengths[b])]


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def naive_policy_loss(logp, old_logp, adv, lengths, clip):
    terms, clipped_count, sq_log_ratio, ratios = [], 0, [], []
    for b in range(logp.shape[0]):
        for i in range(lengths[b]):
            lr = logp[b, i].item() - old_logp[b, i].item()
            r, a = math.exp(lr), adv[b, i].item()
            unclipped = -a * r
            clipped = -a * min(max(r, 1 - clip), 1 + clip)
            terms.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
            sq_log_ratio.append(lr * lr)
            ratios.append(r)
    n = max(len(terms), 1)
    return mean(terms), clipped_count / n, 0.5 * mean(sq_log_ratio), mean(ratios)


def naive_value_loss(values, old_values, returns, lengths, clip):
    terms, clipped_count = [], 0
    for b in range(values.shape[0]):
        for i in range(lengths[b]):
            v, vo, r = values[b, i].item(), old_values[b, i].item(), returns[b, i].item()
            vc = vo + min(max(v - vo, -clip), clip)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
            clipped_count += (vc - r) ** 2 > (v - r) ** 2
    return 0.5 * mean(terms), clipped_count / max(len(terms), 1)


# ---------------------------------------------------------------------------------------------
# masked_mean / masked_var / masked_whiten / last_index
# ---------------------------------------------------------------------------------------------


def test_masked_mean_by_hand():
    x = t([[1, 2, 3], [4, 5, 6]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1
    close(masked_mean(x, mask, dim=0), [2.5, 2.0, 0.0])  # (1 + 4) / 2, 2 / 1, empty column -> 0
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask -> 0, not nan


def test_masked_var_by_hand():
    x = t([[1, 2, 9], [4, 9, 9]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # real values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    close(masked_var(x, mask, unbiased=False), 42 / 9 / 3)
    close(masked_var(x, mask), 42 / 9 / 2)  # Bessel: n - 1 = 2
    close(masked_var(t([[5, 7]]), t([[1, 0]])), 0.0)  # one value: no division by zero


def test_masked_whiten_by_hand():
    x = t([[1, 3, 100], [5, -100, 100]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # real values 1, 3, 5: mean 3, unbiased variance (4 + 0 + 4) / 2 = 4, std 2
    close(masked_whiten(x, mask), [[-1, 0, 0], [1, 0, 0]], atol=1e-7)
    # shift_mean=False rescales but keeps the mean: (x - 3) / 2 + 3
    close(masked_whiten(x, mask, shift_mean=False), [[2, 3, 0], [4, 0, 0]], atol=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_stats_match_a_loop(seed):
    d = random_batch(seed)
    x, mask, lengths = d["values"], d["mask"], d["lengths"]
    vals = real_tokens(x, lengths)
    m = mean(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    close(masked_mean(x, mask), m)
    close(
        masked_mean(x, mask, dim=1),
        [mean(real_tokens(x[b : b + 1], [n])) for b, n in enumerate(lengths)],
    )
    close(masked_var(x, mask), var)
    whitened = masked_whiten(x, mask)
    shifted = masked_whiten(x, mask, shift_mean=False)
    for b, n in enumerate(lengths):
        for i in range(x.shape[1]):
            expected = (x[b, i].item() - m) / math.sqrt(var + 1e-8) if i < n else 0.0
            assert whitened[b, i].item() == pytest.approx(expected, abs=1e-9)
            assert shifted[b, i].item() == pytest.approx(expected + m if i < n else 0.0, abs=1e-9)
    # Whitened real tokens: mean 0, unbiased variance 1 (up to eps).
    close(masked_mean(whitened, mask), 0.0)
    close(masked_var(whitened, mask), 1.0, atol=1e-6)


def test_last_index_by_hand():
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert last_index(mask).tolist() == [2, 0, -1, 3]


# ---------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------


def test_kl_penalty_by_hand():
    # token 0: pi = 0.5, pi_ref = 0.25 -> log(pi/pi_ref) = log 2
    # token 1: pi = 0.25, pi_ref = 0.5 -> log(pi/pi_ref) = -log 2
    # token 2: pi = pi_ref                -> 0
    logp = torch.log(t([0.5, 0.25, 0.3]))
    ref = torch.log(t([0.25, 0.5, 0.3]))
    ln2 = math.log(2)
    close(kl_penalty(logp, ref, "k1"), [ln2, -ln2, 0.0])
    close(kl_penalty(logp, ref), [ln2, -ln2, 0.0])  # k1 is the default
    close(kl_penalty(logp, ref, "k2"), [0.5 * ln2**2, 0.5 * ln2**2, 0.0])  # (log r)^2 / 2
    # k3 = (r - 1) - log r with r = pi_ref/pi: r = 1/2 -> -1/2 + ln 2; r = 2 -> 1 - ln 2
    close(kl_penalty(logp, ref, "k3"), [ln2 - 0.5, 1 - ln2, 0.0])
    close(kl_penalty(logp, ref, "abs"), [ln2, ln2, 0.0])
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_and_k3_is_non_negative():
    # Exact expectations under pi over a 3-token vocabulary, no sampling:
    # pi = (1/2, 1/4, 1/4), pi_ref = (1/4, 1/4, 1/2)
    # KL(pi || pi_ref) = 1/2 ln 2 + 1/4 ln 1 + 1/4 ln(1/2) = 1/4 ln 2
    pi, ref = t([0.5, 0.25, 0.25]), t([0.25, 0.25, 0.5])
    kl = 0.25 * math.log(2)
    for estimator in ("k1", "k3"):
        close((pi * kl_penalty(pi.log(), ref.log(), estimator)).sum(), kl)
    assert (kl_penalty(pi.log(), ref.log(), "k3") >= 0).all()
    # k2's expectation is not the KL here: 1/2 (ln 2)^2 (1/2 + 1/4) = 3/8 (ln 2)^2
    close((pi * kl_penalty(pi.log(), ref.log(), "k2")).sum(), 0.375 * math.log(2) ** 2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_matches_a_loop(seed, estimator):
    d = random_batch(seed)
    logp, ref = d["logp"] * d["mask"], d["ref_logp"] * d["mask"]
    out = kl_penalty(logp, ref, estimator)
    for b in range(logp.shape[0]):
        for i in range(logp.shape[1]):
            expected = naive_kl(logp[b, i].item(), ref[b, i].item(), estimator)
            assert out[b, i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# shape_rewards
# ---------------------------------------------------------------------------------------------


def test_shape_rewards_by_hand():
    score = t([2.0, -1.0, 7.0])
    logp = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [3.0, 3.0, 3.0]])  # log(pi/pi_ref), ref = 0
    ref = torch.zeros_like(logp)
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])  # full row, EOS at t=1, empty row
    rewards, kl = shape_rewards(score, logp, ref, mask, kl_coef=0.5)
    # k1 = log ratio, masked: the 9.0 after EOS and the empty row never count
    close(kl, [[0.1, 0.2, 0.3], [0.4, 0.5, 0.0], [0, 0, 0]])
    # r_t = -0.5 * KL_t, plus the score on the last real token
    #   row 0: -0.05, -0.10, -0.15 + 2 = 1.85
    #   row 1: -0.20, -0.25 - 1 = -1.25, 0
    #   row 2: no real token, so its score lands nowhere
    close(rewards, [[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0], [0, 0, 0]])
    # k3 on row 0, token 0: r = pi_ref/pi = e^-0.1 -> (e^-0.1 - 1) + 0.1
    _, kl3 = shape_rewards(score, logp, ref, mask, kl_coef=0.5, estimator="k3")
    close(kl3[0, 0], math.exp(-0.1) - 1 + 0.1)
    close(kl3[1, 2], 0.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_shape_rewards_matches_a_loop(seed, estimator):
    d = random_batch(seed)
    rewards, kl = shape_rewards(d["score"], d["logp"], d["ref_logp"], d["mask"], 0.05, estimator)
    exp_rewards, exp_kl = naive_shape(
        d["score"], d["logp"], d["ref_logp"], d["lengths"], 0.05, estimator
    )
    close(rewards, exp_rewards)
    close(kl, exp_kl)


# ---------------------------------------------------------------------------------------------
# gae
# ---------------------------------------------------------------------------------------------


def test_gae_by_hand():
    rewards = t([[0, 0, 1], [0, 1, 5]])
    values = t([[0.5, 0.4, 0.2], [0.5, 0.4, 7]])
    mask = t([[1, 1, 1], [1, 1, 0]])  # row 1 ends at t=1; its t=2 entries are garbage
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # row 0 (no bootstrap after the last token: V_3 = 0)
    #   t=2: delta = 1 + 0.9*0   - 0.2 =  0.8    A = 0.8
    #   t=1: delta = 0 + 0.9*0.2 - 0.4 = -0.22   A = -0.22 + 0.72*0.8   = 0.356
    #   t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14   A = -0.14 + 0.72*0.356 = 0.11632
    # row 1 (V_2 is past the end, so 0 rather than 7)
    #   t=1: delta = 1 + 0.9*0   - 0.4 =  0.6    A = 0.6
    #   t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14   A = -0.14 + 0.72*0.6   = 0.292
    close(adv, [[0.11632, 0.356, 0.8], [0.292, 0.6, 0.0]])
    # returns = A + V on real tokens, 0 after
    close(ret, [[0.61632, 0.756, 1.0], [0.792, 1.0, 0.0]])


def test_gae_special_cases_by_hand():
    rewards = t([[1, 2, 3, 4]])
    values = t([[10, 20, 30, 40]])
    mask = t([[1, 1, 1, 0]])
    # gamma = lam = 1: A_t = sum of future real rewards - V_t (Monte Carlo); returns = 6, 5, 3
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[6 - 10, 5 - 20, 3 - 30, 0]])
    close(ret, [[6, 5, 3, 0]])
    # lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t (one-step TD), gamma = 0.5
    #   t=0: 1 + 10 - 10 = 1;  t=1: 2 + 15 - 20 = -3;  t=2: 3 + 0 - 30 = -27
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    close(adv, [[1, -3, -27, 0]])
    close(ret, [[11, 17, 3, 0]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.7, 0.0)])
def test_gae_matches_a_loop(seed, gamma, lam):
    d = random_batch(seed)
    rewards = torch.randn(d["mask"].shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    rewards = rewards + 1e3 * (1 - d["mask"])  # garbage after the end
    adv, ret = gae(rewards, d["values"], d["mask"], gamma, lam)
    exp_adv, exp_ret = naive_gae(rewards.tolist(), d["values"].tolist(), d["lengths"], gamma, lam)
    close(adv, exp_adv)
    close(ret, exp_ret)


# ---------------------------------------------------------------------------------------------
# policy_loss
# ---------------------------------------------------------------------------------------------


def test_policy_loss_by_hand():
    ratio = t([[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]])
    advantages = t([[1, 1, -1, -1, 2, 10]])
    mask = t([[1, 1, 1, 1, 1, 0]])  # the last token is after EOS
    old_logp = torch.zeros_like(ratio)
    logp = ratio.log().requires_grad_()
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5 A=+1: max(-1.5, -1.2) = -1.2  clipped (no push past 1.2)
    #   r=0.5 A=+1: max(-0.5, -0.8) = -0.5  unclipped (pessimistic bound)
    #   r=0.5 A=-1: max( 0.5,  0.8) =  0.8  clipped
    #   r=1.5 A=-1: max( 1.5,  1.2) =  1.5  unclipped
    #   r=1.1 A=+2: max(-2.2, -2.2) = -2.2  inside the range
    # mean over the 5 real tokens: (-1.2 - 0.5 + 0.8 + 1.5 - 2.2) / 5 = -1.6 / 5
    close(loss.detach(), -0.32)
    close(stats["clipfrac"], 2 / 5)
    close(stats["ratio_mean"], (1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5)
    ln = math.log
    close(stats["approxkl"], 0.5 * (2 * ln(1.5) ** 2 + 2 * ln(0.5) ** 2 + ln(1.1) ** 2) / 5)
    # d loss / d logp = -A r / 5 where the unclipped term is active, 0 where clipping holds it
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 5, 0.0, 1.5 / 5, -2.2 / 5, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_matches_a_loop(seed):
    d = random_batch(seed)
    old_logp = d["logp"] + 0.3 * torch.randn(
        d["logp"].shape, generator=torch.Generator().manual_seed(seed), dtype=F64
    )
    loss, stats = policy_loss(d["logp"], old_logp, d["advantages"], d["mask"], clip=0.2)
    exp_loss, exp_clipfrac, exp_approxkl, exp_ratio = naive_policy_loss(
        d["logp"], old_logp, d["advantages"], d["lengths"], 0.2
    )
    close(loss, exp_loss)
    close(stats["clipfrac"], exp_clipfrac)
    close(stats["approxkl"], exp_approxkl)
    close(stats["ratio_mean"], exp_ratio)
    assert 0 < exp_clipfrac < 1  # the inputs exercise both branches


# ---------------------------------------------------------------------------------------------
# value_loss
# ---------------------------------------------------------------------------------------------


def test_value_loss_by_hand():
    values = t([[1.0, 1.0, 0.1, -1.0, 50.0]]).requires_grad_()
    old_values = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 0.0, 0.5, -0.1, -50.0]])
    mask = t([[1, 1, 1, 1, 0]])  # the last token is after EOS
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2)
    # clipped V = V_old + clip(V - V_old, -0.2, 0.2); per token max((V-R)^2, (Vc-R)^2):
    #   V=1   R=1:    Vc=0.2:  max(0,    0.64) = 0.64  clipped
    #   V=1   R=0:    Vc=0.2:  max(1,    0.04) = 1
    #   V=0.1 R=0.5:  Vc=0.1:  max(0.16, 0.16) = 0.16
    #   V=-1  R=-0.1: Vc=-0.2: max(0.81, 0.01) = 0.81
    # 0.5 * mean over 4 real tokens: 0.5 * 2.61 / 4
    close(loss.detach(), 0.32625)
    close(stats["clipfrac"], 1 / 4)
    # d loss / dV = (V - R) / 4 where the unclipped error wins; 0 where the clipped one holds it
    loss.backward()
    close(values.grad, [[0.0, 1 / 4, -0.4 / 4, -0.9 / 4, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_a_loop(seed):
    d = random_batch(seed)
    old = d["values"] + 0.3 * torch.randn(
        d["values"].shape, generator=torch.Generator().manual_seed(seed), dtype=F64
    )
    loss, stats = value_loss(d["values"], old, d["returns"], d["mask"], clip=0.2)
    exp_loss, exp_clipfrac = naive_value_loss(d["values"], old, d["returns"], d["lengths"], 0.2)
    close(loss, exp_loss)
    close(stats["clipfrac"], exp_clipfrac)
    assert 0 < exp_clipfrac < 1


# ---------------------------------------------------------------------------------------------
# entropy and explained variance (logged diagnostics)
# ---------------------------------------------------------------------------------------------


def test_entropy_from_logits_by_hand():
    # uniform over 4 -> ln 4; one-hot (a huge logit) -> 0; p = (1/2, 1/4, 1/4) -> 1.5 ln 2
    logits = torch.stack([t([0, 0, 0, 0]), t([100, 0, 0, 0]), torch.log(t([2, 1, 1, 1e-300]))])
    close(entropy_from_logits(logits).double(), [math.log(4), 0.0, 1.5 * math.log(2)], atol=1e-5)


def test_explained_variance_by_hand():
    returns = t([[1, 2, 3, 99]])
    mask = t([[1, 1, 1, 0]])
    close(explained_variance(returns, returns, mask), 1.0)  # perfect critic
    close(explained_variance(t([[2, 2, 2, 0]]), returns, mask), 0.0)  # the mean: no better
    # V = 0: residual = returns, so 1 - Var[R]/Var[R] = 0; V = R + 1: residual constant -> 1
    close(explained_variance(torch.zeros_like(returns), returns, mask), 0.0)
    close(explained_variance(returns + 1, returns, mask), 1.0)
    # V = (0, 2, 4): residual (1, 0, -1), Var 2/3 over Var[R] = 2/3 -> 0
    close(explained_variance(t([[0, 2, 4, 0]]), returns, mask), 0.0)
    # V = (1, 2, 2): residual (0, 0, 1), Var = 2/9; Var[R] = 2/3 -> 1 - 1/3
    close(explained_variance(t([[1, 2, 2, 0]]), returns, mask), 2 / 3)


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12 vs target 6: error = clip(12/6 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 1000/10000
    ctl.update(12.0, 1000)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    # KL 6.6: error 0.1 (inside the clip); beta *= 1 + 0.1 * 0.1
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 1.01)
    # KL 0: error clipped to -0.2; beta *= 1 - 0.2 * 5000/10000 = 0.9
    ctl.update(0.0, 5000)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 1.01 * 0.9)
    # on target: unchanged
    before = ctl.value
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(before)
    # state round-trip (resume)
    other = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


@pytest.mark.parametrize("seed", SEEDS)
def test_adaptive_kl_controller_matches_a_loop(seed):
    rng = random.Random(seed)
    target, horizon, beta = 4.0, 500, 0.2
    ctl = AdaptiveKLController(beta, target=target, horizon=horizon)
    for _ in range(50):
        kl, n = rng.uniform(0, 10), rng.choice([8, 64, 256])
        error = kl / target - 1
        error = -0.2 if error < -0.2 else 0.2 if error > 0.2 else error
        beta = beta * (1 + error * n / horizon)
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(beta, rel=1e-12)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 6.0, 100.0):
        ctl.update(kl, 1000)
        assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_token_logprobs_and_their_gradient_by_hand():
    # logits ln 1, ln 2, ln 3 at T = 0.5: z = ln 1, ln 4, ln 9, softmax(z) = (1, 4, 9) / 14.
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)]]], requires_grad=True)
    logp = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=0.5)
    assert logp.item() == pytest.approx(math.log(4 / 14), abs=1e-6)
    logp.sum().backward()
    # d log softmax(z)[1] / d logits = (onehot(1) - softmax(z)) / T
    expected = torch.tensor([-1 / 14, 1 - 4 / 14, -9 / 14]) / 0.5
    assert torch.allclose(logits.grad[0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_the_composed_log_softmax(dtype):
    """log pi(token) gives what log_softmax + gather gives, value and gradient, in the
    logits' dtype."""
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 1000, generator=gen)).to(dtype).requires_grad_()
    tokens = torch.randint(0, 1000, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen)
    ours = logprobs_from_logits(logits, tokens, temperature=0.7)
    (ours * weights).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    composed = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    (composed * weights).sum().backward()
    assert ours.dtype == torch.float32 and ours_grad.dtype == dtype
    assert torch.allclose(ours, composed, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of each gradient
    assert torch.allclose(ours_grad.float(), logits.grad.float(), atol=tol)


def test_entropy_without_autograd_is_the_differentiable_formula_block_by_block():
    gen = torch.Generator().manual_seed(1)
    full = (3 * torch.randn(3, 21, 500, generator=gen)).to(torch.bfloat16)
    logits = full[:, :20]  # a slice, as the rollout's logits are: not contiguous
    blockwise = entropy_from_logits(logits, temperature=0.7)
    composed = entropy_from_logits(logits.clone().requires_grad_(), temperature=0.7)
    assert blockwise.shape == (3, 20) and composed.requires_grad
    assert torch.allclose(blockwise, composed.detach(), atol=1e-5)


def test_logprobs_without_autograd_are_the_differentiable_formula_block_by_block():
    """The no-grad path (block by block, for memory) gives the same log-probs, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    full = (3 * torch.randn(3, 21, 500, generator=gen)).to(torch.bfloat16)
    logits = full[:, :20]  # a slice, as the rollout's logits are: not contiguous
    tokens = torch.randint(0, 500, (3, 20), generator=gen)
    blockwise = logprobs_from_logits(logits, tokens, temperature=0.7)
    composed = logprobs_from_logits(logits.clone().requires_grad_(), tokens, temperature=0.7)
    assert blockwise.shape == (3, 20) and composed.requires_grad
    assert torch.equal(blockwise, composed.detach())
    one_row = logprobs_from_logits(logits[0], tokens[0], temperature=0.7)
    assert torch.equal(one_row, blockwise[0])
