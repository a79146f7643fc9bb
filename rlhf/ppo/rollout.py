"""Rollout: prompts -> sampled responses -> log-probs, values, reference log-probs, scores.

Shapes: B rollouts, P prompt tokens (left padded), R response tokens (right padded).
`mask` (B, R) is 1 on response tokens up to and including the first EOS, 0 after: everything
after the first EOS is masked everywhere (N implementation details of RLHF with PPO, #4).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf import accel
from rlhf.accel import apply, decode
from rlhf.infra import distributed
from rlhf.roles import models
from rlhf.roles.actor_critic import ActorCritic, causal_lm_logits, lm_head_inputs
from rlhf.roles.reward_model import RewardScorer, collate_rankings, scorer_inputs
from rlhf.tokens.chat import encode_prompt_response, pad_batch
from rlhf.tokens.decoding import Decoding, eos_ids, own_generation_config
from rlhf.tokens.sequences import (
    entropy_from_logits,
    logprobs_from_logits,
    response_keep,
    response_mask,
)


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) float 0/1
    logprobs: torch.Tensor = field(default=None)  # (B, R) policy, at sampling temperature
    ref_logprobs: torch.Tensor = field(default=None)  # (B, R)
    values: torch.Tensor = field(default=None)  # (B, R)
    entropy: torch.Tensor = field(default=None)  # (B, R)
    scores: torch.Tensor = field(default=None)  # (B,) raw reward-model scores
    ended_with_eos: torch.Tensor = field(default=None)  # (B,) bool
    seq_kl: torch.Tensor = field(default=None)  # (B,) summed per-token KL to the reference
    texts: list[str] = field(default_factory=list)
    # What generation computed anyway, kept for scoring and then dropped
    # (sample_rollout(keep_sampling_outputs=True)):
    sampling_logits: torch.Tensor | None = None  # (B, R, V) raw logits that sampled token t
    sampling_hidden: torch.Tensor | None = None  # (B, R, H) LM-head input at those positions

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.mask.long()], dim=1)

    def select(self, idx: torch.Tensor) -> Rollout:
        """Rows `idx` of every tensor field (minibatching)."""
        out = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                out[name] = value[idx]
            elif name == "texts" and value:
                out[name] = [value[i] for i in idx.tolist()]
            else:
                out[name] = value
        return Rollout(**out)


@torch.no_grad()
def sample_rollout(
    policy: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: Any,
    tokenizer: Any,
    keep_sampling_outputs: bool = False,
) -> Rollout:
    """Sample responses from a causal LM with a KV cache; cut everything after the first EOS.
    keep_sampling_outputs also keeps the raw logits each token was sampled from and the LM-head
    inputs behind them, so scoring needs no second policy forward (as TRL's PPOTrainer)."""
    stops = eos_ids(policy, tokenizer)
    rows, sharded = prompt_ids.shape[0], distributed.synced_gpus()
    with apply.sampling(policy, rows, sharded):
        if lean_decode_applies(policy, cfg, prompt_ids.device):
            out = decode.sample(
                policy,
                prompt_ids,
                prompt_mask,
                cfg.max_new_tokens,
                cfg.temperature,
                stops,
                tokenizer.pad_token_id,
                keep=keep_sampling_outputs,
            )
        else:
            out = _generate(
                policy, prompt_ids, prompt_mask, cfg, tokenizer, stops, keep_sampling_outputs
            )
    response_ids = out.response_ids
    if response_ids.shape[1] == 0:  # every row stopped at once: keep one (EOS) column
        response_ids = torch.full_like(prompt_ids[:, :1], tokenizer.eos_token_id)
    mask, ended = response_mask(response_ids, stops)
    if cfg.stop_strings:
        mask, ended = _apply_stop_strings(response_ids, mask, ended, tokenizer, cfg.stop_strings)
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(response_ids, mask)
    ]
    roll = Rollout(prompt_ids, prompt_mask, response_ids, mask, ended_with_eos=ended, texts=texts)
    # Without a generated token there is nothing to keep: scoring then runs a forward.
    if out.logits is not None and out.logits.shape[1] == response_ids.shape[1]:
        roll.sampling_logits, roll.sampling_hidden = out.logits, out.hidden
    return roll


def generate_reference(model, reference, ids, mask, cfg, tokenizer) -> Rollout:
    """Sample from the SFT policy: the adapter-disabled policy, or the frozen reference copy."""
    if reference is None:
        with model.adapter_disabled():
            return sample_rollout(model.policy, ids, mask, cfg, tokenizer)
    return sample_rollout(reference, ids, mask, cfg, tokenizer)


def lean_decode_applies(policy: torch.nn.Module, cfg: Any, device: torch.device) -> bool:
    """Where the fast paths apply, sample with rlhf.accel.decode unless something needs
    generate: another decoding (greedy, top-k, top-p, beams), stop strings, synced_gpus
    (ZeRO-3 / FSDP ranks step together), or a model that is not a decoder-only transformers
    LM."""
    config = getattr(policy, "config", None)
    return (
        accel.applies(device)
        and getattr(cfg, "decoding", None) is None
        and not cfg.stop_strings
        and not distributed.synced_gpus()
        and config is not None
        and not getattr(config, "is_encoder_decoder", False)
    )


def _generate(
    policy, prompt_ids, prompt_mask, cfg, tokenizer, stops, keep_sampling_outputs
) -> decode.Decoded:
    """transformers' generate, returning what the lean loop returns (logits and LM-head inputs
    only when kept and one per generated token). `cfg.decoding` (rlhf eval compare), when
    set, replaces the stages' sampling at the temperature, the only setting active (the
    folder's generation_config.json ignored): log_softmax(logits / T) is what was sampled."""
    extra: dict[str, Any] = {"use_cache": True}
    if cfg.stop_strings:
        extra["stop_strings"] = list(cfg.stop_strings)
    if keep_sampling_outputs:
        extra.update(return_dict_in_generate=True, output_logits=True)
    decoding = getattr(cfg, "decoding", None) or Decoding(
        max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature
    )
    config = decoding.generation_config(tokenizer.pad_token_id, stops, **extra)
    gen_kwargs: dict[str, Any] = {"generation_config": config}
    if cfg.stop_strings:
        gen_kwargs["tokenizer"] = tokenizer
    if distributed.synced_gpus():  # ZeRO-3 / FSDP: every rank steps until all ranks finish
        gen_kwargs["synced_gpus"] = True
    capture = lm_head_inputs(policy) if keep_sampling_outputs else nullcontext([])
    with capture as hidden, own_generation_config(policy, config):
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **gen_kwargs)
    sequences = out.sequences if keep_sampling_outputs else out
    response_ids = sequences[:, prompt_ids.shape[1] :]
    steps = response_ids.shape[1]
    if not keep_sampling_outputs or len(out.logits) != steps or steps == 0:
        return decode.Decoded(response_ids, None, None)
    # One logits entry per generated token; the hook also saw the dummy forwards that
    # finished ranks run under synced_gpus, after the real ones: take the first R.
    logits = torch.stack(out.logits, dim=1)
    hidden_states = torch.stack([h[:, -1] for h in hidden[:steps]], dim=1)
    return decode.Decoded(response_ids, logits, hidden_states)


def _apply_stop_strings(response_ids, mask, ended, tokenizer, stop_strings):
    """Treat the token that completes a stop string like EOS (kept, everything after masked)."""
    mask = mask.clone()
    ended = ended.clone()
    for row in range(response_ids.shape[0]):
        n = int(mask[row].sum())
        text = ""
        for t in range(n):
            text += tokenizer.decode(response_ids[row, t : t + 1])
            if any(s in text for s in stop_strings):
                mask[row, t + 1 :] = 0
                ended[row] = True
                break
    return mask, ended


@torch.no_grad()
def score_with_models(
    rollout: Rollout,
    model: ActorCritic,
    reference: torch.nn.Module | None,
    temperature: float,
    autocast: Any,
) -> None:
    """Fill logprobs, values, entropy (policy) and ref_logprobs, each forward cut to the
    response positions; with the sampling logits kept, the policy needs no forward."""
    ids, attn = rollout.input_ids, rollout.attention_mask
    R = rollout.response_ids.shape[1]
    keep = response_keep(R)
    logits = rollout.sampling_logits
    with autocast():
        if logits is None:
            logits, values = model(ids, attn, keep=keep)
            logits = logits[:, :R]
            values = values[:, :R] if values is not None else None
        elif model.value_head is not None:
            values = model.values_from_hidden(rollout.sampling_hidden)
        elif model.critic is None:
            values = None
        else:
            values = model.critic_values(ids, attn, keep=keep)[:, :R]
    rollout.sampling_logits = rollout.sampling_hidden = None  # (B, R, V): free it now
    rollout.logprobs = logprobs_from_logits(logits, rollout.response_ids, temperature)
    rollout.values = values.float() if values is not None else None
    rollout.entropy = entropy_from_logits(logits, temperature)
    del logits
    with autocast():
        if reference is None:
            ref_logits = model.reference_logits(ids, attn, keep=keep)
        else:
            ref_logits = causal_lm_logits(reference, ids, attn, keep=keep)
    rollout.ref_logprobs = logprobs_from_logits(
        ref_logits[:, :R], rollout.response_ids, temperature
    )


@torch.no_grad()
def reward_scores(
    reward_model: torch.nn.Module,
    reward_tokenizer: Any,
    prompts: list[list[dict]],
    responses: list[str],
    max_length: int,
    device: torch.device,
    autocast: Any,
    finished: torch.Tensor | list[bool] | None = None,
) -> torch.Tensor:
    """Score (prompt, response) as the reward model was trained: rendered by the chat template,
    read at the last real token. `finished` (B,) bool: False renders that response without
    the end-of-turn. A prompt that comes several times is one group whose shared prefix runs
    once (collate_rankings(share_prefix=True))."""
    done = [True] * len(responses) if finished is None else [bool(f) for f in finished]
    seqs = [
        encode_prompt_response(reward_tokenizer, p, r, max_length, f)
        for p, r, f in zip(prompts, responses, done)
    ]
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(json.dumps(prompt, sort_keys=True, default=str), []).append(i)
    if len(groups) == len(seqs):  # nothing repeats: one flat batch
        batch = pad_batch(seqs, reward_tokenizer.pad_token_id, side="right")
        with autocast():
            scores = models.sequence_scores(
                reward_model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
        return scores.float()
    rows = [{"seqs": [seqs[i] for i in idx], "pairs": []} for idx in groups.values()]
    batch = collate_rankings(rows, reward_tokenizer.pad_token_id, share_prefix=True)
    with autocast():
        grouped = RewardScorer(reward_model)(**scorer_inputs(batch, device)).float()
    order = torch.tensor([i for idx in groups.values() for i in idx], device=grouped.device)
    return torch.empty_like(grouped).index_copy_(0, order, grouped)
