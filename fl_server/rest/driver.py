"""The RoundDriver interface: how rounds run behind the REST endpoints.

A REST federation has one :class:`~fl_server.rest.gateway.ClientGateway` (who the client is) and
one round driver (how rounds run), picked once when the service is assembled:

- :class:`~fl_server.rest.sync_driver.SyncRoundDriver` - synchronous rounds (plain, or with the
  secure-aggregation protocol of :mod:`fl_server.rest.secure_driver` plugged in);
- :class:`~fl_server.rest.async_driver.AsyncRoundDriver` - FedAsync / FedBuff jobs.

Routes call the driver through :class:`~fl_server.rest.service.FederationService`, never a mode
branch of their own. Drivers share the :class:`DriverContext` (store, run folder, lock, clock,
observers, the server's model and test set) and use each other's and the gateway's public
methods only.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fl_common.config import FLConfig
from fl_common.protocol.rest import RoundStatus
from fl_common.tensors import ParamSpec
from fl_common.training import EvalResult, LocalTrainer
from fl_server.rest.gateway import Authenticated, ClientGateway, Registration
from fl_server.rest.observer import Observers
from fl_server.selection import ParticipationLog, Selector, selection_summary
from fl_server.store import HistoryRecord, RunDirectory
from fl_server.store.sqlite import ServerStore

log = logging.getLogger("fl_server.rest.driver")

#: the coordinator's per-round participation log (round, client_id, selected, arrived, probability);
#: ``participation.csv`` is the per-client table of the end-of-run report (fl_server/rest/run_report.py)
PARTICIPATION_ROUNDS_CSV = "participation_rounds.csv"

#: (version, body, wrapped model key or None) of one model download
ModelPayload = tuple[int, bytes, bytes | None]


class CoordinatorView(Protocol):
    """What the service, /status and the tests read of either coordinator."""

    spec: ParamSpec
    global_vector: torch.Tensor
    participation: ParticipationLog
    selector: Selector

    @property
    def finished(self) -> bool: ...

    @property
    def stop_reason(self) -> str | None: ...

    @property
    def completed_rounds(self) -> int: ...

    def privacy_status(self) -> dict[str, Any]: ...

    def add_bytes(self, n: int) -> None: ...


@dataclass
class DriverContext:
    """What every round driver shares with the service: one lock (HTTP threads and the round ticker
    never interleave inside a coordinator), the store, the run folder, the server's model and test
    set, and the observers (metrics, the end-of-run report)."""

    cfg: FLConfig
    store: ServerStore
    run_dir: RunDirectory
    updates_dir: Path
    gateway: ClientGateway
    lock: threading.RLock
    wake: threading.Event
    clock: Callable[[], float]
    observers: Observers
    trainer: LocalTrainer
    test_x: torch.Tensor
    test_y: torch.Tensor
    started_at: float
    evaluate_rounds: bool = True
    #: seconds spent in :meth:`evaluate` so far (a round's timeline takes the difference across its close)
    evaluation_seconds: float = 0.0

    def evaluate(self, vector: torch.Tensor) -> EvalResult:
        """The global model on the server's test set; its duration goes to the observers (metrics)."""
        t0 = time.perf_counter()
        result = self.trainer.evaluate(vector, self.test_x, self.test_y, self.cfg.eval_batch_size)
        seconds = time.perf_counter() - t0
        self.evaluation_seconds += seconds
        self.observers.evaluated(seconds)
        return result

    @property
    def codec_name(self) -> str:
        return self.gateway.codec_name

    @property
    def evaluator(self) -> Callable[[torch.Tensor], EvalResult] | None:
        """The coordinator's evaluator, or None when the service was built not to evaluate (tests)."""
        return self.evaluate if self.evaluate_rounds else None


class SelectionProblems:
    """A policy that cannot draw (e.g. no candidate with a positive weight) waits for other clients;
    the reason is logged once per distinct reason, not on every tick."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.last: str | None = None

    def failed(self, exc: Exception) -> None:
        if str(exc) != self.last:
            log.warning("selection '%s' cannot draw yet: %s", self.policy, exc)
            self.last = str(exc)

    def cleared(self) -> None:
        self.last = None


class RoundDriver(abc.ABC):
    """How rounds run behind the REST endpoints. Every method that touches the coordinator takes
    ``ctx.lock``; the service's round ticker calls :meth:`tick`."""

    #: ``sync`` or ``async`` (the ``training_mode`` in /status and summary.json)
    mode: str

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg

    @property
    @abc.abstractmethod
    def coordinator(self) -> CoordinatorView:
        """The transport-free coordinator this driver runs (the simulation's very class)."""

    @property
    @abc.abstractmethod
    def history(self) -> Sequence[HistoryRecord]:
        """The run's records, one per round (synchronous) or server update (asynchronous)."""

    @abc.abstractmethod
    def recover(self) -> None:
        """Continue where a previous process stopped (checkpoint, then durable updates)."""

    @abc.abstractmethod
    def tick(self) -> None:
        """Deadlines and scheduling: open, close, abort rounds or dispatch jobs."""

    @abc.abstractmethod
    def round_status(self, auth: Authenticated) -> RoundStatus:
        """A client's poll: what it should do now."""

    @abc.abstractmethod
    def model_version(self, requested: int | None) -> int:
        """The model version a download gets (``requested``: the ``?version=`` a job trains on)."""

    @abc.abstractmethod
    def model_payload(self, auth: Authenticated, version: int) -> ModelPayload:
        """(version, body, wrapped model key) of one model version."""

    @abc.abstractmethod
    def accept_update(self, auth: Authenticated, round_number: int, idempotency_key: str, body: bytes,
                      attempt: str | None) -> dict[str, Any]:
        """An upload: durable, then aggregated, then acknowledged (or an ApiError)."""

    @abc.abstractmethod
    def status_fields(self) -> dict[str, Any]:
        """The mode's own part of /status (state, versions, the open round or the jobs)."""

    @abc.abstractmethod
    def summary(self) -> dict[str, Any]:
        """summary.json of the run."""

    @abc.abstractmethod
    def client_registered(self, registration: Registration) -> None:
        """A client registered (or registered again); called under the lock."""

    @abc.abstractmethod
    def client_left(self, client_id: str, why: str) -> None:
        """A client will not come back to its round or job (revoked, removed); called under the lock."""

    def stalled(self, now: float) -> str | None:
        """Why rounds cannot progress (e.g. far past a deadline), or None."""
        return None

    def prepare_download(self) -> None:
        """Get the model download of an open round ready before clients ask (called by the ticker, no lock held)."""

    def count_download(self, nbytes: int) -> None:
        """A model body went out: it counts towards the round's traffic."""
        self.coordinator.add_bytes(nbytes)

    # ------------------------------------------------------------------ shared by both modes
    def participation_summary(self) -> dict[str, Any]:
        """Fairness over every registered client (never-selected ones count as 0)."""
        return self.coordinator.participation.summary(self.ctx.store.client_ids())

    def selection_summary(self) -> dict[str, Any]:
        return selection_summary(self.cfg, self.coordinator.selector)

    def write_participation(self) -> None:
        self.ctx.run_dir.write_text(PARTICIPATION_ROUNDS_CSV, self.coordinator.participation.to_csv())


__all__ = ["CoordinatorView", "DriverContext", "ModelPayload", "PARTICIPATION_ROUNDS_CSV", "RoundDriver",
           "SelectionProblems"]
