"""A trained model's `model/` folder: safetensors weights, tokenizer, generation config, card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rlhf.infra.errors import NumericalFault
from rlhf.roles import models
from rlhf.tokens.decoding import eos_ids

log = logging.getLogger(__name__)


def save_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    merge_lora: bool,
    card: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """save_pretrained folder: safetensors, tokenizer, chat template, generation config, card;
    never non-finite weights. A LoRA model is merged when `merge_lora`, else saved as an
    adapter. `state_dict`: the full weights gathered from a sharded model (`model` then only
    supplies the config and class)."""
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
