"""split_by_prompt: disjoint by prompt, deterministic by seed, stable when rows are added."""

from __future__ import annotations

from rlhf.data import Prompt, Ranking, SFTExample, split_by_prompt
from rlhf.data.split import prompt_text


def rankings(n: int, per_prompt: int = 1) -> list[Ranking]:
    out = []
    for i in range(n):
        for j in range(per_prompt):
            prompt = [{"role": "user", "content": f"question {i}"}]
            out.append(Ranking(prompt, [f"a{j}", f"b{j}", f"c{j}"], [0, 1, 2], f"f:{i}"))
    return out


def test_disjoint_and_complete():
    items = rankings(200, per_prompt=3)
    train, evals = split_by_prompt(items, 0.2, seed=1)
    assert len(train) + len(evals) == len(items)
    assert not {prompt_text(x) for x in train} & {prompt_text(x) for x in evals}
    assert 0.1 < len(evals) / len(items) < 0.3


def test_ranking_stays_whole():
    items = rankings(50)
    train, evals = split_by_prompt(items, 0.3, seed=0)
    for r in train + evals:
        assert r.responses == ["a0", "b0", "c0"] and r.ranking == [0, 1, 2]


def test_deterministic_and_seeded():
    items = rankings(100)
    assert split_by_prompt(items, 0.2, seed=3) == split_by_prompt(items, 0.2, seed=3)
    assert split_by_prompt(items, 0.2, seed=3)[1] != split_by_prompt(items, 0.2, seed=4)[1]


def test_adding_rows_does_not_move_others():
    items = rankings(100)
    _, before = split_by_prompt(items, 0.2, seed=7)
    _, after = split_by_prompt(items + rankings(150)[100:], 0.2, seed=7)
    assert [prompt_text(x) for x in after if x in items] == [prompt_text(x) for x in before]


def test_zero_fraction_and_small_data():
    items = rankings(5)
    assert split_by_prompt(items, 0.0, seed=0) == (items, [])
    train, evals = split_by_prompt(rankings(2), 0.01, seed=0)
    assert len(train) == 1 and len(evals) == 1  # each split gets a prompt when it can


def test_sft_and_prompts_group_by_prompt():
    a = [{"role": "user", "content": "same"}]
    sft = [SFTExample([*a, {"role": "assistant", "content": str(i)}]) for i in range(10)]
    sft += [
        SFTExample([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "x"}])
        for i in range(30)
    ]
    train, evals = split_by_prompt(sft, 0.3, seed=0)
    shared = [x for x in sft if x.prompt == a]
    assert all(x in train for x in shared) or all(x in evals for x in shared)
    prompts = [Prompt([{"role": "user", "content": f"p{i}"}]) for i in range(20)]
    train, evals = split_by_prompt(prompts, 0.25, seed=0)
    assert len(train) + len(evals) == 20 and evals
