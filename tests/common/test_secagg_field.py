"""Fixed-point encoding into Z_{2^b}: range, round trip, unbiased rounding, no wrap-around."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_common.secagg import (
    FieldOverflowError,
    FixedPointSpec,
    add_mod,
    decode_sum,
    encode,
    max_level,
    neg_mod,
    required_modulus_bits,
    sub_mod,
)


def test_round_trip_error_within_one_step() -> None:
    rng = np.random.default_rng(0)
    clip, s = 2.0, 16
    bits = required_modulus_bits(clip, s, 1)
    x = rng.uniform(-clip, clip, 50_000)
    x[:4] = [clip, -clip, 0.0, 1e-9]
    back = decode_sum(encode(x, clip, s, bits, rng), 1, clip, s, bits)
    assert np.max(np.abs(back - x)) <= 2.0**-s


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(1)
    clip, s, draws = 1.0, 3, 4000  # coarse step 1/8 so bias would be visible
    spec = FixedPointSpec.for_clients(clip, s, 1)
    x = rng.uniform(-clip, clip, 64)
    total = np.zeros_like(x)
    for _ in range(draws):
        total += spec.decode_sum(spec.encode(x, rng), 1)
    err = total / draws - x
    # per-coordinate std of the mean <= (1/8)/2/sqrt(4000) ~ 1e-3
    assert np.max(np.abs(err)) < 5e-3
    assert abs(err.mean()) < 1e-3
    # round-to-nearest would be biased by up to half a step on these inputs
    nearest = np.round(x * 8) / 8 - x
    assert np.max(np.abs(nearest)) > 10 * np.max(np.abs(err)) / 2


def test_sum_of_many_clients_at_the_extremes_does_not_wrap() -> None:
    rng = np.random.default_rng(2)
    clip, s, n = 1.0, 10, 37
    bits = required_modulus_bits(clip, s, n)
    assert 2 ** (bits - 1) > n * max_level(clip, s)
    acc = np.zeros(8, dtype=np.uint64)  # the check after the loop uses the last sign's sum
    for sign in (1.0, -1.0):
        x = np.full(8, sign * clip)
        acc = np.zeros(8, dtype=np.uint64)
        for _ in range(n):
            acc = add_mod(acc, encode(x, clip, s, bits, rng), bits)
        assert np.allclose(decode_sum(acc, n, clip, s, bits), n * x)
    with pytest.raises(FieldOverflowError):
        decode_sum(acc, n, clip, s, bits - 1)  # field too small for n clients is refused


def test_mixed_signs_sum_matches() -> None:
    rng = np.random.default_rng(3)
    spec = FixedPointSpec.for_clients(0.5, 20, 10)
    xs = [rng.uniform(-0.5, 0.5, 1000) for _ in range(10)]
    acc = np.zeros(1000, dtype=np.uint64)
    for x in xs:
        acc = add_mod(acc, spec.encode(x, rng), spec.modulus_bits)
    assert np.max(np.abs(spec.decode_sum(acc, 10) - np.sum(xs, axis=0))) <= 10 * 2.0**-20


def test_a_word_sized_sum_decodes_as_the_uint64_one() -> None:
    """The server keeps its running sum in uint32 words up to 32 bits and decodes it as it is: the same floats as
    the uint64 path, extremes of both signs included, and the same refusal of a sum out of range."""
    rng = np.random.default_rng(4)
    for clip, s, n in ((10.0, 16, 10), (1.0, 10, 37), (200.0, 16, 10)):
        bits = required_modulus_bits(clip, s, n)
        assert bits < 32
        acc = np.zeros(1000, dtype=np.uint64)
        x = np.concatenate([np.full(10, clip), np.full(10, -clip), rng.uniform(-clip, clip, 980)])
        for _ in range(n):
            acc = add_mod(acc, encode(x, clip, s, bits, rng), bits)
        wide = decode_sum(acc, n, clip, s, bits)
        assert np.array_equal(decode_sum(acc.astype(np.uint32), n, clip, s, bits), wide)
        assert np.allclose(wide, n * x, atol=n * 2.0**-s)
        with pytest.raises(FieldOverflowError):  # a mask left in: far outside what n inputs can add up to
            decode_sum((acc + np.uint64(1 << (bits - 2))).astype(np.uint32) & np.uint32((1 << bits) - 1), n // 2, clip, s,
                       bits)


def test_range_checks() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(FieldOverflowError):
        encode(np.array([1.5]), 1.0, 8, 20, rng)
    with pytest.raises(FieldOverflowError):
        encode(np.array([np.nan]), 1.0, 8, 20, rng)
    with pytest.raises(FieldOverflowError):
        required_modulus_bits(1e6, 40, 1000)  # > 62 bits
    with pytest.raises(ValueError):
        encode(np.array([0.1]), 1.0, 8, 63, rng)
    # a leftover mask (uniform garbage) decodes far outside the possible range
    garbage = np.random.default_rng(5).integers(0, 2**40, 100, dtype=np.uint64)
    with pytest.raises(FieldOverflowError):
        decode_sum(garbage, 5, 1.0, 8, 40)


def test_accepts_torch_tensor_and_mod_helpers() -> None:
    rng = np.random.default_rng(6)
    t = torch.linspace(-1, 1, 11)
    q = encode(t, 1.0, 12, 16, rng)  # type: ignore[arg-type]  # a torch tensor is accepted as well
    assert q.dtype == np.uint64 and int(q.max()) < 2**16
    z = add_mod(q, neg_mod(q, 16), 16)
    assert not z.any()
    assert np.array_equal(sub_mod(add_mod(q, q, 16), q, 16), q)
