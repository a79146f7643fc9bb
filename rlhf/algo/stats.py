"""Small statistics shared by the evaluations: a binomial interval, the win rate of paired
scores and a diversity measure."""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion wins / n (z = 1.96: 95%; Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and does not collapse to a point
    when every comparison goes one way, which happens often on a few dozen prompts.
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= wins <= n:
        raise ValueError(f"successes must be in [0, n], got {wins} of {n}")
    p = wins / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], z: float = 1.96) -> dict:
    """Win rate of B over A on paired scores, ties counting half, with a Wilson interval.

    The interval treats the half-counted total as a binomial count (slightly conservative
    when there are ties).
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    n = len(scores_a)
    if n == 0:
        raise ValueError("win_rate needs at least one pair of scores")
    wins = sum(1 for a, b in zip(scores_a, scores_b) if b > a)
    ties = sum(1 for a, b in zip(scores_a, scores_b) if b == a)
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(wins + 0.5 * ties, n, z)
    return {
        "win_rate_b_over_a": rate,
        "win_rate_ci95": [low, high],
        "wins_b": wins,
        "ties": ties,
        "wins_a": n - wins - ties,
    }


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams / all word n-grams over the texts
    (lower-cased, whitespace-separated words). 0.0 when there is no n-gram at all."""
    total, seen = 0, set()
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
