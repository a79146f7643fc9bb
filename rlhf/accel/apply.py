"""Where the loops open the fast paths: one context per kind of work, each a no-op unless
`rlhf.accel.applies` to the model's device.

- sampling: sibling projections fused into packed oneDNN matmuls, peft's LoRA forward without
  its bookkeeping (fused_projections.py, lean_lora.py);
- training (the PPO update, SFT, the reward model, DPO): the lean LoRA forward and attention's
  gradient through matmuls (lean_lora.py, attention.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from rlhf import accel
from rlhf.accel.attention import matmul_attention_backward
from rlhf.accel.fused_projections import fused_projections
from rlhf.accel.lean_lora import lean_lora_forward


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s first parameter lives (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def sampling(policy: torch.nn.Module, rows: int, sharded: bool = False) -> Iterator[None]:
    """While open, `policy` samples with the fast paths (a batch of `rows`); sharded weights
    (gathered layer by layer) are not fused."""
    with ExitStack() as stack:
        if accel.applies(model_device(policy)):
            stack.enter_context(lean_lora_forward(policy))
            if not sharded:  # q, k, v (and gate, up) with their LoRA matrices as two matmuls
                stack.enter_context(fused_projections(policy, rows=rows))
        yield


@contextmanager
def training(model: torch.nn.Module) -> Iterator[None]:
    """While open, `model`'s forwards and backwards with grad use the fast paths; without grad
    (evaluation inside a training loop) only the lean LoRA forward, which gives the same
    numbers."""
    with ExitStack() as stack:
        if accel.applies(model_device(model)):
            stack.enter_context(lean_lora_forward(model))
            stack.enter_context(matmul_attention_backward())
        yield
