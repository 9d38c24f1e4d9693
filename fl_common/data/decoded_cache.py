"""Decoded idx files kept as ``.npy`` beside each other, so a process maps them instead of inflating them.

Fashion-MNIST ships gzipped (26 MB for the training images); inflating and parsing it costs a client daemon
about 0.3 s of CPU, and every daemon of a demo did it again. The decoded array is written once to a cache
folder as a ``.npy`` file and later opened memory-mapped: no inflate, no copy, and the page cache holds one
copy of the 47 MB of pixels for every process on the machine (50 daemons on one host share it).

The cache holds public data only (the idx files' own bytes, decoded), never a client's shard or anything
derived from its secrets. A cache entry is named after the source file's resolved path, size and
modification time, so a replaced source file is decoded anew; an entry that cannot be read (truncated,
or written by a process killed midway: entries are written to a temporary file and renamed, so this takes
a crash of the disk) is decoded again and rewritten. A cache folder that cannot be written is not an error:
the file is then parsed as before.

Where: ``$FL_DATA_CACHE_DIR`` when set (``off`` turns the cache off), else ``~/.cache/fl_common/decoded``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from fl_common.data.idx import read_idx

__all__ = ["ENV_DATA_CACHE_DIR", "CACHE_OFF", "default_cache_dir", "decoded_idx"]

log = logging.getLogger(__name__)

#: environment variable naming the cache folder (``off``: no cache)
ENV_DATA_CACHE_DIR = "FL_DATA_CACHE_DIR"
CACHE_OFF = "off"


def default_cache_dir() -> Path | None:
    """The folder decoded files go to: ``$FL_DATA_CACHE_DIR`` (None when it says ``off``), else a per-user cache."""
    given = os.environ.get(ENV_DATA_CACHE_DIR)
    if given is not None and given.strip():
        return None if given.strip().lower() == CACHE_OFF else Path(given).expanduser()
    return Path.home() / ".cache" / "fl_common" / "decoded"


def _entry(path: Path, cache_dir: Path) -> Path:
    st = path.stat()
    key = hashlib.blake2b(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode(), digest_size=12).hexdigest()
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    return cache_dir / f"{stem}-{key}.npy"


def _write(entry: Path, array: np.ndarray) -> None:
    """Write to a temporary file in the same folder and rename: a reader sees the whole entry or none."""
    entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def decoded_idx(path: str | os.PathLike[str], *, expect_ndim: int | None = None,
                cache_dir: Path | None = None, use_cache: bool = True) -> np.ndarray:
    """The idx file's array, memory-mapped read-only from its cache entry (made now when missing).

    Same values, dtype and shape as :func:`fl_common.data.idx.read_idx` (which checks the file and raises
    ``IdxFormatError`` on a corrupt one); read-only either way. ``cache_dir`` defaults to
    :func:`default_cache_dir`; ``use_cache=False`` or a disabled cache parses the file as ``read_idx`` does.
    """
    source = Path(path)
    folder = None if not use_cache else cache_dir if cache_dir is not None else default_cache_dir()
    if folder is None:
        return read_idx(source, expect_ndim=expect_ndim)
    entry = _entry(source, folder)
    if entry.is_file():
        try:
            cached: np.ndarray = np.load(entry, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("decoded-data cache entry %s is unreadable (%s): decoding %s again", entry, exc, source)
        else:
            if expect_ndim is None or cached.ndim == expect_ndim:
                return cached
            log.warning("decoded-data cache entry %s has %d dimensions, expected %d: decoding %s again", entry,
                        cached.ndim, expect_ndim, source)
    array = read_idx(source, expect_ndim=expect_ndim)
    try:
        _write(entry, array)
    except OSError as exc:
        log.info("decoded-data cache %s not writable (%s): using %s parsed in memory", folder, exc, source)
        return array
    mapped: np.ndarray = np.load(entry, mmap_mode="r", allow_pickle=False)
    return mapped
