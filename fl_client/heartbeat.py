"""A liveness signal while the daemon trains: a long-poll of the round kept open for as long as training runs.

Why: the server drops a selected client it has not heard from for ``client_liveness`` seconds, so a daemon
killed mid-round does not hold the round (or a secure-aggregation phase) until its deadline. Every signed
request counts as "heard from" (the gateway stamps ``last_seen`` when it checks the signature), but a daemon
that trains sends nothing until its update is ready; without a signal an honest slow trainer would look gone,
and a killed one could only be told apart at the round's deadline.

Design (the simplest sound one): while training runs, a second thread keeps a long-poll of the round open
(``GET /api/v1/round?wait=S`` with the last answer's ETag). The server parks it for at most half its
``client_liveness`` (fl_server/rest/state_changes.py caps every ``wait`` so), so a new signed request starts
at least twice per liveness window without the client knowing the server's setting, and a parked request
costs the server a waiting thread, never its lock. A request answered early (the state moved, or the server
parks no more requests and answers at once) is followed by the next one no sooner than ``min_gap`` seconds,
so the heartbeat never spins. It is a plain round poll: signed (HMAC, fresh nonce), authenticated with the
session token, and it changes nothing on the server but ``last_seen``.

The heartbeat has its own HTTP session (``requests.Session`` is not promised to be thread safe) and reads
the daemon's credentials at every beat, so a token the daemon renews is the one it sends. A failed beat is
logged at DEBUG and tried again after ``min_gap``: the main thread's own calls report an unreachable server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from fl_client.api import ApiRefused, Credentials, ServerApi, ServerUnreachable

log = logging.getLogger("fl_client.heartbeat")

#: seconds a heartbeat asks the server to park it (the server caps it at half its client_liveness)
HEARTBEAT_WAIT = 20.0
#: fewest seconds between the starts of two heartbeats (an early answer does not make it spin)
HEARTBEAT_MIN_GAP = 1.0
#: seconds from the start of training to the first heartbeat. The daemon was heard from a moment ago (its model
#: download is a signed request), and the first beat no longer lands in a round's busiest fraction of a second,
#: when every selected client's model download is being served (issue 12): 0.25 s is far inside any
#: ``client_liveness`` (1 s at the least), and a training shorter than that needs no beat at all
HEARTBEAT_FIRST_AFTER = 0.25


class TrainingHeartbeat:
    """A background thread that keeps one long-poll of the round open until :meth:`stop` (a context manager).

    ``api_factory`` makes the heartbeat's own :class:`ServerApi` (its own HTTP session); ``credentials``
    returns the daemon's current credentials (None: nothing is sent). ``etag``: the round state the daemon last
    saw (its poll's ETag), so that the first beat parks at once instead of being answered at once and followed by
    a second request a ``min_gap`` later: one request less per client at every round's busiest moment.
    ``first_after``: seconds before the first beat (0: at once)."""

    def __init__(self, api_factory: Callable[[], ServerApi], credentials: Callable[[], Credentials | None], *,
                 wait: float = HEARTBEAT_WAIT, min_gap: float = HEARTBEAT_MIN_GAP, name: str = "fl-heartbeat",
                 etag: str | None = None, first_after: float = 0.0) -> None:
        if not wait > 0 or not min_gap > 0:
            raise ValueError(f"heartbeat wait and min_gap must be positive (got {wait}, {min_gap})")
        if not first_after >= 0:
            raise ValueError(f"heartbeat first_after must be >= 0 (got {first_after})")
        self.first_after = first_after
        self._api_factory = api_factory
        self._credentials = credentials
        self._first_etag = etag
        self.wait = wait
        self.min_gap = min_gap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        #: heartbeats sent (answered or not); tests and logs read it
        self.beats = 0

    def start(self) -> TrainingHeartbeat:
        """Start the thread (once; a started heartbeat used as a context manager is not started again)."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    def stop(self) -> None:
        """No further heartbeat starts; one parked on the server ends at its ``wait`` (the thread is a daemon
        thread, never joined here: training's caller must not wait for the server's long-poll bound)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s for the thread to end (after :meth:`stop`); True when it has. Training's caller
        never needs it (see :meth:`stop`); tests and shutdowns may."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def __enter__(self) -> TrainingHeartbeat:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        if self._stop.wait(self.first_after):
            return  # stopped first: the training needed no beat
        api = self._api_factory()
        etag = self._first_etag
        while not self._stop.is_set():
            creds = self._credentials()
            started = time.monotonic()
            if creds is not None:
                api.creds = creds
                try:
                    self.beats += 1
                    _, etag = api.poll_round(etag, self.wait, liveness=True)  # not woken by secure phase changes
                except (ApiRefused, ServerUnreachable, ValueError) as exc:  # ValueError: a body that is not JSON
                    log.debug("heartbeat failed (%s); trying again", exc)
                    etag = None
            # an early answer (news, or a server that parks no more requests) waits out the rest of the gap
            self._stop.wait(max(0.0, self.min_gap - (time.monotonic() - started)))
        api.session.close()


__all__ = ["HEARTBEAT_FIRST_AFTER", "HEARTBEAT_MIN_GAP", "HEARTBEAT_WAIT", "TrainingHeartbeat"]
