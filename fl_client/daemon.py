"""The client daemon: register once, report a profile, then poll, train when selected, upload, repeat.

State that must survive a restart lives in ``--state-dir``: credentials (0600), the data
assignment, the last model version and its bytes, the codec's error-feedback residual, the
label histogram it released, and a finished update the server has not acknowledged yet
(fl_client/pending.py: its bytes, its idempotency key, the attempt it was trained for).

A server that is down is waited out, never a reason to exit: registration, polls and uploads
retry with exponential backoff and jitter (fl_client/backoff.py), one log line when the server
goes away and one when it is back, and SIGTERM/SIGINT still stop the daemon at once. A finished
update is kept and uploaded again, with the same idempotency key (the server counts it once),
for as long as its round can take it: until the server answers (202, a duplicate included; a
409 or other 4xx ends it) or the round's deadline passes. A retry after an outage first polls:
an update is never sent into another attempt of its round. A daemon killed after training but
before the server acknowledged the upload sends the kept update after its restart instead of
training the round again.

Push, not poll: with nothing to do the daemon long-polls (``GET /api/v1/round?wait=S`` with the last answer's
ETag, fl_server/rest/state_changes.py): the server answers the moment a round opens or a secure phase changes,
so selected clients start at once instead of at their next poll; the secure-aggregation GETs wait for their
phase the same way (``ServerApi.secagg_wait``). A server that sends no ETag (an older one, or asynchronous
mode) is polled every ``poll_after`` as before, and a long-poll that fails is answered by a plain poll at once.
While it trains for a synchronous round the daemon keeps a second long-poll of the round open (fl_client/heartbeat.py),
so the server, which drops a selected client not heard from for ``client_liveness``, tells a daemon killed
mid-training from a slow one without waiting for the round's deadline.

Profile (client selection): once its data is loaded the daemon asks the server what its
selection policy reads (``GET /api/v1/profile``) and reports it: ``num_samples``; capability
``compute_speed`` in samples/s (``--compute-speed``, else measured by training a few batches of its
own data: an estimate that ranks clients, not a promise) and ``bandwidth`` in bytes/s (only when
declared with ``--bandwidth``: a daemon cannot measure its link without sending data); and, only
when the server asks, its label histogram, Laplace-noised with the server's
``label_histogram_epsilon`` when that is set. The noised histogram is kept in the state dir and
re-sent as is after a restart: a second noisy release would cost a second epsilon.

Asynchronous mode: a poll may hand out a job (``job`` in the reply, ``round`` = the model
version to train on); the daemon downloads that version (``?version=``), trains, uploads, and
polls again at once for its next job. ``--train-delay`` (for tests and demos) sleeps after each
local training, so daemons of different speeds make staleness happen on one machine.

Secure aggregation: the daemon keeps a long-term Ed25519 signing key in the state dir (0600; its
verifying key is sent at registration; ``--print-verify-key`` shows it, for other clients to pin).
With ``secagg_trusted_keys`` (the pinned keys, fl_client/trusted_keys.py) it refuses a roster in
which a neighbour's key is not pinned: it leaves that attempt, says why in its log, and the server
counts it as dropped; it stays up for the next rounds. When a poll says it is selected for a secure round, it
runs the attempt's four phases with ``fl_client.secagg_session`` (the SecAgg client state machine
the simulation runs too), training in a background thread while the keys are exchanged; the
round's keys and shares live in memory only. A SCAFFOLD client moves its control variate only
once the server says the attempt closed with its input in the sum.

Training uses ``fl_common.training.LocalTrainer``, the very code the simulation runs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_client.api import ApiRefused, Credentials, ServerApi, ServerUnreachable
from fl_client.backoff import ServerWait
from fl_client.heartbeat import HEARTBEAT_FIRST_AFTER, TrainingHeartbeat
from fl_client.pending import PendingFileError, PendingUpload
from fl_client.progress import training_progress
from fl_client.secagg_session import SecureRoundSession, SessionEnded, plain_input
from fl_client.trusted_keys import format_verify_key, load_or_create_identity
from fl_client.trusted_keys import write_private as _write_private
from fl_common.data import ArrayDataset
from fl_common.data.assignment import client_shard
from fl_common.models import create_model
from fl_common.privacy import private_label_histogram
from fl_common.protocol import TrainInstructions
from fl_common.protocol.rest import (
    CAPABILITY_BANDWIDTH,
    CAPABILITY_COMPUTE_SPEED,
    PROFILE_LABEL_HISTOGRAM,
    ROUND_FINISHED,
    ROUND_SELECTED,
    DataAssignment,
)
from fl_common.secagg import SecAggError, SigningIdentity
from fl_common.tensors import wire
from fl_common.tensors.codecs import make_codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.tensors.pipeline import pack_update
from fl_common.training import LocalTrainer, resolve_device
from fl_common.training.scaffold import ControlVariates, updated_client_control

log = logging.getLogger("fl_client")


@dataclass
class DaemonOptions:
    server_url: str
    state_dir: Path
    enrollment_token: str | None = None
    client_name: str | None = None
    partition: int | None = None  # None = server assigns ("auto")
    data_dir: str | None = None
    timeout: float = 30.0
    max_retries: int = 3
    max_rounds: int | None = None  # stop after taking part in this many rounds
    threads: int = 1
    device: str = "cpu"  # torch device of local training (fl_common.training.resolve_device)
    capability: dict[str, float] = field(default_factory=dict)
    verify_tls: bool | str = True
    progress: bool | None = None  # local-training progress bar: None = only when stderr is a terminal
    compute_speed: float | None = None  # samples/s reported in the profile; None = measure it
    bandwidth: float | None = None  # bytes/s reported in the profile; None = not reported
    train_delay: float = 0.0  # seconds slept after each local training (tests: a slow device)
    #: seconds slept between a secure round's masked input and its unmasking (tests and demos: a client that
    #: goes away after its masked input, whose self mask the others then rebuild)
    secagg_unmask_delay: float = 0.0
    #: the peers' pinned Ed25519 verifying keys (--secagg-trusted-keys, fl_client/trusted_keys.py): a roster with a
    #: neighbour whose key is not among them is refused; None trusts the keys the server ships
    secagg_trusted_keys: frozenset[bytes] | None = None
    #: wait on the server for the round's state to move (long-poll) instead of polling every poll_interval; the
    #: daemon polls anyway when the server does not long-poll or a long-poll fails
    long_poll: bool = True


#: where a SCAFFOLD client keeps its control variate c_i between rounds
CONTROL_FILE = "scaffold_control.pt"
#: the label histogram this client released (noised once; re-sent as is)
HISTOGRAM_FILE = "label_histogram.json"
#: samples of the client's own data the compute-speed measurement trains on
SPEED_SAMPLES = 256
#: longest wait between two polls, or two upload tries, while the server is unreachable (seconds): short enough
#: not to miss a round's selection or deadline once it is back
POLL_RETRY_CAP = 10.0
UPLOAD_RETRY_CAP = 10.0
#: zstd level of a plain round's upload. The last daemons to finish training pack their updates while the others'
#: uploads are being opened, on the round's critical path: level 1 packs the cnn's int8 update in 6.9 ms against the
#: wire default's (3) 14 ms on an idle core, for 0.5 % more bytes (1.282 against 1.276 MB); the server decompresses
#: either in the same time (issue 12, benchmarks/results/fast_rounds/README.md). The simulation keeps the default.
UPLOAD_ZSTD_LEVEL = 1
#: seconds a round long-poll may wait on the server (it caps it at half its client liveness); a poll every
#: this many seconds also keeps the client live for selection
LONG_POLL_WAIT = 20.0
#: seconds a secure-aggregation GET waits on the server for its phase: short, so the session still looks at its
#: phase deadlines between two waits
SECAGG_LONG_POLL_WAIT = 10.0


class _Keeping:
    """A pending upload written to the state dir (PendingUpload.save) in a thread of its own; :meth:`join` waits
    for the file and raises what the write raised."""

    def __init__(self, pending: PendingUpload, state_dir: Path) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._save, args=(pending, state_dir), name="fl-pending-save", daemon=True)
        self._thread.start()

    def _save(self, pending: PendingUpload, state_dir: Path) -> None:
        try:
            pending.save(state_dir)
        except BaseException as exc:  # handed to join()
            self._error = exc

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class ClientDaemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.state_dir = opts.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.stop_event = threading.Event()
        self.api = ServerApi(opts.server_url, timeout=opts.timeout, max_retries=opts.max_retries, verify=opts.verify_tls,
                             sleep=self._sleep, stop=self.stop_event.is_set)
        self.registration: dict[str, Any] = {}
        self.trainer: LocalTrainer | None = None
        self.data: ArrayDataset | None = None
        self.model_etag: str | None = None
        self.model_vector: torch.Tensor | None = None
        self.rounds_done = 0
        self.error_feedback: ErrorFeedback | None = None
        self.profile_due = True  # reported after loading the data, and again after registering anew
        self.identity: SigningIdentity | None = None  # long-term Ed25519 key for secure aggregation
        self._secagg_attempts: list[int] = []  # secure attempts already taken part in (never twice)
        self.pending: PendingUpload | None = None  # a finished update the server has not acknowledged yet
        self.round_etag: str | None = None  # the state version of the last round status (None: poll, do not park)
        self._poll_was_short = False
        # secure rounds: a step asked for before its phase waits on the server instead of polling
        self.api.secagg_wait = SECAGG_LONG_POLL_WAIT if opts.long_poll else 0.0

    # ------------------------------------------------------------------ lifecycle
    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log.info("received %s: stopping after the current step", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    @property
    def _creds_path(self) -> Path:
        return self.state_dir / "credentials.json"

    def _save_state(self) -> None:
        assert self.api.creds is not None and self.identity is not None
        _write_private(self._creds_path, json.dumps({"credentials": self.api.creds.to_json(), "registration": self.registration,
                                                     "rounds_done": self.rounds_done,
                                                     "secagg_verify_key": format_verify_key(self.identity.verify_key)}))

    def _load_identity(self) -> bool:
        """Load the long-term Ed25519 signing key, or make one (True when it is new: the server must learn it)."""
        self.identity, created = load_or_create_identity(self.state_dir)
        return created

    def _registered_other_key(self) -> bool:
        """Do the saved credentials record a verifying key other than this identity's? (e.g. the key file was
        deleted and ``--print-verify-key`` made a new one: the server must learn it.) Credentials saved before
        the key was recorded count as current."""
        assert self.identity is not None
        saved = json.loads(self._creds_path.read_text(encoding="utf-8")).get("secagg_verify_key")
        return saved is not None and saved != format_verify_key(self.identity.verify_key)

    def _load_or_register(self) -> None:
        new_identity = self._load_identity()
        if self._creds_path.is_file() and (new_identity or self._registered_other_key()):
            log.info("the signing key for secure aggregation is new to the server: registering again so that it knows it")
            # the registration is signed with the saved keys: the server lets a known name register again only so
            saved = json.loads(self._creds_path.read_text(encoding="utf-8"))
            self.api.creds = Credentials.from_json(saved["credentials"])
            self._register()
            return
        if self._creds_path.is_file():
            saved = json.loads(self._creds_path.read_text(encoding="utf-8"))
            self.api.creds = Credentials.from_json(saved["credentials"])
            self.registration = saved["registration"]
            self.rounds_done = int(saved.get("rounds_done", 0))
            log.info("loaded credentials for %s from %s", self.api.creds.client_id, self.state_dir)
            return
        self._register()

    def _register(self) -> None:
        token = self.opts.enrollment_token
        if not token:
            raise SystemExit("error: no enrollment token: pass --enrollment-token or set FL_ENROLLMENT_TOKEN")
        assert self.identity is not None
        self.registration = self.api.register(token, client_name=self.opts.client_name, partition=self.opts.partition,
                                              num_samples=None, capability=self.opts.capability,
                                              secagg_verify_key=self.identity.verify_key)
        self.registration.pop("session_token", None)  # kept only inside the credentials
        self.profile_due = True  # a new registration starts without a profile on the server
        self._save_state()
        log.info("registered as %s (partition %s)", self.registration["client_id"],
                 (self.registration.get("data") or {}).get("partition_index"))

    def _prepare_training(self) -> None:
        reg = self.registration
        assignment = reg.get("data")
        if not assignment:
            raise SystemExit("error: the server assigned no data partition to this client")
        torch.set_num_threads(self.opts.threads)
        # only this client's rows are decoded and normalised (fl_common/data/assignment.py client_shard)
        self.data = client_shard(DataAssignment(
            dataset=assignment["dataset"], partition_index=assignment["partition_index"],
            num_clients=assignment["num_clients"], method=assignment["method"], alpha=assignment["alpha"],
            seed=assignment["seed"], samples_per_client=assignment["samples_per_client"],
            shards_per_client=assignment["shards_per_client"], max_train_samples=assignment.get("max_train_samples")),
            self.opts.data_dir)
        m = reg["model"]
        model = create_model(m["model_type"], tuple(m["input_shape"]), m["num_classes"], hidden_size=m["hidden_size"],
                             resnet_norm=m["resnet_norm"], custom_model=m["custom_model"], seed=m["seed"])
        self.trainer = LocalTrainer(model, device=resolve_device(self.opts.device))
        ef_path = self.state_dir / "error_feedback.bin"
        if make_codec(reg["codec"]).biased:
            self.error_feedback = (ErrorFeedback.from_bytes(ef_path.read_bytes(), self.trainer.spec) if ef_path.is_file()
                                   else ErrorFeedback(self.trainer.spec))
        log.info("holding %d training samples of %s (partition %d of %d)", len(self.data), assignment["dataset"],
                 assignment["partition_index"], assignment["num_clients"])

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        try:
            if not self._start_up():
                log.info("stopped")
                return 0
            self._prepare_training()
            self._load_pending()
            polls = ServerWait("poll", self._sleep, log, cap=POLL_RETRY_CAP)
            while not self.stop_event.is_set():
                if self.opts.max_rounds is not None and self.rounds_done >= self.opts.max_rounds:
                    log.info("took part in %d round(s): done", self.rounds_done)
                    return 0
                try:
                    if self.profile_due:
                        self._report_profile()
                    status = self._poll()
                except ServerUnreachable as exc:
                    polls.failed(exc)
                    continue
                polls.succeeded()
                if status["state"] == ROUND_FINISHED:
                    log.info("the federation has finished; exiting")
                    return 0
                try:
                    if self.pending is not None:
                        if self.pending.is_for(status):  # kept from before a restart: send it, do not train again
                            self._deliver_pending()
                            continue
                        self._drop_pending(f"the server no longer expects it (state {status['state']}, round "
                                           f"{status.get('round')})")
                    if status["state"] == ROUND_SELECTED and status.get("secagg") is not None:
                        ckks = status["secagg"].get("method") == "ckks"  # CKKS rounds: fl_client/ckks_session.py
                        if (self._take_part_ckks if ckks else self._take_part_secure)(status):
                            continue
                    elif status["state"] == ROUND_SELECTED:
                        self._take_part(status)
                        continue
                except ServerUnreachable as exc:  # e.g. the server restarts mid-download: poll again, never die
                    polls.failed(exc)
                    continue
                if not self._parks_next_poll():
                    interval = float(status.get("poll_after") or self.registration.get("poll_interval", 2.0))
                    self._sleep(interval * (0.75 + 0.5 * random.random()))  # jitter keeps clients from polling in lockstep
            log.info("stopped")
            return 0
        except ApiRefused as exc:
            log.error("the server refused this client: %s", exc)
            return 1

    # ------------------------------------------------------------------ push: long-polls (fl_server/rest/state_changes.py)
    def _poll(self) -> dict[str, Any]:
        """One look at the round: a long-poll parked on the server until the state moves past the last answer's
        ETag (a round opens, a secure phase changes), or a plain poll when the server sends no ETag (an older
        server, asynchronous mode) or when there is no answer yet to compare with."""
        wait = LONG_POLL_WAIT if self.opts.long_poll else 0.0
        sent = self.round_etag
        t0 = time.monotonic()
        status, self.round_etag = self._call(self.api.poll_round, sent, wait)
        # the server answered at once with nothing new (it parks only so many requests): do not ask again at once
        self._poll_was_short = (sent is not None and self.round_etag == sent and wait > 0
                                and time.monotonic() - t0 < wait / 2)
        return status

    def _parks_next_poll(self) -> bool:
        """Whether the next poll waits on the server (so the daemon need not sleep before it)."""
        return self.opts.long_poll and self.api.long_poll and self.round_etag is not None and not self._poll_was_short

    def _start_up(self) -> bool:
        """Load the credentials or register, waiting (with backoff) for a server that is not up yet; False when
        the daemon was told to stop while waiting."""
        wait = ServerWait("registration", self._sleep, log)
        while not self.stop_event.is_set():
            try:
                self._load_or_register()
            except ServerUnreachable as exc:
                wait.failed(exc)
                continue
            wait.succeeded()
            return True
        return False

    def _call(self, fn: Any, *args: Any) -> Any:
        """Call the API, renewing an expired session token (or re-registering) once if needed."""
        try:
            return fn(*args)
        except ApiRefused as exc:
            if exc.status != 401:
                raise
            if exc.code == "expired_token":
                log.info("session token expired: renewing")
                self.api.refresh_token()
            elif exc.code in ("bad_token", "signature_bad_signature"):
                log.warning("the server no longer knows this client (%s): registering again", exc.code)
                self._register()
            else:
                raise
            self._save_state()
            return fn(*args)

    # ------------------------------------------------------------------ profile (client selection)
    def _report_profile(self) -> None:
        """Tell the server what its selection policy reads: only the fields it asks for."""
        assert self.data is not None
        try:
            spec = self._call(self.api.profile_spec)
        except ApiRefused as exc:
            if exc.status != 404:
                raise
            log.info("the server takes no profile (%s)", exc)
            self.profile_due = False
            return
        fields = set(spec.get("required", [])) | set(spec.get("optional", []))
        report: dict[str, Any] = {"num_samples": len(self.data)}
        capability: dict[str, float] = {}
        if CAPABILITY_COMPUTE_SPEED in fields:
            capability[CAPABILITY_COMPUTE_SPEED] = self.opts.compute_speed or self._measure_compute_speed()
        if CAPABILITY_BANDWIDTH in fields and self.opts.bandwidth:
            capability[CAPABILITY_BANDWIDTH] = self.opts.bandwidth
        if capability:
            report["capability"] = capability
        if PROFILE_LABEL_HISTOGRAM in fields:
            report[PROFILE_LABEL_HISTOGRAM] = self._label_histogram(int(spec["num_classes"]), spec.get("label_histogram_epsilon"))
        self._call(self.api.send_profile, report)
        self.profile_due = False
        log.info("profile reported: %d samples, capability %s%s", len(self.data),
                 {k: round(v, 1) for k, v in capability.items()} or "none",
                 ", label histogram" + (f" (Laplace, epsilon {spec['label_histogram_epsilon']:g})"
                                        if spec.get("label_histogram_epsilon") is not None else " (exact)")
                 if PROFILE_LABEL_HISTOGRAM in report else "")

    def _measure_compute_speed(self) -> float:
        """Samples per second of plain local training on a few batches of this client's own data."""
        assert self.trainer is not None and self.data is not None
        n = min(len(self.data), SPEED_SAMPLES)
        instr = TrainInstructions(round=0, epochs=1, batch_size=32, learning_rate=1e-6, seed=0)
        start = self.trainer.vector()
        warm = min(n, 32)
        self.trainer.train(start, self.data.x[:warm], self.data.y[:warm], instr)  # first-call overheads
        t0 = time.perf_counter()
        self.trainer.train(start, self.data.x[:n], self.data.y[:n], instr)
        return n / max(time.perf_counter() - t0, 1e-6)

    def _label_histogram(self, num_classes: int, epsilon: float | None) -> list[float]:
        """Counts per class; under ``epsilon`` noised once (OS randomness) and kept for later reports."""
        assert self.data is not None
        counts = np.bincount(self.data.y.numpy().astype(np.int64), minlength=num_classes)[:num_classes]
        if epsilon is None:
            return [float(c) for c in counts]
        path = self.state_dir / HISTOGRAM_FILE
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("epsilon") == epsilon and saved.get("num_samples") == len(self.data):
                return [float(v) for v in saved["histogram"]]
            log.warning("the server now asks for epsilon %g (released before: %s): this second release adds to the first",
                        epsilon, saved.get("epsilon"))
        noisy = [float(v) for v in private_label_histogram(counts, float(epsilon))]
        _write_private(path, json.dumps({"epsilon": epsilon, "num_samples": len(self.data), "histogram": noisy}))
        return noisy

    def _client_control(self, numel: int) -> torch.Tensor:
        """This client's SCAFFOLD variate c_i (zeros before its first round)."""
        path = self.state_dir / CONTROL_FILE
        if not path.is_file():
            return torch.zeros(numel)
        c = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
        if not isinstance(c, torch.Tensor) or c.shape != (numel,):
            raise SystemExit(f"error: {path} does not hold a variate for this model; delete it to start from zero")
        return c

    def _download(self, instr: TrainInstructions, job: int | None, round_number: int
                  ) -> tuple[torch.Tensor, ControlVariates | None]:
        """The global model to train from (downloaded only when its version changed) and SCAFFOLD's variates."""
        assert self.trainer is not None
        encrypted = bool(self.registration.get("encryption", True))
        numel = self.trainer.spec.numel
        if self.model_vector is not None and self.model_vector.numel() != numel * (2 if instr.scaffold else 1):
            self.model_etag = None  # the cached download has the other layout: fetch it again
        payload, etag = self._call(self.api.download_model, self.model_etag, encrypted, None if job is None else round_number)
        if payload is not None:
            self.model_vector, _ = wire.decode_update(payload, numel * (2 if instr.scaffold else 1), max_bytes=2**34)
            self.model_etag = etag
        assert self.model_vector is not None
        global_vector, control = self.model_vector[:numel], None
        if instr.scaffold:  # SCAFFOLD: the server variate c follows the model; c_i stays in the state dir
            control = ControlVariates(server=self.model_vector[numel:], client=self._client_control(numel))
        return global_vector, control

    def _train(self, what: str, round_number: int, instr: TrainInstructions, global_vector: torch.Tensor,
               control: ControlVariates | None, job: int | None = None) -> Any:
        assert self.trainer is not None and self.data is not None and self.api.creds is not None
        log.info("%s: training %d epoch(s) on %d samples", what, instr.epochs, len(self.data))
        # synchronous rounds: the server hears from this client while it trains (fl_client/heartbeat.py), so its
        # liveness drop tells a killed daemon from a slow one; an asynchronous poll may hand out a job, so none there
        heartbeat = self._heartbeat() if job is None else None
        try:
            with training_progress(self.trainer.model, instr, len(self.data), round_number=round_number,
                                   enabled=self.opts.progress):
                update = self.trainer.train(global_vector, self.data.x, self.data.y, instr,
                                            client_id=self.api.creds.client_id, control=control)
            if self.opts.train_delay > 0:
                self._sleep(self.opts.train_delay)  # --train-delay: a slower device (tests and demos)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
        seconds = update.metrics.get("seconds")
        if seconds is not None:  # (a masked round does not send it: the log is where an operator sees it)
            log.info("%s: local training took %.2f s", what, float(seconds))
        return update

    def _heartbeat(self) -> TrainingHeartbeat:
        """A started heartbeat with its own HTTP session and this daemon's current credentials."""
        opts = self.opts
        return TrainingHeartbeat(lambda: ServerApi(opts.server_url, timeout=opts.timeout, max_retries=0,
                                                   verify=opts.verify_tls, sleep=self._sleep,
                                                   stop=self.stop_event.is_set),
                                 lambda: self.api.creds, etag=self.round_etag, first_after=HEARTBEAT_FIRST_AFTER).start()

    def _save_control(self, control: ControlVariates | None, control_delta: torch.Tensor | None) -> None:
        """c_i moves only once the server holds (secure rounds: has applied) the update that used it."""
        if control is not None and control_delta is not None:
            buf = io.BytesIO()
            torch.save(updated_client_control(control.client, control_delta), buf)
            _write_private(self.state_dir / CONTROL_FILE, buf.getvalue())

    def _take_part(self, status: dict[str, Any]) -> None:
        assert self.trainer is not None and self.data is not None
        round_number = int(status["round"])  # asynchronous mode: the model version the job trains on
        job = status.get("job")
        what = f"round {round_number}" if job is None else f"job {job} (model version {round_number})"
        instr = TrainInstructions.from_json(status["instructions"])
        log.info("%s: selected; fetching the model", what)
        try:
            global_vector, control = self._download(instr, job, round_number)
        except ApiRefused as exc:
            if job is None or exc.status != 409:
                raise
            log.warning("%s: model download refused (%s); polling for another job", what, exc)
            return
        update = self._train(what, round_number, instr, global_vector, control, None if job is None else int(job))
        codec = make_codec(self.registration["codec"])
        rng = torch.Generator().manual_seed(instr.seed ^ 0x5EED)
        upload = update.delta if update.control_delta is None else torch.cat([update.delta, update.control_delta])
        compression = self.registration["wire_compression"]
        packed = pack_update(upload, codec, compression, rng=rng, error_feedback=self.error_feedback,
                             meta={"num_samples": update.num_samples, "metrics": update.metrics},
                             level=UPLOAD_ZSTD_LEVEL if compression == "zstd" else None)
        # one key per round (synchronous) or per job (asynchronous: several jobs may train on one version)
        key = f"{round_number}-{uuid.uuid4().hex}" if job is None else f"v{round_number}-j{int(job)}-{uuid.uuid4().hex}"
        next_control = None
        if control is not None and update.control_delta is not None:
            buf = io.BytesIO()
            torch.save(updated_client_control(control.client, update.control_delta), buf)
            next_control = buf.getvalue()
        # DP-SGD reports no training loss (it is not private): the log line says so rather than invent one
        loss = update.metrics.get("train_loss")
        self.pending = PendingUpload.for_status(
            status, key, packed.data, control=next_control,
            error_feedback=None if self.error_feedback is None else self.error_feedback.to_bytes(),
            summary={"train_loss": float(loss) if loss is not None else None})
        # A daemon restarted before the server holds the update sends it again from the state dir. The file (1.7 MB
        # for the cnn's int8 update, fsynced) is written while the upload is on its way instead of before it: a
        # daemon killed before the file is complete loses the update, as it would have a moment earlier while
        # encoding it; the file is complete before the upload's outcome is acted on (kept, dropped or retried).
        self._deliver_pending(keeping=_Keeping(self.pending, self.state_dir))

    # ------------------------------------------------------------------ a finished update until it counts
    def _load_pending(self) -> None:
        """After a restart: the update this daemon had finished but not delivered, if it may still count."""
        try:
            pending = PendingUpload.load(self.state_dir)
        except PendingFileError as exc:
            log.warning("%s: dropping it", exc)
            PendingUpload.discard(self.state_dir)
            return
        if pending is None:
            return
        self.pending = pending
        if pending.expired():
            self._drop_pending("its round's deadline has passed")
            return
        log.info("%s: holding an update finished before a restart (%d bytes); sending it if the server still expects it",
                 pending.what, len(pending.data))

    def _drop_pending(self, why: str) -> None:
        if self.pending is not None:
            log.warning("%s: dropping the finished update: %s", self.pending.what, why)
        self.pending = None
        PendingUpload.discard(self.state_dir)

    def _deliver_pending(self, keeping: _Keeping | None = None) -> None:
        """Upload the pending update until the server holds it (202, a duplicate included: the same key), refuses it
        (4xx: the round closed, this client is not in it, ...), or its round's deadline passes; while the server is
        unreachable, retry with backoff, each retry after checking (a poll) that the attempt still expects it. A stop
        keeps it in the state dir for the next start. On success the client-side state that depends on the server
        holding the update moves: the error-feedback residual and SCAFFOLD's variate. ``keeping``: the pending file
        being written meanwhile; it is complete before the first attempt's outcome is handled."""
        pending = self.pending
        assert pending is not None
        encrypted = bool(self.registration.get("encryption", True))
        wait = ServerWait(f"{pending.what}: upload", self._sleep, log, cap=UPLOAD_RETRY_CAP, clock=time.time)
        retry = False
        while True:
            try:
                if retry:  # the server was away: is this attempt still open for this update?
                    status = self._call(self.api.round_status)
                    if not pending.is_for(status):
                        wait.succeeded()
                        self._drop_pending(f"the server closed its round without it (now: state {status['state']}, "
                                           f"round {status.get('round')})")
                        return
                try:
                    result = self._call(self.api.upload_update, pending.round, pending.data, pending.key, encrypted)
                finally:
                    if keeping is not None:
                        keeping.join()
                        keeping = None
            except ApiRefused as exc:
                wait.succeeded()
                self._drop_pending(f"the server refused it ({exc})")
                return
            except ServerUnreachable as exc:
                retry = True
                if not wait.failed(exc, until=pending.give_up_at):
                    self._drop_pending("the server stayed unreachable until its round's deadline")
                    return
                if self.stop_event.is_set():  # (a stop during training still gets one try: "after the current step")
                    log.info("%s: stopping with the finished update kept in %s", pending.what, self.state_dir)
                    return
                continue
            wait.succeeded()
            break
        if pending.control is not None:  # c_i moves only once the server holds the update that used it
            _write_private(self.state_dir / CONTROL_FILE, pending.control)
        if pending.error_feedback is not None:
            _write_private(self.state_dir / "error_feedback.bin", pending.error_feedback)
            if self.trainer is not None and self.error_feedback is not None:
                self.error_feedback = ErrorFeedback.from_bytes(pending.error_feedback, self.trainer.spec)
        self.pending = None
        PendingUpload.discard(self.state_dir)
        self.rounds_done += 1
        self._save_state()
        loss = pending.summary.get("train_loss")
        extra = f", {result['status']} with staleness {result['staleness']}" if "staleness" in result else ""
        log.info("%s: update accepted (%d bytes, %s%s)%s", pending.what, len(pending.data),
                 f"train loss {loss:.4f}" if loss is not None else "no train loss reported under DP", extra,
                 " [retry of an accepted upload]" if result.get("duplicate") else "")

    def _take_part_secure(self, status: dict[str, Any]) -> bool:
        """Take part in the secure attempt of this poll (fl_client/secagg_session.py); False when there is
        nothing to do in it (already done, or selected too late to have keys for it), so the caller sleeps
        before polling again. Training runs in a background thread from the model's download on, so the key
        exchange (and the opening of the share bundle) overlaps it; the masked input is sent once both are done."""
        assert self.trainer is not None and self.data is not None and self.identity is not None
        block = status["secagg"]
        attempt, round_number = int(block["attempt"]), int(status["round"])
        if attempt in self._secagg_attempts:
            return False  # this attempt is done for this client: wait for the round to end
        self._secagg_attempts = ([*self._secagg_attempts, attempt])[-64:]
        if block.get("phase") != "advertise_keys":
            log.info("round %d: selected for secure attempt %d, but it is already in phase %s (this client's keys for it are "
                     "gone, e.g. after a restart): waiting for the next round", round_number, attempt, block.get("phase"))
            return False
        what = f"round {round_number}"
        instr = TrainInstructions.from_json(status["instructions"])
        encrypted = bool(self.registration.get("encryption", True))
        try:
            session = SecureRoundSession(self.api, self.identity, status, encrypted=encrypted, sleep=self._sleep,
                                         stop=self.stop_event.is_set, call=self._call,
                                         trusted_verify_keys=self.opts.secagg_trusted_keys)
        except (SessionEnded, SecAggError, ValueError) as exc:  # parameters this client refuses (e.g. unsafe threshold)
            log.warning("%s: cannot take part in secure attempt %d: %s", what, attempt, exc)
            return False
        log.info("%s: secure aggregation, attempt %d, index %d of %d (threshold %d)", what, attempt, session.index,
                 session.params.n, session.params.threshold)
        trained: dict[str, Any] = {}
        worker: list[threading.Thread] = []

        def start_training() -> None:
            """Before the advertisement: download in this thread, train in another while keys are exchanged. The
            download first: the key exchange's phases end long before training does, so the advertisement's round
            trip is taken off the time from the round's opening to the start of training."""
            try:
                global_vector, control = self._download(instr, None, round_number)
            except (ApiRefused, ServerUnreachable) as exc:
                trained["error"] = exc  # make_input ends the session with it
                return
            trained["control"] = control

            def work() -> None:
                try:
                    trained["update"] = self._train(what, round_number, instr, global_vector, control)
                except Exception as exc:
                    trained["error"] = exc

            worker.append(threading.Thread(target=work, name="fl-local-training", daemon=True))
            worker[0].start()

        def make_input() -> tuple[Any, dict[str, float]]:
            while worker and worker[0].is_alive():
                if self.stop_event.is_set():
                    raise SessionEnded("stopped during local training")
                worker[0].join(timeout=0.2)
            if "update" not in trained:
                raise SessionEnded(f"local training failed: {type(trained.get('error')).__name__}")
            update = trained["update"]
            return plain_input(session.params, update.delta, update.num_samples, update.metrics, update.control_delta), \
                update.metrics

        delay = self.opts.secagg_unmask_delay
        start_training()
        result = session.run(make_input, before_unmask=(lambda: self._sleep(delay)) if delay > 0 else None)
        self._join_training(worker)
        update = trained.get("update")
        if result.masked_sent:
            self.rounds_done += 1
            self._save_state()
        if result.in_sum and update is not None:
            self._save_control(trained.get("control"), update.control_delta)
        if result.state == "closed":
            log.info("%s: secure round closed%s", what, " with this client's input in the sum" if result.in_sum else
                     " without this client's input")
        else:
            log.warning("%s: secure attempt %d ended for this client: %s%s", what, attempt, result.state,
                        f" ({result.reason})" if result.reason else "")
        return True

    def _take_part_ckks(self, status: dict[str, Any]) -> bool:
        """Take part in the CKKS attempt of this poll (fl_client/ckks_session.py); False when there is nothing to do
        in it (already done, or past the phases this client can still join), so the caller sleeps before polling."""
        block = status["secagg"]
        attempt, round_number = int(block["attempt"]), int(status["round"])
        if attempt in self._secagg_attempts:
            return False
        self._secagg_attempts = ([*self._secagg_attempts, attempt])[-64:]
        if block.get("phase") not in ("public_key", "inputs"):
            log.info("round %d: selected for CKKS attempt %d, but it is already in phase %s: waiting for the next round",
                     round_number, attempt, block.get("phase"))
            return False
        what = f"round {round_number}"
        instr = TrainInstructions.from_json(status["instructions"])
        # imported at the first CKKS round, not at start-up: most daemons never take part in one (the HE stack costs
        # ~0.1 s of every daemon's start otherwise; benchmarks/results/fast_rounds/startup.md)
        from fl_client.ckks_session import CKKSRoundSession, CKKSSessionEnded

        try:
            session = CKKSRoundSession(self.api, status, encrypted=bool(self.registration.get("encryption", True)),
                                       sleep=self._sleep, stop=self.stop_event.is_set, call=self._call)
        except (CKKSSessionEnded, ValueError) as exc:
            log.warning("%s: cannot take part in CKKS attempt %d: %s", what, attempt, exc)
            return False
        log.info("%s: CKKS aggregation, attempt %d%s", what, attempt, " (this client decrypts the sum)" if session.decryptor else "")

        def make_update() -> tuple[Any, int, dict[str, float]]:
            try:
                global_vector, control = self._download(instr, None, round_number)
            except (ApiRefused, ServerUnreachable) as exc:
                raise CKKSSessionEnded(f"model download failed ({exc})") from None
            update = self._train(what, round_number, instr, global_vector, control)
            return update.delta.detach().cpu().numpy(), update.num_samples, update.metrics

        result = session.run(make_update)
        if result.input_sent:
            self.rounds_done += 1
            self._save_state()
        log.info("%s: CKKS attempt %d %s%s", what, attempt, result.state,
                 " with this client's input in the sum" if result.in_sum else f" ({result.reason})" if result.reason else "")
        return True

    def _join_training(self, worker: list[threading.Thread]) -> None:
        """Wait for a training thread that outlived its session (the attempt ended before the masked input,
        e.g. a refused roster): the next round must not train the same model in a second thread."""
        while worker and worker[0].is_alive() and not self.stop_event.is_set():
            worker[0].join(timeout=0.2)
