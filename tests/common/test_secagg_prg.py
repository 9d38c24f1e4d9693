"""AES-256-CTR seed expansion (PRG v2): determinism, domain separation, the documented keystream, in-place accumulation,
uniformity, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fl_common.secagg import derive_prg_key, expand_seed
from fl_common.secagg.prg import add_expansion, word_dtype

SEED = bytes(range(32))


def test_deterministic_and_domain_separated() -> None:
    a = expand_seed(SEED, 1000, 40, label=b"r1")
    assert np.array_equal(a, expand_seed(SEED, 1000, 40, label=b"r1"))
    assert not np.array_equal(a, expand_seed(SEED, 1000, 40, label=b"r2"))
    assert not np.array_equal(a, expand_seed(bytes(32), 1000, 40, label=b"r1"))
    assert np.array_equal(expand_seed(SEED, 100, 40, label=b"r1"), a[:100])  # a stream: prefixes agree
    assert a.dtype == np.uint64 and int(a.max()) < 2**40
    assert expand_seed(SEED, 0, 40, label=b"r1").size == 0


@pytest.mark.parametrize(("bits", "word"), [(62, "<u8"), (33, "<u8"), (32, "<u4"), (24, "<u4"), (1, "<u4")])
def test_matches_reference_keystream(bits: int, word: str) -> None:
    """The chunked in-place expansion equals the plain AES-256-CTR keystream (counter block 0), read as little-endian
    words of 4 bytes up to 32 bits and 8 above, low b bits; long enough to cross the expansion's chunks."""
    n = 70_001
    key = derive_prg_key(SEED, b"ref")
    width = np.dtype(word).itemsize
    ks = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(width * n))
    ref = np.frombuffer(ks, dtype=word).astype(np.uint64) & np.uint64(2**bits - 1)
    assert np.array_equal(expand_seed(SEED, n, bits, label=b"ref"), ref)
    assert word_dtype(bits).itemsize == width


@pytest.mark.parametrize("bits", [24, 32, 40])
def test_add_expansion_accumulates_mod_2_to_the_b(bits: int) -> None:
    """acc +/- PRG in place, in a uint32 or uint64 accumulator, reduced once at the end, equals the modular sum."""
    n = 40_000
    start = np.random.default_rng(1).integers(0, 2**bits, n, dtype=np.uint64)
    a, b = expand_seed(SEED, n, bits, label=b"a"), expand_seed(bytes(32), n, bits, label=b"b")
    want = (start + a - b) & np.uint64(2**bits - 1)
    for dtype in {word_dtype(bits), np.dtype(np.uint64)}:
        acc = start.astype(dtype)
        add_expansion(acc, SEED, bits, label=b"a")
        add_expansion(acc, bytes(32), bits, label=b"b", subtract=True)
        assert np.array_equal(acc.astype(np.uint64) & np.uint64(2**bits - 1), want)


def test_add_expansion_refuses_an_accumulator_too_narrow() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        add_expansion(np.zeros(10, dtype=np.uint32), SEED, 40, label=b"x")
    with pytest.raises(ValueError, match="contiguous"):
        add_expansion(np.zeros(10, dtype=np.int64), SEED, 20, label=b"x")


def test_rejects_bad_seed_and_bits() -> None:
    with pytest.raises(ValueError):
        expand_seed(b"short", 10, 32, label=b"x")
    with pytest.raises(ValueError):
        expand_seed(SEED, 10, 63, label=b"x")


def test_output_uniform_chi_square() -> None:
    v = expand_seed(SEED, 200_000, 32, label=b"chi")
    counts = np.bincount((v >> np.uint64(24)).astype(np.int64), minlength=256)
    expected = v.size / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 330.5  # chi2(255) critical value at alpha = 1e-3


def test_throughput_1_7m_elements() -> None:
    expand_seed(SEED, 1000, 62, label=b"warm")
    best = min(_timed(lambda: expand_seed(SEED, 1_700_000, 62, label=b"speed")) for _ in range(3))
    print(f"\nPRG: 1.7M elements in {best * 1e3:.1f} ms = {1.7e6 / best:.3g} elements/s")
    assert best < 0.5  # typically ~5-15 ms; generous bound for shared CI runners


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
