"""Memory per rank for PPO, on paper from bytes per parameter measured on SmolLM2 (CPU).

    python -m bench.memory_table          # measures (about a minute), then prints the tables

Measured on SmolLM2-135M-Instruct: the bytes of every weight, gradient and AdamW state tensor
after one optimizer step (full fine-tuning), the bytes of the frozen base with a LoRA adapter
(rlhf's bf16 frozen linears), and the bytes autograd saves for backward per token under bf16
autocast (saved-tensor hooks, 256 minus 128 tokens). The tables in recipes/accelerate/README.md
come from `tables()`; the model shapes are the public configs of Qwen2.5 and Llama 3.1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

GB = 1e9
TOKENS_PER_MICRO_BATCH = 4 * 1024  # training forward/backward: 4 sequences of 1024 tokens
LORA_RANK = 16


@dataclass(frozen=True)
class Shape:
    name: str
    params: float
    hidden: int
    layers: int
    kv_dim: int
    ffn: int

    def lora_params(self, r: int = LORA_RANK) -> float:
        """r (in + out) per adapted matrix: q, k, v, o, gate, up, down in every layer."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h))
        return self.layers * per_layer


MODELS = [
    Shape("Qwen2.5-0.5B", 0.494e9, 896, 24, 128, 4864),
    Shape("Qwen2.5-1.5B", 1.54e9, 1536, 28, 256, 8960),
    Shape("Qwen2.5-7B", 7.62e9, 3584, 28, 512, 18944),
    Shape("Llama-3.1-8B", 8.03e9, 4096, 32, 1024, 14336),
]
ENGINES = ["DDP", "ZeRO-2", "ZeRO-3", "FSDP2"]
RANKS = [1, 2, 4, 8]


def measure() -> dict:
    """Bytes per parameter and activation bytes per token on SmolLM2 (see the docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.infra.training import make_optimizer
    from rlhf.recipe import LoraConfig, OptimConfig
    from rlhf.roles import models

    path = models.resolve("smollm2-135m-instruct")

    def saved_per_token(model: torch.nn.Module) -> float:
        saved = {}
        for tokens in (128, 256):
            total = [0]

            def pack(t: torch.Tensor, total: list = total) -> torch.Tensor:
                total[0] += t.numel() * t.element_size()
                return t

            ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", torch.bfloat16):
                    loss = model(input_ids=ids, logits_to_keep=1).logits.float().sum()
            loss.backward()
            saved[tokens] = total[0]
        return (saved[256] - saved[128]) / 128

    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = full.config
    per_hidden_layer = config.hidden_size * config.num_hidden_layers
    n = sum(p.numel() for p in full.parameters())
    optimizer = make_optimizer(full, OptimConfig(lr=1e-5))
    full_act = saved_per_token(full)
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if t.ndim > 0]
    out = {
        "weight": sum(p.numel() * p.element_size() for p in full.parameters()) / n,
        "grad": sum(p.grad.numel() * p.grad.element_size() for p in full.parameters()) / n,
        "adam": sum(t.numel() * t.element_size() for t in states) / n,
        "act_full": full_act / per_hidden_layer,
    }
    lora = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = models.apply_lora(lora, LoraConfig(enabled=True, r=LORA_RANK, alpha=32))
    models.store_frozen_linears(lora, torch.bfloat16)
    frozen = [p for p in lora.parameters() if not p.requires_grad]
    out["frozen_bf16"] = sum(p.numel() * p.element_size() for p in frozen) / sum(
        p.numel() for p in frozen
    )
    out["act_lora"] = saved_per_token(lora) / per_hidden_layer
    return out


def per_rank_gb(m: Shape, b: dict, lora: bool, engine: str, n: int, shard_frozen: bool) -> float:
    """Bytes per rank: the trained model's states, the frozen roles, one micro-batch's
    activations. Full fine-tuning: a frozen reference and a reward model of the policy's size.
    LoRA: the reference is the base with the adapter off; the reward model is the only copy."""
    p, sharded = m.params, engine in ("ZeRO-3", "FSDP2")
    frozen_b = 2.0  # bf16 frozen weights (rlhf stores frozen matmul weights in the compute dtype)
    states = b["weight"] + b["grad"] + b["adam"]  # 16 bytes per trained parameter
    if lora:
        trained = m.lora_params()
        # the base is part of the sharded module under ZeRO-3 / FSDP2, and kept in fp32 there
        base = b["weight"] * p / n if sharded else frozen_b * p
        if engine == "ZeRO-2":
            model = b["weight"] * trained + (b["grad"] + b["adam"]) * trained / n
        else:
            model = states * trained / (n if sharded else 1)
        frozen = frozen_b * p / (n if shard_frozen else 1)  # the reward model
        act = b["act_lora"]
        return (base + model + frozen + act * m.hidden * m.layers * TOKENS_PER_MICRO_BATCH) / GB
    if engine == "DDP":
        model = states * p
    elif engine == "ZeRO-2":
        model = b["weight"] * p + (b["grad"] + b["adam"]) * p / n
    else:
        model = states * p / n
    frozen = 2 * frozen_b * p / (n if shard_frozen else 1)  # reference + reward model
    act = b["act_full"] * m.hidden * m.layers * TOKENS_PER_MICRO_BATCH
    return (model + frozen + act) / GB


def cell(gb: float) -> str:
    mark = "24" if gb <= 24 else "80" if gb <= 80 else "no"
    return f"{gb:.1f} ({mark})"


def tables(b: dict) -> str:
    lines = []
    for lora in (False, True):
        lines += [
            f"**PPO, {'LoRA r=16 (all linear layers)' if lora else 'full fine-tuning'}**: GB per"
            " rank (fits a 24 GB GPU / only an 80 GB one / neither)",
            "",
            "| model | engine | frozen roles | " + " | ".join(f"{n} GPU" for n in RANKS) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in RANKS) + " |",
        ]
        for m in MODELS:
            for engine in ENGINES:
                for shard_frozen in (False, True) if engine in ("ZeRO-3", "FSDP2") else (False,):
                    where = "sharded" if shard_frozen else "full copy"
                    cells = [cell(per_rank_gb(m, b, lora, engine, n, shard_frozen)) for n in RANKS]
                    lines.append(f"| {m.name} | {engine} | {where} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    measured = measure()
    print(json.dumps(measured, indent=1), file=sys.stderr)
    print(tables(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
