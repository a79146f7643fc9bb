"""Recipes: YAML files that name a base model and the three stages' settings.

Loading goes: YAML (safe_load) -> `inherits:` chain merged parent-first -> dotted overrides from
the command line -> typed validation of the WHOLE recipe (pydantic, unknown keys forbidden)
before any model loads. Every mistake becomes one `UserError` line naming the file and key.

Relative paths in a recipe are relative to the current working directory (run from the repo
root, as the Makefile does); `inherits:` is relative to the recipe file that names it.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.errors import UserError

DATA_FORMATS = (
    "auto",
    "messages",
    "prompt_completion",
    "alpaca",
    "pairs",
    "rankings",
    "prompts",
    "hh",
    "oasst",
)


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="registered short name (see `rlhf models list`), local folder or hub id",
    )
    revision: str | None = None
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template, or a path to a .jinja file, for models without one",
    )
    trust_remote_code: bool = False
    num_hidden_layers: int | None = Field(None, ge=1, description="truncate the model (tests)")
    attn_implementation: str | None = None


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DataSource(Section):
    path: str = Field(..., description="local .jsonl/.json/.parquet(.gz) file or a hub dataset id")
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    split: str = Field("train", description="split name, for hub datasets")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    drop_synthetic: bool = Field(True, description="OASST: drop machine-written replies")

    @model_validator(mode="after")
    def _local_file_exists(self) -> DataSource:
        if looks_like_local_path(self.path) and not Path(self.path).exists():
            raise ValueError(f"data file not found: {self.path}")
        return self


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)


class TrainLoopConfig(Section):
    """Settings every supervised stage shares (SFT and reward)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps")
    batch_size: int = Field(8, ge=1, description="per device, per micro-step")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)
    optim: OptimConfig = OptimConfig()
    lora: LoraConfig = LoraConfig()
    merge_lora: bool = Field(True, description="merge the adapter into the saved model/")
    gradient_checkpointing: bool = False
    eval_every: int = Field(50, ge=1, description="optimizer steps between evaluations")
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1)


class SFTConfig(TrainLoopConfig):
    train: DataSource | None = None
    eval: DataSource | None = None
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="held out when `eval` is unset")
    init_from: str | None = Field(None, description="default: the recipe's model")
    assistant_only_loss: bool = True
    packing: bool = False


class RewardConfig(TrainLoopConfig):
    train: DataSource | None = None
    eval: DataSource | None = None
    extra_eval: list[DataSource] = Field(default_factory=list)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    init_from: str | None = Field(None, description="default: <output_dir>/sft/model")
    batch_size: int = Field(4, ge=1, description="prompts (not pairs) per device micro-step")
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin: -log sigmoid(dr - m)")
    center_coef: float = Field(
        0.0, ge=0, description="weight of the mean(r)^2 centring term (Eisenstein et al. 2023)"
    )
    calibration_size: int = Field(256, ge=1, description="responses used for mean/std")
    share_prefix: bool = Field(
        True,
        description="run each prompt's shared tokens once for its K responses (KV cache); "
        "off with gradient_checkpointing",
    )


class AdaptiveKLConfig(Section):
    target: float = Field(6.0, gt=0)
    horizon: int = Field(10000, ge=1)


class PPOConfig(Section):
    prompts: DataSource | None = None
    eval_prompts: DataSource | None = None
    sft_dir: str | None = Field(None, description="default: <output_dir>/sft")
    reward_dir: str | None = Field(None, description="default: <output_dir>/reward")
    iterations: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1, description="rollout prompts per device per iteration")
    mini_batch_size: int = Field(8, ge=1, description="rollouts per optimizer step, per device")
    grad_accum: int = Field(1, ge=1, description="micro-batches per mini-batch")
    ppo_epochs: int = Field(4, ge=1)
    max_prompt_length: int = Field(128, ge=4)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_k: int = Field(0, ge=0, description="must stay 0: PPO samples with temperature only")
    top_p: float = Field(1.0, gt=0, le=1, description="must stay 1.0 (as top_k)")
    stop_strings: list[str] = Field(default_factory=list)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: AdaptiveKLConfig | None = None
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    whiten_rewards: bool = False
    normalize_score: bool = Field(
        True, description="centre and scale the reward-model score (calibration_prompts)"
    )
    calibration_prompts: int = Field(
        32,
        ge=0,
        description="training prompts the SFT policy answers before iteration 1; the mean/std "
        "of their scores normalise the score (0: the reward model's stored mean/std, measured "
        "on human-written responses)",
    )
    score_clip: float | None = Field(None, gt=0)
    missing_eos_penalty: float | None = Field(None, ge=0)
    target_kl_early_stop: float | None = Field(None, gt=0)
    value_model: Literal["shared", "separate"] = Field(
        "shared", description="value head on the policy backbone, or a critic from the RM"
    )
    lora: LoraConfig = LoraConfig()
    merge_lora: bool = True
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_ratio=0.0, scheduler="constant")
    sample_every: int = Field(1, ge=1, description="iterations between logged sample tables")
    save_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    eval_size: int = Field(32, ge=1, description="held-out prompts scored at the end")

    @model_validator(mode="after")
    def _minibatch_divides_batch(self) -> PPOConfig:
        if self.top_k != 0 or self.top_p != 1.0:
            # The ratio, KL and reference use log_softmax(logits / T) over the whole vocabulary;
            # sampling from a top-k / top-p truncation of it would train off-policy.
            raise ValueError(
                "top_k / top_p are not supported for PPO (its log-probs are of the full "
                "distribution at the temperature): leave them at 0 / 1.0"
            )
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must divide batch_size "
                f"({self.batch_size})"
            )
        if self.mini_batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum ({self.grad_accum}) must divide mini_batch_size "
                f"({self.mini_batch_size})"
            )
        return self


class DataPolicy(Section):
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="invalid rows: stop with file:line, or skip and count them"
    )
    truncate_long_prompts: bool = Field(
        False,
        description="prompts over the stage's max length keep their END (e.g. long HH "
        "transcripts) instead of counting as invalid rows",
    )


class NumericsConfig(Section):
    on_nonfinite: Literal["skip", "stop"] = Field(
        "skip",
        description="non-finite loss / gradients / rewards: skip that step (counted and "
        "logged) or stop the run with a message",
    )
    max_consecutive: int = Field(5, ge=1, description="skip mode: stop after N bad steps in a row")


class TrackingConfig(Section):
    tensorboard: bool = True
    trackers: list[Literal["wandb", "mlflow", "trackio"]] = Field(default_factory=list)
    project: str = "rlhf"


class Recipe(Section):
    name: str = "unnamed"
    description: str = ""
    output_dir: str = "runs/default"
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware runs it faster"
    )
    model: ModelConfig = ModelConfig()
    data: DataPolicy = DataPolicy()
    numerics: NumericsConfig = NumericsConfig()
    tracking: TrackingConfig = TrackingConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()

    # Where the recipe came from (not a YAML key): for error messages and run.json.
    _source: str = "<recipe>"

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------- loading


def looks_like_local_path(path: str) -> bool:
    """A hub id is `owner/name`; anything with a data extension or a path prefix is local."""
    p = path.lower()
    return (
        p.startswith(("/", "./", "../", "~"))
        or p.endswith((".jsonl", ".json", ".gz", ".parquet", ".csv"))
        or Path(path).exists()
    )


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    if path.resolve() in chain:
        raise UserError(f"{path}: inheritance cycle ({' -> '.join(str(p) for p in chain)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: {where}invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    parent = data.pop("inherits", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: inherits: must be a file name")
    base = _read_yaml(path.parent / parent, chain + (path.resolve(),))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; everything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict[str, Any], override: str) -> None:
    """`ppo.kl_coef=0.1` -> data["ppo"]["kl_coef"] = 0.1 (the value is parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{override}': expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{override}': {part} is not a section")
        node = child
    node[parts[-1]] = value


def _format_error(source: str, err: dict[str, Any], overrides: list[str]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        what = "unknown key"
    elif kind == "missing":
        what = "missing required key"
    else:
        what = err["msg"].removeprefix("Value error, ")
        if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], dict):
            what += f" (got {err['input']!r})"
    origin = source
    for o in overrides:
        if loc and o.split("=", 1)[0] == loc:
            origin = f"{source} (override {o})"
    return f"{origin}: {loc or '<root>'}: {what}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge, override and validate a recipe. Raises UserError on any mistake."""
    overrides = list(overrides or [])
    path = Path(path)
    data = _read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # Name the override the user just typed before anything inherited from the file.
        keys = {o.split("=", 1)[0] for o in overrides}

        def about_override(err: dict) -> bool:
            loc = ".".join(map(str, err["loc"]))
            return any(k == loc or k.startswith(loc + ".") for k in keys)

        errors.sort(key=lambda err: not about_override(err))
        raise UserError(_format_error(str(path), errors[0], overrides)) from None
    recipe._source = str(path)
    if recipe.model.trust_remote_code:
        print(
            f"WARNING: {path}: model.trust_remote_code is true: Python code shipped with "
            f"'{recipe.model.name}' will run on this machine",
            file=sys.stderr,
        )
    return recipe
