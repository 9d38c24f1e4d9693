"""Lossy and lossless codecs for flat float32 model updates.

An update (client model minus global model) is one flat float32 vector (see ``flat.py``).
Upload bandwidth is usually the bottleneck of federated learning, so a client may shrink it:

* ``none``     -- float32 as is; exact.
* ``float16``  -- half precision; ~1e-3 relative error, deterministic, 2x smaller.
* ``int8``     -- QSGD-style *stochastic* quantization with one float32 scale per chunk of
  4096 values: ``q = floor(x / s + u)``, ``u ~ U[0, 1)``, ``s = max|chunk| / 127``. Because
  ``E[q] = x / s`` the decoded update is *unbiased*, so averaging many clients' updates cancels
  the quantization noise instead of accumulating a systematic error. Per-chunk (not per-tensor)
  scales because the codec only sees the flat vector (tensor boundaries are the spec's business)
  and because one outlier should only cost resolution for its 4095 neighbours, not for a whole
  layer. The scales cost 4 bytes per 4096 values (0.1 %).
* ``topk:<ratio>`` -- keep the ``k = ceil(ratio * n)`` largest-magnitude coordinates (delta-coded
  sorted indices + values). Biased: pair it with :class:`~fl_common.tensors.error_feedback.ErrorFeedback`.
* ``topk:<ratio>+<none|float16|int8>`` -- sparsify, then encode the kept values with a value codec.

Every codec also has :meth:`Codec.check`, which validates an :class:`EncodedUpdate` that came from
an untrusted peer (shapes, dtypes, index ranges, finiteness) so that :meth:`Codec.decode` never
has to: the wire format calls it before handing anything out.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "EncodedUpdate",
    "Codec",
    "NoneCodec",
    "Float16Codec",
    "Int8Codec",
    "TopKCodec",
    "ComposedCodec",
    "make_codec",
    "available_codecs",
    "all_finite",
    "topk_count",
    "SPEC_HELP",
]

SPEC_HELP = "none, float16, int8, topk:<ratio>, topk:<ratio>+<none|float16|int8> (0 < ratio <= 1)"

# The float32 largest finite value; an int8 scale above FLOAT32_MAX / 127 could overflow on decode.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class EncodedUpdate:
    """An encoded update: everything the wire needs, nothing codec-specific outside ``arrays``.

    ``codec`` is the canonical spec string (``make_codec(codec)`` rebuilds the decoder), ``numel``
    the length of the decoded vector, ``arrays`` the named CPU tensors to ship, and ``params``
    small JSON-safe settings the decoder needs (e.g. the int8 chunk size).
    """

    codec: str
    numel: int
    arrays: dict[str, torch.Tensor]
    params: dict[str, int | float | str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Raw payload size (before wire compression)."""
        return sum(t.numel() * t.element_size() for t in self.arrays.values())


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN/Inf. One allocation-free min/max pass (NaN propagates through
    ``aminmax``), several times faster than ``isfinite(t).all()`` on multi-million-value updates."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _as_update_vector(vec: torch.Tensor) -> torch.Tensor:
    """Normalise an input to a contiguous 1-D float32 CPU tensor; refuse non-finite values so
    that nothing the receiver would reject (NaN/Inf) is ever put on the wire."""
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(vec).__name__}")
    if vec.dim() != 1:
        raise ValueError(f"expected a 1-D update vector, got shape {tuple(vec.shape)}")
    if not vec.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point update vector, got {vec.dtype}")
    out = vec.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not all_finite(out):
        raise ValueError("update vector contains NaN or Inf values")
    return out


def _expect_arrays(enc: EncodedUpdate, schema: dict[str, tuple[tuple[torch.dtype, ...], int]]) -> None:
    """Raise ValueError unless ``enc.arrays`` has exactly the names, dtypes and lengths of ``schema``."""
    if set(enc.arrays) != set(schema):
        raise ValueError(f"codec {enc.codec!r} expects arrays {sorted(schema)}, got {sorted(enc.arrays)}")
    for name, (dtypes, length) in schema.items():
        t = enc.arrays[name]
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"array {name!r} must be a 1-D tensor")
        if t.dtype not in dtypes:
            raise ValueError(f"array {name!r} has dtype {t.dtype}, expected one of {dtypes}")
        if t.numel() != length:
            raise ValueError(f"array {name!r} has {t.numel()} values, expected {length}")


def _expect_finite(name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        raise ValueError(f"array {name!r} contains NaN or Inf values")


def _expect_header(enc: EncodedUpdate, params: tuple[str, ...] = ()) -> None:
    """Common header checks: a sane ``numel`` and exactly the expected ``params`` keys."""
    if isinstance(enc.numel, bool) or not isinstance(enc.numel, int) or enc.numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {enc.numel!r}")
    if set(enc.params) != set(params):
        raise ValueError(f"codec {enc.codec!r} expects params {sorted(params)}, got {sorted(enc.params)}")


class Codec(ABC):
    """A reversible (possibly lossy) map between a flat float32 vector and named arrays."""

    #: canonical spec string, e.g. ``"topk:0.01+int8"``
    name: str
    #: True when ``E[decode(encode(x))] != x``; such codecs want error feedback on the client.
    biased: bool = False

    @abstractmethod
    def encode(self, vec: torch.Tensor, rng: torch.Generator | None = None) -> EncodedUpdate:
        """Encode a 1-D float vector. ``rng`` drives stochastic codecs (None: torch's global RNG)."""

    @abstractmethod
    def decode(self, encoded: EncodedUpdate) -> torch.Tensor:
        """Decode to a new contiguous 1-D float32 CPU tensor of length ``encoded.numel``."""

    @abstractmethod
    def check(self, encoded: EncodedUpdate) -> None:
        """Raise ValueError unless ``encoded`` is something :meth:`decode` handles safely and
        whose result is finite. Called on everything that arrives from the network."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NoneCodec(Codec):
    """Plain float32: exact, and the baseline the others are measured against."""

    name = "none"

    def encode(self, vec: torch.Tensor, rng: torch.Generator | None = None) -> EncodedUpdate:
        v = _as_update_vector(vec)
        return EncodedUpdate(self.name, v.numel(), {"values": v.clone()})

    def decode(self, encoded: EncodedUpdate) -> torch.Tensor:
        return encoded.arrays["values"].to(torch.float32).clone()

    def check(self, encoded: EncodedUpdate) -> None:
        _expect_header(encoded)
        _expect_arrays(encoded, {"values": ((torch.float32,), encoded.numel)})
        _expect_finite("values", encoded.arrays["values"])


class Float16Codec(Codec):
    """IEEE half precision. Values beyond +-65504 saturate (rather than becoming Inf, which the
    receiver would reject): such an update has diverged anyway and server-side clipping bounds it."""

    name = "float16"

    def encode(self, vec: torch.Tensor, rng: torch.Generator | None = None) -> EncodedUpdate:
        v = _as_update_vector(vec)
        half = v.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
        return EncodedUpdate(self.name, v.numel(), {"values": half})

    def decode(self, encoded: EncodedUpdate) -> torch.Tensor:
        return encoded.arrays["values"].to(torch.float32)

    def check(self, encoded: EncodedUpdate) -> None:
        _expect_header(encoded)
        _expect_arrays(encoded, {"values": ((torch.float16,), encoded.numel)})
        _expect_finite("values", encoded.arrays["values"])


class Int8Codec(Codec):
    """Unbiased stochastic 8-bit quantization with a float32 scale per ``chunk`` values (QSGD with
    s = 127 levels and max-norm scaling). Levels are in [-127, 127] so the grid is symmetric.

    Error bound: every decoded value is within one step ``max|chunk| / 127`` of the input, and the
    expectation over ``rng`` equals the input exactly (up to float32 rounding).
    """

    name = "int8"
    DEFAULT_CHUNK = 4096
    MAX_CHUNK = 1 << 24

    def __init__(self, chunk: int = DEFAULT_CHUNK) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= self.MAX_CHUNK:
            raise ValueError(f"int8 chunk size must be an integer in [1, {self.MAX_CHUNK}], got {chunk!r}")
        self.chunk = chunk

    def _nchunks(self, numel: int) -> int:
        return -(-numel // self.chunk)

    #: values quantised per step of :meth:`encode`: its temporaries stay in the CPU caches (whole-vector
    #: temporaries - padded copy, abs, quotient, noise, floor, int8 copy - cost a cnn update ~30 ms, mostly memory
    #: traffic; a daemon pays it on the round's critical path between its training and its upload). 2**18 values
    #: (1 MiB of float32): 26 steps of 2**16 spent ~2 ms of the cnn's 12 ms in the per-step calls; 2**16 to 2**19
    #: measured 11.9 / 10.0 / 9.9 / 9.4 ms, the whole vector at once 18 ms (issue 12, fast_rounds README)
    ENCODE_BLOCK = 1 << 18

    def encode(self, vec: torch.Tensor, rng: torch.Generator | None = None) -> EncodedUpdate:
        """Quantise ``vec`` block by block. The same float32 operations in the same order as on the padded whole
        vector, and ``torch.rand`` drawn for the same positions in the same order (padding included): the levels
        and scales are bit for bit those of the one-shot form (tests/common/test_codecs.py)."""
        v = _as_update_vector(vec)
        n, chunk = v.numel(), self.chunk
        nch = self._nchunks(n)
        q = torch.empty(n, dtype=torch.int8)
        scales = torch.empty(nch, dtype=torch.float32)
        per_step = max(1, self.ENCODE_BLOCK // chunk)
        buf = torch.empty(min(per_step, nch) * chunk, dtype=torch.float32)
        for first in range(0, nch, per_step):
            k = min(per_step, nch - first)
            lo, hi = first * chunk, min(n, (first + k) * chunk)
            block = buf[:k * chunk]
            block[:hi - lo] = v[lo:hi]
            block[hi - lo:] = 0.0
            blocks = block.view(k, chunk)
            scale = blocks.abs().amax(dim=1) / 127.0
            # float32 max / 127 * 127 rounds up to inf: step the scale down one ulp so that 127 levels stay finite
            scale = torch.where(torch.isfinite(scale * 127), scale, torch.nextafter(scale, torch.zeros_like(scale)))
            scales[first:first + k] = scale
            blocks.div_(torch.where(scale > 0, scale, torch.ones_like(scale))[:, None])
            block.add_(torch.rand(k * chunk, generator=rng, dtype=torch.float32)).floor_().clamp_(-127, 127)
            q[lo:hi] = block[:hi - lo]
        return EncodedUpdate(self.name, n, {"q": q, "scales": scales}, {"chunk": self.chunk})

    def decode(self, encoded: EncodedUpdate) -> torch.Tensor:
        chunk = int(encoded.params["chunk"])
        n = encoded.numel
        q, scales = encoded.arrays["q"], encoded.arrays["scales"]
        # in place on the n values: padding to nch * chunk let a 203-byte upload (chunk 2**24, numel 1) cost 128 MiB
        out = q.to(torch.float32)
        full = n // chunk
        if full:
            out[: full * chunk].view(full, chunk).mul_(scales[:full, None])
        if n % chunk:
            out[full * chunk:].mul_(scales[full])
        return out

    def check(self, encoded: EncodedUpdate) -> None:
        _expect_header(encoded, ("chunk",))
        chunk = encoded.params["chunk"]
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= self.MAX_CHUNK:
            raise ValueError(f"int8 chunk size must be an integer in [1, {self.MAX_CHUNK}], got {chunk!r}")
        nch = -(-encoded.numel // chunk)
        _expect_arrays(encoded, {"q": ((torch.int8,), encoded.numel), "scales": ((torch.float32,), nch)})
        q, scales = encoded.arrays["q"], encoded.arrays["scales"]
        # the smallest level, not ``(q == -128).any()``: no 1.66 M-value bool temporary (~2 ms of the server's work
        # per cnn upload, and of the sender's own check in wire.pack)
        if q.numel() and int(q.min()) == -128:
            raise ValueError("int8 levels must lie in [-127, 127]")
        _expect_finite("scales", scales)
        if scales.numel() and not bool(((scales >= 0) & (scales <= _FLOAT32_MAX / 127) & torch.isfinite(scales * 127)).all()):
            raise ValueError("int8 scales must lie in [0, float32_max / 127]")


def topk_count(numel: int, ratio: float) -> int:
    """``k`` for a vector of ``numel`` values: ``ceil(ratio * numel)``, at least 1 (for a non-empty
    vector). Rounded to 6 decimals first so that e.g. 0.07 * 100 gives 7, not 8."""
    if numel <= 0:
        return 0
    return max(1, min(numel, math.ceil(round(ratio * numel, 6))))


def _topk_select(v: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (int64) and values of the ``topk_count`` largest-magnitude entries."""
    if v.numel() >= 2**31:  # gaps are stored as int32
        raise ValueError("top-k supports vectors of fewer than 2**31 values")
    k = topk_count(v.numel(), ratio)
    if k == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    idx = torch.topk(v.abs(), k, sorted=False).indices
    idx, _ = torch.sort(idx)
    return idx, v[idx]


def _delta_encode(idx: torch.Tensor) -> torch.Tensor:
    """Sorted indices -> first index then gaps, as int32: gaps are small, so the wire compressor
    squeezes them far better than absolute positions."""
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.int32)
    return torch.diff(idx, prepend=idx.new_zeros(1)).to(torch.int32)


def _delta_decode(deltas: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(deltas.to(torch.int64), dim=0)


def _check_deltas(deltas: torch.Tensor, numel: int) -> None:
    """Indices must be strictly increasing and in [0, numel): no duplicates, no out-of-range
    scatter on decode."""
    if deltas.numel() == 0:
        return
    d = deltas.to(torch.int64)
    if int(d[0]) < 0 or (d.numel() > 1 and bool((d[1:] < 1).any())):
        raise ValueError("top-k indices must be strictly increasing and non-negative")
    if int(d.sum()) >= numel:
        raise ValueError(f"top-k index out of range for a vector of {numel} values")


class TopKCodec(Codec):
    """Keep the ``ceil(ratio * n)`` largest-magnitude coordinates as float32, zero the rest."""

    biased = True

    def __init__(self, ratio: float) -> None:
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)
        self.name = f"topk:{self.ratio!r}"

    def encode(self, vec: torch.Tensor, rng: torch.Generator | None = None) -> EncodedUpdate:
        v = _as_update_vector(vec)
        idx, vals = _topk_select(v, self.ratio)
        return EncodedUpdate(self.name, v.numel(), {"index_deltas": _delta_encode(idx), "values": vals.contiguous()})

    def decode(self, encoded: EncodedUpdate) -> torch.Tensor:
        out = torch.zeros(encoded.numel, dtype=torch.float32)
        out[_delta_decode(encoded.arrays["index_deltas"])] = encoded.arrays["values"].to(torch.float32)
        return out

    def check(self, encoded: EncodedUpdate) -> None:
        _expect_header(encoded)
        k = topk_count(encoded.numel, self.ratio)
        _expect_arrays(encoded, {"index_deltas": ((torch.int32,), k), "values": ((torch.float32,), k)})
        _check_deltas(encoded.arrays["index_deltas"], encoded.numel)
        _expect_finite("values", encoded.arrays["values"])


class ComposedCodec(Codec):
    """Top-k sparsification, then a value codec on the k kept values (e.g. ``topk:0.01+int8``).

    The value codec's arrays are stored under a ``values.`` prefix and its params likewise, so
    the composition needs no format of its own. Biased because top-k is.
    """

    biased = True

    def __init__(self, ratio: float, values: Codec) -> None:
        if isinstance(values, (TopKCodec, ComposedCodec, NoneCodec)):
            raise ValueError("the second stage of a composition must be float16 or int8")
        self.topk = TopKCodec(ratio)
        self.values = values
        self.name = f"{self.topk.name}+{values.name}"

    def encode(self, vec: torch.Tensor, rng: torch.Generator | None = None) -> EncodedUpdate:
        v = _as_update_vector(vec)
        idx, vals = _topk_select(v, self.topk.ratio)
        inner = self.values.encode(vals, rng)
        arrays = {"index_deltas": _delta_encode(idx)}
        arrays.update({f"values.{k}": t for k, t in inner.arrays.items()})
        params = {f"values.{k}": p for k, p in inner.params.items()}
        return EncodedUpdate(self.name, v.numel(), arrays, params)

    @staticmethod
    def _inner_shell(encoded: EncodedUpdate) -> EncodedUpdate:
        """``encoded`` without the value codec's params, for the outer checks."""
        own = {n: p for n, p in encoded.params.items() if not n.startswith("values.")}
        return EncodedUpdate(encoded.codec, encoded.numel, encoded.arrays, own)

    def _inner(self, encoded: EncodedUpdate) -> EncodedUpdate:
        """The value codec's view: the k kept values as their own encoded vector."""
        k = encoded.arrays["index_deltas"].numel()
        arrays = {n.removeprefix("values."): t for n, t in encoded.arrays.items() if n.startswith("values.")}
        params = {n.removeprefix("values."): p for n, p in encoded.params.items() if n.startswith("values.")}
        return EncodedUpdate(self.values.name, k, arrays, params)

    def decode(self, encoded: EncodedUpdate) -> torch.Tensor:
        out = torch.zeros(encoded.numel, dtype=torch.float32)
        out[_delta_decode(encoded.arrays["index_deltas"])] = self.values.decode(self._inner(encoded))
        return out

    def check(self, encoded: EncodedUpdate) -> None:
        _expect_header(self._inner_shell(encoded))
        k = topk_count(encoded.numel, self.topk.ratio)
        deltas = encoded.arrays.get("index_deltas")
        if not isinstance(deltas, torch.Tensor) or deltas.dim() != 1 or deltas.dtype != torch.int32:
            raise ValueError("composed codec needs a 1-D int32 array 'index_deltas'")
        if deltas.numel() != k:
            raise ValueError(f"array 'index_deltas' has {deltas.numel()} values, expected {k}")
        extra = [n for n in list(encoded.arrays) + list(encoded.params) if n != "index_deltas" and not n.startswith("values.")]
        if extra:
            raise ValueError(f"unexpected entries {sorted(extra)} for codec {self.name!r}")
        _check_deltas(deltas, encoded.numel)
        self.values.check(self._inner(encoded))


_VALUE_CODECS: dict[str, Callable[[], Codec]] = {
    "none": NoneCodec,
    "float16": Float16Codec,
    "int8": Int8Codec,
}


def available_codecs() -> list[str]:
    """Registered codec names (``topk`` takes a ``:<ratio>`` and an optional ``+<value codec>``)."""
    return [*_VALUE_CODECS, "topk"]


def _bad_spec(spec: object) -> ValueError:
    return ValueError(f"bad codec spec {spec!r}: expected one of {SPEC_HELP}")


def _parse_ratio(text: str, spec: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise _bad_spec(spec) from None
    if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise _bad_spec(spec)
    return ratio


def make_codec(spec: str) -> Codec:
    """Parse a codec spec such as ``"int8"``, ``"topk:0.01"`` or ``"topk:0.05+int8"``.

    ``topk:<r>+none`` is the same codec as ``topk:<r>`` and gets that canonical name. Anything
    else raises ValueError with a one-line message listing the accepted forms.
    """
    if not isinstance(spec, str):
        raise _bad_spec(spec)
    text = spec.strip().lower()
    if text in _VALUE_CODECS:
        return _VALUE_CODECS[text]()
    head, plus, tail = text.partition("+")
    name, colon, arg = head.partition(":")
    if name.strip() != "topk" or not colon:
        raise _bad_spec(spec)
    ratio = _parse_ratio(arg.strip(), spec)
    if not plus:
        return TopKCodec(ratio)
    second = tail.strip()
    if second == "none":
        return TopKCodec(ratio)
    if second not in _VALUE_CODECS:
        raise _bad_spec(spec)
    return ComposedCodec(ratio, _VALUE_CODECS[second]())
