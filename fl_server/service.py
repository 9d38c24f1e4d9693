"""The federation service: the REST driver's logic, with no Flask in it.

Routes in ``fl_server.app`` translate HTTP to calls here and exceptions here to HTTP. This class
owns the coordinator (the same one the simulation runs), the SQLite store, the checkpoint folder
and the per-client crypto. Its rules:

- Nothing an outside request says is trusted before it is authenticated (bearer token compared
  by keyed hash, HMAC signature with a fresh nonce) and checked (round, selection, size,
  ciphertext, wire format, shape, finiteness). A refused request changes no state except the
  refusal counters and the audit log.
- An update is made durable (payload file fsynced, row committed) before it is folded into the
  aggregate and before the client hears 202. After a crash the open round is rebuilt by replaying
  its durable updates into a fresh aggregator, so nothing acknowledged is lost.
- Rounds open when enough live clients poll, close at quorum or at the deadline with whoever
  arrived (the rest are recorded as dropped), and the global model is checkpointed atomically
  after every round.
- Client selection is the coordinator's policy (config key ``selection``). Under any policy but
  ``uniform`` the candidates are the live clients whose profile has arrived (``POST
  /api/v1/profile``, checked in ``fl_server.client_profiles``); each round attempt stores the
  inclusion probabilities of its selected clients, so a restart records the same participation.
  Per round and client: ``run/participation_rounds.csv``; fairness: ``/status`` and ``summary.json``.
- ``secure_aggregation: true`` hands each round's protocol to ``fl_server.secagg_rest.SecureRestRounds``:
  clients register an Ed25519 verifying key, selected ones run the SecAgg phases over their own
  endpoints, masked inputs come through the update route and are summed in memory, never stored
  (a restart aborts the open secure attempt and plans a new one); the round closes when the sum is
  unmasked and aborts, applying nothing, when the protocol does.
- ``training_mode: async`` runs the asynchronous coordinator instead, driven by
  ``fl_server.async_service.AsyncRestDriver``: the methods below that differ hand over to it at
  their top, and the synchronous code path below them is untouched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
from cryptography.fernet import Fernet

from fl_common.config import FLConfig
from fl_common.crypto import (
    Envelope,
    EnvelopeError,
    KeyAgreementError,
    KeyPair,
    SignatureError,
    constant_time_equals,
    derive_session_keys,
    generate_token,
    hash_token,
    verify_request,
)
from fl_common.crypto.keys import SessionKeys
from fl_common.data import load_dataset
from fl_common.models import model_from_config
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_common.protocol.rest import (
    PROTOCOL_VERSION,
    ROUND_FINISHED,
    ROUND_NOT_SELECTED,
    ROUND_SELECTED,
    ROUND_SUBMITTED,
    ROUND_WAITING,
    DataAssignment,
    RegisterResponse,
    RoundStatus,
)
from fl_common.tensors import wire
from fl_common.tensors.codecs import make_codec
from fl_common.training import EvalResult, LocalTrainer
from fl_server.client_profiles import ProfileError, client_info, profile_spec, validate_profile
from fl_server.coordinator import Coordinator, NoEligibleClients, RoundPlan
from fl_server.observer import Observers, ServiceObserver
from fl_server.privacy_engine import BudgetExhausted
from fl_server.secrets import ServerSecrets
from fl_server.selection import ClientInfo, selection_summary
from fl_server.store import RunDirectory, accuracy_summary
from fl_server.store.run_dir import atomic_write_bytes as fsync_write
from fl_server.store.sqlite import ClientRow, RoundRow, ServerStore, UpdateRow
from fl_server.strategies import UpdateRejected
from fl_server.strategies.base import check_update

if TYPE_CHECKING:  # pragma: no cover - the asynchronous and secure drivers are imported only when a run needs them
    from fl_server.async_service import AsyncRestDriver
    from fl_server.secagg_rest import SecureRestRounds

log = logging.getLogger("fl_server.service")

MAX_NAME = 64
#: the coordinator's per-round participation log (round, client_id, selected, arrived, probability);
#: ``participation.csv`` is the per-client table of the end-of-run report (fl_server/run_report.py)
PARTICIPATION_ROUNDS_CSV = "participation_rounds.csv"
#: config keys that describe simulated clients; a REST federation's clients are real
SIMULATION_ONLY_KEYS = ("client_speed_distribution", "client_speed_sigma", "client_seconds_per_sample", "network_delay",
                        "attack_fraction", "attack_noise_std", "client_test_fraction", "finetune_epochs", "local_only_epochs",
                        "local_only_test_samples")


class ApiError(Exception):
    """An error a client caused: HTTP status, machine code, one-line message, and ``extra`` fields for
    the JSON body (secure aggregation adds whether the client was dropped and the phase)."""

    def __init__(self, status: int, code: str, message: str, *, extra: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra = dict(extra or {})


@dataclass
class Authenticated:
    client_id: str
    keys: SessionKeys


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def check_rest_config(cfg: FLConfig) -> None:
    """What the REST driver cannot run is refused before a server starts, never ignored.

    Driver features (SCAFFOLD's variates) are checked by the coordinator; what is specific to the
    wire, and what only simulated clients have (speeds, attacks), is checked here: the asynchronous
    coordinator checks no driver features, so this is the one place both modes pass through.
    """
    import dataclasses

    from fl_common.config import ConfigError

    if cfg.attack != "none":
        raise ConfigError(f"config key 'attack' has value {cfg.attack!r}: simulated attacks exist only in the simulation "
                          f"(python -m fl_server simulate); set attack: none")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for key in SIMULATION_ONLY_KEYS:
        if getattr(cfg, key) != defaults[key]:
            raise ConfigError(f"config key '{key}' has value {getattr(cfg, key)!r}: it applies to simulated clients only (python "
                              f"-m fl_server simulate: speeds, attacks, held-out splits, fine-tuning); a REST federation's clients "
                              f"are real processes with their own data: remove '{key}'")
    if cfg.aggregation_method == "scaffold" and cfg.compression and make_codec(cfg.codec).biased:
        raise ConfigError(f"config key 'codec' has value {cfg.codec!r}: a biased codec (top-k) would sparsify SCAFFOLD's "
                          f"control-variate deltas too, which error feedback does not cover; use codec int8, float16 or none")


class FederationService:
    def __init__(self, cfg: FLConfig, state_dir: str | Path, *, secrets_: ServerSecrets | None = None,
                 clock: Callable[[], float] = time.time, evaluate: bool = True,
                 observers: Optional[list[ServiceObserver]] = None) -> None:
        check_rest_config(cfg)
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.secrets = secrets_ or ServerSecrets.load(self.state_dir)
        self.store = ServerStore(self.state_dir / "server.db")
        self.run_dir = RunDirectory(self.state_dir / "run")
        self.run_dir.create()
        self.updates_dir = self.state_dir / "updates"
        self.codec = make_codec(cfg.codec if cfg.compression else "none")
        self._key_wrapper = Envelope(self.secrets.key_wrapping_key)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._model_cache: tuple[int, bytes, Optional[bytes]] | None = None
        self._waiting_since: float | None = None
        self.started_at = clock()
        #: told of evaluations, closed/aborted rounds and the end of the run (metrics, report; see fl_server/observer.py)
        self.observers = Observers(observers or ())

        self.test_set = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
        if cfg.max_test_samples is not None and cfg.max_test_samples < len(self.test_set):
            self.test_set = self.test_set.subset(torch.arange(cfg.max_test_samples))
        model = model_from_config(cfg, self.test_set.input_shape, self.test_set.num_classes)
        self.model_info = {"model_type": cfg.model_type, "num_classes": cfg.num_classes, "hidden_size": cfg.hidden_size,
                           "resnet_norm": cfg.resnet_norm, "custom_model": cfg.custom_model, "seed": cfg.seed,
                           "input_shape": list(self.test_set.input_shape)}
        self.trainer = LocalTrainer(model)
        #: sample-level DP plans each client's DP-SGD from the size of its shard: the server derives
        #: the sizes of the configured partition from the public labels, as each client does for itself
        self.partition_sizes: list[int] | None = None
        if cfg.differential_privacy and cfg.dp_mode == "sample":
            self.partition_sizes = self._partition_sizes()
        self._selection_problem: str | None = None  # the last selection failure logged (logged once, not every tick)
        #: training_mode async: the driver of the asynchronous coordinator (None in synchronous rounds)
        self.asynchronous: Optional[AsyncRestDriver] = None
        #: secure aggregation: the REST driver of the SecAgg phases (fl_server/secagg_rest.py), None when off
        self.secure: Optional[SecureRestRounds] = None
        if cfg.training_mode == "async":
            from fl_server.async_service import AsyncRestDriver

            self.asynchronous = AsyncRestDriver(self, evaluate=evaluate)
            self.coordinator = self.asynchronous.coordinator  # type: ignore[assignment]
            self.carries_control = False
            self.asynchronous.recover()
            return
        features: tuple[str, ...] = ("control_variates", "client_infos")
        if cfg.secure_aggregation:
            from fl_server.secagg_rest import SecureRestRounds

            self.secure = SecureRestRounds(self)
            features += ("secure_aggregation",)
        self.coordinator = Coordinator(cfg, self.trainer.vector(), self.trainer.spec,
                                       evaluator=self._evaluate if evaluate else None,
                                       planned_client_sizes=self.partition_sizes,
                                       driver_features=features,
                                       secagg_verifiers=self.secure.verifier if self.secure is not None else None)
        #: SCAFFOLD: the model download carries the server variate c after the model, and every
        #: upload carries the client's variate delta after its model delta (one vector, 2 x numel)
        self.carries_control = self.coordinator.strategy.needs_client_state
        if self.coordinator.privacy is not None:
            log.info("%s", self.coordinator.privacy.describe())
        self._recover()
        if self.partition_sizes is not None:  # clients registered before a restart are accounted again
            for client in self.store.clients():
                if client.partition_index is not None:
                    self._register_for_privacy(client.client_id, client.partition_index)

    # ------------------------------------------------------------------ start-up and recovery
    def _partition_sizes(self) -> list[int]:
        from fl_common.data.assignment import partition_sizes, training_subset
        from fl_common.data.datasets import clear_cache

        cfg = self.cfg
        train = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
        labels = training_subset(train, cfg.seed, cfg.max_train_samples).y.numpy()
        del train
        clear_cache()  # only the labels were needed: do not keep the training images in the server
        return partition_sizes(labels, cfg.num_clients, cfg.partition_method, seed=cfg.seed, alpha=cfg.non_iid_alpha,
                               samples_per_client=cfg.samples_per_client, shards_per_client=cfg.shards_per_client)

    def _register_for_privacy(self, client_id: str, partition_index: int) -> None:
        assert self.coordinator.privacy is not None and self.partition_sizes is not None
        self.coordinator.privacy.register_client(client_id, self.partition_sizes[partition_index])

    def _evaluate(self, vector: torch.Tensor) -> EvalResult:
        t0 = time.perf_counter()
        result = self.trainer.evaluate(vector, self.test_set.x, self.test_set.y, self.cfg.eval_batch_size)
        self.observers.evaluated(time.perf_counter() - t0)
        return result

    def _recover(self) -> None:
        """Continue where a previous process stopped: checkpoint, then the open round's durable updates."""
        if self.run_dir.has_checkpoint():
            state = self.run_dir.load_checkpoint()
            if (state.get("driver") or {}).get("mode") == "async":
                from fl_common.config import ConfigError

                raise ConfigError(f"{self.run_dir.path} holds an asynchronous run: set training_mode: async, or use a new "
                                  f"--state-dir")
            self.coordinator.load_state_dict(state["coordinator"])
            log.info("restored the global model after round %d", self.coordinator.completed_rounds)
        open_row = self.store.current_open_round()
        if open_row is None:
            return
        if open_row.round <= self.coordinator.completed_rounds:
            # The checkpoint was written but the process died before the round was marked closed.
            arrived = [u.client_id for u in self.store.updates_for_round(open_row.round_id)]
            self.store.finish_round(open_row.round_id, "closed", "recovered after restart", self.clock(), arrived)
            return
        if open_row.secagg is not None or self.secure is not None:
            # A secure attempt's protocol state lived in memory only (and a plain attempt cannot continue as a
            # secure one, nor the reverse): the attempt is aborted with its reason and a new one is planned.
            if self.secure is not None and open_row.secagg is not None:
                self.secure.recover(open_row)
            else:
                arrived = [u.client_id for u in self.store.updates_for_round(open_row.round_id)]
                self.store.finish_round(open_row.round_id, "aborted", "the server restarted with secure_aggregation "
                                        f"{'on' if self.secure is not None else 'off'}; the attempt ran with it "
                                        f"{'off' if self.secure is not None else 'on'} and cannot be resumed", self.clock(),
                                        arrived)
            return
        plan = RoundPlan(open_row.round, list(open_row.selected),
                         {c: TrainInstructions.from_json(i) for c, i in open_row.instructions.items()}, privacy=open_row.privacy,
                         probabilities=open_row.probabilities)
        self.coordinator.restore_round(plan)
        replayed = 0
        for row in self.store.updates_for_round(open_row.round_id):
            data = Path(row.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise RuntimeError(f"durable update {row.path} does not match its recorded hash")
            vector, _ = wire.decode_update(data, self._upload_numel, max_bytes=self.cfg.max_update_bytes)
            delta, control = self._split_upload(vector)
            self.coordinator.submit(ClientUpdate(row.client_id, row.round, delta, row.num_samples, row.metrics, row.nbytes,
                                                 control_delta=control))
            replayed += 1
        log.info("resumed open round %d with %d durable update(s) replayed", open_row.round, replayed)

    def start(self) -> None:
        """Start the background thread that opens and closes rounds on time."""
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick_loop, name="fl-round-ticker", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._ticker is not None:
            self._ticker.join(timeout=30)
            self._ticker = None

    def close(self) -> None:
        self.stop()
        self.store.close()

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the ticker must survive and report, not die silently
                log.exception("round ticker failed")
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    # ------------------------------------------------------------------ round lifecycle
    @property
    def target(self) -> int:
        return self.cfg.clients_per_round

    def _live_clients(self) -> list[str]:
        return self.store.live_client_ids(self.clock() - self.cfg.client_liveness)

    def selection_candidates(self, live: list[str]) -> tuple[list[str], Optional[dict[str, ClientInfo]]]:
        """The live clients the selection policy may draw, with what it knows of them.

        ``uniform`` draws among all live clients and reads nothing (infos None, exactly as before
        selection was wired). Every other policy reads the clients' profiles, so a live client
        whose profile has not arrived is not a candidate yet (see fl_server/client_profiles.py)."""
        if self.cfg.selection == "uniform":
            if self.secure is not None:  # a registered key and a reported profile (fl_server/secagg_rest.py)
                return self.secure.candidates(live, None)
            return live, None
        profiles = self.store.profiles()
        infos = {cid: info for cid in live if (info := client_info(cid, profiles.get(cid))) is not None}
        live = [cid for cid in live if cid in infos]
        if self.secure is not None:
            return self.secure.candidates(live, infos)
        return live, infos

    def _selection_failed(self, exc: Exception) -> None:
        """A policy that cannot draw (e.g. no candidate with a positive weight) waits for other
        clients or reports; said once per distinct reason, not on every tick."""
        if str(exc) != self._selection_problem:
            log.warning("selection '%s' cannot draw yet: %s", self.cfg.selection, exc)
            self._selection_problem = str(exc)

    def participation_summary(self) -> dict[str, Any]:
        """Fairness over every registered client (never-selected ones count as 0)."""
        return self.coordinator.participation.summary(self.store.client_ids())

    def _write_participation(self) -> None:
        self.run_dir.write_text(PARTICIPATION_ROUNDS_CSV, self.coordinator.participation.to_csv())

    def tick(self) -> None:
        """Close a round at quorum or deadline; open the next one when enough clients are live."""
        if self.asynchronous is not None:
            self.asynchronous.tick()
            return
        with self._lock:
            now = self.clock()
            open_round = self.coordinator.current_round
            if open_round is not None:
                row = self.store.current_open_round()
                assert row is not None
                arrived = self.coordinator.arrived
                if self.secure is not None:
                    self.secure.tick(row, now)  # the protocol's phases and deadlines decide (fl_server/secagg_rest.py)
                elif len(arrived) >= row.target:
                    self._close_round(row, "quorum")
                elif now >= row.deadline:
                    if len(arrived) >= self.cfg.min_clients:
                        self._close_round(row, "deadline")
                    else:
                        self.coordinator.abort_round()
                        if self.coordinator.privacy is not None:
                            # sample-level DP charged the clients whose updates arrived: make that durable
                            # now, since this attempt's updates will never be replayed
                            self._checkpoint()
                        self.store.finish_round(row.round_id, "aborted", f"deadline with {len(arrived)} update(s), "
                                                f"fewer than min_clients={self.cfg.min_clients}", now, arrived)
                        log.warning("round %d aborted: %d update(s) by the deadline, min_clients=%d", row.round,
                                    len(arrived), self.cfg.min_clients)
                        self.observers.round_aborted(row.round, len(arrived))
                if self.coordinator.current_round is not None:
                    return
                now = self.clock()  # a round just ended: open the next one now, not a tick later
            if self.coordinator.finished:
                return
            live, infos = self.selection_candidates(self._live_clients())
            # The grace period starts once a quorum is live, so a burst of registrations at start-up
            # all make it into the first round instead of the first min_clients.
            if len(live) < (max(self.cfg.min_clients, 3) if self.secure is not None else self.cfg.min_clients):
                self._waiting_since = None  # (secure aggregation needs at least 3 clients in a round)
                return
            if self._waiting_since is None:
                self._waiting_since = now
            enough = len(live) >= min(self.target, self.cfg.num_clients)
            waited = now - self._waiting_since >= self.cfg.round_start_wait
            if enough or waited:
                self._open_round(live, now, infos)
                self._waiting_since = None

    def _finish_run(self) -> None:
        """Results of a run that has ended (all rounds, or the privacy budget): summary and final model."""
        self._write_participation()
        self.run_dir.write_json("summary.json", self.summary())
        self.run_dir.save_model({k: v for k, v in self._global_state().items()})
        reason = self.coordinator.stop_reason or f"all {self.cfg.num_rounds} rounds done"
        log.info("run finished after %d rounds (%s); results in %s", self.coordinator.completed_rounds, reason,
                 self.run_dir.path)
        self.observers.run_finished(self)

    def _checkpoint(self) -> None:
        self.run_dir.save_checkpoint({"config": self.cfg.to_dict(), "coordinator": self.coordinator.state_dict(),
                                      "wall_seconds": self.clock() - self.started_at})

    def _open_round(self, live: list[str], now: float, infos: Optional[dict[str, ClientInfo]] = None) -> None:
        from fl_common.config import ConfigError

        k = min(len(live), math.ceil(self.target * (1.0 + self.cfg.over_selection)))
        try:
            plan = self.coordinator.plan_round(live, k=k, infos=infos, now=now)
        except BudgetExhausted as exc:
            # The budget is checked before anything is spent: the run ends here, with its message,
            # and its final model is evaluated if the last round was not.
            log.warning("%s", exc)
            if self.coordinator.evaluate_final_model() is not None:
                self.run_dir.write_history(self.coordinator.history)
            self._checkpoint()
            self._finish_run()
            return
        except NoEligibleClients as exc:  # the live clients have spent their budgets; others may come
            if self._waiting_since is not None:
                log.info("%s; waiting for other clients", exc)
            return
        except ConfigError as exc:  # secure aggregation cannot plan among these clients (e.g. too few): wait for others
            if self.secure is None:
                raise
            self._selection_failed(exc)
            return
        except ValueError as exc:  # a policy that cannot draw among these candidates (e.g. all weights 0) waits
            if self.cfg.selection == "uniform" and self.secure is None:
                raise
            self._selection_failed(exc)
            return
        self._selection_problem = None
        # a secure attempt may take every phase's timeout: the row's deadline is that bound (each phase has its own)
        deadline = now + self.cfg.round_timeout + (3 * self.cfg.secagg_phase_timeout if plan.secagg is not None else 0.0)
        row = RoundRow(0, plan.round, "open", [str(c) for c in plan.selected],
                       {str(c): i.to_json() for c, i in plan.instructions.items()}, min(self.target, len(plan.selected)),
                       now, deadline, None, None, plan.privacy,
                       {str(c): float(p) for c, p in (plan.probabilities or {}).items()}, plan.secagg)
        self.store.open_round(row)
        if self.secure is not None:
            self.secure.opened(row)
        log.info("round %d opened: %d of %d live clients selected, quorum %d, deadline in %.0f s", plan.round,
                 len(plan.selected), len(live), row.target, self.cfg.round_timeout)

    def _close_round(self, row: RoundRow, reason: str) -> None:
        arrived = sorted(self.coordinator.arrived)
        secure = self.coordinator.secagg if self.secure is not None else None
        t0 = time.perf_counter()
        record = self.coordinator.close_round()
        close_seconds = time.perf_counter() - t0
        if self.secure is not None and secure is not None:  # before the summary of a finished run is written
            self.secure.record_closed(row, secure)
        self._checkpoint()
        self.run_dir.write_history(self.coordinator.history)
        self._write_participation()
        self.store.finish_round(row.round_id, "closed", reason, self.clock(), arrived)
        self._model_cache = None
        dropped = len(row.selected) - len(arrived)
        acc = f", test accuracy {record.test_accuracy:.4f}" if record.test_accuracy is not None else ""
        eps = f", epsilon spent {record.epsilon:.4g}" if record.epsilon is not None else ""
        log.info("round %d closed at %s with %d update(s), %d dropped%s%s", row.round, reason, len(arrived), dropped, acc, eps)
        self.observers.round_closed(record, reason=reason, selected=len(row.selected), arrived=len(arrived),
                                    close_seconds=close_seconds)
        if self.coordinator.finished:
            self._finish_run()

    def _global_state(self) -> dict[str, torch.Tensor]:
        from fl_common.tensors import unflatten

        return unflatten(self.coordinator.global_vector, self.coordinator.spec)

    # ------------------------------------------------------------------ registration and auth
    def register(self, body: Mapping[str, Any], remote: str = "") -> RegisterResponse:
        token = body.get("enrollment_token")
        if not isinstance(token, str) or not constant_time_equals(token, self.secrets.enrollment_token):
            self._refuse("bad_enrollment_token", None, f"registration refused from {remote or 'unknown'}")
            raise ApiError(401, "bad_enrollment_token", "the enrollment token is missing or wrong")
        name = body.get("client_name")
        if name is not None and (not isinstance(name, str) or not (1 <= len(name) <= MAX_NAME)
                                 or not all(c.isalnum() or c in "-_." for c in name)):
            raise ApiError(400, "bad_client_name", f"client_name must be 1-{MAX_NAME} characters of letters, digits, - _ .")
        partition = body.get("partition")
        if partition is not None and (isinstance(partition, bool) or not isinstance(partition, int)
                                      or not 0 <= partition < self.cfg.num_clients):
            raise ApiError(400, "bad_partition", f"partition must be an integer in [0, {self.cfg.num_clients})")
        num_samples = body.get("num_samples")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
            raise ApiError(400, "bad_num_samples", "num_samples must be a positive integer")
        capability = body.get("capability") or {}
        if not isinstance(capability, dict) or len(capability) > 16 or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for k, v in capability.items()):
            raise ApiError(400, "bad_capability", "capability must map up to 16 names to non-negative numbers")
        public_key = body.get("public_key")
        if not isinstance(public_key, str) or len(public_key) > 100:
            raise ApiError(400, "bad_public_key", "public_key must be an urlsafe-base64 X25519 public key")
        from fl_server.secagg_rest import parse_verify_key

        verify_key = parse_verify_key(body.get("secagg_verify_key"))
        if verify_key is None and self.secure is not None:
            raise ApiError(400, "secagg_verify_key_required", "this server runs secure aggregation: register with "
                           "secagg_verify_key, the urlsafe base64 of the client's long-term Ed25519 public key")

        with self._lock:
            now = self.clock()
            existing = self.store.client_by_name(name) if name else None
            client_id = existing.client_id if existing else f"c-{secrets.token_hex(8)}"
            server_keys = KeyPair.generate()
            salt = secrets.token_bytes(32)
            try:
                keys = derive_session_keys(server_keys, public_key, client_id=client_id, salt=salt, role="server")
            except (KeyAgreementError, ValueError):
                raise ApiError(400, "bad_public_key", "public_key is not a valid X25519 public key") from None
            session = generate_token()
            token_hash = hash_token(session, self.secrets.token_pepper)
            expires = now + self.cfg.session_ttl
            wrapped = self._key_wrapper.seal(json.dumps({"f": keys.fernet_key.decode(), "h": _b64(keys.hmac_key)}).encode())
            if existing:
                if partition is not None and existing.partition_index != partition:
                    raise ApiError(409, "partition_conflict", f"client '{name}' already holds partition {existing.partition_index}")
                index = existing.partition_index
            else:
                index = self._assign_partition(partition)
            if self.partition_sizes is not None and index is not None and num_samples is not None \
                    and num_samples != self.partition_sizes[index]:
                raise ApiError(409, "num_samples_mismatch", f"partition {index} holds {self.partition_sizes[index]} records, "
                               f"the client reports {num_samples}; sample-level DP is planned from the partition's size")
            if existing:
                if self.secure is not None and existing.secagg_verify_key != verify_key:
                    self.secure.key_changed(client_id, now)
                self.store.replace_client_credentials(client_id, token_hash, expires, wrapped, capability, num_samples, now,
                                                      verify_key)
                if self.asynchronous is not None:  # it lost its state: the job it held will not come back
                    self.asynchronous.client_left(client_id, "registered again")
            else:
                self.store.add_client(ClientRow(client_id, name, token_hash, expires, wrapped, index, num_samples, capability,
                                                now, now, 0, {}, secagg_verify_key=verify_key))
            if self.partition_sizes is not None and index is not None:
                self._register_for_privacy(client_id, index)
            self.store.security_event("registered", client_id, f"name={name or '-'} partition={index} from {remote or '-'}")
        log.info("client %s registered (name %s, partition %s)", client_id, name or "-", index)
        self._wake.set()
        return RegisterResponse(
            client_id=client_id, session_token=session, token_expires_at=expires, server_public_key=server_keys.public_b64,
            salt=_b64(salt), poll_interval=self.cfg.poll_interval, protocol_version=PROTOCOL_VERSION,
            data=self._assignment(index), model=self.model_info, codec=self.codec.name if self.cfg.compression else "none",
            wire_compression=self.cfg.wire_compression, encryption=self.cfg.encryption,
        )

    def _assign_partition(self, requested: Optional[int]) -> Optional[int]:
        used = self.store.used_partitions()
        if requested is not None:
            if requested in used:
                raise ApiError(409, "partition_taken", f"partition {requested} is already assigned to another client")
            return requested
        free = [i for i in range(self.cfg.num_clients) if i not in used]
        if not free:
            raise ApiError(409, "federation_full", f"all {self.cfg.num_clients} partitions are assigned (num_clients)")
        return free[0]

    def _assignment(self, index: Optional[int]) -> Optional[DataAssignment]:
        if index is None:
            return None
        c = self.cfg
        return DataAssignment(c.dataset, index, c.num_clients, c.partition_method, c.non_iid_alpha, c.seed, c.samples_per_client,
                              c.shards_per_client, c.max_train_samples)

    def _keys_of(self, row: ClientRow) -> SessionKeys:
        data = json.loads(self._key_wrapper.open(row.wrapped_keys))
        return SessionKeys(fernet_key=data["f"].encode(), hmac_key=base64.urlsafe_b64decode(data["h"]))

    def authenticate(self, method: str, path: str, body: bytes, headers: Mapping[str, str], *,
                     require_token: bool = True) -> Authenticated:
        """Bearer session token (keyed-hash lookup, expiry) and HMAC signature (freshness, no replay)."""
        row: Optional[ClientRow] = None
        if require_token:
            auth = headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or len(auth) > 200:
                self._refuse("missing_token", None, f"{method} {path} without a bearer token")
                raise ApiError(401, "missing_token", "an 'Authorization: Bearer <session token>' header is required")
            row = self.store.client_by_token_hash(hash_token(auth[7:].strip(), self.secrets.token_pepper))
            if row is None:
                self._refuse("bad_token", None, f"{method} {path} with an unknown session token")
                raise ApiError(401, "bad_token", "the session token is not valid; register again")
            if row.token_expires < self.clock():
                self._refuse("expired_token", row.client_id, f"{method} {path} with an expired session token")
                raise ApiError(401, "expired_token", "the session token has expired; refresh it at /api/v1/token")

        def key_lookup(client_id: str) -> Optional[bytes]:
            r = row if row is not None and row.client_id == client_id else (None if require_token else self.store.client(client_id))
            return None if r is None else self._keys_of(r).hmac_key

        try:
            client_id = verify_request(method, path, body, headers, hmac_key=key_lookup, nonce_cache=self.store,
                                       clock=self.clock)
        except SignatureError as exc:
            self._refuse(f"signature_{exc.reason}", row.client_id if row else None, f"{method} {path}: {exc.reason}")
            raise ApiError(401, f"signature_{exc.reason}", f"request signature refused: {exc.reason.replace('_', ' ')}") from None
        if row is None:
            row = self.store.client(client_id)
            assert row is not None
        self.store.touch_client(client_id, self.clock())
        return Authenticated(client_id, self._keys_of(row))

    def refresh_token(self, auth: Authenticated) -> dict[str, Any]:
        session = generate_token()
        expires = self.clock() + self.cfg.session_ttl
        self.store.update_token(auth.client_id, hash_token(session, self.secrets.token_pepper), expires)
        self.store.security_event("token_refreshed", auth.client_id, "session token renewed")
        return {"session_token": session, "token_expires_at": expires}

    def _refuse(self, reason: str, client_id: Optional[str], detail: str) -> None:
        self.store.count_rejection(reason)
        self.store.security_event(reason, client_id, detail)
        log.warning("refused: %s (%s)", reason, detail)

    # ------------------------------------------------------------------ client profiles (selection)
    def profile(self, auth: Authenticated) -> dict[str, Any]:
        """GET /api/v1/profile: what the selection policy wants to know, and what this client reported."""
        row = self.store.client(auth.client_id)
        return profile_spec(self.cfg, row.profile if row is not None else None).to_json()

    def set_profile(self, auth: Authenticated, body: Any) -> dict[str, Any]:
        """POST /api/v1/profile: validate and store a client's profile. A refused report changes
        nothing but the refusal counters and the audit log."""
        row = self.store.client(auth.client_id)
        assert row is not None  # authenticated
        size = None
        if self.partition_sizes is not None and row.partition_index is not None:
            size = self.partition_sizes[row.partition_index]  # sample-level DP plans from it, as at registration
        try:
            profile = validate_profile(self.cfg, body, partition_size=size)
        except ProfileError as exc:
            self._refuse(f"profile_{exc.code}", auth.client_id, f"profile refused: {exc.message}")
            raise ApiError(exc.status, exc.code, exc.message) from None
        profile["reported_at"] = self.clock()
        capability = {**row.capability, **profile["capability"]}
        with self._lock:
            self.store.set_profile(auth.client_id, profile, profile["num_samples"], capability)
        self.store.security_event("profile", auth.client_id, f"num_samples={profile['num_samples']} capability="
                                  f"{json.dumps(profile['capability'], sort_keys=True)} label_histogram="
                                  f"{'yes' if 'label_histogram' in profile else 'no'}")
        self._wake.set()
        return {"accepted": True, "profile": profile}

    # ------------------------------------------------------------------ polling and model download
    def round_status(self, auth: Authenticated) -> RoundStatus:
        if self.asynchronous is not None:
            return self.asynchronous.round_status(auth)
        self._wake.set()
        with self._lock:
            coord = self.coordinator
            version = coord.completed_rounds
            if coord.finished:
                return RoundStatus(ROUND_FINISHED, None, version, 0.0)
            current = coord.current_round
            if current is None:
                return RoundStatus(ROUND_WAITING, None, version, self.cfg.poll_interval)
            row = self.store.current_open_round()
            assert row is not None
            if auth.client_id in coord.arrived and self.secure is None:
                return RoundStatus(ROUND_SUBMITTED, current, version, self.cfg.poll_interval, row.deadline)
            instr = row.instructions.get(auth.client_id)
            if instr is None:
                return RoundStatus(ROUND_NOT_SELECTED, current, version, self.cfg.poll_interval, row.deadline)
            if self.secure is not None:  # its index, the phase and the phase's deadline ride along
                state, block = self.secure.round_status(auth.client_id, row)
                return RoundStatus(state, current, version, self.cfg.poll_interval, row.deadline,
                                   instr if state == ROUND_SELECTED else None, secagg=block)
            return RoundStatus(ROUND_SELECTED, current, version, self.cfg.poll_interval, row.deadline, instr)

    def model_payload(self, auth: Authenticated) -> tuple[int, bytes, Optional[bytes]]:
        """The current global model: (version, body, wrapped model key).

        Hybrid encryption: each version is packed and Fernet-encrypted once under a fresh random
        model key, and each client receives that key encrypted under its own session key. A round's
        downloads then cost the server one encryption instead of one per client (6.6 MB each for
        the CNN), while only registered clients can read the model."""
        with self._lock:
            version = self.coordinator.completed_rounds
            if self._model_cache is None or self._model_cache[0] != version:
                vector = self.coordinator.global_vector
                if self.carries_control:
                    control = self.coordinator.server_control  # None until the first round is planned: c = 0
                    vector = torch.cat([vector, control.to(torch.float32) if control is not None else torch.zeros_like(vector)])
                packed = wire.encode_update(vector, "none", self.cfg.wire_compression,
                                            meta={"version": version, "spec": self.coordinator.spec.to_json(),
                                                  "server_control": self.carries_control})
                if self.cfg.encryption:
                    model_key = Fernet.generate_key()
                    self._model_cache = (version, Envelope(model_key).seal(packed), model_key)
                else:
                    self._model_cache = (version, packed, None)
            _, body, model_key = self._model_cache
        return version, body, (Envelope(auth.keys).seal(model_key) if model_key is not None else None)

    # ------------------------------------------------------------------ updates
    def accept_update(self, auth: Authenticated, round_number: int, idempotency_key: str, body: bytes,
                      attempt: Optional[str] = None) -> dict[str, Any]:
        if self.asynchronous is not None:  # round_number is then the model version the job trained on
            return self.asynchronous.accept_update(auth, round_number, idempotency_key, body)
        if self.secure is not None:  # a masked input (fl_server/secagg_rest.py): summed, never stored
            return self.secure.accept_masked(auth, round_number, attempt, idempotency_key, body)
        self._check_idempotency_key(auth.client_id, idempotency_key)
        # 1. a retry of an update we already hold: same key -> the same answer, counted once
        previous = self.store.accepted_update(round_number, auth.client_id)
        if previous is not None:
            if constant_time_equals(previous.idempotency_key, idempotency_key):
                return {"accepted": True, "round": round_number, "duplicate": True}
            self._reject_update("duplicate", auth.client_id)
            raise ApiError(409, "duplicate", f"an update for round {round_number} was already accepted from this client")
        # 2. is this client expected in this round?
        self._check_expected(auth.client_id, round_number)  # cheap early refusal; re-checked under the lock
        # 3. decrypt and decode outside the lock (the expensive part)
        packed, update = self._open_update(auth, round_number, body)
        # 4. durable, then aggregated, then acknowledged
        with self._lock:
            row = self._check_expected(auth.client_id, round_number)
            if self.store.update(row.round_id, auth.client_id) is not None:
                raise ApiError(409, "duplicate", f"an update for round {round_number} was already accepted from this client")
            path = self.updates_dir / f"attempt{row.round_id:06d}-r{round_number:05d}" / f"{auth.client_id}.bin"
            fsync_write(path, packed)
            self.store.add_update(UpdateRow(row.round_id, round_number, auth.client_id, idempotency_key, str(path),
                                            hashlib.sha256(packed).hexdigest(), update.num_samples, update.metrics, len(body),
                                            self.clock()))
            self.coordinator.submit(update)
        self._wake.set()
        return {"accepted": True, "round": round_number, "duplicate": False}

    def _check_idempotency_key(self, client_id: str, idempotency_key: str) -> None:
        if not idempotency_key or len(idempotency_key) > 128 or not all(c.isalnum() or c in "-_.:" for c in idempotency_key):
            self._reject_update("bad_idempotency_key", client_id)
            raise ApiError(400, "bad_idempotency_key", "an Idempotency-Key header of 1-128 characters [A-Za-z0-9-_.:] is required")

    def _open_update(self, auth: Authenticated, round_number: int, body: bytes) -> tuple[bytes, ClientUpdate]:
        """Decrypt, decode and check an upload (both modes): (wire-packed bytes, the update), or ApiError."""
        try:
            packed = Envelope(auth.keys).open(body) if self.cfg.encryption else body
        except EnvelopeError:
            self._reject_update("bad_ciphertext", auth.client_id)
            raise ApiError(400, "bad_ciphertext", "the update could not be decrypted with this client's key") from None
        try:
            vector, meta = wire.decode_update(packed, self._upload_numel, max_bytes=self.cfg.max_update_bytes)
        except ValueError as exc:
            self._reject_update("bad_payload", auth.client_id)
            raise ApiError(422, "bad_payload", f"the update payload is malformed: {exc}") from None
        num_samples = meta.get("num_samples")
        metrics = meta.get("metrics", {})
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            self._reject_update("bad_num_samples", auth.client_id)
            raise ApiError(422, "bad_num_samples", "the update's num_samples must be a positive integer")
        if not isinstance(metrics, dict) or len(metrics) > 32 or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in metrics.items()):
            self._reject_update("bad_metrics", auth.client_id)
            raise ApiError(422, "bad_metrics", "metrics must map up to 32 names to finite numbers")
        delta, control = self._split_upload(vector)
        update = ClientUpdate(auth.client_id, round_number, delta, num_samples, {k: float(v) for k, v in metrics.items()},
                              len(body), control_delta=control)
        try:
            check_update(update, self.coordinator.spec.numel)
        except UpdateRejected as exc:
            self._reject_update(exc.reason, auth.client_id)
            raise ApiError(422, exc.reason, str(exc)) from None
        return packed, update

    @property
    def _upload_numel(self) -> int:
        return self.coordinator.spec.numel * (2 if self.carries_control else 1)

    def _split_upload(self, vector: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(model delta, SCAFFOLD variate delta or None) of a decoded upload."""
        if not self.carries_control:
            return vector, None
        n = self.coordinator.spec.numel
        return vector[:n], vector[n:]

    def _check_expected(self, client_id: str, round_number: int) -> RoundRow:
        current = self.coordinator.current_round
        if current is None or round_number != current:
            self._reject_update("round_closed", client_id)
            raise ApiError(409, "round_closed", f"round {round_number} is not open (open round: {current or 'none'})")
        row = self.store.current_open_round()
        if row is None or client_id not in row.instructions:
            self._reject_update("not_selected", client_id)
            raise ApiError(409, "not_selected", f"this client was not selected for round {round_number}")
        return row

    def _reject_update(self, reason: str, client_id: str) -> None:
        self._refuse(f"update_{reason}", client_id, f"update refused: {reason}")

    # ------------------------------------------------------------------ monitoring
    def status(self) -> dict[str, Any]:
        if self.asynchronous is not None:
            return self.asynchronous.status()
        with self._lock:
            coord = self.coordinator
            row = self.store.current_open_round()
            history = coord.history
            evaluated = [r for r in history if r.test_accuracy is not None]
            live = self._live_clients()
            return {
                "state": "finished" if coord.finished else ("training" if row else "waiting_for_clients"),
                "completed_rounds": coord.completed_rounds,
                "num_rounds": self.cfg.num_rounds,
                "model_version": coord.completed_rounds,
                "current_round": None if row is None else {
                    "round": row.round, "selected": len(row.selected), "quorum": row.target,
                    "arrived": len(coord.arrived), "deadline_in_s": round(max(0.0, row.deadline - self.clock()), 1),
                },
                "clients": {"registered": self.store.count_clients(), "online": len(live),
                            "profiled": self.store.count_profiles()},
                "accuracy": evaluated[-1].test_accuracy if evaluated else None,
                "loss": evaluated[-1].test_loss if evaluated else None,
                "history": [r.to_row() for r in history[-200:]],
                "rejected": self.store.rejections(),
                "updates_accepted": self.store.count_updates(),
                "aggregation_method": self.cfg.aggregation_method,
                "encryption": self.cfg.encryption,
                "codec": self.codec.name if self.cfg.compression else "none",
                "differential_privacy": self.cfg.differential_privacy,
                "privacy": coord.privacy_status(),
                "stop_reason": coord.stop_reason,
                "secure_aggregation": self.cfg.secure_aggregation,
                **({"secagg": self.secure.status()} if self.secure is not None else {}),
                "uptime_s": round(self.clock() - self.started_at, 1),
                "training_mode": "sync",
                "selection": selection_summary(self.cfg, coord.selector),
                "participation": self.participation_summary(),
            }

    def clients(self) -> list[dict[str, Any]]:
        now = self.clock()
        participation = self.store.participation()
        return [{
            "client_id": c.client_id, "name": c.name, "partition": c.partition_index, "num_samples": c.num_samples,
            "capability": c.capability, "registered_at": c.registered_at, "last_seen_s_ago": round(now - c.last_seen, 1),
            "online": now - c.last_seen <= self.cfg.client_liveness, "rounds_participated": c.rounds_participated,
            "dropped": participation.get(c.client_id, {}).get("dropped", 0), "last_metrics": c.last_metrics,
            "profile": c.profile,
        } for c in self.store.clients()]

    def summary(self) -> dict[str, Any]:
        if self.asynchronous is not None:
            return self.asynchronous.summary()
        hist = self.coordinator.history
        return {
            "mode": "rest", "rounds_completed": self.coordinator.completed_rounds, **accuracy_summary(hist),
            "wall_seconds": self.clock() - self.started_at, "total_bytes": sum(r.bytes for r in hist),
            "clients_registered": self.store.count_clients(), "rejected": self.store.rejections(),
            "encryption": self.cfg.encryption, "privacy": self.coordinator.privacy_status(),
            "stop_reason": self.coordinator.stop_reason, "training_mode": "sync",
            "selection": selection_summary(self.cfg, self.coordinator.selector), "participation": self.participation_summary(),
            "secure_aggregation": self.secure.summary() if self.secure is not None else {"enabled": False},
            "config": self.cfg.to_dict(),
        }


__all__ = ["FederationService", "ApiError", "Authenticated", "check_rest_config"]
