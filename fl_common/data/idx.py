"""Reader for the idx files that MNIST and Fashion-MNIST ship as.

We parse idx ourselves rather than through torchvision because the Debian package ships only the
gzipped files (torchvision wants them unpacked under ``<root>/<Class>/raw``), and because a numpy
parse is a single buffer view: no per-image PIL objects and no intermediate copies.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["IdxFormatError", "read_idx", "find_idx_file"]

# Third byte of the magic number -> element dtype (big-endian where it matters).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """The file exists but is not a well-formed idx file (truncated, wrong magic, wrong rank)."""


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem`` or ``directory/stem.gz``, preferring the plain file (no inflate cost)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    # Sniff the gzip magic instead of trusting the suffix: torchvision's raw/ folder and hand-made
    # copies both occur with misleading names, and the check costs two bytes.
    with open(path, "rb") as fh:
        head = fh.read(2)
    try:
        if head == _GZIP_MAGIC:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError on truncation
        raise IdxFormatError(f"{path}: cannot read ({exc}); the file is corrupt, re-fetch it") from None


def read_idx(path: str | os.PathLike[str], *, expect_ndim: int | None = None) -> np.ndarray:
    """Parse one idx file into an array of its declared shape.

    The header is validated against the payload length so that a truncated download fails here,
    with the file named, instead of as a reshape error deep inside training.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: only {len(raw)} bytes, too short for an idx header; the file is corrupt")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000TTNN); "
            "the file is corrupt or not an idx file"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise IdxFormatError(f"{path}: idx file has {ndim} dimensions, expected {expect_ndim}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxFormatError(f"{path}: truncated idx header ({len(raw)} bytes, need {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise IdxFormatError(
            f"{path}: idx header declares shape {dims} ({expected} bytes) but the file has {len(raw)} bytes; "
            "the file is truncated or corrupt"
        )
    # A view over the bytes object: read-only, no copy. Callers convert once into their final dtype.
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
