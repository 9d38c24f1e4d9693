"""ChaCha20 seed expansion: determinism, domain separation, uniformity, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fl_common.secagg import derive_prg_key, expand_seed

SEED = bytes(range(32))


def test_deterministic_and_domain_separated() -> None:
    a = expand_seed(SEED, 1000, 40, label=b"r1")
    assert np.array_equal(a, expand_seed(SEED, 1000, 40, label=b"r1"))
    assert not np.array_equal(a, expand_seed(SEED, 1000, 40, label=b"r2"))
    assert not np.array_equal(a, expand_seed(bytes(32), 1000, 40, label=b"r1"))
    assert np.array_equal(expand_seed(SEED, 100, 40, label=b"r1"), a[:100])  # a stream: prefixes agree
    assert a.dtype == np.uint64 and int(a.max()) < 2**40
    assert expand_seed(SEED, 0, 40, label=b"r1").size == 0


def test_matches_reference_keystream() -> None:
    """The in-place fast path equals the plain ChaCha20 keystream, little-endian, masked."""
    key = derive_prg_key(SEED, b"ref")
    ks = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * 777))
    ref = np.frombuffer(ks, dtype="<u8") & np.uint64(2**62 - 1)
    assert np.array_equal(expand_seed(SEED, 777, 62, label=b"ref"), ref)


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
