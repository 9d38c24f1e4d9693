"""The client's side of one secure-aggregation attempt over REST.

:class:`SecureRoundSession` drives the transport-free :class:`~fl_common.secagg.SecAggClient` (the
same state machine the simulation runs) through the five phases by polling the server:

1. advertise two fresh public keys (signed with the client's long-term Ed25519 identity);
2. wait for the roster (409 ``wrong_phase`` until every selected client advertised or the phase's
   deadline passed), check it (every neighbour's signature; with pinned keys, that each neighbour's
   key is pinned), send the encrypted shares of its secrets - or, refusing the roster, leave the
   attempt (the server then counts this client as dropped at the phase's deadline);
3. wait for the share bundle and open it (while training runs), mask the plain input (the trained
   update, its weight, SCAFFOLD's variate delta, the DP clipping bit: whatever the round's layout has)
   and upload it through the update route, with only the clear metrics the server may see;
4. wait for the consistency check (the set of clients whose masked inputs the server holds) and sign
   it: once per attempt, so a server that shows two sets gets each signed by disjoint honest clients;
5. wait for the unmask request, reveal the shares it asks for only if it is the set this client
   signed and carries at least t valid signatures on it from this client's share holders (the state
   machine also refuses a request that would reveal both secrets of one peer), then wait for the outcome.

Why the steps are separate methods: the daemon overlaps local training with phases 1 and 2 (it
downloads the model and starts training before it advertises, and opens the share bundle while it
trains, so the key exchange costs almost no round time), and tests drive the steps one by one.
Everything here is in memory: a daemon that restarts in the middle of an attempt has lost its keys
and simply waits for the next attempt. Nothing secret is logged (keys, shares and inputs never reach
a log line or an exception message).

Retries: transport errors and 5xx are retried by the API client, and again here until the phase's
deadline; a retried message is byte-identical, which the server answers like the first one. The masked
input (the trained update) is retried with backoff, the same bytes under the same idempotency key, until
the masked-input phase can no longer take it (the round's deadline bounds it) or the server answers.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_client.api import ApiRefused, ServerApi, ServerUnreachable
from fl_client.backoff import ServerWait
from fl_client.trusted_keys import IDENTITY_FILE
from fl_common.protocol.rest import MASKED_UPLOAD_METRICS, pack_masked_upload
from fl_common.secagg import (
    ConsistencyCheck,
    MaskedInput,
    PlainInput,
    RosterMessage,
    SecAggClient,
    SecAggError,
    SecAggParams,
    ShareBundle,
    SigningIdentity,
    UnmaskRequest,
)
from fl_common.secagg.encoding import CLEAR_METRICS
from fl_common.secagg.precompute import MaskPrecompute

log = logging.getLogger("fl_client.secagg")

PHASES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask", "done", "aborted")
#: seconds a client keeps waiting past a phase's deadline for the server's ticker to close it
DEADLINE_GRACE = 5.0
#: longest wait between two tries of the masked input while the server is unreachable (seconds)
MASKED_RETRY_CAP = 5.0


class SessionEnded(Exception):
    """The attempt cannot go on for this client (dropped, aborted, too late, refused, stopped): ``reason`` says why."""


@dataclass
class SessionResult:
    """How one attempt went for this client."""

    round: int
    attempt: int
    masked_sent: bool
    state: str  # closed / aborted / open (outcome unknown) / failed (this client left the attempt)
    in_sum: bool
    reason: str | None = None


def clear_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that travel next to a masked input: only the DP-SGD plan the server told this client
    (fl_common.secagg.encoding.CLEAR_METRICS, a subset of what the upload format allows). Nothing about the
    data: a training loss or accuracy would leak what the masking hides, a step count or the training time
    the record count and the hardware."""
    return {k: float(metrics[k]) for k in CLEAR_METRICS if k in MASKED_UPLOAD_METRICS and k in metrics}


def plain_input(params: SecAggParams, delta: Any, num_samples: int, metrics: dict[str, float],
                control: Any = None) -> PlainInput:
    """What a trained update contributes to the round's layout (as fl_server/simulation/secagg.py builds it)."""
    wants_bit = params.segment("unclipped") is not None
    return PlainInput(delta=delta, weight=int(num_samples), control=control, loss=metrics.get("train_loss"),
                      unclipped=bool(metrics.get("dp_unclipped")) if wants_bit else None)


class SecureRoundSession:
    def __init__(self, api: ServerApi, identity: SigningIdentity, status: dict[str, Any], *, encrypted: bool,
                 sleep: Callable[[float], None] = time.sleep, stop: Callable[[], bool] = lambda: False,
                 call: Callable[..., Any] | None = None, rng: np.random.Generator | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 trusted_verify_keys: frozenset[bytes] | None = None) -> None:
        """``status``: the poll reply that selected this client (its ``secagg`` block). ``call`` wraps each
        API call (the daemon's renews an expired session token); ``rng`` drives only the stochastic rounding.
        ``trusted_verify_keys``: the peers' pinned Ed25519 verifying keys (fl_client/trusted_keys.py); with
        them a roster carrying any other key is refused (None: the roster's keys are trusted)."""
        block = status["secagg"]
        self.api = api
        self.round = int(status["round"])
        self.attempt = int(block["attempt"])
        self.index = int(block["index"])
        self.params = SecAggParams.from_json(block["params"])
        me = api.creds.client_id if api.creds is not None else None
        listed = 1 <= self.index <= self.params.n and self.params.client_ids[self.index - 1] == me
        if self.params.round != self.round or not listed:
            raise SessionEnded("the round's parameters do not list this client at the index the server gave")
        self.encrypted = encrypted
        self.poll = max(0.05, float(block.get("poll_after") or 1.0))
        self._sleep, self._stop, self._clock = sleep, stop, clock
        self._call = call or (lambda fn, *a: fn(*a))
        self.phase = str(block.get("phase"))
        self._deadline = clock() + float(block.get("deadline_in_s") or 0.0)
        # the round's deadline (server wall clock): every phase ends before it
        round_deadline = status.get("deadline")
        self._round_deadline = (clock() + float(round_deadline) - time.time()
                                if isinstance(round_deadline, (int, float)) else self._deadline)
        self.client = SecAggClient(self.params, self.index, identity, rng=rng, trusted_verify_keys=trusted_verify_keys)
        self.masked_sent = False
        self._bundle_opened = False

    def __repr__(self) -> str:
        return f"SecureRoundSession(round={self.round}, attempt={self.attempt}, index={self.index}, phase={self.phase})"

    # ------------------------------------------------------------------ plumbing
    def _note(self, data: dict[str, Any]) -> None:
        """Keep the server's view of the phase and its deadline (every answer and refusal carries them)."""
        if isinstance(data.get("phase"), str):
            self.phase = data["phase"]
        if isinstance(data.get("deadline_in_s"), (int, float)):
            self._deadline = self._clock() + float(data["deadline_in_s"])

    def _expired(self) -> bool:
        return self._clock() > self._deadline + max(DEADLINE_GRACE, 2 * self.poll)

    def _wait(self) -> None:
        if self._stop():
            raise SessionEnded("stopped")
        self._sleep(self.poll)

    def _refused(self, what: str, exc: ApiRefused) -> SessionEnded:
        self._note(exc.data)
        dropped = " (dropped from this attempt)" if exc.data.get("dropped") else ""
        return SessionEnded(f"{what} refused: {exc.status} {exc.code}{dropped}")

    def _send(self, step: str, message: bytes) -> dict[str, Any]:
        while True:
            try:
                answer = self._call(self.api.secagg_send, self.round, self.attempt, step, message, self.encrypted)
            except ServerUnreachable as exc:
                if self._expired():
                    raise SessionEnded(f"{step}: server unreachable until the phase's deadline ({exc})") from None
                self._wait()
                continue
            except ApiRefused as exc:
                raise self._refused(step, exc) from None
            self._note(answer)
            return answer

    def _fetch(self, step: str, available_from: str) -> bytes:
        """GET a step's message, polling while the server is in an earlier phase (and the deadline allows)."""
        while True:
            try:
                return self._call(self.api.secagg_fetch, self.round, self.attempt, step, self.encrypted)
            except ServerUnreachable as exc:
                if self._expired():
                    raise SessionEnded(f"{step}: server unreachable until the phase's deadline ({exc})") from None
            except ApiRefused as exc:
                data = exc.data
                early = (exc.status == 409 and exc.code == "wrong_phase" and not data.get("dropped")
                         and data.get("phase") in PHASES and PHASES.index(data["phase"]) < PHASES.index(available_from))
                if not early:
                    raise self._refused(step, exc) from None
                self._note(data)
                if self._expired():
                    raise SessionEnded(f"{step}: phase {self.phase} did not end by its deadline") from None
            self._wait()

    # ------------------------------------------------------------------ the five phases
    def advertise(self) -> None:
        """Phase 0: send the two fresh public keys."""
        self._send("advertise", self.client.advertise().to_bytes())

    def share_keys(self) -> None:
        """Phase 1: check the roster (every neighbour's signature) and send the encrypted shares."""
        roster = RosterMessage.from_bytes(self._fetch("roster", "share_keys"))
        try:
            msg = self.client.share_keys(roster)
        except SecAggError as exc:  # a roster that fails the checks: this client refuses to go on
            # the state machine's messages name client indices, never keys or secrets: safe to log in full
            log.warning("round %d: refusing the roster of secure attempt %d (%s): %s; leaving the attempt without "
                        "sending shares, the server counts this client as dropped", self.round, self.attempt, exc.code, exc)
            raise SessionEnded(f"refused the roster ({exc.code}: {exc})") from None
        with contextlib.suppress(SecAggError, ValueError):  # masks expanded while training runs; on a failure, at upload
            self.client.precomputed = MaskPrecompute(self.client.mask_material()).start()
        self._send("shares", msg.to_bytes())

    def open_bundle(self) -> None:
        """Phase 2, first half: fetch and open the shares addressed to this client (the server has them once every
        neighbour shared keys, normally long before training ends). The daemon does it while it trains, so the end
        of training is followed by the masking and the upload alone, not by one more round trip and ten decryptions."""
        if self._bundle_opened:
            return
        bundle = ShareBundle.from_bytes(self._fetch("shares", "masked_input"))
        try:
            self.client.open_bundle(bundle)
        except SecAggError as exc:  # a bundle that fails the checks: this client cannot mask with it
            raise SessionEnded(f"cannot send a masked input ({exc.code})") from None
        self._bundle_opened = True

    def masked_input(self, plain: PlainInput, metrics: dict[str, float]) -> dict[str, Any]:
        """Phase 2: (open the shares addressed to this client unless done already,) mask the input and upload it."""
        self.open_bundle()
        try:
            masked: MaskedInput = self.client.mask_opened(plain)
        except (SecAggError, ValueError) as exc:  # a value the field cannot hold (never wrapped), a degenerate key
            raise SessionEnded(f"cannot send a masked input ({getattr(exc, 'code', type(exc).__name__)})") from None
        body = pack_masked_upload(masked.to_bytes(), clear_metrics(metrics))
        key = f"sa{self.attempt}-{uuid.uuid4().hex}"
        # The phase's deadline known here may be the key-sharing phase's (a shares GET that succeeds carries no
        # deadline), which ends before the masked-input phase: while the server is unreachable, keep trying until
        # the later of it and the round's deadline (a bound of every phase); a 409 once it is back ends it sooner.
        until = max(self._deadline, self._round_deadline) + max(DEADLINE_GRACE, 2 * self.poll)
        wait = ServerWait(f"round {self.round}: masked input", self._sleep, log, base=self.poll,
                          cap=max(self.poll, MASKED_RETRY_CAP), clock=self._clock)
        answer: dict[str, Any] = {}
        while True:
            try:  # every retry sends the same bytes under the same key: the server counts the input once
                answer = self._call(self.api.upload_update, self.round, body, key, self.encrypted, self.attempt)
                break
            except ServerUnreachable as exc:
                if not wait.failed(exc, until=until):
                    raise SessionEnded(f"masked input: server unreachable until the phase's deadline ({exc})") from None
                if self._stop():
                    raise SessionEnded("stopped while the server was unreachable") from None
            except ApiRefused as exc:
                wait.succeeded()
                raise self._refused("masked input", exc) from None
        wait.succeeded()
        self._note(answer)
        self.masked_sent = True
        log.info("round %d: masked input accepted (%d bytes)%s", self.round, len(body),
                 " [retry of an accepted upload]" if answer.get("duplicate") else "")
        if self.client.rejected:
            log.warning("round %d: the shares of %d neighbour(s) did not authenticate and were not used",
                        self.round, len(self.client.rejected))
        return answer

    def consistency(self) -> None:
        """Phase 3: sign the set of clients whose masked inputs the server says it holds (one set per attempt)."""
        check = ConsistencyCheck.from_bytes(self._fetch("consistency", "consistency_check"))
        try:
            msg = self.client.consistency_check(check)
        except SecAggError as exc:
            log.warning("round %d: refusing to sign the survivor set of secure attempt %d (%s): %s", self.round,
                        self.attempt, exc.code, exc)
            raise SessionEnded(f"refused the consistency check ({exc.code})") from None
        self._send("consistency", msg.to_bytes())

    def unmask(self) -> None:
        """Phase 4: once t of this client's share holders signed the same set, reveal per neighbour the share the
        server is entitled to (never both)."""
        request = UnmaskRequest.from_bytes(self._fetch("unmask", "unmask"))
        try:
            msg = self.client.unmask(request)
        except SecAggError as exc:
            # a lying server (two survivor sets, missing signatures) or too many dropouts: nothing is revealed
            log.warning("round %d: refusing the unmask request of secure attempt %d (%s): %s", self.round, self.attempt,
                        exc.code, exc)
            raise SessionEnded(f"refused the unmask request ({exc.code})") from None
        self._send("unmask", msg.to_bytes())

    def outcome(self) -> dict[str, Any]:
        """Wait (until the unmask phase's deadline) for the attempt to close or abort."""
        while True:
            try:
                result = self._call(self.api.secagg_outcome, self.round, self.attempt)
                if result.get("state") != "open":
                    return result
            except ServerUnreachable:
                pass
            except ApiRefused as exc:
                return {"state": "unknown", "in_sum": False, "reason": f"{exc.status} {exc.code}"}
            if self._expired():
                return {"state": "open", "in_sum": False, "reason": "the attempt had not ended by the unmask deadline"}
            self._wait()

    def run(self, make_input: Callable[[], tuple[PlainInput, dict[str, float]]], *,
            before_unmask: Callable[[], None] | None = None) -> SessionResult:
        """All five phases. ``make_input()`` returns the plain input and its metrics; it is called once the
        keys are shared and the share bundle is opened (the daemon has been training since before the
        advertisement and waits for it there; ``before_unmask`` runs right after the masked input was accepted).
        A step the attempt cannot survive ends the session with its reason, never with a secret."""
        try:
            self.advertise()
            self.share_keys()
            self.open_bundle()  # while training runs
            plain, metrics = make_input()
            self.masked_input(plain, metrics)
            if self._stop():
                raise SessionEnded("stopped before the consistency check")
            self.consistency()
            if before_unmask is not None:
                before_unmask()
            if self._stop():
                raise SessionEnded("stopped before unmasking")
            self.unmask()
        except SessionEnded as exc:
            if not self.masked_sent:
                return SessionResult(self.round, self.attempt, False, "failed", False, str(exc))
            # the input is in the sum (its masks are removed through the neighbours): the outcome still matters
            log.warning("round %d: %s; the masked input already sent may still be in the sum", self.round, exc)
        out = self.outcome()
        return SessionResult(self.round, self.attempt, self.masked_sent, str(out.get("state")), bool(out.get("in_sum")),
                             out.get("reason"))


__all__ = ["IDENTITY_FILE", "SecureRoundSession", "SessionEnded", "SessionResult", "clear_metrics", "plain_input"]
