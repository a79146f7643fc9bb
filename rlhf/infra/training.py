"""Pieces every training stage shares, for any model: optimizer + schedule, gradient
accumulation windows, non-finite checks. The loops themselves live in the stages; LoRA set-up
is rlhf.roles.models.prepare_for_training, the loss rlhf.algo.sft, saving rlhf.roles.model_folder.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from rlhf.infra.distributed import full_ndim, full_numel
from rlhf.infra.errors import NumericalFault

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
    # No empty group (LoRA trains no bias or norm): ZeRO-3 would drop it under the scheduler.
    groups = [g for g in groups if g["params"]]
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


def without_fp32_outputs(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The prepared model unwrapped, its forward without accelerate's mixed-precision wrapper,
    which copies every bf16 / fp16 output to fp32: for a stage that autocasts its forwards
    itself, a (B, R, V) fp32 logits copy kept for backward, with the same values."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def perplexity(nll_sum: float, n_tokens: float) -> dict[str, float]:
    """Mean token NLL and its exponential (capped so that an untrained model stays finite)."""
    loss = nll_sum / max(n_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(full_numel(p) for p in model.parameters())
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


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
    Gradients sync on the window's last micro-batch, even in a short last window: accelerate's
    micro-step counter starts `grad_accum - len(group)` short of a multiple of grad_accum."""
    accelerator.step = accelerator.gradient_accumulation_steps - len(group)
    yield from group


def averaging_undone(accelerator: Any) -> int:
    """The factor a loss normalised over a whole optimizer step (all micro-batches and ranks)
    is multiplied by before accelerator.backward: accelerate divides each micro-batch's loss
    by grad_accum, and DDP / FSDP / ZeRO average the gradients over ranks."""
    return accelerator.num_processes * accelerator.gradient_accumulation_steps


def step_if_finite(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    max_grad_norm: float | None,
    guard: NonFiniteGuard,
) -> float | None:
    """At the end of an accumulation window: clip, then step only if the gradient norm is
    finite (the all-reduced norm, so every rank decides alike). Returns the norm (None inside
    the window)."""
    norm = None
    if accelerator.sync_gradients:
        clipped = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
        # DeepSpeed clips inside its own step (config `gradient_clipping`) and may report None.
        norm = float(clipped) if clipped is not None else None
        if norm is None or guard.ok(norm, "gradient norm"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
