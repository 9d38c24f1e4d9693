"""What a refused request may cost the server: a counter in memory, and at most one audit row a minute.

Before, every refused request wrote two synchronous SQLite transactions (a counter and an audit
row) and a warning line: a caller sending garbage as fast as it could made the server fsync for
it and grew the audit log without bound. Now:

- refusal counters are kept in memory and written to the store in one transaction at most every
  :data:`FLUSH_SECONDS` (the round ticker flushes; ``/status`` adds what is not written yet, so it
  never lags);
- the audit log and the warning log get the first refusal of a kind (reason and client) in each
  :data:`WINDOW_SECONDS` window; the repeats of that window become one "repeated N times" row
  when it ends;
- the audit log is pruned to ``audit_retention_days`` and ``audit_max_events`` (newest kept).

A refusal never changes any other state (the gateway's rule); this module only decides how much
of it is written down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fl_server.store.sqlite import ServerStore

log = logging.getLogger("fl_server.rest.refusals")

#: seconds in which repeats of one refusal (reason, client) are aggregated into one audit row
WINDOW_SECONDS = 60.0
#: longest time a refusal count stays in memory only
FLUSH_SECONDS = 5.0
#: seconds between two prunings of the audit log
PRUNE_SECONDS = 600.0


@dataclass
class _Window:
    opened_at: float
    repeats: int = 0
    detail: str = ""


class RefusalRecorder:
    """Counts and audits refusals with bounded cost (see the module docstring). Thread safe."""

    def __init__(self, store: ServerStore, clock: Callable[[], float], *, retention_days: float,
                 max_events: int) -> None:
        self.store = store
        self.clock = clock
        self.retention_days = retention_days
        self.max_events = max_events
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._windows: dict[tuple[str, str | None], _Window] = {}
        self._flushed_at = clock()
        self._pruned_at = float("-inf")

    def count(self, reason: str) -> None:
        """A refusal that needs no audit row (e.g. an oversized body, refused from its headers)."""
        with self._lock:
            self._pending[reason] = self._pending.get(reason, 0) + 1

    def refuse(self, reason: str, client_id: str | None, detail: str) -> None:
        """Count a refusal; audit and log it if it is the first of its kind in the current window."""
        now = self.clock()
        with self._lock:
            self._pending[reason] = self._pending.get(reason, 0) + 1
            window = self._windows.get((reason, client_id))
            if window is not None and now - window.opened_at < WINDOW_SECONDS:
                window.repeats += 1
                window.detail = detail
                return
            self._windows[(reason, client_id)] = _Window(now)
        self.store.security_event(reason, client_id, detail, now)
        log.warning("refused: %s (%s)", reason, detail)

    def rejections(self) -> dict[str, int]:
        """Refusals by reason, written and pending."""
        counts = self.store.rejections()
        with self._lock:
            for reason, n in self._pending.items():
                counts[reason] = counts.get(reason, 0) + n
        return dict(sorted(counts.items()))

    def flush(self, *, force: bool = False) -> None:
        """Write pending counts, close ended windows (one row for their repeats) and prune the audit log."""
        now = self.clock()
        with self._lock:
            if not force and now - self._flushed_at < FLUSH_SECONDS:
                return
            pending, self._pending = self._pending, {}
            ended = [(key, w) for key, w in self._windows.items() if force or now - w.opened_at >= WINDOW_SECONDS]
            for key, _ in ended:
                del self._windows[key]
            self._flushed_at = now
        if pending:
            self.store.add_rejections(pending)
        for (reason, client_id), window in ended:
            if window.repeats:
                self.store.security_event(reason, client_id, f"repeated {window.repeats} more time(s) in "
                                          f"{WINDOW_SECONDS:.0f} s; last: {window.detail}", now)
                log.warning("refused: %s repeated %d more time(s) in %.0f s", reason, window.repeats, WINDOW_SECONDS)
        if force or now - self._pruned_at >= PRUNE_SECONDS:
            self._pruned_at = now
            removed = self.store.prune_security_events(older_than=now - self.retention_days * 86400.0,
                                                       keep_newest=self.max_events)
            if removed:
                log.info("audit log: %d event(s) past the retention (%g days, %d events) removed", removed,
                         self.retention_days, self.max_events)


__all__ = ["FLUSH_SECONDS", "RefusalRecorder", "WINDOW_SECONDS"]
