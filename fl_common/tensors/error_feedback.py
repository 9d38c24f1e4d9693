"""Client-side error feedback (residual memory) for biased codecs such as top-k.

Top-k drops 95-99 % of every update. Without memory the dropped mass is lost for good and small
but consistent coordinates never get through; with error feedback (Seide et al. 2014; Karimireddy
et al. 2019) the client adds what it failed to send last time to the next update, so over rounds
the *sum* of what the server receives tracks the sum of the true updates, off by at most the
current residual. Usage per round::

    compensated = ef.compensate(update)
    encoded = codec.encode(compensated, rng)
    ef.remember(compensated, codec.decode(encoded))

The residual is keyed by the model's :class:`ParamSpec`: after a model change the old residual
means nothing, so it is dropped rather than added to unrelated coordinates. It serialises to
bytes (the wire container, float32, no pickle) so a client daemon can keep it in its state dir.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from fl_common.tensors.codecs import EncodedUpdate, all_finite
from fl_common.tensors.flat import ParamSpec
from fl_common.tensors.wire import DEFAULT_MAX_BYTES, WireFormatError, pack, unpack

__all__ = ["ErrorFeedback", "spec_key"]

log = logging.getLogger(__name__)

_KIND = "fl_common.error_feedback"


def spec_key(spec: ParamSpec) -> str:
    """A short stable fingerprint of a model layout (names, shapes, dtypes, order)."""
    blob = json.dumps(spec.to_json(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class ErrorFeedback:
    """The residual ``compensated - decoded`` of the last encoded update, for one model layout."""

    def __init__(self, spec: ParamSpec) -> None:
        self.spec = spec
        self.key = spec_key(spec)
        self._residual: torch.Tensor | None = None

    @property
    def residual(self) -> torch.Tensor | None:
        """The stored residual (None until the first :meth:`remember` or after :meth:`reset`)."""
        return self._residual

    def reset(self) -> None:
        self._residual = None

    def _check_vector(self, name: str, vec: torch.Tensor) -> torch.Tensor:
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.numel() != self.spec.numel:
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"{name} must be a 1-D vector of {self.spec.numel} values, got {shape}")
        return vec.detach().to(device="cpu", dtype=torch.float32)

    def rekey(self, spec: ParamSpec) -> bool:
        """Switch to ``spec``; drops the residual if the layout changed. Returns True if it did."""
        key = spec_key(spec)
        if key == self.key:
            return False
        self.spec, self.key = spec, key
        if self._residual is not None:
            log.info("model layout changed; dropping the error-feedback residual")
        self._residual = None
        return True

    def compensate(self, update: torch.Tensor) -> torch.Tensor:
        """``update + residual`` as a new float32 vector (``update`` itself is left untouched)."""
        u = self._check_vector("update", update)
        return u.clone() if self._residual is None else u + self._residual

    def remember(self, compensated: torch.Tensor, decoded: torch.Tensor) -> None:
        """Store what the codec failed to transmit. A non-finite result is refused (ValueError)
        and the old residual kept: one NaN would otherwise poison every later round."""
        residual = self._check_vector("compensated", compensated) - self._check_vector("decoded", decoded)
        if not all_finite(residual):
            raise ValueError("error-feedback residual is not finite; refusing to store it")
        self._residual = residual.contiguous()

    def to_bytes(self) -> bytes:
        """Serialise (spec key + residual) with the wire container, zstd-compressed."""
        numel = self.spec.numel
        residual = torch.zeros(numel) if self._residual is None else self._residual
        encoded = EncodedUpdate("none", numel, {"values": residual})
        return pack(encoded, "zstd", {"kind": _KIND, "spec_key": self.key, "empty": self._residual is None})

    @classmethod
    def from_bytes(cls, data: bytes, spec: ParamSpec) -> ErrorFeedback:
        """Restore state saved by :meth:`to_bytes` for model ``spec``. A residual saved for a
        different layout is dropped (fresh instance); corrupt data raises WireFormatError."""
        ef = cls(spec)
        # A state file written for a bigger, older model must still parse (and then be dropped).
        encoded, meta = unpack(data, max_bytes=max(DEFAULT_MAX_BYTES, 4 * spec.numel + (1 << 16)))
        if meta.get("kind") != _KIND:
            raise WireFormatError("not an error-feedback state blob")
        if meta.get("spec_key") != ef.key or encoded.numel != spec.numel:
            log.info("saved error-feedback residual is for another model layout; starting fresh")
            return ef
        if not meta.get("empty", False):
            ef._residual = encoded.arrays["values"].clone()
        return ef
