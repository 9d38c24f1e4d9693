"""The update wire container: round trips, and refusal of every kind of malformed blob."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
import zstandard

from fl_common.tensors.codecs import make_codec
from fl_common.tensors.wire import (
    COMPRESSIONS,
    MAGIC,
    MAX_HEADER_BYTES,
    WireFormatError,
    decode_update,
    encode_update,
    pack,
    unpack,
)

CODECS = ["none", "float16", "int8", "topk:0.01", "topk:0.05+int8", "topk:0.05+float16"]
PREFIX = struct.Struct("<4sBBHIQQ")


def _vec(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.01


def _split(blob: bytes) -> tuple[tuple, dict, bytes]:
    fields = PREFIX.unpack_from(blob)
    header_len = fields[4]
    header = json.loads(blob[PREFIX.size : PREFIX.size + header_len])
    return fields, header, blob[PREFIX.size + header_len :]


def _forge(fields: tuple, header: dict | bytes, payload: bytes, **overrides) -> bytes:
    """Rebuild a blob from parts. Lengths are recomputed unless overridden, so each test lies
    about exactly one thing."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    magic, version, comp, reserved, _, _, raw_len = fields
    values = dict(magic=magic, version=version, comp=comp, reserved=reserved,
                  header_len=len(header_bytes), payload_len=len(payload), raw_len=raw_len)
    values.update(overrides)
    prefix = PREFIX.pack(values["magic"], values["version"], values["comp"], values["reserved"],
                         values["header_len"], values["payload_len"], values["raw_len"])
    return prefix + header_bytes + payload


def _reject(blob: bytes, match: str | None = None, **kw) -> None:
    with pytest.raises(WireFormatError, match=match):
        unpack(blob, **kw)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("spec", CODECS)
def test_round_trip(spec, compression):
    v = _vec(10_007, seed=1)  # not a multiple of the int8 chunk
    codec = make_codec(spec)
    enc = codec.encode(v, torch.Generator().manual_seed(2))
    meta = {"round": 7, "client": "c-01", "nested": {"ok": [1, 2.5, None, True]}}
    blob = pack(enc, compression, meta)
    back, meta_back = unpack(blob)
    assert meta_back == meta and back.codec == enc.codec and back.numel == enc.numel
    assert back.params == enc.params and set(back.arrays) == set(enc.arrays)
    for name, t in enc.arrays.items():
        assert back.arrays[name].dtype == t.dtype and torch.equal(back.arrays[name], t)
    assert torch.equal(codec.decode(back), codec.decode(enc))
    if compression != "none" and spec.startswith("topk"):
        fields = PREFIX.unpack_from(blob)
        assert fields[5] < fields[6]  # stored < raw: delta-coded indices compress


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("spec", CODECS)
def test_encode_decode_update(spec, compression):
    v = _vec(5000, seed=3)
    blob = encode_update(v, spec, compression, torch.Generator().manual_seed(0), {"r": 1})
    out, meta = decode_update(blob, expected_numel=5000)
    assert meta == {"r": 1} and out.shape == (5000,) and out.dtype == torch.float32
    if spec == "none":
        assert torch.equal(out, v)
    with pytest.raises(WireFormatError, match="model has 5001"):
        decode_update(blob, expected_numel=5001)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_empty_update_round_trip(compression):
    out, meta = decode_update(encode_update(torch.zeros(0), "int8", compression), expected_numel=0)
    assert out.numel() == 0 and meta == {}


def test_pack_refuses_what_unpack_would_refuse():
    enc = make_codec("none").encode(_vec(10))
    with pytest.raises(ValueError):
        pack(enc, "gzip")
    with pytest.raises(ValueError):
        pack(enc, "zstd", {"x": float("nan")})
    with pytest.raises(ValueError):
        pack(enc, "zstd", {"x": object()})
    with pytest.raises(ValueError):
        pack(enc, "zstd", {"x": "y" * (MAX_HEADER_BYTES + 1)})
    with pytest.raises(TypeError):
        pack(enc, "zstd", ["not", "a", "dict"])  # type: ignore[arg-type]


# --- framing -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs() -> dict[str, bytes]:
    v = _vec(3000, seed=4)
    return {c: encode_update(v, "topk:0.1+int8", c, torch.Generator().manual_seed(0)) for c in COMPRESSIONS}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_truncated_and_padded(blobs, compression):
    blob = blobs[compression]
    for cut in sorted({0, 1, 3, 4, 27, 28, 29, 60, len(blob) // 2, len(blob) - 10, len(blob) - 1}):
        _reject(blob[:cut])
    _reject(blob + b"\0")


def test_bad_magic_version_compression(blobs):
    fields, header, payload = _split(blobs["zstd"])
    _reject(_forge(fields, header, payload, magic=b"PK\x03\x04"), "bad magic")
    _reject(_forge(fields, header, payload, version=2), "version")
    _reject(_forge(fields, header, payload, version=0), "version")
    _reject(_forge(fields, header, payload, comp=7), "compression")
    _reject(_forge(fields, header, payload, reserved=1), "reserved")
    _reject(_forge(fields, header, payload, comp=1), "zlib")  # zstd bytes declared as zlib
    _reject(b"\x80\x04\x95" + bytes(40))  # a pickle is just bad magic


def test_header_lies_about_lengths(blobs):
    fields, header, payload = _split(blobs["none"])
    raw_len = fields[6]
    _reject(_forge(fields, header, payload, payload_len=len(payload) + 1), "truncated or padded")
    _reject(_forge(fields, header, payload, header_len=len(json.dumps(header)) - 1))
    _reject(_forge(fields, header, payload, raw_len=raw_len + 8), "payload bytes")
    _reject(_forge(fields, header, payload, raw_len=2**63), "exceeds the limit")
    _reject(_forge(fields, header, payload, header_len=2**31), "header length")
    # array shapes that do not add up to the payload
    h = json.loads(json.dumps(header))
    h["arrays"][0]["shape"] = [h["arrays"][0]["shape"][0] + 1]
    _reject(_forge(fields, h, payload))
    h["arrays"][0]["shape"] = [2**60]
    _reject(_forge(fields, h, payload), "more than the payload")
    # numel that disagrees with the arrays (k follows from numel for top-k)
    h = json.loads(json.dumps(header))
    h["numel"] += 1000
    _reject(_forge(fields, h, payload), "expected")
    h["numel"] = 2**62
    _reject(_forge(fields, h, payload), "exceeds the limit")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.update(codec="gzip"),
        lambda h: h.update(codec="TOPK:0.1+INT8"),  # non-canonical
        lambda h: h.update(numel=-1),
        lambda h: h.update(numel=True),
        lambda h: h.update(meta=[1]),
        lambda h: h.update(params={"values.chunk": [1]}),
        lambda h: h.update(params={"values.chunk": 0}),
        lambda h: h["params"].update(x=1),
        lambda h: h["params"].update({"values.x": 1}),
        lambda h: h.update(extra=1),
        lambda h: h.pop("meta"),
        lambda h: h["arrays"][0].update(dtype="float64"),
        lambda h: h["arrays"][0].update(dtype="object"),
        lambda h: h["arrays"][0].update(shape=[10, 10]),
        lambda h: h["arrays"][0].update(shape=[-1]),
        lambda h: h["arrays"][1].update(name=h["arrays"][0]["name"]),
        lambda h: h["arrays"].append({"name": "extra", "dtype": "uint8", "shape": [0]}),
        lambda h: h["arrays"].reverse(),
    ],
)
def test_bad_header_fields(blobs, mutate):
    fields, header, payload = _split(blobs["zlib"])
    mutate(header)
    _reject(_forge(fields, header, payload))


@pytest.mark.parametrize(
    "header_bytes",
    [b"not json", b"\xff\xfe", b"[1, 2]", b"{}", b"[" * 50_000 + b"]" * 50_000,
     b'{"codec": NaN}', b'{"codec": Infinity}'],
)
def test_header_not_valid_json(blobs, header_bytes):
    fields, _, payload = _split(blobs["none"])
    _reject(_forge(fields, header_bytes, payload))


# --- contents ----------------------------------------------------------------------------------


def _none_blob(values: list[float]) -> bytes:
    """A hand-made "none" blob carrying arbitrary float32 values (pack() would refuse NaN)."""
    good = encode_update(torch.zeros(len(values)), "none", "none")
    fields, header, _ = _split(good)
    return _forge(fields, header, struct.pack(f"<{len(values)}f", *values))


def test_non_finite_values():
    assert decode_update(_none_blob([1.0, 2.0]), 2)[0].tolist() == [1.0, 2.0]
    for bad in (float("nan"), float("inf"), float("-inf")):
        _reject(_none_blob([1.0, bad]), "NaN or Inf")
    # float16 inf, int8 scale NaN, top-k value inf: patch the raw payload of real blobs
    for spec, array, code in [("float16", "values", "<e"), ("int8", "scales", "<f"),
                              ("topk:0.5", "values", "<f"), ("topk:0.5+int8", "values.scales", "<f")]:
        fields, header, payload = _split(encode_update(_vec(100), spec, "none"))
        offset = 0
        for a in header["arrays"]:
            offset = -(-offset // 8) * 8
            if a["name"] == array:
                break
            offset += a["shape"][0] * {"float32": 4, "float16": 2, "int8": 1, "int32": 4}[a["dtype"]]
        patched = bytearray(payload)
        struct.pack_into(code, patched, offset, float("inf"))
        _reject(_forge(fields, header, bytes(patched)), "NaN or Inf")


def _topk_blob(deltas: list[int], numel: int = 100, ratio: str = "0.05") -> bytes:
    k = len(deltas)
    header = {"codec": f"topk:{ratio}", "numel": numel, "params": {}, "meta": {},
              "arrays": [{"name": "index_deltas", "dtype": "int32", "shape": [k]},
                         {"name": "values", "dtype": "float32", "shape": [k]}]}
    raw = struct.pack(f"<{k}i", *deltas)
    raw += b"\0" * (-len(raw) % 8) + struct.pack(f"<{k}f", *([1.0] * k))
    return _forge((MAGIC, 1, 0, 0, 0, 0, len(raw)), header, raw)


def test_topk_index_ranges():
    out, _ = decode_update(_topk_blob([0, 1, 1, 50, 47]), 100)  # indices 0, 1, 2, 52, 99
    assert out.nonzero().flatten().tolist() == [0, 1, 2, 52, 99]
    _reject(_topk_blob([0, 1, 1, 50, 48]), "out of range")  # last index 100
    _reject(_topk_blob([0, 1, 1, 2**31 - 1, 5]), "out of range")  # int32 overflow is not wrap-around
    _reject(_topk_blob([-1, 1, 1, 1, 1]), "strictly increasing")
    _reject(_topk_blob([3, 0, 1, 1, 1]), "strictly increasing")  # duplicate index
    _reject(_topk_blob([3, 1, -2, 1, 1]), "strictly increasing")
    _reject(_topk_blob([0, 1, 1, 1]), "expected 5")  # k does not match ratio * numel


# --- decompression bombs -----------------------------------------------------------------------


def _bomb(compression: str, size: int = 64 << 20) -> bytes:
    """A valid-looking 1000-value "none" update whose payload inflates to ``size`` bytes."""
    good = encode_update(torch.zeros(1000), "none", "none")
    fields, header, _ = _split(good)
    zeros = bytes(size)
    payload = zlib.compress(zeros, 9) if compression == "zlib" else zstandard.ZstdCompressor(level=1).compress(zeros)
    return _forge((*fields[:2], COMPRESSIONS.index(compression), *fields[3:]), header, payload)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_zip_bomb_is_stopped_at_the_declared_size(compression):
    bomb = _bomb(compression)
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError, match="expands beyond"):
            unpack(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"unpack allocated {peak} bytes for a 4000-byte update"


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_declared_size_over_the_cap_is_refused_before_decompressing(compression):
    blob = encode_update(torch.zeros(100_000), "none", compression)
    assert len(blob) < 2000
    _reject(blob, "exceeds the limit", max_bytes=100_000)
    assert unpack(blob, max_bytes=400_000)[0].numel == 100_000


def test_tiny_topk_blob_cannot_demand_a_huge_vector():
    blob = encode_update(_vec(1000), "topk:0.001", "zstd")
    fields, header, payload = _split(blob)
    header["numel"] = 10**12  # would make decode allocate 4 TB of zeros
    _reject(_forge(fields, header, payload), "exceeds the limit")
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        decode_update(_forge(fields, header, payload), expected_numel=1000)


def test_trailing_garbage_inside_compressed_payload():
    for compression in ("zlib", "zstd"):
        fields, header, payload = _split(encode_update(_vec(100), "none", compression))
        _reject(_forge(fields, header, payload + b"junk"))


# --- fuzz --------------------------------------------------------------------------------------


def test_random_corruption_only_ever_raises_wire_format_error(blobs):
    rnd = random.Random(1234)
    accepted = 0
    for i in range(600):
        blob = bytearray(blobs[COMPRESSIONS[i % 3]])
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(len(blob))
            blob[pos] = rnd.randrange(256)
        if rnd.random() < 0.2:
            del blob[rnd.randrange(len(blob)) :]
        try:
            vec, _ = decode_update(bytes(blob), expected_numel=3000)
        except WireFormatError:
            continue
        accepted += 1  # a flip in a value byte can still be a valid update; then it must be sane
        assert vec.shape == (3000,) and bool(torch.isfinite(vec).all())
    assert accepted < 600


def test_no_pickle_and_no_web_stack():
    code = (
        "import sys, fl_common.tensors.wire, fl_common.tensors.codecs, fl_common.tensors.error_feedback\n"
        "bad = [m for m in ('flask', 'requests', 'fl_server', 'fl_client') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    import fl_common.tensors.codecs as c
    import fl_common.tensors.error_feedback as e
    import fl_common.tensors.wire as w

    for mod in (c, e, w):
        assert mod.__file__ is not None
        src = Path(mod.__file__).read_text(encoding="utf-8")
        assert "import pickle" not in src and "torch.load" not in src and "np.load" not in src
