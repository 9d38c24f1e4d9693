"""state_dict <-> one flat float32 vector.

Every algorithm in the core (aggregation, clipping, noise, masking, codecs) works on one
contiguous vector per update: an L2 norm or a weighted sum is then a single BLAS call, and the
wire format is one array plus a small spec. The spec (names, shapes, dtypes, in order) is what
makes a vector meaningful again, so it travels with the model and is checked on every upload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "int64"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ParamSpec:
    """The ordered layout of a model's state in a flat vector."""

    entries: tuple[ParamEntry, ...]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype} for e in self.entries]

    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> ParamSpec:
        return cls(tuple(ParamEntry(str(i["name"]), tuple(int(s) for s in i["shape"]), str(i["dtype"])) for i in items))


def spec_of(state: Mapping[str, torch.Tensor]) -> ParamSpec:
    """Layout of a state_dict, in its own key order (which torch keeps stable per model class)."""
    return ParamSpec(
        tuple(ParamEntry(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items())
    )


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All entries of ``state`` as one float32 vector (integer buffers such as BatchNorm's
    ``num_batches_tracked`` are carried as floats; they are small counts, exact in float32)."""
    if not state:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([v.detach().reshape(-1).to(torch.float32) for v in state.values()])


def unflatten(vector: torch.Tensor, spec: ParamSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`; refuses a vector whose length does not match the spec."""
    if vector.dim() != 1 or vector.numel() != spec.numel:
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not match a spec of {spec.numel} values")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for e in spec.entries:
        chunk = vector[offset : offset + e.numel].reshape(e.shape)
        dtype = getattr(torch, e.dtype)
        out[e.name] = chunk.round().to(dtype) if not dtype.is_floating_point else chunk.to(dtype).clone()
        offset += e.numel
    return out
