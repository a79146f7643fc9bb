"""Pieces every training stage shares: optimizer + schedule, LoRA / checkpointing set-up,
saving a `model/` folder, non-finite checks. The loops themselves live in the stages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from rlhf.infra.distributed import full_ndim, full_numel
from rlhf.infra.errors import NumericalFault
from rlhf.roles import models
from rlhf.roles.real_token_mlp import mlps_on_real_tokens
from rlhf.tokens.chat import IGNORE_INDEX
from rlhf.tokens.decoding import eos_ids
from rlhf.tokens.sequences import next_token_logits, next_token_targets

log = logging.getLogger(__name__)


def make_optimizer(model: torch.nn.Module, optim: Any) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (standard practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if full_ndim(p) < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # No empty group (LoRA alone trains no bias or norm): ZeRO-3 drops empty groups from the
    # optimizer, and the LR scheduler built on it would then step one group too many.
    groups = [g for g in groups if g["params"]]
    # fused: one kernel per parameter group instead of a chain of foreach ops; on a 2-core CPU
    # a step over 150M fp32 parameters took 0.10 s instead of 0.57 s (bench).
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)


def make_scheduler(
    optimizer: torch.optim.Optimizer, optim: Any, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine / linear decay to 0 (or constant). Stepped once per update."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if optim.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_for_training(
    model: torch.nn.Module, lora: Any, gradient_checkpointing: bool, task_type: str
) -> torch.nn.Module:
    """Dropout off is NOT done here (SFT/RM keep the model's dropout); LoRA and checkpointing."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora.enabled:
        model = models.apply_lora(model, lora, task_type=task_type)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def without_fp32_outputs(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The prepared model unwrapped, its forward without accelerate's mixed-precision wrapper.

    With bf16 / fp16, accelerator.prepare wraps the model's forward in autocast and copies
    every low-precision output to fp32. For a stage that opens accelerator.autocast() around
    each forward itself and reads its logits block by block in fp32
    (tokens.sequences.TokenLogprobs), that copy is a (B, R, V) fp32 tensor kept for backward
    (52 MB per micro-batch of the PPO bench) and another for its gradient. Values and
    gradients are the same: bf16 -> fp32 is exact, and the gradient is rounded to bf16 once
    either way. The wrapped module (DDP) calls the same, restored forward."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over labelled positions."""
    logits = next_token_logits(logits).float()
    targets = next_token_targets(labels)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def labelled_nll_sum(model: torch.nn.Module, batch: dict, **forward: Any) -> torch.Tensor:
    """token_nll_sum of the batch, with the LM head run only on the positions that predict a
    labelled token: prompt and padding positions never become (vocab)-wide logits. For a
    262k-token vocabulary (Gemma-3) the head is most of the model's per-token work, and the
    prompt is often half the tokens. A forward pre-hook hands the head those rows as one
    (1, N, H) sequence; the model (DDP, FSDP or DeepSpeed wrapped) is called as usual."""
    logits, targets, _ = _labelled_logits(model, batch, **forward)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def labelled_nll_rows(model: torch.nn.Module, batch: dict, **forward: Any) -> torch.Tensor:
    """labelled_nll_sum of each row of the batch: (B,), in float64."""
    logits, targets, predicts = _labelled_logits(model, batch, **forward)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double()
    row_of = predicts.nonzero()[:, 0]  # the row of each predicting position, in logits' order
    return nll.new_zeros(predicts.shape[0]).index_add_(0, row_of, nll)


def _labelled_logits(
    model: torch.nn.Module, batch: dict, **forward: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V) in fp32, targets (N,), predicts (B, T)): the LM head on the N positions
    that predict a labelled token (`predicts`), with their targets."""
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = next_token_targets(labels) != IGNORE_INDEX

    def keep_predicting_rows(_head: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][predicts].unsqueeze(0), *args[1:])

    hook = output_embeddings(model).register_forward_pre_hook(keep_predicting_rows)
    try:
        with mlps_on_real_tokens(model, batch["attention_mask"]):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward
            ).logits
    finally:
        hook.remove()
    targets = next_token_targets(labels)[predicts[:, :-1]]
    return logits[0].float(), targets, predicts


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head inside a DDP / DeepSpeed wrapper and a peft model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_output_embeddings()


def n_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of labelled next-token targets (the denominator of token_nll_sum)."""
    return (next_token_targets(labels) != IGNORE_INDEX).sum()


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module, batches: Iterable[dict], context: Callable[[], Any] = nullcontext
) -> torch.Tensor:
    """(summed NLL, number of targets) over the labelled tokens of `batches`, in float64 on
    the batches' device; each forward runs inside `context()` (autocast, gathered weights)."""
    totals = None
    for batch in batches:
        with context():
            nll = labelled_nll_sum(model, batch)
        labels = batch["labels"]
        if totals is None:
            totals = torch.zeros(2, device=labels.device, dtype=torch.float64)
        totals[0] += nll.double()
        totals[1] += n_targets(labels).double()
    return totals if totals is not None else torch.zeros(2, dtype=torch.float64)


@torch.no_grad()
def answer_nll_rows(
    model: torch.nn.Module, batches: Iterable[dict], context: Callable[[], Any] = nullcontext
) -> torch.Tensor:
    """answer_nll per row, in the batches' order: (rows, 2) of (summed NLL, number of
    targets), float64 on the batches' device ((0, 2) on the CPU without batches)."""
    rows = []
    for batch in batches:
        with context():
            nll = labelled_nll_rows(model, batch)
        targets = (next_token_targets(batch["labels"]) != IGNORE_INDEX).sum(1).double()
        rows.append(torch.stack([nll, targets], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def perplexity(nll_sum: float, n_tokens: float) -> dict[str, float]:
    """Mean token NLL and its exponential (capped so that an untrained model stays finite)."""
    loss = nll_sum / max(n_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(full_numel(p) for p in model.parameters())
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def save_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    merge_lora: bool,
    card: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """save_pretrained folder: safetensors, tokenizer, chat template, generation config, card.

    Refuses to write non-finite weights. A LoRA model is merged into plain weights when
    `merge_lora`, else saved as an adapter folder (peft) next to the base model name.
    `state_dict`: the full weights gathered from a sharded model (rlhf.infra.distributed
    .full_state_dict); `model` then only supplies the config and class.
    """
    values = state_dict.values() if state_dict is not None else model.parameters()
    if not all(torch.isfinite(v).all() for v in values if v.is_floating_point()):
        raise NumericalFault("refusing to save: the model has non-finite weights")
    to_save = model
    if hasattr(model, "peft_config") and merge_lora:
        if state_dict is None:
            # A base kept in bf16 (models.store_frozen_linears) goes back to fp32 first: the
            # adapter is merged and saved in fp32, not rounded into bf16 weights.
            models.store_frozen_linears(model, torch.float32)
            to_save = model.merge_and_unload()
        else:  # sharded weights cannot be merged in place; peft keeps the adapter keys only
            log.warning("merge_lora under ZeRO-3/FSDP: saving the LoRA adapter; merge it offline")
    to_save.config.use_cache = True
    to_save.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if hasattr(to_save, "generation_config") and to_save.generation_config is not None:
        gen = to_save.generation_config
        gen.pad_token_id = tokenizer.pad_token_id
        ends = eos_ids(to_save, tokenizer)  # keep every end token (Llama 3 has several)
        gen.eos_token_id = ends if len(ends) > 1 else ends[0]
        gen.save_pretrained(out_dir)
    (Path(out_dir) / "README.md").write_text(card)


def model_card(title: str, recipe: Any, body: str) -> str:
    return (
        f"---\nlibrary_name: transformers\ntags: [rlhf]\n---\n# {title}\n\n"
        f"Trained by `rlhf` with the recipe `{getattr(recipe, '_source', recipe.name)}` "
        f"(resolved copy in `../recipe.yaml`), base model `{recipe.model.name}`.\n\n{body}\n"
    )


class NonFiniteGuard:
    """Counts optimizer steps skipped for non-finite values; stops when the recipe says so
    (`numerics.on_nonfinite: stop`) or after `max_consecutive` bad steps in a row."""

    def __init__(self, on_nonfinite: str = "skip", max_consecutive: int = 5):
        self.on_nonfinite = on_nonfinite
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def ok(self, value: torch.Tensor | float, what: str = "loss") -> bool:
        if bool(torch.isfinite(torch.as_tensor(value)).all()):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.on_nonfinite == "stop":
            raise NumericalFault(f"non-finite {what}: stopping (numerics.on_nonfinite=stop)")
        if self.consecutive >= self.max_consecutive:
            raise NumericalFault(
                f"{self.consecutive} steps in a row with a non-finite {what}: stopping "
                "(numerics.max_consecutive)"
            )
        log.warning("non-finite %s: step skipped (%d so far)", what, self.skipped)
        return False


def accumulation_window(accelerator: Any, group: list) -> Any:
    """Yields the micro-batches of one optimizer step, for `accelerator.accumulate()` inside.

    The gradients sync (and the optimizer steps) on the window's LAST micro-batch only, even
    for a short last window of an epoch: accelerate syncs when its micro-step counter reaches
    a multiple of grad_accum, so the counter starts `grad_accum - len(group)` short of it.
    Needs the accelerator built with `sync_with_dataloader=False` (runtime.make_accelerator).
    """
    accelerator.step = accelerator.gradient_accumulation_steps - len(group)
    yield from group


def step_if_finite(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    max_grad_norm: float | None,
    guard: NonFiniteGuard,
) -> float | None:
    """At the end of an accumulation window: clip, then step only if the gradient norm is finite.

    Every rank always runs backward (a rank that skipped it would hang DDP); a non-finite loss
    on any rank makes the all-reduced gradients non-finite everywhere, so every rank sees the
    same norm here and takes the same decision. Returns the norm (None inside the window).
    """
    norm = None
    if accelerator.sync_gradients:
        clipped = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
        # DeepSpeed clips inside its own step (config `gradient_clipping`) and may report None.
        norm = float(clipped) if clipped is not None else None
        if norm is None or guard.ok(norm, "gradient norm"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
