"""A small versioned binary container for encoded updates (no pickle, ever).

Layout (little-endian)::

    offset size
    0      4    magic b"FLUP"
    4      1    version (1)
    5      1    compression: 0 none, 1 zlib, 2 zstd
    6      2    reserved, must be 0
    8      4    header length H (bytes of UTF-8 JSON)
    12     8    payload length P (bytes as stored, i.e. compressed)
    20     8    raw length R (bytes after decompression)
    28     H    JSON header: {"codec", "numel", "params", "arrays": [{"name", "dtype", "shape"}], "meta"}
    28+H   P    payload: the arrays' raw bytes, each starting at a multiple of 8, compressed as a whole

Why this shape: uploads come from machines the server does not control, so :func:`unpack` must
be able to reject a hostile blob cheaply. Every length is declared up front and cross-checked
(prefix vs. actual size, header arrays vs. R, R vs. the caller's ``max_bytes``) *before* anything
sized by the sender is allocated; decompression is streamed with an output cap of exactly R, so a
zip bomb costs at most R bytes; and the codec's own :meth:`~Codec.check` validates index ranges
and finiteness before anyone decodes. Every failure is a :class:`WireFormatError`.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

import numpy as np
import torch
import zstandard

from fl_common.tensors.codecs import Codec, EncodedUpdate, make_codec

__all__ = [
    "WireFormatError",
    "MAGIC",
    "VERSION",
    "COMPRESSIONS",
    "DEFAULT_MAX_BYTES",
    "MAX_HEADER_BYTES",
    "pack",
    "unpack",
    "encode_update",
    "decode_update",
]

MAGIC = b"FLUP"
VERSION = 1
COMPRESSIONS = ("none", "zlib", "zstd")
#: default cap on both the blob and its decompressed payload (a 100M-parameter float32 update is 400 MB)
DEFAULT_MAX_BYTES = 512 << 20
#: the JSON header holds a few array descriptors and a small meta dict; anything bigger is abuse
MAX_HEADER_BYTES = 64 << 10
_MAX_ARRAYS = 16
_ALIGN = 8
_PREFIX = struct.Struct("<4sBBHIQQ")

# Wire dtype names -> little-endian numpy dtypes -> torch dtypes. Deliberately short.
_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "int8": (np.dtype("i1"), torch.int8),
    "uint8": (np.dtype("u1"), torch.uint8),
    "int32": (np.dtype("<i4"), torch.int32),
    "int64": (np.dtype("<i8"), torch.int64),
}
_TORCH_TO_NAME = {t: n for n, (_, t) in _DTYPES.items()}


class WireFormatError(ValueError):
    """A blob that is not a valid update container. The message says what was wrong."""


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _compress(raw: bytes, compression: str, level: int | None) -> bytes:
    if compression == "none":
        return raw
    if compression == "zlib":
        return zlib.compress(raw, 1 if level is None else level)
    # write_content_size lets a reader cross-check the frame against the declared raw length.
    return zstandard.ZstdCompressor(level=3 if level is None else level, write_content_size=True).compress(raw)


def pack(
    encoded: EncodedUpdate,
    compression: str = "zstd",
    meta: dict[str, Any] | None = None,
    *,
    level: int | None = None,
) -> bytes:
    """Serialise ``encoded`` plus a JSON-safe ``meta`` dict (round, client id, ...) into one blob.

    ``encoded`` is checked with its codec first, so a sender can never emit what :func:`unpack`
    would refuse. ``level`` overrides the compressor level (zlib default 1, zstd default 3:
    float payloads barely compress, so higher levels mostly burn CPU).
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    make_codec(encoded.codec).check(encoded)
    if len(encoded.arrays) > _MAX_ARRAYS:
        raise ValueError(f"at most {_MAX_ARRAYS} arrays per update")

    descriptors, chunks, offset = [], [], 0
    for name, t in encoded.arrays.items():
        if t.dtype not in _TORCH_TO_NAME:
            raise ValueError(f"array {name!r} has unsupported dtype {t.dtype}")
        np_dtype, _ = _DTYPES[_TORCH_TO_NAME[t.dtype]]
        data = t.detach().cpu().contiguous().numpy().astype(np_dtype, copy=False).tobytes()
        pad = _align(offset) - offset
        if pad:
            chunks.append(b"\0" * pad)
        chunks.append(data)
        offset += pad + len(data)
        descriptors.append({"name": name, "dtype": _TORCH_TO_NAME[t.dtype], "shape": list(t.shape)})
    raw = b"".join(chunks)

    header = {
        "codec": encoded.codec,
        "numel": encoded.numel,
        "params": dict(encoded.params),
        "arrays": descriptors,
        "meta": meta,
    }
    try:
        header_bytes = json.dumps(header, allow_nan=False, separators=(",", ":"), sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta/params must be JSON-serialisable without NaN/Inf: {e}") from None
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES} (meta too big?)")
    payload = _compress(raw, compression, level)
    prefix = _PREFIX.pack(MAGIC, VERSION, COMPRESSIONS.index(compression), 0, len(header_bytes), len(payload), len(raw))
    return prefix + header_bytes + payload


def _reject_constant(name: str) -> Any:
    raise WireFormatError(f"header contains the non-JSON constant {name}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except WireFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireFormatError(f"header is not valid UTF-8 JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise WireFormatError("header must be a JSON object")
    expected = {"codec", "numel", "params", "arrays", "meta"}
    if set(header) != expected:
        raise WireFormatError(f"header keys must be {sorted(expected)}, got {sorted(header)[:10]}")
    if not isinstance(header["codec"], str) or len(header["codec"]) > 64:
        raise WireFormatError("header 'codec' must be a short string")
    if not _is_int(header["numel"]) or header["numel"] < 0:
        raise WireFormatError("header 'numel' must be a non-negative integer")
    params = header["params"]
    if not isinstance(params, dict) or not all(
        isinstance(v, (str, float)) or _is_int(v) for v in params.values()
    ):
        raise WireFormatError("header 'params' must be an object of scalars")
    if not isinstance(header["meta"], dict):
        raise WireFormatError("header 'meta' must be an object")
    arrays = header["arrays"]
    if not isinstance(arrays, list) or len(arrays) > _MAX_ARRAYS:
        raise WireFormatError(f"header 'arrays' must be a list of at most {_MAX_ARRAYS} descriptors")
    names = set()
    for a in arrays:
        if not isinstance(a, dict) or set(a) != {"name", "dtype", "shape"}:
            raise WireFormatError("each array descriptor must be {name, dtype, shape}")
        if not isinstance(a["name"], str) or not a["name"] or len(a["name"]) > 64 or a["name"] in names:
            raise WireFormatError("array names must be unique non-empty short strings")
        names.add(a["name"])
        if a["dtype"] not in _DTYPES:
            raise WireFormatError(f"array {a['name']!r} has unsupported dtype {a['dtype']!r}")
        shape = a["shape"]
        if not isinstance(shape, list) or len(shape) != 1 or not all(_is_int(s) and s >= 0 for s in shape):
            raise WireFormatError(f"array {a['name']!r} must have a 1-D shape of non-negative integers")
    return header


def _decompress(payload: bytes, compression: str, raw_len: int) -> bytearray:
    """Decompress into at most ``raw_len`` (+1 to detect overrun) bytes; exact length required."""
    if compression == "none":
        if len(payload) != raw_len:
            raise WireFormatError(f"uncompressed payload is {len(payload)} bytes, header says {raw_len}")
        return bytearray(payload)
    if compression == "zlib":
        d = zlib.decompressobj()
        out: bytes | bytearray
        try:
            out = d.decompress(payload, raw_len + 1)
        except zlib.error as e:
            raise WireFormatError(f"zlib payload is corrupt: {e}") from None
        if len(out) > raw_len or d.unconsumed_tail:
            raise WireFormatError(f"zlib payload expands beyond the declared {raw_len} bytes")
        if not d.eof or d.unused_data:
            raise WireFormatError("zlib payload is truncated or has trailing data")
    else:
        out = bytearray()
        try:
            # read_across_frames: trailing garbage after the frame must fail, not be ignored.
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=True)
            while len(out) <= raw_len:
                chunk = reader.read(min(1 << 20, raw_len + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
        except zstandard.ZstdError as e:
            raise WireFormatError(f"zstd payload is corrupt: {e}") from None
        if len(out) > raw_len:
            raise WireFormatError(f"zstd payload expands beyond the declared {raw_len} bytes")
    if len(out) != raw_len:
        raise WireFormatError(f"payload decompresses to {len(out)} bytes, header says {raw_len}")
    return out if isinstance(out, bytearray) else bytearray(out)


def unpack(
    data: bytes | bytearray | memoryview,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    max_numel: int | None = None,
) -> tuple[EncodedUpdate, dict[str, Any]]:
    """Parse and fully validate a blob from :func:`pack`; return ``(encoded, meta)``.

    ``max_bytes`` caps the blob and its decompressed payload; ``max_numel`` caps the length of the
    vector that decoding will allocate (default ``max_bytes // 4``, i.e. the same memory budget:
    a top-k blob is tiny but its decoded vector is not). Raises :class:`WireFormatError` only.
    """
    try:
        return _unpack(data, max_bytes, max_numel)
    except WireFormatError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, MemoryError, struct.error) as e:
        # Belt and braces: anything a malformed blob provokes below is still a format error.
        raise WireFormatError(f"malformed update: {type(e).__name__}: {e}") from None


def _unpack(data: bytes | bytearray | memoryview, max_bytes: int, max_numel: int | None) -> tuple[EncodedUpdate, dict[str, Any]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data) if not isinstance(data, bytes) else data
    max_numel = max_bytes // 4 if max_numel is None else max_numel
    if len(data) > max_bytes:
        raise WireFormatError(f"blob of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _PREFIX.size:
        raise WireFormatError(f"blob of {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, comp_id, reserved, header_len, payload_len, raw_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireFormatError(f"unsupported container version {version} (this reader knows {VERSION})")
    if comp_id >= len(COMPRESSIONS) or reserved != 0:
        raise WireFormatError(f"unknown compression id {comp_id} or non-zero reserved field")
    if header_len > MAX_HEADER_BYTES:
        raise WireFormatError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if raw_len > max_bytes:
        raise WireFormatError(f"declared payload of {raw_len} bytes exceeds the limit of {max_bytes}")
    if _PREFIX.size + header_len + payload_len != len(data):
        raise WireFormatError(
            f"blob is {len(data)} bytes but its prefix declares {_PREFIX.size + header_len + payload_len}"
            " (truncated or padded)"
        )
    header = _parse_header(data[_PREFIX.size : _PREFIX.size + header_len])
    if header["numel"] > max_numel:
        raise WireFormatError(f"update of {header['numel']} values exceeds the limit of {max_numel}")

    # Lay out the arrays exactly as pack() does and require the declared raw length to match.
    layout, offset = [], 0
    for a in header["arrays"]:
        np_dtype, torch_dtype = _DTYPES[a["dtype"]]
        count = a["shape"][0]
        if count > raw_len:  # also keeps the product below from being astronomically large
            raise WireFormatError(f"array {a['name']!r} declares {count} values, more than the payload holds")
        offset = _align(offset)
        layout.append((a["name"], np_dtype, torch_dtype, count, offset))
        offset += count * np_dtype.itemsize
    if offset != raw_len:
        raise WireFormatError(f"arrays need {offset} payload bytes, header says {raw_len}")

    compression = COMPRESSIONS[comp_id]
    raw = _decompress(data[_PREFIX.size + header_len :], compression, raw_len)
    arrays: dict[str, torch.Tensor] = {}
    for name, np_dtype, _torch_dtype, count, off in layout:
        arr = np.frombuffer(raw, dtype=np_dtype, count=count, offset=off)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arrays[name] = torch.from_numpy(arr)

    try:
        codec: Codec = make_codec(header["codec"])
    except ValueError as e:
        raise WireFormatError(f"unknown codec in header: {e}") from None
    if codec.name != header["codec"]:
        raise WireFormatError(f"codec {header['codec']!r} is not in canonical form {codec.name!r}")
    encoded = EncodedUpdate(header["codec"], header["numel"], arrays, header["params"])
    try:
        codec.check(encoded)
    except ValueError as e:
        raise WireFormatError(f"invalid {codec.name} update: {e}") from None
    return encoded, header["meta"]


def encode_update(
    vec: torch.Tensor,
    codec: str | Codec = "none",
    compression: str = "zstd",
    rng: torch.Generator | None = None,
    meta: dict[str, Any] | None = None,
) -> bytes:
    """Encode a flat update with ``codec`` (a spec string or a :class:`Codec`) and pack it."""
    c = make_codec(codec) if isinstance(codec, str) else codec
    return pack(c.encode(vec, rng), compression, meta)


def decode_update(
    data: bytes | bytearray | memoryview,
    expected_numel: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Unpack, check the length against the receiver's model (``expected_numel``, before the
    decoded vector is allocated), and decode to a float32 vector. Raises :class:`WireFormatError`."""
    encoded, meta = unpack(data, max_bytes, max_numel=expected_numel)
    if encoded.numel != expected_numel:
        raise WireFormatError(f"update has {encoded.numel} values, the model has {expected_numel}")
    try:
        vec = make_codec(encoded.codec).decode(encoded)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:  # unreachable after check(), kept as a guard
        raise WireFormatError(f"could not decode update: {e}") from None
    return vec, meta

