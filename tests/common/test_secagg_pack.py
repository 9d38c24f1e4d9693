"""The masked input's wire format: b bits per value as one little-endian bit stream, whatever path packs it
(whole-byte widths take a byte-copy path, the others the 64-value shift layout): the same bytes, and back."""

from __future__ import annotations

import numpy as np
import pytest

from fl_common.secagg.encoding import pack, unpack


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


def test_unpack_refuses_a_wrong_size_and_stray_bits() -> None:
    data = pack(np.arange(10, dtype=np.uint64), 24)
    with pytest.raises(ValueError, match="expected 10 values"):
        unpack(data[:-1], 10, 24)
    for bits, n in ((29, 10), (28, 9), (28, 1)):  # the shift layout and the pair layout (odd count: half a pair)
        odd = bytearray(pack(np.arange(n, dtype=np.uint64), bits))
        odd[-1] |= 0x80  # a bit past the last value
        with pytest.raises(ValueError, match="stray bits"):
            unpack(bytes(odd), n, bits)
