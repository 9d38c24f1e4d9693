"""CKKS aggregation over REST: the round protocol of ``secure_aggregation_method: ckks``, plugged into the
synchronous driver beside plain rounds and masking (fl_server/rest/secure_driver.py).

The protocol is transport free (``fl_common.he``: parameters, keys, messages; ``fl_server.he``: the
coordinator's :class:`~fl_server.he.CKKSAggregator`); this module moves its bytes between HTTP and the
aggregator and turns its outcome into a closed or aborted attempt. One attempt runs three phases:

1. ``public_key``: the round's decryptor (named in every selected client's poll reply) makes a fresh key
   pair and posts the public key (``POST .../ckks/key``); the others read it (``GET``, 409 until then).
2. ``inputs``: every selected client posts its ciphertexts through the update route (``?attempt=ID``); the
   server adds them as they arrive. The phase ends at quorum, or ``round_timeout`` after the key with at
   least max(2, min_clients) inputs (fewer: the attempt is aborted). A client that never uploads is simply
   not in the sum.
3. ``decrypt``: the decryptor reads the sum (``GET .../ckks/sum``) and posts its decryption
   (``POST .../ckks/decrypted``); the next tick applies it. A decryptor silent for
   ``secagg_phase_timeout`` aborts the attempt; a new one (new decryptor, new key) follows.

Every request is signed and every body Fernet-sealed like the rest of the protocol (the gateway's
``open_bytes`` / ``seal_for``). Nothing of an attempt is stored but the bookkeeping row of each input (hash,
idempotency key, clear DP metrics): a restart (``kill -9``) aborts the open attempt with its reason and plans a
new one, as for masking. ``.../ckks/outcome`` tells a client how its attempt ended.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from fl_common.crypto import EnvelopeError
from fl_common.he import DecryptedSum, EncryptedInput, HEMessageError, PublicKey
from fl_common.protocol.rest import ROUND_NOT_SELECTED, ROUND_SELECTED, ROUND_SUBMITTED, RoundStatus, unpack_masked_upload
from fl_server.he import CKKSAggregator, EncryptedUpdate
from fl_server.rest.driver import DriverContext
from fl_server.rest.gateway import CKKS_FEATURES, ApiError, Authenticated
from fl_server.rest.sync_driver import RoundProtocol, SyncRoundDriver, abort_protected_attempt_at_restart, attempt_outcome
from fl_server.secagg import SecureAggregator
from fl_server.selection import ClientInfo
from fl_server.store.sqlite import RoundRow, UpdateRow
from fl_server.strategies import UpdateRejected

log = logging.getLogger("fl_server.rest.ckks_driver")

PHASE_KEY, PHASE_INPUTS, PHASE_DECRYPT, PHASE_DONE, PHASE_ABORTED = "public_key", "inputs", "decrypt", "done", "aborted"
PHASES = (PHASE_KEY, PHASE_INPUTS, PHASE_DECRYPT, PHASE_DONE)
#: the poll interval a client uses between the phases (at most; cfg.poll_interval when lower)
CKKS_POLL_MAX = 1.0
#: meta-table key of the finished attempts (completed count, abort reasons) and how many reasons it keeps
META_KEY = "ckks_history"
HISTORY_LIMIT = 500
RESTART_REASON = ("the server restarted during the CKKS round: the ciphertext sum lives in memory only, so the attempt "
                  "is aborted and nothing of it is applied")


@dataclass
class _Attempt:
    round_id: int
    round: int
    agg: CKKSAggregator
    phase: str
    deadline: float
    key_bytes: bytes = b""
    sum_bytes: bytes = b""
    decrypted: bool = False
    reason: str | None = None


class CKKSRounds(RoundProtocol):
    """The round protocol of CKKS aggregation (see the module docstring). Methods touching an attempt hold
    the service's lock (``ctx.lock``)."""

    driver_features = CKKS_FEATURES
    driver: SyncRoundDriver

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self._attempts: dict[int, _Attempt] = {}
        # completed rounds and abort reasons, kept in the store's meta table so they survive a restart
        history = self._load_history()
        self.completed = int(history.get("completed", 0))
        self.aborted: list[str] = [str(r) for r in history.get("aborted", [])]

    def _load_history(self) -> dict[str, Any]:
        raw = self.ctx.store.get_meta(META_KEY)
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = {}
        return data if isinstance(data, dict) else {}

    def _save_history(self) -> None:
        self.aborted = self.aborted[-HISTORY_LIMIT:]
        self.ctx.store.set_meta(META_KEY, json.dumps({"completed": self.completed, "aborted": self.aborted}))

    def _aborted(self, reason: str) -> None:
        self.aborted.append(reason)
        self._save_history()

    # ------------------------------------------------------------------ candidates and recovery
    def min_live_clients(self) -> int:
        return max(self.cfg.min_clients, 2)

    def candidates(self, live: list[str], infos: dict[str, ClientInfo] | None
                   ) -> tuple[list[str], dict[str, ClientInfo] | None]:
        """Live clients with a reported record count (the public weight bound W is the largest among the selected)."""
        profiles = self.ctx.store.profiles()
        out: dict[str, ClientInfo] = {}
        for cid in live:
            info = (infos or {}).get(cid)
            if info is not None and info.num_samples is not None:
                out[cid] = info
                continue
            reported = (profiles.get(cid) or {}).get("num_samples")
            if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
                out[cid] = ClientInfo(cid, num_samples=reported)
        return [cid for cid in live if cid in out], out

    def planning_may_wait(self, exc: Exception) -> bool:
        return True

    def deadline_extra(self, secagg_planned: bool) -> float:
        return 2 * self.cfg.secagg_phase_timeout

    def recover_open(self, row: RoundRow) -> bool:
        """A CKKS attempt open at start-up is aborted (its sum was in memory); a plain one cannot go on as CKKS.
        Under sample-level DP the clients whose inputs had arrived are charged (conservative, as for masking)."""
        if row.secagg is None or row.secagg.get("method") != "ckks":
            self.driver.abort_mismatched(row, secure_now=True)
            return True
        abort_protected_attempt_at_restart(self.driver, row, RESTART_REASON)
        self._aborted(RESTART_REASON)
        log.warning("round %d (attempt %d): %s", row.round, row.round_id, RESTART_REASON)
        return True

    # ------------------------------------------------------------------ lifecycle (lock held)
    def opened(self, row: RoundRow) -> None:
        agg = self.driver.coordinator.ckks
        assert agg is not None
        for attempt_id in [a for a, att in self._attempts.items() if att.phase in (PHASE_DONE, PHASE_ABORTED)]:
            del self._attempts[attempt_id]
        self._attempts[row.round_id] = _Attempt(row.round_id, row.round, agg, PHASE_KEY,
                                                row.started_at + self.cfg.secagg_phase_timeout)
        log.info("round %d (attempt %d): CKKS over %d clients, decryptor %s, %d ciphertexts per client", row.round,
                 row.round_id, len(agg.params.clients), agg.params.decryptor, agg.params.num_ciphertexts)

    def _current(self) -> _Attempt | None:
        agg = self.driver.coordinator.ckks
        return next((a for a in self._attempts.values() if agg is not None and a.agg is agg), None)

    def tick(self, row: RoundRow, now: float) -> None:
        att = self._current()
        if att is None:
            return
        agg = att.agg
        if att.phase == PHASE_KEY and now > att.deadline:
            self._abort(row, att, f"the decryptor (client {agg.params.decryptor}) sent no public key", now)
        elif att.phase == PHASE_INPUTS:
            enough = agg.num_updates >= max(2, self.cfg.min_clients)
            if agg.num_updates >= row.target or (now >= att.deadline and enough):
                att.sum_bytes = agg.encrypted_sum().to_bytes()
                att.phase, att.deadline = PHASE_DECRYPT, now + self.cfg.secagg_phase_timeout
                log.info("round %d (attempt %d): %d ciphertext inputs summed; waiting for the decryptor", row.round,
                         row.round_id, agg.num_updates)
            elif now >= att.deadline:
                self._abort(row, att, f"only {agg.num_updates} input(s) by the deadline, fewer than max(2, min_clients="
                            f"{self.cfg.min_clients})", now)
        elif att.phase == PHASE_DECRYPT:
            if att.decrypted:
                self.driver.coordinator.add_bytes(len(att.key_bytes) * (1 + len(agg.params.clients)) + len(att.sum_bytes))
                closed = self.driver.close_round(row, "decrypted")
                att.phase = PHASE_DONE if closed is not None else PHASE_ABORTED
                if closed is None:
                    att.reason = "the decrypted aggregate is not finite"
                    self._aborted(att.reason)
            elif now > att.deadline:
                self._abort(row, att, f"the decryptor (client {agg.params.decryptor}) did not decrypt the sum", now)

    def round_closed(self, row: RoundRow, secagg: SecureAggregator | None) -> None:
        self.completed += 1
        self._save_history()

    def _abort(self, row: RoundRow, att: _Attempt, reason: str, now: float) -> None:
        phase = att.phase
        att.phase, att.reason = PHASE_ABORTED, reason
        att.agg.abort(reason)
        self._aborted(reason)
        self.driver.abort_round(row, f"CKKS aggregation aborted in phase {phase}: {reason}", now, warn=False)
        log.warning("round %d (attempt %d): CKKS aggregation aborted in phase %s: %s; a new attempt follows", row.round,
                    row.round_id, phase, reason)

    def client_left(self, client_id: str, why: str, now: float) -> None:
        """A revoked decryptor ends the attempt now (nobody else can decrypt); other clients simply do not count."""
        att = self._current()
        if att is not None and att.phase in (PHASE_KEY, PHASE_INPUTS, PHASE_DECRYPT) and client_id == att.agg.params.decryptor:
            row = self.ctx.store.current_open_round()
            if row is not None:
                self._abort(row, att, f"the decryptor left ({why})", now)

    # ------------------------------------------------------------------ the client's view
    def _block(self, att: _Attempt, client_id: str) -> dict[str, Any]:
        now = self.ctx.clock()
        return {"method": "ckks", "attempt": att.round_id, "params": att.agg.params.to_json(), "phase": att.phase,
                "decryptor": client_id == att.agg.params.decryptor, "deadline_in_s": round(max(0.0, att.deadline - now), 3),
                "poll_after": min(self.cfg.poll_interval, CKKS_POLL_MAX)}

    def round_status(self, client_id: str, row: RoundRow, instructions: dict[str, Any], version: int) -> RoundStatus:
        coord = self.driver.coordinator
        att = self._current()
        poll = self.cfg.poll_interval
        if att is None or client_id not in att.agg.params.clients:
            return RoundStatus(ROUND_NOT_SELECTED, row.round, version, poll, row.deadline)
        block = self._block(att, client_id)
        submitted = client_id in coord.arrived
        decryptor_busy = block["decryptor"] and att.phase in (PHASE_KEY, PHASE_DECRYPT)
        if (att.phase in (PHASE_KEY, PHASE_INPUTS) and not submitted) or decryptor_busy:
            return RoundStatus(ROUND_SELECTED, row.round, version, poll, row.deadline, instructions, secagg=block)
        return RoundStatus(ROUND_SUBMITTED if submitted else ROUND_NOT_SELECTED, row.round, version, poll, row.deadline,
                           None, secagg=block)

    # ------------------------------------------------------------------ endpoints
    def _resolve(self, auth: Authenticated, round_number: int, attempt: str | None) -> _Attempt:
        if attempt is None or not (attempt.isascii() and attempt.isdigit()) or len(attempt) > 12:
            raise ApiError(400, "bad_attempt", "CKKS requests need ?attempt=ID (a positive integer)")
        att = self._attempts.get(int(attempt))
        if att is None or att.round != round_number:
            raise ApiError(409, "attempt_closed", f"attempt {attempt} of round {round_number} is not open on this server (it "
                           f"ended, or the server restarted); poll the round for the current one", extra={"phase": None})
        if auth.client_id not in att.agg.params.clients:
            raise ApiError(409, "not_selected", f"this client is not in attempt {attempt}", extra={"phase": att.phase})
        return att

    def _extra(self, att: _Attempt) -> dict[str, Any]:
        return {"phase": att.phase, "deadline_in_s": round(max(0.0, att.deadline - self.ctx.clock()), 3)}

    def _decryptor_only(self, auth: Authenticated, att: _Attempt, step: str) -> None:
        if auth.client_id != att.agg.params.decryptor:
            self.ctx.gateway.refuse("ckks_not_decryptor", auth.client_id, f"{step} of attempt {att.round_id}")
            raise ApiError(403, "not_decryptor", f"only the round's decryptor may {step}", extra=self._extra(att))

    def _wrong_phase(self, att: _Attempt, step: str, want: str) -> ApiError:
        return ApiError(409, "wrong_phase", f"{step} is available in phase {want}; the attempt is in phase {att.phase}",
                        extra=self._extra(att))

    def _open(self, auth: Authenticated, body: bytes) -> bytes:
        try:
            return self.ctx.gateway.open_bytes(auth, body)
        except EnvelopeError:
            raise ApiError(400, "bad_ciphertext", "the body could not be decrypted with this client's key") from None

    def post_key(self, auth: Authenticated, round_number: int, attempt: str | None, body: bytes) -> dict[str, Any]:
        """POST .../ckks/key: the decryptor's public key (an identical retry is answered again)."""
        data = self._open(auth, body)
        with self.ctx.lock:
            att = self._resolve(auth, round_number, attempt)
            self._decryptor_only(auth, att, "post the public key")
            if att.key_bytes:
                if data == att.key_bytes:
                    return {"accepted": True, "duplicate": True, **self._extra(att)}
                raise ApiError(409, "conflicting_duplicate", "this attempt already has its public key", extra=self._extra(att))
            if att.phase != PHASE_KEY:
                raise self._wrong_phase(att, "posting the public key", PHASE_KEY)
            try:
                att.agg.receive_public_key(PublicKey.from_bytes(data))
            except HEMessageError as exc:
                self.ctx.gateway.refuse("ckks_bad_key", auth.client_id, str(exc))
                raise ApiError(400, "bad_key", str(exc), extra=self._extra(att)) from None
            att.key_bytes = data
            att.phase, att.deadline = PHASE_INPUTS, self.ctx.clock() + self.cfg.round_timeout
            answer = {"accepted": True, "duplicate": False, **self._extra(att)}
        self.ctx.wake.set()
        return answer

    def get_key(self, auth: Authenticated, round_number: int, attempt: str | None) -> bytes:
        """GET .../ckks/key: the public key (409 wrong_phase until the decryptor sent it)."""
        with self.ctx.lock:
            att = self._resolve(auth, round_number, attempt)
            if not att.key_bytes:
                raise self._wrong_phase(att, "the public key", PHASE_INPUTS)
            data = att.key_bytes
        return self.ctx.gateway.seal_for(auth, data)

    def get_sum(self, auth: Authenticated, round_number: int, attempt: str | None) -> bytes:
        """GET .../ckks/sum: the ciphertext sum, for the decryptor only (409 until phase decrypt)."""
        with self.ctx.lock:
            att = self._resolve(auth, round_number, attempt)
            self._decryptor_only(auth, att, "read the sum")
            if not att.sum_bytes:
                raise self._wrong_phase(att, "the sum", PHASE_DECRYPT)
            data = att.sum_bytes
        return self.ctx.gateway.seal_for(auth, data)

    def post_decrypted(self, auth: Authenticated, round_number: int, attempt: str | None, body: bytes) -> dict[str, Any]:
        """POST .../ckks/decrypted: the decryptor's decryption of the sum; the next tick applies it."""
        data = self._open(auth, body)
        with self.ctx.lock:
            att = self._resolve(auth, round_number, attempt)
            self._decryptor_only(auth, att, "post the decrypted sum")
            if att.decrypted:
                return {"accepted": True, "duplicate": True, **self._extra(att)}
            if att.phase != PHASE_DECRYPT:
                raise self._wrong_phase(att, "posting the decrypted sum", PHASE_DECRYPT)
            try:
                att.agg.receive_decrypted(DecryptedSum.from_bytes(data))
            except HEMessageError as exc:
                self.ctx.gateway.refuse("ckks_bad_decryption", auth.client_id, str(exc))
                raise ApiError(400, "bad_decryption", str(exc), extra=self._extra(att)) from None
            att.decrypted = True
            answer = {"accepted": True, "duplicate": False, **self._extra(att)}
        self.ctx.wake.set()
        return answer

    def outcome(self, auth: Authenticated, round_number: int, attempt: str | None) -> dict[str, Any]:
        """GET .../ckks/outcome: how the attempt ended and whether this client's input is in the applied sum."""
        return attempt_outcome(self.ctx, auth, round_number, attempt, "CKKS")

    def accept_update(self, auth: Authenticated, round_number: int, attempt: str | None, idempotency_key: str,
                      body: bytes) -> dict[str, Any]:
        """POST .../rounds/{r}/update in a CKKS round: the client's ciphertexts (no codec), summed in memory, never
        written to disk. An identical retry gets the first answer; a different second upload a 409."""
        self.ctx.gateway.check_idempotency_key(auth.client_id, idempotency_key)
        data = self._open(auth, body)
        try:
            metrics, view = unpack_masked_upload(data)
            raw = bytes(view)
            enc: EncryptedInput | None = EncryptedInput.from_bytes(raw)
            problem = None
        except (ValueError, HEMessageError) as exc:
            enc, metrics, raw, problem = None, {}, b"", str(exc)
        digest = hashlib.sha256(raw).hexdigest()
        with self.ctx.lock:
            att = self._resolve(auth, round_number, attempt)
            previous = self.ctx.store.update(att.round_id, auth.client_id)
            if previous is not None:
                if previous.sha256 == digest:
                    return {"accepted": True, "round": att.round, "attempt": att.round_id, "duplicate": True, **self._extra(att)}
                raise ApiError(409, "conflicting_duplicate", "a different upload of this client was already accepted",
                               extra=self._extra(att))
            if problem is not None or enc is None:
                self.ctx.gateway.reject_update("malformed", auth.client_id)
                raise ApiError(400, "malformed", f"not a CKKS upload: {problem}", extra=self._extra(att))
            if att.phase != PHASE_INPUTS:
                raise self._wrong_phase(att, "uploading ciphertexts", PHASE_INPUTS)
            now = self.ctx.clock()
            update = EncryptedUpdate.wrap(auth.client_id, round_number, enc, metrics=metrics)
            try:
                self.driver.coordinator.submit(update)
            except UpdateRejected as exc:
                self.ctx.gateway.reject_update(exc.reason, auth.client_id)
                raise ApiError(409 if exc.reason in ("duplicate", "closed", "not_selected") else 400, exc.reason, str(exc),
                               extra=self._extra(att)) from None
            self.ctx.store.add_update(UpdateRow(att.round_id, round_number, auth.client_id, idempotency_key, "", digest, 1,
                                                dict(update.metrics), len(body), now))
            answer = {"accepted": True, "round": att.round, "attempt": att.round_id, "duplicate": False, **self._extra(att)}
        self.ctx.wake.set()
        return answer

    # ------------------------------------------------------------------ monitoring
    def status_fields(self) -> dict[str, Any]:
        return {"ckks": self.status()}

    def status(self) -> dict[str, Any]:
        """The ``ckks`` block of ``/status`` (read by ``/metrics`` and the dashboard too): the open attempt, the
        completed rounds, the aborted attempts and their last reasons. ``/status`` is public: it does not say
        which client decrypts (the one client whose silence aborts the attempt; the selected client learns it
        from its own poll reply)."""
        att = self._current()
        current = None if att is None else {"round": att.round, "attempt": att.round_id, "phase": att.phase,
                                             "inputs": att.agg.num_updates,
                                             "selected": len(att.agg.params.clients),
                                             "deadline_in_s": round(max(0.0, att.deadline - self.ctx.clock()), 1)}
        return {"current": current, "rounds_completed": self.completed, "aborted_attempts": len(self.aborted),
                "abort_reasons": self.aborted[-5:]}

    def summary_block(self) -> dict[str, Any]:
        return {"enabled": True, "method": "ckks",
                "protocol": "CKKS (TenSEAL/SEAL), one decryptor per round among the selected clients, over REST",
                "rounds_completed": self.completed, "aborted_attempts": len(self.aborted),
                "abort_reasons": self.aborted[-5:],
                "wire": "ciphertexts are dense and their size does not depend on the values: the codec setting is not applied"}


__all__ = ["PHASES", "CKKSRounds"]
