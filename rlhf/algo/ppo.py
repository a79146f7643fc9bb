"""PPO math for RLHF as small pure tensor functions.

Shapes: per-token tensors are (B, T) over RESPONSE tokens; `mask` is a 0/1 float (B, T) that is
1 on real response tokens (up to and including the first EOS) and 0 after. Masks are assumed
to be a prefix of ones per row (what rollouts produce). Per-sequence tensors are (B,).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask == 1 (over everything, or along `dim`); 0 for an empty mask."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over masked entries; masked positions come back as 0.

    shift_mean=False adds the mean back: rescale without re-centring, as for reward whitening
    ("The N Implementation Details of RLHF with PPO").
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence", 2020): k1 = log r' with r' = pi/pi_ref (unbiased, can be negative);
    k2 = (log r)^2 / 2; k3 = (r - 1) - log r with r = pi_ref/pi (unbiased, always >= 0)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator '{estimator}' (valid: k1, k2, k3, abs)")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a prefix mask: (B, T) -> (B,); -1 for empty rows."""
    return mask.sum(1).long() - 1


def shape_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward r_t = -beta * KL_t, plus the sequence score at the last real token
    (Ziegler et al. 2019; InstructGPT eq. 2). Returns (rewards, kl), both (B, T) and masked."""
    kl = kl_penalty(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    last = last_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards = rewards.clone()
    rewards[rows, last[rows]] += score[rows].to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), backward over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t   (V past the last real token is 0: episode end)
    A_t     = delta_t + gamma * lam * A_{t+1}
    returns = A + V. Outputs are 0 at masked positions.
    """
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # On masked steps carry nothing backward, so the last real token sees V_{T}=0, A_{T}=0.
        advantages[:, t] = adv_t * m
        next_adv = adv_t * m
        next_value = values[:, t] * m
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    aggregation: str = "token",
    total: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise:
    mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps));
    `aggregation` and `total` pick the mean (see aggregate_loss)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, aggregation, total)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # 0.5 * E[(log r)^2]: the k2 estimator of KL(old || new), as in CleanRL/TRL logs.
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    total: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 baselines; "N implementation details" #9):
    0.5 * mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)), a token mean
    (`total` as in aggregate_loss)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(err_unclipped, err_clipped), mask, "token", total)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err_unclipped).float(), mask)}
    return loss, stats


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 is perfect, 0 is no better than a constant."""
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    return 1.0 - var_residual / var_returns.clamp(min=1e-8)


class FixedKLController:
    """beta stays where the recipe puts it."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, sec. 2.2: beta_{t+1} = beta_t * (1 + K_beta * e_t) with the
    proportional error e_t = clip(KL_t / KL_target - 1, -0.2, 0.2) and K_beta = n_steps / horizon,
    n_steps the rollouts since the last update. Over a run of N rollouts beta moves by at most
    a factor (1 + 0.2 * n_steps / horizon) ** (N / n_steps) (`reach`): a horizon far above N
    leaves it where it started."""

    MAX_ERROR = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -self.MAX_ERROR), self.MAX_ERROR)
        self.value *= 1.0 + error * n_steps / self.horizon

    def reach(self, n_steps: int, updates: int) -> float:
        """The largest factor beta can grow by in `updates` updates of `n_steps` rollouts each."""
        return (1.0 + self.MAX_ERROR * n_steps / self.horizon) ** updates


# ------------------------------------------------------------------ critic-free baselines
# Scores (B,) come as B = n * k samples, the k samples of each prompt in consecutive rows.


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k < 1 or scores.dim() != 1 or scores.shape[0] % k:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {k}")
    return scores.view(-1, k)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, eq. 5): each sample's
    baseline is the mean of the OTHER k-1 samples of its prompt. (B,) -> (B,)."""
    if k < 2:
        raise ValueError("rloo_advantages needs k >= 2 samples per prompt")
    groups = _groups(scores, k)
    others_mean = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - others_mean).reshape(-1)


def group_advantages(
    scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, sec. 4.1.2): (s - mean_group) / (std_group
    + eps), std_group the sample std of the k scores (group_std). scale=False keeps only the
    centring (Dr. GRPO, Liu et al. 2025: the std division favours prompts whose samples all
    score alike)."""
    groups = _groups(scores, k)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (group_std(scores, k).view(-1, k) + eps)
    return centred.reshape(-1)


def group_std(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's group std, (B,) -> (B,): the unbiased sample std (divisor k - 1), as TRL's
    GRPOTrainer and verl's GRPO advantage compute it (torch.std's default), not the population
    std (divisor k), which is sqrt(k / (k - 1)) times smaller (1.15x at k = 4)."""
    if k < 2:
        raise ValueError("a group std needs k >= 2 samples per prompt")
    return _groups(scores, k).std(1).repeat_interleave(k)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    how: str = "token",
    total: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """token: mean over every real token (DAPO's token-level loss, Yu et al. 2025: long answers
    weigh more); sequence: mean over each answer's tokens, then over answers (GRPO, Shao et
    al. 2024 eq. 3). Dr. GRPO (Liu et al. 2025) divides the token sum by a constant instead.

    `total`: the count to divide by (tokens for token, answers for sequence) when this batch is
    one micro-batch of a larger mini-batch: that mini-batch's count (aggregation_count) over all
    its micro-batches and ranks, so that every token (answer) of it weighs the same. None: this
    batch's own count."""
    if how == "token":
        summed = (per_token * mask).sum()
    elif how == "sequence":
        summed = masked_mean(per_token, mask, dim=1).sum()
    else:
        raise ValueError(f"unknown loss aggregation '{how}' (valid: token, sequence)")
    count = aggregation_count(mask, how) if total is None else torch.as_tensor(total)
    return summed / count.to(summed.dtype).clamp(min=1)


def aggregation_count(mask: torch.Tensor, how: str = "token") -> torch.Tensor:
    """What aggregate_loss divides by: the real tokens (token) or the answers (sequence)."""
    if how == "sequence":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    return mask.sum()
