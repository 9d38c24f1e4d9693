"""Codecs and error feedback on flat float32 update vectors."""

from __future__ import annotations

import math

import pytest
import torch

from fl_common.tensors.codecs import (
    ComposedCodec,
    EncodedUpdate,
    Int8Codec,
    TopKCodec,
    make_codec,
    topk_count,
)
from fl_common.tensors.error_feedback import ErrorFeedback, spec_key
from fl_common.tensors.flat import ParamEntry, ParamSpec
from fl_common.tensors.wire import WireFormatError


def _vec(n: int, seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spec(*shapes: tuple[int, ...]) -> ParamSpec:
    return ParamSpec(tuple(ParamEntry(f"p{i}", s, "float32") for i, s in enumerate(shapes)))


# --- make_codec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, name, cls",
    [
        ("none", "none", None),
        ("float16", "float16", None),
        (" INT8 ", "int8", Int8Codec),
        ("topk:0.01", "topk:0.01", TopKCodec),
        ("topk:1", "topk:1.0", TopKCodec),
        ("topk:0.05+int8", "topk:0.05+int8", ComposedCodec),
        ("topk:0.05+float16", "topk:0.05+float16", ComposedCodec),
        ("topk:0.05+none", "topk:0.05", TopKCodec),
    ],
)
def test_make_codec_accepts(spec, name, cls):
    codec = make_codec(spec)
    assert codec.name == name
    if cls is not None:
        assert isinstance(codec, cls)
    assert make_codec(codec.name).name == codec.name  # canonical names parse to themselves


@pytest.mark.parametrize(
    "spec",
    ["", "gzip", "topk", "topk:", "topk:0", "topk:-0.1", "topk:1.5", "topk:nan", "topk:inf", "topk:abc",
     "topk:0.1+topk:0.2", "topk:0.1+zstd", "int8+topk:0.1", "float16:3", "topk:0.1+", None, 3],
)
def test_make_codec_rejects_with_one_line_message(spec):
    with pytest.raises(ValueError) as info:
        make_codec(spec)
    msg = str(info.value)
    assert "\n" not in msg and "topk:<ratio>" in msg and "int8" in msg


def test_biased_flags():
    assert not make_codec("none").biased and not make_codec("int8").biased
    assert make_codec("topk:0.1").biased and make_codec("topk:0.1+int8").biased


@pytest.mark.parametrize("spec", ["none", "float16", "int8", "topk:0.1", "topk:0.1+int8"])
def test_encode_rejects_bad_input(spec):
    codec = make_codec(spec)
    with pytest.raises(ValueError):
        codec.encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        codec.encode(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(2, 3))


@pytest.mark.parametrize("spec", ["none", "float16", "int8", "topk:0.1", "topk:0.1+int8"])
def test_empty_and_tiny_vectors(spec):
    codec = make_codec(spec)
    for n in (0, 1, 3):
        v = _vec(n, seed=n)
        enc = codec.encode(v, _gen(1))
        codec.check(enc)
        out = codec.decode(enc)
        assert out.shape == (n,) and out.dtype == torch.float32


@pytest.mark.parametrize("spec", ["none", "float16", "topk:0.1"])
def test_check_rejects_unexpected_params(spec):
    codec = make_codec(spec)
    enc = codec.encode(_vec(100))
    codec.check(enc)
    with pytest.raises(ValueError, match="params"):
        codec.check(EncodedUpdate(enc.codec, enc.numel, enc.arrays, {"chunk": 4096}))


# --- none / float16 ------------------------------------------------------------------------------


def test_none_round_trip_is_exact():
    v = torch.cat([_vec(10_000), torch.tensor([0.0, -0.0, 1e-38, 3e38, -1e-45])])
    codec = make_codec("none")
    out = codec.decode(codec.encode(v))
    assert torch.equal(out, v)
    assert out.data_ptr() != v.data_ptr()  # decode never aliases the caller's tensor


def test_float16_error_is_within_half_precision():
    v = torch.cat([_vec(50_000, scale=0.01), _vec(1000, seed=1, scale=100.0), _vec(1000, seed=2, scale=1e-6)])
    codec = make_codec("float16")
    enc = codec.encode(v)
    assert enc.arrays["values"].dtype == torch.float16 and enc.nbytes == 2 * v.numel()
    err = (codec.decode(enc) - v).abs()
    # round-to-nearest: half an ulp, i.e. 2^-11 relative for normals; 2^-25 absolute for subnormals
    bound = v.abs() * 2.0**-11 + 2.0**-25
    assert bool((err <= bound).all())


def test_float16_saturates_instead_of_overflowing():
    codec = make_codec("float16")
    out = codec.decode(codec.encode(torch.tensor([1e6, -1e6, 1.0])))
    assert out.tolist() == [65504.0, -65504.0, 1.0]


# --- int8 ----------------------------------------------------------------------------------------


def _int8_steps(v: torch.Tensor, chunk: int = Int8Codec.DEFAULT_CHUNK) -> torch.Tensor:
    """Per-coordinate quantization step max|chunk| / 127."""
    n = v.numel()
    nch = -(-n // chunk)
    padded = torch.zeros(nch * chunk)
    padded[:n] = v
    return (padded.view(nch, chunk).abs().amax(1) / 127).repeat_interleave(chunk)[:n]


def test_int8_error_is_bounded_by_one_step():
    v = torch.cat([_vec(10_000), torch.zeros(5000), _vec(3000, seed=3, scale=5.0)])  # incl. an all-zero chunk
    codec = make_codec("int8")
    enc = codec.encode(v, _gen(7))
    assert enc.arrays["q"].dtype == torch.int8 and enc.arrays["scales"].numel() == math.ceil(v.numel() / 4096)
    assert enc.nbytes == v.numel() + 4 * math.ceil(v.numel() / 4096)
    out = codec.decode(enc)
    step = _int8_steps(v)
    assert bool(((out - v).abs() <= step * (1 + 1e-5) + 1e-12).all())
    assert bool((out[10_000:15_000] == 0).all())  # zero chunk stays exactly zero
    assert int(enc.arrays["q"].abs().max()) == 127  # the chunk maximum maps to the top level


def test_int8_is_unbiased():
    """The mean of N independent encodings converges to the input like 1/sqrt(N): that is what
    unbiased means in practice (a biased rounding would plateau at its bias)."""
    v = _vec(6000, seed=11)
    codec = make_codec("int8")
    gen = _gen(12)
    n_draws = 400
    total = torch.zeros_like(v)
    single_rms = []
    for _ in range(n_draws):
        out = codec.decode(codec.encode(v, gen))
        single_rms.append(float((out - v).pow(2).mean().sqrt()))
        total += out
    mean = total / n_draws
    step = _int8_steps(v)
    single = sum(single_rms) / n_draws
    averaged = float((mean - v).pow(2).mean().sqrt())
    # measured: averaged ~= single / 20 (= 1/sqrt(400)); allow slack but far below a plateau
    assert averaged < 1.5 * single / math.sqrt(n_draws)
    assert float((mean - v).abs().max()) < float(step.max()) / 4
    # no systematic drift: the mean error across coordinates is ~0 relative to the step
    assert abs(float((mean - v).mean())) < float(step.mean()) / 100


def test_int8_is_deterministic_given_a_seed():
    v = _vec(5000)
    codec = make_codec("int8")
    a = codec.encode(v, _gen(5)).arrays["q"]
    b = codec.encode(v, _gen(5)).arrays["q"]
    c = codec.encode(v, _gen(6)).arrays["q"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_int8_check_rejects_tampering():
    codec = make_codec("int8")
    enc = codec.encode(_vec(5000), _gen(0))
    bad_q = enc.arrays["q"].clone()
    bad_q[3] = -128
    bad_scales = enc.arrays["scales"].clone()
    bad_scales[0] = -1.0
    cases: list[tuple[dict[str, torch.Tensor], dict[str, int | float | str]]] = [
        ({"q": bad_q, "scales": enc.arrays["scales"]}, enc.params),
        ({"q": enc.arrays["q"], "scales": bad_scales}, enc.params),
        ({"q": enc.arrays["q"], "scales": enc.arrays["scales"][:1]}, enc.params),
        ({"q": enc.arrays["q"]}, enc.params),
        (enc.arrays, {"chunk": 0}),
        (enc.arrays, {"chunk": 1024}),  # scales count no longer matches
        (enc.arrays, {}),
    ]
    for arrays, params in cases:
        with pytest.raises(ValueError):
            codec.check(EncodedUpdate("int8", enc.numel, arrays, params))


# --- top-k ---------------------------------------------------------------------------------------


def test_topk_count():
    assert topk_count(0, 0.5) == 0
    assert topk_count(1000, 1e-6) == 1
    assert topk_count(100, 0.07) == 7  # not 8 from 7.000000000000001
    assert topk_count(1_663_370, 0.01) == 16634
    assert topk_count(10, 1.0) == 10


def test_topk_keeps_exactly_the_k_largest():
    v = _vec(20_000, seed=4)
    codec = make_codec("topk:0.01")
    enc = codec.encode(v)
    k = topk_count(v.numel(), 0.01)
    assert enc.arrays["values"].numel() == k
    out = codec.decode(enc)
    kept = out != 0
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], v[kept])  # kept values are exact float32
    threshold = v.abs().sort(descending=True).values[k - 1]
    assert bool((v[kept].abs() >= threshold).all()) and bool((v[~kept].abs() <= threshold).all())
    assert set(kept.nonzero().flatten().tolist()) == set(v.abs().topk(k).indices.tolist())


def test_topk_ratio_one_is_lossless():
    v = _vec(3000)
    codec = make_codec("topk:1")
    assert torch.equal(codec.decode(codec.encode(v)), v)


def test_topk_check_rejects_bad_indices():
    codec = make_codec("topk:0.01")
    enc = codec.encode(_vec(1000))
    d = enc.arrays["index_deltas"]
    dup = d.clone()
    dup[2] = 0  # repeats the previous index
    neg = d.clone()
    neg[0] = -1
    far = d.clone()
    far[-1] += 1000  # runs past the end
    for deltas in (dup, neg, far, d.to(torch.int64), d[:-1]):
        arrays = {"index_deltas": deltas, "values": enc.arrays["values"][: deltas.numel()]}
        with pytest.raises(ValueError):
            codec.check(EncodedUpdate(enc.codec, enc.numel, arrays))


# --- composition ---------------------------------------------------------------------------------


def test_topk_then_int8():
    v = _vec(50_000, seed=8)
    codec = make_codec("topk:0.05+int8")
    enc = codec.encode(v, _gen(3))
    codec.check(enc)
    k = topk_count(v.numel(), 0.05)
    assert sorted(enc.arrays) == ["index_deltas", "values.q", "values.scales"]
    assert enc.arrays["values.q"].numel() == k and enc.params == {"values.chunk": 4096}
    assert enc.nbytes < 0.05 * v.numel() * (4 + 1) + 64
    out = codec.decode(enc)
    top = torch.zeros_like(v)
    idx = v.abs().topk(k).indices
    top[idx] = v[idx]
    support = out != 0
    assert bool((top[support] != 0).all())  # nothing outside the top-k support
    assert bool(((out - top).abs() <= _int8_steps(top[top != 0]).max() * (1 + 1e-5)).all())


def test_topk_then_float16():
    v = _vec(10_000, seed=9)
    codec = make_codec("topk:0.1+float16")
    enc = codec.encode(v)
    exact = make_codec("topk:0.1").decode(make_codec("topk:0.1").encode(v))
    out = codec.decode(enc)
    assert bool(((out - exact).abs() <= exact.abs() * 2.0**-11 + 2.0**-25).all())


# --- error feedback ------------------------------------------------------------------------------


def _run_rounds(ef: ErrorFeedback | None, rounds: int, n: int) -> tuple[list[float], float, float]:
    """Top-k 1 % over ``rounds`` updates that share a dense drift plus noise. Returns the gap
    ||sum true - sum decoded|| after each round, and the final ||sum true||, ||update||."""
    codec = make_codec("topk:0.01")
    gen = _gen(21)
    drift = torch.randn(n, generator=gen) * 0.01
    sum_true = torch.zeros(n)
    sum_dec = torch.zeros(n)
    gaps = []
    update = torch.zeros(n)
    for _ in range(rounds):
        update = drift + torch.randn(n, generator=gen) * 0.01
        sent = ef.compensate(update) if ef else update
        decoded = codec.decode(codec.encode(sent))
        if ef:
            ef.remember(sent, decoded)
        sum_true += update
        sum_dec += decoded
        gaps.append(float((sum_true - sum_dec).norm()))
    return gaps, float(sum_true.norm()), float(update.norm())


def test_error_feedback_tracks_the_sum_of_updates():
    n, rounds = 5000, 300
    ef = ErrorFeedback(_spec((n,)))
    gaps, total, _one = _run_rounds(ef, rounds, n)
    # identity: what has not arrived yet is exactly the residual
    assert ef.residual is not None
    assert gaps[-1] == pytest.approx(float(ef.residual.norm()), rel=1e-3)
    # bounded: the gap stops growing (second half vs. first half) and stays a fraction of the sum
    assert max(gaps[rounds // 2 :]) < 1.3 * max(gaps[: rounds // 2])
    assert gaps[-1] < 0.25 * total
    # without memory the dropped mass accumulates linearly with the drift
    plain, plain_total, _ = _run_rounds(None, rounds, n)
    assert plain[-1] > 0.9 * plain_total
    assert plain[-1] > 4 * gaps[-1]


def test_error_feedback_compensate_and_remember():
    spec = _spec((2, 3), (4,))
    ef = ErrorFeedback(spec)
    u = torch.arange(10, dtype=torch.float32)
    c = ef.compensate(u)
    assert torch.equal(c, u) and c.data_ptr() != u.data_ptr()
    ef.remember(c, torch.zeros(10))
    assert torch.equal(ef.compensate(torch.ones(10)), u + 1)
    assert torch.equal(u, torch.arange(10, dtype=torch.float32))  # input untouched
    with pytest.raises(ValueError):
        ef.compensate(torch.zeros(9))
    with pytest.raises(ValueError):
        ef.remember(torch.full((10,), float("nan")), torch.zeros(10))
    assert ef.residual is not None and torch.equal(ef.residual, u)  # old residual kept after a refused update
    ef.reset()
    assert ef.residual is None


def test_error_feedback_serialisation_round_trip():
    spec = _spec((100, 10), (10,))
    ef = ErrorFeedback(spec)
    empty = ErrorFeedback.from_bytes(ef.to_bytes(), spec)
    assert empty.residual is None
    v = _vec(spec.numel, seed=5)
    ef.remember(v, torch.zeros_like(v))
    blob = ef.to_bytes()
    assert b"pickle" not in blob and blob[:4] == b"FLUP"
    back = ErrorFeedback.from_bytes(blob, spec)
    assert back.residual is not None and torch.equal(back.residual, v) and back.key == ef.key == spec_key(spec)


def test_error_feedback_resets_on_spec_change():
    spec = _spec((100, 10), (10,))
    ef = ErrorFeedback(spec)
    ef.remember(torch.ones(spec.numel), torch.zeros(spec.numel))
    blob = ef.to_bytes()
    same_numel = _spec((10, 100), (10,))  # same size, different layout: still a reset
    assert spec_key(same_numel) != spec_key(spec)
    assert ErrorFeedback.from_bytes(blob, same_numel).residual is None
    assert ErrorFeedback.from_bytes(blob, _spec((7,))).residual is None
    assert ef.rekey(spec) is False and ef.residual is not None
    assert ef.rekey(same_numel) is True and ef.residual is None


def test_error_feedback_rejects_corrupt_state():
    spec = _spec((50,))
    ef = ErrorFeedback(spec)
    ef.remember(torch.ones(50), torch.zeros(50))
    blob = ef.to_bytes()
    for bad in (blob[:-3], b"garbage", b""):
        with pytest.raises(WireFormatError):
            ErrorFeedback.from_bytes(bad, spec)


def _int8_one_shot(v: torch.Tensor, chunk: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook form of the int8 codec on the whole padded vector (what the block-wise encode must equal)."""
    n = v.numel()
    nch = -(-n // chunk)
    padded = torch.zeros(nch * chunk, dtype=torch.float32)
    padded[:n] = v
    blocks = padded.view(nch, chunk)
    scales = blocks.abs().amax(dim=1) / 127.0 if nch else torch.zeros(0)
    scales = torch.where(torch.isfinite(scales * 127), scales, torch.nextafter(scales, torch.zeros_like(scales)))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    noise = torch.rand(blocks.shape, generator=rng, dtype=torch.float32)
    q = torch.floor(blocks / safe[:, None] + noise).clamp(-127, 127).to(torch.int8).reshape(-1)[:n]
    return q, scales


@pytest.mark.parametrize(("n", "chunk"), [(0, 4096), (1, 4096), (4095, 4096), (4096 * 40 + 3, 4096), (200_001, 4096),
                                          (600_001, 4096), (300_000, 7), (70_000, 1 << 17), (1000, 7), (5, 1)])
def test_int8_block_wise_encode_is_bitwise_the_one_shot_form(n: int, chunk: int) -> None:
    v = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.01
    if n > 10:
        v[3], v[n // 2] = torch.finfo(torch.float32).max, 0.0  # the one-ulp step-down and a zero chunk path
        v[n - 5:] = 0.0
    got = Int8Codec(chunk).encode(v, torch.Generator().manual_seed(7))
    q, scales = _int8_one_shot(v, chunk, torch.Generator().manual_seed(7))
    assert torch.equal(got.arrays["q"], q) and torch.equal(got.arrays["scales"], scales)
    Int8Codec(chunk).check(got)
