"""The client's update pipeline after training: error feedback -> codec -> wire bytes.

One function used by the client daemon (which sends the bytes) and by the simulation (which
decodes them again, so that a simulated run sees exactly the information loss of the codec and
counts the real bytes). Encryption and signing are transport concerns and live with the HTTP
client; masking for secure aggregation will slot in between encoding and packing.
"""

from __future__ import annotations

from typing import Any

import torch

from fl_common.tensors.codecs import Codec, EncodedUpdate
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.tensors.wire import decode_update, pack


class PackedUpdate:
    """The wire bytes of an encoded update, and (:attr:`decoded`) what the server will reconstruct from them.

    ``decoded`` is computed on first use: the simulation reads it (its server side sums it), a client daemon only
    sends ``data``, and decoding a cnn update it never reads cost it ~1 ms on the round's critical path."""

    __slots__ = ("data", "_encoded", "_codec", "_decoded")

    def __init__(self, data: bytes, encoded: EncodedUpdate, codec: Codec, decoded: torch.Tensor | None = None) -> None:
        self.data = data
        self._encoded = encoded
        self._codec = codec
        self._decoded = decoded

    @property
    def decoded(self) -> torch.Tensor:
        if self._decoded is None:
            self._decoded = self._codec.decode(self._encoded)
        return self._decoded


def pack_update(delta: torch.Tensor, codec: Codec, compression: str, *, rng: torch.Generator | None,
                error_feedback: ErrorFeedback | None = None, meta: dict[str, Any] | None = None,
                level: int | None = None) -> PackedUpdate:
    """Encode ``delta`` (with error feedback for biased codecs) and pack it for the wire (``level``: the
    compressor's, as :func:`fl_common.tensors.wire.pack` takes it; None = its default)."""
    compensated = error_feedback.compensate(delta) if error_feedback is not None else delta
    encoded = codec.encode(compensated, rng)
    decoded = None
    if error_feedback is not None:
        decoded = codec.decode(encoded)
        error_feedback.remember(compensated, decoded)
    return PackedUpdate(pack(encoded, compression, meta, level=level), encoded, codec, decoded)


def unpack_update(data: bytes, expected_numel: int, max_bytes: int) -> tuple[torch.Tensor, dict[str, Any]]:
    return decode_update(data, expected_numel, max_bytes)
