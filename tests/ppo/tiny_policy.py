"""A tiny random policy over a 64-token vocabulary and a reward it can learn: the PPO loop's
learning tests (tests/ppo/test_ppo_loop.py, tests/ppo/test_estimators.py)."""

import torch

from rlhf.ppo.rollout import Rollout


def small_vocab_policy(seed: int = 0, vocab: int = 64) -> torch.nn.Module:
    """A random 2-layer Llama over the first 64 ids of SmolLM2's vocabulary (EOS is id 2):
    small enough that sampling explores every token, so a reward on some tokens is learnable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def programmatic_score(roll: Rollout) -> torch.Tensor:
    """Fraction of response tokens with ids 10-19: a reward the loop must learn to raise."""
    target = (roll.response_ids >= 10) & (roll.response_ids < 20)
    return (target.float() * roll.mask).sum(1) / roll.mask.sum(1).clamp(min=1)
