"""The server process's heap: few malloc arenas, and freed memory handed back after every round (glibc).

Why (issue 16, defect 8): the server's resident memory grew with every round (248 -> 953 MiB in
five compose rounds; benchmarks/results/server_memory/README.md has the 100-round curves). Its
Python objects do not grow; glibc keeps what the server frees. Each round the request threads
read, decrypt, decompress and decode ten multi-megabyte uploads, and the ticker evaluates the
model in 1000-image batches; with one malloc arena per thread (up to 8 x cores) and the
trainer's "keep freed memory" tuning (fl_common/allocator.py, applied because the server builds
a LocalTrainer to evaluate) every arena keeps its own high-water mark, and fragmentation moves
that mark up a little every round. Two settings fix it for a server, which, unlike a trainer,
spends most of its time idle between rounds:

* ``M_ARENA_MAX`` 2: request threads share two arenas instead of one each (they are I/O-bound;
  contention on the allocator lock is not measurable next to decryption and decoding);
* ``malloc_trim(0)`` after every round (closed or aborted) and at the end of the run: free pages
  of every arena go back to the kernel, whatever the trim threshold says. A few ms, on the round
  ticker thread, once per round.

``FL_SERVER_MALLOC=0`` keeps the C library's behaviour (the benchmark's "before"). Not glibc: no-op.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

from fl_server.rest.observer import FinishedRun, ServiceObserver
from fl_server.store import HistoryRecord

log = logging.getLogger("fl_server.rest.memory")

ENV_SERVER_MALLOC = "FL_SERVER_MALLOC"
#: mallopt's M_ARENA_MAX (glibc <malloc.h>)
_M_ARENA_MAX = -8
#: arenas for the request threads and the round ticker
SERVER_ARENAS = 2


def _libc() -> Any | None:
    if os.environ.get(ENV_SERVER_MALLOC, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def limit_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before the request threads start); True when in effect."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas) == 1)


def release_freed_memory() -> bool:
    """Give the free pages of every arena back to the kernel; True when glibc released some."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)


class ReleaseAfterRound(ServiceObserver):
    """Trims the heap once a round's buffers (uploads, aggregation, evaluation batches) are freed."""

    def round_closed(self, record: HistoryRecord, *, reason: str, selected: int, arrived: int,
                     close_seconds: float) -> None:
        release_freed_memory()

    def round_aborted(self, round_number: int, arrived: int) -> None:
        release_freed_memory()

    def run_finished(self, run: FinishedRun) -> None:
        release_freed_memory()


__all__ = ["ENV_SERVER_MALLOC", "ReleaseAfterRound", "SERVER_ARENAS", "limit_arenas", "release_freed_memory"]
