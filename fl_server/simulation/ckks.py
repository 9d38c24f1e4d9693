"""The simulation's CKKS aggregation: every simulated client encrypts its update under the round's
public key with the real client code (fl_common/he), the coordinator's :class:`~fl_server.he.CKKSAggregator`
adds the ciphertexts, and the round's decryptor (one selected client) decrypts the sum; every message
goes through its byte encoding, so research runs see the same bytes a deployment would.

Dropouts (``secagg_dropout_rate`` with ``secagg_dropout_phase`` all / masked_input / unmask, drawn
from (seed, round, attempt, client, phase) like masking's): a client silent at ``masked_input``
never sends its ciphertexts and is simply not in the sum; a decryptor silent at ``unmask`` leaves
the sum undecryptable, so the attempt is aborted and the round planned again (fresh key, fresh
decryptor, fresh training), at most MAX_ATTEMPTS times. An aborted attempt reaches neither the
model nor client-level DP's ledger (sample-level DP charges each client when its input arrives,
which over-counts an aborted attempt: conservative, as under masking).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from fl_common.config import FLConfig
from fl_common.he import (
    CKKSParams,
    DecryptedSum,
    EncryptedInput,
    EncryptedSum,
    Encryptor,
    HEInput,
    HEMessageError,
    KeyHolder,
    PublicKey,
    encode_input,
)
from fl_common.he.backend import tenseal
from fl_common.protocol import ClientUpdate, derive_seed
from fl_server.coordinator import Coordinator, RoundPlan
from fl_server.he import CKKSAggregator, CKKSRoundStats, EncryptedUpdate
from fl_server.selection import ClientInfo
from fl_server.store import RoundRecord
from fl_server.strategies import UpdateRejected

#: ``train(plan, cids)``: the updates of the clients ``cids`` of ``plan``, trained on the round's global model
TrainClients = Callable[[RoundPlan, list[Any]], Iterable[ClientUpdate]]
T = TypeVar("T")

log = logging.getLogger("fl_server.he")

#: consecutive aborted attempts of one round before the run stops with the reasons
MAX_ATTEMPTS = 20
#: the driver features the simulation declares for CKKS
SIMULATION_FEATURES = ("ckks", "secagg_dropouts")


class CKKSSimulation:
    """Plays the clients' side of CKKS aggregation for a :class:`~fl_server.simulation.Simulation`
    (which trains the clients; this class encrypts, sends and decrypts)."""

    def __init__(self, cfg: FLConfig) -> None:
        tenseal()  # refuse now, with the install command, rather than in the first round
        self.cfg = cfg
        self.rounds: list[CKKSRoundStats] = []
        self.aborted: list[CKKSRoundStats] = []
        self.client_cpu_seconds = 0.0  # CKKS client work only (keygen, key loading, encoding, encryption, decryption)
        self.server_cpu_seconds = 0.0  # CKKS server work only (key check, ciphertext checks and sums, serialization)
        self.client_rounds = 0
        self.max_error_bound = 0.0
        self._sum_bytes = 0

    # ------------------------------------------------------------------ helpers
    def _client(self, fn: Callable[..., T], *args: Any) -> T:
        t0 = time.process_time()
        try:
            return fn(*args)
        finally:
            self.client_cpu_seconds += time.process_time() - t0

    def _silent(self, round_number: int, attempt: int, phase: str, cids: list[Any]) -> set[Any]:
        cfg = self.cfg
        if cfg.secagg_dropout_rate <= 0 or cfg.secagg_dropout_phase not in ("all", phase):
            return set()
        return {cid for cid in cids
                if np.random.default_rng(derive_seed(cfg.seed, round_number, attempt, cid, "ckks-dropout", phase)).random()
                < cfg.secagg_dropout_rate}

    # ------------------------------------------------------------------ rounds
    def run_round(self, coord: Coordinator, infos: Mapping[Any, ClientInfo],
                  train: TrainClients) -> tuple[RoundRecord, RoundPlan, set[Any]]:
        """Plan, run and close one round; planned again while it aborts. Returns the record, the plan of the
        attempt that closed it and the clients whose inputs are in the sum."""
        for attempt in range(MAX_ATTEMPTS):
            plan = coord.plan_round(list(range(self.cfg.num_clients)), infos=infos, now=0.0)
            record, summed = self.ckks_round(coord, plan, lambda cids, p=plan: train(p, cids), attempt=attempt)
            if record is not None:
                return record, plan, summed
        reasons = "; ".join(str(r.aborted) for r in self.aborted[-3:])
        raise RuntimeError(f"CKKS aggregation aborted round {coord.completed_rounds + 1} {MAX_ATTEMPTS} times in a row "
                           f"(last: {reasons}); lower secagg_dropout_rate")

    def ckks_round(self, coord: Coordinator, plan: RoundPlan, train: Callable[[list[Any]], Iterable[ClientUpdate]], *,
                   attempt: int = 0) -> tuple[RoundRecord | None, set[Any]]:
        """The phases of one planned round: public key, encrypted inputs, decryption of the sum, close."""
        agg = coord.ckks
        if agg is None:
            raise RuntimeError("the round was not planned with CKKS aggregation")
        p = agg.params
        t_server = agg.server_cpu_seconds
        # phase 1: the decryptor makes the round's key pair and publishes the public key through the server
        holder = self._client(KeyHolder, p, p.decryptor)
        key_bytes = self._client(lambda: holder.public_key().to_bytes())
        agg.receive_public_key(PublicKey.from_bytes(key_bytes))
        traffic = len(key_bytes) * (1 + len(plan.selected))  # up once, down to every selected client
        # phase 2: train, encrypt, upload (a client silent here sends nothing and is not in the sum)
        silent = self._silent(plan.round, attempt, "masked_input", list(plan.selected))
        for update in train([cid for cid in plan.selected if cid not in silent]):
            wire = self._client(self._encrypt, p, key_bytes, update)
            if wire is None:
                continue
            try:
                coord.submit(EncryptedUpdate.wrap(update.client_id, plan.round, EncryptedInput.from_bytes(wire),
                                                  metrics=update.metrics))
            except UpdateRejected as exc:
                log.warning("round %d: ciphertexts of client %s refused (%s)", plan.round, update.client_id, exc)
        self.client_rounds += len(plan.selected)
        reason = self._decrypt(agg, holder, plan, attempt)
        self.server_cpu_seconds += agg.server_cpu_seconds - t_server
        if reason is not None:
            agg.abort(reason)
            self.aborted.append(agg.stats())
            log.warning("round %d (attempt %d): CKKS aggregation aborted: %s; the round is planned again", plan.round,
                        attempt + 1, reason)
            coord.abort_round()
            return None, set()
        coord.add_bytes(traffic + self._sum_bytes)
        stats = agg.stats()
        record = coord.close_round()  # the strategy step on the decrypted sum (not counted as CKKS work)
        self.rounds.append(stats)
        self.max_error_bound = max(self.max_error_bound, p.error_bound(len(agg.senders)))
        return record, {cid for cid in plan.selected if str(cid) in agg.senders}

    @staticmethod
    def _encrypt(p: CKKSParams, key_bytes: bytes, update: ClientUpdate) -> bytes | None:
        """One client's work: load the public key, encode (clip, weight) and encrypt its update."""
        encryptor = Encryptor(p, PublicKey.from_bytes(key_bytes))
        wants_bit = p.with_unclipped
        plain = HEInput(delta=update.delta.detach().cpu().numpy(), weight=int(update.num_samples),
                        loss=update.metrics.get("train_loss"),
                        unclipped=bool(update.metrics.get("dp_unclipped")) if wants_bit else None)
        try:
            vector, _ = encode_input(p, plain)
        except ValueError as exc:
            log.warning("round %d: client %s cannot encrypt its update (%s): it drops out", p.round, update.client_id, exc)
            return None
        return EncryptedInput(p.round, str(update.client_id), encryptor.encrypt(vector)).to_bytes()

    def _decrypt(self, agg: CKKSAggregator, holder: KeyHolder, plan: RoundPlan, attempt: int) -> str | None:
        """Phase 3: the sum to the decryptor and its answer back; the reason the round cannot close, or None."""
        self._sum_bytes = 0
        if agg.num_updates < max(2, self.cfg.min_clients):
            return f"{agg.num_updates} ciphertext input(s), fewer than max(2, min_clients={self.cfg.min_clients})"
        request = agg.encrypted_sum().to_bytes()
        if self._silent(plan.round, attempt, "unmask", [agg.params.decryptor]):
            return f"the decryptor (client {agg.params.decryptor}) dropped out before decrypting the sum"
        try:
            answer = self._client(lambda: holder.decrypt(EncryptedSum.from_bytes(request)).to_bytes())
            agg.receive_decrypted(DecryptedSum.from_bytes(answer))
        except HEMessageError as exc:
            return f"decryption failed: {exc}"
        self._sum_bytes = len(request) + len(answer)
        return None

    # ------------------------------------------------------------------ reporting
    def codec_name(self) -> str:
        return "CKKS (TenSEAL), N=8192, q=60+60 bits, scale 2^40: ciphertexts are the wire format"

    def summary(self) -> dict[str, Any]:
        """The secure_aggregation block of summary.json."""
        done = self.rounds
        return {
            "enabled": True,
            "method": "ckks",
            "protocol": "CKKS (TenSEAL/SEAL), one decryptor per round drawn among the selected clients; the server adds "
                        "ciphertexts and holds no secret key; in process",
            "rounds_completed": len(done),
            "aborted_attempts": len(self.aborted),
            "abort_reasons": [r.aborted for r in self.aborted[-5:]],
            "last_round_parameters": done[-1].params if done else None,
            "ciphertexts_per_client": done[-1].ciphertexts_per_client if done else None,
            "upload_bytes_per_client": (sum(r.bytes_up_per_client for r in done) / len(done)) if done else 0.0,
            "public_key_bytes": done[-1].bytes_public_key if done else None,
            "max_error_bound_per_slot": self.max_error_bound,
            "client_cpu_seconds_per_client_round": self.client_cpu_seconds / max(1, self.client_rounds),
            "server_cpu_seconds_per_round": self.server_cpu_seconds / max(1, len(done) + len(self.aborted)),
            "dropout_simulation": {"rate": self.cfg.secagg_dropout_rate, "phase": self.cfg.secagg_dropout_phase},
            "wire": "ciphertexts are dense and their size does not depend on the values: the codec setting is not applied; "
                    + self.codec_name(),
        }


__all__ = ["MAX_ATTEMPTS", "SIMULATION_FEATURES", "CKKSSimulation"]
