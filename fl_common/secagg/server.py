"""The server side of one SecAgg / SecAgg+ round, as a transport-free state machine.

The server relays keys and ciphertexts it cannot read, adds masked vectors it cannot read, and
at the end removes exactly the masks it is entitled to remove: the self masks of the clients
whose inputs are in the sum (U3), and the pairwise masks that survivors added for clients that
shared keys but sent no input (U2 \\ U3). What it learns is the sum over U3, nothing per client.

Sets, as in the paper: U1 advertised keys, U2 shared keys, U3 sent a masked input (these are
summed), U4 signed U3 in the consistency check (Bonawitz et al. 2017's round against an
active server: every survivor signs the set once, and the unmask request carries those
signatures, which each client checks before it reveals anything), U5 answered the unmask request.
Each phase ends when every client still expected has
answered or at its deadline, whichever comes first; there is no clock inside: every method
takes ``now`` (seconds, any monotone clock the driver likes) and the driver calls
:meth:`SecAggServer.advance` when it wants deadlines to be looked at.

A message that fails a check raises :class:`SecAggRejected` (its ``code`` is what an HTTP layer
returns, its ``dropped`` says whether the sender is out of the round): bad signature, unknown
or missing neighbour, malformed or duplicated share, wrong length, a message for the wrong
phase. A sender dropped before its masked input simply leaves the sum; one dropped after it
stays in the sum and is unmasked through its neighbours. If at any point some client's secret
could no longer be rebuilt from t shares, the round **aborts** (:class:`SecAggAborted`):
the running sum is discarded and nothing is released.

Deferred mode (``deferred=True``, the REST driver's): the two pieces of vector work leave the caller's lock.
A masked input is checked and recorded as before, but its values are only queued (a list append); the
caller folds the queue into the running sum with :meth:`SecAggServer.fold_inputs` after releasing its own
lock (the sum has a lock of its own, and the unmasking folds whatever is still queued first, so no accepted
input is ever missed). And once the unmask phase closes, the shares are checked and the secrets rebuilt as
before (cheap), but removing the masks (one PRG expansion per survivor and per dangling pair) and decoding
the sum wait in :attr:`SecAggServer.unmask_job` for :meth:`SecAggServer.run_unmask` (no lock needed), whose
answer :meth:`SecAggServer.finish_unmask` applies (caller's lock held). Meanwhile the phase stays ``unmask``
and nothing is expected: a late message is refused as in a closed phase. Results are the same bytes as in
the immediate mode; only the time the caller's lock is held changes.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from fl_common.crypto.keys import KeyAgreementError, KeyPair, x25519_shared_secret
from fl_common.secagg.auth import ED25519, HMAC_SHA256, Verifier
from fl_common.secagg.client import self_seed_commitment
from fl_common.secagg.encoding import DecodedSum, add_packed, check_packed_size, decode_input_sum, unpack
from fl_common.secagg.field import FieldOverflowError
from fl_common.secagg.graph import build_graph
from fl_common.secagg.masks import unmask_sum
from fl_common.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    MaskedInput,
    RosterEntry,
    RosterMessage,
    SecAggAborted,
    SecAggParams,
    SecAggRejected,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_common.secagg.prg import word_dtype
from fl_common.secagg.shamir import Share, ShareError, reconstruct

__all__ = ["Phase", "PHASES", "DEFAULT_TIMEOUTS", "DropRecord", "PreparedInput", "SecAggResult", "SecAggServer",
           "UnmaskJob", "prepare_masked_input", "unpack_decoded_input"]


class Phase(str, Enum):
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


PHASES = (Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASK)
#: seconds each phase waits for the clients still expected (the masked input includes local training)
DEFAULT_TIMEOUTS = {Phase.ADVERTISE_KEYS: 60.0, Phase.SHARE_KEYS: 60.0, Phase.MASKED_INPUT: 600.0,
                    Phase.CONSISTENCY_CHECK: 60.0, Phase.UNMASK: 60.0}
#: subsets of shares tried when the first t do not rebuild a secret that matches its commitment
MAX_RECONSTRUCTION_TRIES = 256


@dataclass(frozen=True)
class DropRecord:
    """Who dropped, in which phase, why, and when (the driver's ``now``)."""

    index: int
    phase: str
    reason: str
    at: float


@dataclass
class SecAggResult:
    """What the round releases: the decoded sums over ``summed`` (= U3), and who took part."""

    sums: DecodedSum
    summed: tuple[int, ...]
    responders: tuple[int, ...]
    dropped: dict[int, DropRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedInput:
    """A masked input's payload checked against its digest and unpacked, away from any lock
    (:func:`prepare_masked_input`); ``problem`` is the (code, message) a check failed with, reported by
    :meth:`SecAggServer.receive_masked_input` at the point it would have found it itself."""

    digest_ok: bool
    values: np.ndarray | None
    problem: tuple[str, str] | None = None
    #: instead of ``values``: the size-checked payload of a whole-byte width, added into the sum where it lies
    #: (``encoding.add_packed``: no unpacked copy of it is ever made)
    packed: bytes | memoryview | None = None

    @property
    def ready(self) -> bool:
        """Whether it carries something to add (or the problem that refuses it)."""
        return self.values is not None or self.packed is not None or self.problem is not None

    def add_to(self, acc: np.ndarray, modulus_bits: int) -> None:
        """``acc += y`` in the accumulator's word (wrapping mod 2^32 or 2^64; reduced mod 2^b at the end)."""
        if self.packed is not None:
            add_packed(acc, self.packed, modulus_bits)
        else:
            assert self.values is not None
            np.add(acc, self.values, out=acc, casting="unsafe")


def prepare_masked_input(params: SecAggParams, msg: MaskedInput) -> PreparedInput:
    """The pure part of receiving a masked input: its digest and its unpacked ring elements (no server state)."""
    if hashlib.sha256(msg.payload).digest() != msg.payload_sha256:
        return PreparedInput(False, None)
    return unpack_decoded_input(params, msg)


def unpack_decoded_input(params: SecAggParams, msg: MaskedInput) -> PreparedInput:
    """:func:`prepare_masked_input` for a message decoded from its bytes (:meth:`MaskedInput.from_bytes`), whose
    ``payload_sha256`` was computed from that very payload: the digest comparison cannot fail, so only the unpacking
    is done (hashing 5 MB again cost ~8 ms per cnn input). Never for a message whose digest came from elsewhere."""
    b, n = params.modulus_bits, params.vector_length
    try:
        if b % 8 == 0:  # no bit of a whole-byte width can stray past the last value: the size is the whole check
            check_packed_size(msg.payload, n, b)
            return PreparedInput(True, None, packed=msg.payload)
        return PreparedInput(True, unpack(msg.payload, n, b, words=True))
    except ValueError as exc:
        return PreparedInput(True, None, ("malformed", f"masked input of client {msg.sender}: {exc}"))


@dataclass(frozen=True)
class UnmaskJob:
    """What removing the masks needs once the unmask phase closed (deferred mode): the secrets rebuilt from the
    shares; the running sum itself stays with the server (folded and read under its own lock)."""

    seeds: dict[int, bytes]
    dangling: tuple[tuple[int, int, bytes], ...]
    survivors: int
    u4: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskOutcome:
    """:meth:`SecAggServer.run_unmask`'s answer: the decoded sums, or why they did not decode."""

    job: UnmaskJob
    sums: DecodedSum | None
    error: str | None = None


class SecAggServer:
    def __init__(self, params: SecAggParams, verifiers: Mapping[int, Verifier], *, now: float,
                 timeouts: Mapping[Phase | str, float] | None = None, deferred: bool = False) -> None:
        """``verifiers``: index -> the key each client registered (a client without one can never
        pass the signature check, so it is dropped at advertisement). ``deferred``: queue masked inputs and
        leave the unmasking to :meth:`run_unmask` (see the module docstring)."""
        params.validate()
        self.params = params
        self.deferred = deferred
        #: guards the running sum and the queue of inputs not folded into it yet (deferred mode)
        self._sum_lock = threading.Lock()
        self._queued: list[PreparedInput] = []
        #: deferred mode: the unmasking that waits for run_unmask (None before the unmask phase closed)
        self.unmask_job: UnmaskJob | None = None
        self._digest = params.digest()
        self._verifiers: dict[int, Verifier] = dict(verifiers)
        for i, v in self._verifiers.items():
            if v.scheme != params.auth:
                raise ValueError(f"client {i}'s verifier is {v.scheme}, the round signs with {params.auth}")
        self._timeouts: dict[Phase, float] = dict(DEFAULT_TIMEOUTS)
        for phase, seconds in (timeouts or {}).items():
            self._timeouts[Phase(phase)] = float(seconds)
        self.phase = Phase.ADVERTISE_KEYS
        self.started = float(now)
        self.deadline = float(now) + self._timeouts[Phase.ADVERTISE_KEYS]
        self.drops: dict[int, DropRecord] = {}
        #: integrity events that are not drops (a recipient rejected a ciphertext, an inconsistent share)
        self.events: list[dict[str, object]] = []
        self.bytes_in: dict[str, dict[int, int]] = {p.value: {} for p in PHASES}
        self.bytes_out: dict[str, dict[int, int]] = {p.value: {} for p in PHASES}
        self.abort_reason: str | None = None
        self.phase_closed_at: dict[str, float] = {}
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._share_msgs: dict[int, ShareKeys] = {}
        self._masked: dict[int, bytes] = {}  # sender -> sha256 of its payload (idempotent retries)
        self._signatures: dict[int, bytes] = {}  # consistency check: signer -> its signature on (U3, U2 minus U3)
        self._responses: dict[int, UnmaskResponse] = {}
        self._u1: tuple[int, ...] = ()
        self._u2: tuple[int, ...] = ()
        self._u3: tuple[int, ...] = ()
        self._u4: tuple[int, ...] = ()
        self._graph: dict[int, frozenset[int]] = {}
        self._roster: RosterMessage | None = None
        self._inbox: dict[int, list[tuple[int, bytes]]] = {}
        self._sum: np.ndarray | None = None
        self._result: SecAggResult | None = None

    # ------------------------------------------------------------------ views
    @property
    def u1(self) -> tuple[int, ...]:
        return self._u1

    @property
    def u2(self) -> tuple[int, ...]:
        return self._u2

    @property
    def u3(self) -> tuple[int, ...]:
        return self._u3

    @property
    def u4(self) -> tuple[int, ...]:
        """The survivors that signed U3 in the consistency check (only they are asked to unmask)."""
        return self._u4

    @property
    def num_inputs(self) -> int:
        """Masked inputs accepted so far (they are in the running sum)."""
        return len(self._masked)

    @property
    def graph(self) -> dict[int, frozenset[int]]:
        return dict(self._graph)

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    def expected(self) -> set[int]:
        """Clients the current phase still waits for."""
        live = self._live()
        received: dict[Phase, Mapping[int, object]] = {Phase.ADVERTISE_KEYS: self._adverts, Phase.SHARE_KEYS: self._share_msgs,
                                                       Phase.MASKED_INPUT: self._masked,
                                                       Phase.CONSISTENCY_CHECK: self._signatures, Phase.UNMASK: self._responses}
        got = received.get(self.phase, {})
        return {i for i in live if i not in got}

    def _live(self) -> set[int]:
        base = {Phase.ADVERTISE_KEYS: set(self.params.indices), Phase.SHARE_KEYS: set(self._u1),
                Phase.MASKED_INPUT: set(self._u2), Phase.CONSISTENCY_CHECK: set(self._u3),
                Phase.UNMASK: set(self._u4)}.get(self.phase, set())
        return {i for i in base if i not in self.drops}

    def result(self) -> SecAggResult:
        if self.phase == Phase.ABORTED:
            raise SecAggAborted(f"secure aggregation of round {self.params.round} aborted: {self.abort_reason}")
        if self._result is None:
            raise RuntimeError(f"secure aggregation of round {self.params.round} is in phase {self.phase.value}, not done")
        return self._result

    def bytes_per_client(self) -> dict[str, dict[str, float]]:
        """Mean bytes per participating client, per phase, up (client -> server) and down."""
        out = {}
        for p in PHASES:
            up, down = self.bytes_in[p.value], self.bytes_out[p.value]
            out[p.value] = {"up": sum(up.values()) / len(up) if up else 0.0,
                            "down": sum(down.values()) / len(down) if down else 0.0}
        return out

    # ------------------------------------------------------------------ bookkeeping
    def _drop(self, index: int, reason: str, now: float) -> None:
        if index not in self.drops:
            self.drops[index] = DropRecord(index, self.phase.value, reason, float(now))

    def _reject(self, index: int, code: str, message: str, now: float, *, drop: bool = True) -> SecAggRejected:
        """Record the drop (if any) and build the exception; a phase left with nobody to wait for closes."""
        dropped_now = drop and index in self.params.indices and not self.finished
        if dropped_now:
            self._drop(index, code, now)
        error = SecAggRejected(message, code, dropped=dropped_now or index in self.drops)
        if dropped_now:
            self.advance(now)
        return error

    def _abort(self, reason: str, now: float) -> None:
        self.phase_closed_at[self.phase.value] = float(now)
        self.phase = Phase.ABORTED
        self.abort_reason = reason
        with self._sum_lock:
            self._sum = None  # nothing of the round is released
            self._queued.clear()
        self.unmask_job = None
        self._inbox.clear()

    def _enter(self, phase: Phase, now: float) -> None:
        self.phase_closed_at[self.phase.value] = float(now)
        self.phase = phase
        if phase in self._timeouts:
            self.deadline = float(now) + self._timeouts[phase]

    def _gate(self, msg_phase: Phase, sender: int, now: float, duplicate_of: Callable[[], bool]) -> bool:
        """Common checks; returns True when the message is an identical retry (nothing to do)."""
        self.advance(now)
        if sender not in self.params.indices:
            raise SecAggRejected(f"no client {sender} in round {self.params.round}", "unknown_client", dropped=False)
        if duplicate_of():
            return True
        if self.phase != msg_phase:
            raise self._reject(sender, "wrong_phase", f"round {self.params.round} is in phase {self.phase.value}, not "
                               f"{msg_phase.value}", now, drop=self.phase not in (Phase.DONE, Phase.ABORTED)
                               and sender in self._live())
        if sender not in self._live():
            raise SecAggRejected(f"client {sender} is not (or no longer) in phase {msg_phase.value} of round "
                                 f"{self.params.round}", "not_in_phase", dropped=True)
        return False

    def _verify(self, sender: int, data: bytes, signature: bytes, now: float) -> None:
        verifier = self._verifiers.get(sender)
        if verifier is None or not verifier.verify(data, signature):
            raise self._reject(sender, "bad_signature", f"message of client {sender} does not carry its signature", now)

    def drop(self, index: int, reason: str, now: float) -> None:
        """Treat ``index`` as dropped from now on (a driver learned it is gone, e.g. it registered a new
        signing key mid-round): the phase stops waiting for it, and its secrets are handled exactly as
        for a client that went silent. Once the unmasking has started, nobody is waited for: nothing changes."""
        if index in self.params.indices and not self.finished and self.unmask_job is None:
            self._drop(index, reason, now)
            self.advance(now)

    # ------------------------------------------------------------------ deadlines
    def advance(self, now: float) -> Phase:
        """Close the current phase if every expected client answered or its deadline has passed."""
        if not self.finished and self.unmask_job is None and (now >= self.deadline or not self.expected()):
            self.close_phase(now)
        return self.phase

    def close_phase(self, now: float) -> Phase:
        """Close the current phase now: clients that did not answer are dropped ("no_response")."""
        if self.finished or self.unmask_job is not None:
            return self.phase
        for i in sorted(self.expected()):
            self._drop(i, "no_response", now)
        {Phase.ADVERTISE_KEYS: self._close_advertise, Phase.SHARE_KEYS: self._close_share_keys,
         Phase.MASKED_INPUT: self._close_masked_input, Phase.CONSISTENCY_CHECK: self._close_consistency_check,
         Phase.UNMASK: self._close_unmask}[self.phase](now)
        return self.phase

    # ------------------------------------------------------------------ phase 0
    def params_for(self, index: int) -> SecAggParams:
        """The round's public parameters as client ``index`` downloads them (counted as phase-0 traffic)."""
        if index not in self.params.indices:
            raise SecAggRejected(f"no client {index} in round {self.params.round}", "unknown_client", dropped=False)
        self.bytes_out[Phase.ADVERTISE_KEYS.value].setdefault(index, len(self.params.to_bytes()))
        return self.params

    def receive_advertise(self, msg: AdvertiseKeys, now: float) -> None:
        if self._gate(Phase.ADVERTISE_KEYS, msg.sender, now, lambda: self._adverts.get(msg.sender) == msg):
            return
        if msg.sender in self._adverts:
            raise self._reject(msg.sender, "conflicting_duplicate", f"client {msg.sender} advertised two different key sets", now)
        self._verify(msg.sender, AdvertiseKeys.signing_bytes(self._digest, msg.sender, msg.c_pk, msg.s_pk), msg.signature, now)
        if msg.c_pk == msg.s_pk or any({msg.c_pk, msg.s_pk} & {a.c_pk, a.s_pk} for a in self._adverts.values()):
            raise self._reject(msg.sender, "duplicate_key", f"client {msg.sender} advertised a key already in use", now)
        self._adverts[msg.sender] = msg
        self.bytes_in[Phase.ADVERTISE_KEYS.value][msg.sender] = len(msg.to_bytes())
        self.advance(now)

    def _close_advertise(self, now: float) -> None:
        u1 = tuple(sorted(i for i in self._adverts if i not in self.drops))
        if len(u1) < self.params.threshold:
            self._abort(f"only {len(u1)} clients advertised keys, fewer than the threshold t={self.params.threshold}", now)
            return
        entries = []
        for i in u1:
            a = self._adverts[i]
            vk = self._verifiers[i].key if self.params.auth == ED25519 else b""
            entries.append(RosterEntry(i, a.c_pk, a.s_pk, a.signature, vk))
        self._roster = RosterMessage(tuple(entries))
        self._u1 = u1
        self._graph = build_graph(u1, self.params.degree, self._roster.graph_seed(self._digest))
        self._enter(Phase.SHARE_KEYS, now)

    def roster_for(self, index: int) -> RosterMessage:
        """The roster for ``index`` (HMAC mode: with the server's tag under that client's key)."""
        if self._roster is None or index not in self._u1:
            raise SecAggRejected(f"no roster for client {index}", "not_in_phase", dropped=index in self.drops)
        roster = self._roster
        if self.params.auth == HMAC_SHA256:
            roster = RosterMessage(roster.entries, self._verifiers[index].tag(roster.digest(self._digest)))
        self.bytes_out[Phase.SHARE_KEYS.value].setdefault(index, len(roster.to_bytes()))
        return roster

    # ------------------------------------------------------------------ phase 1
    def receive_share_keys(self, msg: ShareKeys, now: float) -> None:
        if self._gate(Phase.SHARE_KEYS, msg.sender, now, lambda: self._share_msgs.get(msg.sender) == msg):
            return
        u = msg.sender
        if u in self._share_msgs:
            raise self._reject(u, "conflicting_duplicate", f"client {u} sent two different sets of shares", now)
        self._verify(u, ShareKeys.signing_bytes(self._digest, u, msg.ciphertexts, msg.commitment), msg.signature, now)
        recipients = [r for r, _ in msg.ciphertexts]
        if len(set(recipients)) != len(recipients):
            raise self._reject(u, "duplicate_share", f"client {u} sent two shares for the same neighbour", now)
        neighbours = self._graph[u]
        unknown = set(recipients) - neighbours
        if unknown:
            raise self._reject(u, "unknown_neighbour", f"client {u} sent shares to clients {sorted(unknown)} that are not "
                               f"its neighbours", now)
        missing = neighbours - set(recipients)
        if missing:
            raise self._reject(u, "missing_share", f"client {u} sent no share to neighbours {sorted(missing)}", now)
        self._share_msgs[u] = msg
        self.bytes_in[Phase.SHARE_KEYS.value][u] = len(msg.to_bytes())
        self.advance(now)

    def _close_share_keys(self, now: float) -> None:
        t = self.params.threshold
        u2 = {i for i in self._share_msgs if i not in self.drops}
        if len(u2) < t:
            self._abort(f"only {len(u2)} clients shared their keys, fewer than the threshold t={t}", now)
            return
        changed = True
        while changed:  # a client whose shares reach fewer than t live holders could never be unmasked
            changed = False
            for u in sorted(u2):
                if len(self._graph[u] & u2) + 1 < t:
                    u2.discard(u)
                    self._drop(u, "too_few_neighbours", now)
                    changed = True
        if len(u2) < t:
            self._abort(f"only {len(u2)} clients shared their keys with at least t={t} live holders each", now)
            return
        self._u2 = tuple(sorted(u2))
        self._inbox = {w: [] for w in self._u2}
        for v in self._u2:
            for recipient, ct in self._share_msgs[v].ciphertexts:
                if recipient in u2:
                    self._inbox[recipient].append((v, ct))
        # the running sum in the masking's word (uint32 up to 32 bits): it wraps mod 2^32 or 2^64, which 2^b divides
        self._sum = np.zeros(self.params.vector_length, dtype=word_dtype(self.params.modulus_bits))
        self._enter(Phase.MASKED_INPUT, now)

    def bundle_for(self, index: int) -> ShareBundle:
        if self.phase != Phase.MASKED_INPUT or index not in self._inbox:
            raise SecAggRejected(f"no share bundle for client {index} in phase {self.phase.value}", "not_in_phase",
                                 dropped=index in self.drops)
        bundle = ShareBundle(index, self._u2, tuple(sorted(self._inbox[index])))
        self.bytes_out[Phase.MASKED_INPUT.value].setdefault(index, len(bundle.to_bytes()))
        return bundle

    # ------------------------------------------------------------------ phase 2
    def receive_masked_input(self, msg: MaskedInput, now: float, prepared: PreparedInput | None = None) -> None:
        """``prepared``: the payload already checked and unpacked (:func:`prepare_masked_input`, done by the caller
        outside its lock); without it that happens here. In deferred mode the values are queued, not summed."""
        if self._gate(Phase.MASKED_INPUT, msg.sender, now, lambda: self._masked.get(msg.sender) == msg.payload_sha256):
            return
        u = msg.sender
        if u in self._masked:
            raise SecAggRejected(f"client {u} already sent a different masked input (the first one counts)",
                                 "conflicting_duplicate", dropped=False)
        if prepared is None:
            prepared = PreparedInput(hashlib.sha256(msg.payload).digest() == msg.payload_sha256, None)
        if not prepared.digest_ok:
            raise self._reject(u, "malformed", f"masked input of client {u}: payload digest mismatch", now)
        self._verify(u, MaskedInput.signing_bytes(self._digest, u, msg.payload_sha256, msg.rejected), msg.signature, now)
        if not set(msg.rejected) <= self._graph[u] & set(self._u2):
            raise self._reject(u, "unknown_neighbour", f"client {u} reports rejecting shares of clients that sent it none", now)
        if not prepared.ready:
            prepared = prepare_masked_input(self.params, msg)
        if prepared.problem is not None:
            raise self._reject(u, prepared.problem[0], prepared.problem[1], now)
        assert self._sum is not None
        if self.deferred:
            self._queued.append(prepared)  # folded by fold_inputs outside the caller's lock
        else:
            prepared.add_to(self._sum, self.params.modulus_bits)  # the word wraps mod 2^32 or 2^64; 2^b divides it
        self._masked[u] = msg.payload_sha256
        for v in msg.rejected:
            self.events.append({"event": "share_rejected_by_recipient", "sender": v, "recipient": u, "at": float(now)})
        self.bytes_in[Phase.MASKED_INPUT.value][u] = msg.wire_size()
        self.advance(now)

    def _viable(self, alive: set[int], now: float, when: str) -> bool:
        """Every secret still needed must have t potential holders among ``alive``."""
        t = self.params.threshold
        summed = set(self._masked)
        alive = {i for i in alive if i not in self.drops}
        for u in self._u2:
            holders = self._graph[u] & alive
            if u in summed and u in alive:
                holders = holders | {u}
            if len(holders) < t:
                kind = "self-mask seed" if u in summed else "mask key"
                self._abort(f"{when}: client {u}'s {kind} has {len(holders)} live share holders, fewer than the "
                            f"threshold t={t}", now)
                return False
        return True

    def _close_masked_input(self, now: float) -> None:
        u3 = set(self._masked)
        t = self.params.threshold
        if len(u3) < t:
            self._abort(f"only {len(u3)} clients sent masked inputs, fewer than the threshold t={t}", now)
            return
        if not self._viable(u3, now, "after the masked-input phase"):
            return
        self._u3 = tuple(sorted(u3))
        self._enter(Phase.CONSISTENCY_CHECK, now)

    def _survivor_set(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self._u3, tuple(i for i in self._u2 if i not in set(self._u3))

    def consistency_check_for(self, index: int) -> ConsistencyCheck:
        """U3 and U2 \\ U3, the same for every survivor (an honest server never shows two sets)."""
        if self.phase != Phase.CONSISTENCY_CHECK or index not in self._u3:
            raise SecAggRejected(f"no consistency check for client {index} in phase {self.phase.value}", "not_in_phase",
                                 dropped=index in self.drops)
        check = ConsistencyCheck(*self._survivor_set())
        self.bytes_out[Phase.CONSISTENCY_CHECK.value].setdefault(index, len(check.to_bytes()))
        return check

    # ------------------------------------------------------------------ phase 3
    def receive_consistency(self, msg: ConsistencySignature, now: float) -> None:
        if self._gate(Phase.CONSISTENCY_CHECK, msg.sender, now, lambda: self._signatures.get(msg.sender) == msg.signature):
            return
        u = msg.sender
        if u in self._signatures:
            raise self._reject(u, "conflicting_duplicate", f"client {u} sent two different signatures on the set", now)
        survivors, dropped = self._survivor_set()
        self._verify(u, ConsistencyCheck.signing_bytes(self._digest, self.params.session, self.params.round, u, survivors,
                                                       dropped), msg.signature, now)
        self._signatures[u] = msg.signature
        self.bytes_in[Phase.CONSISTENCY_CHECK.value][u] = len(msg.to_bytes())
        self.advance(now)

    def _close_consistency_check(self, now: float) -> None:
        signers = {i for i in self._signatures if i not in self.drops}
        t = self.params.threshold
        if len(signers) < t:
            self._abort(f"only {len(signers)} survivors signed the consistency check, fewer than the threshold t={t}", now)
            return
        if not self._viable(signers, now, "after the consistency check"):
            return
        self._u4 = tuple(sorted(signers))
        self._enter(Phase.UNMASK, now)

    def unmask_request_for(self, index: int) -> UnmaskRequest:
        if self.phase != Phase.UNMASK or index not in self._u4:
            raise SecAggRejected(f"no unmask request for client {index} in phase {self.phase.value}", "not_in_phase",
                                 dropped=index in self.drops)
        sigs = tuple((i, self._signatures[i]) for i in self._u4)
        request = UnmaskRequest(*self._survivor_set(), sigs)
        self.bytes_out[Phase.UNMASK.value].setdefault(index, len(request.to_bytes()))
        return request

    # ------------------------------------------------------------------ phase 4
    def receive_unmask(self, msg: UnmaskResponse, now: float) -> None:
        if self._gate(Phase.UNMASK, msg.sender, now, lambda: self._responses.get(msg.sender) == msg):
            return
        u = msg.sender
        if u in self._responses:
            del self._responses[u]
            raise self._reject(u, "conflicting_duplicate", f"client {u} sent two different unmask responses", now)
        self._verify(u, UnmaskResponse.signing_bytes(self._digest, u, msg.self_shares, msg.key_shares), msg.signature, now)
        survivors = set(self._u3)
        dropped = set(self._u2) - survivors
        mine = self._graph[u] | {u}
        self_owners = [v for v, _ in msg.self_shares]
        key_owners = [v for v, _ in msg.key_shares]
        if len(set(self_owners)) != len(self_owners) or len(set(key_owners)) != len(key_owners):
            raise self._reject(u, "duplicate_share", f"client {u} revealed two shares of one client", now)
        if not set(self_owners) <= survivors & mine or not set(key_owners) <= dropped & (mine - {u}):
            raise self._reject(u, "unknown_neighbour", f"client {u} revealed shares of clients it does not hold, or "
                               f"of the wrong kind", now)
        try:
            for _, raw in (*msg.self_shares, *msg.key_shares):
                if Share.from_bytes(raw).x != u:
                    raise ShareError("share x is not the sender's index")
        except ShareError as exc:
            raise self._reject(u, "malformed", f"unmask response of client {u}: {exc}", now) from None
        self._responses[u] = msg
        self.bytes_in[Phase.UNMASK.value][u] = len(msg.to_bytes())
        self.advance(now)

    def _rebuild(self, owner: int, kind: str, shares: list[tuple[int, Share]], check: Callable[[bytes], bool],
                 now: float) -> bytes | None:
        """Lagrange from the first t shares; if that does not match the public check (the commitment to
        b_v, or v's advertised s_pk), try other t-subsets and record the holders whose shares are off."""
        t = self.params.threshold
        pts = [s for _, s in sorted(shares, key=lambda p: p[0])]
        try:
            secret = reconstruct(pts[:t], t)
            if check(secret):
                return secret
        except ShareError:
            pass
        for combo in itertools.islice(itertools.combinations(pts, t), MAX_RECONSTRUCTION_TRIES):
            try:
                secret = reconstruct(list(combo), t)
            except ShareError:
                continue
            if check(secret):
                for s in pts:
                    if s not in combo:
                        try:
                            reconstruct([*combo, s], t)
                        except ShareError:
                            self.events.append({"event": "inconsistent_share", "owner": owner, "kind": kind,
                                                "holder": s.x, "at": float(now)})
                return secret
        return None

    def _close_unmask(self, now: float) -> None:
        u4 = set(self._responses)
        if not self._viable(u4, now, "after the unmask phase"):
            return
        t = self.params.threshold
        survivors = set(self._u3)
        self_shares: dict[int, list[tuple[int, Share]]] = {v: [] for v in self._u3}
        key_shares: dict[int, list[tuple[int, Share]]] = {v: [] for v in self._u2 if v not in survivors}
        for u, msg in self._responses.items():
            for v, raw in msg.self_shares:
                self_shares[v].append((u, Share.from_bytes(raw)))
            for v, raw in msg.key_shares:
                key_shares[v].append((u, Share.from_bytes(raw)))
        seeds: dict[int, bytes] = {}
        for v, shares in self_shares.items():
            commitment = self._share_msgs[v].commitment
            if len(shares) < t:
                self._abort(f"only {len(shares)} shares of client {v}'s self-mask seed arrived, fewer than t={t}", now)
                return

            def committed(seed: bytes, v: int = v, c: bytes = commitment) -> bool:
                return self_seed_commitment(self._digest, v, seed) == c

            seed = self._rebuild(v, "self_seed", shares, committed, now)
            if seed is None:
                self._abort(f"the shares of client {v}'s self-mask seed do not rebuild its committed seed "
                            f"(tampered shares)", now)
                return
            seeds[v] = seed
        dangling: list[tuple[int, int, bytes]] = []
        for v, shares in key_shares.items():
            s_pk = self._adverts[v].s_pk
            if len(shares) < t:
                self._abort(f"only {len(shares)} shares of dropped client {v}'s mask key arrived, fewer than t={t}", now)
                return

            def matches(raw: bytes, s_pk: bytes = s_pk) -> bool:
                try:
                    return KeyPair.from_private_bytes(raw).public_bytes == s_pk
                except (KeyAgreementError, ValueError):
                    return False

            key_raw = self._rebuild(v, "mask_key", shares, matches, now)
            if key_raw is None:
                self._abort(f"the shares of dropped client {v}'s mask key do not rebuild its advertised key "
                            f"(tampered shares)", now)
                return
            key = KeyPair.from_private_bytes(key_raw)
            for w in sorted(self._graph[v] & survivors):
                try:
                    dangling.append((w, v, x25519_shared_secret(key.private_key, self._adverts[w].s_pk)))
                except KeyAgreementError:
                    self._abort(f"client {w}'s mask key is degenerate", now)
                    return
        job = UnmaskJob(seeds, tuple(dangling), len(self._u3), tuple(sorted(u4)))
        if self.deferred:
            self.unmask_job = job  # run_unmask, outside the caller's lock; finish_unmask applies its outcome
            return
        self.finish_unmask(self.run_unmask(job), now)

    # ------------------------------------------------------------------ the vector work (deferred mode: no caller's lock)
    def fold_inputs(self) -> None:
        """Add the queued masked inputs to the running sum (thread safe; a no-op when nothing is queued)."""
        with self._sum_lock:
            while self._queued:
                y = self._queued.pop()
                if self._sum is not None:  # the word wraps mod 2^32 or 2^64; 2^b divides it, reduced once at the end
                    y.add_to(self._sum, self.params.modulus_bits)

    def run_unmask(self, job: UnmaskJob) -> UnmaskOutcome:
        """Remove the masks from the sum and decode it: the expensive part of the unmasking, which reads only the
        running sum (under its own lock: the masked-input phase is long over, nothing can be queued any more)."""
        self.fold_inputs()
        with self._sum_lock:
            masked_sum = self._sum
            if masked_sum is None:
                return UnmaskOutcome(job, None, "the running sum was discarded")
            self._sum = None  # consumed: the masks come off where it lies (no copy on the round's critical path)
            total = unmask_sum(masked_sum, self.params.modulus_bits, survivor_self_seeds=job.seeds,
                               dangling_pairs=job.dangling, context=self._digest, consume=True)
        try:
            return UnmaskOutcome(job, decode_input_sum(self.params, total, job.survivors))
        except FieldOverflowError as exc:
            return UnmaskOutcome(job, None, f"the unmasked sum does not decode ({exc})")

    def finish_unmask(self, outcome: UnmaskOutcome, now: float) -> Phase:
        """Apply :meth:`run_unmask`'s outcome: the round is done with its sums, or aborted. An outcome for a job
        that is no longer the pending one (the round aborted meanwhile) changes nothing."""
        if self.finished or (self.deferred and self.unmask_job is not outcome.job):
            return self.phase
        self.unmask_job = None
        if outcome.sums is None:
            self._abort(outcome.error or "the unmasking failed", now)
            return self.phase
        with self._sum_lock:
            self._sum = None
        self.phase_closed_at[self.phase.value] = float(now)
        self.phase = Phase.DONE
        self._result = SecAggResult(outcome.sums, self._u3, outcome.job.u4, dict(self.drops))
        return self.phase
