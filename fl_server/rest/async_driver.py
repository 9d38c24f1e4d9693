"""The REST driver of asynchronous training (``training_mode: async``): FedAsync and FedBuff over HTTP.

``FederationService`` picks an :class:`AsyncRoundDriver` instead of the synchronous one when the
configuration asks for asynchronous training; polls, model downloads, uploads, ticks, ``/status``
and ``summary.json`` go to it. Registration, authentication, signatures, profiles, the upload's
decryption and checks are the :class:`~fl_server.rest.gateway.ClientGateway`'s and shared by
both modes. The algorithm is :class:`fl_server.asynchronous.AsyncCoordinator`, the very object
the asynchronous simulation drives.

The protocol, as a client sees it (the synchronous endpoints, reinterpreted):

* ``GET /api/v1/round``: when a training slot is free the policy draws among the idle live
  clients (those holding no job; under a policy other than uniform, only those whose profile
  arrived) and each drawn client gets a job. A client holding one is answered ``selected`` with
  ``job``, ``round`` = the model version to train on, its instructions and ``deadline`` =
  dispatch time + ``round_timeout``; others are answered ``waiting``.
* ``GET /api/v1/model?version=V``: that version's weights, for as long as a job trains on it
  (ETag ``"vV"``, one hybrid-encrypted body cached per version); 409 ``version_gone`` after.
  Without ``version``: the current model.
* ``POST /api/v1/rounds/V/update``: the job's update. 202 with ``status`` applied (the global
  model moved) or buffered (FedBuff) and its ``staleness`` (server updates since version V).
  409 ``not_dispatched`` (no job: never given, cancelled at its deadline, or already answered),
  ``wrong_version``, ``too_stale`` (``async_max_staleness``), ``finished``; 400/422 for a body
  that does not decrypt, decode or check (shape, finiteness), which leaves the job open.
  A retry with the same ``Idempotency-Key`` is answered 202 again from the store (the job is gone
  by then) and counted once.

Durability: every change of the coordinator (a dispatch, an accepted or refused update, a
cancelled job) is followed, before the lock is released and before anyone hears of it, by an
atomic checkpoint of ``AsyncCoordinator.state_dict()`` (global model, versions still trained on,
open jobs, FedBuff's buffer, records). An accepted update is first fsynced to a payload file and
committed to the store with its idempotency key, then checkpointed, then answered 202. A server
killed between the commit and the checkpoint replays that update from its payload file on restart
(the restored coordinator still holds the job open), so ``kill -9`` loses nothing accepted.
Payload files are kept, as the synchronous driver keeps its round attempts' updates.

Run folder: ``history.csv`` (one row per server update, with ``time`` = server clock and the
staleness of the updates folded in), and when the run ends ``updates.csv`` (one row per job),
``participation_rounds.csv`` (per job: round = the version trained on, arrived = accepted, the
client's inclusion probability), ``summary.json`` (staleness distribution, fairness, selection),
``model.pt`` and the report (``participation.csv`` is its per-client table).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from fl_common.config import ConfigError
from fl_common.crypto import Envelope
from fl_common.protocol import ClientUpdate
from fl_common.protocol.rest import ROUND_FINISHED, ROUND_SELECTED, ROUND_WAITING, RoundStatus
from fl_common.tensors import unflatten, wire
from fl_server.asynchronous import AsyncCoordinator, AsyncRecord, AsyncTask
from fl_server.rest.driver import PARTICIPATION_ROUNDS_CSV, DriverContext, ModelPayload, RoundDriver, SelectionProblems
from fl_server.rest.gateway import ASYNC_FEATURES, ApiError, Authenticated, Registration, UploadLayout
from fl_server.store import accuracy_summary
from fl_server.store.run_dir import atomic_write_bytes as fsync_write
from fl_server.store.sqlite import AsyncUpdateRow
from fl_server.strategies import UpdateRejected

log = logging.getLogger("fl_server.rest.async_driver")

__all__ = ["AsyncRoundDriver", "CONFLICT_REASONS"]

#: refusals of an upload that is well formed but not wanted (HTTP 409); shape and finiteness are 422
CONFLICT_REASONS = ("not_dispatched", "wrong_version", "finished", "too_stale")


class AsyncRoundDriver(RoundDriver):
    """Asynchronous rounds-free training behind the REST endpoints of ``FederationService``.

    Every method that touches the coordinator runs under the service lock (``ctx.lock``), as
    the synchronous path does, so HTTP threads and the ticker never interleave inside it."""

    mode = "async"

    def __init__(self, ctx: DriverContext) -> None:
        super().__init__(ctx)
        self._coordinator = AsyncCoordinator(self.cfg, ctx.trainer.vector(), ctx.trainer.spec, evaluator=ctx.evaluator,
                                             driver_features=ASYNC_FEATURES)
        self.layout = UploadLayout(self._coordinator.spec.numel)
        self.selection_problems = SelectionProblems(self.cfg.selection)
        self.updates_dir = ctx.updates_dir / "async"
        #: version -> (body, model key): one encrypted body per version a client may still download
        self._models: dict[int, tuple[bytes, bytes | None]] = {}
        self._mirrored: dict[int, str] = {}  # job -> status last written to the store's async_jobs
        self._results_written = False
        #: updates refused because the server step they caused was not finite (/status, /metrics)
        self.unusable_aggregates = 0

    @property
    def coordinator(self) -> AsyncCoordinator:
        return self._coordinator

    @property
    def history(self) -> Sequence[AsyncRecord]:
        return self._coordinator.history

    def client_registered(self, registration: Registration) -> None:
        if registration.reregistered:  # it lost its state: the job it held will not come back
            self.client_left(registration.client_id, "registered again")

    # ------------------------------------------------------------------ durability
    def recover(self) -> None:
        """Continue where a previous process stopped: the checkpoint, then any accepted update it does not cover."""
        svc, coord = self.ctx, self.coordinator
        if svc.run_dir.has_checkpoint():
            state = svc.run_dir.load_checkpoint()
            if (state.get("driver") or {}).get("mode") != "async":
                raise ConfigError(f"{svc.run_dir.path} holds a synchronous run: set training_mode: sync, or use a new --state-dir")
            coord.load_state_dict(state["coordinator"])
            log.info("restored the asynchronous run at model version %d (%d jobs open, %d update(s) buffered)", coord.version,
                     len(coord.leases), coord.rule.pending)
        replayed = 0
        for client_id, task in sorted(coord.leases.items(), key=lambda kv: kv[1].job):
            row = svc.store.async_update_for_job(task.job)
            if row is None:
                continue
            # accepted and committed, but the process died before the checkpoint that covers it
            data = Path(row.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise RuntimeError(f"durable update {row.path} does not match its recorded hash")
            vector, _ = wire.decode_update(data, coord.spec.numel, max_bytes=self.cfg.max_update_bytes)
            outcome = coord.submit(ClientUpdate(client_id, row.version, vector, row.num_samples, row.metrics, row.nbytes),
                                   now=row.accepted_at)
            if outcome.record is not None:
                svc.run_dir.write_text("history.csv", coord.history_csv())
            replayed += 1
        self._persist(mirror_all=True)  # also the first checkpoint of a new run: _reload always has one to go back to
        if replayed:
            log.info("replayed %d accepted update(s) the last checkpoint did not cover", replayed)
        self._results_written = coord.finished and (svc.run_dir.path / "summary.json").is_file()

    def _checkpoint(self) -> None:
        svc = self.ctx
        svc.run_dir.save_checkpoint({"config": self.cfg.to_dict(), "coordinator": self.coordinator.state_dict(),
                                     "driver": {"mode": "async"}, "wall_seconds": svc.clock() - svc.started_at})

    def _persist(self, *, mirror_all: bool = False) -> None:
        """Checkpoint the coordinator, mirror its job records into the store, drop model bodies no one needs."""
        self._checkpoint()
        jobs = self.coordinator.jobs
        if mirror_all:
            self._mirrored = {}
        changed = [(j.job, str(j.client_id), j.version, j.status) for j in jobs if self._mirrored.get(j.job) != j.status]
        if changed or mirror_all:
            self.ctx.store.upsert_async_jobs(changed, replace_all=mirror_all)
            self._mirrored.update({job: status for job, _, _, status in changed})
        wanted = {self.coordinator.version} | {t.version for t in self.coordinator.leases.values()}
        for version in [v for v in self._models if v not in wanted]:
            del self._models[version]

    def _reload(self) -> None:
        """Back to the last checkpoint: the coordinator must never hold an update the store does not."""
        self.coordinator.load_state_dict(self.ctx.run_dir.load_checkpoint()["coordinator"])

    # ------------------------------------------------------------------ scheduling
    def _dispatch(self, now: float) -> list[AsyncTask]:
        """Fill free training slots with idle live clients drawn by the selection policy (no checkpoint)."""
        svc, coord = self.ctx, self.coordinator
        if coord.finished or coord.free_slots == 0:
            return []
        ids, infos = svc.gateway.selection_candidates(svc.gateway.live_clients())
        idle = [infos[cid] if infos is not None else cid for cid in ids if coord.task_for(cid) is None]
        if not idle:
            return []
        try:
            tasks = coord.dispatch(idle, now=now)
        except ValueError as exc:  # a policy that cannot draw among these candidates waits for others
            if self.cfg.selection == "uniform":
                raise
            self.selection_problems.failed(exc)
            return []
        self.selection_problems.cleared()
        for task in tasks:
            log.info("job %d: client %s trains on model version %d", task.job, task.client_id, task.version)
        return tasks

    def _expire(self, now: float) -> bool:
        """Cancel jobs past their deadline (dispatch + round_timeout): the slot goes to another client."""
        coord = self.coordinator
        expired = [cid for cid, task in coord.leases.items()
                   if now >= coord.jobs[task.job].dispatched_at + self.cfg.round_timeout]
        for cid in expired:
            job = coord.leases[cid].job
            coord.cancel(cid, now)
            log.warning("job %d of client %s cancelled: no update within round_timeout=%g s", job, cid, self.cfg.round_timeout)
        return bool(expired)

    def tick(self) -> None:
        """The ticker's turn: cancel overdue jobs, refill slots, write the results once the run has ended."""
        svc = self.ctx
        with svc.lock:
            now = svc.clock()
            changed = self._expire(now)
            if not self.coordinator.finished:
                changed = bool(self._dispatch(now)) or changed
            if changed:
                self._persist()
            if self.coordinator.finished:
                self._finish()

    def client_left(self, client_id: str, why: str) -> None:
        """Free the slot of a client that will not deliver its job (call under the service lock)."""
        task = self.coordinator.task_for(client_id)
        if task is not None:
            self.coordinator.cancel(client_id, self.ctx.clock())
            self._persist()
            log.info("job %d of client %s cancelled: %s", task.job, client_id, why)

    # ------------------------------------------------------------------ polling and model download
    def round_status(self, auth: Authenticated) -> RoundStatus:
        svc, coord, cfg = self.ctx, self.coordinator, self.cfg
        svc.wake.set()
        with svc.lock:
            if coord.finished:
                return RoundStatus(ROUND_FINISHED, None, coord.version, 0.0)
            task = coord.task_for(auth.client_id)
            if task is None and self._dispatch(svc.clock()):
                self._persist()  # durable before anyone is told of the job
                task = coord.task_for(auth.client_id)
            if task is None:
                return RoundStatus(ROUND_WAITING, None, coord.version, cfg.poll_interval)
            deadline = coord.jobs[task.job].dispatched_at + cfg.round_timeout
            return RoundStatus(ROUND_SELECTED, task.version, coord.version, cfg.poll_interval, deadline,
                               task.instructions.to_json(), job=task.job)

    def model_version(self, requested: int | None) -> int:
        """The version a download asks for (None: the current one), if the server still holds it."""
        coord = self.coordinator
        with self.ctx.lock:
            if requested is None:
                return coord.version
            try:
                coord.model(requested)
            except KeyError:
                raise ApiError(409, "version_gone", f"model version {requested} is no longer held (current version "
                                                    f"{coord.version}): no job trains on it; poll for a new job") from None
            return requested

    def model_payload(self, auth: Authenticated, requested: int) -> ModelPayload:
        """(version, body, wrapped model key) of one model version; hybrid encryption as in the synchronous
        download: each version is packed and encrypted once, its key wrapped for each client."""
        coord, cfg = self.coordinator, self.cfg
        with self.ctx.lock:
            version = self.model_version(requested)
            if version not in self._models:
                packed = wire.encode_update(coord.model(version), cfg.download_wire_codec, cfg.wire_compression,
                                            meta={"version": version, "spec": coord.spec.to_json(), "server_control": False})
                if cfg.encryption:
                    key = Fernet.generate_key()
                    self._models[version] = (Envelope(key).seal(packed), key)
                else:
                    self._models[version] = (packed, None)
            body, model_key = self._models[version]
        return version, body, (Envelope(auth.keys).seal(model_key) if model_key is not None else None)

    # ------------------------------------------------------------------ updates
    def _refuse(self, reason: str, client_id: str, message: str) -> Exception:
        self.ctx.gateway.reject_update(reason, client_id)
        return ApiError(409 if reason in CONFLICT_REASONS or reason == "idempotency_key_reused" else 422, reason, message)

    def _expected(self, client_id: str, version: int) -> AsyncTask:
        coord = self.coordinator
        if coord.finished:
            raise self._refuse("finished", client_id, f"the run has finished its {self.cfg.num_rounds} server updates")
        task = coord.task_for(client_id)
        if task is None:
            raise self._refuse("not_dispatched", client_id, "this client holds no job (none was given, it was cancelled after "
                                                            "round_timeout, or its update was already answered); poll for one")
        if task.version != version:
            raise self._refuse("wrong_version", client_id, f"this client's job trains on model version {task.version}, the "
                                                           f"upload is for version {version}")
        return task

    def _answer_retry(self, client_id: str, version: int, idempotency_key: str) -> dict[str, Any] | None:
        """The answer to a retry of an accepted upload (same key), or None when the key is new."""
        row = self.ctx.store.async_update_by_key(client_id, idempotency_key)
        if row is None:
            return None
        if row.version != version:
            raise self._refuse("idempotency_key_reused", client_id, f"this Idempotency-Key was used for an update of version "
                                                                    f"{row.version}, not {version}")
        return {"accepted": True, "round": version, "job": row.job, "duplicate": True, "status": row.status,
                "staleness": row.staleness, "model_version": self.coordinator.version}

    def accept_update(self, auth: Authenticated, version: int, idempotency_key: str, body: bytes,
                      attempt: str | None = None) -> dict[str, Any]:
        """An upload for the job on model ``version`` (``attempt`` is a secure round's and unused here)."""
        svc, coord = self.ctx, self.coordinator
        client_id = auth.client_id
        svc.gateway.check_idempotency_key(client_id, idempotency_key)
        retry = self._answer_retry(client_id, version, idempotency_key)
        if retry is not None:
            return retry
        with svc.lock:
            self._expected(client_id, version)  # cheap early refusal; checked again below
        packed, update = svc.gateway.open_update(auth, version, body, self.layout)  # decrypt, decode, check: outside the lock
        with svc.lock:
            retry = self._answer_retry(client_id, version, idempotency_key)
            if retry is not None:
                return retry
            task = self._expected(client_id, version)
            now = svc.clock()
            path = self.updates_dir / f"job{task.job:08d}-{client_id}.bin"
            fsync_write(path, packed)
            t0 = time.perf_counter()
            try:
                outcome = coord.submit(update, now=now)
            except UpdateRejected as exc:
                path.unlink(missing_ok=True)
                self._persist()  # a refusal as too stale ends the job: as durable as any other change
                raise self._refuse(exc.reason, client_id, str(exc)) from None
            except FloatingPointError as exc:  # the server step would leave a non-finite model: refused, nothing applied
                path.unlink(missing_ok=True)
                self._reload()
                self.unusable_aggregates += 1
                raise self._refuse("unusable_update", client_id, f"this update would make the global model non-finite "
                                   f"({exc}); it is refused and the model is unchanged") from None
            except Exception:  # back to the last consistent state
                path.unlink(missing_ok=True)
                self._reload()
                raise
            close_seconds = time.perf_counter() - t0
            try:
                svc.store.add_async_update(AsyncUpdateRow(task.job, version, client_id, idempotency_key, str(path),
                                                          hashlib.sha256(packed).hexdigest(), update.num_samples, update.metrics,
                                                          len(body), now, outcome.staleness, outcome.status))
            except BaseException:
                self._reload()
                raise
            self._dispatch(now)  # the freed slot, refilled under the same checkpoint
            self._persist()
            if outcome.record is not None:
                self._stepped(outcome.record, close_seconds)
            if coord.finished:
                self._finish()
        svc.wake.set()
        log.info("job %d of client %s: update %s (staleness %d)%s", outcome.job, client_id, outcome.status, outcome.staleness,
                 f", model version {outcome.version}" if outcome.record is not None else "")
        return {"accepted": True, "round": version, "job": outcome.job, "duplicate": False, "status": outcome.status,
                "staleness": outcome.staleness, "model_version": outcome.version}

    def _stepped(self, record: AsyncRecord, close_seconds: float) -> None:
        svc = self.ctx
        svc.run_dir.write_text("history.csv", self.coordinator.history_csv())
        acc = f", test accuracy {record.test_accuracy:.4f}" if record.test_accuracy is not None else ""
        log.info("server update %d from %d client update(s), staleness mean %.2f max %d%s", record.round, record.clients,
                 record.staleness_mean, record.staleness_max, acc)
        svc.observers.round_closed(record, reason="server_update", selected=record.clients, arrived=record.clients,
                                   close_seconds=close_seconds)

    def _finish(self) -> None:
        """The results of a finished run, once (also after a restart that finds them missing)."""
        if self._results_written:
            return
        svc, coord = self.ctx, self.coordinator
        run = svc.run_dir
        run.write_text("history.csv", coord.history_csv())
        run.write_text("updates.csv", coord.jobs_csv())
        run.write_text(PARTICIPATION_ROUNDS_CSV, coord.participation.to_csv())
        run.write_json("summary.json", self.summary())
        run.save_model(unflatten(coord.global_vector, coord.spec))
        self._results_written = True
        log.info("run finished after %d server updates; results in %s", coord.version, run.path)
        svc.observers.run_finished(svc)

    # ------------------------------------------------------------------ monitoring
    def async_block(self) -> dict[str, Any]:
        coord = self.coordinator
        return {**coord.describe(), "model_version": coord.version, "server_updates": coord.version,
                "updates_applied": sum(r.clients for r in coord.history), "buffered": coord.rule.pending,
                "in_flight": len(coord.leases), "jobs_dispatched": len(coord.jobs), "staleness": coord.staleness_summary()}

    def status_fields(self) -> dict[str, Any]:
        coord = self.coordinator
        with self.ctx.lock:
            return {
                "state": "finished" if coord.finished else ("training" if coord.leases else "waiting_for_clients"),
                "completed_rounds": coord.version,
                "model_version": coord.version,
                "current_round": None,
                "unusable_aggregates": self.unusable_aggregates,
                "asynchronous": self.async_block(),
            }

    def summary(self) -> dict[str, Any]:
        svc, coord = self.ctx, self.coordinator
        history = coord.history
        return {
            "mode": "rest", "training_mode": "async", "rounds_completed": coord.version, "server_updates": coord.version,
            **accuracy_summary(history),
            "wall_seconds": svc.clock() - svc.started_at, "total_bytes": sum(r.bytes for r in history),
            "clients_registered": svc.store.count_clients(), "rejected": svc.gateway.refusals.rejections(),
            "encryption": self.cfg.encryption,
            "privacy": coord.privacy_status(), "stop_reason": coord.stop_reason, "asynchronous": self.async_block(),
            "staleness": coord.staleness_summary(), "selection": self.selection_summary(),
            "participation": self.participation_summary(), "config": self.cfg.to_dict(),
        }
