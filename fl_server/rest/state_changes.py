"""Push instead of polling: a version number that moves when what clients see changes, and long-polls waiting on it.

Why: with polling, a round opens (or a secure-aggregation phase changes) and every selected client learns
of it only at its next poll, 0.2-2 s later, and each phase of a secure round waits for the slowest poller.
With ``GET /api/v1/round?wait=S`` (and the same ``wait`` on the secure-aggregation GETs) a client that
has nothing to do parks its request here and is answered the moment the state moves.

Rules it keeps:

- **Never under the service lock.** A long-poll waits on this module's own condition, whose lock is held
  only to read or bump a counter: a thousand parked requests cost the ticker and the uploads nothing.
- **The version moves on observable changes only**: the service hands :meth:`StateChanges.observe` a
  small key of what clients see (finished, model version, open attempt, secure phase) after every tick; an
  equal key wakes nobody, so the ticker's 0.5 s heartbeat does not wake parked clients.
- **Bounded.** A wait is at most :data:`MAX_WAIT_SECONDS` (and at most half the server's client
  liveness, so a parked client stays live for selection); at most ``max_waiters`` requests are parked at
  once (the request threads are finite: an upload must always find one), beyond that a long-poll is
  answered at once, which a client treats as a plain poll.
- **A restart is a change.** The ETag carries a per-process nonce, so a client's version from before a
  server restart never matches and it is answered at once.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Hashable

from fl_common.protocol.rest import QUERY_WAIT

#: the longest ``wait`` a request may ask for (seconds)
MAX_WAIT_SECONDS = 30.0
#: ``?wait=S``: a long-poll of the round or of a secure-aggregation step
#: what a ``wait`` value may look like: plain decimal seconds (no sign, exponent, spaces, nan or inf)
_WAIT = re.compile(r"[0-9]{1,6}(\.[0-9]{0,24})?", re.ASCII)


class WaitValueError(ValueError):
    """A ``wait`` query value that is not a number of seconds in range (the route answers 400)."""


def parse_wait(raw: str | None, *, liveness: float) -> float:
    """The seconds a long-poll may wait: ``raw`` is the ``wait`` query value (None: 0, a plain poll).

    Decimal seconds from 0 to :data:`MAX_WAIT_SECONDS`; the result is further bounded by half the
    server's ``client_liveness`` so a client parked here is still live when the next round is planned."""
    if raw is None:
        return 0.0
    if _WAIT.fullmatch(raw) is None:
        raise WaitValueError(f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}")
    value = float(raw)
    if value > MAX_WAIT_SECONDS:
        raise WaitValueError(f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}")
    return min(value, liveness / 2.0)


class StateChanges:
    """The state version long-polls wait on. Thread safe; see the module docstring."""

    def __init__(self, *, max_waiters: int = 1000) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._counter = 0
        self._last_key: Hashable = None
        self._waiters = 0
        self._parked_total = 0
        self._closed = False
        #: parked requests allowed at once (the server sets it below its request threads)
        self.max_waiters = max_waiters
        #: changes each process anew: a version from before a restart never matches
        self.nonce = secrets.token_hex(4)

    @property
    def version(self) -> int:
        with self._cond:
            return self._counter

    @property
    def waiting(self) -> int:
        """Requests parked now (monitoring, tests)."""
        with self._cond:
            return self._waiters

    @property
    def parked_total(self) -> int:
        """Requests ever parked (tests: a client with news is answered without parking)."""
        with self._cond:
            return self._parked_total

    def etag(self, version: int) -> str:
        """The quoted ETag of ``version`` (what ``If-None-Match`` sends back)."""
        return f'"s{self.nonce}-{version}"'

    def bump(self) -> None:
        """Something clients see changed: wake every parked request."""
        with self._cond:
            self._counter += 1
            self._cond.notify_all()

    def observe(self, key: Hashable) -> bool:
        """The key of what clients see now; a key different from the last one is a change (True)."""
        with self._cond:
            if key == self._last_key:
                return False
            self._last_key = key
            self._counter += 1
            self._cond.notify_all()
            return True

    def wait_past(self, version: int, timeout: float) -> bool:
        """Block (never under the service lock) until the version moves past ``version``, the timeout
        passes, the server closes, or too many requests are parked already. True when it moved."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            if self._counter != version:
                return True
            if self._closed or self._waiters >= self.max_waiters:
                return False
            self._waiters += 1
            self._parked_total += 1
            try:
                while self._counter == version and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                return self._counter != version
            finally:
                self._waiters -= 1

    def close(self) -> None:
        """The server stops: every parked request answers now, and none parks again."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


__all__ = ["MAX_WAIT_SECONDS", "QUERY_WAIT", "StateChanges", "WaitValueError", "parse_wait"]
