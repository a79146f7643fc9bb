"""Reward functions that tests name as `tests.reward_fns:NAME` in recipes."""


def digit_fraction(prompts, responses, rows, **_):
    """Fraction of the response's characters that are digits (0.0 for an empty one)."""
    return [sum(c.isdigit() for c in r) / len(r) if r else 0.0 for r in responses]


def wrong_length(prompts, responses, rows):
    return [0.0]


def not_a_list(prompts, responses, rows):
    return 1.0


def nan_scores(prompts, responses, rows):
    return [float("nan")] * len(responses)


broken = 42


def char_count(prompts, responses, rows):
    return [float(len(r)) for r in responses]


def tag_length(prompts, responses, rows):
    """Length of each prompt row's `tag` field: shows which rows a judge was given."""
    return [float(len(row.get("tag", ""))) for row in rows]
