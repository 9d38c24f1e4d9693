"""When each client was last heard from: kept in memory, written to the store at most once per ``resolution`` s.

Why: every authenticated request moves its client's ``last_seen``; written each time, that is one durable
SQLite transaction (an fsync) per request on top of the replay nonce. ``last_seen`` decides liveness for
selection (``client_liveness``, tens of seconds), so the store only needs it to within a few seconds:
this cache keeps the exact newest time in memory and says when the stored value has fallen
``resolution`` s behind, which bounds the stored value to ``[newest - resolution, newest]``.

Readers get the exact value as long as the process lives (the store overlays :meth:`newest` on what it
reads). After ``kill -9`` a client's stored ``last_seen`` may be up to ``resolution`` s old; a clean close
writes every pending value (:meth:`pending`).
"""

from __future__ import annotations

import threading

__all__ = ["LastSeenCache"]


class LastSeenCache:
    """Thread safe. ``newest`` is what the process saw; ``stored`` what the database holds, where known."""

    def __init__(self, resolution: float) -> None:
        if resolution < 0:
            raise ValueError("resolution must be >= 0")
        self.resolution = resolution
        self._lock = threading.Lock()
        self._newest: dict[str, float] = {}
        self._stored: dict[str, float] = {}

    def seen(self, client_id: str, at: float) -> bool:
        """Record a sighting; True when the store must be written now (its value is unknown or ``resolution`` behind)."""
        with self._lock:
            if at > self._newest.get(client_id, float("-inf")):
                self._newest[client_id] = at
            stored = self._stored.get(client_id)
            return stored is None or self._newest[client_id] - stored >= self.resolution

    def stored(self, client_id: str, at: float) -> None:
        """The store now holds ``at`` for the client (a touch, a registration)."""
        with self._lock:
            self._stored[client_id] = at
            if at > self._newest.get(client_id, float("-inf")):
                self._newest[client_id] = at

    def newest(self, client_id: str) -> float | None:
        with self._lock:
            return self._newest.get(client_id)

    def snapshot(self) -> dict[str, float]:
        """client_id -> newest sighting, for readers that overlay many rows at once."""
        with self._lock:
            return dict(self._newest)

    def pending(self) -> dict[str, float]:
        """Sightings newer than what the store holds (a clean close writes them)."""
        with self._lock:
            return {c: t for c, t in self._newest.items() if t > self._stored.get(c, float("-inf"))}

    def forget(self, client_id: str) -> None:
        """The client was erased: nothing of it stays in memory either."""
        with self._lock:
            self._newest.pop(client_id, None)
            self._stored.pop(client_id, None)
