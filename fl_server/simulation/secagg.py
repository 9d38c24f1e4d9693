"""The simulation's secure aggregation: every simulated client runs the real SecAgg client state
machine, the coordinator runs the real server state machine, and the messages between them go
through their byte encodings, so research runs use the same code (and see the same bytes) as a
deployment would.

Dropouts are simulated per phase (``secagg_dropout_rate``, ``secagg_dropout_phase``): in each
phase it applies to, every client still in the round goes silent with that probability, drawn
from (seed, round, attempt, client, phase) so runs are reproducible. A client that drops before
its masked input does not train (it would not have sent anything); one that drops at unmasking
has its input in the sum and its masks removed through its neighbours.

A round the protocol aborts (fewer than t holders somewhere) is not applied: the coordinator
forgets it and the same round is planned again (new keys, new dropout draws). Nothing of an
aborted attempt reaches the model, SCAFFOLD's client variates, or the privacy ledger of
client-level DP (sample-level DP charges a client when its masked input arrives, which
over-counts an aborted attempt: conservative).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from fl_common.config import FLConfig
from fl_common.protocol import ClientUpdate, derive_seed
from fl_common.secagg import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    MaskedInput,
    Phase,
    RosterMessage,
    SecAggClient,
    SecAggError,
    ShareBundle,
    ShareKeys,
    SigningIdentity,
    UnmaskRequest,
    UnmaskResponse,
    Verifier,
)
from fl_common.secagg.encoding import IN_CLEAR
from fl_common.secagg.field import FieldOverflowError
from fl_common.secagg.precompute import MaskingJob
from fl_common.secagg.server import PHASES, unpack_decoded_input
from fl_server.coordinator import Coordinator, RoundPlan
from fl_server.secagg.aggregator import MaskedUpdate, SecAggRoundStats
from fl_server.selection import ClientInfo
from fl_server.simulation.executor import LateMaskingJobs, MaskingJobs, WorkerMasked, plain_input_for
from fl_server.store import RoundRecord
from fl_server.strategies import UpdateRejected


class TrainClients(Protocol):
    """``train(plan, cids, masking)``: the updates of the clients ``cids`` of ``plan``, trained on the round's
    global model; the clients in ``masking`` may come back masked by the worker that trained them (WorkerMasked)."""

    def __call__(self, plan: RoundPlan, cids: list[Any], masking: MaskingJobs | None = None) -> Iterable[ClientUpdate]: ...

log = logging.getLogger("fl_server.secagg")

#: consecutive aborted attempts of one round before the run stops with the reasons
MAX_ATTEMPTS = 20
#: the driver features the simulation declares for secure aggregation
SIMULATION_FEATURES = ("secure_aggregation", "secagg_dropouts")


class SecAggSimulation:
    """Plays the clients' side of secure aggregation for a :class:`~fl_server.simulation.Simulation`
    (which trains the clients; this class masks, sends and unmasks their updates)."""

    def __init__(self, cfg: FLConfig) -> None:
        self.cfg = cfg
        self._identities: dict[Any, SigningIdentity] = {}
        self.rounds: list[SecAggRoundStats] = []
        self.aborted: list[SecAggRoundStats] = []
        # SecAgg client work done in this process (keys, shares, bundles, signing; encoding and masking too when the
        # training side masks nothing itself, e.g. under an attack): what the client workers spend masking is not in it
        self.client_cpu_seconds = 0.0
        self.server_cpu_seconds = 0.0  # SecAgg server work only (checks, summing, reconstruction, unmasking)
        self.client_rounds = 0

    # ------------------------------------------------------------------ keys
    def identity(self, cid: Any) -> SigningIdentity:
        """Each simulated client's long-term Ed25519 signing key (made on first use, kept for the run)."""
        if cid not in self._identities:
            self._identities[cid] = SigningIdentity.generate_ed25519()
        return self._identities[cid]

    def verifier(self, cid: Any) -> Verifier:
        """What each client 'registered' with the server (passed to the coordinator as secagg_verifiers)."""
        return self.identity(cid).verifier()

    # ------------------------------------------------------------------ dropouts
    def _drops_before_training(self) -> bool:
        """Whether simulated dropouts can fall in a phase before the masked input (then a client may not train)."""
        return self.cfg.secagg_dropout_rate > 0 and self.cfg.secagg_dropout_phase != Phase.UNMASK.value

    def _silent(self, round_number: int, attempt: int, phase: Phase, cids: list[Any]) -> set[Any]:
        cfg = self.cfg
        if cfg.secagg_dropout_rate <= 0 or cfg.secagg_dropout_phase not in ("all", phase.value):
            return set()
        out = set()
        for cid in cids:
            u = np.random.default_rng(derive_seed(cfg.seed, round_number, attempt, cid, "secagg-dropout", phase.value)).random()
            if u < cfg.secagg_dropout_rate:
                out.add(cid)
        return out

    # ------------------------------------------------------------------ one round
    def run_round(self, coord: Coordinator, infos: Mapping[Any, ClientInfo],
                  train: TrainClients) -> tuple[RoundRecord, RoundPlan, set[Any]]:
        """Plan, run and close one round under secure aggregation; the round is planned again (fresh keys
        and dropout draws) while the protocol aborts, at most MAX_ATTEMPTS times.

        ``train(plan, cids)`` is called once per attempt that reaches the masked-input phase (the
        simulation trains, attacks and counts bytes there). Returns the closed round's record, the
        plan of the attempt that closed it and the clients whose inputs are in the sum (only their
        SCAFFOLD variates may move on)."""
        for attempt in range(MAX_ATTEMPTS):
            plan = coord.plan_round(list(range(self.cfg.num_clients)), infos=infos, now=0.0)
            record, summed = self.secure_round(coord, plan, functools.partial(train, plan), attempt=attempt,
                                               workers_mask=True)
            if record is not None:
                return record, plan, summed
        reasons = "; ".join(str(r.aborted) for r in self.aborted[-3:])
        raise RuntimeError(f"secure aggregation aborted round {coord.completed_rounds + 1} {MAX_ATTEMPTS} times in a row "
                           f"(last: {reasons}); lower secagg_dropout_rate or secagg_threshold")

    def _client_call(self, fn: Any, *args: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args)
        finally:
            self.client_cpu_seconds += time.process_time() - t0

    def _server_call(self, fn: Any, *args: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args)
        finally:
            self.server_cpu_seconds += time.process_time() - t0

    def secure_round(self, coord: Coordinator, plan: RoundPlan, train: Callable[..., Iterable[ClientUpdate]], *,
                     attempt: int = 0, workers_mask: bool = False) -> tuple[RoundRecord | None, set[Any]]:
        """Run the four phases of ``plan`` (planned with secure aggregation on) for in-process clients.

        ``train(cids)`` yields the ClientUpdate of each client still in the round once keys are shared; the
        coordinator only receives masked inputs. With ``workers_mask`` it is called ``train(cids, masking)``:
        each client opens its share bundle before it trains and hands out a masking job, so the worker that
        trains it also masks its input (in parallel, not serially here) and this only signs the payload; an
        update that comes back unmasked (the training side did not take the job, e.g. an attack changes deltas
        after training) is masked here, with the same result bit for bit. Returns the closed round's record and
        the clients whose inputs are in the sum, or (None, set()) when the protocol aborted (the coordinator's
        round is then aborted too)."""
        cfg = self.cfg
        agg = coord.secagg
        if agg is None:
            raise RuntimeError("the round was not planned with secure aggregation")
        server, params = agg.server, agg.params
        index = {cid: agg.index_of(cid) for cid in plan.selected}
        clients = {cid: SecAggClient(params, index[cid], self.identity(cid),
                                     rng=np.random.default_rng(derive_seed(cfg.seed, plan.round, cid, "secagg-rounding")))
                   for cid in plan.selected}
        gone: set[Any] = set()

        def live(phase: Phase, members: tuple[int, ...]) -> list[Any]:
            cids = [cid for cid in plan.selected if index[cid] in members and cid not in gone]
            gone.update(self._silent(plan.round, attempt, phase, cids))
            return [cid for cid in cids if cid not in gone]

        bundles: dict[Any, ShareBundle] = {}
        trained: list[Any] = []  # the clients still in once keys are shared: those that train and send a masked input

        def share_keys() -> dict[Any, MaskingJob]:
            """Phases 0 and 1; then each client still in opens its share bundle and hands out its masking job."""
            # phase 0: advertise keys (the clients fetch the round's parameters first)
            for cid in live(Phase.ADVERTISE_KEYS, tuple(params.indices)):
                self._server_call(server.params_for, index[cid])
                msg = self._client_call(clients[cid].advertise)
                self._deliver(server.receive_advertise, AdvertiseKeys.from_bytes(msg.to_bytes()), 1.0)
            self._close(server, Phase.ADVERTISE_KEYS, 1.0)
            # phase 1: share keys
            for cid in live(Phase.SHARE_KEYS, server.u1):
                roster = RosterMessage.from_bytes(self._server_call(server.roster_for, index[cid]).to_bytes())
                msg = self._client_call(clients[cid].share_keys, roster)
                self._deliver(server.receive_share_keys, ShareKeys.from_bytes(msg.to_bytes()), 2.0)
            self._close(server, Phase.SHARE_KEYS, 2.0)
            jobs: dict[Any, MaskingJob] = {}
            if server.phase != Phase.MASKED_INPUT:
                return jobs
            # phase 2: open the bundle, train, then send the masked input (a client that drops here never trains)
            trained.extend(live(Phase.MASKED_INPUT, server.u2))
            for cid in trained:
                bundles[cid] = ShareBundle.from_bytes(self._server_call(server.bundle_for, index[cid]).to_bytes())
                # the client's own rounding stream, as its rng in this attempt would draw it; a bundle it refuses is
                # refused again by masked_input below, with its reason, after training
                with contextlib.suppress(SecAggError):
                    jobs[cid] = self._client_call(clients[cid].masking_job, bundles[cid],
                                                  derive_seed(cfg.seed, plan.round, cid, "secagg-rounding"))
            return jobs

        # Without simulated dropouts before the masked input, every selected client trains: the training is handed
        # out first and the key phases run while the workers train (LateMaskingJobs); otherwise who trains depends
        # on the phases' dropout draws, so they run first.
        late = workers_mask and not self._drops_before_training()
        jobs: Mapping[Any, MaskingJob]
        if late:
            jobs = LateMaskingJobs(share_keys)
            updates = train(list(plan.selected), jobs)
        else:
            jobs = share_keys()
            updates = (() if server.phase != Phase.MASKED_INPUT
                       else train(trained, jobs) if workers_mask else train(trained))
        for update in updates:
            cid = update.client_id
            if isinstance(jobs, LateMaskingJobs):
                jobs.resolve()  # (done already when the executor took the jobs late; e.g. not under an attack)
                if jobs.failure is not None or cid not in trained:  # dropped before training: nothing is sent
                    continue
            try:
                if isinstance(update, WorkerMasked) and cid in jobs:
                    if update.masked_payload is None:
                        raise FieldOverflowError(update.mask_error or "masking failed in the worker")
                    masked = self._client_call(clients[cid].sign_masked_payload, update.masked_payload, update.clipped,
                                               update.payload_sha256)
                else:
                    masked = self._client_call(clients[cid].masked_input, bundles[cid],
                                               plain_input_for(params, update))
            except (FieldOverflowError, SecAggError) as exc:
                log.warning("round %d: client %s cannot send its masked input (%s): it drops out", plan.round, cid, exc)
                continue
            # the server's side: decoding the bytes digests the payload they carry, so it is not digested again
            wire = MaskedInput.from_bytes(masked.to_bytes())
            try:
                prepared = self._server_call(unpack_decoded_input, params, wire)
                self._server_call(coord.submit, MaskedUpdate.wrap(cid, plan.round, wire, metrics=update.metrics, now=3.0,
                                                                  prepared=prepared))
            except UpdateRejected as exc:
                log.warning("round %d: masked input of client %s refused (%s)", plan.round, cid, exc)
        if isinstance(jobs, LateMaskingJobs):
            jobs.resolve()  # (a round that trained nobody)
            if jobs.failure is not None:
                raise jobs.failure
        self._close(server, Phase.MASKED_INPUT, 3.0)
        if server.phase == Phase.CONSISTENCY_CHECK:
            # phase 3: every survivor signs the set of clients whose masked inputs the server holds (no simulated
            # dropouts here: a client that drops after its masked input is drawn at unmasking, as before this phase)
            for cid in [c for c in plan.selected if index[c] in server.u3 and c not in gone]:
                check = ConsistencyCheck.from_bytes(self._server_call(server.consistency_check_for, index[cid]).to_bytes())
                try:
                    signed = self._client_call(clients[cid].consistency_check, check)
                except SecAggError as exc:
                    log.warning("round %d: client %s refused to sign the survivor set: %s", plan.round, cid, exc)
                    continue
                self._deliver(server.receive_consistency, ConsistencySignature.from_bytes(signed.to_bytes()), 3.5)
            self._close(server, Phase.CONSISTENCY_CHECK, 3.5)
        if server.phase == Phase.UNMASK:
            # phase 4: unmask (the request carries every signer's signature; each client checks t of its holders')
            for cid in live(Phase.UNMASK, server.u4):
                request = UnmaskRequest.from_bytes(self._server_call(server.unmask_request_for, index[cid]).to_bytes())
                try:
                    msg = self._client_call(clients[cid].unmask, request)
                except SecAggError as exc:
                    log.warning("round %d: client %s refused to unmask: %s", plan.round, cid, exc)
                    continue
                self._deliver(server.receive_unmask, UnmaskResponse.from_bytes(msg.to_bytes()), 4.0)
            self._close(server, Phase.UNMASK, 4.0)  # reconstruction and unmasking run here
        self.client_rounds += len(plan.selected)
        if server.phase != Phase.DONE:
            self.aborted.append(agg.stats())
            log.warning("round %d (attempt %d): secure aggregation aborted: %s; the round is planned again", plan.round,
                        attempt + 1, server.abort_reason)
            coord.abort_round()
            return None, set()
        # the protocol's own messages (keys, shares, unmask) count towards the round's traffic too
        coord.add_bytes(sum(sum(d.values()) for phase, d in server.bytes_in.items() if phase != Phase.MASKED_INPUT.value)
                        + sum(sum(d.values()) for d in server.bytes_out.values()))
        record = coord.close_round()  # the strategy step on the unmasked sum
        self.rounds.append(agg.stats())
        summed = set(server.result().summed)
        return record, {cid for cid in plan.selected if index[cid] in summed}

    @staticmethod
    def _deliver(receive: Any, msg: Any, now: float) -> None:
        try:
            receive(msg, now)
        except SecAggError as exc:  # the server has recorded the drop and its reason
            log.warning("secure aggregation refused a message: %s", exc)

    def _close(self, server: Any, phase: Phase, now: float) -> None:
        """In simulation every client still expected has answered (or dropped): close the phase now."""
        if server.phase == phase:
            self._server_call(server.close_phase, now)

    # ------------------------------------------------------------------ reporting
    def codec_name(self) -> str:
        if not self.rounds:
            return "secagg fixed point"
        p = self.rounds[-1].params
        return (f"secagg fixed point 2^-{self.cfg.secagg_scale_bits}, {p['modulus_bits']}-bit ring Z/2^b "
                f"(b bits per value on the wire)")

    def summary(self) -> dict[str, Any]:
        """The secure_aggregation block of summary.json."""
        done = self.rounds
        phases = [p.value for p in PHASES]
        bytes_pp = {ph: {k: (sum(r.phase_bytes[ph][k] for r in done) / len(done) if done else 0.0) for k in ("up", "down")}
                    for ph in phases}
        drops = {ph: (sum(r.drops.get(ph, 0) for r in done) / len(done) if done else 0.0) for ph in phases}
        return {
            "enabled": True,
            "protocol": "SecAgg (Bonawitz et al. 2017) with the SecAgg+ neighbour graph (Bell et al. 2020) and the "
                        "consistency check against an active server, in process",
            "authentication": "ed25519 per simulated client (verifying keys registered with the server)",
            "rounds_completed": len(done),
            "aborted_attempts": len(self.aborted),
            "abort_reasons": [r.aborted for r in self.aborted[-5:]],
            "last_round_parameters": done[-1].params if done else None,
            "bytes_per_client_per_phase": bytes_pp,
            "mean_dropouts_per_round": drops,
            "clipped_updates": sum(r.clipped for r in done),
            "integrity_events": sum(len(r.events) for r in done),
            "client_cpu_seconds_per_client_round": self.client_cpu_seconds / max(1, self.client_rounds),
            "server_cpu_seconds_per_round": self.server_cpu_seconds / max(1, len(done) + len(self.aborted)),
            "dropout_simulation": {"rate": self.cfg.secagg_dropout_rate, "phase": self.cfg.secagg_dropout_phase},
            "in_clear_per_client": list(IN_CLEAR),
            "threshold_bound": "2t > h + c (h share holders per client, c colluding among them): a client reveals shares "
                               "only for the survivor set it signed, once t of its holders signed the same set",
            "wire": "masked inputs are uniform in the ring Z/2^b: the codec setting is not applied; " + self.codec_name(),
        }


__all__ = ["MAX_ATTEMPTS", "SIMULATION_FEATURES", "SecAggSimulation"]
