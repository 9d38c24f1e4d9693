"""What the federation service tells the outside world about its rounds, without knowing who listens.

The round drivers call a :class:`ServiceObserver` at a few points of a round's life (an
evaluation finished, a round closed or was aborted, the run finished). Metrics
(``fl_server.rest.metrics``) and the end-of-run report (``fl_server.rest.run_report``) are observers; the
service imports neither, so it stays free of Prometheus, matplotlib and HTTP.

Observers are called on the service's round-ticker thread while it holds the service lock: they
must be quick (a histogram observation) or, like the report, run once at the end of the run.
An observer that raises is logged and skipped; it never costs the federation a round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from fl_common.config import FLConfig
from fl_server.store import HistoryRecord, RunDirectory
from fl_server.store.sqlite import ServerStore

log = logging.getLogger("fl_server.rest.observer")


class FinishedRun(Protocol):
    """What the end of a run offers its observers (the round driver's context provides it)."""

    cfg: FLConfig
    store: ServerStore
    run_dir: RunDirectory

    @property
    def codec_name(self) -> str: ...


class ServiceObserver:
    """No-op base: subclasses override the events they care about."""

    def evaluated(self, seconds: float) -> None:
        """The global model was evaluated on the test set in ``seconds`` (inside a round's close)."""

    def round_closed(self, record: HistoryRecord, *, reason: str, selected: int, arrived: int,
                     close_seconds: float) -> None:
        """A round closed (``reason``: quorum or deadline); ``close_seconds`` is the wall time of
        aggregating, applying, accounting and evaluating, i.e. of ``Coordinator.close_round``."""

    def round_aborted(self, round_number: int, arrived: int) -> None:
        """A round attempt missed ``min_clients`` at its deadline and was dropped (it is retried)."""

    def run_finished(self, run: FinishedRun) -> None:
        """All rounds are done; ``history.csv`` and ``summary.json`` are written. ``run`` is the round
        driver's context (store, run folder, configuration)."""


class Observers(ServiceObserver):
    """Fans every event out to a list of observers; one failing observer does not stop the others."""

    def __init__(self, observers: Iterable[ServiceObserver] = ()) -> None:
        self._items: list[ServiceObserver] = list(observers)

    def add(self, observer: ServiceObserver) -> None:
        self._items.append(observer)

    def __iter__(self) -> Iterator[ServiceObserver]:
        return iter(list(self._items))

    def _each(self, event: str, *args: Any, **kwargs: Any) -> None:
        for obs in list(self._items):
            try:
                getattr(obs, event)(*args, **kwargs)
            except Exception:
                log.exception("observer %s failed on %s", type(obs).__name__, event)

    def evaluated(self, seconds: float) -> None:
        self._each("evaluated", seconds)

    def round_closed(self, record: HistoryRecord, *, reason: str, selected: int, arrived: int,
                     close_seconds: float) -> None:
        self._each("round_closed", record, reason=reason, selected=selected, arrived=arrived, close_seconds=close_seconds)

    def round_aborted(self, round_number: int, arrived: int) -> None:
        self._each("round_aborted", round_number, arrived)

    def run_finished(self, run: FinishedRun) -> None:
        self._each("run_finished", run)


__all__ = ["FinishedRun", "Observers", "ServiceObserver"]
