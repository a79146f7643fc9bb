"""The lean sampling loop (rlhf/ppo/decode.py) against transformers' generate and a full forward:
same tokens from the same seed, logits and hidden states that are the ones a forward over the
finished sequences gives, several EOS ids, dropped rows, LoRA, bf16 autocast with packed
weights, and sample_rollout's switch."""

import contextlib

import pytest
import torch

from rlhf.infra import prepacked
from rlhf.infra.errors import UserError
from rlhf.infra.runtime import cpu_supports_fast_bf16
from rlhf.ppo import decode
from rlhf.ppo.rollout import lean_decode_applies, sample_rollout
from rlhf.recipe import PPOConfig, load_recipe
from rlhf.roles import models
from rlhf.roles.actor_critic import lm_head_inputs
from rlhf.tokens.chat import positions_from_mask
from rlhf.tokens.sequences import logprobs_from_logits
from tests.conftest import device_under_test

T = 0.7
STEPS = 12
PAD = 0
DEVICE = device_under_test()  # CUDA when present (gpu/check.sh)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_causal_lm(tiny_model_dir).eval().to(DEVICE)


def _prompts(rows: int = 5, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (rows, width))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[1, :1] = 0
    mask[3, :7] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _hf(model, ids, mask, eos_ids, seed=0):
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=T,
        top_k=0,
        top_p=1.0,
        max_new_tokens=STEPS,
        eos_token_id=eos_ids,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_logits=True,
    )
    after = torch.rand(4)  # where generate left the global RNG
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1), after


def _lean(model, ids, mask, eos_ids, seed=0, **kwargs):
    torch.manual_seed(seed)
    out = decode.sample(model, ids, mask, STEPS, T, eos_ids, PAD, keep=True, **kwargs)
    return out, torch.rand(4)


def _live(response: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including each row's first EOS (the positions whose token was sampled)."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device)).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def _batch_sizes(model):
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    return sizes, hook


# Every fifth token id as EOS: with the random tiny model about a fifth of the draws, so rows
# finish at different steps; one never-sampled id: no row finishes early.
EARLY = list(range(3, 49152, 5))


def test_same_tokens_logprobs_and_rng_as_generate_without_early_finish(tiny):
    ids, mask = _prompts()
    hf_tokens, hf_logits, hf_after = _hf(tiny, ids, mask, [999])
    assert hf_tokens.shape == (5, STEPS) and not (hf_tokens == 999).any()
    out, after = _lean(tiny, ids, mask, [999])
    assert torch.equal(out.response_ids, hf_tokens)
    assert torch.equal(after, hf_after)  # the global RNG advanced exactly as generate's
    torch.testing.assert_close(out.logits, hf_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logprobs_from_logits(out.logits, out.response_ids, T),
        logprobs_from_logits(hf_logits, hf_tokens, T),
        rtol=1e-5,
        atol=1e-5,
    )


def test_dropping_finished_rows_keeps_every_rows_tokens(tiny):
    """Rows finish at different steps and leave the batch; each remaining row still gets
    generate's tokens, because the noise is drawn for the full batch every step."""
    ids, mask = _prompts()
    hf_tokens, hf_logits, hf_after = _hf(tiny, ids, mask, EARLY)
    live = _live(hf_tokens, EARLY)
    lengths = live.sum(1)
    assert lengths.min() < STEPS - 2 and len(set(lengths.tolist())) >= 3  # staggered finishes
    sizes, hook = _batch_sizes(tiny)
    try:
        out, after = _lean(tiny, ids, mask, EARLY)
    finally:
        hook.remove()
    assert sizes[0] == 5 and min(sizes) < 5  # rows were dropped along the way
    assert len(sizes) == hf_tokens.shape[1]  # one forward per step, no more
    assert torch.equal(out.response_ids, hf_tokens)  # pad after EOS, as generate fills it
    assert torch.equal(after, hf_after)
    torch.testing.assert_close(out.logits[live], hf_logits[live], rtol=1e-5, atol=1e-5)
    assert (out.logits[~live] == 0).all() and (out.hidden[~live] == 0).all()
    kept, _ = _lean(tiny, ids, mask, EARLY, compact=False)
    assert torch.equal(kept.response_ids, out.response_ids)


def test_a_padded_row_stays_in_the_batch_so_attention_keeps_its_mask(tiny):
    """transformers drops an all-ones attention mask (and attention then rounds differently):
    once only unpadded rows decode, a finished padded row is kept in the batch; and the
    batch never shrinks to one row (whose logits differed from generate's in the last bits)."""
    ids, mask = _prompts()
    exercised = 0
    for seed in range(8):
        masks: list[torch.Tensor] = []
        hook = tiny.register_forward_pre_hook(
            lambda _m, _a, kw, seen=masks: seen.append(kw["attention_mask"]), with_kwargs=True
        )
        try:
            out, _ = _lean(tiny, ids, mask, EARLY, seed=seed)
        finally:
            hook.remove()
        assert not any(bool(m.all()) for m in masks)
        assert min(m.shape[0] for m in masks) >= 2
        hf_tokens, _, _ = _hf(tiny, ids, mask, EARLY, seed=seed)
        assert torch.equal(out.response_ids, hf_tokens)
        last = _live(out.response_ids, EARLY)[:, -1]  # rows that decoded the last step
        exercised += int(bool(last.any()) and bool(mask[last].all()) and masks[-1].shape[0] > 1)
    assert exercised  # some seed ended with only unpadded rows decoding


def test_several_eos_ids_stop_a_row_and_pad_the_rest(tiny):
    ids, mask = _prompts()
    out, _ = _lean(tiny, ids, mask, EARLY)
    eos = torch.tensor(EARLY, device=DEVICE)
    for row in out.response_ids:
        hits = torch.isin(row, eos).nonzero()
        if len(hits):  # stopped at its first EOS, whichever id it was; pads after it
            first = int(hits[0])
            assert (row[first + 1 :] == PAD).all() and (row[:first] != PAD).all()
        else:
            assert len(row) == STEPS
    stopped = [int(r[torch.isin(r, eos)][0]) for r in out.response_ids if torch.isin(r, eos).any()]
    assert len(set(stopped)) >= 2  # different EOS ids ended different rows


def test_kept_logits_and_hidden_equal_a_fresh_full_forward(tiny):
    ids, mask = _prompts()
    out, _ = _lean(tiny, ids, mask, EARLY)
    live = _live(out.response_ids, EARLY)
    full_ids = torch.cat([ids, out.response_ids], 1)
    full_mask = torch.cat([mask, live.long()], 1)
    with torch.no_grad(), lm_head_inputs(tiny) as seen:
        logits = tiny(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=positions_from_mask(full_mask),
        ).logits
    P, R = ids.shape[1], out.response_ids.shape[1]
    window = slice(P - 1, P + R - 1)  # the position before each response token predicts it
    torch.testing.assert_close(out.logits[live], logits[:, window][live], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.hidden[live], seen[0][:, window][live], rtol=1e-4, atol=1e-4)
    # Left padding changes nothing: row 3 (7 pads) alone, unpadded, gives the same logits.
    with torch.no_grad():
        alone = tiny(input_ids=full_ids[3:4, 7:][:, : P - 7 + int(live[3].sum())]).logits
    n = int(live[3].sum())
    torch.testing.assert_close(out.logits[3, :n], alone[0, P - 8 : P - 8 + n], rtol=1e-4, atol=1e-4)


def test_lora_policy_samples_what_peft_generate_samples(random_lora):
    policy = random_lora().to(DEVICE)
    ids, mask = _prompts()
    hf_tokens, hf_logits, _ = _hf(policy, ids, mask, EARLY)
    with models.lean_lora_forward(policy):
        out, _ = _lean(policy, ids, mask, EARLY)
    assert torch.equal(out.response_ids, hf_tokens)
    live = _live(hf_tokens, EARLY)
    torch.testing.assert_close(out.logits[live], hf_logits[live], rtol=1e-5, atol=1e-5)
    with policy.disable_adapter():  # the adapter matters: the base samples something else
        base, _ = _lean(policy, ids, mask, EARLY)
    assert not torch.equal(base.response_ids, out.response_ids)


def _rollouts(policy, tok, **cfg):
    """sample_rollout with ppo.decode hf, then lean, from the same seed."""
    ids, mask = _prompts()
    rolls = []
    for mode in ("hf", "lean"):
        torch.manual_seed(0)
        config = PPOConfig(max_new_tokens=STEPS, decode=mode, **cfg)
        rolls.append(sample_rollout(policy, ids, mask, config, tok, keep_sampling_outputs=True))
    return rolls


def test_sample_rollout_lean_equals_hf(tiny_model_dir, tiny):
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    hf, lean = _rollouts(tiny, tok)
    assert torch.equal(hf.response_ids, lean.response_ids) and torch.equal(hf.mask, lean.mask)
    assert hf.texts == lean.texts
    m = lean.mask.bool()
    torch.testing.assert_close(lean.sampling_logits[m], hf.sampling_logits[m])
    torch.testing.assert_close(lean.sampling_hidden[m], hf.sampling_hidden[m])


@pytest.mark.skipif(not cpu_supports_fast_bf16(), reason="no native bf16 on this CPU")
def test_bf16_lora_rollout_with_dropped_rows_is_generates_bit_for_bit(
    tiny_model_dir, random_lora, monkeypatch
):
    """The PPO stage's set-up (LoRA, frozen weights in bf16, bf16 autocast, packed weights):
    rows leave the batch at different steps and still get generate's tokens and logits."""
    policy = random_lora().to(DEVICE)
    models.store_frozen_linears(policy, torch.bfloat16)
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    monkeypatch.setattr(
        "rlhf.ppo.rollout.eos_ids", lambda model, tokenizer: EARLY
    )  # many stop ids: rows finish at different steps
    sizes, hook = _batch_sizes(policy)
    try:
        with torch.autocast("cpu", torch.bfloat16):
            hf, lean = _rollouts(policy, tok)
    finally:
        hook.remove()
    assert min(sizes) < 5  # lean dropped rows (generate never does)
    lengths = lean.mask.sum(1)
    assert len(set(lengths.tolist())) >= 3
    assert torch.equal(hf.response_ids, lean.response_ids)
    m = lean.mask.bool()
    assert torch.equal(lean.sampling_logits[m], hf.sampling_logits[m])
    assert torch.equal(lean.sampling_hidden[m], hf.sampling_hidden[m])
    # kept as the LM head wrote them (bf16, half of generate's fp32 copies), the same values:
    # the same log-probs at the sampling temperature
    assert (
        lean.sampling_logits.dtype == torch.bfloat16 and hf.sampling_logits.dtype == torch.float32
    )
    ids, T = lean.response_ids, PPOConfig().temperature
    lean_lp, hf_lp = (logprobs_from_logits(r.sampling_logits, ids, T) for r in (lean, hf))
    assert torch.equal(lean_lp[m], hf_lp[m])


def _repeated_prompts(k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """3 of _prompts' rows (two of them left padded), each k times in a row, as a GRPO batch."""
    ids, mask = _prompts()
    return ids[:3].repeat_interleave(k, 0), mask[:3].repeat_interleave(k, 0)


@pytest.mark.parametrize("precision", ["fp32", "bf16-lora"])
def test_a_repeated_prompt_is_prefilled_once_and_every_row_still_gets_generates_tokens(
    tiny, random_lora, precision
):
    """9 rows, 3 distinct prompts: one prefill over the 3, then all 9 decode; tokens (rows
    finishing at different steps), logits and the global RNG are generate's. In bf16 (LoRA,
    frozen weights in bf16, packed weights, as the PPO stage samples) bit for bit."""
    if precision == "bf16-lora" and not cpu_supports_fast_bf16():
        pytest.skip("no native bf16 on this CPU")
    model, autocast = tiny, contextlib.nullcontext()
    if precision == "bf16-lora":
        model = random_lora().to(DEVICE)
        models.store_frozen_linears(model, torch.bfloat16)
        autocast = torch.autocast("cpu", torch.bfloat16)
    ids, mask = _repeated_prompts()
    sizes, hook = _batch_sizes(model)
    try:
        with autocast, prepacked.prepacked_linears(model, rows=ids.shape[0]):
            hf_tokens, hf_logits, hf_after = _hf(model, ids, mask, EARLY, seed=3)
            sizes.clear()
            out, after = _lean(model, ids, mask, EARLY, seed=3)
    finally:
        hook.remove()
    assert sizes[:2] == [3, 9]  # the prompts once, then every row
    live = _live(hf_tokens, EARLY)
    assert len(set(live.sum(1).tolist())) >= 3  # the copies of a prompt sample differently
    assert torch.equal(out.response_ids, hf_tokens)
    assert torch.equal(after, hf_after)
    if precision == "fp32":  # MKL's fp32 rounding depends on the batch shape (as dropped rows)
        torch.testing.assert_close(out.logits[live], hf_logits[live], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out.logits[live], hf_logits[live])


def test_lean_decode_falls_back_to_generate_where_it_does_not_apply(tiny, monkeypatch):
    cfg = PPOConfig()
    assert lean_decode_applies(tiny, cfg)
    assert not lean_decode_applies(tiny, PPOConfig(decode="hf"))
    assert not lean_decode_applies(tiny, PPOConfig(stop_strings=["\n"]))
    assert not lean_decode_applies(torch.nn.Linear(2, 2), cfg)  # no transformers config
    monkeypatch.setattr("rlhf.ppo.rollout.distributed.synced_gpus", lambda: True)
    assert not lean_decode_applies(tiny, cfg)


def test_decode_recipe_key_is_validated():
    with pytest.raises(UserError, match="ppo.decode"):
        load_recipe("recipes/tiny.yaml", ["ppo.decode=fast"])


class _PastKeyValuesOnly(torch.nn.Module):
    """A causal LM whose forward names its cache `past_key_values` (transformers before 5.24,
    remote-code models) and, like those versions, swallows any other keyword in **kwargs."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(
        self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=None, **_
    ):
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
        )


def test_a_forward_that_takes_past_key_values_decodes_on_its_cache(tiny):
    """The cache goes in under the keyword the forward declares: a cache passed under a name
    the forward swallows would leave every decode step seeing only its own token."""
    ids, mask = _prompts()
    hf_tokens, hf_logits, hf_after = _hf(tiny, ids, mask, EARLY)
    out, after = _lean(_PastKeyValuesOnly(tiny), ids, mask, EARLY)
    assert torch.equal(out.response_ids, hf_tokens)
    assert torch.equal(after, hf_after)
    live = _live(hf_tokens, EARLY)
    torch.testing.assert_close(out.logits[live], hf_logits[live], rtol=1e-5, atol=1e-5)
