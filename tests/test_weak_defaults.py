"""Smaller faults fixed alongside the regressions: each test fails on the old behaviour."""

from __future__ import annotations

import pytest
import torch

from rlhf.infra.errors import UserError
from rlhf.roles import models
from rlhf.tokens.chat import encode_prompt_response, encode_sft


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return models.load_tokenizer(smollm2_dir)


def test_approx_kl_early_stop_is_checked_after_each_minibatch():
    from rlhf.infra.runtime import make_accelerator
    from rlhf.infra.training import make_optimizer
    from rlhf.ppo.update import ppo_update
    from rlhf.recipe import PPOConfig, Recipe
    from rlhf.roles.actor_critic import ActorCritic
    from tests.dist_ppo_update import VOCAB, fixed_rollout
    from tests.ppo.tiny_policy import small_vocab_policy

    accelerator = make_accelerator(Recipe(precision="fp32", seed=0))
    cfg = PPOConfig(batch_size=8, mini_batch_size=2, ppo_epochs=2, target_kl_early_stop=1e-6)
    model = ActorCritic(small_vocab_policy(seed=0, vocab=VOCAB))
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    rollout, advantages, returns = fixed_rollout()
    stats = ppo_update(
        model,
        optimizer,
        accelerator,
        rollout,
        advantages,
        returns,
        cfg,
        torch.Generator().manual_seed(0),
    )
    # The rollout's log-probs are ~0.16 nats off the policy's: the first minibatch's approx
    # KL is already over the target, so nothing after it runs (not the rest of the epoch).
    assert stats["policy/minibatches_run"] == 1.0 and stats["policy/epochs_run"] == 1.0


def test_reference_logits_without_lora_is_an_error(tiny_model_dir):
    from rlhf.roles.actor_critic import ActorCritic

    ac = ActorCritic(models.load_causal_lm(tiny_model_dir))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match="needs a LoRA policy"):
        ac.reference_logits(ids, torch.ones_like(ids))


def test_every_end_token_ends_a_response():
    from rlhf.tokens.sequences import response_mask

    ids = torch.tensor([[5, 9, 7, 2], [5, 2, 9, 9], [5, 6, 7, 8]])
    mask, ended = response_mask(ids, [2, 9])  # e.g. <|eot_id|> and <|end_of_text|>
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_ppo_refuses_top_k_and_top_p():
    from rlhf.recipe import load_recipe

    for override in ("ppo.top_k=5", "ppo.top_p=0.9"):
        with pytest.raises(UserError, match="top_k / top_p are not supported for PPO"):
            load_recipe("recipes/tiny.yaml", [override])


def test_shipped_recipes_penalise_truncated_answers():
    from rlhf.recipe import load_recipe

    assert load_recipe("recipes/smollm2-135m.yaml").ppo.missing_eos_penalty > 0


def test_a_truncated_response_is_scored_without_the_end_of_turn(smol_tok):
    prompt = [{"role": "user", "content": "Tell me a story."}]
    finished = encode_prompt_response(smol_tok, prompt, "Once upon a time", 256)
    cut = encode_prompt_response(smol_tok, prompt, "Once upon a time", 256, finished=False)
    assert smol_tok.decode(finished).endswith("Once upon a time<|im_end|>\n")
    assert smol_tok.decode(cut).endswith("Once upon a time")
    assert cut == finished[: len(cut)]  # the same tokens, only the end-of-turn is missing


def test_truncate_long_prompts_keeps_the_end_of_an_sft_example(smol_tok):
    messages = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "The answer."},
    ]
    kept = encode_sft(smol_tok, messages, 64, keep_end=True)
    assert len(kept["input_ids"]) == 64
    answer = smol_tok.decode([t for t in kept["labels"] if t != -100])
    assert answer == "The answer.<|im_end|>\n"
    # Without it the start is kept and the answer is lost (the row is then dropped).
    assert all(t == -100 for t in encode_sft(smol_tok, messages, 64)["labels"])


def test_assistant_only_mask_refuses_a_template_whose_prefixes_differ(smol_tok):
    tok = models.load_tokenizer(
        models.resolve("smollm2-135m-instruct"),
        chat_template=(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} <END>"
            "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
        ),
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(UserError, match="chat template of .*not a prefix"):
        encode_sft(tok, messages, 128)
    assert encode_sft(tok, messages, 128, assistant_only=False)["labels"]


def test_attn_implementation_reaches_the_loaded_model(tiny_model_dir):
    for impl in ("eager", "sdpa"):
        model = models.load_causal_lm(tiny_model_dir, attn_implementation=impl)
        assert model.config._attn_implementation == impl
        rm = models.load_reward_model(tiny_model_dir, attn_implementation=impl)
        assert rm.config._attn_implementation == impl


def test_saved_models_keep_every_end_token(tiny_model_dir, tmp_path):
    import json

    from rlhf.roles.model_folder import save_model
    from rlhf.tokens.decoding import eos_ids

    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_causal_lm(tiny_model_dir)
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    save_model(model, tok, tmp_path, merge_lora=False, card="x")
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_token_id, 7]
    assert eos_ids(models.load_causal_lm(str(tmp_path)), tok) == [tok.eos_token_id, 7]


def test_rollout_stops_at_every_end_token_of_the_model(tiny_model_dir):
    from transformers import GenerationConfig

    from rlhf.ppo.rollout import sample_rollout
    from rlhf.recipe import PPOConfig

    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    eos, other_end = tok.eos_token_id, 7
    sampled = torch.tensor([[50, other_end, 60], [50, 51, eos]])
    seen = {}

    class Scripted(torch.nn.Module):  # a policy whose samples we choose
        generation_config = GenerationConfig(eos_token_id=[eos, other_end])

        def generate(self, input_ids, attention_mask, **kwargs):
            seen["eos"] = kwargs["generation_config"].eos_token_id
            return torch.cat([input_ids, sampled], dim=1)

    prompt = torch.full((2, 4), 100)
    roll = sample_rollout(Scripted(), prompt, torch.ones_like(prompt), PPOConfig(), tok)
    assert seen["eos"] == [eos, other_end]
    assert roll.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert roll.ended_with_eos.tolist() == [True, True]
