"""The forwards every training step runs under: the PPO update, SFT, the reward model, DPO.

Three swaps, each with its own tests, none of which changes the objective (only the second
changes the gradients' rounding):
- models.lean_lora_forward: peft's LoRA forward without its per-call bookkeeping, the same
  numbers;
- attention.matmul_attention_backward: on a CPU, attention's gradient through matmuls instead
  of torch's flash-attention backward (the same forward; gradients as close to fp64 as flash's);
- gated_mlp.recomputed_activations: the MLP's act(gate) recomputed in backward instead of kept
  (the same numbers, less memory).

Measured on the 2-core bf16 VM (2026-11-29, the default recipe, the same batches, 2 alternating
runs each), with and without the matmul attention backward (the other two change no
arithmetic): SFT steps 3-12 20.5 / 21.3 -> 17.7 / 19.0 s; the reward model's steps 3-12
27.7 / 25.5 -> 20.9 / 20.7 s; DPO's first 8 steps (TRL's trainer.train) 117.9 / 107.7 ->
92.6 / 85.4 s. In fp32 (instruction sets capped at AVX2) it was no faster: the reward
model's steps 3-12 33.1 / 34.6 s with flash's backward, 35.2 / 35.1 s with the matmul one;
SFT 30.2 / 32.8 vs 28.6 / 33.6 s. The PPO update has run under all three since they were
written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rlhf.roles import gated_mlp, models
from rlhf.roles.attention import matmul_attention_backward


@contextmanager
def lean_training_forwards(model: torch.nn.Module) -> Iterator[None]:
    """While open, `model`'s forwards and backwards with grad run as the module docstring
    says; without grad (evaluation inside a training loop) they are the plain ones, except
    the lean LoRA forward, which gives the same numbers."""
    lean = models.lean_lora_forward(model)
    with lean, matmul_attention_backward(), gated_mlp.recomputed_activations(model):
        yield
