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
* ``malloc_trim(0)`` once per round (closed or aborted) and at the end of the run: free pages
  of every arena go back to the kernel, whatever the trim threshold says. It costs 15-30 ms of CPU
  and takes each arena's lock in turn, so a round's trim runs on a thread of its own ``TRIM_DELAY``
  after the close, while the next round's clients train and the server idles: run on the ticker at
  the close, it sat between one round's close and the next one's opening, on every round's critical
  path (issue 12). The end of the run trims at once.

``FL_SERVER_MALLOC=0`` keeps the C library's behaviour (the benchmark's "before"). Not glibc: no-op.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from fl_server.rest.observer import FinishedRun, ServiceObserver
from fl_server.store import HistoryRecord

log = logging.getLogger("fl_server.rest.memory")

ENV_SERVER_MALLOC = "FL_SERVER_MALLOC"
#: mallopt's M_ARENA_MAX (glibc <malloc.h>)
_M_ARENA_MAX = -8
#: arenas for the request threads and the round ticker
SERVER_ARENAS = 2
#: seconds from a round's end to its trim: past the next round's opening, push and model downloads (0.1-0.3 s
#: for ten cnn clients on two cores), inside its training
TRIM_DELAY = 1.0


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
    """Trims the heap once a round's buffers (uploads, aggregation, evaluation batches) are freed: ``delay``
    seconds after the round ends, on a thread of its own (one trim pending at a time), and at once at the end
    of the run. ``release``: what trims (tests pass their own)."""

    def __init__(self, delay: float = TRIM_DELAY, release: Callable[[], bool] = release_freed_memory) -> None:
        if not delay >= 0:
            raise ValueError(f"the trim delay must be a number of seconds >= 0, got {delay!r}")
        self.delay = delay
        self._release = release
        self._lock = threading.Lock()
        self._pending: threading.Timer | None = None

    def _run_pending(self) -> None:
        with self._lock:
            self._pending = None
        self._release()

    def _schedule(self) -> None:
        with self._lock:
            if self._pending is not None:  # the one already due trims this round's buffers too
                return
            timer = threading.Timer(self.delay, self._run_pending)
            timer.daemon = True  # a stopping server does not wait for it
            timer.name = "fl-malloc-trim"
            self._pending = timer
            timer.start()

    def round_closed(self, record: HistoryRecord, *, reason: str, selected: int, arrived: int,
                     close_seconds: float) -> None:
        self._schedule()

    def round_aborted(self, round_number: int, arrived: int) -> None:
        self._schedule()

    def run_finished(self, run: FinishedRun) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._release()


__all__ = ["ENV_SERVER_MALLOC", "ReleaseAfterRound", "SERVER_ARENAS", "TRIM_DELAY", "limit_arenas", "release_freed_memory"]
