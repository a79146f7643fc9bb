"""Small statistics shared by the evaluations: rates with intervals that treat the prompt as
the unit, the win rate of paired scores, and a diversity measure.

The k samples of one prompt are not independent draws: they answer the same prompt, and both
policies sample with the same seeds. A binomial interval over prompts x k samples is then too
narrow (on a null with intra-prompt correlation 1/3 and k = 4, a 95% Wilson interval excludes
0.5 about 16% of the time). The intervals here come from a cluster bootstrap: whole prompts are
resampled with replacement, each resample's rate is its summed outcomes over its summed sample
count, and the interval is the resamples' 2.5% and 97.5% percentiles (Davison & Hinkley 1997,
"Bootstrap Methods and their Application", sec. 3.8; Field & Welsh 2007, "Bootstrapping
clustered data", JRSS-B). The bootstrap is seeded, so a report is reproducible. It is a point
when every prompt's rate is the same (e.g. every comparison a tie), and [0, 1] with fewer than
two prompts, where nothing is known about how prompts vary.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

RESAMPLES = 2000
CI_METHOD = f"cluster bootstrap over prompts (percentile, {RESAMPLES} resamples)"


def clustered_rate(
    outcomes: Sequence[float],
    prompts: Sequence[Hashable],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """The mean of per-sample outcomes in [0, 1] (1 a hit, 0.5 a tie, 0 a miss) with a cluster
    bootstrap interval over `prompts` (one id per sample; samples with the same id are one
    prompt). Returns {rate, low, high, n_prompts, n_samples}."""
    if len(outcomes) != len(prompts):
        raise ValueError(f"{len(outcomes)} outcomes but {len(prompts)} prompt ids")
    if not outcomes:
        raise ValueError("clustered_rate needs at least one outcome")
    totals: dict[Hashable, list[float]] = {}
    for value, prompt in zip(outcomes, prompts):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"outcomes must be in [0, 1], got {value}")
        entry = totals.setdefault(prompt, [0.0, 0])
        entry[0] += value
        entry[1] += 1
    hits = np.array([t[0] for t in totals.values()])
    counts = np.array([t[1] for t in totals.values()], dtype=float)
    rate = float(hits.sum() / counts.sum())
    low, high = 0.0, 1.0
    if len(hits) >= 2:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(hits), size=(resamples, len(hits)))
        rates = hits[picks].sum(1) / counts[picks].sum(1)
        tail = (1.0 - level) / 2
        low, high = (float(q) for q in np.quantile(rates, [tail, 1.0 - tail]))
    n_samples = len(outcomes)
    return {"rate": rate, "low": low, "high": high, "n_prompts": len(hits), "n_samples": n_samples}


def clustered_win_rate(
    scores_a: Sequence[float], scores_b: Sequence[float], prompts: Sequence[Hashable], **kw
) -> dict:
    """Win rate of B over A on paired scores, ties counting half, with the clustered interval
    (`clustered_rate`); `wins` (B higher), `ties` and `losses` (A higher) are counts."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    outcomes = [1.0 if b > a else 0.5 if b == a else 0.0 for a, b in zip(scores_a, scores_b)]
    out = clustered_rate(outcomes, prompts, **kw)
    out["wins"] = outcomes.count(1.0)
    out["ties"] = outcomes.count(0.5)
    out["losses"] = outcomes.count(0.0)
    return out


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
