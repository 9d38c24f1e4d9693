"""Replay protection storage: "has this client used this nonce inside the freshness window?"

The interface is one method so a SQLite (multi-process) implementation is easy to add:
``seen_or_add(client_id, nonce, expires_at) -> bool`` must be *atomic* (check and insert in one
step), otherwise two concurrent replays can both pass. Entries may be forgotten once
``expires_at`` has passed, because by then ``verify_request`` refuses the timestamp anyway.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["NonceCache", "InMemoryNonceCache"]

_log = logging.getLogger(__name__)


@runtime_checkable
class NonceCache(Protocol):
    def seen_or_add(self, client_id: str, nonce: str, expires_at: float) -> bool:
        """Return True if (client_id, nonce) is already live; otherwise record it and return False."""
        ...


class InMemoryNonceCache:
    """Thread-safe, memory-bounded nonce cache for a single server process.

    Expired entries are evicted lazily from a min-heap on expiry time, so each call costs
    O(log n) amortised. When ``max_entries`` live (unexpired) nonces are held, new nonces are
    refused (``seen_or_add`` returns True): evicting a live nonce would re-open a replay window,
    so under pressure we fail closed and log a warning. Size ``max_entries`` above
    (peak requests per second) x (2 x window).
    """

    def __init__(self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._clock = clock
        self._live: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._evict(self._clock())
            return len(self._live)

    def _evict(self, now: float) -> None:
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            exp, cid, nonce = heapq.heappop(heap)
            if live.get((cid, nonce)) == exp:
                del live[(cid, nonce)]

    def seen_or_add(self, client_id: str, nonce: str, expires_at: float) -> bool:
        now = self._clock()
        key = (client_id, nonce)
        with self._lock:
            self._evict(now)
            if key in self._live:
                return True
            if expires_at <= now:
                return False  # already outside the window; nothing worth remembering
            if len(self._live) >= self._max:
                _log.warning("nonce cache full (%d live entries); refusing new nonces", len(self._live))
                return True
            self._live[key] = expires_at
            heapq.heappush(self._heap, (expires_at, client_id, nonce))
            return False
