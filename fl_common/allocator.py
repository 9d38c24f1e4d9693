"""Keep freed heap memory for reuse in processes that train (glibc's malloc only).

Why: a training step allocates and frees the same large buffers (activations, per-sample
gradient norms, clipped sums) again and again. With glibc's defaults, blocks above a dynamic
threshold are mmap'd and unmapped on free, and free memory at the top of the heap is given back
to the kernel, so the next step page-faults all of it in again: a client's round of sample-level
DP-SGD (cnn, 600 records, batch 64) spent 15-25 % of its time in the kernel, and ran in 1.75 s
against 1.18 s with these settings (benchmarks/README.md, "allocator"). Fixing the mmap threshold
at 32 MiB keeps smaller blocks in the heap, a large trim threshold keeps freed memory mapped, and
a top pad grows the heap in large steps. The cost is that a process's resident memory stays at
its high-water mark, which is what a training process reaches every round anyway (simulation
workers still hand memory back between tasks with ``malloc_trim``).

Set ``FL_MALLOC_TUNING=0`` to keep the C library's defaults. Not glibc (musl, macOS): no-op.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "ENV_SWITCH"]

ENV_SWITCH = "FL_MALLOC_TUNING"
# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20))

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when they are in effect.

    Safe to call from every trainer: later calls return the first answer. A forked child
    inherits the settings with the parent's heap; a spawned one calls this itself.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _applied
