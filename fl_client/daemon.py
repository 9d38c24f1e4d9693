"""The client daemon: register once, then poll, train when selected, upload, repeat.

State that must survive a restart lives in ``--state-dir``: credentials (0600), the data
assignment, the last model version and its bytes, the codec's error-feedback residual and the
idempotency key of an upload in flight. A daemon killed after training but before the server
acknowledged its upload resends the same key, which the server counts once.

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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from fl_client.api import ApiRefused, Credentials, ServerApi, ServerUnreachable
from fl_client.progress import training_progress
from fl_common.data import ArrayDataset, load_dataset
from fl_common.data.assignment import training_subset
from fl_common.data.partition import client_partition
from fl_common.models import create_model
from fl_common.protocol import TrainInstructions
from fl_common.protocol.rest import ROUND_FINISHED, ROUND_SELECTED
from fl_common.tensors import wire
from fl_common.tensors.codecs import make_codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.tensors.pipeline import pack_update
from fl_common.training import LocalTrainer
from fl_common.training.scaffold import ControlVariates, updated_client_control

log = logging.getLogger("fl_client")


@dataclass
class DaemonOptions:
    server_url: str
    state_dir: Path
    enrollment_token: Optional[str] = None
    client_name: Optional[str] = None
    partition: Optional[int] = None  # None = server assigns ("auto")
    data_dir: Optional[str] = None
    timeout: float = 30.0
    max_retries: int = 3
    max_rounds: Optional[int] = None  # stop after taking part in this many rounds
    threads: int = 1
    capability: dict[str, float] = field(default_factory=dict)
    verify_tls: bool | str = True
    progress: Optional[bool] = None  # local-training progress bar: None = only when stderr is a terminal


#: where a SCAFFOLD client keeps its control variate c_i between rounds
CONTROL_FILE = "scaffold_control.pt"


def _write_private(path: Path, data: str | bytes) -> None:
    """Atomic, fsynced, owner-only write: state files hold keys and training residue."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.trainer: Optional[LocalTrainer] = None
        self.data: Optional[ArrayDataset] = None
        self.model_etag: Optional[str] = None
        self.model_vector: Optional[torch.Tensor] = None
        self.rounds_done = 0
        self.error_feedback: Optional[ErrorFeedback] = None

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
        assert self.api.creds is not None
        _write_private(self._creds_path, json.dumps({"credentials": self.api.creds.to_json(), "registration": self.registration,
                                                     "rounds_done": self.rounds_done}))

    def _load_or_register(self) -> None:
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
        self.registration = self.api.register(token, client_name=self.opts.client_name, partition=self.opts.partition,
                                              num_samples=None, capability=self.opts.capability)
        self.registration.pop("session_token", None)  # kept only inside the credentials
        self._save_state()
        log.info("registered as %s (partition %s)", self.registration["client_id"],
                 (self.registration.get("data") or {}).get("partition_index"))

    def _prepare_training(self) -> None:
        reg = self.registration
        assignment = reg.get("data")
        if not assignment:
            raise SystemExit("error: the server assigned no data partition to this client")
        torch.set_num_threads(self.opts.threads)
        train = load_dataset(assignment["dataset"], "train", data_dir=self.opts.data_dir, seed=assignment["seed"])
        train = training_subset(train, assignment["seed"], assignment.get("max_train_samples"))
        idx = client_partition(train.y.numpy(), assignment["num_clients"], assignment["partition_index"], assignment["method"],
                               seed=assignment["seed"], alpha=assignment["alpha"],
                               samples_per_client=assignment["samples_per_client"],
                               shards_per_client=assignment["shards_per_client"])
        self.data = train.subset(idx)
        m = reg["model"]
        model = create_model(m["model_type"], tuple(m["input_shape"]), m["num_classes"], hidden_size=m["hidden_size"],
                             resnet_norm=m["resnet_norm"], custom_model=m["custom_model"], seed=m["seed"])
        self.trainer = LocalTrainer(model)
        ef_path = self.state_dir / "error_feedback.bin"
        if make_codec(reg["codec"]).biased:
            self.error_feedback = (ErrorFeedback.from_bytes(ef_path.read_bytes(), self.trainer.spec) if ef_path.is_file()
                                   else ErrorFeedback(self.trainer.spec))
        log.info("holding %d training samples of %s (partition %d of %d)", len(self.data), assignment["dataset"],
                 assignment["partition_index"], assignment["num_clients"])

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        try:
            self._load_or_register()
            self._prepare_training()
            while not self.stop_event.is_set():
                if self.opts.max_rounds is not None and self.rounds_done >= self.opts.max_rounds:
                    log.info("took part in %d round(s): done", self.rounds_done)
                    return 0
                try:
                    status = self._call(self.api.round_status)
                except ServerUnreachable as exc:
                    log.warning("server unreachable (%s); retrying", exc)
                    self._sleep(5.0 * (0.5 + random.random()))
                    continue
                if status["state"] == ROUND_FINISHED:
                    log.info("the federation has finished; exiting")
                    return 0
                if status["state"] == ROUND_SELECTED:
                    self._take_part(status)
                    continue
                interval = float(status.get("poll_after") or self.registration.get("poll_interval", 2.0))
                self._sleep(interval * (0.75 + 0.5 * random.random()))  # jitter keeps clients from polling in lockstep
            log.info("stopped")
            return 0
        except ApiRefused as exc:
            log.error("the server refused this client: %s", exc)
            return 1

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

    def _client_control(self, numel: int) -> torch.Tensor:
        """This client's SCAFFOLD variate c_i (zeros before its first round)."""
        path = self.state_dir / CONTROL_FILE
        if not path.is_file():
            return torch.zeros(numel)
        c = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
        if not isinstance(c, torch.Tensor) or c.shape != (numel,):
            raise SystemExit(f"error: {path} does not hold a variate for this model; delete it to start from zero")
        return c

    def _take_part(self, status: dict[str, Any]) -> None:
        assert self.trainer is not None and self.data is not None
        round_number = int(status["round"])
        instr = TrainInstructions.from_json(status["instructions"])
        encrypted = bool(self.registration.get("encryption", True))
        numel = self.trainer.spec.numel
        if self.model_vector is not None and self.model_vector.numel() != numel * (2 if instr.scaffold else 1):
            self.model_etag = None  # the cached download has the other layout: fetch it again
        payload, etag = self._call(self.api.download_model, self.model_etag, encrypted)
        if payload is not None:
            self.model_vector, _ = wire.decode_update(payload, numel * (2 if instr.scaffold else 1), max_bytes=2**34)
            self.model_etag = etag
        assert self.model_vector is not None
        global_vector, control = self.model_vector[:numel], None
        if instr.scaffold:  # SCAFFOLD: the server variate c follows the model; c_i stays in the state dir
            control = ControlVariates(server=self.model_vector[numel:], client=self._client_control(numel))
        log.info("round %d: training %d epoch(s) on %d samples", round_number, instr.epochs, len(self.data))
        with training_progress(self.trainer.model, instr, len(self.data), round_number=round_number, enabled=self.opts.progress):
            update = self.trainer.train(global_vector, self.data.x, self.data.y, instr, client_id=self.api.creds.client_id,
                                        control=control)
        codec = make_codec(self.registration["codec"])
        rng = torch.Generator().manual_seed(instr.seed ^ 0x5EED)
        upload = update.delta if update.control_delta is None else torch.cat([update.delta, update.control_delta])
        packed = pack_update(upload, codec, self.registration["wire_compression"], rng=rng,
                             error_feedback=self.error_feedback,
                             meta={"num_samples": update.num_samples, "metrics": update.metrics})
        key_path = self.state_dir / f"pending-r{round_number}.key"
        key = key_path.read_text().strip() if key_path.is_file() else f"{round_number}-{uuid.uuid4().hex}"
        _write_private(key_path, key)
        try:
            result = self._call(self.api.upload_update, round_number, packed.data, key, encrypted)
        except ApiRefused as exc:
            log.warning("round %d: update refused (%s)", round_number, exc)
            key_path.unlink(missing_ok=True)
            return
        except ServerUnreachable as exc:
            log.warning("round %d: upload failed (%s); the round may close without this update", round_number, exc)
            return
        key_path.unlink(missing_ok=True)
        if control is not None and update.control_delta is not None:
            # c_i moves only once the server holds the update that used it (a refused upload leaves it)
            buf = io.BytesIO()
            torch.save(updated_client_control(control.client, update.control_delta), buf)
            _write_private(self.state_dir / CONTROL_FILE, buf.getvalue())
        if self.error_feedback is not None:
            _write_private(self.state_dir / "error_feedback.bin", self.error_feedback.to_bytes())
        self.rounds_done += 1
        self._save_state()
        # DP-SGD reports no training loss (it is not private); say so rather than invent one
        loss = update.metrics.get("train_loss")
        log.info("round %d: update accepted (%d bytes, %s)%s", round_number, len(packed.data),
                 f"train loss {loss:.4f}" if loss is not None else "no train loss reported under DP",
                 " [retry of an accepted upload]" if result.get("duplicate") else "")
