"""The masked input's wire format: b bits per value as one little-endian bit stream, whatever path packs it
(whole-byte widths take a byte-copy path, the others the 64-value shift layout): the same bytes, and back."""

from __future__ import annotations

import numpy as np
import pytest

from fl_common.secagg.encoding import add_packed, pack, unpack


def _reference(values: np.ndarray, bits: int) -> bytes:
    """Value i at bits [i*b, (i+1)*b) of one little-endian integer: the definition, one Python int."""
    stream = 0
    for i, v in enumerate(values.tolist()):
        stream |= int(v) << (bits * i)
    return stream.to_bytes((values.size * bits + 7) // 8, "little")


@pytest.mark.parametrize("bits", [1, 4, 7, 8, 12, 16, 20, 23, 24, 28, 29, 32, 40, 48, 56, 61, 62])
def test_pack_is_the_documented_bit_stream_and_unpack_inverts_it(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (0, 1, 63, 64, 65, 257):
        values = rng.integers(0, 2**bits, n, dtype=np.uint64)
        data = pack(values, bits)
        assert data == _reference(values, bits)
        back = unpack(data, n, bits)
        assert back.dtype == np.uint64 and np.array_equal(back, values)
        if bits <= 32:  # a uint32 word vector (the masking's accumulator) packs to the same bytes
            assert pack(values.astype(np.uint32), bits) == data
        # the server's path: a read-only view of the bytes, unpacked into the masking's word (uint32 up to 32 bits)
        words = unpack(memoryview(data), n, bits, words=True)
        assert words.dtype == (np.uint32 if bits <= 32 else np.uint64) and np.array_equal(words, values)


def test_unpack_refuses_a_wrong_size_and_stray_bits() -> None:
    data = pack(np.arange(10, dtype=np.uint64), 24)
    with pytest.raises(ValueError, match="expected 10 values"):
        unpack(data[:-1], 10, 24)
    for bits, n in ((29, 10), (28, 9), (28, 1)):  # the shift layout and the pair layout (odd count: half a pair)
        odd = bytearray(pack(np.arange(n, dtype=np.uint64), bits))
        odd[-1] |= 0x80  # a bit past the last value
        with pytest.raises(ValueError, match="stray bits"):
            unpack(bytes(odd), n, bits)
        with pytest.raises(ValueError, match="stray bits"):
            unpack(memoryview(bytes(odd)), n, bits, words=True)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the wrap it relies on must be silent (no overflow warning)
@pytest.mark.parametrize("bits", [1, 7, 8, 12, 16, 20, 24, 28, 29, 32, 40, 48, 56, 62])
def test_add_packed_adds_the_values_where_they_lie_modulo_the_ring(bits: int) -> None:
    """The server folds a masked input straight from its bytes (whole-byte widths read each value as the word
    where it starts, the next values' bytes above it): modulo 2^b the sum is the unpacked one's, for every length
    (the last values, whose word would run past the end, are read on their own), the accumulator wrapping
    silently."""
    rng = np.random.default_rng(100 + bits)
    word = np.uint32 if bits <= 32 else np.uint64
    for n in (1, 2, 3, 63, 64, 65, 257):
        values = rng.integers(0, 2**bits, n, dtype=np.uint64)
        acc = rng.integers(0, 2**32 if bits <= 32 else 2**63, n, dtype=np.uint64).astype(word)
        expected = (acc.astype(object) + values.astype(object)) % 2**bits
        add_packed(acc, memoryview(pack(values, bits)), bits)
        assert acc.dtype == word and np.array_equal(acc.astype(object) % 2**bits, expected)
    with pytest.raises(ValueError, match="expected 64 values"):
        add_packed(np.zeros(64, dtype=word), pack(np.zeros(32, dtype=np.uint64), bits), bits)
    if bits > 32:
        with pytest.raises(ValueError, match="cannot hold"):
            add_packed(np.zeros(1, dtype=np.uint32), pack(np.zeros(1, dtype=np.uint64), bits), bits)
