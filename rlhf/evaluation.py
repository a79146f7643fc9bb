"""The one evaluator of a policy against another: the PPO and DPO stages' eval.json, the
judge curve during RL, and `rlhf eval compare`.

Two sides (SFT and the tuned policy, or POLICY_A and POLICY_B) answer the same prompts,
`samples_per_prompt` times each, with the same seeds, through the stages' decode path
(rlhf.ppo.rollout.sample_rollout). Reported: each side's KL to a reference (summed k1 over the
response at the sampling temperature), length, EOS, truncation and distinct-2; each judge's
means and the second side's win rate (ties half); the rubric's behaviour rates; answer
accuracy. Rates carry a 95% interval clustered by prompt (rlhf/algo/stats.py). Each rank
answers its share and values are gathered by sample index. Keys: the second side's numbers
unprefixed, the first side's under its name (`sft_eos_rate`, `judges[j]["sft_mean"]`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.algo.stats import CI_METHOD, clustered_rate, clustered_win_rate, distinct_n
from rlhf.infra import distributed
from rlhf.infra.errors import UserError
from rlhf.infra.rundir import require_completed
from rlhf.ppo.iteration import missing_eos_penalised
from rlhf.ppo.rollout import Rollout, sample_rollout
from rlhf.roles import reward_sources
from rlhf.roles.actor_critic import causal_lm_logits, eval_mode
from rlhf.roles.rewards import answer_match, call_reward_function, has_answer, load_reward_function
from rlhf.tokens.chat import encode_prompt, last_user_text, pad_batch
from rlhf.tokens.decoding import Decoding
from rlhf.tokens.sequences import logprobs_from_logits, response_keep

OpenModel = Callable[[], AbstractContextManager[torch.nn.Module]]


@dataclass
class Sampling:
    """How both sides answer, as sample_rollout reads it. Plain sampling at the temperature is
    the stages' path (rlhf.accel's sampler where it applies); greedy, top-k, top-p or beams
    (`rlhf eval compare`) go through generate."""

    plan: Decoding
    stop_strings: tuple[str, ...] = ()
    max_prompt_length: int = 1024
    max_new_tokens = property(lambda self: self.plan.max_new_tokens)
    temperature = property(lambda self: self.plan.temperature)

    @classmethod
    def of_recipe(cls, recipe: Any) -> Sampling:
        cfg = recipe.ppo  # the stages' sampling settings
        plan = Decoding(cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature)
        return cls(plan, tuple(cfg.stop_strings), cfg.max_prompt_length)

    @property
    def decoding(self) -> Decoding | None:
        """None for plain sampling at the temperature, else the settings for generate."""
        d = self.plan
        plain = d.do_sample and not d.top_k and d.top_p == 1.0 and d.num_beams == 1
        return None if plain else d

    @property
    def kl_temperature(self) -> float:
        return self.plan.temperature if self.plan.do_sample else 1.0


@dataclass
class Side:
    """One policy: its name in the keys, and a context that gives its model (loaded and freed
    by `rlhf eval compare`; in memory in the stages). `kl`: measure its KL to the reference."""

    name: str
    model: OpenModel
    kl: bool = True


@dataclass
class Answers:
    """One side's answers to this rank's prompts, and per-sample values to gather."""

    texts: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    rollouts: list[Rollout] = field(default_factory=list)

    def add(self, roll: Rollout, max_new_tokens: int) -> None:
        lengths = roll.mask.sum(1).float().cpu()
        ended = roll.ended_with_eos.cpu()
        truncated = (~ended) & (lengths >= max_new_tokens)
        for key, value in (("len", lengths), ("eos", ended.float()), ("trunc", truncated.float())):
            self.values.setdefault(key, []).append(value)
        self.texts.extend(roll.texts)
        self.finished.extend(ended.tolist())
        self.rollouts.append(
            Rollout(roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.mask)
        )


@dataclass
class Evaluation:
    """What the evaluation runs on: the prompt items (messages, fields), how many samples
    each, the sampling, the tokenizer, the (prepared or local) accelerator, a base seed, the
    sampling and scoring batch sizes and a progress line printer."""

    prompts: list[Any]
    samples_per_prompt: int
    sampling: Sampling
    tokenizer: Any
    accelerator: Any
    seed: int = 0
    batch_size: int = 8
    score_batch_size: int = 8
    progress: Callable[[str], None] = print


class LocalAccelerator:
    """What the evaluator reads of an accelerate Accelerator, for one process on one device
    (`rlhf eval compare`)."""

    process_index, num_processes, state, mixed_precision = 0, 1, None, "no"

    def __init__(self, device: torch.device):
        self.device = device

    def autocast(self) -> AbstractContextManager:
        return nullcontext()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return values


# ---------------------------------------------------------------------------------- sampling


@torch.no_grad()
def summed_logprobs(
    model: torch.nn.Module, roll: Rollout, temperature: float, autocast: Any
) -> torch.Tensor:
    """(B,) summed log pi(token) over each response's own tokens at the temperature, from the
    logits the tokens were sampled from where the rollout kept them (as PPO's own log-probs)."""
    R = roll.response_ids.shape[1]
    logits = roll.sampling_logits
    if logits is None:
        with autocast():
            logits = causal_lm_logits(model, roll.input_ids, roll.attention_mask, response_keep(R))
    logp = logprobs_from_logits(logits[:, :R], roll.response_ids, temperature)
    return (logp * roll.mask).sum(1).float().cpu()


def answer_all(ev: Evaluation, side: Side, messages: list[list[dict]]) -> Answers:
    """Side `side` answers this rank's prompts batch by batch (batch at `start` seeded with
    seed + start + rank, for every side alike); with `kl`, the log-probs of its answers."""
    acc, tok, sampling = ev.accelerator, ev.tokenizer, ev.sampling
    answers, began, logprobs = Answers(), time.monotonic(), []
    with side.model() as model:
        for start in range(0, len(messages), ev.batch_size):
            group = messages[start : start + ev.batch_size]
            encoded = [encode_prompt(tok, m, sampling.max_prompt_length) for m in group]
            batch = pad_batch(encoded, tok.pad_token_id, side="left")
            ids = batch["input_ids"].to(acc.device)
            mask = batch["attention_mask"].to(acc.device)
            torch.manual_seed(ev.seed + start + acc.process_index)
            keep = side.kl and sampling.decoding is None  # the logits it sampled from
            with acc.autocast():
                roll = sample_rollout(model, ids, mask, sampling, tok, keep_sampling_outputs=keep)
            answers.add(roll, sampling.max_new_tokens)
            if side.kl:
                logprobs.append(summed_logprobs(model, roll, sampling.kl_temperature, acc.autocast))
            roll.sampling_logits = roll.sampling_hidden = None
            done = min(start + ev.batch_size, len(messages))
            ev.progress(
                f"eval: {side.name} answered {done}/{len(messages)} "
                f"({time.monotonic() - began:.0f} s)"
            )
    answers.values["logprobs"] = logprobs
    return answers


def add_kl(ev: Evaluation, answers: dict[str, Answers], sides: list[Side], reference: OpenModel):
    """Each `kl` side's per-sample KL: its summed log-probs minus the reference's."""
    with reference() as ref:
        for side in sides:
            if side.kl:
                mine = answers[side.name]
                ref_lp = [
                    summed_logprobs(ref, r, ev.sampling.kl_temperature, ev.accelerator.autocast)
                    for r in mine.rollouts
                ]
                mine.values["kl"] = [a - b for a, b in zip(mine.values["logprobs"], ref_lp)]


# ----------------------------------------------------------------------------------- gather


class Gather:
    """Scores this rank's samples in batches and gathers every rank's values by sample index,
    each sample once (the padded shares of a sharded run repeat some)."""

    def __init__(self, ev: Evaluation, mine: list[int], n_pool: int):
        self.ev, self.mine, self.n_pool = ev, mine, n_pool
        self.messages = [ev.prompts[i // ev.samples_per_prompt].messages for i in mine]
        self.fields = [ev.prompts[i // ev.samples_per_prompt].fields for i in mine]

    def __call__(self, values: list[torch.Tensor] | torch.Tensor) -> list[float]:
        if isinstance(values, list):
            values = torch.cat(values) if values else torch.zeros(0)
        values = values.to(self.ev.accelerator.device).float()
        every = distributed.gather_evaluated(self.ev.accelerator, values, self.n_pool)
        return every.cpu().tolist()

    def scores(self, score: Callable[..., Any], answers: Answers) -> list[float]:
        """`score(messages, texts, rows, finished)` of one side's answers, gathered."""
        size, parts = self.ev.score_batch_size, []
        for i in range(0, len(self.messages), size):
            got = score(
                self.messages[i : i + size],
                answers.texts[i : i + size],
                self.fields[i : i + size],
                answers.finished[i : i + size],
            )
            parts.append(torch.as_tensor(got, dtype=torch.float32).cpu())
        return self(parts)

    def texts(self, texts: list[str]) -> list[str]:
        """Every rank's texts in sample order, each sample once."""
        pairs = list(zip(self.mine, texts))
        if self.ev.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            pairs = list(gather_object(pairs))
        return texts_in_order(pairs, self.n_pool)


def texts_in_order(pairs: list[tuple[int, str]], n: int) -> list[str]:
    """(sample index, text) pairs from every rank, padded shares repeating some -> n texts."""
    by_index = dict(pairs)
    return [by_index[i] for i in range(n)]


# ----------------------------------------------------------------------------------- judges


def versus(
    base: list[float],
    other: list[float],
    spp: int,
    names: tuple[str, str],
    positive_above: float | None = None,
) -> dict[str, Any]:
    """Means, the win rate of the second side over the first (ties half) with its clustered
    interval and counts, and optionally each side's rate of scores above a threshold."""
    prompts = [i // spp for i in range(len(other))]
    wins = clustered_win_rate(base, other, prompts)
    out: dict[str, Any] = {
        f"{names[0]}_mean": mean(base),
        f"{names[1]}_mean": mean(other),
        "win_rate": wins["rate"],
        "win_rate_ci95": [wins["low"], wins["high"]],
        **{k: wins[k] for k in ("wins", "ties", "losses", "n_prompts")},
        "n": len(other),
    }
    if positive_above is not None:
        for name, values in zip(names, (base, other)):
            hits = [float(v > positive_above) for v in values]
            out.update(rate_entry(f"{name}_positive_rate", hits, prompts))
        out["positive_above"] = positive_above
    return out


def rate_entry(name: str, outcomes: list[float], prompts: list[int]) -> dict[str, Any]:
    """{name: rate, name_ci95: [low, high]} of 0/1 outcomes, clustered by prompt."""
    got = clustered_rate(outcomes, prompts)
    return {name: got["rate"], f"{name}_ci95": [got["low"], got["high"]]}


def judge_scorer(
    entry: Any, name: str, load_scorer: Callable, output_dir: str
) -> tuple[Callable, Path | None]:
    """(score(messages, texts, rows, finished), its reward model's folder or None) of one eval
    judge: a reward model or a function. A reward-model judge that is missing or unfinished
    raises UserError."""
    if entry.model is None:
        fn = load_reward_function(entry.function)
        return lambda m, t, rows, f: call_reward_function(name, fn, m, t, rows, entry.args), None
    path = reward_sources.expand_path(entry.model, output_dir)
    model_dir, run_dir = reward_sources.reward_model_dir(path)
    if run_dir is not None:
        require_completed(run_dir, f"eval.judges ({name}):")
    scorer = load_scorer(model_dir)
    return lambda m, t, rows, f: scorer(m, t, f), Path(model_dir)


def judge_all(
    ev: Evaluation, gathered: Gather, answers: dict[str, Answers], scoring: Scoring
) -> tuple[dict, dict]:
    """({name: versus summary}, {name: {side: scores}}) of every judge; a reward-model judge
    that cannot be loaded is reported as skipped, with its reason."""
    names, entries = tuple(answers), scoring.judges
    judges, scores = {}, {}
    for entry, name in zip(entries, reward_sources.source_names(entries)):
        try:
            score, model_dir = judge_scorer(entry, name, scoring.load_scorer, scoring.output_dir)
        except UserError as e:
            ev.progress(f"eval: judge {name} skipped: {e}")
            judges[name] = {"skipped": str(e)}
            continue
        scores[name] = {side: gathered.scores(score, answers[side]) for side in names}
        judges[name] = versus(
            *scores[name].values(), ev.samples_per_prompt, names, entry.positive_above
        )
        if model_dir is not None:
            judges[name].update(calibrated_means(model_dir, scores[name]))
        del score  # a reward model is freed before the next one loads
    return judges, scores


def calibrated_means(model_dir: Path, scores: dict[str, list[float]]) -> dict:
    """A reward-model judge's stored calibration (the reward stage's mean / std, from
    reward_calibration.json, else config.json) and each side's mean score under it."""
    config = model_dir / "config.json"
    found = reward_sources.load_calibration(model_dir) or (
        json.loads(config.read_text()).get("reward_calibration") if config.is_file() else None
    )
    out: dict[str, Any] = {"calibration": found or None}
    for side, values in scores.items():
        calibrated = reward_sources.calibrate(torch.tensor(values), found) if found else None
        out[f"{side}_calibrated_mean"] = None if calibrated is None else calibrated.mean().item()
    return out


def behaviour_rates(gathered: Gather, answers: dict[str, Answers], classify: Callable) -> dict:
    """The rate of each rubric behaviour per side, clustered by prompt, over the samples it
    applies to (`classify` answers None where it does not: refusals on harmless prompts)."""
    per_side: dict[str, dict[str, list[float]]] = {}
    for side, mine in answers.items():
        flags = [
            classify({**f, "prompt": m}, t)
            for m, f, t in zip(gathered.messages, gathered.fields, mine.texts)
        ]
        keys = sorted({k for f in flags for k in f})
        coded = {
            k: torch.tensor([-1.0 if f.get(k) is None else float(f[k]) for f in flags])
            for k in keys
        }
        per_side[side] = {k: gathered(v) for k, v in coded.items()}
    out = {}
    spp = gathered.ev.samples_per_prompt
    for key in next(iter(per_side.values()), {}):
        applies = [i for i, v in enumerate(next(iter(per_side.values()))[key]) if v >= 0]
        if not applies:
            continue
        entry: dict[str, Any] = {"n": len(applies)}
        for side, values in per_side.items():
            entry.update(
                rate_entry(side, [values[key][i] for i in applies], [i // spp for i in applies])
            )
        out[key] = entry
    return out


def answer_accuracy(gathered: Gather, answers: dict[str, Answers]) -> dict[str, Any] | None:
    """Accuracy on the rows that carry an `answer` (answer_match), clustered; None if none."""
    has = gathered(torch.tensor([float(has_answer(f)) for f in gathered.fields]))
    rows = [i for i, h in enumerate(has) if h]
    if not rows:
        return None

    def matches(m: list, t: list[str], r: list[dict], f: list[bool]) -> list[float]:
        return answer_match(m, t, r)

    out: dict[str, Any] = {"n": len(rows)}
    prompts = [i // gathered.ev.samples_per_prompt for i in rows]
    for side, mine in answers.items():
        ok = gathered.scores(matches, mine)
        out.update(rate_entry(side, [ok[i] for i in rows], prompts))
    return out


# ------------------------------------------------------------------------------ evaluation


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


SIDE_STATS = {
    "kl": "kl_mean",
    "len": "response_length_mean",
    "eos": "eos_rate",
    "trunc": "truncation_rate",
}


def side_stats(gathered: Gather, answers: dict[str, Answers], names: tuple[str, str]) -> dict:
    """Length, EOS, truncation, KL (where measured) and distinct-2 of each side."""
    out: dict[str, Any] = {}
    for side in names:
        prefix = "" if side == names[1] else f"{side}_"
        values = answers[side].values
        for key, name in SIDE_STATS.items():
            if key in values:  # kl: where measured
                out[prefix + name] = mean(gathered(values[key]))
    return out


@dataclass
class Scoring:
    """What judges the answers: eval judge entries, a loader of reward-model scorers, the
    run's output_dir (for '{output_dir}' in judge paths), an optional training score
    (messages, texts, rows, finished) -> scores with its missing-EOS penalty, and the rubric's
    classify (None: no behaviour rates)."""

    judges: list[Any]
    load_scorer: Callable[[Path], Callable]
    output_dir: str = ""
    training_score: Callable[..., Any] | None = None
    missing_eos_penalty: float | None = None
    classify: Callable[[dict, str], dict] | None = None


@torch.no_grad()
def evaluate(
    ev: Evaluation, sides: list[Side], reference: OpenModel | None, scoring: Scoring
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-sample records) of sides[1] against sides[0] on every prompt x
    samples_per_prompt; records are in sample order (each prompt's samples in a row)."""
    spp, n_pool = ev.samples_per_prompt, len(ev.prompts) * ev.samples_per_prompt
    mine = distributed.rank_indices(n_pool, ev.accelerator)
    gathered = Gather(ev, mine, n_pool)
    answers = {side.name: answer_all(ev, side, gathered.messages) for side in sides}
    if reference is not None and any(side.kl for side in sides):
        add_kl(ev, answers, sides, reference)
    names = (sides[0].name, sides[1].name)
    summary: dict[str, Any] = {
        "n_prompts": len(ev.prompts),
        "n_samples": n_pool,
        "samples_per_prompt": spp,
        "win_rate_ci_method": CI_METHOD,
    }
    scores: dict[str, dict[str, list[float]]] = {}
    if scoring.training_score is not None:
        scores["training"] = training_scores(gathered, answers, scoring)
        trained = versus(*scores["training"].values(), spp, names)
        summary.update({f"{w}_score_mean": trained[f"{w}_mean"] for w in names})
        summary.update(
            {k: trained[k] for k in ("win_rate", "win_rate_ci95", "wins", "ties", "losses")}
        )
    summary.update(side_stats(gathered, answers, names))
    summary["sampling"] = dataclasses.asdict(ev.sampling.plan)
    summary["kl_temperature"] = ev.sampling.kl_temperature if reference is not None else None
    texts = {side: gathered.texts(answers[side].texts) for side in names}
    summary["distinct_2"] = {side: distinct_n(texts[side], 2) for side in names}
    judges, judged = judge_all(ev, gathered, answers, scoring)
    scores.update(judged)
    if judges:
        summary["judges"] = judges
    if scoring.classify is not None:
        summary["behaviour"] = behaviour_rates(gathered, answers, scoring.classify)
    accuracy = answer_accuracy(gathered, answers)
    if accuracy:
        summary["answer_accuracy"] = accuracy
    return summary, records(ev, gathered, answers, texts, scores)


def training_scores(gathered: Gather, answers: dict[str, Answers], scoring: Scoring) -> dict:
    """Each side's training score, as PPO optimises it (the missing-EOS penalty included)."""

    def score(m: list, t: list[str], rows: list[dict], f: list[bool]) -> torch.Tensor:
        got = scoring.training_score(m, t, rows, f).float().cpu()
        return missing_eos_penalised(got, torch.tensor(f), scoring.missing_eos_penalty)

    return {side: gathered.scores(score, mine) for side, mine in answers.items()}


def records(
    ev: Evaluation,
    gathered: Gather,
    answers: dict[str, Answers],
    texts: dict[str, list[str]],
    scores: dict[str, dict[str, list[float]]],
) -> list:
    """One record per sample: the prompt, each side's answer, tokens, EOS, KL and scores."""
    per_side = {
        side: {k: gathered(v) for k, v in mine.values.items() if k in ("len", "eos", "kl")}
        for side, mine in answers.items()
    }
    out = []
    for i in range(len(ev.prompts) * ev.samples_per_prompt):
        record: dict[str, Any] = {
            "prompt": last_user_text(ev.prompts[i // ev.samples_per_prompt].messages)
        }
        for side, values in per_side.items():
            record[side] = texts[side][i]
            record[f"{side}_tokens"] = int(values["len"][i])
            record[f"{side}_finished"] = bool(values["eos"][i])
            if "kl" in values:
                record[f"{side}_kl"] = values["kl"][i]
        record["scores"] = {
            name: {s: v[i] for s, v in by_side.items()} for name, by_side in scores.items()
        }
        out.append(record)
    return out


# ------------------------------------------------------------------------------ the stages


def rubric_classify() -> Callable[[dict, str], dict] | None:
    """rlhf.roles.rubric.classify, the rubric's programmatic judge; None where it is absent."""
    try:
        from rlhf.roles import rubric
    except ImportError:
        return None
    return rubric.classify


def evaluate_stage(
    model: Any,
    reference: torch.nn.Module | None,
    tokenizer: Any,
    prompts: list[Any],
    recipe: Any,
    accelerator: Any,
    scoring: Scoring,
    label: str,
    progress: Callable[[str], None],
    samples_per_prompt: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The tuned policy (`model.policy`, an actor-critic) against the SFT policy (`reference`,
    else the policy with its LoRA adapter off) on prompts x samples_per_prompt (default
    eval.samples_per_prompt), sampled as the rollouts are, with the same seeds every call."""

    @contextmanager
    def tuned() -> Iterator[torch.nn.Module]:
        with eval_mode(model):
            yield model.policy

    @contextmanager
    def sft() -> Iterator[torch.nn.Module]:
        with eval_mode(model), nullcontext() if reference is not None else model.adapter_disabled():
            yield reference if reference is not None else model.policy

    ev = Evaluation(
        prompts,
        samples_per_prompt or recipe.eval.samples_per_prompt,
        Sampling.of_recipe(recipe),
        tokenizer,
        accelerator,
        recipe.seed + 12345,
        recipe.eval.batch_size or recipe.ppo.batch_size,
        recipe.ppo.batch_size,
        progress,
    )
    return evaluate(ev, [Side("sft", sft, kl=False), Side(label, tuned)], sft, scoring)


def curve_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """One point of the judge curve during RL: the trained reward model's and each judge's win
    rate over the SFT policy, and the KL to it."""
    out = {"eval/kl": summary["kl_mean"]}
    if "win_rate" in summary:
        out["eval/rm_win_rate"] = summary["win_rate"]
    for name, judge in summary.get("judges", {}).items():
        if "win_rate" in judge:
            out[f"eval/judge_win_rate/{name}"] = judge["win_rate"]
    return out
