"""The federation service: the REST driver's assembly, with no Flask in it.

Routes in :mod:`fl_server.rest.app` translate HTTP to calls here and exceptions here to HTTP.
The service builds, once, what a REST federation is made of and hands each call to the part
that owns it:

- :class:`~fl_server.rest.gateway.ClientGateway`: who the client is (registration, tokens,
  signatures, keys, partitions, profiles, opening an upload, refusals);
- one :class:`~fl_server.rest.driver.RoundDriver`, picked from the configuration:
  :class:`~fl_server.rest.sync_driver.SyncRoundDriver` with plain rounds or with the SecAgg
  protocol of :mod:`fl_server.rest.secure_driver`, or the
  :class:`~fl_server.rest.async_driver.AsyncRoundDriver` of ``training_mode: async``.

Both share one lock (HTTP threads and the round ticker never interleave inside a coordinator),
the SQLite store, the run folder and the observers (metrics, the end-of-run report). The service
owns the round ticker thread and builds the part of ``/status`` that both modes share.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from fl_common.config import FLConfig
from fl_common.data import load_dataset
from fl_common.models import model_from_config
from fl_common.protocol.rest import RegisterResponse, RoundStatus
from fl_common.training import LocalTrainer
from fl_server.rest.async_driver import AsyncRoundDriver
from fl_server.rest.ckks_driver import CKKSRounds
from fl_server.rest.driver import CoordinatorView, DriverContext, ModelPayload, RoundDriver
from fl_server.rest.erasure import erase_client
from fl_server.rest.gateway import ApiError, Authenticated, ClientGateway, SignedRequest, check_rest_config
from fl_server.rest.observer import Observers, ServiceObserver
from fl_server.rest.secrets import ServerSecrets
from fl_server.rest.secure_driver import SecureRounds
from fl_server.rest.state_changes import StateChanges
from fl_server.rest.sync_driver import PlainRounds, RoundProtocol, SyncRoundDriver
from fl_server.store import RunDirectory
from fl_server.store.sqlite import ServerStore

log = logging.getLogger("fl_server.rest.service")

#: the round ticker's longest sleep between two looks at the deadlines (woken early by any change)
TICK_SECONDS = 0.5
#: consecutive ticker failures after which /health says the federation cannot progress
TICKER_FAILURES_UNHEALTHY = 3
#: uploads opened (decrypted, decoded, made durable and summed) at once; the others wait with their raw body only.
#: Why: an upload costs several copies of the update while it is opened (the Fernet token, its plaintext, the
#: decompressed and decoded float vector: ~13 MB for an int8 cnn update, 6x its body), and a round's clients upload
#: together: 100 at once took the worker from 390 MB to 1.4-1.5 GB (benchmarks/results/rest_scale/). Opening is
#: CPU work, so beyond a few at once nothing is gained by more.
UPLOADS_AT_ONCE = 4

T = TypeVar("T")


def partition_sizes_for(cfg: FLConfig) -> list[int]:
    """The record count of every configured partition, derived from the public labels as each
    client derives its own shard: sample-level DP plans each client's DP-SGD from it."""
    from fl_common.data.assignment import partition_sizes, training_subset
    from fl_common.data.datasets import clear_cache

    train = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
    labels = training_subset(train, cfg.seed, cfg.max_train_samples).y.numpy()
    del train
    clear_cache()  # only the labels were needed: do not keep the training images in the server
    return partition_sizes(labels, cfg.num_clients, cfg.partition_method, seed=cfg.seed, alpha=cfg.non_iid_alpha,
                           samples_per_client=cfg.samples_per_client, shards_per_client=cfg.shards_per_client)


def known_partition_sizes(cfg: FLConfig) -> list[int] | None:
    """:func:`partition_sizes_for`, or None (logged) where the training split cannot be read here, e.g.
    a dataset that needs a download on a server without internet: num_samples is then bounded by what
    each client reported at registration instead."""
    try:
        return partition_sizes_for(cfg)
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("cannot derive the partitions' sizes (%s): a client's num_samples is bounded by what it reported", exc)
        return None


class FederationService:
    """One REST federation: a gateway, a round driver, a ticker. See the module docstring."""

    def __init__(self, cfg: FLConfig, state_dir: str | Path, *, secrets_: ServerSecrets | None = None,
                 clock: Callable[[], float] = time.time, evaluate: bool = True,
                 observers: list[ServiceObserver] | None = None) -> None:
        check_rest_config(cfg)
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # keys, token hashes and client updates live here: the server's user only (files inside are 0600)
        os.chmod(self.state_dir, 0o700)
        self.clock = clock
        self.secrets = secrets_ or ServerSecrets.load(self.state_dir)
        self.store = ServerStore(self.state_dir / "server.db")
        self.run_dir = RunDirectory(self.state_dir / "run")
        self.run_dir.create()
        os.chmod(self.run_dir.path, 0o700)
        #: one lock for the gateway's client table and the driver's coordinator
        self.lock = threading.RLock()
        self._wake = threading.Event()
        self._uploads = threading.BoundedSemaphore(UPLOADS_AT_ONCE)
        self._stop = threading.Event()
        #: the version long-polls wait on (fl_server/rest/state_changes.py); bumped by the ticker, never under the lock
        self.changes = StateChanges()
        self._ticker: threading.Thread | None = None
        #: consecutive failures of the round ticker and the last one's message (/health reports them)
        self.ticker_failures = 0
        self.ticker_error: str | None = None
        self._ticker_logged_at = 0.0
        self.started_at = clock()
        #: told of evaluations, closed/aborted rounds and the end of the run (metrics, report; see observer.py)
        self.observers = Observers(observers or ())

        test_set = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
        if cfg.max_test_samples is not None and cfg.max_test_samples < len(test_set):
            test_set = test_set.subset(torch.arange(cfg.max_test_samples))
        model = model_from_config(cfg, test_set.input_shape, test_set.num_classes)
        model_info = {"model_type": cfg.model_type, "num_classes": cfg.num_classes, "hidden_size": cfg.hidden_size,
                      "resnet_norm": cfg.resnet_norm, "custom_model": cfg.custom_model, "seed": cfg.seed,
                      "input_shape": list(test_set.input_shape)}
        asynchronous = cfg.training_mode == "async"
        #: sample-level DP plans each client's DP-SGD from the size of its shard (synchronous rounds only:
        #: the asynchronous mode refuses DP)
        self.partition_sizes: list[int] | None = None
        #: every partition's record count: it bounds the num_samples a client may claim (the weight of its update)
        known_sizes = known_partition_sizes(cfg)
        if cfg.differential_privacy and cfg.dp_mode == "sample" and not asynchronous:
            self.partition_sizes = known_sizes if known_sizes is not None else partition_sizes_for(cfg)
        self.gateway = ClientGateway(cfg, self.store, self.secrets, clock=clock, lock=self.lock, wake=self._wake,
                                     model_info=model_info, partition_sizes=self.partition_sizes, known_sizes=known_sizes,
                                     secagg_required=cfg.secure_aggregation and cfg.secure_aggregation_method == "masking"
                                     and not asynchronous)
        self.context = DriverContext(cfg=cfg, store=self.store, run_dir=self.run_dir, updates_dir=self.state_dir / "updates",
                                     gateway=self.gateway, lock=self.lock, wake=self._wake, clock=clock,
                                     observers=self.observers, trainer=LocalTrainer(model), test_x=test_set.x,
                                     test_y=test_set.y, started_at=self.started_at, evaluate_rounds=evaluate)
        #: secure aggregation's round protocol (its endpoints and /metrics collector), None when off
        self.secure_rounds: SecureRounds | None = None
        #: CKKS aggregation's round protocol (fl_server/rest/ckks_driver.py), None unless secure_aggregation_method is ckks
        self.ckks_rounds: CKKSRounds | None = None
        self.driver: RoundDriver
        if asynchronous:
            self.driver = AsyncRoundDriver(self.context)
        else:
            protocol: RoundProtocol = PlainRounds()
            if cfg.secure_aggregation and cfg.secure_aggregation_method == "ckks":
                self.ckks_rounds = protocol = CKKSRounds(self.context)
            elif cfg.secure_aggregation:
                self.secure_rounds = protocol = SecureRounds(self.context)
            self.driver = SyncRoundDriver(self.context, protocol, partition_sizes=self.partition_sizes)
        self.driver.recover()

    # ------------------------------------------------------------------ what tests, metrics and reports read
    @property
    def coordinator(self) -> CoordinatorView:
        """The driver's transport-free coordinator (the simulation's very class)."""
        return self.driver.coordinator

    @property
    def codec_name(self) -> str:
        return self.gateway.codec_name

    # ------------------------------------------------------------------ the round ticker
    def start(self) -> None:
        """Start the background thread that opens and closes rounds on time."""
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick_loop, name="fl-round-ticker", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.changes.close()  # parked long-polls answer now instead of holding the shutdown
        if self._ticker is not None:
            self._ticker.join(timeout=30)
            self._ticker = None

    def close(self) -> None:
        self.stop()
        self.gateway.refusals.flush(force=True)
        self.store.close()

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            # cleared before the tick, not after it: a wake-up that comes during a tick is never lost
            self._wake.clear()
            try:
                self.tick()
                self.ticker_failures, self.ticker_error = 0, None
            except Exception as exc:
                self.ticker_failures += 1
                now = time.monotonic()
                # the same failure every 0.5 s must not flood the log: the first with its traceback, then a line a minute
                if str(exc) != self.ticker_error or now - self._ticker_logged_at >= 60.0:
                    log.exception("round ticker failed (%d time(s) in a row)", self.ticker_failures)
                    self._ticker_logged_at = now
                self.ticker_error = str(exc)
            self._wake.wait(timeout=TICK_SECONDS)

    def health_problem(self) -> str | None:
        """Why the federation cannot make progress, or None (``/health`` answers 503 with it)."""
        if self.ticker_failures >= TICKER_FAILURES_UNHEALTHY:
            return f"the round ticker failed {self.ticker_failures} times in a row: {self.ticker_error}"
        return self.driver.stalled(self.clock())

    def tick(self) -> None:
        self.driver.tick()
        self.observe_state()  # the push first: clients wake while the model download is packed
        self.driver.prepare_download()
        self.gateway.refusals.flush()

    # ------------------------------------------------------------------ push: long-polls (fl_server/rest/state_changes.py)
    @property
    def long_polls(self) -> bool:
        """Whether this driver says what clients see as a state key (synchronous rounds, plain or secure); the
        asynchronous driver hands out jobs per poll, so its ``wait`` is a plain poll and no state ETag is sent."""
        return isinstance(self.driver, SyncRoundDriver)

    def observe_state(self) -> None:
        """After anything that may have moved the round (the ticker's tick): wake parked long-polls if it did."""
        if isinstance(self.driver, SyncRoundDriver):
            with self.lock:
                key = self.driver.state_key()
            self.changes.observe(key)

    def long_poll(self, read: Callable[[], T], *, wait: float, known: str | None = None,
                  ready: Callable[[T], bool] | None = None) -> tuple[T, str | None]:
        """``read()``, answered once there is news for the client or ``wait`` seconds passed, with the ETag of
        the version it was read at (None: this driver does not long-poll, the answer is a plain poll's).

        Two kinds of news: with ``ready`` (a secure-aggregation phase's message, an attempt's outcome) the
        answer is what the client waits for; without it, the version moved past the client's ``known`` ETag
        (no ETag known: the first poll, answered at once). The version is taken *before* each read, so a
        change during a read leaves the client's ETag stale and its next long-poll answers at once: no change
        is ever missed. The service lock is held only inside ``read``, never while waiting."""
        if not self.long_polls:
            return read(), None
        deadline = time.monotonic() + wait
        while True:
            version = self.changes.version
            answer = read()
            etag = self.changes.etag(version)
            news = ready(answer) if ready is not None else known != etag
            left = deadline - time.monotonic()
            if news or left <= 0:
                return answer, etag
            if not self.changes.wait_past(version, left):  # timed out, the server stops, or too many are parked
                version = self.changes.version
                return read(), self.changes.etag(version)

    # ------------------------------------------------------------------ clients (gateway, then driver)
    def register(self, body: Mapping[str, Any], remote: str = "", request: SignedRequest | None = None) -> RegisterResponse:
        with self.lock:  # the driver hears of it in the same critical section as the credentials change
            registration = self.gateway.register(body, remote, request)
            self.driver.client_registered(registration)
        return registration.response

    def revoke_client(self, client_id: str) -> dict[str, Any]:
        """Admin: the client can no longer authenticate; a round it is in goes on without it."""
        with self.lock:
            result = self.gateway.revoke_client(client_id)
            self.driver.client_left(client_id, "revoked by an admin")
        return result

    def remove_client(self, client_id: str) -> dict[str, Any]:
        """Admin: revoke, then erase every stored row and payload file of the client (its contribution to
        models already aggregated cannot be erased); its name and partition become free."""
        with self.lock:
            self.driver.client_left(client_id, "removed by an admin")
            return erase_client(self.context, self.driver.coordinator, self.state_dir, client_id).to_json()

    def authenticate(self, method: str, path: str, body: bytes, headers: Mapping[str, str], *,
                     require_token: bool = True) -> Authenticated:
        return self.gateway.authenticate(method, path, body, headers, require_token=require_token)

    def refresh_token(self, auth: Authenticated) -> dict[str, Any]:
        return self.gateway.refresh_token(auth)

    def profile(self, auth: Authenticated) -> dict[str, Any]:
        return self.gateway.profile(auth)

    def set_profile(self, auth: Authenticated, body: Any) -> dict[str, Any]:
        return self.gateway.set_profile(auth, body)

    def clients(self) -> list[dict[str, Any]]:
        return self.gateway.clients()

    def is_admin(self, authorization: str) -> bool:
        return self.gateway.is_admin(authorization)

    def create_enrollment(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.gateway.create_enrollment(body)

    def enrollments(self) -> list[dict[str, Any]]:
        return self.gateway.enrollments()

    def revoke_enrollment(self, enrollment_id: str) -> dict[str, Any]:
        return self.gateway.revoke_enrollment(enrollment_id)

    def refuse(self, reason: str, detail: str) -> None:
        """A request refused before it reached the gateway or a driver (bad admin token, oversized body)."""
        self.gateway.refuse(reason, None, detail)

    # ------------------------------------------------------------------ rounds (driver)
    def round_status(self, auth: Authenticated) -> RoundStatus:
        return self.driver.round_status(auth)

    def poll_round(self, auth: Authenticated, *, wait: float, known: str | None,
                   liveness: bool = False) -> tuple[RoundStatus, str | None]:
        """GET round as a long-poll (:meth:`long_poll`). ``liveness``: a training client's heartbeat
        (fl_client/heartbeat.py), answered when this client's round or state moves - the round closing frees its
        parked thread for the next round's push - but not at a secure phase change: it only needs to be heard from,
        and ten heartbeats answered and asking again at each of the two phase changes while they train cost a
        request and an answer each."""
        if not liveness:
            return self.long_poll(lambda: self.round_status(auth), wait=wait, known=known)
        first: list[tuple[int | None, str]] = []

        def round_moved(status: RoundStatus) -> bool:
            key = (status.round, status.state)
            if not first:
                first.append(key)
            return key != first[0]

        return self.long_poll(lambda: self.round_status(auth), wait=wait, known=known, ready=round_moved)

    def model_version(self, requested: int | None) -> int:
        return self.driver.model_version(requested)

    def model_payload(self, auth: Authenticated, version: int) -> ModelPayload:
        payload = self.driver.model_payload(auth, version)
        self.driver.count_download(len(payload[1]))
        return payload

    def accept_update(self, auth: Authenticated, round_number: int, idempotency_key: str, body: bytes,
                      attempt: str | None = None) -> dict[str, Any]:
        """An upload, opened with at most :data:`UPLOADS_AT_ONCE` others (never under the service lock)."""
        with self._uploads:
            return self.driver.accept_update(auth, round_number, idempotency_key, body, attempt)

    def secure_protocol(self) -> SecureRounds:
        """The secure-aggregation endpoints' handler, or 404 when this server does not run SecAgg."""
        if self.secure_rounds is None:
            raise ApiError(404, "secagg_off", "this server does not run secure aggregation")
        return self.secure_rounds

    def ckks_protocol(self) -> CKKSRounds:
        """The CKKS endpoints' handler, or 404 when this server does not run CKKS rounds."""
        if self.ckks_rounds is None:
            raise ApiError(404, "ckks_off", "this server does not run CKKS aggregation")
        return self.ckks_rounds

    # ------------------------------------------------------------------ monitoring
    def status(self) -> dict[str, Any]:
        """``/status``: the mode's own fields (state, versions, the open round or jobs) and the rest, built once."""
        cfg = self.cfg
        with self.lock:
            history = list(self.driver.history)
            evaluated = [r for r in history if r.test_accuracy is not None]
            coord = self.driver.coordinator
            return {
                **self.driver.status_fields(),
                "training_mode": self.driver.mode,
                "num_rounds": cfg.num_rounds,
                "clients": {"registered": self.store.count_clients(), "online": len(self.gateway.live_clients()),
                            "profiled": self.store.count_profiles()},
                "accuracy": evaluated[-1].test_accuracy if evaluated else None,
                "loss": evaluated[-1].test_loss if evaluated else None,
                "history": [r.to_row() for r in history[-200:]],
                "rejected": self.gateway.refusals.rejections(),
                "updates_accepted": self.store.count_updates(),
                "aggregation_method": cfg.aggregation_method,
                "encryption": cfg.encryption,
                "codec": self.gateway.codec_name,
                "differential_privacy": cfg.differential_privacy,
                "privacy": coord.privacy_status(),
                "stop_reason": coord.stop_reason,
                "secure_aggregation": cfg.secure_aggregation,
                "uptime_s": round(self.clock() - self.started_at, 1),
                "selection": self.driver.selection_summary(),
                "participation": self.driver.participation_summary(),
            }

    def summary(self) -> dict[str, Any]:
        return self.driver.summary()


__all__ = ["ApiError", "Authenticated", "FederationService", "check_rest_config", "partition_sizes_for"]
