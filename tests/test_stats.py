"""rlhf.algo.stats: rates whose intervals treat the prompt as the unit."""

from __future__ import annotations

import math
import random

import pytest

from rlhf.algo import stats


def test_clustered_rate_by_hand():
    # Prompt 1: a win and a tie (1.5 of 2); prompt 2: two losses. Rate 1.5 / 4. A resample
    # of two prompts is {1,1} (rate 3/4, p 1/4), {1,2} (1.5/4, p 1/2) or {2,2} (0, p 1/4):
    # the 2.5% and 97.5% percentiles are 0 and 3/4.
    got = stats.clustered_win_rate([0, 1, 1, 1], [1, 1, 0, 0], ["p1", "p1", "p2", "p2"])
    assert got["rate"] == 1.5 / 4
    assert (got["low"], got["high"]) == (0.0, 0.75)
    assert (got["wins"], got["ties"], got["losses"]) == (1, 1, 2)
    assert (got["n_prompts"], got["n_samples"]) == (2, 4)


def test_clustered_rate_degenerate_cases():
    # Every prompt at the same rate: every resample has it too.
    same = stats.clustered_rate([1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 2, 2])
    assert (same["rate"], same["low"], same["high"]) == (0.5, 0.5, 0.5)
    one = stats.clustered_rate([1, 1, 0], ["only"] * 3)  # one prompt: no spread to estimate
    assert (one["rate"], one["low"], one["high"], one["n_prompts"]) == (2 / 3, 0.0, 1.0, 1)
    with pytest.raises(ValueError):
        stats.clustered_rate([1.0], [0, 1])
    with pytest.raises(ValueError):
        stats.clustered_rate([2.0], [0])
    with pytest.raises(ValueError):
        stats.clustered_win_rate([1.0], [1.0, 2.0], [0])


def test_clustered_rate_is_seeded():
    rng = random.Random(0)
    outcomes = [float(rng.random() < 0.6) for _ in range(40)]
    prompts = [i // 4 for i in range(40)]
    assert stats.clustered_rate(outcomes, prompts) == stats.clustered_rate(outcomes, prompts)
    other = stats.clustered_rate(outcomes, prompts, seed=1)
    assert other["rate"] == stats.clustered_rate(outcomes, prompts)["rate"]


def _wilson_excludes_half(hits: float, n: int, z: float = 1.96) -> bool:
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return not centre - half <= 0.5 <= centre + half


def test_clustered_interval_holds_its_level_on_a_correlated_null():
    # A null with intra-prompt correlation 1/3: each prompt's win probability is drawn from
    # Beta(1, 1) (mean 0.5; a beta-binomial's correlation is 1 / (a + b + 1)), then its 4
    # samples win independently with it. 60 prompts x 4 samples, 300 seeded runs.
    rng = random.Random(38)
    runs, per_sample, clustered = 300, 0, 0
    prompts = [i // 4 for i in range(240)]
    for run in range(runs):
        outcomes = []
        for _ in range(60):
            p = rng.random()
            outcomes += [float(rng.random() < p) for _ in range(4)]
        per_sample += _wilson_excludes_half(sum(outcomes), len(outcomes))
        got = stats.clustered_rate(outcomes, prompts, resamples=1000, seed=run)
        clustered += not got["low"] <= 0.5 <= got["high"]
    assert per_sample / runs > 0.11  # the per-sample interval is too narrow (about 16%)
    assert clustered / runs <= 0.09  # the clustered one excludes a true 0.5 about 5% of runs


def test_distinct_2_by_hand():
    # bigrams: (the cat) (cat sat) | (the cat) (cat ran) (ran off): 5 in all, 4 distinct
    assert stats.distinct_n(["The cat sat", "the cat ran off"], 2) == pytest.approx(4 / 5)
    assert stats.distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert stats.distinct_n(["one", ""], 2) == 0.0
