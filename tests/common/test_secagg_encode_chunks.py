"""The fixed-point encoding runs chunk by chunk with its clipping and weighting folded in (no temporary vectors):
it must give the one-shot textbook result, with the same rounding draws, across chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from fl_common.secagg.encoding import PlainInput, encode_input
from fl_common.secagg.field import FieldOverflowError, PreEncode, encode
from fl_common.secagg.planning import plan_params

N = 100_003  # a few encoding chunks and a ragged tail


def _textbook(x: np.ndarray, scale_bits: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    y = np.asarray(x, dtype=np.float64) * float(2**scale_bits)
    lo = np.floor(y)
    q = lo + (rng.random(y.size, dtype=np.float32) < (y - lo))
    return q.astype(np.int64).view(np.uint64) & np.uint64(2**bits - 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunked_encode_is_the_textbook_expression(dtype: type) -> None:
    x = np.random.default_rng(3).normal(0.0, 1.0, N).astype(dtype)
    x[[5, 6]] = [10.0, -10.0]  # the bound itself is allowed
    got = encode(x, 10.0, 16, 24, np.random.default_rng(9))
    assert got.dtype == np.uint64 and np.array_equal(got, _textbook(x, 16, 24, np.random.default_rng(9)))
    out = np.zeros(N + 2, dtype=np.uint64)
    encode(x, 10.0, 16, 24, np.random.default_rng(9), out=out[1:-1])  # into a slice, nothing outside touched
    assert np.array_equal(out[1:-1], got) and out[0] == out[-1] == 0


def test_pre_steps_equal_whole_vector_operations() -> None:
    x = np.random.default_rng(4).normal(0.0, 3.0, N)
    pre = PreEncode(rescale=0.37, clamp=2.5, factor=0.25)
    want = _textbook(np.clip(x * 0.37, -2.5, 2.5) * 0.25, 12, 20, np.random.default_rng(1))
    assert np.array_equal(encode(x, 2.5, 12, 20, np.random.default_rng(1), pre=pre), want)
    with pytest.raises(FieldOverflowError, match="clip range"):  # the range check is on the steps' result
        encode(x, 2.5, 12, 20, np.random.default_rng(1), pre=PreEncode(factor=2.0))


def test_encode_input_clips_and_weights_like_the_whole_vector_code() -> None:
    """L2 clip (norm 50 -> 10), clamp, n_k / W weighting, then the rounding: at most one unit apart from the
    whole-vector computation (the norm's summation order may move the scale by an ulp), same clip bit."""
    p = plan_params(round_number=1, client_ids=["a", "b", "c"], vector_length=N, clip=10.0, scale_bits=16, weighted=True,
                    weight_bound=600)
    delta = np.random.default_rng(5).normal(0.0, 1.0, N).astype(np.float32)
    delta *= np.float32(50.0 / np.linalg.norm(delta.astype(np.float64)))
    got, clipped = encode_input(p, PlainInput(delta, weight=300), np.random.default_rng(2))
    assert clipped
    x = delta.astype(np.float64)
    x = np.clip(x * (10.0 / np.linalg.norm(x)), -10.0, 10.0) * 0.5
    want = _textbook(x, 16, p.modulus_bits, np.random.default_rng(2))
    diff = (got[:N].astype(np.int64) - want.astype(np.int64)) % (1 << p.modulus_bits)
    assert set(np.unique(diff).tolist()) <= {0, 1, (1 << p.modulus_bits) - 1}
    with pytest.raises(FieldOverflowError, match="NaN or infinity"):
        bad = delta.copy()
        bad[7] = np.nan
        encode_input(p, PlainInput(bad, weight=300), np.random.default_rng(2))


@pytest.mark.parametrize("bits", [24, 32, 40])
def test_encode_input_in_the_masking_word_gives_the_same_values(bits: int) -> None:
    """``words=True`` (the client's masking path) encodes into uint32 up to 32 bits, uint64 above: same values,
    same rounding draws, as the uint64 encoding."""
    p = plan_params(round_number=1, client_ids=["a", "b", "c"], vector_length=N, clip=10.0, scale_bits=bits - 8,
                    weighted=True, weight_bound=600)
    delta = np.random.default_rng(6).normal(0.0, 0.5, N).astype(np.float32)
    plain = PlainInput(delta, weight=450, loss=0.7)
    wide, clipped = encode_input(p, plain, np.random.default_rng(8))
    words, clipped_too = encode_input(p, plain, np.random.default_rng(8), words=True)
    assert words.dtype == (np.uint32 if p.modulus_bits <= 32 else np.uint64)
    assert np.array_equal(words, wide) and clipped == clipped_too
    with pytest.raises(ValueError, match="uint32, for a modulus of 32 bits or less"):
        encode(delta, 10.0, 16, 40, np.random.default_rng(1), out=np.empty(N, dtype=np.uint32))
