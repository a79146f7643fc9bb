"""The PPO score from the recipe's reward sources: learned reward models and functions.

    score = sum over entries e of  weight_e * normalise_e(raw_e)

A model entry is one reward model or an ensemble combined by `mean` or `min` (the min of
several reward models is harder to exploit: Coste et al. 2024, "Reward Model Ensembles Help
Mitigate Overoptimization"). A model is normalised by its calibration: the mean/std of its
scores on SFT samples (measured by the PPO stage before iteration 1: `set_calibrations`), else
the reward stage's stored one; an ensemble's members are each calibrated before they are
combined. `running` normalises by the mean/std of every score seen so far (checkpointed).

Without `ppo.rewards` the score is the reward stage's model alone: the raw score, calibrated
by `rlhf.ppo.iteration.normalise_score` (`passthrough`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.infra.errors import NumericalFault, UserError
from rlhf.roles.rewards import call_reward_function, load_reward_function

log = logging.getLogger(__name__)

Scorer = Callable[[list[list[dict]], list[str], Any], torch.Tensor]  # (prompts, texts, finished)


# ------------------------------------------------------------------------------ pure math


def combine_scores(scores: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Per-response mean or min over an ensemble's (normalised) scores, each (B,)."""
    stacked = torch.stack(list(scores))
    if how == "mean":
        return stacked.mean(0)
    if how == "min":
        return stacked.min(0).values
    raise ValueError(f"unknown combine '{how}'")


def weighted_total(scores: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_e weight_e * score_e, each (B,)."""
    return sum(w * s for w, s in zip(weights, scores))


def calibrate(raw: torch.Tensor, calibration: dict | None) -> torch.Tensor:
    """(raw - mean) / std with the reward stage's stored calibration (as normalise_score)."""
    if not calibration:
        return raw
    return (raw - calibration["mean"]) / max(calibration["std"], 1e-6)


class RunningMoments:
    """Running mean and variance of every finite score seen (Chan et al. 1979, the parallel
    form of Welford's update), for `normalize: running`. Plain floats: exact through JSON."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: Sequence[float]) -> None:
        finite = [v for v in values if math.isfinite(v)]  # one NaN would poison every later step
        if not finite:
            return
        n = len(finite)
        mean = sum(finite) / n
        m2 = sum((v - mean) ** 2 for v in finite)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / max(self.std, 1e-6)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), state["mean"], state["m2"]


# --------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One recipe entry. `members` are (name, scorer, calibration) for models."""

    name: str
    weight: float
    normalize: str  # calibration | running | none
    members: list[tuple[str, Scorer, dict | None]] = field(default_factory=list)
    combine: str = "mean"
    function: Callable | None = None
    args: dict[str, Any] = field(default_factory=dict)
    moments: RunningMoments | None = None

    @property
    def calibrates_members(self) -> bool:
        """Each member's score is calibrated before the combination: `normalize: calibration`,
        and any ensemble (a mean or min of raw scores would mix the models' scales)."""
        return bool(self.members) and (self.normalize == "calibration" or len(self.members) > 1)


class RewardSources:
    """Callable: (prompts, responses, rows) -> (score (B,), metrics). The score is what PPO
    optimises before its clip and EOS penalty; `calibration` is for normalise_score (only the
    passthrough form, where the score is the one reward model's raw score)."""

    def __init__(
        self,
        sources: list[Source],
        passthrough: bool = False,
        on_nonfinite: str = "skip",
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.sources = sources
        self.passthrough = passthrough
        self.on_nonfinite = on_nonfinite
        self.gather = gather or (lambda t: t)

    @property
    def calibration(self) -> dict | None:
        """The single-model form's calibration, which normalise_score applies; else None."""
        if self.passthrough and self.sources[0].normalize == "calibration":
            return self.sources[0].members[0][2]
        return None

    @property
    def calibrations(self) -> dict[str, dict]:
        """{member label: calibration} of every reward model whose score is calibrated."""
        return {
            label: cal
            for src in self.sources
            if src.calibrates_members
            for label, _, cal in src.members
        }

    def set_calibrations(self, calibrations: dict[str, dict]) -> None:
        """Replace the calibrations of the members named (e.g. by ones measured on SFT
        samples, ppo/calibration.py)."""
        for src in self.sources:
            src.members = [(n, f, calibrations.get(n, cal)) for n, f, cal in src.members]

    def member_scores(
        self, prompts: list[list[dict]], responses: list[str], finished: Any = None
    ) -> dict[str, torch.Tensor]:
        """The raw scores (B,) of every calibrated reward model, by member label."""
        return {
            label: scorer(prompts, responses, finished).float().cpu()
            for src in self.sources
            if src.calibrates_members
            for label, scorer, _ in src.members
        }

    def __call__(
        self,
        prompts: list[list[dict]],
        responses: list[str],
        rows: list[dict],
        training: bool = True,
        finished: Any = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """training=False (evaluation): running statistics are read, not updated, and
        non-finite scores are only warned about. `finished` (B,) bool: False marks a response
        cut off at max_new_tokens, which reward models score without an end-of-turn."""
        metrics: dict[str, float] = {}
        terms = []
        for src in self.sources:
            t0 = time.time()
            if src.function is not None:
                values = call_reward_function(
                    src.name, src.function, prompts, responses, rows, src.args
                )
                raw = torch.tensor(values, dtype=torch.float32)
                self._check_finite(src.name, raw, training)
                metrics[f"objective/score/{src.name}"] = _finite_mean(raw)
                terms.append(self._running(src, raw, training))
            else:  # the single-model form leaves the calibration to normalise_score
                calibrated = src.calibrates_members and not self.passthrough
                normalised = []
                for name, scorer, calibration in src.members:
                    raw = scorer(prompts, responses, finished).float().cpu()
                    self._check_finite(name, raw, training)
                    if len(src.members) > 1:
                        metrics[f"objective/score/{name}"] = _finite_mean(raw)
                    normalised.append(calibrate(raw, calibration) if calibrated else raw)
                combined = combine_scores(normalised, src.combine)
                terms.append(self._running(src, combined, training))
                metrics[f"objective/score/{src.name}"] = _finite_mean(terms[-1])
            metrics[f"timing/score/{src.name}"] = time.time() - t0
        total = weighted_total(terms, [s.weight for s in self.sources])
        return total, metrics

    def _running(self, src: Source, score: torch.Tensor, training: bool) -> torch.Tensor:
        """`normalize: running`: the score normalised by the running moments, which every
        rank updates (in training) with the same gathered batch."""
        if src.moments is None:
            return score
        if training:
            src.moments.update(self.gather(score).tolist())
        return src.moments.normalise(score)

    def _check_finite(self, name: str, raw: torch.Tensor, training: bool = True) -> None:
        bad = int((~torch.isfinite(raw)).sum())
        if not bad:
            return
        if training and self.on_nonfinite == "stop":
            raise NumericalFault(
                f"reward source '{name}' gave {bad} non-finite score(s): stopping "
                "(numerics.on_nonfinite=stop)"
            )
        # skip: the score reaches the advantages, and the non-finite guard skips the step.
        log.warning("reward source '%s' gave %d non-finite score(s)", name, bad)

    def state_dict(self) -> dict[str, Any]:
        return {s.name: s.moments.state_dict() for s in self.sources if s.moments is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s in self.sources:
            if s.moments is not None and s.name in state:
                s.moments.load_state_dict(state[s.name])


def _finite_mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return finite.mean().item() if len(finite) else float("nan")


# ----------------------------------------------------------------------------- building


def expand_path(path: str, output_dir: str) -> str:
    return path.replace("{output_dir}", output_dir)


def reward_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, run folder or None). A run folder is one with model/ inside; a model
    folder inside a run folder (run.json beside it) belongs to that run."""
    path = Path(path)
    if (path / "model").is_dir():
        return path / "model", path
    if (path / "config.json").is_file():
        run = path.parent if (path.parent / "run.json").is_file() else None
        return path, run
    if path.is_dir():
        raise UserError(f"{path}: neither a reward run folder (model/ inside) nor a model folder")
    raise UserError(f"{path} does not exist: run that stage first")


def load_calibration(model_dir: Path) -> dict[str, float] | None:
    path = Path(model_dir) / "reward_calibration.json"
    return json.loads(path.read_text()) if path.is_file() else None


def source_names(entries: list[Any]) -> list[str]:
    """Each entry's log name: its `name`, the function's name, or the reward run's folder name
    (`reward`, `judge`); repeats get a numeric suffix."""
    names, seen = [], {}
    for e in entries:
        if e.name:
            base = e.name
        elif e.function:
            base = e.function.split(":")[-1].split(".")[-1]
        elif isinstance(e.model, list):
            base = "models"
        else:
            base = model_label(e.model)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def model_label(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def build(
    recipe: Any,
    load_scorer: Callable[[Path], Scorer],
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RewardSources:
    """The recipe's sources. `load_scorer(model_dir)` loads one reward model (the stage owns
    devices and autocast). Model folders must be finished runs (COMPLETED)."""
    cfg = recipe.ppo
    on_nonfinite = recipe.numerics.on_nonfinite
    if cfg.rewards is None:
        model_dir, _ = reward_model_dir(legacy_reward_dir(recipe))
        calibration = load_calibration(model_dir) if cfg.normalize_score else None
        member = ("reward", load_scorer(model_dir), calibration)
        normalize = "calibration" if calibration else "none"
        return RewardSources(
            [Source("reward", 1.0, normalize, [member])], True, on_nonfinite, gather
        )
    sources = []
    for entry, name in zip(cfg.rewards, source_names(cfg.rewards)):
        moments = RunningMoments() if entry.normalize == "running" else None
        if entry.function is not None:
            fn, args = load_reward_function(entry.function), dict(entry.args)
            normalize = entry.normalize or "none"
            sources.append(
                Source(name, entry.weight, normalize, function=fn, args=args, moments=moments)
            )
            continue
        normalize = entry.normalize or ("calibration" if cfg.normalize_score else "none")
        members = _model_members(recipe, entry, name, normalize, load_scorer)
        sources.append(
            Source(name, entry.weight, normalize, members, entry.combine, moments=moments)
        )
    return RewardSources(sources, False, on_nonfinite, gather)


def _model_members(
    recipe: Any, entry: Any, name: str, normalize: str, load_scorer: Callable[[Path], Scorer]
) -> list[tuple[str, Scorer, dict | None]]:
    """(label, scorer, calibration) of each reward model of a model entry."""
    from rlhf.infra.rundir import require_completed

    paths = _entry_models(entry)
    if len(paths) > 1 and normalize == "none":
        raise UserError(
            f"ppo.rewards ({name}): an ensemble's {entry.combine} needs its members on one "
            "scale: set normalize: calibration or running (each member is calibrated first)"
        )
    members: list[tuple[str, Scorer, dict | None]] = []
    for i, path in enumerate(paths):
        model_dir, run_dir = reward_model_dir(expand_path(path, recipe.output_dir))
        if run_dir is not None:
            require_completed(run_dir, f"ppo.rewards ({name}): the reward run")
        label = name if len(paths) == 1 else f"{name}/{model_label(path) or i}"
        if any(label == m[0] for m in members):
            label = f"{label}_{i + 1}"
        calibration = load_calibration(model_dir)
        if calibration is None and (normalize == "calibration" or len(paths) > 1):
            fix = "give each member one" if len(paths) > 1 else "set normalize: none or running"
            raise UserError(
                f"ppo.rewards ({name}): {model_dir} has no reward_calibration.json; {fix}"
            )
        members.append((label, load_scorer(model_dir), calibration))
    return members


def _entry_models(entry: Any) -> list[str]:
    """The reward model paths of a `ppo.rewards` entry (none for a function)."""
    if entry.model is None:
        return []
    return entry.model if isinstance(entry.model, list) else [entry.model]


def legacy_reward_dir(recipe: Any) -> Path:
    """The reward stage's run folder the old single-model form reads (must be COMPLETED)."""
    from rlhf.infra.rundir import require_completed

    cfg = recipe.ppo
    path = Path(cfg.reward_dir) if cfg.reward_dir else recipe.stage_dir("reward")
    return require_completed(path, "ppo.reward_dir: the reward run")


def model_dirs(recipe: Any) -> list[Path]:
    """Every reward model folder the sources read (checked before any model loads)."""
    if recipe.ppo.rewards is None:
        return [reward_model_dir(legacy_reward_dir(recipe))[0]]
    return [
        reward_model_dir(expand_path(path, recipe.output_dir))[0]
        for entry in recipe.ppo.rewards
        for path in _entry_models(entry)
    ]
