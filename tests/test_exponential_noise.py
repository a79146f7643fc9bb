"""rlhf.infra.exponential_noise: torch's CPU exponential_ noise, bit for bit, and the generator
left where torch's own draw leaves it."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch

from rlhf.infra import exponential_noise as noise


def test_the_fast_path_is_active_on_this_torch():
    assert noise.fast_path_matches_torch()


@pytest.mark.parametrize(
    ("skip", "shape"),
    [
        (0, (2, 5)),  # a freshly seeded engine: the first output twists
        (7, (3, 49152)),  # mid-stream, many twists
        (623, (1,)),  # the next output is the last before a twist
        (624, (1, 623)),  # ends one output before a twist
        (100, (0, 4)),  # nothing drawn
    ],
)
def test_same_values_and_next_state_as_torchs_exponential(skip, shape):
    torch.manual_seed(123)
    torch.randint(0, 2**31, (skip,), dtype=torch.int64) if skip else None
    start = torch.get_rng_state()
    ours = noise.exponential_noise(shape)
    ours_after = torch.rand(16)
    torch.set_rng_state(start)
    theirs = torch.empty(shape).exponential_(1)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_after, torch.rand(16))


@pytest.mark.parametrize("fast", [True, False])
def test_some_rows_are_those_rows_of_the_whole_draw_and_the_generator_moves_past_it(
    fast, monkeypatch
):
    # what the sampler asks for once rows have finished: their noise is not needed, but the
    # stream must move past it as generate's full-batch draw does
    if not fast:
        monkeypatch.setattr(noise, "fast_path_matches_torch", lambda: False)
    rows = torch.tensor([0, 3, 4])
    torch.manual_seed(11)
    start = torch.get_rng_state()
    some = noise.exponential_noise((5, 7), rows=rows)
    after = torch.rand(4)
    torch.set_rng_state(start)
    whole = torch.empty(5, 7).exponential_(1)
    assert some.shape == (3, 7)
    assert torch.equal(some, whole[rows])
    assert torch.equal(after, torch.rand(4))


def test_the_first_value_by_hand_from_pythons_own_mt19937():
    # torch's first value from a state is -log1p(-u), u = the low 53 bits of (a << 32 | b)
    # over 2^53, where a, b are the engine's next two 32-bit outputs. Python's random module
    # runs the same MT19937: loaded with torch's state (struct layout: int32 `left` at byte 8,
    # 624 uint64 words from byte 24), its getrandbits(32) gives a and b.
    torch.manual_seed(5)
    torch.rand(3)
    raw = bytes(torch.get_rng_state().tolist())
    left = struct.unpack_from("<i", raw, 8)[0]
    key = struct.unpack_from("<624Q", raw, 24)
    engine = random.Random()
    engine.setstate((3, (*key, 625 - left), None))
    a, b = engine.getrandbits(32), engine.getrandbits(32)
    u = (((a << 32) | b) & ((1 << 53) - 1)) / 2**53
    expected = torch.tensor([-math.log1p(-u)], dtype=torch.float64).float()
    assert torch.equal(noise.exponential_noise((1,)), expected)


def test_the_check_restores_the_generator():
    noise.fast_path_matches_torch.cache_clear()
    torch.manual_seed(9)
    start = torch.get_rng_state()
    assert noise.fast_path_matches_torch()
    assert torch.equal(torch.get_rng_state(), start)


def test_another_torch_whose_random_differs_falls_back_to_torchs_own_draw(monkeypatch):
    # stands in for a torch whose int64 random_() no longer draws exponential_'s 64 bits
    noise.fast_path_matches_torch.cache_clear()
    real_bits = noise._bits
    monkeypatch.setattr(noise, "_bits", lambda shape: real_bits(shape) >> 1)
    try:
        assert not noise.fast_path_matches_torch()
        torch.manual_seed(3)
        start = torch.get_rng_state()
        drawn = noise.exponential_noise((2, 9))
        torch.set_rng_state(start)
        assert torch.equal(drawn, torch.empty(2, 9).exponential_(1))
    finally:
        noise.fast_path_matches_torch.cache_clear()


def test_another_device_draws_with_torch_and_leaves_the_cpu_generator_alone():
    torch.manual_seed(4)
    start = torch.get_rng_state()
    drawn = noise.exponential_noise((2, 3), "meta")  # stands in for a GPU: no CPU stream used
    assert drawn.device.type == "meta" and drawn.shape == (2, 3)
    assert torch.equal(torch.get_rng_state(), start)
