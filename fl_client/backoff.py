"""Waiting out an unreachable server: exponential backoff with jitter, and one log line per change of state.

``ServerApi`` already retries one request a few times (seconds). A server that restarts, or is not up yet
when a daemon starts, is away for longer than that; the daemon then keeps calling it, further and further
apart, up to a cap, until it answers, a deadline passes or the daemon is told to stop. Why the parts:

- **Jitter** keeps a fleet of daemons that lost the same server from coming back in lockstep (they all
  failed at the same moment; without it they would all retry at the same moments too).
- **A cap** bounds how long a daemon sleeps after the server is back (it would otherwise double without end).
- **One log line per change of state** ("unreachable", then "reachable again after N s"): an outage of an
  hour at one line per try would bury the log; each further failure goes to DEBUG.
- **An injectable sleep**: the daemon's sleep wakes on SIGTERM/SIGINT, so a daemon waiting for its server
  still stops at once; the caller looks at its stop flag after each wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

#: first wait after a failed call, seconds
BASE_DELAY = 1.0
#: longest wait between two calls, seconds
MAX_DELAY = 30.0


class Backoff:
    """Delays ``base * 2**n`` capped at ``cap``, each drawn in [half, all] of that ("equal jitter")."""

    def __init__(self, base: float = BASE_DELAY, cap: float = MAX_DELAY, *, rng: random.Random | None = None) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base, self.cap = float(base), float(cap)
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The wait before the next try (counts one more failure)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures, 60))
        self.failures += 1
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0


class ServerWait:
    """The wait between calls to a server that does not answer, for one kind of call (``what``).

    ``failed(exc, until=...)`` logs the outage (once), sleeps the next backoff delay and says whether to try
    again; ``succeeded()`` logs the recovery (once) and starts the backoff over. ``until`` is a time on
    ``clock`` after which trying again is pointless (e.g. the round's deadline): no sleep goes past it."""

    def __init__(self, what: str, sleep: Callable[[float], None], logger: logging.Logger, *, base: float = BASE_DELAY,
                 cap: float = MAX_DELAY, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.what = what
        self.backoff = Backoff(base, cap, rng=rng)
        self._sleep, self._log, self._clock = sleep, logger, clock
        self.down_since: float | None = None
        #: how many times the server went away and came back (for tests and logs)
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: Exception, *, until: float | None = None) -> bool:
        """Log the failure (WARNING the first time of an outage, DEBUG after), then sleep; False, without
        sleeping, once ``until`` has passed."""
        now = self._clock()
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            self._log.warning("%s: server unreachable (%s); retrying with backoff (up to %.0f s apart)%s", self.what, exc,
                              self.backoff.cap, "" if until is None else f" for up to {max(0.0, until - now):.0f} s")
        else:
            self._log.debug("%s: still unreachable (%s)", self.what, exc)
        if until is not None and now >= until:
            return False
        delay = self.backoff.next_delay()
        if until is not None:
            delay = min(delay, max(0.0, until - now))
        self._sleep(delay)
        return True

    def succeeded(self) -> None:
        if self.down_since is not None:
            self._log.info("%s: server reachable again after %.0f s", self.what, self._clock() - self.down_since)
        self.down_since = None
        self.backoff.reset()


__all__ = ["BASE_DELAY", "MAX_DELAY", "Backoff", "ServerWait"]
