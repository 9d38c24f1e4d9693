"""The asynchronous simulation: the real AsyncCoordinator and the real client trainer on a
virtual clock, so that slow clients really deliver stale updates.

Why a virtual clock. Training all clients on 2 cores says nothing about how long a phone would
take; instead each client has a simulated speed (``client_speeds``) and a job of n samples and E
epochs *finishes* at dispatch time + E n seconds_per_sample + 2 x transfer. Events are processed
in finish-time order from a heap (ties by job id), ``async_concurrency`` jobs are out at once,
and every arrival frees a slot that the selection policy refills at the same virtual time.
Staleness is therefore a property of the simulated federation, not of this machine's load,
and a run is reproducible bit for bit.

Training itself is lazy: a job's update is computed only when its finish event comes up, and
then together with every other open job that trains on the same model version, in one call of
the synchronous driver's executor (so the worker pool trains them in parallel). Results do not
depend on that batching, because every job is seeded by (seed, job, client).

Output (run folder): ``history.csv`` (one row per server update; see
fl_server/asynchronous/records.py), ``updates.csv`` (one row per job), ``participation_rounds.csv``,
``summary.json`` (with the staleness distribution and the fairness summary), ``checkpoint.pt``
(after every evaluated server update, and when ``train`` returns), ``model.pt`` and the report.

    from fl_server.simulation import AsyncSimulation
    with AsyncSimulation({..., "training_mode": "async", "async_algorithm": "fedbuff"}, "runs/a") as sim:
        sim.train()
        sim.save_results()
"""

from __future__ import annotations

import heapq
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tqdm import tqdm

from fl_common.config import ConfigError, FLConfig
from fl_common.protocol import ClientUpdate
from fl_common.tensors import unflatten
from fl_server.asynchronous import (
    AsyncCoordinator,
    AsyncOutcome,
    AsyncRecord,
    AsyncTask,
)
from fl_server.simulation.base import SimulationBase
from fl_server.strategies import UpdateRejected

log = logging.getLogger("fl_server.simulation")

__all__ = ["AsyncSimulation"]


class AsyncSimulation(SimulationBase[AsyncCoordinator]):
    """The asynchronous in-process driver: the real :class:`~fl_server.asynchronous.AsyncCoordinator`
    on a virtual clock (see the module docstring)."""

    training_modes = ("async",)

    def __init__(self, config: FLConfig | Mapping[str, Any] | str | Path, output_dir: str | Path | None = None, *,
                 resume: bool = False, progress: bool | None = None) -> None:
        super().__init__(config, output_dir, resume=resume, progress=progress)
        self.clock = 0.0  # virtual seconds since the run began
        self._events: list[tuple[float, int]] = []  # (finish time, job)
        self._tasks: dict[int, AsyncTask] = {}  # open jobs by id
        self._results: dict[int, ClientUpdate] = {}  # updates computed ahead of their finish event
        self.coordinator = AsyncCoordinator(self.cfg, self.evaluator_trainer.vector(), self.spec,
                                            evaluator=self.evaluate_vector,
                                            client_sizes={cid: len(p) for cid, p in enumerate(self.partitions)},
                                            driver_features=("attacks", "client_infos"))
        state = self.checkpoint_to_resume()
        if state is not None:
            self._restore(state)
        self.finish_setup()
        if not self._events:
            self._schedule(self.coordinator.leases.values())

    # ------------------------------------------------------------------ internals
    def _restore(self, state: dict[str, Any]) -> None:
        assert self.run_dir is not None
        if "driver" not in state:
            raise ConfigError(f"cannot resume '{self.run_dir.path}' asynchronously: it holds a synchronous run")
        self.check_resumable(state["config"])
        self.coordinator.load_state_dict(state["coordinator"])
        self.clock = float(state["driver"]["clock"])
        self.load_residual_state(state.get("error_feedback"))
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        self._schedule(self.coordinator.leases.values())  # finish times follow from dispatch times
        log.info("resumed %s after server update %d (virtual time %.1f s)", self.run_dir.path, self.coordinator.version,
                 self.clock)

    def _checkpoint(self, wall_seconds: float) -> None:
        if self.run_dir is None:
            return
        self.run_dir.save_checkpoint({"config": self.cfg.to_dict(), "coordinator": self.coordinator.state_dict(),
                                      "driver": {"clock": self.clock}, "error_feedback": self.residual_state(),
                                      "wall_seconds": wall_seconds})
        self.prune_residuals()
        self.run_dir.write_text("history.csv", self.coordinator.history_csv())

    # ------------------------------------------------------------------ the event loop
    def _duration(self, client: int) -> float:
        return self.speeds.job_seconds(client, len(self.partitions[client]), self.cfg.local_epochs)

    def _schedule(self, tasks: Iterable[AsyncTask]) -> None:
        for task in tasks:
            dispatched = self.coordinator.jobs[task.job].dispatched_at
            self._tasks[task.job] = task
            heapq.heappush(self._events, (dispatched + self._duration(task.client_id), task.job))

    def _fill_slots(self) -> None:
        coord = self.coordinator
        idle = [self.client_infos[c] for c in range(self.cfg.num_clients) if c not in coord.leases]
        tasks = coord.dispatch(idle, now=self.clock)
        for _ in tasks:
            coord.add_bytes(4 * self.spec.numel)  # each client downloads the model
        self._schedule(tasks)

    def _result(self, task: AsyncTask) -> ClientUpdate:
        """The job's update, training it (and every open job on the same version) if not done yet."""
        if task.job not in self._results:
            batch = [task] + [t for t in self._tasks.values() if t.version == task.version and t.job not in self._results]
            jobs = {t.client_id: t.job for t in batch}
            executor = self.executor()
            for update in executor.run_round(self.coordinator.model(task.version),
                                             {t.client_id: t.instructions for t in batch}):
                self._results[jobs[update.client_id]] = update
        return self._results.pop(task.job)

    def step(self) -> AsyncOutcome | None:
        """Advance the clock to the next finishing job and hand its update to the coordinator.

        Returns the outcome, or None when the update was refused as too stale."""
        if not self._events:
            self._fill_slots()
            if not self._events:
                raise RuntimeError("no client is training and none can be dispatched")
        finish, job = heapq.heappop(self._events)
        self.clock = finish
        task = self._tasks.pop(job)
        update = self._result(task)
        if self.attack is not None and self.attack.apply(update):
            update.wire_bytes = 0  # a worker may have encoded the honest delta: encode the noise instead
        self.through_codec(update, task.version)
        outcome: AsyncOutcome | None
        try:
            outcome = self.coordinator.submit(update, now=self.clock)
        except UpdateRejected as exc:
            if exc.reason != "too_stale":
                raise
            log.debug("%s", exc)
            outcome = None
        self._fill_slots()
        return outcome

    @property
    def history(self) -> list[AsyncRecord]:
        return self.coordinator.history

    def train(self, rounds: int | None = None) -> list[AsyncRecord]:
        """Run until ``num_rounds`` server updates (or ``rounds`` more), checkpointing after every
        evaluated server update and on return."""
        coord = self.coordinator
        target = self.cfg.num_rounds if rounds is None else min(self.cfg.num_rounds, coord.version + rounds)
        start = time.perf_counter()
        if coord.version < target:
            self.executor()
            if self.ready_seconds is None:
                self.ready_seconds = time.time() - psutil.Process().create_time()
        bar = tqdm(total=self.cfg.num_rounds, initial=coord.version, desc="server updates", unit="update",
                   disable=(None if self.progress is None else not self.progress), file=sys.stderr, dynamic_ncols=True)
        try:
            if not self._events and coord.version < target:
                self._fill_slots()
            while coord.version < target:
                outcome = self.step()
                record = outcome.record if outcome is not None else None
                if record is None:
                    continue
                bar.update(1)
                if record.test_accuracy is not None:
                    bar.set_postfix(acc=f"{record.test_accuracy:.4f}", staleness=f"{record.staleness_mean:.1f}")
                    log.info("server update %d (virtual %.1f s): test accuracy %.4f, test loss %.4f, staleness mean %.2f",
                             record.round, record.time, record.test_accuracy, record.test_loss, record.staleness_mean)
                    if coord.version < target:
                        self._checkpoint(self.wall_seconds_before + time.perf_counter() - start)
        finally:
            bar.close()
        self.wall_seconds_before += time.perf_counter() - start
        self._checkpoint(self.wall_seconds_before)
        return coord.history

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, Any]:
        coord = self.coordinator
        sps = self.speeds.seconds_per_sample
        job_seconds = np.asarray([self._duration(c) for c in range(self.cfg.num_clients)])
        return {
            **super().summary(),
            "training_mode": "async",
            "server_updates": coord.version,
            "asynchronous": coord.describe(),
            "virtual_seconds": self.clock,
            "staleness": coord.staleness_summary(),
            "client_speeds": {
                "distribution": self.cfg.client_speed_distribution,
                "seconds_per_sample": {"min": float(sps.min()), "median": float(np.median(sps)), "max": float(sps.max())},
                "job_seconds": {"min": float(job_seconds.min()), "median": float(np.median(job_seconds)),
                                "max": float(job_seconds.max())},
            },
        }

    def save_results(self) -> dict[str, Any]:
        summary = self.summary()
        if self.run_dir is not None:
            self.run_dir.write_text("history.csv", self.coordinator.history_csv())
            self.run_dir.write_text("updates.csv", self.coordinator.jobs_csv())
            self.run_dir.write_text("participation_rounds.csv", self.coordinator.participation.to_csv())
            self.run_dir.write_json("summary.json", summary)
            self.run_dir.save_model(unflatten(self.coordinator.global_vector, self.spec))
            from fl_server.reports import (
                write_report_logged,  # lazily: keeps matplotlib out of startup
            )

            write_report_logged(self.run_dir.path)
        return summary
