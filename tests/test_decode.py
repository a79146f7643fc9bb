"""The samplers: the lean loop (rlhf/accel/decode.py) and transformers' generate (accel: off).
Both draw from softmax(logits / T) (a chi-square test on a small vocabulary), the same tokens
for a seed; the lean loop's kept logits and hidden states are the ones a forward over the
finished sequences gives, with several EOS ids, dropped rows and a prompt prefilled once."""

import pytest
import torch

from rlhf import accel
from rlhf.accel import decode
from rlhf.infra.errors import UserError
from rlhf.ppo.rollout import lean_decode_applies, sample_rollout
from rlhf.recipe import PPOConfig, load_recipe
from rlhf.roles import models
from rlhf.roles.actor_critic import lm_head_inputs
from rlhf.roles.models import cache_keyword
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


def _small_lm(vocab: int = 8):
    """A random 1-layer Llama over `vocab` tokens, its LM head scaled up so that the next-token
    distribution is far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


# chi-square's 0.999 quantile at 7 degrees of freedom (8 categories): a sampler drawing from
# the right distribution exceeds it once in a thousand seeds; this test uses one fixed seed.
CHI2_7_999 = 24.32


@pytest.mark.parametrize("sampler", [pytest.param("lean", marks=pytest.mark.fast_path), "generate"])
def test_one_step_draws_from_the_tempered_softmax(sampler):
    model, n = _small_lm(), 4000
    ids = torch.tensor([[1, 5, 3, 6]]).repeat(n, 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids[:1]).logits[0, -1].double() / T, dim=-1)
    assert p.max() < 0.9 and (p > 0.01).sum() >= 3  # a distribution worth testing
    torch.manual_seed(7)
    if sampler == "lean":
        tokens = decode.sample(model, ids, mask, 1, T, [99], PAD).response_ids[:, 0]
    else:
        tokens = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=T,
            top_k=0,
            top_p=1.0,
            max_new_tokens=1,
            pad_token_id=PAD,
            eos_token_id=99,
        )[:, -1]
    counts = torch.bincount(tokens, minlength=8).double()
    expected = n * p
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_7_999, (counts, expected)
    # and a wrong temperature is caught: T = 1 instead of 0.7 puts the statistic far above
    wrong = n * torch.softmax(torch.log(p) * T, dim=-1)
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 10 * CHI2_7_999


@pytest.mark.fast_path
def test_a_seed_gives_the_same_tokens_and_another_seed_others(tiny):
    ids, mask = _prompts()
    first, _ = _lean(tiny, ids, mask, EARLY, seed=0)
    again, _ = _lean(tiny, ids, mask, EARLY, seed=0)
    other, _ = _lean(tiny, ids, mask, EARLY, seed=1)
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.logits, again.logits)
    assert not torch.equal(first.response_ids, other.response_ids)


@pytest.mark.fast_path
def test_finished_rows_leave_the_batch(tiny):
    ids, mask = _prompts()
    sizes, hook = _batch_sizes(tiny)
    try:
        out, _ = _lean(tiny, ids, mask, EARLY)
    finally:
        hook.remove()
    lengths = _live(out.response_ids, EARLY).sum(1)
    assert lengths.min() < STEPS - 2 and len(set(lengths.tolist())) >= 3  # staggered finishes
    assert sizes[0] == 5 and min(sizes) < 5  # rows were dropped along the way
    assert len(sizes) == out.response_ids.shape[1]  # one forward per step, no more


@pytest.mark.fast_path
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


@pytest.mark.fast_path
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


def _repeated_prompts(k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """3 of _prompts' rows (two of them left padded), each k times in a row, as a GRPO batch."""
    ids, mask = _prompts()
    return ids[:3].repeat_interleave(k, 0), mask[:3].repeat_interleave(k, 0)


@pytest.mark.fast_path
def test_a_repeated_prompt_is_prefilled_once_and_every_row_samples_on(tiny):
    """9 rows, 3 distinct prompts: one prefill over the 3, then all 9 decode; each row's kept
    logits are those a full forward over its own finished sequence gives."""
    ids, mask = _repeated_prompts()
    sizes, hook = _batch_sizes(tiny)
    try:
        out, _ = _lean(tiny, ids, mask, EARLY, seed=3)
    finally:
        hook.remove()
    assert sizes[:2] == [3, 9]  # the prompts once, then every row
    live = _live(out.response_ids, EARLY)
    assert len(set(live.sum(1).tolist())) >= 3  # the copies of a prompt sample differently
    full_ids = torch.cat([ids, out.response_ids], 1)
    full_mask = torch.cat([mask, live.long()], 1)
    with torch.no_grad():
        logits = tiny(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=positions_from_mask(full_mask),
        ).logits
    P, R = ids.shape[1], out.response_ids.shape[1]
    expect = logits[:, P - 1 : P + R - 1]
    torch.testing.assert_close(out.logits[live], expect[live], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("accel_mode", ["auto", "off"])
def test_sample_rollout_keeps_the_logits_each_token_was_drawn_from(
    tiny_model_dir, tiny, accel_mode
):
    """Both samplers (accel auto: the lean loop; off: generate): the kept logits give the
    log-probs a fresh forward over the rollout gives, and a seed repeats its tokens."""
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    ids, mask = _prompts()
    cfg = PPOConfig(max_new_tokens=STEPS)
    with accel.using(accel_mode):
        assert lean_decode_applies(tiny, cfg, ids.device) == (accel_mode == "auto")
        rolls = []
        for _ in range(2):
            torch.manual_seed(0)
            rolls.append(sample_rollout(tiny, ids, mask, cfg, tok, keep_sampling_outputs=True))
    roll = rolls[0]
    assert torch.equal(roll.response_ids, rolls[1].response_ids)
    with torch.no_grad():
        logits = tiny(
            input_ids=roll.input_ids,
            attention_mask=roll.attention_mask,
            position_ids=positions_from_mask(roll.attention_mask),
        ).logits
    P, R = ids.shape[1], roll.response_ids.shape[1]
    m = roll.mask.bool()
    fresh = logprobs_from_logits(logits[:, P - 1 : P + R - 1], roll.response_ids, cfg.temperature)
    kept = logprobs_from_logits(roll.sampling_logits, roll.response_ids, cfg.temperature)
    torch.testing.assert_close(kept[m], fresh[m], rtol=1e-4, atol=1e-4)


@pytest.mark.fast_path
def test_lean_decode_falls_back_to_generate_where_it_does_not_apply(tiny, monkeypatch):
    cfg, cpu = PPOConfig(), torch.device("cpu")
    assert lean_decode_applies(tiny, cfg, cpu)
    assert not lean_decode_applies(tiny, cfg, torch.device("cuda"))  # none measured on a GPU
    assert not lean_decode_applies(tiny, PPOConfig(stop_strings=["\n"]), cpu)
    assert not lean_decode_applies(torch.nn.Linear(2, 2), cfg, cpu)  # no transformers config
    monkeypatch.setattr("rlhf.ppo.rollout.distributed.synced_gpus", lambda: True)
    assert not lean_decode_applies(tiny, cfg, cpu)


def test_accel_recipe_key_is_validated():
    assert load_recipe("recipes/tiny.yaml").accel == "auto"
    assert load_recipe("recipes/tiny.yaml", ["accel=off"]).accel == "off"
    with pytest.raises(UserError, match="accel"):
        load_recipe("recipes/tiny.yaml", ["accel=fast"])
    with pytest.raises(UserError, match="decode"):  # the old switch is gone, not ignored
        load_recipe("recipes/tiny.yaml", ["ppo.decode=lean"])


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
        return self.inner(  # the wrapped model under its own keyword (5.24: cache)
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_keyword(self.inner): past_key_values},
        )


@pytest.mark.fast_path
def test_a_forward_that_takes_past_key_values_decodes_on_its_cache(tiny):
    """The cache goes in under the keyword the forward declares: a cache passed under a name
    the forward swallows would leave every decode step seeing only its own token."""
    ids, mask = _prompts()
    expected, _ = _lean(tiny, ids, mask, EARLY)
    out, _ = _lean(_PastKeyValuesOnly(tiny), ids, mask, EARLY)
    assert torch.equal(out.response_ids, expected.response_ids)
    live = _live(out.response_ids, EARLY)
    torch.testing.assert_close(out.logits[live], expected.logits[live], rtol=1e-5, atol=1e-5)
