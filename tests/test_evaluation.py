"""rlhf.evaluation: the one evaluator of a policy against another (PPO, DPO, eval compare)."""

from __future__ import annotations

import torch

from rlhf import evaluation
from rlhf.data.types import Prompt
from rlhf.tokens.decoding import Decoding


class _Gathered:
    """A Gather over one rank whose samples are given (no model): what the judges read."""

    def __init__(self, prompts: list[Prompt], spp: int):
        ev = evaluation.Evaluation(
            prompts,
            spp,
            evaluation.Sampling(Decoding(8)),
            None,
            evaluation.LocalAccelerator(torch.device("cpu")),
        )
        self.gathered = evaluation.Gather(ev, list(range(len(prompts) * spp)), len(prompts) * spp)


def _answers(texts: list[str], finished: list[bool] | None = None) -> evaluation.Answers:
    return evaluation.Answers(texts=texts, finished=finished or [True] * len(texts))


def test_texts_of_padded_shares_count_each_sample_once():
    # 5 samples on 2 sharded ranks: rank 0 answers 0, 2, 4 and rank 1 answers 1, 3 and (padding)
    # 0 again. distinct-2 must see sample 0 once.
    pairs = [(0, "a b"), (2, "c d"), (4, "e f"), (1, "a b"), (3, "g h"), (0, "a b")]
    assert evaluation.texts_in_order(pairs, 5) == ["a b", "a b", "c d", "g h", "e f"]


def test_training_score_includes_the_missing_eos_penalty():
    prompts = [Prompt([{"role": "user", "content": "q"}])]
    gathered = _Gathered(prompts, 2).gathered
    scoring = evaluation.Scoring(
        [],
        None,
        training_score=lambda m, t, rows, f: torch.tensor([1.0, 1.0]),
        missing_eos_penalty=0.5,
    )
    answers = {"sft": _answers(["x", "y"], [True, False]), "ppo": _answers(["x", "y"])}
    got = evaluation.training_scores(gathered, answers, scoring)
    assert got == {"sft": [1.0, 0.5], "ppo": [1.0, 1.0]}


def test_behaviour_rates_with_a_fake_rubric():
    # 2 prompts x 2 samples; the second prompt is harmful, so `refused` applies to it alone.
    prompts = [
        Prompt([{"role": "user", "content": "hi"}]),
        Prompt([{"role": "user", "content": "harm"}], fields={"category": "harmful"}),
    ]

    def classify(row: dict, text: str) -> dict:
        harmful = row.get("category") == "harmful"
        return {"padded": "!" in text, "refused": ("no" in text) if harmful else None}

    gathered = _Gathered(prompts, 2).gathered
    answers = {
        "sft": _answers(["ok!", "ok!", "no", "sure"]),
        "ppo": _answers(["ok", "ok!", "no", "no"]),
    }
    got = evaluation.behaviour_rates(gathered, answers, classify)
    assert got["padded"]["n"] == 4 and got["refused"]["n"] == 2
    assert (got["padded"]["sft"], got["padded"]["ppo"]) == (0.5, 0.25)
    assert (got["refused"]["sft"], got["refused"]["ppo"]) == (0.5, 1.0)
    # One prompt: no spread between prompts to estimate, the interval is [0, 1].
    assert got["refused"]["ppo_ci95"] == [0.0, 1.0]
    assert len(got["padded"]["sft_ci95"]) == 2


def test_answer_accuracy_counts_only_rows_with_an_answer():
    prompts = [
        Prompt([{"role": "user", "content": "2+2?"}], fields={"answer": "4"}),
        Prompt([{"role": "user", "content": "hi"}]),
    ]
    gathered = _Gathered(prompts, 1).gathered
    answers = {"sft": _answers(["4", "hello"]), "ppo": _answers(["5", "hello"])}
    got = evaluation.answer_accuracy(gathered, answers)
    assert (got["n"], got["sft"], got["ppo"]) == (1, 1.0, 0.0)


def test_sampling_uses_the_stages_path_only_for_plain_sampling():
    assert evaluation.Sampling(Decoding(8, do_sample=True, temperature=0.7)).decoding is None
    greedy = evaluation.Sampling(Decoding(8, do_sample=False))
    assert greedy.decoding is greedy.plan and greedy.kl_temperature == 1.0
    top_k = Decoding(8, do_sample=True, temperature=0.7, top_k=5)
    assert evaluation.Sampling(top_k).decoding is top_k
