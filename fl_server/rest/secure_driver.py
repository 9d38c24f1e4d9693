"""Secure aggregation over REST: the round protocol of SecAgg phases, plugged into the synchronous driver.

The protocol itself is transport free (``fl_common.secagg``: the two state machines and their
messages; ``fl_server.secagg``: the coordinator's :class:`SecureAggregator`). This module is only
the REST driver of it, the way the simulation's secure-aggregation runner is the in-process one: it registers
each client's Ed25519 verifying key, tells selected clients their index and the phase, moves the
protocol's bytes between HTTP and the round's :class:`~fl_common.secagg.server.SecAggServer`, and
turns the state machine's outcome into a closed or an aborted round attempt.

Why it holds these rules:

- **Nothing per client is ever stored.** Keys, ciphertexts of shares and the running masked sum
  live in the process's memory only. A masked input is summed and *not* written to disk (its row
  in SQLite keeps the hash, the idempotency key and the clear DP metrics for bookkeeping); a
  restart therefore cannot resume a secure attempt: it is aborted with its reason and a new
  attempt (fresh keys, fresh selection) is planned. Nothing half-unmasked is ever applied.
- **A refusal is a drop.** A message that fails a check (bad signature, unknown neighbour,
  duplicated share, malformed bytes, wrong phase) is answered 4xx with ``{"error", "message",
  "dropped", "phase"}`` and the sender is out of this attempt (the state machine removes its masks
  through its neighbours as for any dropout); the round completes while the threshold holds.
- **Retries are free.** An identical retry of an accepted message (also after the phase moved on,
  also after the attempt closed) gets the first answer again and changes nothing.
- **Attempts, not rounds.** An aborted attempt is followed by a new one with the same round number,
  so every path takes ``?attempt=ID``: a late message for an old attempt is refused (409) instead
  of landing in the new one, where it would fail its signature and drop an innocent client.

What holds the service lock, and what does not: a message's checks and the state machine's bookkeeping (dictionary
updates, a signature check) run under it; a masked input's digest and unpacking run before it, its addition to the
running sum (``SecAggServer.fold_inputs``) and its row's write after it; the unmasking (removing the masks from the
sum: one PRG expansion per survivor and dangling pair, then decoding) runs in the ticker between two locked ticks
(:meth:`SecureRounds.work_outside_lock`). Applying the unmasked sum (the strategy step, the evaluation, the
checkpoint) is the driver's ``close_round``, under the lock as for plain rounds.

Liveness: a selected client the current phase waits for that the server has not heard from for ``client_liveness``
is dropped at once, in every phase; a daemon keeps a long-poll open while it trains (fl_client/heartbeat.py).

What it adds to monitoring: ``/status`` gets a ``secagg`` block (phase, U1..U4 counts, dropouts
by phase, aborts), ``/metrics`` the same as gauges and counters (``fl_server.rest.metrics.SecAggCollector``), and
``summary.json`` the ``secure_aggregation`` block the simulation writes (bytes per client per
phase). The history of finished attempts is kept in the store's meta table, so it survives a
restart like the rest of the run's record.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fl_common.crypto import EnvelopeError
from fl_common.protocol.rest import (
    MAX_SECAGG_MESSAGE_BYTES,
    ROUND_NOT_SELECTED,
    ROUND_SELECTED,
    ROUND_SUBMITTED,
    RoundStatus,
    unpack_masked_upload,
)
from fl_common.secagg import (
    ED25519,
    AdvertiseKeys,
    ConsistencySignature,
    MalformedMessage,
    MaskedInput,
    Phase,
    PreparedInput,
    SecAggAborted,
    SecAggRejected,
    SecAggServer,
    ShareKeys,
    UnmaskResponse,
    Verifier,
)
from fl_common.secagg.encoding import IN_CLEAR
from fl_common.secagg.server import unpack_decoded_input
from fl_server.rest.driver import DriverContext
from fl_server.rest.gateway import SECURE_FEATURES, ApiError, Authenticated, Registration
from fl_server.rest.sync_driver import RoundProtocol, SyncRoundDriver, abort_protected_attempt_at_restart, attempt_outcome
from fl_server.secagg import MaskedUpdate, SecAggRoundStats, SecureAggregator
from fl_server.selection import ClientInfo
from fl_server.store.sqlite import RoundRow, UpdateRow
from fl_server.strategies import UpdateRejected

log = logging.getLogger("fl_server.rest.secure_driver")

#: the protocol's phases, in order (the state machine's Phase values)
PHASE_ORDER = (Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASK)
#: refusal code -> HTTP status: a message that came at the wrong time is a conflict; a signature that
#: does not verify is forbidden; everything else is a bad request
HTTP_STATUS = {"wrong_phase": 409, "not_in_phase": 409, "conflicting_duplicate": 409, "attempt_closed": 409,
               "round_closed": 409, "not_selected": 409, "wrong_round": 409, "duplicate": 409, "bad_signature": 403,
               "dp_mismatch": 422}
#: refusals that say where the client stands, not that it misbehaved: they never drop it
NOT_DROPPING = ("wrong_round", "not_selected", "duplicate", "attempt_closed", "round_closed", "conflicting_duplicate")
#: meta-table key of the finished attempts' statistics (completed rounds and aborts)
META_KEY = "secagg_history"
#: finished attempts kept in that history (the summary's means are over these)
HISTORY_LIMIT = 500
#: the poll interval a client uses between the phases of an attempt (at most; cfg.poll_interval when lower):
#: every phase change waits for the slowest poller, so a long idle interval would stretch the round
SECAGG_POLL_MAX = 1.0
#: secure aggregation needs at least this many clients in a round (pairwise masks hide nothing with 2)
MIN_SECURE_CLIENTS = 3
RESTART_REASON = ("the server restarted during the secure round: its protocol state (keys, shares, the masked sum) "
                  "lives in memory only, so the attempt is aborted and nothing of it is applied")


def phase_timeline(server: SecAggServer) -> dict[str, float]:
    """When the attempt opened (server clock) and when each phase closed, in seconds after that, in phase order:
    what a round's time went to (kept with the attempt's history; benchmarks/fast_rounds.py reads it). Times only,
    no client named."""
    started = float(server.started)
    return {"opened_at": started, **{ph: round(float(t) - started, 4) for ph, t in server.phase_closed_at.items()}}


@dataclass
class _Attempt:
    """A secure round attempt this process runs (or ran: the last finished one answers retries)."""

    round_id: int
    round: int
    agg: SecureAggregator
    finished: bool = False
    #: client id -> sha256 (hex) of its accepted masked input: a retry is answered from memory, under the lock,
    #: even before the input's row reached the store (that write happens after the lock is released)
    digests: dict[str, str] = field(default_factory=dict)


class SecureRounds(RoundProtocol):
    """The round protocol of secure aggregation, plugged into :class:`~fl_server.rest.sync_driver.SyncRoundDriver`.

    Every method that touches the round's state machine takes the service's lock (``ctx.lock``):
    the state machine is not thread safe, and the gunicorn worker serves requests from a thread pool."""

    driver_features = SECURE_FEATURES
    secure = True
    driver: SyncRoundDriver

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self._attempts: dict[int, _Attempt] = {}
        self._history: dict[str, Any] = self._load_history()

    # ------------------------------------------------------------------ keys and candidates
    def verifier(self, client_id: int | str) -> Verifier | None:
        """What the coordinator checks a selected client's messages against (its registered key)."""
        key = self.ctx.store.secagg_verify_key(str(client_id))
        if key is None:
            return None
        try:
            return Verifier(ED25519, base64.urlsafe_b64decode(key.encode("ascii")))
        except ValueError:
            return None

    def client_registered(self, registration: Registration, now: float) -> None:
        """A client registered a different verifying key: if it is in the open attempt it is dropped
        from it now (its messages could no longer be checked against the key the attempt was planned
        with), instead of holding the phase until its deadline. Called under the service's lock."""
        if registration.verify_key_changed:
            self._drop(registration.client_id, "new_signing_key", now)

    def client_left(self, client_id: str, why: str, now: float) -> None:
        """A revoked or removed client is dropped from the open attempt now, not at the phase deadline."""
        self._drop(client_id, "client_left", now)

    def _drop(self, client_id: str, reason: str, now: float) -> None:
        agg = self.driver.coordinator.secagg
        if agg is None or client_id not in agg.params.client_ids:
            return
        index = agg.index_of(client_id)
        if index not in agg.server.drops and not agg.server.finished and agg.server.unmask_job is None:
            agg.server.drop(index, reason, now)
            log.warning("round %d: client %s dropped from this attempt (%s)", agg.params.round, client_id, reason)

    def min_live_clients(self) -> int:
        return max(self.cfg.min_clients, MIN_SECURE_CLIENTS)

    def candidates(self, live: list[str], infos: dict[str, ClientInfo] | None
                   ) -> tuple[list[str], dict[str, ClientInfo] | None]:
        """The live clients a secure round can include, with their record counts.

        A client needs a registered verifying key (without one it could never pass the signature
        check) and a reported profile, whose record count the masked weights need: the public bound W
        is the largest count among the selected (fl_server/secagg/aggregator.py). The profile is also
        the sign that a daemon has loaded its data and polls: every phase of a secure round waits for
        each selected client, so selecting one that registered but is still starting up would cost an
        aborted attempt. (Plain rounds under ``uniform`` need neither: they close with whoever arrived.)"""
        capable = self.ctx.store.secagg_capable_ids()
        profiles = self.ctx.store.profiles()
        out: dict[str, ClientInfo] = {}
        for cid in live:
            if cid not in capable:
                continue
            info = (infos or {}).get(cid)
            if info is not None and info.num_samples is not None:
                out[cid] = info
                continue
            reported = (profiles.get(cid) or {}).get("num_samples")
            if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
                out[cid] = ClientInfo(cid, num_samples=reported)
        return [cid for cid in live if cid in out], out

    def planning_may_wait(self, exc: Exception) -> bool:
        return True  # too few clients for the threshold, a policy that cannot draw: others may come

    def deadline_extra(self, secagg_planned: bool) -> float:
        return 3 * self.cfg.secagg_phase_timeout if secagg_planned else 0.0

    # ------------------------------------------------------------------ round lifecycle (service's lock held)
    def opened(self, row: RoundRow) -> None:
        """The driver stored a new secure attempt: remember it so its messages can be routed to it."""
        agg = self.driver.coordinator.secagg
        assert agg is not None
        # masked inputs are queued under the lock and summed outside it; the unmasking runs outside it too
        # (work_outside_lock): the state machine's deferred mode, set before any input can arrive
        agg.server.deferred = True
        for attempt_id in [a for a, att in self._attempts.items() if att.finished]:
            del self._attempts[attempt_id]  # only the last finished attempt answers retries
        self._attempts[row.round_id] = _Attempt(row.round_id, row.round, agg)
        log.info("round %d (attempt %d): secure aggregation over %d clients, threshold %d, degree %d, ring Z/2^%d; "
                 "withstands %d colluding share holder(s) per client, failure bound %.2g (target %.0e)",
                 row.round, row.round_id, agg.params.n, agg.params.threshold, min(agg.params.degree, agg.params.n - 1),
                 agg.params.modulus_bits, agg.report.tolerated_corrupt, agg.report.failure_bound, agg.report.failure_target)

    def tick(self, row: RoundRow, now: float) -> None:
        """Look at the deadlines; close the attempt when unmasked, abort it when the protocol aborted."""
        agg = self.driver.coordinator.secagg
        if agg is None:
            return
        server = agg.server
        self._drop_gone(agg, now)
        if server.phase == Phase.MASKED_INPUT and server.num_inputs >= row.target and server.expected():
            # quorum, as in plain rounds: the stragglers are dropped and their masks removed through their neighbours
            server.close_phase(now)
        else:
            server.advance(now)
        if server.phase in (Phase.CONSISTENCY_CHECK, Phase.UNMASK) and len(server.u3) < self.cfg.min_clients:
            self._abort(row, agg, f"only {len(server.u3)} masked inputs arrived, fewer than min_clients="
                        f"{self.cfg.min_clients}", now)
        elif server.phase == Phase.DONE:
            self._close(row, agg, now)
        elif server.phase == Phase.ABORTED:
            self._abort(row, agg, server.abort_reason or "aborted", now)

    def work_outside_lock(self) -> bool:
        """The attempt's unmasking, once its phase closed: the secrets were rebuilt under the lock (cheap), the
        masks are removed from the sum and the sum decoded here, without it (one PRG expansion per survivor and
        dangling pair: seconds for a large model), then the outcome is applied under it again. Called by the
        driver's tick after it released the lock; True when it did something (the driver then ticks again,
        which closes or aborts the attempt). Only the ticker calls it, so two unmaskings never run at once."""
        with self.ctx.lock:
            agg = self.driver.coordinator.secagg
            job = None if agg is None else agg.server.unmask_job
        if agg is None or job is None:
            return False
        outcome = agg.server.run_unmask(job)
        with self.ctx.lock:
            agg.server.finish_unmask(outcome, self.ctx.clock())  # a no-op if the attempt ended meanwhile
        return True

    def _drop_gone(self, agg: SecureAggregator, now: float) -> None:
        """Clients the current phase waits for that the server has not heard from for ``client_liveness`` s
        are dropped now: a killed daemon would otherwise hold the phase until its deadline (the masked-input
        phase: round_timeout) even where the others could finish the round without it. Dropping is what the
        deadline would do later; the protocol recovers their masks as usual. The masked-input phase too: a
        daemon keeps a long-poll of the round open while it trains (fl_client/heartbeat.py), so an honest
        slow trainer is heard from at least twice per liveness window."""
        waiting = agg.server.expected()
        if not waiting or agg.server.finished:
            return
        live = set(self.driver.ctx.gateway.live_clients())
        for index in sorted(waiting):
            client_id = agg.params.client_ids[index - 1]
            if client_id not in live:
                self._drop(client_id, "not_live", now)

    def _close(self, row: RoundRow, agg: SecureAggregator, now: float) -> None:
        server = agg.server
        coord = self.driver.coordinator
        # the protocol's own messages (keys, shares, unmasking) count towards the round's traffic too
        coord.add_bytes(sum(sum(d.values()) for ph, d in server.bytes_in.items() if ph != Phase.MASKED_INPUT.value)
                        + sum(sum(d.values()) for d in server.bytes_out.values()))
        try:
            closed = self.driver.close_round(row, "unmasked")  # calls round_closed once the sum is applied
        except (SecAggAborted, RuntimeError) as exc:  # nothing was applied: the sum did not decode or was short
            if coord.current_round is None:
                raise  # the round did close: a later step failed, which the ticker reports
            self._abort(row, agg, f"the unmasked sum could not be applied: {exc}", now)
            return
        if closed is None:  # the unmasked aggregate was not finite: the driver aborted the attempt
            stats = agg.stats()
            stats.aborted = "the unmasked aggregate is not finite"
            self._finish(row, stats, phase=Phase.UNMASK.value, auth=agg.params.auth, server=agg.server)

    def round_closed(self, row: RoundRow, secagg: SecureAggregator | None) -> None:
        """The driver applied the attempt's unmasked sum: add it to the history (summary, /status, /metrics)."""
        if secagg is not None:
            self._finish(row, secagg.stats(), auth=secagg.params.auth, server=secagg.server)

    def _abort(self, row: RoundRow, agg: SecureAggregator, reason: str, now: float) -> None:
        closed = list(agg.server.phase_closed_at)  # in order; an abort closes the phase it happened in last
        phase = (closed[-1] if closed else Phase.ADVERTISE_KEYS.value) if agg.server.phase == Phase.ABORTED \
            else agg.server.phase.value
        stats = agg.stats()
        stats.aborted = reason
        self.driver.abort_round(row, f"secure aggregation aborted in phase {phase}: {reason}", now, warn=False)
        log.warning("round %d (attempt %d): secure aggregation aborted in phase %s: %s; nothing is applied, a new attempt "
                    "follows", row.round, row.round_id, phase, reason)
        self._finish(row, stats, phase=phase, auth=agg.params.auth, server=agg.server)

    def _finish(self, row: RoundRow, stats: SecAggRoundStats, *, phase: str | None = None,
                auth: str | None = None, server: SecAggServer | None = None) -> None:
        attempt = self._attempts.get(row.round_id)
        if attempt is not None:
            attempt.finished = True
        # auth: the signature scheme of the attempt's messages, kept so /status can still say how the
        # last round was authenticated once no attempt is open (the stats' params do not carry it)
        entry = {**asdict(stats), "attempt": row.round_id, "auth": auth}
        entry["events"] = len(stats.events)  # counts only: the events name clients
        if server is not None:
            entry["timeline"] = phase_timeline(server)
        if stats.aborted is not None:
            entry["aborted_in_phase"] = phase
        self._history.setdefault("attempts", []).append(entry)
        self._history["attempts"] = self._history["attempts"][-HISTORY_LIMIT:]
        key = "aborted" if stats.aborted is not None else "completed"
        self._history[key] = int(self._history.get(key, 0)) + 1
        drops = self._history.setdefault("dropouts_by_phase", {})
        for ph, n in stats.drops.items():
            drops[ph] = int(drops.get(ph, 0)) + int(n)
        self._save_history()

    def recover_open(self, row: RoundRow) -> bool:
        """Start-up with an attempt still open in the store: a secure one is aborted (see the module
        docstring), a plain one cannot continue as a secure one either.

        Under sample-level DP the clients whose masked inputs had arrived are charged, as an abort in
        the running process charges them (conservative: their DP-SGD output reached the server)."""
        if row.secagg is None:
            self.driver.abort_mismatched(row, secure_now=True)
            return True
        abort_protected_attempt_at_restart(self.driver, row, RESTART_REASON)
        log.warning("round %d (attempt %d): %s", row.round, row.round_id, RESTART_REASON)
        self._history.setdefault("attempts", []).append({"round": row.round, "attempt": row.round_id, "aborted": RESTART_REASON,
                                                          "aborted_in_phase": "unknown (server restart)", "drops": {},
                                                          "phase_bytes": {}, "summed": 0, "clipped": 0, "events": 0,
                                                          "params": {}})
        self._history["aborted"] = int(self._history.get("aborted", 0)) + 1
        self._save_history()
        return True

    # ------------------------------------------------------------------ the client's view
    def round_status(self, client_id: str, row: RoundRow, instructions: dict[str, Any], version: int) -> RoundStatus:
        """A selected client in the open attempt: 'selected' while it has a step to take; its index, the
        phase and the phase's deadline ride along."""
        coord = self.driver.coordinator
        agg = coord.secagg
        poll = self.cfg.poll_interval
        if agg is None or client_id not in agg.params.client_ids:
            return RoundStatus(ROUND_NOT_SELECTED, row.round, version, poll, row.deadline)
        server = agg.server
        index = agg.index_of(client_id)
        server.params_for(index)  # the parameters go down with this reply: counted as phase-0 traffic
        now = self.ctx.clock()
        dropped = index in server.drops
        done = index in server.bytes_in[Phase.UNMASK.value]
        block = {"attempt": row.round_id, "params": agg.params.to_json(), "index": index, "phase": server.phase.value,
                 "deadline": server.deadline, "deadline_in_s": round(max(0.0, server.deadline - now), 3),
                 "poll_after": min(self.cfg.poll_interval, SECAGG_POLL_MAX), "dropped": dropped, "done": done}
        if not dropped and not done and not server.finished:
            return RoundStatus(ROUND_SELECTED, row.round, version, poll, row.deadline, instructions, secagg=block)
        state = ROUND_SUBMITTED if client_id in coord.arrived else ROUND_NOT_SELECTED
        return RoundStatus(state, row.round, version, poll, row.deadline, None, secagg=block)

    # ------------------------------------------------------------------ the protocol's endpoints
    def _resolve(self, auth: Authenticated, round_number: int, attempt: str | None) -> tuple[_Attempt, int]:
        """The attempt a request is for and the client's index in it (service's lock held)."""
        if attempt is not None:
            if not (attempt.isascii() and attempt.isdigit()) or len(attempt) > 12:
                raise ApiError(400, "bad_attempt", "attempt must be a positive integer")
            entry = self._attempts.get(int(attempt))
            if entry is None:
                row = self.ctx.store.round_attempt(int(attempt))
                ended = {"closed": Phase.DONE.value, "aborted": Phase.ABORTED.value}.get(row.state) if row is not None else None
                raise ApiError(409, "attempt_closed", f"attempt {attempt} is not open on this server (it ended, or the "
                               f"server restarted); poll the round for the current one", extra={"dropped": True, "phase": ended})
        else:
            agg = self.driver.coordinator.secagg
            entry = next((a for a in self._attempts.values() if agg is not None and a.agg is agg), None)
            if entry is None:
                raise ApiError(409, "round_closed", f"no secure round is open (round {round_number} asked)",
                               extra={"dropped": True, "phase": None})
        if entry.round != round_number:
            raise ApiError(409, "round_closed", f"attempt {entry.round_id} belongs to round {entry.round}, not {round_number}",
                           extra={"dropped": True, "phase": None})
        if auth.client_id not in entry.agg.params.client_ids:
            raise ApiError(409, "not_selected", f"this client is not in attempt {entry.round_id} of round {entry.round}",
                           extra={"dropped": False, "phase": None})
        return entry, entry.agg.index_of(auth.client_id)

    def _extra(self, entry: _Attempt, index: int) -> dict[str, Any]:
        server = entry.agg.server
        return {"dropped": index in server.drops, "phase": server.phase.value,
                "deadline_in_s": round(max(0.0, server.deadline - self.ctx.clock()), 3)}

    def _refused(self, auth: Authenticated, entry: _Attempt, index: int, step: str, code: str, message: str,
                 *, drop: bool) -> ApiError:
        """Count and audit a refusal, drop the sender when its message was bad, and build the 4xx."""
        server = entry.agg.server
        if drop and code not in NOT_DROPPING and not entry.finished:
            server.drop(index, code, self.ctx.clock())
        self.ctx.gateway.refuse(f"secagg_{code}", auth.client_id, f"{step} of round {entry.round} (attempt {entry.round_id}) "
                             f"refused: {code}")
        return ApiError(HTTP_STATUS.get(code, 400), code, message, extra=self._extra(entry, index))

    def _waiting(self, entry: _Attempt, index: int, step: str, until: Phase) -> ApiError:
        """A step asked for before its phase: a client polling early, not a misbehaving one (no drop, no audit)."""
        server = entry.agg.server
        return ApiError(409, "wrong_phase", f"{step} is available from phase {until.value}; round {entry.round} is in phase "
                        f"{server.phase.value}", extra=self._extra(entry, index))

    def _open_body(self, auth: Authenticated, body: bytes) -> bytes:
        if len(body) > MAX_SECAGG_MESSAGE_BYTES:
            raise ApiError(413, "body_too_large", f"a secure-aggregation message is limited to {MAX_SECAGG_MESSAGE_BYTES} bytes")
        try:
            return self.ctx.gateway.open_bytes(auth, body)
        except EnvelopeError:
            raise MalformedMessage("the body could not be decrypted with this client's key", "bad_ciphertext") from None

    def seal(self, auth: Authenticated, data: bytes) -> bytes:
        """A response body: Fernet-encrypted for the client when the server encrypts (roster, shares, requests)."""
        return self.ctx.gateway.seal_for(auth, data)

    def _receive(self, auth: Authenticated, round_number: int, attempt: str | None, body: bytes, step: str,
                 parse: Callable[[bytes], Any], receive: Callable[[Any, Any, float], None]) -> dict[str, Any]:
        """Decrypt, parse and hand one client message to the state machine; every refusal drops the sender."""
        try:
            msg: Any = parse(self._open_body(auth, body))
            problem: MalformedMessage | None = None
        except MalformedMessage as exc:
            msg, problem = None, exc
        with self.ctx.lock:
            entry, index = self._resolve(auth, round_number, attempt)
            if problem is not None:
                raise self._refused(auth, entry, index, step, problem.code, str(problem), drop=True)
            if msg.sender != index:
                raise self._refused(auth, entry, index, step, "wrong_sender", f"this client is index {index} in round "
                                    f"{entry.round}, its message says {msg.sender}", drop=True)
            try:
                receive(entry.agg.server, msg, self.ctx.clock())
            except SecAggRejected as exc:
                raise self._refused(auth, entry, index, step, exc.code, str(exc), drop=False) from None
            answer = {"accepted": True, "round": entry.round, "attempt": entry.round_id, **self._extra(entry, index)}
        self.ctx.wake.set()
        return answer

    def advertise(self, auth: Authenticated, round_number: int, attempt: str | None, body: bytes) -> dict[str, Any]:
        """POST .../secagg/advertise: the client's two fresh public keys, signed."""
        return self._receive(auth, round_number, attempt, body, "advertise", AdvertiseKeys.from_bytes,
                             lambda s, m, now: s.receive_advertise(m, now))

    def share_keys(self, auth: Authenticated, round_number: int, attempt: str | None, body: bytes) -> dict[str, Any]:
        """POST .../secagg/shares: the client's encrypted shares, one per neighbour, signed."""
        return self._receive(auth, round_number, attempt, body, "shares", ShareKeys.from_bytes,
                             lambda s, m, now: s.receive_share_keys(m, now))

    def consistency(self, auth: Authenticated, round_number: int, attempt: str | None, body: bytes) -> dict[str, Any]:
        """POST .../secagg/consistency: the client's signature on the survivor set it was shown (once per attempt)."""
        return self._receive(auth, round_number, attempt, body, "consistency", ConsistencySignature.from_bytes,
                             lambda s, m, now: s.receive_consistency(m, now))

    def unmask(self, auth: Authenticated, round_number: int, attempt: str | None, body: bytes) -> dict[str, Any]:
        """POST .../secagg/unmask: the shares the client reveals; the last one unmasks the sum (on the tick)."""
        return self._receive(auth, round_number, attempt, body, "unmask", UnmaskResponse.from_bytes,
                             lambda s, m, now: s.receive_unmask(m, now))

    def _fetch(self, auth: Authenticated, round_number: int, attempt: str | None, step: str, until: Phase,
               get: Callable[[Any, int], Any]) -> bytes:
        with self.ctx.lock:
            entry, index = self._resolve(auth, round_number, attempt)
            server = entry.agg.server
            if server.phase in PHASE_ORDER and PHASE_ORDER.index(server.phase) < PHASE_ORDER.index(until):
                raise self._waiting(entry, index, step, until)
            try:
                data = get(server, index).to_bytes()
            except SecAggRejected as exc:
                raise ApiError(HTTP_STATUS.get(exc.code, 400), exc.code, str(exc), extra=self._extra(entry, index)) from None
        return self.seal(auth, data)

    def roster(self, auth: Authenticated, round_number: int, attempt: str | None) -> bytes:
        """GET .../secagg/roster: U1 with everyone's keys and signatures (409 until phase share_keys)."""
        return self._fetch(auth, round_number, attempt, "roster", Phase.SHARE_KEYS, lambda s, i: s.roster_for(i))

    def bundle(self, auth: Authenticated, round_number: int, attempt: str | None) -> bytes:
        """GET .../secagg/shares: the ciphertexts addressed to the client, and U2 (409 until masked_input)."""
        return self._fetch(auth, round_number, attempt, "share bundle", Phase.MASKED_INPUT, lambda s, i: s.bundle_for(i))

    def consistency_check(self, auth: Authenticated, round_number: int, attempt: str | None) -> bytes:
        """GET .../secagg/consistency: U3 and U2 minus U3, for the client to sign (409 until phase consistency_check)."""
        return self._fetch(auth, round_number, attempt, "consistency check", Phase.CONSISTENCY_CHECK,
                           lambda s, i: s.consistency_check_for(i))

    def unmask_request(self, auth: Authenticated, round_number: int, attempt: str | None) -> bytes:
        """GET .../secagg/unmask: U3 and U2 minus U3 with every survivor's signature on it (409 until phase unmask)."""
        return self._fetch(auth, round_number, attempt, "unmask request", Phase.UNMASK, lambda s, i: s.unmask_request_for(i))

    def outcome(self, auth: Authenticated, round_number: int, attempt: str | None) -> dict[str, Any]:
        """GET .../secagg/outcome: how the attempt ended and whether this client's input is in the applied sum
        (a SCAFFOLD client moves its control variate only then, as in the simulation)."""
        return attempt_outcome(self.ctx, auth, round_number, attempt, "secure")

    def accept_update(self, auth: Authenticated, round_number: int, attempt: str | None, idempotency_key: str,
                      body: bytes) -> dict[str, Any]:
        """POST .../rounds/{r}/update in a secure round: a masked input (no codec: masked values are uniform),
        with the clear metrics sample-level DP checks. Summed in memory, never written to disk."""
        self.ctx.gateway.check_idempotency_key(auth.client_id, idempotency_key)
        problem: MalformedMessage | None = None
        metrics: dict[str, float] = {}
        msg: MaskedInput | None = None
        try:
            data = self.ctx.gateway.open_bytes(auth, body)
            metrics, raw = unpack_masked_upload(data)
            msg = MaskedInput.from_bytes(raw)
        except EnvelopeError:
            problem = MalformedMessage("the upload could not be decrypted with this client's key", "bad_ciphertext")
        except ValueError as exc:  # MalformedMessage is a SecAggError, caught below; this is the upload's framing
            problem = MalformedMessage(f"not a masked upload: {exc}", "malformed")
        except MalformedMessage as exc:
            problem = exc
        # The vector work stays off the service lock: the payload's digest and unpacking here, the sum after it
        # (the state machine queues the values; fold_inputs adds them), and the row's write (an fsync) after it too.
        # The digest is the one decoding the message took of the payload it carries (one SHA-256 pass of 5 MB, not
        # three): the signature is checked against it and the store keeps it.
        digest = None if msg is None else msg.payload_sha256.hex()
        prepared: PreparedInput | None = None
        params = self._attempt_params(auth, round_number, attempt) if msg is not None else None
        if params is not None and msg is not None:
            prepared = unpack_decoded_input(params, msg)
        with self.ctx.lock:
            entry, index = self._resolve(auth, round_number, attempt)
            # every input this process accepted for the attempt is here (a restart ends the attempt): no store read
            earlier = entry.digests.get(auth.client_id)
            if earlier is not None:  # a retry: the same masked input gets the same answer, a different one a 409
                if digest is not None and earlier == digest:
                    return {"accepted": True, "round": entry.round, "attempt": entry.round_id, "duplicate": True,
                            **self._extra(entry, index)}
                raise self._refused(auth, entry, index, "masked input", "conflicting_duplicate", "a different masked input "
                                    "of this client was already accepted (the first one counts)", drop=False)
            if problem is not None:
                raise self._refused(auth, entry, index, "masked input", problem.code, str(problem), drop=True)
            assert msg is not None and digest is not None
            if entry.finished:
                raise self._refused(auth, entry, index, "masked input", "round_closed", f"attempt {entry.round_id} has "
                                    f"ended", drop=False)
            now = self.ctx.clock()
            update = MaskedUpdate.wrap(auth.client_id, round_number, msg, metrics=metrics, now=now,
                                       prepared=prepared if entry.agg.params is params else None)
            try:
                self.driver.coordinator.submit(update)
            except UpdateRejected as exc:
                raise self._refused(auth, entry, index, "masked input", exc.reason, str(exc), drop=True) from None
            entry.digests[auth.client_id] = digest
            answer = {"accepted": True, "round": entry.round, "attempt": entry.round_id, "duplicate": False,
                      **self._extra(entry, index)}
        entry.agg.server.fold_inputs()
        # the row (hash, idempotency key, clear DP metrics) is written before the 202, as before; a kill -9 before
        # it aborts the attempt at restart like any other moment of a secure attempt
        self.ctx.store.add_update(UpdateRow(entry.round_id, round_number, auth.client_id, idempotency_key, "", digest, 1,
                                            dict(update.metrics), len(body), now))
        self.ctx.wake.set()
        return answer

    def _attempt_params(self, auth: Authenticated, round_number: int, attempt: str | None) -> Any:
        """The parameters of the attempt an upload names (None when it names none this client is in); read under
        the lock, used outside it to unpack the payload."""
        with self.ctx.lock:
            try:
                entry, _ = self._resolve(auth, round_number, attempt)
            except ApiError:
                return None  # the locked section answers it with its reason
            return entry.agg.params

    # ------------------------------------------------------------------ monitoring
    def _load_history(self) -> dict[str, Any]:
        raw = self.ctx.store.get_meta(META_KEY)
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = {}
        return data if isinstance(data, dict) else {}

    def _save_history(self) -> None:
        self.ctx.store.set_meta(META_KEY, json.dumps(self._history))

    def status_fields(self) -> dict[str, Any]:
        return {"secagg": self.status()}

    def status(self) -> dict[str, Any]:
        """The ``secagg`` block of ``/status`` (service's lock held by the caller or not needed: reads only).

        Besides the counts, ``current`` and ``last_round`` say how the attempt is protected (``auth``:
        the signature scheme, ``complete_graph``: classic SecAgg rather than the SecAgg+ neighbour
        graph, and for ``last_round`` its ``params`` with the threshold): the dashboard shows them, and
        between attempts nothing else would tell an operator the threshold the run works with."""
        agg = self.driver.coordinator.secagg
        current = None
        if agg is not None:
            s = agg.server
            passed = set(s.phase_closed_at)
            received = {p.value: len(s.bytes_in[p.value]) for p in PHASE_ORDER}
            drops: dict[str, int] = {}
            for d in s.drops.values():
                drops[d.phase] = drops.get(d.phase, 0) + 1
            attempt = next((a.round_id for a in self._attempts.values() if a.agg is agg), None)
            current = {"round": agg.params.round, "attempt": attempt, "phase": s.phase.value, "selected": agg.params.n,
                       "threshold": agg.params.threshold, "degree": min(agg.params.degree, agg.params.n - 1),
                       "modulus_bits": agg.params.modulus_bits, "auth": agg.params.auth,
                       "complete_graph": agg.params.degree >= agg.params.n - 1, "aggregation": agg.mode,
                       **agg.report.to_json(),
                       "deadline_in_s": round(max(0.0, s.deadline - self.ctx.clock()), 1),
                       "u1": len(s.u1) if Phase.ADVERTISE_KEYS.value in passed else received[Phase.ADVERTISE_KEYS.value],
                       "u2": len(s.u2) if Phase.SHARE_KEYS.value in passed else received[Phase.SHARE_KEYS.value],
                       "u3": len(s.u3) if Phase.MASKED_INPUT.value in passed else s.num_inputs,
                       "signed": len(s.u4) if Phase.CONSISTENCY_CHECK.value in passed
                       else received[Phase.CONSISTENCY_CHECK.value],
                       "u4": received[Phase.UNMASK.value], "received": received, "dropouts_by_phase": drops}
        h = self._history
        attempts = h.get("attempts", [])
        last = next((a for a in reversed(attempts) if a.get("aborted") is None), None)
        return {"enabled": True, "current": current, "rounds_completed": int(h.get("completed", 0)),
                "aborted_attempts": int(h.get("aborted", 0)), "dropouts_by_phase": dict(h.get("dropouts_by_phase", {})),
                "abort_reasons": [a.get("aborted") for a in attempts if a.get("aborted") is not None][-5:],
                "last_round": None if last is None else {k: last.get(k) for k in ("round", "attempt", "summed", "drops",
                                                                                     "phase_bytes", "clipped", "params",
                                                                                     "auth")}}

    def summary_block(self) -> dict[str, Any]:
        """The ``secure_aggregation`` block of summary.json, in the simulation's shape (fl_server/simulation)."""
        attempts = self._history.get("attempts", [])
        done = [a for a in attempts if a.get("aborted") is None]
        phases = [p.value for p in PHASE_ORDER]
        bytes_pp = {ph: {k: (sum(a["phase_bytes"][ph][k] for a in done) / len(done) if done else 0.0) for k in ("up", "down")}
                    for ph in phases}
        drops = {ph: (sum(a["drops"].get(ph, 0) for a in done) / len(done) if done else 0.0) for ph in phases}
        last = done[-1] if done else None
        return {
            "enabled": True,
            "protocol": "SecAgg (Bonawitz et al. 2017) with the SecAgg+ neighbour graph (Bell et al. 2020) and the "
                        "consistency check against an active server, over REST",
            "authentication": "ed25519 per client (verifying keys registered with the server at enrollment)",
            "rounds_completed": int(self._history.get("completed", 0)),
            "aborted_attempts": int(self._history.get("aborted", 0)),
            "abort_reasons": [a.get("aborted") for a in attempts if a.get("aborted") is not None][-5:],
            "last_round_parameters": last["params"] if last else None,
            "bytes_per_client_per_phase": bytes_pp,
            "mean_dropouts_per_round": drops,
            "dropouts_by_phase": dict(self._history.get("dropouts_by_phase", {})),
            "in_clear_per_client": list(IN_CLEAR),
            "threshold_bound": "2t > h + c (h share holders per client, c colluding among them): a client reveals shares "
                               "only for the survivor set it signed, once t of its holders signed the same set",
            "clipped_updates": sum(int(a.get("clipped", 0)) for a in done),
            "integrity_events": sum(int(a.get("events", 0)) for a in done),
            "wire": "masked inputs are uniform in the ring Z/2^b: the codec setting is not applied to them; b bits per value "
                    f"(last round: {last['params'].get('modulus_bits') if last else '-'}-bit ring Z/2^b)",
        }


__all__ = ["HTTP_STATUS", "MIN_SECURE_CLIENTS", "SecureRounds"]
