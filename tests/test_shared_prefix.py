"""rlhf.roles.shared_prefix and its use in causal_lm_logits: a prompt sampled k times runs once."""

import pytest
import torch

from rlhf.accel.attention import matmul_attention_backward
from rlhf.roles import actor_critic
from rlhf.roles.actor_critic import ActorCritic, causal_lm_logits, shares_context
from rlhf.roles.shared_prefix import distinct_rows
from rlhf.tokens.chat import positions_from_mask


def test_distinct_rows_by_hand():
    ids = torch.tensor([[5, 6], [7, 8], [5, 6], [9, 9], [7, 8]])
    first, row = distinct_rows(ids, torch.ones_like(ids))
    assert first.tolist() == [0, 1, 3]  # first occurrences, in order of appearance
    assert row.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(ids[first][row], ids)


def test_distinct_rows_none_when_nothing_repeats_and_the_mask_counts():
    ids = torch.tensor([[0, 5], [0, 5]])
    mask = torch.tensor([[0, 1], [1, 1]])  # same tokens, one of them padding: not the same row
    assert distinct_rows(ids, mask) is None
    assert distinct_rows(ids[:1], mask[:1]) is None


def _grpo_like_batch(k: int = 3):
    """2 prompts (left padded, different lengths) x k responses each (right padded), as a
    rollout lays them out: prompt rows repeated, then the sampled continuations."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 1000, (2, 7), generator=gen)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :3] = 0
    prompts = prompts.repeat_interleave(k, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
    responses = torch.randint(3, 1000, (2 * k, 5), generator=gen)
    response_mask = torch.ones_like(responses)
    response_mask[0, 2:] = 0  # finished early
    response_mask[-1, 4:] = 0
    ids = torch.cat([prompts, responses], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return ids, mask, responses.shape[1] + 1  # keep: the positions that predict the response


def _flat_logits(model, ids, mask, keep):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    return out.logits[:, -keep:]


def test_logits_and_lora_gradients_are_the_flat_forwards(random_lora):
    """Each prompt once, its cache indexed out to its 3 responses: the flat forward's logits
    and LoRA gradients within fp32 rounding, inside the update's matmul attention backward
    (queries continuing a cached prefix) too; and the path is taken (one prefix forward over
    2 rows, not 6)."""
    policy = random_lora(seed=0)
    ids, mask, keep = _grpo_like_batch()
    real = mask[:, -keep:].bool()
    seen_rows = []
    embed = policy.get_input_embeddings()
    embed.register_forward_hook(lambda _m, args, _out: seen_rows.append(args[0].shape))
    runs = []
    for shared in (False, True):
        for backward_ctx in (torch.enable_grad, matmul_attention_backward):
            policy.zero_grad(set_to_none=True)
            seen_rows.clear()
            with backward_ctx():
                if shared:
                    logits = causal_lm_logits(policy, ids, mask, keep)
                else:
                    logits = _flat_logits(policy, ids, mask, keep)
                logits[real].sin().sum().backward()
            grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
            runs.append((logits.detach(), grads, list(seen_rows)))
    flat, flat_grads, flat_rows = runs[0]
    assert flat_rows == [torch.Size([6, 12])]
    for logits, grads, rows in runs[2:]:
        assert rows == [torch.Size([2, 7]), torch.Size([6, 5])]  # prompts once, then responses
        torch.testing.assert_close(logits[real], flat[real], rtol=1e-4, atol=1e-5)
        assert grads.keys() == flat_grads.keys() and any("lora_B" in n for n in grads)
        for name, grad in flat_grads.items():
            assert (grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name


def test_the_reference_and_the_shared_value_head_take_it_too(random_lora):
    """ActorCritic: the value head reads the same LM-head inputs, and the reference (adapter
    off) differs from the policy, as in the flat forward."""
    ac = ActorCritic(random_lora(seed=1)).eval()
    with torch.no_grad():
        ac.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    ids, mask, keep = _grpo_like_batch(k=2)
    real = mask[:, -keep:].bool()
    with torch.no_grad():
        logits, values = ac(ids, mask, keep=keep)
        ref = ac.reference_logits(ids, mask, keep=keep)
        with actor_critic.lm_head_inputs(ac.policy) as seen:
            flat = _flat_logits(ac.policy, ids, mask, keep)
        flat_values = ac.values_from_hidden(seen[-1][:, -keep:])
        with ac.adapter_disabled():
            flat_ref = _flat_logits(ac.policy, ids, mask, keep)
    torch.testing.assert_close(logits[real], flat[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values[real], flat_values[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref[real], flat_ref[real], rtol=1e-4, atol=1e-5)
    assert (ref[real] - logits[real]).abs().max() > 1e-2  # the adapter is really off


@pytest.mark.parametrize("case", ["gradient_checkpointing", "softcapping", "plain"])
def test_shares_context_only_where_it_is_the_same_function(random_lora, case):
    policy = random_lora(seed=3)
    lm = policy.get_base_model()
    if case == "gradient_checkpointing":
        lm.gradient_checkpointing_enable()  # turns the cache off in training
    if case == "softcapping":
        lm.config.final_logit_softcapping = 30.0  # a head that is not just lm_head(hidden)
    assert shares_context(policy) is (case == "plain")


def test_reward_scores_run_a_repeated_prompt_once_with_each_rows_own_score(tiny_model_dir):
    """5 responses to 2 prompts (one of them cut off): each score is the one that response
    gets alone, in the caller's order, and the shared tokens ran once per prompt."""
    from contextlib import nullcontext

    from rlhf.ppo.rollout import reward_scores
    from rlhf.roles import models

    torch.manual_seed(0)
    tok = models.load_tokenizer(tiny_model_dir)
    rm = models.load_reward_model(tiny_model_dir).eval()
    rm.config.pad_token_id = tok.pad_token_id
    p1 = [{"role": "user", "content": "What is two plus two?"}]
    p2 = [{"role": "user", "content": "Name a colour."}]
    prompts = [p1, p2, p1, p1, p2]
    responses = ["Four.", "Blue, I think", "It is 4", "Five", "Red."]
    finished = [True, True, False, True, True]
    seen = []
    rm.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape[0])
    )
    args = (rm, tok, prompts, responses, 128, torch.device("cpu"), nullcontext, finished)
    grouped = reward_scores(*args)
    assert seen == [2, 5]  # the 2 prompts' shared tokens, then the 5 responses
    alone = torch.cat(
        [reward_scores(rm, tok, [p], [r], 128, torch.device("cpu"), nullcontext, [f])
         for p, r, f in zip(prompts, responses, finished)]
    )  # fmt: skip
    torch.testing.assert_close(grouped, alone, rtol=1e-4, atol=1e-5)
    assert len(set(grouped.tolist())) == 5


def _tiny_gemma3():
    """A random Gemma-3 text model: sliding-window layers (window 4, shorter than the prompts,
    so the prefix's cache is cut) between full-attention ones, tied embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        attn_implementation="sdpa",
    )  # fmt: skip
    return Gemma3ForCausalLM(config)


def _tiny_gpt2():
    """Learned absolute positions: the continuation's positions come from the full mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("make", [_tiny_gemma3, _tiny_gpt2], ids=["gemma3", "gpt2"])
def test_other_architectures_get_the_flat_forwards_logits(make):
    torch.manual_seed(0)
    model = make().eval()
    assert shares_context(model)
    ids, mask, keep = _grpo_like_batch()
    real = mask[:, -keep:].bool()
    with torch.no_grad():
        shared = causal_lm_logits(model, ids, mask, keep)
        flat = _flat_logits(model, ids, mask, keep)
    torch.testing.assert_close(shared[real], flat[real], rtol=1e-4, atol=1e-5)
