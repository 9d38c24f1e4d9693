"""The SecAgg round's public parameters and its messages, as transport-free dataclasses.

Every message has ``to_bytes()`` / ``from_bytes()`` so a transport only moves bytes: the small
ones are canonical JSON (``application/json``), the masked input is a short JSON header followed
by the packed field elements (``application/octet-stream``). ``from_bytes`` checks types, sizes
and ranges and raises :class:`MalformedMessage` (never a bare ``KeyError``/``ValueError``), so a
server can answer a 4xx for anything a client can send.

Flow of one round (server S, client u; indices 1..n are the Shamir x-coordinates):

====  ==================  =============================================================
 0    u -> S              :class:`AdvertiseKeys` (c_pk, s_pk, signed)
      S -> u              :class:`RosterMessage` (everyone's keys + signatures)
 1    u -> S              :class:`ShareKeys` (encrypted shares of b_u and s_sk_u, one per neighbour)
      S -> u              :class:`ShareBundle` (the ciphertexts addressed to u, and U2)
 2    u -> S              :class:`MaskedInput` (y_u, packed)
      S -> u              :class:`ConsistencyCheck` (U3 = survivors, U2 \\ U3 = dropped)
 3    u -> S              :class:`ConsistencySignature` (u's signature on that set, bound to round and attempt)
      S -> u              :class:`UnmaskRequest` (the same set, and every survivor's signature on it)
 4    u -> S              :class:`UnmaskResponse` (shares of b_v for survivors, of s_sk_v for dropped)
====  ==================  =============================================================

Every client message is signed (see ``auth.py``) over a domain-separated byte string that binds
the round's parameter digest, so a message cannot be replayed into another round or phase.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fl_common.secagg.auth import AUTH_SCHEMES, ED25519
from fl_common.secagg.field import MAX_MODULUS_BITS, required_modulus_bits
from fl_common.secagg.shamir import SHARE_LEN

__all__ = [
    "PROTOCOL_VERSION",
    "SecAggError",
    "MalformedMessage",
    "SecAggRefused",
    "SecAggRejected",
    "SecAggAborted",
    "Segment",
    "SecAggParams",
    "AdvertiseKeys",
    "RosterEntry",
    "RosterMessage",
    "ShareKeys",
    "ShareBundle",
    "MaskedInput",
    "ConsistencyCheck",
    "ConsistencySignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "CIPHERTEXT_LEN",
    "KEY_LEN",
    "payload_bytes",
]

PROTOCOL_VERSION = 1
KEY_LEN = 32
#: AES-GCM nonce (12) + plaintext (sender 4, recipient 4, two shares) + tag (16)
CIPHERTEXT_LEN = 12 + 8 + 2 * SHARE_LEN + 16
COMMITMENT_LEN = 32
MAX_SIGNATURE_LEN = 64
_MAGIC = b"FLSA1\n"
_MAX_HEADER = 1 << 20
SEGMENT_NAMES = ("delta", "control", "weight", "count", "loss", "clipped", "unclipped")


class SecAggError(Exception):
    """Base class; ``code`` is machine readable and safe to return to a client (no secrets in messages)."""

    code = "secagg_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MalformedMessage(SecAggError):
    """Bytes that do not decode to a well-formed message (HTTP: 400)."""

    code = "malformed"


class SecAggRefused(SecAggError):
    """Client side: the client refuses to go on, because continuing would break its privacy or the
    protocol (e.g. asked for both shares of one peer, a roster with a bad signature)."""

    code = "refused"


class SecAggRejected(SecAggError):
    """Server side: a client message was refused. ``dropped`` says whether the sender is now treated as
    dropped for this round (HTTP: 4xx either way; 409 for a wrong phase, 400/403 otherwise)."""

    def __init__(self, message: str, code: str, *, dropped: bool) -> None:
        super().__init__(message, code)
        self.dropped = dropped


class SecAggAborted(SecAggError):
    """The round was aborted (too few survivors, unrecoverable secret): nothing is released."""

    code = "aborted"


# --------------------------------------------------------------------------- helpers
def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _b64d(text: Any, what: str, length: int | None = None, *, max_len: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise MalformedMessage(f"{what} must be a base64 string")
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedMessage(f"{what} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise MalformedMessage(f"{what} must be {length} bytes")
    if max_len is not None and len(raw) > max_len:
        raise MalformedMessage(f"{what} is longer than {max_len} bytes")
    return raw


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**32 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MalformedMessage(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _index_list(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise MalformedMessage(f"{what} must be a list")
    out = tuple(_int(v, what, 1) for v in value)
    if len(set(out)) != len(out):
        raise MalformedMessage(f"{what} has duplicates")
    return out


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _json_load(data: bytes, kind: str) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"{kind}: expected bytes")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedMessage(f"{kind}: not valid JSON") from None
    if not isinstance(obj, dict) or obj.get("type") != kind:
        raise MalformedMessage(f"expected a {kind} message")
    if obj.get("v") != PROTOCOL_VERSION:
        raise MalformedMessage(f"{kind}: unsupported protocol version {obj.get('v')!r}")
    return obj


def _u32(i: int) -> bytes:
    return int(i).to_bytes(4, "big")


def _pairs(value: Any, what: str, length: int) -> tuple[tuple[int, bytes], ...]:
    """[[index, base64], ...] -> ((index, raw), ...); duplicates are kept (the server must see them)."""
    if not isinstance(value, list):
        raise MalformedMessage(f"{what} must be a list")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2):
            raise MalformedMessage(f"{what} entries must be [index, data] pairs")
        out.append((_int(item[0], what, 1), _b64d(item[1], what, length)))
    return tuple(out)


def payload_bytes(length: int, modulus_bits: int) -> int:
    """Bytes of a packed masked vector: ``length`` values of b bits each, as one bit stream (the values
    are uniform in Z_{2^b}, so no codec can do better than b bits)."""
    return (length * modulus_bits + 7) // 8


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Segment:
    """A slice of the masked vector with its own encoding.

    ``bound``: every value must satisfy |v| <= bound before encoding (checked, never silently
    wrapped); ``scale_bits``: fixed-point precision 2^-scale_bits (0 for integer counters);
    ``l2_clip``: the L2 norm the client clips this slice to first (None: no clipping, e.g. an
    update that already carries its distributed DP noise, which clipping would shrink).
    """

    name: str
    length: int
    bound: float
    scale_bits: int
    l2_clip: float | None = None

    def __post_init__(self) -> None:
        if self.name not in SEGMENT_NAMES:
            raise ValueError(f"unknown segment {self.name!r}: allowed {', '.join(SEGMENT_NAMES)}")
        if self.length < 1:
            raise ValueError("a segment has at least one value")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError("segment bound must be a positive finite number")
        if self.l2_clip is not None and not (math.isfinite(self.l2_clip) and 0 < self.l2_clip <= self.bound):
            raise ValueError("segment l2_clip must be in (0, bound]")

    def to_json(self) -> list[Any]:
        return [self.name, self.length, self.bound, self.scale_bits, self.l2_clip]

    @classmethod
    def from_json(cls, data: Any) -> Segment:
        if not (isinstance(data, list) and len(data) == 5):
            raise MalformedMessage("segment must be [name, length, bound, scale_bits, l2_clip]")
        name, length, bound, scale, clip = data
        try:
            return cls(str(name), _int(length, "segment length", 1, 2**40), float(bound), _int(scale, "scale_bits", 0, 52),
                       None if clip is None else float(clip))
        except (TypeError, ValueError) as exc:
            raise MalformedMessage(f"bad segment: {exc}") from None


@dataclass(frozen=True)
class SecAggParams:
    """Everything public about one round, fixed by the server before the first message.

    ``client_ids[i]`` is the driver's id of the client with SecAgg index ``i + 1``. ``degree`` is
    the SecAgg+ neighbour count (>= n - 1: the complete graph, classic SecAgg). Each client's two
    secrets are Shamir-shared among itself and its neighbours with threshold ``threshold``; it
    must be a strict majority of those ``degree + 1`` holders (see :meth:`validate`).
    ``weighted``: vector segments carry ``(weight / weight_bound) * x`` (FedAvg's n_k / W) and the
    ``weight`` segment carries the integer weight, so the server can form a weighted mean.
    """

    session: bytes
    round: int
    client_ids: tuple[str, ...]
    threshold: int
    degree: int
    modulus_bits: int
    segments: tuple[Segment, ...]
    weight_bound: int = 1
    weighted: bool = False
    auth: str = ED25519
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n(self) -> int:
        return len(self.client_ids)

    @property
    def indices(self) -> range:
        return range(1, self.n + 1)

    @property
    def vector_length(self) -> int:
        return sum(s.length for s in self.segments)

    def segment(self, name: str) -> Segment | None:
        for s in self.segments:
            if s.name == name:
                return s
        return None

    def max_holders(self) -> int:
        return min(self.degree, self.n - 1) + 1

    def tolerated_corrupt(self) -> int:
        """Colluding share holders per client the round withstands against a server that lies about who dropped:
        the largest c with 2t > h + c (h = :meth:`max_holders`; Bonawitz et al. 2017, active adversary).

        Why: an honest holder reveals one kind of share of a client, for the one set it signed, and only once t
        holders signed that set; a server that shows two sets (target alive / target dropped) needs t shares of
        each, i.e. t - c honest holders in each group, 2(t - c) <= h - c. So c = 2t - h - 1 colluders are safe;
        in the complete graph that is the fraction (2t - n - 1)/n of all clients (t = floor(2n/3) + 1: about a third)."""
        return max(0, 2 * self.threshold - self.max_holders() - 1)

    def validate(self) -> None:
        """Refuse parameters that would be insecure or could not decode; clients call this too, so
        a server cannot talk them into a threshold that lets it collect both kinds of share."""
        if not isinstance(self.session, (bytes, bytearray)) or not 16 <= len(self.session) <= 64:
            raise ValueError("session must be 16..64 bytes")
        if self.version != PROTOCOL_VERSION:
            raise ValueError(f"unsupported secagg protocol version {self.version}")
        if self.n < 3:
            raise ValueError("secure aggregation needs at least 3 clients")
        if len(set(self.client_ids)) != self.n or not all(isinstance(c, str) and c for c in self.client_ids):
            raise ValueError("client ids must be distinct non-empty strings")
        if self.auth not in AUTH_SCHEMES:
            raise ValueError(f"unknown auth scheme {self.auth!r}")
        if self.degree < 2:
            raise ValueError("degree must be >= 2")
        if self.degree < self.n - 1 and self.degree % 2:
            raise ValueError("a SecAgg+ degree below n - 1 must be even")
        holders = self.max_holders()
        if not 2 <= self.threshold <= holders - 1:
            raise ValueError(f"threshold must be in [2, {holders - 1}] (a dropped client's key is rebuilt from its "
                             f"neighbours alone)")
        if 2 * self.threshold <= holders:
            raise ValueError(f"threshold {self.threshold} is not a strict majority of the {holders} share holders: "
                             f"a server lying about who dropped could collect both shares of a client")
        if not 1 <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise ValueError(f"modulus_bits must be in [1, {MAX_MODULUS_BITS}]")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names) or "delta" not in names or "count" not in names:
            raise ValueError("segments must be distinct and include 'delta' and 'count'")
        if self.weight_bound < 1:
            raise ValueError("weight_bound must be >= 1")
        weight = self.segment("weight")
        if weight is not None and (weight.bound != self.weight_bound or weight.scale_bits != 0):
            raise ValueError("the weight segment is an integer bounded by weight_bound")
        if self.weighted and weight is None:
            raise ValueError("a weighted round needs a weight segment")
        for s in self.segments:
            if required_modulus_bits(s.bound, s.scale_bits, self.n) > self.modulus_bits:
                raise ValueError(f"modulus_bits={self.modulus_bits} cannot hold the sum of {self.n} values of segment "
                                 f"{s.name!r}")

    def to_json(self) -> dict[str, Any]:
        return {"type": "secagg_params", "v": self.version, "session": _b64e(bytes(self.session)), "round": self.round,
                "client_ids": list(self.client_ids), "threshold": self.threshold, "degree": self.degree,
                "modulus_bits": self.modulus_bits, "segments": [s.to_json() for s in self.segments],
                "weight_bound": self.weight_bound, "weighted": self.weighted, "auth": self.auth}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecAggParams:
        if not isinstance(data, Mapping) or data.get("type") != "secagg_params":
            raise MalformedMessage("expected secagg_params")
        try:
            segs = data["segments"]
            if not isinstance(segs, list):
                raise MalformedMessage("segments must be a list")
            ids = data["client_ids"]
            if not isinstance(ids, list):
                raise MalformedMessage("client_ids must be a list")
            return cls(session=_b64d(data["session"], "session", max_len=64), round=_int(data["round"], "round"),
                       client_ids=tuple(str(c) for c in ids), threshold=_int(data["threshold"], "threshold"),
                       degree=_int(data["degree"], "degree"), modulus_bits=_int(data["modulus_bits"], "modulus_bits"),
                       segments=tuple(Segment.from_json(s) for s in segs),
                       weight_bound=_int(data.get("weight_bound", 1), "weight_bound", 1, 2**40),
                       weighted=bool(data.get("weighted", False)), auth=str(data.get("auth", ED25519)),
                       version=_int(data.get("v"), "version"))
        except KeyError as exc:
            raise MalformedMessage(f"secagg_params lacks {exc}") from None
        except ValueError as exc:
            if isinstance(exc, MalformedMessage):
                raise
            raise MalformedMessage(f"invalid secagg parameters: {exc}") from None

    def to_bytes(self) -> bytes:
        return _canonical(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggParams:
        try:
            obj = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MalformedMessage("secagg_params: not valid JSON") from None
        return cls.from_json(obj)

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding: bound into every signature, AEAD and mask of the round."""
        return hashlib.sha256(b"fl-hub/v1/secagg/params|" + self.to_bytes()).digest()


# --------------------------------------------------------------------------- phase 0
@dataclass(frozen=True)
class AdvertiseKeys:
    """u's two fresh X25519 public keys: ``c_pk`` (share encryption) and ``s_pk`` (pairwise masks)."""

    sender: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes

    @staticmethod
    def signing_bytes(params_digest: bytes, sender: int, c_pk: bytes, s_pk: bytes) -> bytes:
        return b"fl-hub/v1/secagg/advertise|" + params_digest + _u32(sender) + c_pk + s_pk

    def to_bytes(self) -> bytes:
        return _canonical({"type": "advertise_keys", "v": PROTOCOL_VERSION, "sender": self.sender,
                           "c_pk": _b64e(self.c_pk), "s_pk": _b64e(self.s_pk), "sig": _b64e(self.signature)})

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        o = _json_load(data, "advertise_keys")
        try:
            return cls(_int(o["sender"], "sender", 1), _b64d(o["c_pk"], "c_pk", KEY_LEN), _b64d(o["s_pk"], "s_pk", KEY_LEN),
                       _b64d(o["sig"], "signature", max_len=MAX_SIGNATURE_LEN))
        except KeyError as exc:
            raise MalformedMessage(f"advertise_keys lacks {exc}") from None


@dataclass(frozen=True)
class RosterEntry:
    index: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes
    verify_key: bytes = b""  # Ed25519: the signer's registered verifying key; HMAC: empty

    def to_json(self) -> list[Any]:
        return [self.index, _b64e(self.c_pk), _b64e(self.s_pk), _b64e(self.signature), _b64e(self.verify_key)]

    @classmethod
    def from_json(cls, data: Any) -> RosterEntry:
        if not (isinstance(data, list) and len(data) == 5):
            raise MalformedMessage("roster entry must be [index, c_pk, s_pk, sig, verify_key]")
        return cls(_int(data[0], "index", 1), _b64d(data[1], "c_pk", KEY_LEN), _b64d(data[2], "s_pk", KEY_LEN),
                   _b64d(data[3], "signature", max_len=MAX_SIGNATURE_LEN), _b64d(data[4], "verify_key", max_len=KEY_LEN))


@dataclass(frozen=True)
class RosterMessage:
    """U1 with everyone's keys, as the server forwards it to one client (``server_tag``: HMAC mode only)."""

    entries: tuple[RosterEntry, ...]
    server_tag: bytes = b""

    @property
    def members(self) -> tuple[int, ...]:
        return tuple(e.index for e in self.entries)

    def digest(self, params_digest: bytes) -> bytes:
        h = hashlib.sha256(b"fl-hub/v1/secagg/roster|" + params_digest)
        for e in self.entries:
            h.update(_u32(e.index) + e.c_pk + e.s_pk + _u32(len(e.signature)) + e.signature
                     + _u32(len(e.verify_key)) + e.verify_key)
        return h.digest()

    def graph_seed(self, params_digest: bytes) -> bytes:
        """Seed of the SecAgg+ ring order: a hash of the parameters and of every advertised key, so the
        server cannot pick it after seeing who advertised (see graph.py) and every client recomputes it."""
        h = hashlib.sha256(b"fl-hub/v1/secagg/graph-seed|" + params_digest)
        for e in self.entries:
            h.update(_u32(e.index) + e.c_pk + e.s_pk)
        return h.digest()

    def to_bytes(self) -> bytes:
        return _canonical({"type": "roster", "v": PROTOCOL_VERSION, "entries": [e.to_json() for e in self.entries],
                           "tag": _b64e(self.server_tag)})

    @classmethod
    def from_bytes(cls, data: bytes) -> RosterMessage:
        o = _json_load(data, "roster")
        try:
            entries = o["entries"]
            if not isinstance(entries, list):
                raise MalformedMessage("roster entries must be a list")
            return cls(tuple(RosterEntry.from_json(e) for e in entries), _b64d(o["tag"], "tag", max_len=64))
        except KeyError as exc:
            raise MalformedMessage(f"roster lacks {exc}") from None


# --------------------------------------------------------------------------- phase 1
@dataclass(frozen=True)
class ShareKeys:
    """u's encrypted share pairs, one ciphertext per neighbour, plus a commitment to its self-mask seed
    (SHA-256, so the server can tell a correctly rebuilt b_u from one rebuilt from tampered shares)."""

    sender: int
    ciphertexts: tuple[tuple[int, bytes], ...]  # (recipient, AES-GCM ciphertext)
    commitment: bytes
    signature: bytes

    @staticmethod
    def signing_bytes(params_digest: bytes, sender: int, ciphertexts: Sequence[tuple[int, bytes]], commitment: bytes) -> bytes:
        h = hashlib.sha256()
        for recipient, ct in ciphertexts:
            h.update(_u32(recipient) + _u32(len(ct)) + ct)
        return b"fl-hub/v1/secagg/share-keys|" + params_digest + _u32(sender) + commitment + h.digest()

    def to_bytes(self) -> bytes:
        return _canonical({"type": "share_keys", "v": PROTOCOL_VERSION, "sender": self.sender,
                           "cts": [[r, _b64e(c)] for r, c in self.ciphertexts], "commitment": _b64e(self.commitment),
                           "sig": _b64e(self.signature)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeys:
        o = _json_load(data, "share_keys")
        try:
            return cls(_int(o["sender"], "sender", 1), _pairs(o["cts"], "ciphertexts", CIPHERTEXT_LEN),
                       _b64d(o["commitment"], "commitment", COMMITMENT_LEN),
                       _b64d(o["sig"], "signature", max_len=MAX_SIGNATURE_LEN))
        except KeyError as exc:
            raise MalformedMessage(f"share_keys lacks {exc}") from None


@dataclass(frozen=True)
class ShareBundle:
    """What u receives in phase 2: U2 (who shared keys) and the ciphertexts its neighbours in U2 addressed to it."""

    recipient: int
    survivors: tuple[int, ...]
    ciphertexts: tuple[tuple[int, bytes], ...]  # (sender, ciphertext)

    def to_bytes(self) -> bytes:
        return _canonical({"type": "share_bundle", "v": PROTOCOL_VERSION, "recipient": self.recipient,
                           "survivors": list(self.survivors), "cts": [[s, _b64e(c)] for s, c in self.ciphertexts]})

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        o = _json_load(data, "share_bundle")
        try:
            return cls(_int(o["recipient"], "recipient", 1), _index_list(o["survivors"], "survivors"),
                       _pairs(o["cts"], "ciphertexts", CIPHERTEXT_LEN))
        except KeyError as exc:
            raise MalformedMessage(f"share_bundle lacks {exc}") from None


# --------------------------------------------------------------------------- phase 2
@dataclass(frozen=True)
class MaskedInput:
    """y_u packed as a b-bit little-endian bit stream (``payload_bytes``), and the senders whose ciphertext to u
    failed authentication (u never used those shares; the server records it)."""

    sender: int
    #: bytes, or a read-only view into the bytes the message was decoded from (:meth:`from_bytes`: a cnn's masked
    #: input is 5 MB, and the server's upload route would otherwise copy it twice more before unpacking it)
    payload: bytes | memoryview
    rejected: tuple[int, ...]
    signature: bytes
    payload_sha256: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not self.payload_sha256:
            object.__setattr__(self, "payload_sha256", hashlib.sha256(self.payload).digest())

    @staticmethod
    def signing_bytes(params_digest: bytes, sender: int, payload_sha256: bytes, rejected: Sequence[int]) -> bytes:
        return (b"fl-hub/v1/secagg/masked-input|" + params_digest + _u32(sender) + payload_sha256
                + _u32(len(rejected)) + b"".join(_u32(r) for r in rejected))

    def _header(self) -> bytes:
        return _canonical({"type": "masked_input", "v": PROTOCOL_VERSION, "sender": self.sender,
                           "rejected": list(self.rejected), "sig": _b64e(self.signature), "length": len(self.payload)})

    def wire_size(self) -> int:
        return len(_MAGIC) + 4 + len(self._header()) + len(self.payload)

    def to_bytes(self) -> bytes:
        header = self._header()
        return _MAGIC + struct.pack(">I", len(header)) + header + self.payload

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> MaskedInput:
        """The message in ``data``; its payload is a view into ``data`` (immutable: bytes or a read-only view;
        anything writable is copied first, so the payload cannot change under the digest taken of it)."""
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and data.readonly and data.contiguous):
            data = bytes(data)
        view = memoryview(data).cast("B")
        start = len(_MAGIC) + 4
        if len(view) < start or bytes(view[:len(_MAGIC)]) != _MAGIC:
            raise MalformedMessage("masked_input: bad magic")
        (hlen,) = struct.unpack(">I", view[len(_MAGIC):start])
        if hlen > _MAX_HEADER or start + hlen > len(view):
            raise MalformedMessage("masked_input: bad header length")
        o = _json_load(bytes(view[start:start + hlen]), "masked_input")
        payload = view[start + hlen:]
        try:
            if _int(o["length"], "length", 0, 2**40) != len(payload):
                raise MalformedMessage("masked_input: payload length does not match the header")
            return cls(_int(o["sender"], "sender", 1), payload, _index_list(o["rejected"], "rejected"),
                       _b64d(o["sig"], "signature", max_len=MAX_SIGNATURE_LEN))
        except KeyError as exc:
            raise MalformedMessage(f"masked_input lacks {exc}") from None


# --------------------------------------------------------------------------- phase 3 (consistency check)
def _set_bytes(survivors: Sequence[int], dropped: Sequence[int]) -> bytes:
    return (_u32(len(survivors)) + b"".join(_u32(i) for i in survivors)
            + _u32(len(dropped)) + b"".join(_u32(i) for i in dropped))


def _check_set(survivors: tuple[int, ...], dropped: tuple[int, ...], kind: str) -> None:
    """Sets travel sorted and disjoint: one canonical byte string per set, so that one signature means one set."""
    if list(survivors) != sorted(survivors) or list(dropped) != sorted(dropped):
        raise MalformedMessage(f"{kind}: survivors and dropped must be sorted")


@dataclass(frozen=True)
class ConsistencyCheck:
    """S -> u in the consistency-check phase (Bonawitz et al. 2017, the round added against an active server):
    the set of clients whose masked input the server holds (U3, ``survivors``) and those that shared keys but
    sent none (U2 \\ U3, ``dropped``). Every survivor signs it; the unmask request later carries the signatures."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_set(self.survivors, self.dropped, "consistency_check")

    @staticmethod
    def signing_bytes(params_digest: bytes, session: bytes, round_number: int, signer: int, survivors: Sequence[int],
                      dropped: Sequence[int]) -> bytes:
        """What a survivor signs: the set, bound to the round, the attempt (its fresh session id) and the signer.
        (The parameter digest binds both too; they are repeated so the binding is visible where it is checked.)"""
        return (b"fl-hub/v1/secagg/consistency|" + params_digest + _u32(len(session)) + bytes(session)
                + _u32(round_number) + _u32(signer) + _set_bytes(survivors, dropped))

    def to_bytes(self) -> bytes:
        return _canonical({"type": "consistency_check", "v": PROTOCOL_VERSION, "survivors": list(self.survivors),
                           "dropped": list(self.dropped)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencyCheck:
        o = _json_load(data, "consistency_check")
        try:
            return cls(_index_list(o["survivors"], "survivors"), _index_list(o["dropped"], "dropped"))
        except KeyError as exc:
            raise MalformedMessage(f"consistency_check lacks {exc}") from None


@dataclass(frozen=True)
class ConsistencySignature:
    """u -> S: u's signature on the one set it was shown (a client signs at most one set per attempt)."""

    sender: int
    signature: bytes

    def to_bytes(self) -> bytes:
        return _canonical({"type": "consistency_signature", "v": PROTOCOL_VERSION, "sender": self.sender,
                           "sig": _b64e(self.signature)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencySignature:
        o = _json_load(data, "consistency_signature")
        try:
            return cls(_int(o["sender"], "sender", 1), _b64d(o["sig"], "signature", max_len=MAX_SIGNATURE_LEN))
        except KeyError as exc:
            raise MalformedMessage(f"consistency_signature lacks {exc}") from None


# --------------------------------------------------------------------------- phase 4 (unmask)
@dataclass(frozen=True)
class UnmaskRequest:
    """U3 (their masked inputs are in the sum: reveal shares of their self-mask seeds) and U2 \\ U3
    (shared keys but sent no input: reveal shares of their mask keys), with the survivors' signatures on
    exactly this set from the consistency check (``signatures``: (signer, signature), by signer). A client
    answers only the set it signed itself, and only with at least t valid signatures from its share holders;
    the two sets are disjoint, or clients refuse."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        _check_set(self.survivors, self.dropped, "unmask_request")

    def to_bytes(self) -> bytes:
        return _canonical({"type": "unmask_request", "v": PROTOCOL_VERSION, "survivors": list(self.survivors),
                           "dropped": list(self.dropped), "sigs": [[i, _b64e(s)] for i, s in self.signatures]})

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        o = _json_load(data, "unmask_request")
        try:
            sigs = o["sigs"]
            if not isinstance(sigs, list):
                raise MalformedMessage("signatures must be a list")
            pairs = []
            for item in sigs:
                if not (isinstance(item, list) and len(item) == 2):
                    raise MalformedMessage("signatures must be [index, signature] pairs")
                pairs.append((_int(item[0], "signer", 1), _b64d(item[1], "signature", max_len=MAX_SIGNATURE_LEN)))
            return cls(_index_list(o["survivors"], "survivors"), _index_list(o["dropped"], "dropped"), tuple(pairs))
        except KeyError as exc:
            raise MalformedMessage(f"unmask_request lacks {exc}") from None


@dataclass(frozen=True)
class UnmaskResponse:
    sender: int
    self_shares: tuple[tuple[int, bytes], ...]  # (owner v in U3, Shamir share of b_v)
    key_shares: tuple[tuple[int, bytes], ...]  # (owner v in U2 \ U3, Shamir share of s_sk_v)
    signature: bytes

    @staticmethod
    def signing_bytes(params_digest: bytes, sender: int, self_shares: Sequence[tuple[int, bytes]],
                      key_shares: Sequence[tuple[int, bytes]]) -> bytes:
        body = b"".join(_u32(v) + s for v, s in self_shares) + b"|" + b"".join(_u32(v) + s for v, s in key_shares)
        return b"fl-hub/v1/secagg/unmask|" + params_digest + _u32(sender) + hashlib.sha256(body).digest()

    def to_bytes(self) -> bytes:
        return _canonical({"type": "unmask_response", "v": PROTOCOL_VERSION, "sender": self.sender,
                           "self": [[v, _b64e(s)] for v, s in self.self_shares],
                           "key": [[v, _b64e(s)] for v, s in self.key_shares], "sig": _b64e(self.signature)})

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        o = _json_load(data, "unmask_response")
        try:
            return cls(_int(o["sender"], "sender", 1), _pairs(o["self"], "self shares", SHARE_LEN),
                       _pairs(o["key"], "key shares", SHARE_LEN), _b64d(o["sig"], "signature", max_len=MAX_SIGNATURE_LEN))
        except KeyError as exc:
            raise MalformedMessage(f"unmask_response lacks {exc}") from None
