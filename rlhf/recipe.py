"""Recipes: YAML files that name a base model and the three stages' settings.

Loading goes: YAML (safe_load) -> `inherits:` chain merged parent-first -> dotted overrides from
the command line -> typed validation of the WHOLE recipe (pydantic, unknown keys forbidden)
before any model loads. Every mistake becomes one `UserError` line naming the file and key.

Relative paths in a recipe are relative to the current working directory (run from the repo
root, as the Makefile does); `inherits:` is relative to the recipe file that names it.

A data source (rlhf.data.source) names a local file or a hub dataset.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rlhf.algo.dpo import LOSS_TYPES as DPO_LOSS_TYPES
from rlhf.data.source import DATA_ROOT_ENV, DataSource
from rlhf.data.source import looks_like_local_path as looks_like_local_path  # its old home
from rlhf.infra.errors import UserError


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
    init_token_embeddings: dict[str, str] = Field(
        default_factory=dict,
        description="copy the value token's embedding rows to the key token's before training, "
        "for untrained chat-template tokens: {'<end_of_turn>': '<eos>'} (Gemma-3 pretrained)",
    )


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
    subset: Literal["all", "first_half", "second_half"] = Field(
        "all", description="all rankings, or one of two halves split by prompt (seed-independent)"
    )
    share_prefix: bool = Field(
        True, description="a prompt's shared tokens run once for its K responses (KV cache)"
    )


class DPOStageConfig(TrainLoopConfig):
    """Direct preference optimisation (Rafailov et al. 2023) on the stage runner."""

    train: DataSource | None = None
    eval: DataSource | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held out when `eval` is unset")
    eval_pairs: int = Field(32, ge=0, description="held-out pairs scored at each eval (0: all)")
    eval_prompts: DataSource | None = Field(
        None, description="the end-of-run generation eval's prompts (default: ppo.eval_prompts)"
    )
    sft_dir: str | None = Field(None, description="default: <output_dir>/sft")
    pairs: Literal["all", "best_vs_rest"] = Field(
        "all", description="a K-way ranking's K(K-1)/2 pairs, or the best against each other"
    )
    loss_type: Literal[DPO_LOSS_TYPES] = Field(  # type: ignore[valid-type]
        "sigmoid", description="rlhf/algo/dpo.py: sigmoid (DPO), ipo, hinge, robust"
    )
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="P(label flipped)")
    batch_size: int = Field(4, ge=1, description="rankings (not pairs) per device micro-step")
    optim: OptimConfig = OptimConfig(lr=5e-7)


class JudgeConfig(Section):
    """`rlhf judge`: a second reward model, the reward stage rerun with these changes into
    <output_dir>/judge, to evaluate the PPO policy with a model it was not trained against."""

    subset: Literal["all", "first_half", "second_half"] = "second_half"  # its reward.subset
    seed_offset: int = Field(1, ge=1, description="the judge's seed is the recipe's seed + this")
    allow_prompt_overlap: bool = Field(
        False, description="may train on the reward model's prompts (else refused); for tests"
    )


class AdaptiveKLConfig(Section):
    target: float = Field(6.0, gt=0)
    horizon: int = Field(10000, ge=1)


# What each estimator uses unless the recipe says otherwise (see rlhf/algo/advantages.py).
ESTIMATOR_DEFAULTS = {
    "gae": {"advantage_norm": "batch", "kl_in": "reward"},
    "rloo": {"advantage_norm": "none", "kl_in": "reward"},
    "grpo": {"advantage_norm": "group", "kl_in": "loss"},
    "reinforce_pp": {"advantage_norm": "batch", "kl_in": "reward"},
}


def _check_function(spec: str, args: dict[str, Any]) -> None:
    """Resolve a reward function now, before any model loads (unknown name, import error,
    not callable, unknown argument), as a validation error on the entry's key."""
    from rlhf.roles.rewards import check_args, load_reward_function

    try:
        check_args(spec, load_reward_function(spec), args)
    except UserError as e:
        raise ValueError(str(e)) from None


class ScoreSource(Section):
    """A reward model or a reward function (with its keyword `args`), exactly one of them."""

    name: str | None = Field(None, description="label in the logs and eval.json")
    model: str | None = Field(None, description="reward run or model folder ('{output_dir}')")
    function: str | None = Field(None, description="a built-in (sentiment, ...) or module:function")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments (functions)")

    @model_validator(mode="after")
    def _one_kind(self) -> ScoreSource:
        if (self.model is None) == (self.function is None):
            raise ValueError("give exactly one of `model` or `function`")
        if self.function is None and self.args:
            raise ValueError("`args` are for functions, not reward models")
        if self.function is not None:
            self._check_function_source()
            _check_function(self.function, self.args)
        elif isinstance(self.model, list) and not self.model:
            raise ValueError("model: an empty list")
        return self

    def _check_function_source(self) -> None:
        """A subclass's checks of a function source, before the function is resolved."""


class RewardSourceConfig(ScoreSource):
    """One term of the PPO score: score = sum over entries of weight * normalised score."""

    model: str | list[str] | None = Field(
        None, description="reward run or model folder ('{output_dir}'), a list: an ensemble"
    )
    weight: float = 1.0
    normalize: Literal["calibration", "running", "none"] | None = Field(
        None,
        description="models: calibration (default unless ppo.normalize_score is false; an "
        "ensemble's members each); functions: none (default) or a running mean/std",
    )
    combine: Literal["mean", "min"] = Field("mean", description="an ensemble's scores")

    def _check_function_source(self) -> None:
        if self.normalize == "calibration":
            raise ValueError("normalize: calibration is for reward models; use none or running")


class EvalJudgeConfig(ScoreSource):
    """A judge for the end-of-run evaluation: another reward model, or a function."""

    positive_above: float | None = Field(
        None, description="also report the rate of responses scoring above this (e.g. 0)"
    )


class EvalConfig(Section):
    """The PPO and DPO stages' end-of-run evaluation (held-out prompts, SFT vs the tuned
    policy; rlhf/evaluation.py)."""

    judges: list[EvalJudgeConfig] = Field(default_factory=list)
    samples_per_prompt: int = Field(4, ge=1, description="responses per held-out prompt")
    batch_size: int | None = Field(
        None, ge=1, description="responses sampled per batch, per rank (default: ppo.batch_size)"
    )


class PPOConfig(Section):
    prompts: DataSource | None = None
    eval_prompts: DataSource | None = None
    valid_prompts: DataSource | None = Field(
        None, description="prompts for choosing settings (the judge curve), kept apart from both"
    )
    sft_dir: str | None = Field(None, description="default: <output_dir>/sft")
    reward_dir: str | None = Field(None, description="default: <output_dir>/reward")
    policy: Literal["sft", "base"] = Field("sft", description="start from SFT or the model")
    rewards: list[RewardSourceConfig] | None = Field(
        None, description="score sources; default: the reward stage's model (ppo.reward_dir)"
    )
    iterations: int = Field(20, ge=1)
    estimator: Literal["gae", "rloo", "grpo", "reinforce_pp"] = Field(
        "gae", description="advantage estimator: a critic (gae) or k samples per prompt"
    )
    samples_per_prompt: int = Field(
        1, ge=1, description="k answers per prompt in a rollout batch (>= 2 without a critic)"
    )
    # kl_in and advantage_norm default by estimator (ESTIMATOR_DEFAULTS)
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="KL penalty in the per-token reward, or GRPO's k3 term in the loss"
    )
    advantage_norm: Literal["group", "batch", "none"] = "batch"
    scale_by_std: bool = Field(
        True, description="advantage_norm divides by the std (false: Dr. GRPO, only centring)"
    )
    loss_aggregation: Literal["token", "sequence"] = Field(
        "token", description="policy loss: mean over all tokens, or per answer then over answers"
    )
    critic_warmup_iterations: int = Field(
        0, ge=0, description="gae: value-only updates on the first N rollouts (policy frozen)"
    )
    batch_size: int = Field(8, ge=1, description="rollouts per device per iteration")
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
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="per-token KL estimate (Schulman 2020); kl_in loss takes k3 only"
    )
    adaptive_kl: AdaptiveKLConfig | None = None
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    whiten_rewards: bool = False
    normalize_score: bool = Field(True, description="centre and scale the reward-model score")
    calibration_prompts: int = Field(
        32,
        ge=0,
        description="prompts the SFT policy answers before iteration 1 to measure each reward "
        "model's mean/std (0: the reward model's stored ones)",
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
    eval_every: int = Field(0, ge=0, description="iterations between judge-curve points")
    eval_curve_size: int = Field(16, ge=1, description="the judge curve's prompts")

    @model_validator(mode="before")
    @classmethod
    def _estimator_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("estimator") in ESTIMATOR_DEFAULTS:
            data = {**ESTIMATOR_DEFAULTS[data["estimator"]], **data}
        if isinstance(data, dict) and data.get("kl_in") == "loss":
            data = {"kl_estimator": "k3", **data}
        return data

    @field_validator("kl_estimator")
    @classmethod
    def _k3_in_the_loss(cls, estimator: str, info: ValidationInfo) -> str:
        # The loss term is GRPO's k3 (rlhf.ppo.update): another estimator would change the log only.
        if info.data.get("kl_in") == "loss" and estimator != "k3":
            raise ValueError(
                f"{estimator} with kl_in: loss, whose KL loss term is k3 (GRPO); set "
                "kl_estimator: k3 or kl_in: reward"
            )
        return estimator

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        k = self.samples_per_prompt
        if self.estimator != "gae" and k < 2:
            raise ValueError(
                f"estimator {self.estimator} needs samples_per_prompt >= 2 (got {k}): the "
                "other answers to the same prompt are its baseline"
            )
        divides = {  # (part, whole): why
            ("samples_per_prompt", "batch_size"): ": batch_size counts rollouts, k per prompt",
            ("mini_batch_size", "batch_size"): "",
            ("grad_accum", "mini_batch_size"): "",
        }
        for (part, whole), why in divides.items():
            n, of = getattr(self, part), getattr(self, whole)
            if of % n:
                raise ValueError(f"{part} ({n}) must divide {whole} ({of}){why}")
        if self.advantage_norm == "group" and self.estimator not in ("rloo", "grpo"):
            raise ValueError(
                f"advantage_norm group needs a sequence-level estimator (rloo, grpo), not "
                f"{self.estimator}"
            )
        if self.critic_warmup_iterations and self.estimator != "gae":
            raise ValueError(
                "critic_warmup_iterations needs estimator gae (the others have no critic)"
            )
        if self.critic_warmup_iterations >= self.iterations:
            raise ValueError(
                f"critic_warmup_iterations ({self.critic_warmup_iterations}) must be below "
                f"iterations ({self.iterations})"
            )
        if self.top_k != 0 or self.top_p != 1.0:
            # The ratio, KL and reference use log_softmax(logits / T) over the whole vocabulary;
            # sampling from a top-k / top-p truncation of it would train off-policy.
            raise ValueError(
                "top_k / top_p are not supported for PPO (its log-probs are of the full "
                "distribution at the temperature): leave them at 0 / 1.0"
            )
        if self.rewards is not None and not self.rewards:
            raise ValueError("rewards: give at least one source (or drop the key)")
        return self


class DataPolicy(Section):
    root: str | None = Field(
        None,
        description=f"folder of local copies of hub datasets (default ${DATA_ROOT_ENV})",
    )
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="invalid rows: stop with file:line, or skip and count them"
    )
    truncate_long_prompts: bool = Field(
        False, description="over-long prompts keep their END instead of being invalid rows"
    )


class NumericsConfig(Section):
    on_nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="non-finite loss / gradients / rewards: skip the step or stop"
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
    accel: Literal["auto", "off"] = Field(
        "auto", description="the CPU fast paths of rlhf/accel/, or off (also RLHF_ACCEL=off)"
    )

    @field_validator("accel", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `off` as false: `accel: off` means "off"."""
        return "off" if value is False else value

    model: ModelConfig = ModelConfig()
    data: DataPolicy = DataPolicy()
    numerics: NumericsConfig = NumericsConfig()
    tracking: TrackingConfig = TrackingConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    judge: JudgeConfig | None = None  # a second, independent reward model (`rlhf judge`)
    ppo: PPOConfig = PPOConfig()
    dpo: DPOStageConfig = DPOStageConfig()
    eval: EvalConfig = EvalConfig()

    # Where the recipe came from (not a YAML key): for error messages and run.json.
    _source: str = "<recipe>"

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------- loading


def read_recipe_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
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
    base = read_recipe_yaml(path.parent / parent, chain + (path.resolve(),))
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


def data_sources(recipe: Recipe) -> dict[str, DataSource]:
    """Every data source of the recipe by its key ("reward.extra_eval.0", ...)."""
    found: dict[str, DataSource] = {}
    for stage in ("sft", "reward", "ppo", "dpo"):
        section = getattr(recipe, stage)
        for name, value in section:
            if isinstance(value, DataSource):
                found[f"{stage}.{name}"] = value
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, DataSource):
                        found[f"{stage}.{name}.{i}"] = item
    return found


def data_root(recipe: Recipe) -> str | None:
    return recipe.data.root or os.environ.get(DATA_ROOT_ENV) or None


def resolve_local_copies(recipe: Recipe) -> None:
    """Name each source's key, and put a relative `local:` copy under the data root."""
    root = data_root(recipe)
    for key, source in data_sources(recipe).items():
        source._key = key
        if source.local and root and not Path(source.local).expanduser().is_absolute():
            source.local = str(Path(root).expanduser() / source.local)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge, override and validate a recipe. Raises UserError on any mistake."""
    overrides = list(overrides or [])
    path = Path(path)
    data = read_recipe_yaml(path)
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
    resolve_local_copies(recipe)
    if recipe.model.trust_remote_code:
        print(
            f"WARNING: {path}: model.trust_remote_code is true: Python code shipped with "
            f"'{recipe.model.name}' will run on this machine",
            file=sys.stderr,
        )
    return recipe
