"""CKKS core (fl_common/he): the decrypted sum of real ciphertexts against the float64 sum (within the
stated bound), the layout, and every malformed or unsafe message refused."""

from __future__ import annotations

import numpy as np
import pytest

from fl_common.he import (
    CKKSParams,
    DecryptedSum,
    EncryptedInput,
    EncryptedSum,
    Encryptor,
    HEInput,
    HEMessageError,
    KeyHolder,
    PublicKey,
    available,
    decode_sum,
    encode_input,
    load_ciphertexts,
)

pytestmark = pytest.mark.skipif(not available(), reason="the [he] extra (tenseal) is not installed")

LENGTH = 5000  # two ciphertexts of 4096 slots


def _params(**over) -> CKKSParams:
    return CKKSParams(**{"round": 3, "clients": ("0", "1", "2", "3"), "decryptor": "2", "vector_length": LENGTH,
                         "clip": 10.0, "weighted": True, "weight_bound": 50, "with_loss": True, **over})


@pytest.fixture(scope="module")
def holder() -> KeyHolder:
    return KeyHolder(_params(), "2")


def _encrypt_all(p: CKKSParams, holder: KeyHolder, inputs: list[HEInput]) -> tuple[list[np.ndarray], EncryptedSum]:
    """What clients and server do: encrypt each encoded input, add the ciphertexts (through bytes)."""
    key = PublicKey.from_bytes(holder.public_key().to_bytes())
    enc = Encryptor(p, key)
    plains, total = [], None
    for i, inp in enumerate(inputs):
        vec, _ = encode_input(p, inp)
        plains.append(vec)
        wire = EncryptedInput(p.round, str(i), enc.encrypt(vec)).to_bytes()
        cts = load_ciphertexts(enc.context, p, EncryptedInput.from_bytes(wire).ciphertexts)
        if total is None:
            total = cts
        else:
            for a, b in zip(total, cts, strict=True):
                a += b
    assert total is not None
    return plains, EncryptedSum(p.round, len(inputs), tuple(v.serialize() for v in total))


def test_decrypted_sum_is_the_float64_sum_within_the_stated_bound(holder: KeyHolder) -> None:
    p = holder.params
    rng = np.random.default_rng(0)
    inputs = [HEInput(delta=rng.normal(0, 0.05, LENGTH), weight=10 + 13 * i, loss=0.5 + i) for i in range(4)]
    plains, enc_sum = _encrypt_all(p, holder, inputs)
    answer = DecryptedSum.from_bytes(holder.decrypt(EncryptedSum.from_bytes(enc_sum.to_bytes())).to_bytes())
    exact = np.sum(plains, axis=0)
    err = float(np.abs(answer.values - exact).max())
    assert 0 < err <= p.error_bound(4)
    assert err < p.error_bound(4) / 10  # the bound is loose, not tight: a regression in the noise would show here
    sums = decode_sum(p, answer.values, 4)
    weights = np.array([10 + 13 * i for i in range(4)], dtype=float)
    want_mean = sum(w * inp.delta for w, inp in zip(weights, inputs, strict=True)) / weights.sum()
    got_mean = sums.delta * p.weight_bound / sums.weight
    assert abs(sums.weight - weights.sum()) <= p.weight_bound * p.error_bound(4)
    # mean = (sum f d) W / (sum f W): its error is at most W / sum(n) x (error of the sum) (+ the weight's, second order)
    assert float(np.abs(got_mean - want_mean).max()) <= 2 * p.weight_bound * p.error_bound(4) / weights.sum() + 1e-12
    assert sums.loss == pytest.approx(np.dot(weights, [0.5 + i for i in range(4)]) / weights.sum(), abs=1e-6)


def test_encoding_clips_weights_and_lays_out_the_slots() -> None:
    p = _params(with_loss=False)
    big = np.full(LENGTH, 1.0)  # norm sqrt(5000) > clip 10
    vec, clipped = encode_input(p, HEInput(delta=big, weight=25))
    assert clipped and vec.shape == (p.plain_length,) == (LENGTH + 1,)
    assert np.linalg.norm(vec[:LENGTH]) == pytest.approx(10.0 * 25 / 50)
    assert vec[-1] == 0.5
    dp = _params(weighted=False, with_loss=False, with_unclipped=True, l2_clip=False, noise_std=0.1)
    vec, clipped = encode_input(dp, HEInput(delta=big, unclipped=True))
    assert not clipped and vec[-2] == 1.0 and vec[-1] == 1.0 and np.array_equal(vec[:LENGTH], big)
    assert p.num_ciphertexts == 2 and p.chunk_lengths() == [4096, LENGTH + 1 - 4096]
    assert CKKSParams.from_json(p.to_json()) == p


@pytest.mark.parametrize("bad", [
    dict(delta=np.zeros(LENGTH - 1)), dict(delta=np.full(LENGTH, np.nan)), dict(delta=np.zeros(LENGTH), weight=0),
    dict(delta=np.full(LENGTH, 1e7 / np.sqrt(LENGTH)) * 1e3),
])
def test_encoding_refuses_bad_inputs(bad: dict) -> None:
    p = _params(clip=1e12)
    with pytest.raises(ValueError):
        encode_input(p, HEInput(**bad))


def test_the_decryptor_refuses_a_sum_of_one_and_a_foreign_round(holder: KeyHolder) -> None:
    p = holder.params
    _, one = _encrypt_all(p, holder, [HEInput(delta=np.zeros(LENGTH), weight=3)])
    with pytest.raises(HEMessageError, match="reveal one update"):
        holder.decrypt(one)
    with pytest.raises(HEMessageError, match="round"):
        holder.decrypt(EncryptedSum(p.round + 1, 2, one.ciphertexts))
    with pytest.raises(ValueError, match="decryptor"):
        KeyHolder(p, "1")


def test_a_public_key_carrying_the_secret_key_is_refused(holder: KeyHolder) -> None:
    import tenseal as ts

    p = holder.params
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 60])
    ctx.global_scale = 2.0 ** 40
    leaky = PublicKey(p.round, p.decryptor, ctx.serialize(save_secret_key=True))
    with pytest.raises(HEMessageError, match="secret key"):
        Encryptor(p, leaky)
    with pytest.raises(HEMessageError, match="expected the decryptor"):
        Encryptor(p, PublicKey(p.round, "1", holder.public_key().context))
    with pytest.raises(HEMessageError, match="does not load"):
        Encryptor(p, PublicKey(p.round, p.decryptor, b"garbage"))


def test_messages_refuse_malformed_bytes(holder: KeyHolder) -> None:
    p = holder.params
    enc = Encryptor(p, holder.public_key())
    msg = EncryptedInput(p.round, "0", enc.encrypt(np.zeros(p.plain_length))).to_bytes()
    for bad in (msg[:-1], msg + b"x", b"XXXX" + msg[4:], msg[:10], holder.public_key().to_bytes()):
        with pytest.raises(HEMessageError):
            EncryptedInput.from_bytes(bad)
    ok = EncryptedInput.from_bytes(msg)
    with pytest.raises(HEMessageError, match="ciphertexts"):
        load_ciphertexts(enc.context, p, ok.ciphertexts[:1])
    with pytest.raises(HEMessageError, match="does not load"):
        load_ciphertexts(enc.context, p, (b"junk", ok.ciphertexts[1]))
    with pytest.raises(HEMessageError, match="slots"):  # the chunks swapped: the slot counts do not match
        load_ciphertexts(enc.context, p, (ok.ciphertexts[1], ok.ciphertexts[0]))
    with pytest.raises(HEMessageError, match="non-finite"):
        DecryptedSum.from_bytes(DecryptedSum(1, "2", np.array([np.inf])).to_bytes())
