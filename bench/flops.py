"""FLOP counts per PPO phase (Kaplan et al. 2020 accounting), from a model's config.json.

Per token, with N the parameters that take part in matmuls (not the embedding lookup):
  forward            2 N  +  attention 4 * layers * heads * head_dim * ctx  (QK^T and AV)
  forward+backward   6 N  +  3 x the forward attention term  (full fine-tuning)
  LoRA               4 N  (the frozen base needs input gradients only) + 6 N_lora, + 3 x attention
ctx is the number of keys a query attends to, averaged (causal: half the sequence; padded
positions are counted, since the kernels compute them). A causal LM's N includes the LM head
(d x V), counted only on the positions it runs on (ours keeps the response positions); a scalar
model's head is d x 1. Generation: the prompt prefill computes the LM head
for the last position only (transformers' logits_to_keep), then one token at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, model_dir: str | Path) -> Arch:
        c = json.loads((Path(model_dir) / "config.json").read_text())
        heads = c["num_attention_heads"]
        return cls(
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            ffn=c["intermediate_size"],
            vocab=c["vocab_size"],
        )

    def _linears(self) -> list[tuple[int, int]]:
        """(in, out) of each matmul weight in one layer (Llama: q, k, v, o, gate, up, down)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(d, q), (d, kv), (d, kv), (q, d), (d, self.ffn), (d, self.ffn), (self.ffn, d)]

    @property
    def body(self) -> int:
        return self.layers * sum(i * o for i, o in self._linears())

    def head_params(self, head: str) -> int:
        return self.hidden * self.vocab if head == "lm" else self.hidden

    def lora_params(self, r: int = 16) -> int:
        return self.layers * sum(r * (i + o) for i, o in self._linears())

    def attention(self, ctx: float) -> float:
        return 4 * self.layers * self.heads * self.head_dim * ctx

    def forward(
        self, head: str, tokens: float, ctx: float, head_tokens: float | None = None
    ) -> float:
        """`head_tokens`: positions the head runs on (fewer than `tokens` with logits_to_keep)."""
        head_tokens = tokens if head_tokens is None else head_tokens
        body = tokens * (2 * self.body + self.attention(ctx))
        return body + head_tokens * 2 * self.head_params(head)

    def train(
        self,
        head: str,
        tokens: float,
        ctx: float,
        lora: bool = False,
        head_tokens: float | None = None,
    ) -> float:
        """With LoRA the frozen weights (the tied LM head too) need input gradients only."""
        head_tokens = tokens if head_tokens is None else head_tokens
        per_weight = 4 if lora else 6
        body = per_weight * self.body + (6 * self.lora_params() if lora else 0)
        return tokens * (
            body + 3 * self.attention(ctx)
        ) + head_tokens * per_weight * self.head_params(head)

    def weight_bytes(self, bytes_per_param: int = 4) -> int:
        """Bytes read per generated token: every layer and the LM head (tied or not) once."""
        return (self.body + self.hidden * self.vocab) * bytes_per_param

    def kv_cache_bytes(self, batch: int, ctx: float, bytes_per_value: int = 4) -> float:
        return batch * ctx * self.layers * 2 * self.kv_heads * self.head_dim * bytes_per_value


# Which model forwards each implementation runs per phase (see bench/ours_ppo.py, trl_ppo.py),
# as (head, LM head on the response positions only).
SCORE_FORWARDS = {
    # ours: the policy's log-probs (and the shared head's values) come from generation;
    # critic, reference (logits_to_keep), reward model
    "parity": [("scalar", False), ("lm", True), ("scalar", False)],
    # reference = adapter disabled (logits_to_keep), reward model
    "defaults": [("lm", True), ("scalar", False)],
    # TRL takes the policy's logprobs from generate's scores: reference, value, reward model
    "trl": [("lm", False), ("scalar", False), ("scalar", False)],
}
# (head, LoRA, LM head on the response positions only) of each trained model
TRAINED = {
    "parity": [("lm", False, True), ("scalar", False, False)],
    "defaults": [("lm", True, True)],
    "trl": [("lm", False, False), ("scalar", False, False)],
}


def ppo_flops(
    arch: Arch, variant: str, batch: int, prompt: float, response: float, epochs: int
) -> dict[str, float]:
    """FLOPs of one PPO iteration's phases for rollouts of `prompt` + `response` tokens."""
    seq, tokens, kept = prompt + response, batch * (prompt + response), batch * (response + 1)
    prefill = batch * prompt * (2 * arch.body + arch.attention(prompt / 2))
    prefill += batch * 2 * arch.head_params("lm")
    decode = arch.forward("lm", batch * response, prompt + response / 2)
    score = sum(
        arch.forward(h, tokens, seq / 2, kept if keep else None)
        for h, keep in SCORE_FORWARDS[variant]
    )
    update = epochs * sum(
        arch.train(h, tokens, seq / 2, lora, kept if keep else None)
        for h, lora, keep in TRAINED[variant]
    )
    # The training forward: 2 FLOPs per weight (and per LoRA weight) and token, 1 x attention;
    # the backward is the rest of the update (the optimizer's elementwise work is not counted).
    train_forward = epochs * sum(
        arch.forward(h, tokens, seq / 2, kept if keep else None)
        + (tokens * 2 * arch.lora_params() if lora else 0)
        for h, lora, keep in TRAINED[variant]
    )
    return {
        "generate": prefill + decode,
        "score": score,
        # the score phase's parts: the reference's forward (LM head) and the reward model's
        "reference": sum(
            arch.forward(h, tokens, seq / 2, kept if keep else None)
            for h, keep in SCORE_FORWARDS[variant]
            if h == "lm"
        ),
        "reward": arch.forward("scalar", tokens, seq / 2),
        "update": update,
        "train_forward_and_loss": train_forward,
        "backward": update - train_forward,
    }


def generation_bound_s(
    arch: Arch,
    batch: int,
    prompt: float,
    response: float,
    bandwidth_gbs: float,
    bytes_per_value: int = 4,
) -> float:
    """Seconds to read the weights (and the KV cache) once per generated token; 2 bytes per
    value where they are stored in bf16."""
    per_step = arch.weight_bytes(bytes_per_value) + arch.kv_cache_bytes(
        batch, prompt + response / 2, bytes_per_value
    )
    return response * per_step / (bandwidth_gbs * 1e9)
