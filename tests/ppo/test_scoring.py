"""Scoring does less work than a plain full forward and must give the same numbers: logits only
at the response positions, and the policy's log-probs and values taken from generation."""

import contextlib

import pytest
import torch

from rlhf.accel.lean_lora import lean_lora_forward
from rlhf.ppo.rollout import sample_rollout, score_with_models
from rlhf.recipe import LoraConfig, PPOConfig
from rlhf.roles import models
from rlhf.roles.actor_critic import ActorCritic, causal_lm_logits
from rlhf.tokens.sequences import response_slice


def _left_padded(vocab: int, rows: int = 3, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (rows, width))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[1, :1] = 0
    return ids, mask


def test_keep_gives_the_last_positions_of_the_full_forward(tiny_model_dir):
    policy = models.load_causal_lm(tiny_model_dir)
    critic = models.load_reward_model(tiny_model_dir)
    ids, mask = _left_padded(policy.config.vocab_size)
    for ac in (ActorCritic(policy).eval(), ActorCritic(policy, critic).eval()):
        if ac.value_head is not None:
            torch.nn.init.normal_(ac.value_head.weight)  # zero-initialised otherwise
        with torch.no_grad():
            full_logits, full_values = ac(ids, mask)
            logits, values = ac(ids, mask, keep=4)
        assert logits.shape[1] == values.shape[1] == 4
        torch.testing.assert_close(logits, full_logits[:, -4:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, full_values[:, -4:], rtol=1e-5, atol=1e-5)
        assert values.abs().sum() > 0


def test_causal_lm_logits_slices_models_without_logits_to_keep(tiny_model_dir):
    model = models.load_causal_lm(tiny_model_dir).eval()
    ids, mask = _left_padded(model.config.vocab_size)

    class NoKeep(torch.nn.Module):  # a forward without the logits_to_keep argument
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
            )

    with torch.no_grad():
        expected = causal_lm_logits(model, ids, mask)[:, -3:]
        torch.testing.assert_close(causal_lm_logits(NoKeep(), ids, mask, keep=3), expected)
        torch.testing.assert_close(causal_lm_logits(model, ids, mask, keep=3), expected)


def test_scores_from_generation_match_a_fresh_forward(tiny_model_dir, accel_mode):
    """Log-probs, entropy and values read off generation equal (to float tolerance) those of
    a full forward over the sampled sequences; the reference is scored the same either way."""
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    policy = models.apply_lora(models.load_causal_lm(tiny_model_dir), LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # the policy differs from its reference
    ac = ActorCritic(policy).eval()
    torch.nn.init.normal_(ac.value_head.weight)
    cfg = PPOConfig(max_new_tokens=6, temperature=0.7)
    ids, mask = _left_padded(1000)
    torch.manual_seed(0)
    kept = sample_rollout(ac.policy, ids, mask, cfg, tok, keep_sampling_outputs=True)
    assert kept.sampling_logits.shape[:2] == kept.response_ids.shape
    torch.manual_seed(0)
    fresh = sample_rollout(ac.policy, ids, mask, cfg, tok)
    assert torch.equal(kept.response_ids, fresh.response_ids) and fresh.sampling_logits is None
    score_with_models(kept, ac, None, cfg.temperature, contextlib.nullcontext)
    score_with_models(fresh, ac, None, cfg.temperature, contextlib.nullcontext)
    assert kept.sampling_logits is None  # dropped once used
    m = kept.mask.bool()
    for field in ("logprobs", "entropy", "values", "ref_logprobs"):
        torch.testing.assert_close(
            getattr(kept, field)[m], getattr(fresh, field)[m], rtol=1e-4, atol=1e-4
        )
    # ...and both equal the plain full-sequence forward at the response window.
    with torch.no_grad():
        logits, _ = ac(kept.input_ids, kept.attention_mask)
    window = logits[:, response_slice(ids.shape[1], kept.response_ids.shape[1])]
    logp = torch.log_softmax(window / cfg.temperature, -1)
    logp = logp.gather(-1, kept.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(kept.logprobs[m], logp[m], rtol=1e-4, atol=1e-4)
    assert (kept.logprobs - kept.ref_logprobs)[m].abs().max() > 1e-3


def _count_peft_forwards(monkeypatch) -> list[int]:
    from peft.tuners.lora import Linear as LoraLinear

    calls, peft_forward = [0], LoraLinear.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return peft_forward(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "forward", counted)
    return calls


@pytest.mark.fast_path
def test_lean_lora_forward_under_bf16_autocast_samples_and_trains_as_peft_does(
    random_lora, monkeypatch
):
    """bf16 autocast over a bf16 frozen base, as the PPO stage runs on a bf16 CPU: the lean
    forward takes every LoRA layer (q/k/v see fp32 inputs, down_proj a bf16 one) and gives
    peft's tokens, logits and LoRA gradients bit for bit."""
    policy = random_lora()
    models.store_frozen_linears(policy, torch.bfloat16)
    ids, mask = _left_padded(1000)
    kwargs = dict(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=6, pad_token_id=0)
    kwargs.update(return_dict_in_generate=True, output_logits=True)
    vocab = policy.config.vocab_size
    weights = torch.randn(*ids.shape, vocab, generator=torch.Generator().manual_seed(0))
    peft_calls = _count_peft_forwards(monkeypatch)
    runs = {}
    for lean in (False, True):
        peft_calls[0] = 0
        torch.manual_seed(0)
        ctx = lean_lora_forward(policy) if lean else contextlib.nullcontext()
        kept = {}  # storages of the bf16 (tokens, hidden) tensors kept for backward
        hidden = policy.config.hidden_size

        def keep(t, kept=kept, hidden=hidden):
            if t.dtype == torch.bfloat16 and t.numel() == ids.numel() * hidden:
                kept[t.untyped_storage().data_ptr()] = t
            return t

        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            out = policy.generate(input_ids=ids, attention_mask=mask, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                logits = policy(input_ids=ids, attention_mask=mask).logits
            (logits.float() * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        policy.zero_grad(set_to_none=True)
        runs[lean] = (out, grads, peft_calls[0], len(kept))
    (peft_out, peft_grads, peft_n, peft_kept), (lean_out, lean_grads, lean_n, lean_kept) = (
        runs[False],
        runs[True],
    )
    assert peft_n > 0 and lean_n == 0  # every LoRA layer took the lean path
    # Per layer, q, k, v's LoRA A keep one bf16 copy of their fp32 input instead of three, gate
    # and up one instead of two (lean_lora._LastInputCast), and o_proj's bf16 input is not copied
    # by peft's round trip through fp32: 4 fewer.
    assert peft_kept - lean_kept == 4 * policy.config.num_hidden_layers
    assert torch.equal(peft_out.sequences, lean_out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(peft_out.logits, lean_out.logits))
    assert peft_grads.keys() == lean_grads.keys() and any("lora_A" in n for n in peft_grads)
    assert all(torch.equal(peft_grads[n], lean_grads[n]) for n in peft_grads)


@pytest.mark.fast_path
def test_lean_lora_forward_generates_exactly_what_peft_does(random_lora):
    policy = random_lora()
    ids, mask = _left_padded(1000)
    kwargs = dict(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=6)
    kwargs.update(return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    runs = []
    for lean in (False, True):
        torch.manual_seed(0)
        with lean_lora_forward(policy) if lean else contextlib.nullcontext():
            patched = sum("forward" in vars(m) for m in policy.modules())
            runs.append((policy.generate(input_ids=ids, attention_mask=mask, **kwargs), patched))
    (peft_out, none_patched), (lean_out, n_patched) = runs
    assert none_patched == 0 and n_patched > 0
    assert torch.equal(peft_out.sequences, lean_out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(peft_out.logits, lean_out.logits))
    assert sum("forward" in vars(m) for m in policy.modules()) == 0  # peft's forward is back
    with lean_lora_forward(policy), policy.disable_adapter(), torch.no_grad():
        off = policy(input_ids=ids, attention_mask=mask).logits  # falls back to peft: base only
    with policy.disable_adapter(), torch.no_grad():
        assert torch.equal(off, policy(input_ids=ids, attention_mask=mask).logits)
