"""The byte encodings of the CKKS round's messages, parsed strictly (every length checked) because
each of them crosses the network:

* :class:`PublicKey` - the decryptor's public CKKS context (no secret key: refused if it has one);
* :class:`EncryptedInput` - one client's ciphertexts;
* :class:`EncryptedSum` - the server's sum of the inputs, sent to the decryptor;
* :class:`DecryptedSum` - the decryptor's answer: the slot values of the sum (float64).

Frame: ``b"FLHE"``, a kind byte, the round (u32), the sender (u16 length + UTF-8), a part count
(u32), then each part (u32 length + bytes). Signing and encryption are the transport's job
(HMAC + Fernet in REST), exactly as for the masking protocol's messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"FLHE"
KIND_PUBLIC_KEY, KIND_INPUT, KIND_SUM, KIND_DECRYPTED = 1, 2, 3, 4
#: no single part may exceed this (a serialized N=32768 ciphertext is ~2 MB)
MAX_PART_BYTES = 64 << 20
MAX_PARTS = 100_000


class HEMessageError(ValueError):
    """Bytes that are not a well-formed message of the expected kind."""


def _frame(kind: int, round_number: int, sender: str, parts: list[bytes]) -> bytes:
    name = sender.encode()
    out = [MAGIC, struct.pack(">BIH", kind, round_number, len(name)), name, struct.pack(">I", len(parts))]
    for p in parts:
        out += [struct.pack(">I", len(p)), p]
    return b"".join(out)


def _unframe(data: bytes, kind: int) -> tuple[int, str, list[bytes]]:
    view = memoryview(data)
    if len(view) < 15 or bytes(view[:4]) != MAGIC:
        raise HEMessageError("not a CKKS message (bad magic or too short)")
    got, round_number, name_len = struct.unpack_from(">BIH", view, 4)
    if got != kind:
        raise HEMessageError(f"expected CKKS message kind {kind}, got {got}")
    at = 11
    if at + name_len + 4 > len(view):
        raise HEMessageError("truncated CKKS message header")
    try:
        sender = bytes(view[at:at + name_len]).decode()
    except UnicodeDecodeError:
        raise HEMessageError("CKKS message sender is not UTF-8") from None
    at += name_len
    (count,) = struct.unpack_from(">I", view, at)
    at += 4
    if count > MAX_PARTS:
        raise HEMessageError(f"CKKS message claims {count} parts (at most {MAX_PARTS})")
    parts: list[bytes] = []
    for _ in range(count):
        if at + 4 > len(view):
            raise HEMessageError("truncated CKKS message")
        (n,) = struct.unpack_from(">I", view, at)
        at += 4
        if n > MAX_PART_BYTES or at + n > len(view):
            raise HEMessageError("truncated or oversized CKKS message part")
        parts.append(bytes(view[at:at + n]))
        at += n
    if at != len(view):
        raise HEMessageError(f"{len(view) - at} trailing bytes after the CKKS message")
    return round_number, sender, parts


@dataclass(frozen=True)
class PublicKey:
    """The decryptor's public context (TenSEAL serialization, public key only)."""

    round: int
    sender: str
    context: bytes

    def to_bytes(self) -> bytes:
        return _frame(KIND_PUBLIC_KEY, self.round, self.sender, [self.context])

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKey:
        r, s, parts = _unframe(data, KIND_PUBLIC_KEY)
        if len(parts) != 1:
            raise HEMessageError(f"a CKKS public key has one part, got {len(parts)}")
        return cls(r, s, parts[0])


@dataclass(frozen=True)
class EncryptedInput:
    """One client's update as ciphertexts (one per chunk of N/2 slots)."""

    round: int
    sender: str
    ciphertexts: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        return _frame(KIND_INPUT, self.round, self.sender, list(self.ciphertexts))

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedInput:
        r, s, parts = _unframe(data, KIND_INPUT)
        return cls(r, s, tuple(parts))

    def wire_size(self) -> int:
        return sum(len(c) + 4 for c in self.ciphertexts) + 15 + len(self.sender.encode())


@dataclass(frozen=True)
class EncryptedSum:
    """The server's sum of ``count`` inputs, for the decryptor."""

    round: int
    count: int
    ciphertexts: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        return _frame(KIND_SUM, self.round, str(self.count), list(self.ciphertexts))

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedSum:
        r, s, parts = _unframe(data, KIND_SUM)
        if not s.isdigit():
            raise HEMessageError(f"CKKS sum count {s!r} is not a number")
        return cls(r, int(s), tuple(parts))


@dataclass(frozen=True)
class DecryptedSum:
    """The decrypted slot values of the sum (float64, ``plain_length`` of the round)."""

    round: int
    sender: str
    values: np.ndarray

    def to_bytes(self) -> bytes:
        return _frame(KIND_DECRYPTED, self.round, self.sender, [np.ascontiguousarray(self.values, dtype="<f8").tobytes()])

    @classmethod
    def from_bytes(cls, data: bytes) -> DecryptedSum:
        r, s, parts = _unframe(data, KIND_DECRYPTED)
        if len(parts) != 1 or len(parts[0]) % 8:
            raise HEMessageError("a decrypted CKKS sum is one part of float64 values")
        values = np.frombuffer(parts[0], dtype="<f8").astype(np.float64)
        if not np.isfinite(values).all():
            raise HEMessageError("the decrypted CKKS sum has non-finite values")
        return cls(r, s, values)


__all__ = ["MAX_PART_BYTES", "DecryptedSum", "EncryptedInput", "EncryptedSum", "HEMessageError", "PublicKey"]
