"""Synchronous rounds over REST: the coordinator's round state machine, driven by polls and a ticker.

Rules it keeps:

- An update is made durable (payload file fsynced, row committed) before it is folded into the
  aggregate and before the client hears 202. After a crash the open round is rebuilt by replaying
  its durable updates into a fresh aggregator, so nothing acknowledged is lost.
- Rounds open when enough live clients poll, close at quorum or at the deadline with whoever
  arrived (the rest are recorded as dropped), and the global model is checkpointed atomically
  after every round.
- Client selection is the coordinator's policy; each round attempt stores the inclusion
  probabilities of its selected clients, so a restart records the same participation.

What differs between plain rounds and secure-aggregation rounds (who is a candidate, how an
upload is taken, when a round may close, what a client is told) is a :class:`RoundProtocol`:
:class:`PlainRounds` here, :class:`~fl_server.rest.secure_driver.SecureRounds` for SecAgg. The
protocol calls back into this driver's public :meth:`SyncRoundDriver.close_round`,
:meth:`SyncRoundDriver.abort_round` and :meth:`SyncRoundDriver.checkpoint`.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from cryptography.fernet import Fernet

from fl_common.config import ConfigError
from fl_common.crypto import Envelope, constant_time_equals
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_common.protocol.rest import (
    ROUND_FINISHED,
    ROUND_NOT_SELECTED,
    ROUND_SELECTED,
    ROUND_SUBMITTED,
    ROUND_WAITING,
    RoundStatus,
)
from fl_common.secagg import Verifier
from fl_common.tensors import unflatten, wire
from fl_server.coordinator import Coordinator, NoEligibleClients, RoundPlan
from fl_server.privacy import BudgetExhausted, DPRound
from fl_server.rest.driver import DriverContext, ModelPayload, RoundDriver, SelectionProblems
from fl_server.rest.gateway import PLAIN_FEATURES, ApiError, Authenticated, Registration, UploadLayout
from fl_server.rest.round_timeline import RoundTimeline
from fl_server.secagg import SecureAggregator
from fl_server.selection import ClientInfo
from fl_server.store import RoundRecord, accuracy_summary
from fl_server.store.run_dir import atomic_write_bytes as fsync_write
from fl_server.store.sqlite import RoundRow, UpdateRow

log = logging.getLogger("fl_server.rest.sync_driver")

#: seconds past an open round's deadline after which /health reports the federation stalled
STALL_GRACE_SECONDS = 30.0


class RoundProtocol(abc.ABC):
    """How one synchronous round runs between opening and closing: plain uploads, or SecAgg phases."""

    #: what this protocol carries out for the coordinator (see fl_server/coordinator.py DRIVER_FEATURES)
    driver_features: tuple[str, ...] = ()
    #: whether the secure-aggregation endpoints exist
    secure: bool = False

    def attach(self, driver: SyncRoundDriver) -> None:
        """Called once by the driver it serves, after the coordinator exists."""
        self.driver = driver

    def verifier(self, client_id: int | str) -> Verifier | None:
        """What the coordinator checks a selected client's signed messages against (secure rounds)."""
        return None

    @abc.abstractmethod
    def min_live_clients(self) -> int:
        """Live candidates needed before a round may open."""

    @abc.abstractmethod
    def candidates(self, live: list[str], infos: dict[str, ClientInfo] | None
                   ) -> tuple[list[str], dict[str, ClientInfo] | None]:
        """Of the selection candidates, those this protocol can include."""

    @abc.abstractmethod
    def recover_open(self, row: RoundRow) -> bool:
        """At start-up, with an attempt still open in the store: True when this ended it (it cannot resume)."""

    def planning_may_wait(self, exc: Exception) -> bool:
        """Whether a planning error (too few clients for the protocol) means 'wait for others'."""
        return False

    def deadline_extra(self, secagg_planned: bool) -> float:
        """Seconds added to the round's deadline beyond round_timeout."""
        return 0.0

    def opened(self, row: RoundRow) -> None:
        """A new attempt was stored."""

    def work_outside_lock(self) -> bool:
        """Work of the open attempt that must not hold the service lock (the secure attempt's unmasking); called by
        the driver's tick after it released the lock. True when it did something (the driver then ticks again)."""
        return False

    @abc.abstractmethod
    def tick(self, row: RoundRow, now: float) -> None:
        """Close or abort the open attempt when it is time."""

    @abc.abstractmethod
    def round_status(self, client_id: str, row: RoundRow, instructions: dict[str, Any], version: int) -> RoundStatus:
        """A selected client's poll in the open attempt."""

    @abc.abstractmethod
    def accept_update(self, auth: Authenticated, round_number: int, attempt: str | None, idempotency_key: str,
                      body: bytes) -> dict[str, Any]:
        """An upload in this protocol's form."""

    def round_closed(self, row: RoundRow, secagg: SecureAggregator | None) -> None:
        """The attempt's aggregate was applied (before the summary of a finished run is written)."""

    def client_registered(self, registration: Registration, now: float) -> None:
        """A client registered again (its keys may have changed)."""

    def client_left(self, client_id: str, why: str, now: float) -> None:
        """A client will not take part any more (plain rounds simply close without its update)."""

    def status_fields(self) -> dict[str, Any]:
        """Extra /status fields."""
        return {}

    def summary_block(self) -> dict[str, Any]:
        """The ``secure_aggregation`` block of summary.json."""
        return {"enabled": False}


def attempt_outcome(ctx: DriverContext, auth: Authenticated, round_number: int, attempt: str | None,
                    what: str) -> dict[str, Any]:
    """GET .../outcome of a protected round (masking or CKKS): how attempt ``attempt`` ended and whether this
    client's input is in the applied sum (a SCAFFOLD client moves its control variate only then)."""
    if attempt is None or not (attempt.isascii() and attempt.isdigit()) or len(attempt) > 12:
        raise ApiError(400, "bad_attempt", "outcome needs ?attempt=ID")
    row = ctx.store.round_attempt(int(attempt))
    if row is None or row.round != round_number or row.secagg is None:
        raise ApiError(404, "unknown_attempt", f"no {what} attempt {attempt} of round {round_number}")
    if auth.client_id not in row.selected:
        raise ApiError(409, "not_selected", f"this client was not in attempt {attempt}")
    status = ctx.store.participant_status(row.round_id, auth.client_id)
    return {"round": row.round, "attempt": row.round_id, "state": row.state, "reason": row.reason,
            "in_sum": row.state == "closed" and status == "submitted"}


def abort_protected_attempt_at_restart(driver: SyncRoundDriver, row: RoundRow, reason: str) -> None:
    """A masked or CKKS attempt found open at start-up cannot go on (its sum was in memory): it is aborted.
    Under sample-level DP the clients whose inputs had arrived are charged first, as an abort in the
    running process charges them (conservative: their DP-SGD output reached the server)."""
    coord = driver.coordinator
    updates = driver.ctx.store.updates_for_round(row.round_id)
    if coord.privacy is not None and row.privacy is not None and updates:
        dp = DPRound.from_json(row.privacy)
        for u in updates:
            coord.privacy.charge_release(u.client_id, dp)
        driver.checkpoint()
    driver.ctx.store.finish_round(row.round_id, "aborted", reason, driver.ctx.clock(), [u.client_id for u in updates])


class PlainRounds(RoundProtocol):
    """Clear (encrypted in transit) updates: stored durably, replayed after a crash, summed in the clear."""

    driver_features = PLAIN_FEATURES

    def min_live_clients(self) -> int:
        return self.driver.cfg.min_clients

    def candidates(self, live: list[str], infos: dict[str, ClientInfo] | None
                   ) -> tuple[list[str], dict[str, ClientInfo] | None]:
        return live, infos

    def recover_open(self, row: RoundRow) -> bool:
        if row.secagg is None:
            return False
        self.driver.abort_mismatched(row, secure_now=False)
        return True

    def tick(self, row: RoundRow, now: float) -> None:
        """Close at quorum; at the deadline, or earlier once every selected client still out is gone (not heard
        from for ``client_liveness`` s: a daemon keeps a long-poll open while it trains, fl_client/heartbeat.py),
        close with whoever arrived, or abort below ``min_clients``: waiting longer could not bring an update."""
        driver = self.driver
        arrived = driver.coordinator.arrived
        if len(arrived) >= row.target:
            driver.close_round(row, "quorum")
            return
        at_deadline = now >= row.deadline
        if not at_deadline and not self._all_out_gone(row, {str(c) for c in arrived}):
            return
        when = "deadline" if at_deadline else "liveness"
        if len(arrived) >= driver.cfg.min_clients:
            driver.close_round(row, when)
        else:
            why = "deadline" if at_deadline else "every selected client still out is gone (client_liveness), left"
            driver.abort_round(row, f"{why} with {len(arrived)} update(s), fewer than "
                               f"min_clients={driver.cfg.min_clients}", now)

    def _all_out_gone(self, row: RoundRow, arrived: set[str]) -> bool:
        """Whether no selected client that has not uploaded yet was heard from within ``client_liveness``. Never in
        the first ``client_liveness`` s of this process: after a restart the daemons have not reached it yet."""
        out = [c for c in row.selected if c not in arrived]
        ctx = self.driver.ctx
        if not out or ctx.clock() - ctx.started_at < self.driver.cfg.client_liveness:
            return False
        live = set(ctx.gateway.live_clients())
        return not any(c in live for c in out)

    def round_status(self, client_id: str, row: RoundRow, instructions: dict[str, Any], version: int) -> RoundStatus:
        cfg = self.driver.cfg
        if client_id in self.driver.coordinator.arrived:
            return RoundStatus(ROUND_SUBMITTED, row.round, version, cfg.poll_interval, row.deadline)
        return RoundStatus(ROUND_SELECTED, row.round, version, cfg.poll_interval, row.deadline, instructions)

    def accept_update(self, auth: Authenticated, round_number: int, attempt: str | None, idempotency_key: str,
                      body: bytes) -> dict[str, Any]:
        driver = self.driver
        ctx = driver.ctx
        steps = {"received": ctx.clock()}
        gateway = ctx.gateway
        gateway.check_idempotency_key(auth.client_id, idempotency_key)
        # 1. a retry of an update we already hold: same key -> the same answer, counted once
        previous = ctx.store.accepted_update(round_number, auth.client_id)
        if previous is not None:
            if constant_time_equals(previous.idempotency_key, idempotency_key):
                return {"accepted": True, "round": round_number, "duplicate": True}
            gateway.reject_update("duplicate", auth.client_id)
            raise ApiError(409, "duplicate", f"an update for round {round_number} was already accepted from this client")
        # 2. is this client expected in this round?
        with ctx.lock:  # cheap early refusal; re-checked under the lock below
            expected = driver.check_expected(auth.client_id, round_number)
        # 3. decrypt and decode outside the lock (the expensive part)
        packed, update = gateway.open_update(auth, round_number, body, driver.layout)
        steps["opened"] = ctx.clock()
        # 4. durable, then aggregated, then acknowledged. The payload's write and fsync happen outside the lock,
        # under a name of its own (two uploads of one client never share a file); under the lock only the checks,
        # the row and the aggregate's sum. A payload that is not kept is deleted.
        path = (ctx.updates_dir / f"attempt{expected.round_id:06d}-r{round_number:05d}"
                / f"{auth.client_id}-{uuid.uuid4().hex[:12]}.bin")
        fsync_write(path, packed)
        steps["written"] = ctx.clock()
        digest = hashlib.sha256(packed).hexdigest()  # (outside the lock: ~1 ms per cnn upload)
        recorded = False
        try:
            with ctx.lock:
                try:
                    row = driver.check_expected(auth.client_id, round_number)
                    if row.round_id != expected.round_id:
                        raise ApiError(409, "round_closed", f"the attempt of round {round_number} this update was sent "
                                       f"to ended")
                except ApiError:  # the round closed meanwhile, but the server has decrypted the update: DP charges it
                    driver.coordinator.charge_refused_update(auth.client_id, round_number)
                    raise
                if ctx.store.update(row.round_id, auth.client_id) is not None:
                    raise ApiError(409, "duplicate", f"an update for round {round_number} was already accepted from this client")
                ctx.store.add_update(UpdateRow(row.round_id, round_number, auth.client_id, idempotency_key, str(path),
                                               digest, update.num_samples, update.metrics,
                                               len(body), ctx.clock()))
                recorded = True
                driver.coordinator.submit(update)
                driver.upload_accepted(steps)
        finally:
            if not recorded:
                path.unlink(missing_ok=True)
        ctx.wake.set()
        return {"accepted": True, "round": round_number, "duplicate": False}


class SyncRoundDriver(RoundDriver):
    """Synchronous rounds: plan, collect, close at quorum or deadline, checkpoint, repeat."""

    mode = "sync"

    def __init__(self, ctx: DriverContext, protocol: RoundProtocol, *,
                 partition_sizes: list[int] | None = None) -> None:
        super().__init__(ctx)
        self.protocol = protocol
        self.partition_sizes = partition_sizes
        self.selection_problems = SelectionProblems(self.cfg.selection)
        self._waiting_since: float | None = None
        self._model_cache: tuple[int, bytes, bytes | None] | None = None
        #: the open attempt's timeline (round_timeline.py), stored with its row when it ends
        self._timeline: RoundTimeline | None = None
        #: one packing of a model version at a time, outside the service lock (model_payload)
        self._model_lock = threading.Lock()
        #: attempts whose aggregate was not finite (aborted, nothing applied); /status and /metrics show it
        self.unusable_aggregates = 0
        #: clients whose updates made an aggregate unusable: not selected again in this process's lifetime
        self.excluded: set[str] = set()
        self._coordinator = Coordinator(self.cfg, ctx.trainer.vector(), ctx.trainer.spec, evaluator=ctx.evaluator,
                                        planned_client_sizes=partition_sizes, driver_features=protocol.driver_features,
                                        secagg_verifiers=protocol.verifier if protocol.secure else None)
        #: SCAFFOLD: the model download carries the server variate c after the model, and every
        #: upload carries the client's variate delta after its model delta (one vector, 2 x numel)
        self.carries_control = self._coordinator.strategy.needs_client_state
        self.layout = UploadLayout(self._coordinator.spec.numel, self.carries_control)
        protocol.attach(self)

    @property
    def coordinator(self) -> Coordinator:
        return self._coordinator

    @property
    def history(self) -> Sequence[RoundRecord]:
        return self._coordinator.history

    # ------------------------------------------------------------------ start-up and recovery
    def recover(self) -> None:
        """Continue where a previous process stopped: checkpoint, then the open round's durable updates."""
        ctx = self.ctx
        coord = self._coordinator
        if coord.privacy is not None:
            log.info("%s", coord.privacy.describe())
        if ctx.run_dir.has_checkpoint():
            state = ctx.run_dir.load_checkpoint()
            if (state.get("driver") or {}).get("mode") == "async":
                raise ConfigError(f"{ctx.run_dir.path} holds an asynchronous run: set training_mode: async, or use a new "
                                  f"--state-dir")
            coord.load_state_dict(state["coordinator"])
            log.info("restored the global model after round %d", coord.completed_rounds)
        # Clients registered before the restart, before the open round is resumed or aborted: both charge its
        # arrived inputs under sample-level DP, which needs each client's record count.
        if self.partition_sizes is not None and coord.privacy is not None:
            for client in ctx.store.clients():
                if client.partition_index is not None:
                    coord.privacy.register_client(client.client_id, self.partition_sizes[client.partition_index])
        self._resume_open_round()

    def _resume_open_round(self) -> None:
        ctx = self.ctx
        open_row = ctx.store.current_open_round()
        if open_row is None:
            return
        if open_row.round <= self._coordinator.completed_rounds:
            # The checkpoint was written but the process died before the round was marked closed.
            arrived = [u.client_id for u in ctx.store.updates_for_round(open_row.round_id)]
            ctx.store.finish_round(open_row.round_id, "closed", "recovered after restart", ctx.clock(), arrived)
            return
        if self.protocol.recover_open(open_row):
            return
        probabilities: dict[int | str, float] | None = None
        if open_row.probabilities:
            probabilities = dict(open_row.probabilities.items())
        plan = RoundPlan(open_row.round, list(open_row.selected),
                         {c: TrainInstructions.from_json(i) for c, i in open_row.instructions.items()}, privacy=open_row.privacy,
                         probabilities=probabilities)
        # the round's history row counts the whole round: its time and downloads before the restart too
        self._coordinator.restore_round(plan, elapsed_s=ctx.clock() - open_row.started_at,
                                        bytes_so_far=open_row.download_bytes)
        self._timeline = RoundTimeline(open_row.started_at)  # this process's part of it
        replayed = 0
        for row in ctx.store.updates_for_round(open_row.round_id):
            data = Path(row.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise RuntimeError(f"durable update {row.path} does not match its recorded hash")
            delta, control = ctx.gateway.decode_stored(data, self.layout)
            self._coordinator.submit(ClientUpdate(row.client_id, row.round, delta, row.num_samples, row.metrics, row.nbytes,
                                                  control_delta=control))
            replayed += 1
        log.info("resumed open round %d with %d durable update(s) replayed", open_row.round, replayed)

    def abort_mismatched(self, row: RoundRow, *, secure_now: bool) -> None:
        """An attempt that ran with secure aggregation on (off) cannot continue with it off (on)."""
        ctx = self.ctx
        arrived = [u.client_id for u in ctx.store.updates_for_round(row.round_id)]
        ctx.store.finish_round(row.round_id, "aborted", "the server restarted with secure_aggregation "
                               f"{'on' if secure_now else 'off'}; the attempt ran with it "
                               f"{'off' if secure_now else 'on'} and cannot be resumed", ctx.clock(), arrived)

    # ------------------------------------------------------------------ client events
    def client_registered(self, registration: Registration) -> None:
        coord = self._coordinator
        if self.partition_sizes is not None and coord.privacy is not None and registration.partition_index is not None:
            coord.privacy.register_client(registration.client_id, self.partition_sizes[registration.partition_index])
        if registration.reregistered:
            self.protocol.client_registered(registration, self.ctx.clock())

    def client_left(self, client_id: str, why: str) -> None:
        self.protocol.client_left(client_id, why, self.ctx.clock())

    # ------------------------------------------------------------------ round lifecycle (lock held)
    def tick(self) -> None:
        """Close a round at quorum or deadline; open the next one when enough clients are live. The protocol's
        heavy work (a secure attempt's unmasking) runs between two locked ticks, without the lock."""
        self._tick_locked()
        if self.protocol.work_outside_lock():
            self._tick_locked()

    def _tick_locked(self) -> None:
        ctx = self.ctx
        coord = self._coordinator
        with ctx.lock:
            now = ctx.clock()
            if coord.current_round is not None:
                row = ctx.store.current_open_round()
                assert row is not None
                self.protocol.tick(row, now)
                if coord.current_round is not None:
                    return
                now = ctx.clock()  # a round just ended: open the next one now, not a tick later
            if coord.finished:
                return
            live_now = [cid for cid in ctx.gateway.live_clients() if cid not in self.excluded]
            live, infos = self.protocol.candidates(*ctx.gateway.selection_candidates(live_now))
            # The grace period starts once a quorum is live, so a burst of registrations at start-up
            # all make it into the first round instead of the first min_clients.
            if len(live) < self.protocol.min_live_clients():
                self._waiting_since = None
                return
            if self._waiting_since is None:
                self._waiting_since = now
            enough = len(live) >= min(self.cfg.clients_per_round, self.cfg.num_clients)
            waited = now - self._waiting_since >= self.cfg.round_start_wait
            if enough or waited:
                self._open_round(live, now, infos)
                self._waiting_since = None

    def _open_round(self, live: list[str], now: float, infos: dict[str, ClientInfo] | None) -> None:
        ctx = self.ctx
        k = min(len(live), math.ceil(self.cfg.clients_per_round * (1.0 + self.cfg.over_selection)))
        try:
            known: dict[int | str, ClientInfo] | None = None
            if infos is not None:
                known = dict(infos.items())
            plan = self._coordinator.plan_round(list(live), k=k, infos=known, now=now)
        except BudgetExhausted as exc:
            # The budget is checked before anything is spent: the run ends here, with its message,
            # and its final model is evaluated if the last round was not.
            log.warning("%s", exc)
            if self._coordinator.evaluate_final_model() is not None:
                ctx.run_dir.write_history(self._coordinator.history)
            self.checkpoint()
            self._finish_run()
            return
        except NoEligibleClients as exc:  # the live clients have spent their budgets; others may come
            if self._waiting_since is not None:
                log.info("%s; waiting for other clients", exc)
            return
        except ConfigError as exc:  # secure aggregation cannot plan among these clients (e.g. too few): wait for others
            if not self.protocol.planning_may_wait(exc):
                raise
            self.selection_problems.failed(exc)
            return
        except ValueError as exc:  # a policy that cannot draw among these candidates (e.g. all weights 0) waits
            if self.cfg.selection == "uniform" and not self.protocol.planning_may_wait(exc):
                raise
            self.selection_problems.failed(exc)
            return
        self.selection_problems.cleared()
        # a secure attempt may take every phase's timeout: the row's deadline is that bound (each phase has its own)
        deadline = now + self.cfg.round_timeout + self.protocol.deadline_extra(plan.secagg is not None)
        row = RoundRow(0, plan.round, "open", [str(c) for c in plan.selected],
                       {str(c): i.to_json() for c, i in plan.instructions.items()},
                       min(self.cfg.clients_per_round, len(plan.selected)), now, deadline, None, None, plan.privacy,
                       {str(c): float(p) for c, p in (plan.probabilities or {}).items()}, plan.secagg)
        ctx.store.open_round(row)
        self._timeline = RoundTimeline(now)
        self.protocol.opened(row)
        log.info("round %d opened: %d of %d live clients selected, quorum %d, deadline in %.0f s", plan.round,
                 len(plan.selected), len(live), row.target, self.cfg.round_timeout)

    def close_round(self, row: RoundRow, reason: str) -> RoundRecord | None:
        """Aggregate, apply, evaluate, checkpoint and record the open attempt (lock held).

        An aggregate that is not finite is never applied: the attempt is aborted (None is returned),
        the updates that caused it are named in the audit log where they can be told apart, their
        senders are left out of later rounds, and the run goes on with a new attempt."""
        ctx = self.ctx
        coord = self._coordinator
        arrived = sorted(str(c) for c in coord.arrived)
        secagg = coord.secagg
        timeline = self._timeline
        t0 = time.perf_counter()
        evaluated_before = ctx.evaluation_seconds
        try:
            record = coord.close_round()
        except FloatingPointError as exc:
            self._reject_unusable_aggregate(row, exc)
            return None
        close_seconds = time.perf_counter() - t0
        if not coord.finished:
            self._pack_in_background()
        if timeline is not None:  # the coordinator applies, then evaluates: the split comes from the evaluation's time
            now = ctx.clock()
            timeline.evaluation_s = ctx.evaluation_seconds - evaluated_before
            timeline.step("aggregated", now - timeline.evaluation_s)
            timeline.step("evaluated", now)
        self.protocol.round_closed(row, secagg)  # before the summary of a finished run is written
        self.checkpoint()
        if timeline is not None:
            timeline.step("checkpointed", ctx.clock())
        ctx.run_dir.write_history(coord.history)
        self.write_participation()
        closed_at = ctx.clock()
        if timeline is not None:
            timeline.step("closed", closed_at)
        ctx.store.finish_round(row.round_id, "closed", reason, closed_at, arrived,
                               None if timeline is None else timeline.to_json())
        self._timeline = None
        dropped = len(row.selected) - len(arrived)
        acc = f", test accuracy {record.test_accuracy:.4f}" if record.test_accuracy is not None else ""
        eps = f", epsilon spent {record.epsilon:.4g}" if record.epsilon is not None else ""
        log.info("round %d closed at %s with %d update(s), %d dropped%s%s", row.round, reason, len(arrived), dropped, acc, eps)
        ctx.observers.round_closed(record, reason=reason, selected=len(row.selected), arrived=len(arrived),
                                   close_seconds=close_seconds)
        if coord.finished:
            self._finish_run()
        return record

    def _reject_unusable_aggregate(self, row: RoundRow, exc: FloatingPointError) -> None:
        ctx = self.ctx
        self.unusable_aggregates += 1
        suspects = self._suspect_updates(row)
        for client_id in suspects:
            ctx.gateway.refuse("update_unusable_aggregate", client_id, f"round {row.round}: its update made the aggregate "
                               f"unusable; left out of later rounds")
        self.excluded.update(suspects)
        self.abort_round(row, f"the aggregate is not finite, nothing applied ({exc}); suspect update(s): "
                         f"{len(suspects)}", ctx.clock())

    def _suspect_updates(self, row: RoundRow) -> list[str]:
        """Updates of the attempt that alone make the model non-finite, or whose norm is over 100x the
        round's median (plain rounds: the durable payloads; a masked sum cannot be taken apart)."""
        coord = self._coordinator
        norms: dict[str, float] = {}
        broken: list[str] = []
        for update in self.ctx.store.updates_for_round(row.round_id):
            if not update.path:
                continue
            delta, _ = self.ctx.gateway.decode_stored(Path(update.path).read_bytes(), self.layout)
            moved = coord.global_vector + delta.to(torch.float32)
            norm = float(delta.double().norm())
            if not bool(torch.isfinite(moved).all()) or not math.isfinite(norm):
                broken.append(update.client_id)
            else:
                norms[update.client_id] = norm * update.num_samples
        if len(norms) >= 3:
            median = sorted(norms.values())[len(norms) // 2]
            broken += [cid for cid, n in norms.items() if median > 0 and n > 100 * median]
        return sorted(set(broken))

    def stalled(self, now: float) -> str | None:
        row = self.ctx.store.current_open_round() if self._coordinator.current_round is not None else None
        if row is not None and now > row.deadline + STALL_GRACE_SECONDS:
            return f"round {row.round} is {now - row.deadline:.0f} s past its deadline"
        return None

    def abort_round(self, row: RoundRow, reason: str, now: float, *, warn: bool = True) -> None:
        """Drop the open attempt, applying nothing; a new attempt of the same round follows (lock held)."""
        ctx = self.ctx
        coord = self._coordinator
        arrived = sorted(str(c) for c in coord.arrived)
        coord.abort_round()
        if coord.privacy is not None:
            # sample-level DP charged the clients whose updates arrived: make that durable now, since
            # this attempt's updates will never be replayed
            self.checkpoint()
        timeline, self._timeline = self._timeline, None
        ctx.store.finish_round(row.round_id, "aborted", reason, now, arrived, None if timeline is None else timeline.to_json())
        if warn:
            log.warning("round %d aborted: %s", row.round, reason)
        ctx.observers.round_aborted(row.round, len(arrived))

    def checkpoint(self) -> None:
        ctx = self.ctx
        ctx.run_dir.save_checkpoint({"config": self.cfg.to_dict(), "coordinator": self._coordinator.state_dict(),
                                     "wall_seconds": ctx.clock() - ctx.started_at})

    def _finish_run(self) -> None:
        """Results of a run that has ended (all rounds, or the privacy budget): summary and final model."""
        ctx = self.ctx
        coord = self._coordinator
        self.write_participation()
        ctx.run_dir.write_json("summary.json", self.summary())
        ctx.run_dir.save_model(unflatten(coord.released_vector, coord.spec))
        reason = coord.stop_reason or f"all {self.cfg.num_rounds} rounds done"
        log.info("run finished after %d rounds (%s); results in %s", coord.completed_rounds, reason, ctx.run_dir.path)
        ctx.observers.run_finished(ctx)

    # ------------------------------------------------------------------ polling and model download
    def state_key(self) -> tuple[object, ...]:
        """What every client's poll answer depends on beyond the client itself (lock held): the run's end, the
        model version, the open attempt and, in a secure attempt, its phase and the clients it dropped. The
        service wakes parked long-polls when it changes (fl_server/rest/state_changes.py)."""
        coord = self._coordinator
        row = self.ctx.store.current_open_round() if coord.current_round is not None else None
        agg = coord.secagg
        phase = None if agg is None else (agg.server.phase.value, len(agg.server.drops))
        return (coord.finished, coord.completed_rounds, coord.current_round, None if row is None else row.round_id, phase)

    def check_expected(self, client_id: str, round_number: int) -> RoundRow:
        """The open attempt's row if ``client_id`` may upload for ``round_number`` (else ApiError, audited)."""
        ctx = self.ctx
        current = self._coordinator.current_round
        if current is None or round_number != current:
            ctx.gateway.reject_update("round_closed", client_id)
            raise ApiError(409, "round_closed", f"round {round_number} is not open (open round: {current or 'none'})")
        row = ctx.store.current_open_round()
        if row is None or client_id not in row.instructions:
            ctx.gateway.reject_update("not_selected", client_id)
            raise ApiError(409, "not_selected", f"this client was not selected for round {round_number}")
        return row

    def round_status(self, auth: Authenticated) -> RoundStatus:
        ctx = self.ctx
        ctx.wake.set()
        with ctx.lock:
            coord = self._coordinator
            version = coord.completed_rounds
            if coord.finished:
                return RoundStatus(ROUND_FINISHED, None, version, 0.0)
            current = coord.current_round
            if current is None:
                return RoundStatus(ROUND_WAITING, None, version, self.cfg.poll_interval)
            row = ctx.store.current_open_round()
            assert row is not None
            instr = row.instructions.get(auth.client_id)
            if instr is None:
                return RoundStatus(ROUND_NOT_SELECTED, current, version, self.cfg.poll_interval, row.deadline)
            return self.protocol.round_status(auth.client_id, row, instr, version)

    def upload_accepted(self, steps: dict[str, float]) -> None:
        """An upload of the open attempt is durable and summed (lock held): its round's timeline notes when, and
        when its earlier steps were (``steps``: round_timeline.UPLOAD_STEPS, server clock)."""
        if self._timeline is not None:
            self._timeline.upload_accepted(self.ctx.clock(), steps)

    def count_download(self, nbytes: int) -> None:
        """A model download counts towards the open round's bytes, durably (a restart keeps the count)."""
        row: RoundRow | None = None
        with self.ctx.lock:
            if self._timeline is not None:
                self._timeline.download_served(self.ctx.clock())
            self._coordinator.add_bytes(nbytes)
            if self._coordinator.current_round is not None:
                row = self.ctx.store.current_open_round()
        if row is not None:  # the commit (an fsync, shared with the downloads beside it) without the service lock
            self.ctx.store.add_download_bytes(row.round_id, nbytes)

    def model_version(self, requested: int | None) -> int:
        """Synchronous rounds serve the current model only (``?version=`` is an asynchronous job's)."""
        return self._coordinator.completed_rounds

    def model_payload(self, auth: Authenticated, version: int) -> ModelPayload:
        """The current global model: (version, body, wrapped model key).

        Hybrid encryption: each version is packed and Fernet-encrypted once under a fresh random
        model key, and each client receives that key encrypted under its own session key. A round's
        downloads then cost the server one encryption instead of one per client (6.6 MB each for
        the CNN), while only registered clients can read the model.

        The packing and encryption (seconds for a large model) run outside the service lock, which is held only
        to take the version and a copy of the vector; a lock of their own makes one request pack a version while
        the others wait for it, not for the service."""
        packed_version, body, cached_key = self._packed_model()
        return packed_version, body, (Envelope(auth.keys).seal(cached_key) if cached_key is not None else None)

    def prepare_download(self) -> None:
        """Pack (and encrypt) the current model version now if a round is open and it is not packed yet (the
        service's ticker calls this right after the push of a round's opening; usually the close already started
        the packing, :meth:`close_round`), outside the service lock."""
        with self.ctx.lock:
            if self._coordinator.current_round is None:
                return
            cached = self._model_cache
            if cached is not None and cached[0] == self._coordinator.completed_rounds:
                return
        self._packed_model()

    def _model_snapshot(self) -> tuple[int, torch.Tensor, dict[str, Any]]:
        """(version, vector, meta) of the model a download gets now (lock held): a copy, packed without the lock."""
        coord = self._coordinator
        version = coord.completed_rounds
        vector = coord.global_vector.clone()
        if self.carries_control:
            control = coord.server_control  # None until the first round is planned: c = 0
            vector = torch.cat([vector, control.to(torch.float32) if control is not None else torch.zeros_like(vector)])
        return version, vector, {"version": version, "spec": coord.spec.to_json(), "server_control": self.carries_control}

    def _pack(self, snapshot: tuple[int, torch.Tensor, dict[str, Any]]) -> tuple[int, bytes, bytes | None]:
        """Pack and encrypt a snapshot once and cache it (callers hold ``_model_lock``, never the service lock)."""
        version, vector, meta = snapshot
        cached = self._model_cache
        if cached is not None and cached[0] == version:
            return cached
        packed = wire.encode_update(vector, self.cfg.download_wire_codec, self.cfg.wire_compression, meta=meta)
        if self.cfg.encryption:
            model_key = Fernet.generate_key()
            cached = (version, Envelope(model_key).seal(packed), model_key)
        else:
            cached = (version, packed, None)
        self._model_cache = cached
        return cached

    def _packed_model(self) -> tuple[int, bytes, bytes | None]:
        """(version, body, model key or None) of the current model version, packed once per version."""
        with self._model_lock:
            with self.ctx.lock:
                cached = self._model_cache
                if cached is not None and cached[0] == self._coordinator.completed_rounds:
                    return cached
                snapshot = self._model_snapshot()
            return self._pack(snapshot)

    def _pack_in_background(self) -> None:
        """Start packing the model version that now exists (lock held, called by the close): it runs while the
        close writes the checkpoint (fsync: the GIL is free) and opens the next round, so the download is usually
        ready by the time the round's push reaches the clients. Never waited for here: a request that holds
        ``_model_lock`` may be waiting for the service lock this caller holds. A request that gets ``_model_lock``
        first packs the version itself and the thread then finds it packed."""
        snapshot = self._model_snapshot()
        self._model_cache = None  # the old version's body is not kept

        def pack() -> None:
            with self._model_lock:
                try:
                    self._pack(snapshot)
                except Exception:  # a request packs it again (and reports its own error)
                    log.exception("packing model version %d for download failed", snapshot[0])

        threading.Thread(target=pack, name="fl-model-pack", daemon=True).start()

    # ------------------------------------------------------------------ updates
    def accept_update(self, auth: Authenticated, round_number: int, idempotency_key: str, body: bytes,
                      attempt: str | None) -> dict[str, Any]:
        return self.protocol.accept_update(auth, round_number, attempt, idempotency_key, body)

    # ------------------------------------------------------------------ monitoring
    def status_fields(self) -> dict[str, Any]:
        ctx = self.ctx
        with ctx.lock:
            coord = self._coordinator
            row = ctx.store.current_open_round()
            return {
                "state": "finished" if coord.finished else ("training" if row else "waiting_for_clients"),
                "completed_rounds": coord.completed_rounds,
                "model_version": coord.completed_rounds,
                "current_round": None if row is None else {
                    "round": row.round, "selected": len(row.selected), "quorum": row.target,
                    "arrived": len(coord.arrived), "deadline_in_s": round(max(0.0, row.deadline - ctx.clock()), 1),
                },
                "unusable_aggregates": self.unusable_aggregates,
                **self.protocol.status_fields(),
            }

    def summary(self) -> dict[str, Any]:
        ctx = self.ctx
        coord = self._coordinator
        hist = coord.history
        return {
            "mode": "rest", "rounds_completed": coord.completed_rounds, **accuracy_summary(hist),
            "wall_seconds": ctx.clock() - ctx.started_at, "total_bytes": sum(r.bytes for r in hist),
            "clients_registered": ctx.store.count_clients(), "rejected": ctx.gateway.refusals.rejections(),
            "encryption": self.cfg.encryption, "privacy": coord.privacy_status(),
            "stop_reason": coord.stop_reason, "training_mode": self.mode,
            "selection": self.selection_summary(), "participation": self.participation_summary(),
            "secure_aggregation": self.protocol.summary_block(),
            "config": self.cfg.to_dict(),
        }


__all__ = ["abort_protected_attempt_at_restart", "attempt_outcome", "PlainRounds", "RoundProtocol", "SyncRoundDriver"]
