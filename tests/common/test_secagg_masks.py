"""Pairwise/self masks: cancellation, dropout recovery (full SecAgg walk-through), uniformity."""

from __future__ import annotations

import hashlib
from itertools import combinations

import numpy as np
import pytest

from fl_common.crypto import KeyPair, x25519_shared_secret
from fl_common.secagg import (
    FieldOverflowError,
    FixedPointSpec,
    Share,
    ShareError,
    add_mod,
    build_graph,
    mask_input,
    mask_words,
    pairwise_mask,
    pairwise_seed,
    reconstruct,
    split_secret,
    sub_mod,
    unmask_sum,
)

CTX = b"round-42"


def _det(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _keypair(i: int) -> KeyPair:
    return KeyPair.from_private_bytes(_det(f"mask-key-{i}"))


def _sum(vectors, bits: int) -> np.ndarray:
    acc = np.zeros_like(vectors[0])
    for v in vectors:
        acc = add_mod(acc, v, bits)
    return acc


def test_pairwise_sign_convention_cancels() -> None:
    s = _det("secret")
    a = pairwise_mask(s, 3, 7, 100, 30, context=CTX)
    b = pairwise_mask(s, 7, 3, 100, 30, context=CTX)
    assert a.any() and not add_mod(a, b, 30).any()
    with pytest.raises(ValueError):
        pairwise_mask(s, 3, 3, 10, 30)


def test_all_masks_removed_gives_exact_sum() -> None:
    ids, bits, dim = [1, 2, 3, 4, 5], 40, 2000
    keys = {i: _keypair(i) for i in ids}
    rng = np.random.default_rng(0)
    xs = {i: rng.integers(0, 2**bits, dim, dtype=np.uint64) for i in ids}
    seeds = {i: _det(f"self-{i}") for i in ids}
    ys = []
    for u in ids:
        secrets_u = {v: x25519_shared_secret(keys[u].private_key, keys[v].public_key) for v in ids if v != u}
        ys.append(mask_input(xs[u], u, seeds[u], secrets_u, bits, context=CTX))
    plain = _sum(list(xs.values()), bits)
    masked = _sum(ys, bits)
    assert not np.array_equal(masked, plain)
    assert np.array_equal(unmask_sum(masked, bits, survivor_self_seeds=seeds, context=CTX), plain)
    # the wrong round context leaves garbage behind
    assert not np.array_equal(unmask_sum(masked, bits, survivor_self_seeds=seeds, context=b"round-41"), plain)
    # the server's way at 24 bits: its uint32 running sum is consumed (unmasked where it lies, no copy)
    small = {i: (x % 2**24) for i, x in xs.items()}
    ys24 = [mask_input(small[u], u, seeds[u], {v: x25519_shared_secret(keys[u].private_key, keys[v].public_key)
                                               for v in ids if v != u}, 24, context=CTX) for u in ids]
    words = _sum(ys24, 24).astype(np.uint32)
    copied = unmask_sum(words.copy(), 24, survivor_self_seeds=seeds, context=CTX)
    consumed = unmask_sum(words, 24, survivor_self_seeds=seeds, context=CTX, consume=True)
    assert consumed is words and consumed.dtype == np.uint32
    assert np.array_equal(consumed, copied) and np.array_equal(copied, _sum(list(small.values()), 24))


def test_full_walkthrough_n6_t4_two_dropouts() -> None:
    """Bonawitz et al. rounds 0-4 in memory: keys, shares, masked input, dropouts, unmasking."""
    n, t, dim = 6, 4, 5000
    ids = list(range(1, n + 1))
    spec = FixedPointSpec.for_clients(clip=1.0, scale_bits=16, num_clients=n)
    bits = spec.modulus_bits
    rng = np.random.default_rng(7)
    floats = {u: rng.uniform(-1, 1, dim) for u in ids}

    # Round 0 (advertise keys): each client's mask key pair s_u; public keys go to everyone.
    mask_keys = {u: _keypair(u) for u in ids}
    self_seeds = {u: _det(f"b-{u}") for u in ids}

    # Round 1 (share keys): t-of-n shares of b_u and of s_u^SK to every other client.
    held: dict[int, dict[str, dict[int, Share]]] = {v: {"b": {}, "sk": {}} for v in ids}
    for u in ids:
        b_shares = split_secret(self_seeds[u], t, ids)
        sk_shares = split_secret(mask_keys[u].private_bytes(), t, ids)
        for v in ids:
            held[v]["b"][u] = b_shares[v]
            held[v]["sk"][u] = sk_shares[v]

    # Round 2 (masked input): everyone masks; clients 2 and 5 drop before their y arrives.
    encoded = {u: spec.encode(floats[u], rng) for u in ids}
    masked = {}
    for u in ids:
        secrets_u = {v: x25519_shared_secret(mask_keys[u].private_key, mask_keys[v].public_key) for v in ids if v != u}
        masked[u] = mask_input(encoded[u], u, self_seeds[u], secrets_u, bits, context=CTX)
    dropped = {2, 5}
    survivors = [u for u in ids if u not in dropped]
    assert len(survivors) == t
    y_sum = _sum([masked[u] for u in survivors], bits)

    # Round 4 (unmasking): each survivor reveals b-shares of survivors and sk-shares of dropped.
    b_rec = {u: reconstruct([held[v]["b"][u] for v in survivors], t) for u in survivors}
    sk_rec = {d: reconstruct([held[v]["sk"][d] for v in survivors], t) for d in dropped}
    assert b_rec == {u: self_seeds[u] for u in survivors}
    dangling = []
    for d in dropped:
        d_key = KeyPair.from_private_bytes(sk_rec[d])
        for u in survivors:
            dangling.append((u, d, x25519_shared_secret(d_key.private_key, mask_keys[u].public_key)))
    unmasked = unmask_sum(y_sum, bits, survivor_self_seeds=b_rec, dangling_pairs=dangling, context=CTX)

    assert np.array_equal(unmasked, _sum([encoded[u] for u in survivors], bits))  # exact, mod 2^b
    result = spec.decode_sum(unmasked, len(survivors))
    expected = sum(floats[u] for u in survivors)
    assert np.max(np.abs(result - expected)) <= len(survivors) * 2.0**-16
    with pytest.raises(FieldOverflowError):  # forgetting one dangling mask is detected as garbage
        spec.decode_sum(unmask_sum(y_sum, bits, survivor_self_seeds=b_rec, dangling_pairs=dangling[1:], context=CTX), 4)
    # fewer than t survivors cannot unmask
    with pytest.raises(ShareError):
        reconstruct([held[v]["b"][1] for v in survivors[:3]], t)


def test_exact_modular_sum_with_dropouts() -> None:
    ids, bits, dim = [1, 2, 3, 4, 5, 6], 48, 300
    keys = {i: _keypair(i) for i in ids}
    seeds = {i: _det(f"s{i}") for i in ids}
    rng = np.random.default_rng(3)
    xs = {i: rng.integers(0, 2**bits, dim, dtype=np.uint64) for i in ids}
    for dropped in combinations(ids, 2):
        surv = [u for u in ids if u not in dropped]
        ys = [
            mask_input(xs[u], u, seeds[u],
                       {v: x25519_shared_secret(keys[u].private_key, keys[v].public_key) for v in ids if v != u},
                       bits, context=CTX)
            for u in surv
        ]
        dangling = [
            (u, d, x25519_shared_secret(keys[d].private_key, keys[u].public_key)) for d in dropped for u in surv
        ]
        out = unmask_sum(_sum(ys, bits), bits, survivor_self_seeds={u: seeds[u] for u in surv},
                         dangling_pairs=dangling, context=CTX)
        assert np.array_equal(out, _sum([xs[u] for u in surv], bits))


def test_secagg_plus_sparse_graph_with_dropouts() -> None:
    ids = list(range(1, 21))
    graph = build_graph(ids, 6, seed=_det("graph"))
    bits, dim = 36, 256
    keys = {i: _keypair(i) for i in ids}
    seeds = {i: _det(f"gs{i}") for i in ids}
    rng = np.random.default_rng(11)
    xs = {i: rng.integers(0, 2**bits, dim, dtype=np.uint64) for i in ids}
    dropped = {4, 13, 17}
    surv = [u for u in ids if u not in dropped]
    ys = [
        mask_input(xs[u], u, seeds[u],
                   {v: x25519_shared_secret(keys[u].private_key, keys[v].public_key) for v in graph[u]}, bits)
        for u in surv
    ]
    dangling = [(u, d, x25519_shared_secret(keys[d].private_key, keys[u].public_key))
                for d in dropped for u in graph[d] if u not in dropped]
    out = unmask_sum(_sum(ys, bits), bits, survivor_self_seeds={u: seeds[u] for u in surv}, dangling_pairs=dangling)
    assert np.array_equal(out, _sum([xs[u] for u in surv], bits))


def test_masked_vector_is_uniform_and_uncorrelated_with_input() -> None:
    bits, dim = 32, 200_000
    x = (np.arange(dim, dtype=np.uint64) * np.uint64(977)) % np.uint64(2**bits)  # a highly structured input
    keys = {i: _keypair(i) for i in (1, 2, 3)}
    secrets_1 = {v: x25519_shared_secret(keys[1].private_key, keys[v].public_key) for v in (2, 3)}
    y = mask_input(x, 1, _det("self-1"), secrets_1, bits, context=CTX)

    counts = np.bincount((y >> np.uint64(bits - 8)).astype(np.int64), minlength=256)  # top 8 bits
    expected = dim / 256
    assert float(np.sum((counts - expected) ** 2 / expected)) < 330.5  # chi2(255), alpha = 1e-3

    u = np.sort(y.astype(np.float64) / 2.0**bits)
    ecdf = np.arange(1, dim + 1) / dim
    ks = max(float(np.max(ecdf - u)), float(np.max(u - (ecdf - 1.0 / dim))))
    assert ks < 1.95 / np.sqrt(dim)  # Kolmogorov-Smirnov, alpha = 1e-3

    r = np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]
    assert abs(r) < 4 / np.sqrt(dim)
    # y - x is the mask itself: independent of x as well
    r_mask = np.corrcoef(x.astype(np.float64), sub_mod(y, x, bits).astype(np.float64))[0, 1]
    assert abs(r_mask) < 4 / np.sqrt(dim)


def test_the_self_mask_hides_a_client_declared_dropped_after_its_masked_input_arrived() -> None:
    """Why the self mask exists: a server that claims u dropped (after u's masked input reached it) collects shares
    of u's mask key, rebuilds it and removes every pairwise mask from y_u. What is left must still be uniform
    noise - x_u + PRG(b_u) - not x_u. (Without the self mask, on both sides, the remainder would be x_u exactly.)"""
    bits, n = 32, 2000
    u, peers = 1, [2, 3, 4, 5]
    keys = {i: KeyPair.generate() for i in [u, *peers]}
    secrets_ = {v: x25519_shared_secret(keys[u].private_key, keys[v].public_bytes) for v in peers}
    x = np.random.default_rng(3).integers(0, 1000, size=n, dtype=np.uint64)  # small, very non-uniform values
    b_u = hashlib.sha256(b"self seed").digest()
    y = mask_input(x, u, b_u, secrets_, bits, context=b"round-7")
    # the lying server: it holds u's rebuilt mask key, so it recomputes every pairwise secret of u
    stolen = KeyPair.from_private_bytes(keys[u].private_bytes())
    rest = y.copy()
    for v in peers:
        rest = sub_mod(rest, pairwise_mask(x25519_shared_secret(stolen.private_key, keys[v].public_bytes), u, v, n, bits,
                                           context=b"round-7"), bits)
    assert np.count_nonzero(rest == x) <= 2  # each coordinate equal by chance with probability 2^-32
    assert np.count_nonzero(rest < 1000) <= 2  # and nothing of x's range shows: the remainder is spread over 2^32
    # with b_u (only t share holders can give it), the remainder is x exactly: the self mask is all that stood between
    from fl_common.secagg import self_mask

    np.testing.assert_array_equal(sub_mod(rest, self_mask(b_u, n, bits, context=b"round-7"), bits), x)


def test_pair_ids_are_checked_before_any_mask_is_derived() -> None:
    """Ids are the Shamir x-coordinates and the order of the sign convention: 0, negatives, non-integers and a
    client paired with itself are refused with the reason, on both sides of the pair."""
    secret = bytes(32)
    for u, v in ((0, 2), (2, 0), (-1, 2), (2, -1), ("1", 2), (2, "1"), (1.0, 2), (2, 1.0)):
        with pytest.raises(ValueError, match="positive integers"):
            pairwise_seed(secret, u, v)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="itself"):
        pairwise_seed(secret, 3, 3)
    assert pairwise_seed(secret, 1, 2) == pairwise_seed(secret, 2, 1) != pairwise_seed(secret, 1, 3)


def test_pairwise_seed_and_masks_match_the_documented_derivation() -> None:
    """Known answers, re-derived here from the documented construction (HKDF-SHA256, info = domain || lo (8 bytes) ||
    hi (8 bytes) || len(context) (4 bytes) || context; PRG v2: AES-256-CTR keystream from counter block 0 as
    little-endian 32-bit words for b <= 32, low b bits).
    Both ends of a pair run the same code, so a change to the encoding would still cancel in every round-trip
    test - but two implementations (or versions) of the protocol would no longer agree."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    secret = bytes(range(32))
    for u, v, ctx in ((1, 2, b"round-1"), (300, 7, b"")):
        lo, hi = min(u, v), max(u, v)
        info = b"fl-hub/v1/secagg/pairwise-seed|" + lo.to_bytes(8, "big") + hi.to_bytes(8, "big") + len(ctx).to_bytes(4, "big") + ctx
        want = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
        assert pairwise_seed(secret, u, v, context=ctx) == want
    assert pairwise_seed(secret, 1, 2, context=b"round-1").hex() == \
        "94b5555ade2b155103374d61f058c039bcde6efcee55395fa3ecb3f1786a1fa8"
    from fl_common.secagg import self_mask

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"fl-hub/v2/secagg/prg|" + b"self|" + b"round-1").derive(bytes(32))
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(12))
    words = [int.from_bytes(stream[4 * i:4 * i + 4], "little") for i in range(3)]
    assert [int(w) for w in self_mask(bytes(32), 3, 32, context=b"round-1")] == words == [3777788157, 840286997, 2591274763]
    # the pair's sign: the lower id adds PRG(s_uv), the higher subtracts it
    up, down = pairwise_mask(secret, 1, 2, 3, 32, context=b"round-1"), pairwise_mask(secret, 2, 1, 3, 32, context=b"round-1")
    assert [int(w) for w in up] == [1931192128, 2405136864, 1388789526]
    assert [int(w) for w in add_mod(up, down, 32)] == [0, 0, 0]


@pytest.mark.parametrize("bits", [24, 29, 48])
def test_masking_in_place_in_the_word_dtype_equals_mask_input(bits: int) -> None:
    """``mask_words`` (the client's path: no copy, no widening) gives mask_input's values in the word dtype, on the
    vector it was given; a vector of another dtype is refused before any mask is added."""
    rng = np.random.default_rng(bits)
    x = rng.integers(0, 2**bits, 5_000, dtype=np.uint64)
    secrets = {j: x25519_shared_secret(_keypair(1).private_key, _keypair(j).public_key) for j in (2, 3, 5)}
    want = mask_input(x, 1, _det("b1"), secrets, bits, context=CTX)
    words = x.astype(np.uint32 if bits <= 32 else np.uint64)
    got = mask_words(words, 1, _det("b1"), secrets, bits, context=CTX)
    assert got is words and np.array_equal(got, want) and want.dtype == np.uint64
    if bits <= 32:
        with pytest.raises(ValueError, match="contiguous 1-D uint32"):
            mask_words(x.copy(), 1, _det("b1"), secrets, bits, context=CTX)
