"""A client's plain contribution <-> one vector of elements of the ring Z_{2^b}, and the server's sum back to floats.

Layout (``SecAggParams.segments``, in order): ``delta`` (the model update), optionally ``control``
(SCAFFOLD's variate delta), then scalars: ``weight`` (integer n_k, capped at ``weight_bound``),
``count`` (1 per client: the decoded count must equal the number of inputs the server summed, a
cheap check that every mask was removed), ``loss`` ((n_k / W) x training loss, when reported),
``clipped`` (1 if the secagg clip changed this client's vectors) and ``unclipped`` (the
client-level DP clipping bit of adaptive clipping). Only sums of these ever reach the server.

Why the weighted vector is ``(n_k / W) x`` and not ``n_k x``: the field must hold the sum of the
largest possible values, so scaling by n_k would cost log2(W) extra bits on every coordinate;
dividing by the public bound W keeps each client's values within the clip and the weighted mean
is still W * sum((n_k/W) x_k) / sum(n_k), with the integer weight sum carried exactly.

Clipping happens here, before encoding, because the field's no-wrap guarantee needs a bound on
every value; the bound is enforced (``FieldOverflowError``), never wrapped silently.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from fl_common.secagg.field import FieldOverflowError, PreEncode, decode_sum, encode
from fl_common.secagg.messages import SecAggParams, Segment
from fl_common.secagg.prg import word_dtype

__all__ = ["PlainInput", "DecodedSum", "LOSS_BOUND", "CLEAR_METRICS", "IN_CLEAR", "encode_input", "decode_input_sum", "pack",
           "unpack"]

#: training losses are clamped to this before encoding (cross-entropy of a sane model is far below it)
LOSS_BOUND = 100.0
#: the only per-client numbers that travel in the clear next to a masked input: the DP-SGD plan (q, steps) the
#: server itself computed for that client from its record count and told it (sample-level accounting checks the
#: client ran it). Everything the aggregate needs (the update, its weight n_k, the count, SCAFFOLD's variate
#: delta, the training loss, the DP clipping bit) is inside the masked vector; local step counts and training
#: time are not sent at all (they would tell the record count and the hardware of each client).
CLEAR_METRICS = ("dp_sample_rate", "dp_steps")
#: what the server sees per client under secure aggregation, for the README and the run report
IN_CLEAR = (
    "the record count n_k each client reports in its profile (selection needs it; the masked weights' public bound "
    "W is the largest n_k among the selected)",
    "under sample-level DP only: the (sample rate, steps) plan the server computed from n_k and told the client",
    "participation: which clients advertised keys, shared them, sent a masked input, signed the survivor set and "
    "answered the unmask request, and when",
    "message sizes (a masked input is b bits per value for every client: its size says nothing of the update)",
)


@dataclass
class PlainInput:
    """What a client contributes, before encoding. ``delta``/``control`` are flat float vectors."""

    delta: np.ndarray
    weight: int = 1
    control: np.ndarray | None = None
    loss: float | None = None
    unclipped: bool | None = None


@dataclass
class DecodedSum:
    """Sums over the clients in the aggregate (float64 vectors; scalars as floats)."""

    delta: np.ndarray
    control: np.ndarray | None
    weight: float
    count: int
    loss: float | None
    clipped: int
    unclipped: int | None


def _as_vector(x: object) -> np.ndarray:
    """A flat float32 or float64 view (or copy) of ``x``: float32 updates are not widened here (a cnn's would cost
    a 13 MB float64 copy); the encoding widens them chunk by chunk, exactly."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    vec = np.asarray(x).ravel()
    return vec if vec.dtype in (np.float32, np.float64) else vec.astype(np.float64)


def _l2_norm(vec: np.ndarray) -> float:
    """||vec|| accumulated in float64, chunk by chunk (no float64 copy of a float32 vector). numpy's own
    pairwise sum, not BLAS: a BLAS dot wakes its thread pool per call, which on a busy machine spins for longer
    than the sum takes."""
    step = max(1, min(vec.size, 1 << 15))
    squares = np.empty(step)
    total = 0.0
    for at in range(0, vec.size, step):
        part = squares[:min(step, vec.size - at)]
        part[...] = vec[at:at + step]
        np.multiply(part, part, out=part)
        total += float(np.sum(part))
    return math.sqrt(total)


def _clip(vec: np.ndarray, seg: Segment) -> tuple[PreEncode, bool]:
    """The steps that clip ``vec`` for ``seg`` (applied during the encoding) and whether the L2 clip shrinks it."""
    norm = _l2_norm(vec) if seg.l2_clip is not None else math.nan
    # a finite norm proves every value finite (NaN and infinity propagate into it): the check's own pass is
    # needed only without an L2 clip or when the norm is not finite (non-finite values, or a sum that overflowed)
    if not math.isfinite(norm):
        if not np.all(np.isfinite(vec)):
            raise FieldOverflowError(f"segment {seg.name!r} contains NaN or infinity")
        if seg.l2_clip is not None:  # finite values whose squares overflow: the norm of the rescaled vector
            peak = float(np.max(np.abs(vec)))
            norm = peak * _l2_norm(vec / peak)
    if seg.l2_clip is None:
        return PreEncode(), False
    rescale = seg.l2_clip / norm if norm > seg.l2_clip else None
    # |v_i| <= ||v|| <= clip <= bound; the clamp only absorbs the last ulp of the rescaling
    return PreEncode(rescale=rescale, clamp=seg.bound), rescale is not None


def encode_input(params: SecAggParams, plain: PlainInput, rng: np.random.Generator, *,
                 words: bool = False) -> tuple[np.ndarray, bool]:
    """The client's uint64 field vector (length ``params.vector_length``) and whether the clip bound.
    ``words``: in the masking's word dtype instead (``prg.word_dtype``: uint32 up to 32 bits), the same values,
    for ``masks.mask_words`` to mask in place.

    Raises ``FieldOverflowError`` for a value beyond its segment's bound (e.g. distributed DP noise
    more than 10 sigma out: the client then cannot take part rather than wrap the sum).
    """
    if isinstance(plain.weight, bool) or not isinstance(plain.weight, (int, np.integer)) or plain.weight < 1:
        raise ValueError(f"weight must be an integer >= 1, got {plain.weight!r}")
    weight = min(int(plain.weight), params.weight_bound)
    factor = weight / params.weight_bound if params.weighted else 1.0
    parts: list[tuple[np.ndarray, PreEncode | None]] = []
    any_clipped = False
    for seg in params.segments:
        if seg.name in ("delta", "control"):
            source = plain.delta if seg.name == "delta" else plain.control
            if source is None:
                raise ValueError(f"this round's layout has a {seg.name!r} segment but the input has none")
            vec = _as_vector(source)
            if vec.size != seg.length:
                raise ValueError(f"{seg.name} has {vec.size} values, the round expects {seg.length}")
            steps, clipped = _clip(vec, seg)
            any_clipped |= clipped
            parts.append((vec, dataclasses.replace(steps, factor=factor)))
            continue
        if seg.name == "weight":
            values = np.array([float(weight)])
        elif seg.name == "count":
            values = np.array([1.0])
        elif seg.name == "loss":
            loss = 0.0 if plain.loss is None or not math.isfinite(plain.loss) else min(max(float(plain.loss), 0.0), LOSS_BOUND)
            values = np.array([loss * weight / params.weight_bound])
        elif seg.name == "unclipped":
            if plain.unclipped is None:
                raise ValueError("this round collects the DP clipping bit, but the input has none")
            values = np.array([1.0 if plain.unclipped else 0.0])
        else:  # "clipped" is filled in below, once every vector has been clipped
            values = np.zeros(1)
        parts.append((values, None))
    for i, seg in enumerate(params.segments):
        if seg.name == "clipped":
            parts[i] = (np.array([1.0 if any_clipped else 0.0]), None)
    out = np.empty(params.vector_length, dtype=word_dtype(params.modulus_bits) if words else np.uint64)
    at = 0
    for seg, (values, pre) in zip(params.segments, parts, strict=True):
        encode(values, seg.bound, seg.scale_bits, params.modulus_bits, rng, out=out[at:at + seg.length], pre=pre)
        at += seg.length
    return out, any_clipped


def decode_input_sum(params: SecAggParams, total: np.ndarray, num_inputs: int) -> DecodedSum:
    """The unmasked field sum of ``num_inputs`` encodings -> float sums per segment.

    ``FieldOverflowError`` if any segment decodes outside what that many honest inputs can add up
    to, or if the decoded count differs from ``num_inputs``: both mean a mask was left in.
    """
    out: dict[str, np.ndarray] = {}
    at = 0
    for seg in params.segments:
        out[seg.name] = decode_sum(total[at:at + seg.length], num_inputs, seg.bound, seg.scale_bits, params.modulus_bits)
        at += seg.length
    count = round(float(out["count"][0]))
    if count != num_inputs:
        raise FieldOverflowError(f"the decoded count is {count}, but {num_inputs} inputs were summed: a mask was not removed")
    return DecodedSum(
        delta=out["delta"],
        control=out.get("control"),
        weight=float(out["weight"][0]) if "weight" in out else float(num_inputs),
        count=count,
        loss=float(out["loss"][0]) if "loss" in out else None,
        clipped=round(float(out["clipped"][0])) if "clipped" in out else 0,
        unclipped=round(float(out["unclipped"][0])) if "unclipped" in out else None,
    )


def _layout(modulus_bits: int) -> list[tuple[int, int, int]]:
    """Bit positions of the 64 values of one group of ``b`` 64-bit words: (value j, word, offset).

    Value i of the stream starts at bit i*b; the pattern repeats every 64 values (64*b bits = b
    words), so packing is 64 vectorised shifts over groups instead of a Python loop per value."""
    return [(j, (j * modulus_bits) // 64, (j * modulus_bits) % 64) for j in range(64)]


def _byte_fields(nbytes: int) -> tuple[np.dtype, tuple[tuple[str, int], ...]]:
    """A packed little-endian record of ``nbytes`` bytes (1-8) made of 4-, 2- and 1-byte unsigned fields, and each
    field's (name, bit shift) in the integer the record holds."""
    names, formats, offsets, shifts = [], [], [], []
    at = 0
    for size in (4, 2, 1):
        while nbytes - at >= size:
            names.append(f"f{at}")
            formats.append(f"<u{size}")
            offsets.append(at)
            shifts.append(8 * at)
            at += size
    record = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": nbytes})
    return record, tuple(zip(names, shifts, strict=True))


def _pack_words(words: np.ndarray, nbytes: int, *, consume: bool = False) -> bytes:
    """The low ``nbytes`` bytes of each unsigned word (uint32 or uint64), little-endian, back to back.

    Why unsigned fields and not one ``V{nbytes}`` void field: copying a void field runs numpy's generic
    per-element copy (a strided uint8 slice copies byte by byte); a field is a plain casting loop that keeps the
    low bytes of what it is given, the word shifted right in place between fields: ~2x faster at a cnn's 1.6 M
    values (every masked input is packed once). ``consume``: ``words`` may be overwritten (a temporary)."""
    record, fields = _byte_fields(nbytes)
    out = np.empty(words.size, dtype=record)
    rest, done = words, 0
    for name, shift in fields:
        if shift > done:
            step = words.dtype.type(shift - done)
            if rest is words and not consume:
                rest = np.right_shift(words, step)
            else:
                np.right_shift(rest, step, out=rest)
            done = shift
        out[name] = rest
    return out.tobytes()


def _unpack_words(data: bytes | memoryview, count: int, nbytes: int, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """Inverse of :func:`_pack_words`: ``count`` words (uint64, or ``dtype`` when they fit it) from ``count * nbytes``
    bytes.

    Each word is read whole, unaligned, where its bytes start (a strided view straight over ``data``, no copy of
    it) and masked to its bytes; the last words, whose whole read would run past the end, are read one by one.
    Why this way: a ``V{nbytes}`` void field copies per element, 3x slower, and a padded copy of the payload
    (5 MB for a cnn) is one more pass, over pages the server's heap may have to fault in again."""
    wide = 4 if nbytes <= 4 else 8
    words = np.empty(count, dtype=dtype)
    head, tail = _word_reads(data, count, nbytes, wide, words.dtype)
    words[:head.size] = head
    words[head.size:] = tail
    if nbytes < wide:
        np.bitwise_and(words, words.dtype.type((1 << (8 * nbytes)) - 1), out=words)
    return words


def _word_reads(data: bytes | memoryview, count: int, nbytes: int, wide: int, dtype: np.dtype
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` values of ``nbytes`` bytes each in ``data``, each read as the ``wide``-byte little-endian word
    where its bytes start: a strided view straight over ``data`` for every value whose word fits before the end, and
    the last few (whose word would run past it) read on their own, zero-extended, as a ``dtype`` array. The words
    of the view carry the next values' bytes above their own: callers mask them or let a reduction mod 2^b drop
    them."""
    whole = 0 if len(data) < wide else min(count, (len(data) - wide) // nbytes + 1)
    head = np.ndarray((whole,), dtype=f"<u{wide}", buffer=data, strides=(nbytes,))
    tail = np.array([int.from_bytes(data[i * nbytes:(i + 1) * nbytes], "little") for i in range(whole, count)],
                    dtype=dtype)
    return head, tail


def check_packed_size(data: bytes | memoryview, length: int, modulus_bits: int) -> int:
    """The byte size of ``length`` packed values of ``modulus_bits`` bits, or ValueError when ``data`` has another."""
    nbytes = (length * modulus_bits + 7) // 8
    if len(data) != nbytes:
        raise ValueError(f"expected {length} values of {modulus_bits} bits ({nbytes} bytes), got {len(data)}")
    return nbytes


def add_packed(acc: np.ndarray, data: bytes | memoryview, modulus_bits: int) -> None:
    """``acc += unpack(data, acc.size, modulus_bits)`` modulo the word, without unpacking into a new vector.

    ``acc`` is a word accumulator (``prg.word_dtype``: uint32 up to 32 bits, else uint64) whose sum is reduced mod
    2^b only at the end; ``data`` was size-checked (:func:`unpack` refuses a wrong size, and whole-byte widths have
    no bits past the last value). For whole-byte widths each value is added as the word read unaligned where its
    bytes start: the bytes above the value belong to the next values, i.e. the word is the value plus a multiple of
    2^b, which the final reduction removes. Why: the server folds ten 5 MB masked inputs a round, and on a machine
    where fresh pages are dear an unpacked 6.6 MB vector per input cost more than the addition itself."""
    b = modulus_bits
    n = acc.size
    if acc.itemsize * 8 < b:
        raise ValueError(f"a {acc.dtype} accumulator cannot hold {b}-bit values")
    check_packed_size(data, n, b)
    if b % 8:
        np.add(acc, unpack(data, n, b, words=True), out=acc, casting="unsafe")
        return
    nbytes = b // 8
    head, tail = _word_reads(data, n, nbytes, acc.itemsize if nbytes > 1 else 1, acc.dtype)
    # array additions, which wrap modulo the word silently (a scalar one would warn of the overflow it relies on)
    np.add(acc[:head.size], head, out=acc[:head.size], casting="unsafe")
    np.add(acc[head.size:], tail, out=acc[head.size:])


def _pairs_fit_bytes(b: int) -> bool:
    """Two b-bit values make whole bytes in one word (b = 4, 12, 20, 28: 28 is the private demo's width)."""
    return b % 8 != 0 and (2 * b) % 8 == 0 and 2 * b <= 64


def _pack_pairs(v: np.ndarray, b: int) -> bytes:
    """Values 2i and 2i+1 as one 2b-bit word (the stream's bit order), whose 2b/8 low bytes are copied out."""
    n = v.size
    even = np.zeros(n + (n & 1), dtype=np.uint64)
    even[:n] = v
    words = even[1::2] << np.uint64(b)
    words |= even[0::2]
    stream = _pack_words(words, 2 * b // 8, consume=True)
    return stream[:(n * b + 7) // 8]


def _unpack_pairs(data: bytes | memoryview, length: int, b: int, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    pairs = (length + 1) // 2
    k = 2 * b // 8
    words = _unpack_words(b"".join((data, bytes(pairs * k - len(data)))), pairs, k)
    out = np.empty(2 * pairs, dtype=dtype)
    np.bitwise_and(words, np.uint64((1 << b) - 1), out=out[0::2])
    np.right_shift(words, np.uint64(b), out=out[1::2])
    if out[length:].any():
        raise ValueError("stray bits after the last value")
    values: np.ndarray = out[:length]
    return values


def pack(values: np.ndarray, modulus_bits: int) -> bytes:
    """uint64 field elements -> a little-endian bit stream of exactly ceil(n*b/8) bytes.

    The masked values are uniform in [0, 2^b), so b bits per value is the floor no codec can beat;
    packing to whole bytes instead would waste up to 7 bits a value (27 -> 32 bits, +19 %)."""
    b = modulus_bits
    v = np.asarray(values).ravel()
    if v.dtype != np.uint32 or b > 32:  # a uint32 word vector (the masking's accumulator) packs as it is
        v = np.ascontiguousarray(v, dtype=np.uint64)
    n = v.size
    nbytes = (n * b + 7) // 8
    if b in (8, 16, 32):
        return v.astype(f"<u{b // 8}").tobytes()
    if b % 8 == 0:  # whole bytes (24 bits: the default clip and precision at 10 clients): the low b/8 bytes of each
        return _pack_words(v, b // 8)
    if _pairs_fit_bytes(b):
        return _pack_pairs(v, b)
    groups = -(-n // 64)
    padded = np.zeros(groups * 64, dtype=np.uint64)
    padded[:n] = v
    g = padded.reshape(groups, 64)
    out = np.zeros((groups, b), dtype=np.uint64)
    for j, w, o in _layout(b):
        out[:, w] |= g[:, j] << np.uint64(o)
        if o + b > 64:
            out[:, w + 1] |= g[:, j] >> np.uint64(64 - o)
    return out.astype("<u8").tobytes()[:nbytes]


def unpack(data: bytes | memoryview, length: int, modulus_bits: int, *, words: bool = False) -> np.ndarray:
    """Inverse of :func:`pack`; ValueError on a wrong size or stray bits beyond the last value.

    ``words``: the values in the masking's word dtype (``prg.word_dtype``: uint32 up to 32 bits) instead of uint64:
    what the server adds into its running sum, at half the memory (a cnn's input unpacks to 6.6 MB, not 13 MB,
    fresh pages the server faults in for each of ten uploads arriving together)."""
    b = modulus_bits
    nbytes = check_packed_size(data, length, b)
    dtype = word_dtype(b) if words else np.dtype(np.uint64)
    if b in (8, 16, 32):
        return np.frombuffer(data, dtype=f"<u{b // 8}").astype(dtype)
    if b % 8 == 0:
        return _unpack_words(data, length, b // 8, dtype if b <= 8 * dtype.itemsize else np.uint64)
    if _pairs_fit_bytes(b):
        return _unpack_pairs(data, length, b, dtype)
    groups = -(-length // 64)
    buf = np.zeros(groups * b * 8, dtype=np.uint8)
    buf[:nbytes] = np.frombuffer(data, dtype=np.uint8)
    stream = buf.view("<u8").reshape(groups, b).astype(np.uint64)
    mask = np.uint64((1 << b) - 1)
    out = np.empty((groups, 64), dtype=np.uint64)
    for j, w, o in _layout(b):
        col = stream[:, w] >> np.uint64(o)
        if o + b > 64:
            col |= stream[:, w + 1] << np.uint64(64 - o)
        out[:, j] = col & mask
    flat = out.ravel()
    if flat[length:].any():
        raise ValueError("stray bits after the last value")
    values: np.ndarray = flat[:length].astype(dtype)
    return values
