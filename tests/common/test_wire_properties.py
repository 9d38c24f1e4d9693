"""Property tests (hypothesis) for the upload decoder and the codecs (issue 16).

The decoder (fl_common/tensors/wire.py) reads bytes from machines the server does not control:

* any bytes in -> a :class:`WireFormatError` (a ValueError: the server's 4xx) or a valid update,
  never another exception;
* a valid update decodes to a finite float32 vector of exactly the receiver's length;
* memory stays bounded: declared sizes beyond ``max_bytes`` / ``max_numel`` are refused before
  anything of that size is allocated, and a compression bomb costs at most the declared size
  (measured with tracemalloc, which sees the decoder's Python and numpy buffers).

The codecs (fl_common/tensors/codecs.py) keep their documented error bounds on any finite input:
none exact, float16 within half a unit in the last place (saturating at +-65504), int8 within
one quantization step of its chunk, top-k keeping exactly the largest magnitudes.

Sizes are bounded (vectors of at most a few hundred values, blobs of a few KiB, bombs of a
few MiB) so the module runs in well under a minute on a loaded machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fl_common.tensors import wire
from fl_common.tensors.codecs import (
    EncodedUpdate,
    Float16Codec,
    Int8Codec,
    NoneCodec,
    TopKCodec,
    make_codec,
    topk_count,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
PREFIX = struct.Struct("<4sBBHIQQ")  # the documented layout (wire.py's module docstring)
#: the decoder's limits in these tests: small, so that "bounded" is measurable
MAX_BYTES = 64 << 10
#: what the decoder may allocate beyond the declared payload (headers, bookkeeping, one read chunk)
SLACK_BYTES = 256 << 10

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
SPECS = ["none", "float16", "int8", "topk:0.1", "topk:0.5", "topk:1.0", "topk:0.25+int8", "topk:0.3+float16"]


@st.composite
def vectors(draw: Any, max_len: int = 300, elements: Any = finite32) -> torch.Tensor:
    values = draw(st.lists(elements, max_size=max_len))
    return torch.tensor(values, dtype=torch.float32)


@st.composite
def packed_updates(draw: Any) -> tuple[bytes, int]:
    """A valid blob (any codec, any compression) and its vector length."""
    vec = draw(vectors(max_len=200, elements=st.floats(-1e6, 1e6, width=32)))
    spec = draw(st.sampled_from(SPECS))
    compression = draw(st.sampled_from(wire.COMPRESSIONS))
    rng = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    meta = {"num_samples": draw(st.integers(1, 10**6)), "metrics": {"train_loss": 1.0}}
    return wire.encode_update(vec, spec, compression, rng=rng, meta=meta), vec.numel()


def decode_or_refuse(blob: bytes, numel: int, max_bytes: int = MAX_BYTES) -> torch.Tensor | None:
    """The property every input must satisfy: a WireFormatError, or a valid update of ``numel`` finite values."""
    try:
        vec, meta = wire.decode_update(blob, numel, max_bytes=max_bytes)
    except wire.WireFormatError as exc:
        assert str(exc)  # noqa: PT017 - the property: the server returns the message to the client, it must say something
        return None
    assert vec.dtype == torch.float32 and vec.shape == (numel,)
    assert bool(torch.isfinite(vec).all())
    assert isinstance(meta, dict)
    return vec


def peak_traced_bytes(fn: Callable[[], Any]) -> int:
    """The largest amount of memory (Python objects and numpy buffers) ``fn`` held at once."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        with contextlib.suppress(wire.WireFormatError):
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def blob_of(header: dict[str, Any], payload: bytes, *, compression: int = 0, raw_len: int | None = None,
            header_len: int | None = None, payload_len: int | None = None) -> bytes:
    """A container built by hand: whatever the header says, whatever the prefix declares."""
    head = json.dumps(header).encode()
    prefix = PREFIX.pack(wire.MAGIC, wire.VERSION, compression, 0, len(head) if header_len is None else header_len,
                         len(payload) if payload_len is None else payload_len,
                         len(payload) if raw_len is None else raw_len)
    return prefix + head + payload


# ---------------------------------------------------------------------------------------------- decoder
@PROPERTY
@given(st.binary(max_size=4096), st.integers(0, 4096))
def test_any_bytes_are_refused_or_decode_to_a_valid_update(blob: bytes, numel: int) -> None:
    decode_or_refuse(blob, numel)


@PROPERTY
@given(st.binary(max_size=2048))
def test_any_bytes_behind_a_valid_prefix_are_refused_or_valid(tail: bytes) -> None:
    """Random bytes rarely get past the magic; these do, so the header parser and layout checks see them."""
    for comp in range(len(wire.COMPRESSIONS)):
        head_len = min(len(tail), 64)
        blob = PREFIX.pack(wire.MAGIC, wire.VERSION, comp, 0, head_len, len(tail) - head_len, len(tail)) + tail
        decode_or_refuse(blob, 16)


@PROPERTY
@given(packed_updates(), st.data())
def test_corrupted_valid_blobs_are_refused_or_valid(packed: tuple[bytes, int], data: st.DataObject) -> None:
    """Flip, cut, insert: whatever survives the checks is a finite vector of the right length."""
    blob, numel = packed
    assert decode_or_refuse(blob, numel) is not None
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if kind == "flip" and mutated:
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del mutated[pos:pos + data.draw(st.integers(1, 16))]
        elif kind == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif mutated:
            mutated[pos] = data.draw(st.integers(0, 255))
    decode_or_refuse(bytes(mutated), numel)
    decode_or_refuse(bytes(mutated), data.draw(st.integers(0, 400)))  # and against another model's length


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                                   inner, max_size=3),
                           max_leaves=8)
descriptors = st.fixed_dictionaries({
    "name": st.sampled_from(["values", "q", "scales", "index_deltas", "values.q", "values.scales", "values.values", ""]),
    "dtype": st.sampled_from(["float32", "float16", "int8", "uint8", "int32", "int64", "float64", "bool"]),
    "shape": st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 8, 16, 64]), min_size=0, max_size=2),
})


@st.composite
def hostile_headers(draw: Any) -> dict[str, Any]:
    """Headers with the right keys and any values: numel and shapes up to 2**40, wrong types, odd codecs."""
    header = {
        "codec": draw(st.sampled_from([*SPECS, "int8 ", "TOPK:0.1", "topk:0", "topk:nan", "topk:0.1+none", "gzip"])
                      | st.text(max_size=10)),
        "numel": draw(st.integers(-1, 2**40) | st.sampled_from([0, 1, 16, 64]) | json_scalars),
        "params": draw(st.dictionaries(st.sampled_from(["chunk", "values.chunk", "x"]),
                                       st.integers(-1, 2**30) | json_scalars, max_size=2)),
        "arrays": draw(st.lists(descriptors, max_size=3)),
        "meta": draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3) | json_values),
    }
    if draw(st.booleans()):
        del header[draw(st.sampled_from(sorted(header)))]
    return header


@PROPERTY
@given(hostile_headers(), st.binary(max_size=512), st.integers(0, 2), st.none() | st.integers(0, 2**64 - 1), st.data())
def test_hostile_headers_are_refused_within_bounded_memory(header: dict[str, Any], payload: bytes, compression: int,
                                                           raw_len: int | None, data: st.DataObject) -> None:
    """Declared sizes (raw length, numel, array lengths) up to 2**64 never make the decoder allocate them."""
    numel = data.draw(st.sampled_from([0, 1, 16, 64, 2**20]))
    blob = blob_of(header, payload, compression=compression, raw_len=raw_len)
    peak = peak_traced_bytes(lambda: decode_or_refuse(blob, numel))
    assert peak <= 2 * len(blob) + MAX_BYTES + SLACK_BYTES


@pytest.mark.parametrize("limit_name", ["raw_len", "numel", "array"])
@given(declared=st.integers(MAX_BYTES + 1, 2**63))
@PROPERTY
def test_declared_sizes_beyond_the_limits_are_refused_before_allocating(limit_name: str, declared: int) -> None:
    """The refusal names the limit (so it came from the up-front check, not from a failed allocation) and
    the decoder held no more than a few KiB while refusing."""
    header = {"codec": "none", "numel": 4, "params": {}, "arrays": [{"name": "values", "dtype": "float32", "shape": [4]}],
              "meta": {}}
    raw_len = 16
    if limit_name == "raw_len":
        raw_len = declared
    elif limit_name == "numel":
        header["numel"] = declared
    else:
        header["arrays"][0]["shape"] = [declared]
    blob = blob_of(header, b"\0" * 16, raw_len=raw_len)
    with pytest.raises(wire.WireFormatError) as err:
        wire.unpack(blob, MAX_BYTES)
    assert any(word in str(err.value) for word in ("limit", "more than the payload holds"))
    assert peak_traced_bytes(lambda: wire.unpack(blob, MAX_BYTES)) <= 4 * len(blob) + (64 << 10)


@settings(max_examples=25, deadline=None, database=None)
@given(st.sampled_from(["zlib", "zstd"]), st.integers(MAX_BYTES + 1, 8 << 20), st.integers(0, MAX_BYTES), st.integers(0, 255))
def test_a_compression_bomb_costs_at_most_its_declared_size(compression: str, real: int, declared: int, fill: int) -> None:
    """A payload that inflates to megabytes but declares at most MAX_BYTES: refused, having decompressed
    no more than the declared size (plus one read chunk of bookkeeping)."""
    raw = bytes([fill]) * real
    payload = zlib.compress(raw, 9) if compression == "zlib" else zstandard.ZstdCompressor(level=1).compress(raw)
    header = {"codec": "none", "numel": declared // 4, "params": {},
              "arrays": [{"name": "values", "dtype": "float32", "shape": [declared // 4]}], "meta": {}}
    blob = blob_of(header, payload, compression=wire.COMPRESSIONS.index(compression), raw_len=declared // 4 * 4)
    with pytest.raises(wire.WireFormatError):
        wire.unpack(blob, MAX_BYTES)
    assert peak_traced_bytes(lambda: wire.unpack(blob, MAX_BYTES)) <= 2 * len(blob) + MAX_BYTES + SLACK_BYTES


@PROPERTY
@given(packed_updates(), st.integers(0, 400))
def test_a_valid_update_for_another_model_is_refused(packed: tuple[bytes, int], other: int) -> None:
    blob, numel = packed
    assume(other != numel)
    with pytest.raises(wire.WireFormatError):
        wire.decode_update(blob, other, max_bytes=MAX_BYTES)


def test_int8_decoding_allocates_no_more_than_the_vector() -> None:
    """The decoded vector is the receiver's length; a sender's chunk parameter must not multiply it."""
    chunk = Int8Codec.MAX_CHUNK
    enc = EncodedUpdate("int8", 1, {"q": torch.ones(1, dtype=torch.int8), "scales": torch.ones(1)}, {"chunk": chunk})
    blob = wire.pack(enc, "none")
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        vec, _ = wire.decode_update(blob, 1)
    assert vec.tolist() == [1.0]
    peak = max((e.cpu_memory_usage for e in prof.function_events), default=0)
    assert peak <= 1 << 20, f"decoding a {len(blob)}-byte int8 update allocated {peak} bytes at once"


# ---------------------------------------------------------------------------------------------- codecs
def round_trip(spec: str, vec: torch.Tensor, seed: int = 0) -> tuple[EncodedUpdate, torch.Tensor]:
    codec = make_codec(spec) if isinstance(spec, str) else spec
    enc = codec.encode(vec, torch.Generator().manual_seed(seed))
    codec.check(enc)
    return enc, codec.decode(enc)


@PROPERTY
@given(vectors())
def test_none_is_exact(vec: torch.Tensor) -> None:
    _, out = round_trip("none", vec)
    assert torch.equal(out, vec)


@PROPERTY
@given(vectors())
def test_float16_is_within_half_an_ulp_and_saturates(vec: torch.Tensor) -> None:
    _, out = round_trip("float16", vec)
    f16_max = float(torch.finfo(torch.float16).max)
    clamped = vec.double().clamp(-f16_max, f16_max)
    # round to nearest: half the spacing of float16 values around x (2**-11 relative; 2**-25 below the normals)
    bound = torch.maximum(clamped.abs() * 2.0**-11, torch.full_like(clamped, 2.0**-25))
    assert bool(((out.double() - clamped).abs() <= bound).all())
    assert bool(torch.isfinite(out).all())


def int8_steps(vec: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per value, the quantization step of its chunk: max |chunk| / 127 (float64)."""
    n = vec.numel()
    padded = torch.zeros(-(-n // chunk) * chunk, dtype=torch.float64)
    padded[:n] = vec.double().abs()
    return (padded.view(-1, chunk).amax(dim=1, keepdim=True) / 127).expand(-1, chunk).reshape(-1)[:n]


@PROPERTY
@given(vectors(elements=st.floats(-2.0**126, 2.0**126, width=32)), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_int8_is_within_one_step_of_its_chunk(vec: torch.Tensor, chunk: int, seed: int) -> None:
    _enc, out = round_trip(Int8Codec(chunk), vec, seed)
    assert out.shape == vec.shape and bool(torch.isfinite(out).all())
    if vec.numel():
        # one step, plus float32 rounding of the scale and of the product
        assert bool(((vec.double() - out.double()).abs() <= int8_steps(vec, chunk) * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("x", [float(torch.finfo(torch.float32).max), -float(torch.finfo(torch.float32).max)])
def test_int8_of_the_largest_float32_decodes_finite(x: float) -> None:
    """check() promises a result that is finite; the wire would hand the server an Inf (refused later, as
    not_finite, by the strategies' check_update: an honest client's update lost, not a crash)."""
    blob = wire.encode_update(torch.tensor([x]), "int8", "none", rng=torch.Generator().manual_seed(0))
    assert decode_or_refuse(blob, 1) is not None


@PROPERTY
@given(vectors(), st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0]))
def test_topk_keeps_exactly_the_largest_magnitudes(vec: torch.Tensor, ratio: float) -> None:
    _, out = round_trip(TopKCodec(ratio), vec)
    kept = out != 0
    k = topk_count(vec.numel(), ratio)
    assert int(kept.sum()) <= k  # a kept zero decodes to zero
    assert torch.equal(out[kept], vec[kept])  # kept values are exact
    dropped = vec[~kept].abs()
    if kept.any() and dropped.numel():
        assert float(dropped.max()) <= float(vec[kept].abs().min())


@PROPERTY
@given(vectors(elements=st.floats(-1e4, 1e4, width=32)), st.sampled_from([0.1, 0.5, 1.0]), st.sampled_from(["int8", "float16"]),
       st.integers(0, 2**32 - 1))
def test_topk_then_a_value_codec_keeps_that_codecs_bound_on_the_kept_values(vec: torch.Tensor, ratio: float, second: str,
                                                                            seed: int) -> None:
    enc, out = round_trip(f"topk:{ratio}+{second}", vec, seed)
    idx = torch.cumsum(enc.arrays["index_deltas"].to(torch.int64), 0)
    assert idx.numel() == topk_count(vec.numel(), ratio)
    outside = torch.ones(vec.numel(), dtype=torch.bool)
    outside[idx] = False
    assert not bool(out[outside].any())  # everything not kept decodes to 0
    kept, got = vec[idx].double(), out[idx].double()
    if kept.numel() == 0:
        return
    if second == "int8":
        assert float((kept - got).abs().max()) <= float(kept.abs().max()) / 127 * (1 + 1e-5) + 1e-30
    else:
        bound = torch.maximum(kept.abs() * 2.0**-11, torch.full_like(kept, 2.0**-25))
        assert bool(((kept - got).abs() <= bound).all())


@PROPERTY
@given(vectors(max_len=200), st.sampled_from(SPECS), st.sampled_from(wire.COMPRESSIONS), st.integers(0, 2**32 - 1))
def test_the_wire_carries_the_codecs_output_unchanged(vec: torch.Tensor, spec: str, compression: str, seed: int) -> None:
    """pack/unpack adds no error of its own: the server decodes exactly what the client's codec produced."""
    _, expected = round_trip(spec, vec, seed)
    blob = wire.encode_update(vec, spec, compression, rng=torch.Generator().manual_seed(seed), meta={"num_samples": 3})
    out, meta = wire.decode_update(blob, vec.numel())
    assert torch.equal(out, expected) and meta == {"num_samples": 3}


@PROPERTY
@given(st.lists(finite32, max_size=50), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 50),
       st.sampled_from(SPECS))
def test_non_finite_input_is_refused_by_every_encoder(values: list[float], bad: float, where: int, spec: str) -> None:
    values.insert(min(where, len(values)), bad)
    with pytest.raises(ValueError):
        make_codec(spec).encode(torch.tensor(values, dtype=torch.float32))


def test_the_codecs_under_test_are_the_registered_ones() -> None:
    assert {type(make_codec(s)) for s in ["none", "float16", "int8", "topk:0.1"]} == {NoneCodec, Float16Codec, Int8Codec,
                                                                                      TopKCodec}
