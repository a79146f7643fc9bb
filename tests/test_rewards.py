"""Reward functions, reward sources (ensembles, running normalisation), judges, distinct-2."""

import json
import math
import subprocess
import sys

import pytest
import torch

from rlhf.algo.stats import distinct_n, wilson_interval
from rlhf.infra.errors import NumericalFault, UserError
from rlhf.recipe import load_recipe
from rlhf.roles import reward_sources
from rlhf.roles.rewards import (
    answer_match,
    call_reward_function,
    format,
    length,
    load_reward_function,
    normalise_answer,
    numbers_in,
)


def _match(prompt: str, response: str, answer) -> float:
    return answer_match([[{"role": "user", "content": prompt}]], [response], [{"answer": answer}])[
        0
    ]


# ------------------------------------------------------------------------------ built-ins


def test_answer_match_numbers_by_hand():
    q = "What is 1234 + 567?"
    assert _match(q, "1234 + 567 = 1,801.", "1801") == 1.0
    assert _match(q, "1234 + 567 = 1,800.", "1801") == 0.0  # off by one: wrong
    assert _match(q, "It is 1801, or maybe 1800.", "1801") == 1.0  # the first new number
    assert _match(q, "Maybe 1800, or 1801.", "1801") == 0.0  # listing numbers does not help
    assert _match(q, "No idea.", "1801") == 0.0
    # precision follows the reference: '8.05' accepts 8.0467 (rounds to 8.05), not 8
    m = "Convert 5 miles to km."
    assert _match(m, "5 miles is 8.0467 km.", "8.05") == 1.0
    assert _match(m, "5 miles is about 8 km.", "8.05") == 0.0
    assert _match("What is 2 squared?", "2 squared is 4.", "4") == 1.0
    assert _match("Divide 12 by 1.", "12 / 1 = 12.", "12") == 1.0  # answer equals a prompt number
    assert _match("What is -3 + 1?", "It is -2.", "-2") == 1.0
    assert numbers_in("a 12,345 b -3 c 6.25 d .5") == [12345.0, -3.0, 6.25, 0.5]


def test_answer_match_strings_by_hand():
    assert _match("Capital of France?", "The capital of France is Paris.", "Paris") == 1.0
    assert _match("Capital of France?", "It is Lyon.", "Paris") == 0.0
    assert _match("Capital of Brazil?", "It's brasilia!", "Brasília") == 1.0  # accents, case
    assert _match("Capital of the US?", "Washington DC.", "Washington, D.C.") == 1.0
    assert _match("Opposite of 'hot'?", "The opposite is 'cold'.", "cold") == 1.0
    assert _match("Opposite of 'hot'?", "The opposite is 'coldness'.", "cold") == 0.0  # words
    assert normalise_answer("The  Czech Republic!") == "czech republic"
    # rows without an answer score 0.0 (accuracy counts only rows that have one)
    assert answer_match([[{"role": "user", "content": "hi"}]], ["4"], [{}]) == [0.0]


def test_answer_match_is_strict_about_what_the_answer_states():
    """An integer reference needs that exact integer; only the first candidate counts; a
    negated mention never counts. A reference with decimals keeps its rounding tolerance."""
    q = "What is 825 - 122?"
    assert _match(q, "825 - 122 = 702.5", "703") == 0.0  # not rounded to the integer
    assert _match(q, "825 - 122 = 703.4", "703") == 0.0
    assert _match(q, "825 - 122 = 703.", "703") == 1.0
    assert _match(q, "Not 703: it is 702.", "703") == 0.0  # negated
    assert _match(q, "It isn't 702, it is 703.", "703") == 0.0  # the first number is 702
    assert _match("Convert 5 miles to km.", "It is 8.0467 km.", "8.05") == 1.0  # decimals
    assert _match("Convert 5 miles to km.", "It is 8.06 km.", "8.05") == 0.0
    korea = "Seoul is the capital of which country?"
    assert _match(korea, "North Korea or South Korea.", "South Korea") == 0.0
    assert _match(korea, "Not South Korea: it is Japan.", "South Korea") == 0.0
    assert _match(korea, "It is not South Korea.", "South Korea") == 0.0
    assert _match(korea, "South Korea.", "South Korea") == 1.0
    assert _match(korea, "No, it is South Korea.", "South Korea") == 1.0  # a clause of its own
    assert _match(korea, "Not Japan: it is South Korea.", "South Korea") == 1.0
    assert _match(korea, "It is not Japan but South Korea.", "South Korea") == 1.0
    assert _match("Capital of the US?", "It's Washington, D.C.!", "Washington, D.C.") == 1.0
    mexico = "Mexico City is the capital of which country?"  # the answer inside the question
    assert _match(mexico, "Mexico City is the capital of Uruguay.", "Mexico") == 0.0
    assert _match(mexico, "Mexico City is the capital of Mexico.", "Mexico") == 1.0


def _shipped_items():
    """Every item of the shipped data's content tables (reward_data/build.py), with its
    reference answer where it has one."""
    import importlib.util
    import random
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "reward_data" / "build.py"
    spec = importlib.util.spec_from_file_location("reward_data_build", path)
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # dataclasses look their module up
    spec.loader.exec_module(build)
    rng = random.Random(build.SEED)
    makers = [
        "capital",
        "definition",
        "antonym",
        "past_tense",
        "list",
        "rewrite",
        "arithmetic",
        "conversion",
    ]
    groups = [g for kind in makers for g in getattr(build, f"{kind}_groups")(rng)]
    return [item for group in groups for item in group.items]


def test_shipped_best_answers_state_their_reference_and_wrong_ones_do_not():
    """answer_match on the shipped content: every best response states its reference answer
    (the strict rules refuse no correct answer), and no worst response does."""
    items = [i for i in _shipped_items() if i.answer is not None]
    assert len(items) > 100
    missed = [(i.prompt, i.best, i.answer) for i in items if not _match(i.prompt, i.best, i.answer)]
    assert not missed, missed[:5]
    # at 32 °F the worst response's mistake (x - 32, no 5/9) gives the right answer, 0 °C
    worst = [i for i in items if not i.worst.startswith("32 °F is 0 °C")]
    wrong = [(i.prompt, i.worst, i.answer) for i in worst if _match(i.prompt, i.worst, i.answer)]
    assert not wrong, wrong[:5]


def test_length_and_format_by_hand():
    rs = ["one two three", "one", "one two three four five six"]
    assert length([], rs, [], min=2, max=4) == [0.0, -1.0, -2.0]
    assert length([], ["abcdef"], [], max=4, unit="chars", penalty=0.5) == [-1.0]
    assert format([], ["see http://x.y", "no link"], [], pattern=r"https?://") == [1.0, 0.0]
    assert format(
        [], ["see http://x.y", "no link"], [], pattern=r"https?://", must_match=False
    ) == [0.0, 1.0]


def test_sentiment_and_afinn_lexicons():
    pytest.importorskip("vaderSentiment", reason="pip install -e '.[rewards]'")
    pytest.importorskip("afinn", reason="pip install -e '.[rewards]'")
    good, bad = "A wonderful, moving film.", "The plot was thin and boring."
    s = load_reward_function("sentiment")([], [good, bad], [{}, {}])
    a = load_reward_function("afinn")([], [good, bad], [{}, {}])
    assert s[0] > 0.5 and s[1] < 0
    assert a[0] > 0 and a[1] < 0
    # cap clips from above only: the positive review earns 0.3, the negative keeps its score
    capped = load_reward_function("sentiment")([], [good, bad], [{}, {}], cap=0.3)
    assert capped == [0.3, s[1]]


def test_distinct_2_by_hand():
    # bigrams: (the cat) (cat sat) | (the cat) (cat ran) (ran off): 5 in all, 4 distinct
    assert distinct_n(["The cat sat", "the cat ran off"], 2) == pytest.approx(4 / 5)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""], 2) == 0.0


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96*sqrt(0.016+0.00096)/1.38416
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


# ------------------------------------------------------------------------ resolving, errors


def test_load_reward_function_errors_are_one_line():
    assert load_reward_function("rlhf.roles.rewards:length") is length
    assert load_reward_function("rlhf.rewards:length") is length  # the path before rlhf/roles/
    assert load_reward_function("tests.reward_fns:digit_fraction")([], ["a1"], [{}]) == [0.5]
    for spec, words in [
        ("nope", "not a built-in"),
        ("no_such_module_xyz:f", "cannot import"),
        ("tests.reward_fns:missing", "no attribute"),
        ("tests.reward_fns:broken", "not callable"),
    ]:
        with pytest.raises(UserError, match=words) as err:
            load_reward_function(spec)
        assert "\n" not in str(err.value)


def test_wrong_return_shape_is_a_user_error():
    fn = load_reward_function("tests.reward_fns:wrong_length")
    with pytest.raises(UserError, match="returned 1 scores for 2 responses"):
        call_reward_function("wrong_length", fn, [[], []], ["a", "b"], [{}, {}], {})
    fn = load_reward_function("tests.reward_fns:not_a_list")
    with pytest.raises(UserError, match="list of floats"):
        call_reward_function("not_a_list", fn, [[]], ["a"], [{}], {})


def test_bad_module_function_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "ppo", "recipes/tiny.yaml", f"output_dir={tmp_path}",
         "ppo.rewards=[{function: no_such_module_xyz:score}]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "ppo.rewards.0" in lines[0] and "cannot import no_such_module_xyz" in lines[0]
    assert not (tmp_path / "ppo").exists()  # refused before any model loaded or folder written


def test_recipe_rejects_bad_reward_entries():
    for override, words in [
        ("ppo.rewards=[{function: length, model: x}]", "exactly one of"),
        ("ppo.rewards=[{function: length, args: {maxx: 3}}]", "unknown argument"),
        ("ppo.rewards=[{function: length, normalize: calibration}]", "for reward models"),
        ("ppo.rewards=[]", "at least one source"),
        ("eval.judges=[{function: nope}]", "not a built-in"),
    ]:
        with pytest.raises(UserError, match=words):
            load_recipe("recipes/tiny.yaml", [override])


# ------------------------------------------------------------------------------- combining


def test_ensemble_combines_with_mean_and_min_by_hand():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, -0.5])
    assert reward_sources.combine_scores([a, b], "mean").tolist() == [2.0, -1.0, 0.0]
    assert reward_sources.combine_scores([a, b], "min").tolist() == [1.0, -2.0, -0.5]
    total = reward_sources.weighted_total([a, b], [1.0, 0.5])
    assert total.tolist() == [2.5, -2.0, 0.25]


def _two_model_sources(combine: str) -> reward_sources.RewardSources:
    """Two 'reward models' (scorers) with calibrations, combined as one entry."""
    cal_a, cal_b = {"mean": 1.0, "std": 2.0}, {"mean": 0.0, "std": 1.0}
    raw_a = lambda p, r, f: torch.tensor([3.0, -1.0])  # noqa: E731 -> calibrated [1, -1]
    raw_b = lambda p, r, f: torch.tensor([0.5, 0.0])  # noqa: E731 -> calibrated [0.5, 0]
    src = reward_sources.Source(
        "ensemble", 2.0, "calibration", [("a", raw_a, cal_a), ("b", raw_b, cal_b)], combine
    )
    return reward_sources.RewardSources([src])


def test_several_reward_models_combine_with_mean_and_min():
    total, metrics = _two_model_sources("mean")([[], []], ["x", "y"], [{}, {}])
    assert total.tolist() == [2 * 0.75, 2 * -0.5]
    assert metrics["objective/score/a"] == pytest.approx(1.0)  # each member's raw mean
    assert "timing/score/ensemble" in metrics
    total, _ = _two_model_sources("min")([[], []], ["x", "y"], [{}, {}])
    assert total.tolist() == [2 * 0.5, 2 * -1.0]


def test_running_normalisation_by_hand_and_state_round_trip():
    m = reward_sources.RunningMoments()
    m.update([1.0, 3.0])
    m.update([5.0, float("nan")])  # non-finite scores never enter the statistics
    assert (m.count, m.mean) == (3, 3.0)
    assert m.std == pytest.approx(2.0)  # sample std of 1, 3, 5
    assert m.normalise(torch.tensor([5.0])).item() == pytest.approx(1.0)
    again = reward_sources.RunningMoments()
    again.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert again.state_dict() == m.state_dict()


def test_nonfinite_function_scores_follow_the_numerics_policy():
    fn = load_reward_function("tests.reward_fns:nan_scores")
    src = reward_sources.Source("nan", 1.0, "none", function=fn)
    skip = reward_sources.RewardSources([src], on_nonfinite="skip")
    total, _ = skip([[]], ["a"], [{}])
    assert math.isnan(total.item())  # reaches the advantages; the guard skips that step
    stop = reward_sources.RewardSources([src], on_nonfinite="stop")
    with pytest.raises(NumericalFault, match="reward source 'nan'"):
        stop([[]], ["a"], [{}])


# ------------------------------------------------------------------------------ PPO, judges


def test_function_reward_raises_the_score_in_ppo(tiny_model_dir):
    """A recipe's `module:function` reward drives PPO: the digit fraction rises."""
    from rlhf.algo.ppo import FixedKLController
    from rlhf.infra.runtime import make_accelerator
    from rlhf.infra.training import make_optimizer
    from rlhf.ppo.iteration import PPOContext, ppo_iteration
    from rlhf.roles import models
    from rlhf.roles.actor_critic import ActorCritic
    from tests.ppo.tiny_policy import small_vocab_policy

    recipe = load_recipe(
        "recipes/tiny.yaml",
        [
            "seed=0",
            "ppo.rewards=[{function: tests.reward_fns:digit_fraction, weight: 1.0}]",
            "ppo.batch_size=32", "ppo.mini_batch_size=16", "ppo.ppo_epochs=2",
            "ppo.temperature=1.0", "ppo.max_new_tokens=8",
            "ppo.optim={lr: 1.0e-2, warmup_ratio: 0.0, scheduler: constant}",
        ],
    )  # fmt: skip
    cfg = recipe.ppo
    sources = reward_sources.build(recipe, load_scorer=None)
    assert sources.calibration is None and not sources.passthrough
    accelerator = make_accelerator(recipe)
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    reference = small_vocab_policy().eval().requires_grad_(False)
    model = ActorCritic(small_vocab_policy())
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    prompt_ids = torch.randint(17, 64, (32, 6), generator=torch.Generator().manual_seed(0))
    prompts, rows = [[{"role": "user", "content": "x"}]] * 32, [{}] * 32
    scores = []
    for it in range(20):
        torch.manual_seed(it)
        seen = {}

        def score_fn(roll, seen=seen):
            total, metrics = sources(prompts, roll.texts, rows)
            seen.update(metrics)
            return total

        ctx = PPOContext(model, reference, optimizer, None, accelerator, tok,
                         FixedKLController(0.05), cfg, sources.calibration)  # fmt: skip
        batch = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}
        _, metrics = ppo_iteration(ctx, batch, score_fn, torch.Generator().manual_seed(it))
        assert metrics["objective/score"] == pytest.approx(seen["objective/score/digit_fraction"])
        scores.append(metrics["objective/score"])
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.15, f"digit fraction did not rise: {first:.3f} -> {last:.3f}"


def test_judge_of_a_policy_against_itself_gives_one_half():
    from rlhf.ppo.policy_eval import judge_summary

    scores = [0.3, -1.0, 2.0, 0.3]
    got = judge_summary(scores, list(scores), positive_above=0.0)
    assert got["win_rate"] == 0.5 and got["n"] == 4
    assert got["win_rate_ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert got["sft_positive_rate"] == got["ppo_positive_rate"] == 0.75


def test_compare_judge_of_a_policy_against_itself_gives_one_half(tmp_path, capsys):
    from rlhf.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in ("cats", "rain"))
    )
    out = tmp_path / "samples.jsonl"
    rc = main(
        ["eval", "compare", "tiny-llama", "tiny-llama", "--prompts", str(prompts),
         "--judge", "tests.reward_fns:char_count", "--samples-per-prompt", "3",
         "--max-new-tokens", "6", "--json", "--output", str(out)]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_prompts"] == 6 and summary["samples_per_prompt"] == 3
    (judge,) = summary["judges"]
    assert judge["win_rate_b_over_a"] == 0.5 and judge["ties"] == 6
    assert judge["win_rate_ci95"] == pytest.approx(list(wilson_interval(3, 6)))
    scores = [json.loads(line)["scores"]["tests.reward_fns:char_count"]["a"] for line in open(out)]
    assert len(set(scores)) > 1  # the judge does discriminate; the policies are just equal


def test_sentiment_recipe_runs_without_sft_or_reward_runs(tmp_path):
    """The positive-review recipe on the tiny model: PPO from the base model, VADER reward,
    AFINN judge; eval.json carries the judges and the fluency guards."""
    pytest.importorskip("vaderSentiment", reason="pip install -e '.[rewards]'")
    pytest.importorskip("afinn", reason="pip install -e '.[rewards]'")
    from rlhf.cli import main

    rc = main(
        ["ppo", "recipes/smollm2-135m-sentiment.yaml", f"output_dir={tmp_path}",
         "model.name=tiny-llama", "precision=fp32", "ppo.iterations=2", "ppo.batch_size=4",
         "ppo.samples_per_prompt=2",
         "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=6", "ppo.eval_size=3",
         "eval.samples_per_prompt=2", "ppo.save_every=1"]
    )  # fmt: skip
    assert rc == 0
    assert not (tmp_path / "sft").exists() and not (tmp_path / "reward").exists()
    result = json.loads((tmp_path / "ppo" / "eval.json").read_text())
    assert result["n_samples"] == 6 and result["samples_per_prompt"] == 2
    assert result["prompts_source"] == "eval_prompts"
    afinn = result["judges"]["afinn"]
    assert afinn["n"] == 6 and 0 <= afinn["ppo_positive_rate"] <= 1
    assert len(afinn["ppo_positive_rate_ci95"]) == 2
    for key in ("kl_mean", "eos_rate", "truncation_rate", "response_length_mean"):
        assert math.isfinite(result[key])
    assert set(result["distinct_2"]) == {"sft", "ppo"}
    assert "answer_accuracy" not in result  # review rows carry no answers
    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    logged = [r for r in rows if "objective/score/sentiment" in r]
    assert len(logged) == 2 and all("timing/score/sentiment" in r for r in logged)


def test_running_normalisation_resumes_exactly(tmp_path):
    """The running mean/std live in the checkpoint: resuming from iteration 2 reproduces the
    uninterrupted run's normalised scores at iterations 3 and 4."""
    import shutil

    from rlhf.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(6)))
    args = [
        "ppo.policy=base", f"ppo.prompts.path={prompts}", f"ppo.eval_prompts.path={prompts}",
        "ppo.rewards=[{function: tests.reward_fns:char_count, normalize: running}]",
        "ppo.iterations=4", "ppo.save_every=2", "ppo.eval_size=2", "eval.samples_per_prompt=1",
    ]  # fmt: skip
    first = tmp_path / "a"
    assert main(["ppo", "recipes/tiny.yaml", f"output_dir={first}", *args]) == 0
    ckpt = json.loads(
        (first / "ppo" / "checkpoints" / "step-000002" / "trainer_state.json").read_text()
    )["reward_sources"]["char_count"]
    assert ckpt["count"] == 8  # 2 iterations x 4 rollouts
    second = tmp_path / "b"
    shutil.copytree(first, second)
    assert main(["ppo", "recipes/tiny.yaml", f"output_dir={second}", *args, "--resume"]) == 0

    def scores(run):
        rows = [json.loads(line) for line in open(run / "ppo" / "metrics.jsonl")]
        return [(r["step"], r["objective/score"]) for r in rows if "objective/score" in r]

    assert scores(first) == scores(second)
    assert len(scores(first)) == 4


def test_shared_scorers_load_a_reward_model_once_and_score_a_batch_once(tmp_path):
    """The PPO stage's evaluation asks for the trained reward model again for its
    `reward_model` judge: the same model (by resolved path) is loaded once, and a batch it
    scored already is not run again. Another batch, or other finished flags, is scored."""
    from rlhf.ppo.policy_eval import SharedScorers

    loads, runs = [], []

    def load(model_dir):
        loads.append(model_dir)

        def scorer(prompts, texts, finished=None):
            runs.append(list(texts))
            done = [True] * len(texts) if finished is None else list(finished)
            return torch.tensor([len(t) + (0.5 if f else 0.0) for t, f in zip(texts, done)])

        return scorer

    (tmp_path / "rm").mkdir()
    shared = SharedScorers(load, keep=2)
    a, b = shared(tmp_path / "rm"), shared(tmp_path / "x" / ".." / "rm")
    assert a is b and len(loads) == 1
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    first = a(prompts, ["ab", "c"], [True, False])
    assert first.tolist() == [2.5, 1.0]
    first[0] = 99.0  # a caller's in-place edit does not reach the remembered scores
    assert b(prompts, ["ab", "c"], [True, False]).tolist() == [2.5, 1.0]
    assert len(runs) == 1
    assert a(prompts, ["ab", "c"], [True, True]).tolist() == [2.5, 1.5]  # other flags: run
    assert a(prompts, ["c", "ab"], [False, True]).tolist() == [1.0, 2.5]  # other order: run
    assert len(runs) == 3
    a(prompts, ["ab", "c"], [True, False])  # evicted (keep=2): run again
    assert len(runs) == 4
    shared(tmp_path / "other")
    assert len(loads) == 2
