"""The client's update pipeline after training: error feedback -> codec -> wire bytes.

One function used by the client daemon (which sends the bytes) and by the simulation (which
decodes them again, so that a simulated run sees exactly the information loss of the codec and
counts the real bytes). Encryption and signing are transport concerns and live with the HTTP
client; masking for secure aggregation will slot in between encoding and packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fl_common.tensors.codecs import Codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.tensors.wire import decode_update, pack


@dataclass
class PackedUpdate:
    data: bytes
    decoded: torch.Tensor  # what the server will reconstruct from ``data``


def pack_update(delta: torch.Tensor, codec: Codec, compression: str, *, rng: torch.Generator | None,
                error_feedback: ErrorFeedback | None = None, meta: dict[str, Any] | None = None) -> PackedUpdate:
    """Encode ``delta`` (with error feedback for biased codecs) and pack it for the wire."""
    compensated = error_feedback.compensate(delta) if error_feedback is not None else delta
    encoded = codec.encode(compensated, rng)
    decoded = codec.decode(encoded)
    if error_feedback is not None:
        error_feedback.remember(compensated, decoded)
    return PackedUpdate(pack(encoded, compression, meta), decoded)


def unpack_update(data: bytes, expected_numel: int, max_bytes: int) -> tuple[torch.Tensor, dict[str, Any]]:
    return decode_update(data, expected_numel, max_bytes)
