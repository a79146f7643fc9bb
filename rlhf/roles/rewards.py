"""Programmatic rewards: built-in reward functions and the resolver for `module:function`.

A reward function scores a batch of responses:

    fn(prompts: list[list[dict]], responses: list[str], rows: list[dict], **args) -> list[float]

`prompts` are the chat messages each response answers, `rows` the prompt rows' extra fields
(e.g. a reference `answer`), `args` the recipe entry's `args`. One float per response.

Built-ins (names usable in a recipe or `--judge`):
  sentiment     VADER compound score in [-1, 1] (Hutto & Gilbert 2014; `pip install -e '.[rewards]'`)
  afinn         AFINN-165 word-list score (Nielsen 2011), a second, independent lexicon for judging
  answer_match  1.0 when the response states the row's reference `answer`, else 0.0
  length        0 inside a target length range, a linear penalty outside it
  format        1.0 / 0.0: a regex must (or must not) match

This module imports no torch: the recipe loader resolves functions before any model loads.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import cache
from typing import Any

from rlhf.infra.errors import UserError

RewardFunction = Callable[..., Sequence[float]]

REWARDS_EXTRA = "pip install -e '.[rewards]'"


# ------------------------------------------------------------------------------- lexicons


# Built-in -> (module, analyser class, package) of its lexicon, an optional dependency.
LEXICONS = {
    "sentiment": ("vaderSentiment.vaderSentiment", "SentimentIntensityAnalyzer", "vaderSentiment"),
    "afinn": ("afinn", "Afinn", "afinn"),
}


@cache
def _lexicon(reward: str) -> Any:
    module, analyser, package = LEXICONS[reward]
    try:
        return getattr(importlib.import_module(module), analyser)()
    except ImportError:
        raise UserError(
            f"the '{reward}' reward needs the {package} package: {REWARDS_EXTRA}"
        ) from None


def sentiment(
    prompts: list, responses: list[str], rows: list[dict], cap: float | None = None, **_: Any
) -> list[float]:
    """VADER's compound polarity of each response, in [-1, 1] (positive is > 0). `cap` clips
    it from above (a saturating reward: the KL budget goes to turning negative reviews
    positive rather than making positive ones gush)."""
    analyzer = _lexicon("sentiment")
    scores = [float(analyzer.polarity_scores(r)["compound"]) for r in responses]
    return scores if cap is None else [min(s, cap) for s in scores]


def afinn(
    prompts: list, responses: list[str], rows: list[dict], per_word: bool = False, **_: Any
) -> list[float]:
    """Sum of AFINN word valences (-5..5 per word); per_word divides by the word count."""
    lexicon = _lexicon("afinn")
    return [
        float(lexicon.score(r)) / (max(1, len(r.split())) if per_word else 1) for r in responses
    ]


# -------------------------------------------------------------------------- answer_match

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?|(?<![\w.])-?\.\d+")


def normalise_answer(text: str) -> str:
    """SQuAD-style answer normalisation (Rajpurkar et al. 2016): lower case, accents and
    punctuation removed, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = "".join(c for c in text if c.isalnum() or c.isspace())
    return " ".join(_ARTICLES.sub(" ", text).split())


def numbers_in(text: str) -> list[float]:
    """Every number written in the text, in order: '12,345', '-3', '6.25', '.5'."""
    return [x for _, x in _numbers_at(text)]


def _numbers_at(text: str) -> list[tuple[int, float]]:
    """(where it starts, value) of every number in the text."""
    found = []
    for m in _NUMBER.finditer(text):
        with suppress(ValueError):  # '1,,2'-like noise
            found.append((m.start(), float(m.group().replace(",", ""))))
    return found


def parse_number(text: str) -> float | None:
    """The answer as a number when it is one ('1,801', '-4', '8.05'), else None."""
    found = numbers_in(text)
    stripped = re.sub(r"[\s$€£%,]", "", text)
    if len(found) == 1 and re.fullmatch(r"-?\d*\.?\d+", stripped):
        return found[0]
    return None


def _decimals(text: str) -> int:
    whole, _, frac = text.strip().partition(".")
    return len(re.sub(r"\D", "", frac))


def numbers_match(stated: float, reference: str, rel_tol: float = 0.0) -> bool:
    """An integer reference needs that exact number; one with decimals accepts what rounds to
    it at its precision ('8.05' accepts 8.0467 but not 8), or is within rel_tol of it."""
    ref = parse_number(reference)
    if ref is None:
        return False
    decimals = _decimals(reference)
    if decimals == 0:
        return stated == ref
    half_unit = 0.5 * 10**-decimals
    return abs(stated - ref) <= half_unit + 1e-9 or math.isclose(stated, ref, rel_tol=rel_tol)


# Words that negate what follows them ("not Paris", "isn't 703"), after normalise_answer.
_NEGATIONS = frozenset(
    "not no never neither nor isnt arent wasnt werent doesnt dont didnt cant cannot wont".split()
)
_CLAUSE_END = re.compile(r"[.,;:!?]|\bbut\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.;:!?]")


def negated(before: str, reach: int = 2) -> bool:
    """Is what follows `before` (the response up to a mention) negated: one of the last
    `reach` words of its clause a negation ('It is not Paris', 'Not 703: ...')?"""
    clause = _CLAUSE_END.split(before)[-1]
    return any(w in _NEGATIONS for w in normalise_answer(clause).split()[-reach:])


def offers_alternatives(before: str) -> bool:
    """Does the sentence before a mention offer another candidate ('North Korea or ...')?"""
    return "or" in normalise_answer(_SENTENCE_END.split(before)[-1]).split()


def first_mention(response: str, wanted: str, prompt: str = "") -> int | None:
    """Where the first whole-word occurrence of `wanted` (normalised) starts in the response,
    matched word by word after normalise_answer. An occurrence that repeats a phrase of the
    prompt (with the word before or after it) is skipped."""
    spans = [(m.start(), normalise_answer(m.group())) for m in re.finditer(r"\S+", response)]
    words = [(start, w) for start, word in spans for w in word.split()]
    said, target = [w for _, w in words], wanted.split()
    asked = f" {normalise_answer(prompt)} "
    for i in range(len(said) - len(target) + 1):
        if said[i : i + len(target)] != target:
            continue
        around = [said[max(i - 1, 0) : i + len(target)], said[i : i + len(target) + 1]]
        if not any(len(p) > len(target) and f" {' '.join(p)} " in asked for p in around):
            return words[i][0]
    return None


def states_answer(prompt_text: str, response: str, answer: Any, rel_tol: float = 0.0) -> bool:
    """Does the response state the reference answer, as the one it gives? Only the first
    candidate counts, and a negated one never does:
    - numbers: the first number that is not one of the prompt's ('12 x 23 = 276' is judged on
      276) must match (numbers_match) and not be negated ('Not 703: it is 702.');
    - text: the first mention of the normalised answer (first_mention), neither negated ('Not
      South Korea: it is Japan.') nor after an alternative ('North Korea or South Korea.').
    """
    reference = str(answer)
    ref = parse_number(reference)
    if ref is not None:
        given = set(numbers_in(prompt_text))
        stated = _numbers_at(response)
        fresh = stated if ref in given else [(at, x) for at, x in stated if x not in given]
        if not fresh or negated(response[: fresh[0][0]]):
            return False
        return numbers_match(fresh[0][1], reference, rel_tol)
    wanted = normalise_answer(reference)
    at = first_mention(response, wanted, prompt_text) if wanted else None
    if at is None:
        return False
    before = response[:at]
    return not negated(before) and not offers_alternatives(before)


def _prompt_text(messages: list[dict]) -> str:
    return " ".join(m.get("content", "") for m in messages if m.get("role") == "user")


def answer_match(
    prompts: list[list[dict]],
    responses: list[str],
    rows: list[dict],
    rel_tol: float = 0.0,
    field: str = "answer",
    **_: Any,
) -> list[float]:
    """1.0 when the response states the row's reference answer, else 0.0. Rows without the
    field score 0.0; accuracy reports count only the rows that have one (has_answer)."""
    out = []
    for messages, response, row in zip(prompts, responses, rows):
        answer = row.get(field) if row else None
        ok = answer is not None and states_answer(_prompt_text(messages), response, answer, rel_tol)
        out.append(1.0 if ok else 0.0)
    return out


def has_answer(row: dict | None, field: str = "answer") -> bool:
    return bool(row) and row.get(field) is not None


# ------------------------------------------------------------------------- length, format


def length(
    prompts: list,
    responses: list[str],
    rows: list[dict],
    min: int = 0,
    max: int | None = None,
    unit: str = "words",
    penalty: float = 1.0,
    **_: Any,
) -> list[float]:
    """0 inside [min, max]; outside it, -penalty per word (or char) beyond the range."""
    if unit not in ("words", "chars"):
        raise UserError(f"length reward: unit must be 'words' or 'chars', got {unit!r}")
    out = []
    for r in responses:
        n = len(r.split()) if unit == "words" else len(r)
        over = n - max if max is not None and n > max else 0
        under = min - n if n < min else 0
        out.append(-penalty * float(over + under))
    return out


def format(  # noqa: A001 - the built-in's public name in recipes
    prompts: list,
    responses: list[str],
    rows: list[dict],
    pattern: str = "",
    must_match: bool = True,
    **_: Any,
) -> list[float]:
    """1.0 when `pattern` (re.search) matches and must_match, or does not and not must_match."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"format reward: bad regex {pattern!r}: {e}") from None
    return [1.0 if bool(regex.search(r)) == must_match else 0.0 for r in responses]


BUILTINS: dict[str, RewardFunction] = {
    "sentiment": sentiment,
    "afinn": afinn,
    "answer_match": answer_match,
    "length": length,
    "format": format,
}


# ------------------------------------------------------------------------------ resolving


# This module's path, and the one recipes written before rlhf/roles/ existed name it by.
MODULE_NAMES = (__name__, "rlhf.rewards")


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in name, or "package.module:function". UserError (one line) when the name is
    unknown, the module fails to import, or the attribute is not callable."""
    spec = spec.strip()
    if spec in BUILTINS:
        if spec in LEXICONS:
            _lexicon(spec)  # a missing optional package fails now, not mid-run
        return BUILTINS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        for prefix in MODULE_NAMES:
            if spec.startswith(prefix + "."):
                return load_reward_function(spec.removeprefix(prefix + "."))
        raise UserError(
            f"reward function '{spec}': not a built-in ({', '.join(BUILTINS)}) "
            "and not module:function"
        )
    if not module_name or not attr:
        raise UserError(f"reward function '{spec}': expected module:function")
    if module_name in MODULE_NAMES and attr in BUILTINS:
        return load_reward_function(attr)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own code failing
        raise UserError(
            f"reward function '{spec}': cannot import {module_name} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"reward function '{spec}': {module_name} has no attribute '{attr}'")
    if not callable(fn):
        raise UserError(f"reward function '{spec}': {attr} is not callable")
    return fn


def check_args(spec: str, fn: RewardFunction, args: dict[str, Any]) -> None:
    """Arguments the function cannot take are a recipe mistake (the built-ins' **_ is only a
    shared calling convention: they are checked by name)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    loose = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    named = {n for n, p in params.items() if p.kind not in loose}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_any and fn not in BUILTINS.values():
        return
    unknown = [k for k in args if k not in named or k in ("prompts", "responses", "rows")]
    if unknown:
        raise UserError(f"reward function '{spec}': unknown argument(s) {', '.join(unknown)}")


def call_reward_function(
    name: str,
    fn: RewardFunction,
    prompts: list[list[dict]],
    responses: list[str],
    rows: list[dict],
    args: dict[str, Any],
) -> list[float]:
    """Call and check: one number per response (NaN/inf pass, for the numerics policy)."""
    out = fn(prompts, responses, rows, **args)
    try:
        values = [float(x) for x in out]
    except TypeError:
        raise UserError(
            f"reward function '{name}' must return a list of floats, got {type(out).__name__}"
        ) from None
    except ValueError as e:
        raise UserError(f"reward function '{name}' returned a non-number: {e}") from None
    if len(values) != len(responses):
        raise UserError(
            f"reward function '{name}' returned {len(values)} scores for {len(responses)} responses"
        )
    return values
