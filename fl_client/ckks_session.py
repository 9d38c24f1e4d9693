"""The client's side of one CKKS attempt over REST (fl_server/rest/ckks_driver.py).

:class:`CKKSRoundSession` runs the transport-free code of ``fl_common.he`` by polling the server:

1. the round's decryptor makes a fresh key pair (in memory only) and posts the public key;
2. every client reads the public key (409 ``wrong_phase`` until the decryptor sent it), refuses one that
   carries a secret key or is not the decryptor's, encodes its trained update (clip, weight n_k / W, the DP
   clipping bit where collected) and uploads the ciphertexts through the update route with only the clear
   metrics the server may see;
3. the decryptor reads the ciphertext sum (409 until the inputs phase ended), decrypts it and posts the slot
   values; it refuses a "sum" of fewer than two inputs;
4. every client waits for the outcome.

Nothing is logged that is secret (keys, plaintexts). A daemon that restarts mid-attempt has lost the key (if it
was the decryptor, the attempt aborts at the phase deadline) and waits for the next attempt.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_client.api import ApiRefused, ServerApi, ServerUnreachable
from fl_client.secagg_session import clear_metrics
from fl_common.he import (
    CKKSParams,
    EncryptedInput,
    EncryptedSum,
    Encryptor,
    HEInput,
    HEMessageError,
    KeyHolder,
    PublicKey,
    encode_input,
)
from fl_common.protocol.rest import pack_masked_upload

log = logging.getLogger("fl_client.ckks")

#: seconds a client keeps waiting past a phase's deadline for the server's ticker to close it
DEADLINE_GRACE = 5.0


class CKKSSessionEnded(Exception):
    """The attempt cannot go on for this client (refused, aborted, too late, stopped): the message says why."""


@dataclass
class CKKSResult:
    round: int
    attempt: int
    input_sent: bool
    state: str  # closed / aborted / open (outcome unknown) / failed
    in_sum: bool
    reason: str | None = None


class CKKSRoundSession:
    def __init__(self, api: ServerApi, status: dict[str, Any], *, encrypted: bool,
                 sleep: Callable[[float], None] = time.sleep, stop: Callable[[], bool] = lambda: False,
                 call: Callable[..., Any] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``status``: the poll reply that selected this client (its ``secagg`` block, method ckks)."""
        block = status["secagg"]
        self.api = api
        self.round = int(status["round"])
        self.attempt = int(block["attempt"])
        self.params = CKKSParams.from_json(block["params"])
        me = api.creds.client_id if api.creds is not None else None
        if self.params.round != self.round or me not in self.params.clients:
            raise CKKSSessionEnded("the round's CKKS parameters do not list this client")
        self.me = str(me)
        self.decryptor = self.me == self.params.decryptor
        self.encrypted = encrypted
        self.poll = max(0.05, float(block.get("poll_after") or 1.0))
        self._sleep, self._stop, self._clock = sleep, stop, clock
        self._call = call or (lambda fn, *a: fn(*a))
        self.phase = str(block.get("phase"))
        self._deadline = clock() + float(block.get("deadline_in_s") or 0.0)
        round_deadline = status.get("deadline")
        self._round_deadline = (clock() + float(round_deadline) - time.time()
                                if isinstance(round_deadline, (int, float)) else self._deadline)
        self.holder: KeyHolder | None = None
        self.input_sent = False

    # ------------------------------------------------------------------ plumbing
    def _note(self, data: dict[str, Any]) -> None:
        if isinstance(data.get("phase"), str):
            self.phase = data["phase"]
        if isinstance(data.get("deadline_in_s"), (int, float)):
            self._deadline = self._clock() + float(data["deadline_in_s"])

    def _expired(self) -> bool:
        return self._clock() > max(self._deadline, self._round_deadline) + max(DEADLINE_GRACE, 2 * self.poll)

    def _wait(self) -> None:
        if self._stop():
            raise CKKSSessionEnded("stopped")
        self._sleep(self.poll)

    def _send(self, step: str, message: bytes) -> dict[str, Any]:
        while True:
            try:
                answer: dict[str, Any] = self._call(self.api.ckks_send, self.round, self.attempt, step, message, self.encrypted)
            except ServerUnreachable as exc:
                if self._expired():
                    raise CKKSSessionEnded(f"{step}: server unreachable until the deadline ({exc})") from None
                self._wait()
                continue
            except ApiRefused as exc:
                self._note(exc.data)
                raise CKKSSessionEnded(f"{step} refused: {exc.status} {exc.code}") from None
            self._note(answer)
            return answer

    def _fetch(self, step: str) -> bytes:
        """GET a step's message, polling while the server answers 409 wrong_phase (until the deadline)."""
        while True:
            try:
                data: bytes = self._call(self.api.ckks_fetch, self.round, self.attempt, step, self.encrypted)
                return data
            except ServerUnreachable as exc:
                if self._expired():
                    raise CKKSSessionEnded(f"{step}: server unreachable until the deadline ({exc})") from None
            except ApiRefused as exc:
                self._note(exc.data)
                if not (exc.status == 409 and exc.code == "wrong_phase"):
                    raise CKKSSessionEnded(f"{step} refused: {exc.status} {exc.code}") from None
                if self.phase == "aborted" or self._expired():
                    raise CKKSSessionEnded(f"{step}: not available by the deadline (phase {self.phase})") from None
            self._wait()

    # ------------------------------------------------------------------ the steps
    def publish_key(self) -> None:
        """Decryptor only: a fresh key pair for this attempt; the public half to the server."""
        self.holder = KeyHolder(self.params, self.me)
        self._send("key", self.holder.public_key().to_bytes())

    def send_input(self, delta: Any, num_samples: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Read the public key, encode and encrypt the update, upload it (retried with the same bytes and key)."""
        try:
            encryptor = Encryptor(self.params, PublicKey.from_bytes(self._fetch("key")))
        except HEMessageError as exc:
            log.warning("round %d: refusing the public key of CKKS attempt %d: %s", self.round, self.attempt, exc)
            raise CKKSSessionEnded(f"refused the public key ({exc})") from None
        p = self.params
        plain = HEInput(delta=np.asarray(delta, dtype=np.float64), weight=int(num_samples), loss=metrics.get("train_loss"),
                        unclipped=bool(metrics.get("dp_unclipped")) if p.with_unclipped else None)
        try:
            vector, _ = encode_input(p, plain)
        except ValueError as exc:
            raise CKKSSessionEnded(f"cannot encode the update for CKKS ({exc})") from None
        body = pack_masked_upload(EncryptedInput(p.round, self.me, encryptor.encrypt(vector)).to_bytes(), clear_metrics(metrics))
        key = f"he{self.attempt}-{uuid.uuid4().hex}"
        answer: dict[str, Any] = {}
        while True:
            try:
                answer = self._call(self.api.upload_update, self.round, body, key, self.encrypted, self.attempt)
                break
            except ServerUnreachable as exc:
                if self._expired():
                    raise CKKSSessionEnded(f"ciphertexts: server unreachable until the deadline ({exc})") from None
                self._wait()
            except ApiRefused as exc:
                self._note(exc.data)
                raise CKKSSessionEnded(f"ciphertexts refused: {exc.status} {exc.code}") from None
        self._note(answer)
        self.input_sent = True
        log.info("round %d: CKKS ciphertexts accepted (%d ciphertexts, %d bytes)%s", self.round, p.num_ciphertexts,
                 len(body), " [retry of an accepted upload]" if answer.get("duplicate") else "")
        return answer

    def decrypt_sum(self) -> None:
        """Decryptor only: decrypt the server's sum and post the slot values."""
        assert self.holder is not None
        try:
            answer = self.holder.decrypt(EncryptedSum.from_bytes(self._fetch("sum")))
        except HEMessageError as exc:
            log.warning("round %d: refusing to decrypt the sum of CKKS attempt %d: %s", self.round, self.attempt, exc)
            raise CKKSSessionEnded(f"refused to decrypt ({exc})") from None
        self._send("decrypted", answer.to_bytes())
        log.info("round %d: decrypted the CKKS sum of attempt %d", self.round, self.attempt)

    def outcome(self) -> dict[str, Any]:
        while True:
            try:
                result: dict[str, Any] = self._call(self.api.ckks_outcome, self.round, self.attempt)
                if result.get("state") != "open":
                    return result
            except ServerUnreachable:
                pass
            except ApiRefused as exc:
                return {"state": "unknown", "in_sum": False, "reason": f"{exc.status} {exc.code}"}
            if self._expired():
                return {"state": "open", "in_sum": False, "reason": "the attempt had not ended by its deadline"}
            self._wait()

    def run(self, make_update: Callable[[], tuple[Any, int, dict[str, float]]]) -> CKKSResult:
        """All steps; ``make_update()`` trains and returns (delta, num_samples, metrics)."""
        try:
            if self.decryptor:
                self.publish_key()
            delta, num_samples, metrics = make_update()
            self.send_input(delta, num_samples, metrics)
            if self.decryptor:
                self.decrypt_sum()
        except CKKSSessionEnded as exc:
            if not self.input_sent and not self.decryptor:
                return CKKSResult(self.round, self.attempt, False, "failed", False, str(exc))
            log.warning("round %d: %s", self.round, exc)
        out = self.outcome()
        return CKKSResult(self.round, self.attempt, self.input_sent, str(out.get("state")), bool(out.get("in_sum")),
                          out.get("reason"))


__all__ = ["CKKSResult", "CKKSRoundSession", "CKKSSessionEnded"]
