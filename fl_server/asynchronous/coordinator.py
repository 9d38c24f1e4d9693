"""The asynchronous coordinator: no rounds, clients train and upload whenever they can.

Like the synchronous :class:`fl_server.coordinator.Coordinator` it knows nothing of HTTP,
processes or clocks (the driver passes its own clock reading as ``now`` where one is recorded),
so the simulation and the REST server drive the same object:

1. :meth:`AsyncCoordinator.dispatch` fills free training slots (``async_concurrency``) with idle
   clients chosen by the selection policy, each getting an :class:`AsyncTask`: a job id, the
   model version to train on and its instructions (``instructions.round`` *is* that version).
   :meth:`model` returns that version's weights for as long as the job is out.
2. :meth:`submit` takes the update, tagged with the version it trained on (``update.round``),
   computes its staleness (server updates since then), refuses it when staler than
   ``async_max_staleness``, and hands it to the rule: FedAsync mixes it in at once, FedBuff
   buffers it and steps after K. Each server step is evaluated when due and recorded.
3. :meth:`state_dict` holds everything (global model, versions still being trained on, open jobs,
   FedBuff's buffer, records), so a restored coordinator continues exactly.

Job seeds are derived from (seed, "async", job, client): a resumed run trains every job as the
uninterrupted run did.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fl_common.config import ConfigError, FLConfig
from fl_common.protocol import ClientUpdate, TrainInstructions, derive_seed
from fl_common.tensors import ParamSpec
from fl_common.training import EvalResult, learning_rate_at
from fl_server.asynchronous.records import (
    ASYNC_HISTORY_COLUMNS,
    JOB_COLUMNS,
    AsyncRecord,
    JobRecord,
    rows_to_csv,
)
from fl_server.asynchronous.rules import AsyncRule, FedAsyncRule, FedBuffRule
from fl_server.asynchronous.staleness import StalenessFunction
from fl_server.selection import (
    ClientId,
    ClientInfo,
    ParticipationLog,
    build_selection,
    client_infos_for,
)
from fl_server.strategies import Strategy, UpdateRejected, build_strategy, check_strategy_features, check_update

log = logging.getLogger("fl_server.asynchronous")

Evaluator = Callable[[torch.Tensor], EvalResult]

__all__ = ["AsyncCoordinator", "AsyncOutcome", "AsyncTask", "make_rule"]


@dataclass(frozen=True)
class AsyncTask:
    """A job handed to one client: train ``instructions`` on model ``version`` and send the delta."""

    job: int
    client_id: ClientId
    version: int
    instructions: TrainInstructions

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "client_id": self.client_id, "version": self.version,
                "instructions": self.instructions.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AsyncTask:
        return cls(int(data["job"]), data["client_id"], int(data["version"]), TrainInstructions.from_json(data["instructions"]))


@dataclass(frozen=True)
class AsyncOutcome:
    """What became of an accepted update: ``applied`` (the global model moved) or ``buffered``."""

    job: int
    client_id: ClientId
    staleness: int
    weight: float
    status: str
    version: int  # the server version after this update
    record: AsyncRecord | None = None  # the server update's history row, when one happened


def make_rule(cfg: FLConfig) -> AsyncRule:
    s = StalenessFunction(cfg.staleness_function, cfg.staleness_a, cfg.staleness_b)
    if cfg.async_algorithm == "fedasync":
        return FedAsyncRule(s, cfg.async_alpha)
    if cfg.async_algorithm == "fedbuff":
        return FedBuffRule(s, cfg.fedbuff_k, cfg.server_learning_rate)
    raise ConfigError(f"config key 'async_algorithm' has value {cfg.async_algorithm!r}: allowed fedasync, fedbuff")


class AsyncCoordinator:
    def __init__(self, cfg: FLConfig, global_vector: torch.Tensor, spec: ParamSpec,
                 evaluator: Evaluator | None = None, strategy: Strategy | None = None, *,
                 client_sizes: Mapping[ClientId, int] | None = None,
                 driver_features: Collection[str] = ("client_infos",)) -> None:
        """``client_sizes`` fills ``num_samples`` of clients that a driver lists by id only.
        ``driver_features`` (:data:`fl_server.strategies.DRIVER_FEATURES`) is checked with the strategy
        as the synchronous coordinator does; the default is what every asynchronous driver carries,
        candidates passed to :meth:`dispatch` as ``ClientInfo`` (the simulation adds "attacks")."""
        if cfg.training_mode != "async":
            raise ConfigError(f"config key 'training_mode' is {cfg.training_mode!r}: the asynchronous coordinator needs "
                              f"training_mode: async")
        if global_vector.numel() != spec.numel:
            raise ValueError("global vector does not match the model spec")
        self.cfg = cfg
        self.spec = spec
        self.global_vector = global_vector.detach().to(torch.float32).clone()
        self.evaluator = evaluator
        self.rule = make_rule(cfg)
        self.strategy = strategy or build_strategy(cfg)  # its client side (FedProx's mu) only
        check_strategy_features(cfg, self.strategy, driver_features)
        self.selector = build_selection(cfg, model_bytes=4 * spec.numel)
        self.concurrency = min(cfg.async_concurrency or cfg.clients_per_round, cfg.num_clients)
        self._client_sizes = dict(client_sizes or {})
        self.version = 0
        self.history: list[AsyncRecord] = []
        self.jobs: list[JobRecord] = []
        self._leases: dict[ClientId, AsyncTask] = {}
        self._snapshots: dict[int, torch.Tensor] = {}
        self._last_applied: dict[ClientId, int] = {}
        #: one row per ended job: round = the version it trained on, arrived = accepted (participation.csv)
        self.participation = ParticipationLog()
        self._draws = 0
        self._step_jobs: list[int] = []  # accepted jobs not yet part of a server update
        self._step_bytes = 0
        self._step_started = time.perf_counter()

    # ------------------------------------------------------------------ state
    @property
    def released_vector(self) -> torch.Tensor:
        """The model the run evaluates and saves: the global model itself (server_model_ema is refused in async
        mode); the synchronous Coordinator's twin, so the drivers read one name."""
        return self.global_vector

    @property
    def finished(self) -> bool:
        """num_rounds counts server updates in async mode."""
        return self.version >= self.cfg.num_rounds

    @property
    def stop_reason(self) -> str | None:
        return None

    @property
    def completed_rounds(self) -> int:
        """The server version, under the synchronous coordinator's name (for drivers and reports)."""
        return self.version

    @property
    def leases(self) -> dict[ClientId, AsyncTask]:
        """Open jobs by client (a client holds at most one)."""
        return dict(self._leases)

    @property
    def free_slots(self) -> int:
        return 0 if self.finished else max(0, self.concurrency - len(self._leases))

    def task_for(self, client_id: ClientId) -> AsyncTask | None:
        """The job this client holds, if any (a client that polls again gets the same job)."""
        return self._leases.get(client_id)

    def model(self, version: int) -> torch.Tensor:
        """The weights of ``version``: the current model, or one a client is still training on."""
        if version == self.version:
            return self.global_vector
        if version in self._snapshots:
            return self._snapshots[version]
        raise KeyError(f"model version {version} is no longer held (current {self.version})")

    def add_bytes(self, n: int) -> None:
        """Count traffic that is not an update (model downloads) towards the next server update."""
        self._step_bytes += int(n)

    # ------------------------------------------------------------------ dispatch
    def instructions(self, client_id: ClientId, job: int) -> TrainInstructions:
        cfg = self.cfg
        lr = learning_rate_at(self.version + 1, cfg.learning_rate, cfg.lr_schedule, decay=cfg.lr_decay,
                              step_size=cfg.lr_step_size, total_rounds=cfg.num_rounds)
        base = TrainInstructions(round=self.version, epochs=cfg.local_epochs, batch_size=cfg.batch_size, learning_rate=lr,
                                 optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                 proximal_mu=0.0, seed=derive_seed(cfg.seed, "async", job, client_id, "train"))
        return self.strategy.configure_client(base, client_id)

    def dispatch(self, idle: Sequence[ClientInfo | ClientId], now: float = 0.0) -> list[AsyncTask]:
        """Fill the free slots with clients drawn from ``idle`` by the selection policy.

        Clients that already hold a job are skipped. Each call is one seeded draw (seed, server
        version + 1, draw number), so the same sequence of calls selects the same clients."""
        candidates = [c if isinstance(c, ClientInfo) else ClientInfo(c) for c in idle]
        candidates = [c for c in candidates if c.client_id not in self._leases]
        n = min(self.free_slots, len(candidates))
        if n <= 0:
            return []
        infos = client_infos_for([c.client_id for c in candidates], {c.client_id: c for c in candidates},
                                 sizes=self._client_sizes, last_rounds=self._last_applied)
        drawn = self.selector.draw(self.version + 1, infos, n, draw=self._draws)
        self._draws += 1
        tasks = []
        for cid in drawn.selected:
            job = len(self.jobs)
            task = AsyncTask(job, cid, self.version, self.instructions(cid, job))
            self._leases[cid] = task
            if self.version not in self._snapshots:
                self._snapshots[self.version] = self.global_vector.clone()
            self.jobs.append(JobRecord(job, cid, self.version, float(now), probability=drawn.probabilities.get(cid)))
            tasks.append(task)
        return tasks

    def cancel(self, client_id: ClientId, now: float = 0.0) -> None:
        """Free a client's slot without an update (it left, or the driver gave up on it)."""
        task = self._leases.pop(client_id, None)
        if task is not None:
            self.jobs[task.job] = replace(self.jobs[task.job], status="cancelled", finished_at=float(now))
            self._ended(task.job, accepted=False)
            self._prune()

    def _ended(self, job: int, *, accepted: bool) -> None:
        j = self.jobs[job]
        self.participation.record_round(j.version, [j.client_id], [j.client_id] if accepted else [],
                                        None if j.probability is None else {j.client_id: j.probability})

    # ------------------------------------------------------------------ updates
    def submit(self, update: ClientUpdate, now: float = 0.0) -> AsyncOutcome:
        """Accept one update, or raise :class:`UpdateRejected` (reasons: not_dispatched,
        wrong_version, finished, too_stale, and the shape/finiteness checks of every update)."""
        task = self._leases.get(update.client_id)
        if task is None:
            raise UpdateRejected("not_dispatched", f"client {update.client_id} holds no job")
        if update.round != task.version:
            raise UpdateRejected("wrong_version", f"client {update.client_id} was given model version {task.version}, "
                                 f"its update says {update.round}")
        if self.finished:
            self.cancel(update.client_id, now)
            raise UpdateRejected("finished", f"the run has finished its {self.cfg.num_rounds} server updates")
        check_update(update, self.spec.numel)  # a malformed upload keeps the job open: the client may resend
        staleness = self.version - task.version
        del self._leases[update.client_id]
        job = replace(self.jobs[task.job], finished_at=float(now), staleness=staleness)
        limit = self.cfg.async_max_staleness
        if limit is not None and staleness > limit:
            self.jobs[task.job] = replace(job, status="refused")
            self._ended(task.job, accepted=False)
            self._prune()
            raise UpdateRejected("too_stale", f"update of client {update.client_id} is {staleness} server updates old, "
                                 f"more than async_max_staleness={limit}")
        base = self._snapshots.get(task.version) if self.rule.needs_base else None
        step = self.rule.receive(self.global_vector, base, update.delta, staleness, update.metrics.get("train_loss"))
        self.jobs[task.job] = replace(job, status="accepted", weight=step.weight)
        self._ended(task.job, accepted=True)
        self._step_jobs.append(task.job)
        self._step_bytes += int(update.wire_bytes)
        record = self._server_step(step.new_global, step.train_loss, now) if step.new_global is not None else None
        self._prune()
        return AsyncOutcome(task.job, update.client_id, staleness, step.weight,
                            "applied" if record is not None else "buffered", self.version, record)

    def evaluation_due(self, version: int) -> bool:
        return version % self.cfg.evaluation_frequency == 0 or version >= self.cfg.num_rounds

    def _server_step(self, new_global: torch.Tensor, train_loss: float | None, now: float) -> AsyncRecord:
        if not bool(torch.isfinite(new_global).all()):
            raise FloatingPointError(f"server update {self.version + 1}: the global model is no longer finite; lower "
                                     f"async_alpha, server_learning_rate or learning_rate")
        self.global_vector = new_global
        self.version += 1
        stalenesses = []
        for j in self._step_jobs:
            self.jobs[j] = replace(self.jobs[j], applied_in=self.version)
            self._last_applied[self.jobs[j].client_id] = self.version
            stalenesses.append(int(self.jobs[j].staleness or 0))
        test = self.evaluator(self.global_vector) if self.evaluator is not None and self.evaluation_due(self.version) else None
        record = AsyncRecord(round=self.version, test_accuracy=None if test is None else test.accuracy,
                             test_loss=None if test is None else test.loss, train_loss=train_loss,
                             clients=len(self._step_jobs), seconds=time.perf_counter() - self._step_started,
                             bytes=self._step_bytes, time=float(now),
                             staleness_mean=float(np.mean(stalenesses)) if stalenesses else 0.0,
                             staleness_max=max(stalenesses, default=0))
        self.history.append(record)
        self._step_jobs, self._step_bytes, self._step_started = [], 0, time.perf_counter()
        return record

    def _prune(self) -> None:
        """Drop model versions no open job trains on (memory: one model per distinct open version)."""
        wanted = {t.version for t in self._leases.values()}
        for v in [v for v in self._snapshots if v not in wanted]:
            del self._snapshots[v]

    # ------------------------------------------------------------------ reports
    def staleness_summary(self) -> dict[str, Any]:
        """Distribution of the staleness of accepted updates, and what was refused or cancelled."""
        accepted = [j.staleness for j in self.jobs if j.status == "accepted" and j.staleness is not None]
        values = np.asarray(accepted, dtype=np.float64)
        hist: dict[str, int] = {}
        for s in sorted(accepted):
            hist[str(s)] = hist.get(str(s), 0) + 1
        return {
            "accepted": len(accepted),
            "refused_too_stale": sum(1 for j in self.jobs if j.status == "refused"),
            "cancelled": sum(1 for j in self.jobs if j.status == "cancelled"),
            "in_flight": len(self._leases),
            "buffered": self.rule.pending,
            "mean": float(values.mean()) if len(values) else None,
            "median": float(statistics.median(accepted)) if accepted else None,
            "p90": float(np.percentile(values, 90)) if len(values) else None,
            "max": int(values.max()) if len(values) else None,
            "histogram": hist,
        }

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"algorithm": cfg.async_algorithm, "concurrency": self.concurrency,
                               "staleness_function": self.rule.staleness.describe(),
                               "max_staleness": cfg.async_max_staleness}
        if isinstance(self.rule, FedAsyncRule):
            out["alpha"] = self.rule.alpha
        else:
            out.update(buffer_k=cfg.fedbuff_k, server_learning_rate=cfg.server_learning_rate)
        return out

    def privacy_status(self) -> dict[str, Any]:
        """Differential privacy is refused in async mode (fl_common/config/schema.py)."""
        return {"differential_privacy": False}

    def history_csv(self) -> str:
        return rows_to_csv(ASYNC_HISTORY_COLUMNS, [r.to_row() for r in self.history])

    def jobs_csv(self) -> str:
        return rows_to_csv(JOB_COLUMNS, [j.to_row() for j in self.jobs])

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "global_vector": self.global_vector.clone(),
            "spec": self.spec.to_json(),
            "snapshots": [[v, t.clone()] for v, t in sorted(self._snapshots.items())],
            "leases": [t.to_json() for t in self._leases.values()],
            "jobs": [j.to_row() for j in self.jobs],
            "history": [r.to_row() for r in self.history],
            "rule": self.rule.state_dict(),
            "strategy": self.strategy.state_dict(),
            "draws": self._draws,
            "step_jobs": list(self._step_jobs),
            "step_bytes": self._step_bytes,
            "participation": self.participation.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ParamSpec.from_json(state["spec"]) != self.spec:
            raise ValueError("checkpoint was written for a different model")
        self.version = int(state["version"])
        self.global_vector = state["global_vector"].to(torch.float32).clone()
        self._snapshots = {int(v): t.to(torch.float32).clone() for v, t in state["snapshots"]}
        self._leases = {}
        for data in state["leases"]:
            task = AsyncTask.from_json(data)
            self._leases[task.client_id] = task
        self.jobs = [JobRecord.from_row(r) for r in state["jobs"]]
        self.history = [AsyncRecord.from_row(r) for r in state["history"]]
        self.rule.load_state_dict(state["rule"])
        self.strategy.load_state_dict(state["strategy"])
        self._draws = int(state["draws"])
        self._step_jobs = [int(j) for j in state["step_jobs"]]
        self._step_bytes = int(state["step_bytes"])
        self.participation.load_state_dict(state.get("participation"))
        self._last_applied = {}
        for j in self.jobs:
            if j.applied_in is not None:
                self._last_applied[j.client_id] = max(self._last_applied.get(j.client_id, 0), j.applied_in)
        self._step_started = time.perf_counter()
