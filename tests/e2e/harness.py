"""Real servers on loopback for the end-to-end tests: the Flask app in a thread (werkzeug's
threaded server) or ``python -m fl_server serve`` (gunicorn) in a subprocess, plus a scripted
client built on the real ``fl_client.api.ServerApi`` for tests that must control every byte."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import torch
from werkzeug.serving import make_server

from fl_client.api import ServerApi
from fl_common.config import FLConfig, config_from_dict, dump_config
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
from fl_common.tensors import wire
from fl_server.rest.app import create_app
from fl_server.rest.demo import free_port, wait_healthy
from fl_server.rest.secrets import ENV_SERVER_SECRET, ServerSecrets
from fl_server.rest.service import FederationService

#: A small federation: real Fashion-MNIST subset, a small MLP, short timeouts.
REST_BASE: dict[str, Any] = {
    "dataset": "fashion_mnist", "model_type": "mlp", "hidden_size": 64, "num_clients": 4, "client_selection_ratio": 1.0,
    "num_rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "momentum": 0.9,
    "max_train_samples": 2000, "max_test_samples": 1000, "differential_privacy": False, "secure_aggregation": False,
    "compression": True, "codec": "int8", "encryption": True, "poll_interval": 0.2, "round_timeout": 120.0,
    "over_selection": 0.0, "client_liveness": 60.0, "seed": 3,
}


def make_cfg(**overrides: Any) -> FLConfig:
    return config_from_dict({**REST_BASE, **overrides})


def token_env() -> dict[str, str]:
    return {ENV_ENROLLMENT_TOKEN: secrets.token_urlsafe(24), ENV_ADMIN_TOKEN: secrets.token_urlsafe(24),
            ENV_SERVER_SECRET: secrets.token_urlsafe(32)}


@contextmanager
def threaded_server(cfg: FLConfig, state_dir: Path, env: dict[str, str], clock: Any = time.time,
                    tls: tuple[str, str] | None = None) -> Iterator[tuple[str, FederationService]]:
    """``tls``: (certificate, key) PEM files: the server speaks https (the URL says so)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        service = FederationService(cfg, state_dir, secrets_=ServerSecrets.load(state_dir), clock=clock)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    app = create_app(service)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=tls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}", service
    finally:
        server.shutdown()
        service.close()


class GunicornServer:
    """``python -m fl_server serve`` as a child process that a test can kill -9 and restart."""

    def __init__(self, cfg: FLConfig, state_dir: Path, env: dict[str, str], *, certfile: str | None = None,
                 keyfile: str | None = None) -> None:
        self.state_dir = state_dir
        self.env = {**os.environ, **env}
        self.port = free_port()
        self.scheme = "https" if certfile else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.config_path = state_dir.parent / f"{state_dir.name}-config.yaml"
        state_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.config_path)
        self.tls = ["--certfile", certfile, "--keyfile", keyfile] if certfile and keyfile else []
        self.proc: subprocess.Popen | None = None
        self.log = state_dir.parent / f"{state_dir.name}-server.log"

    def start(self, verify: bool | str = True) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fl_server", "serve", "--config", str(self.config_path),
                                      "--state-dir", str(self.state_dir), "--port", str(self.port), "--threads", "4", *self.tls],
                                     env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc, verify=verify)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def status(self, verify: bool | str = True) -> dict[str, Any]:
        return requests.get(f"{self.url}/status", timeout=10, verify=verify).json()


class ScriptedClient:
    """A registered client whose uploads the test chooses (real HTTP, real signing and encryption)."""

    def __init__(self, url: str, enrollment: str, name: str, **kw: Any) -> None:
        self.api = ServerApi(url, timeout=30, max_retries=1, **kw)
        self.reg = self.api.register(enrollment, client_name=name, partition=None, num_samples=None, capability={})
        self.id = self.reg["client_id"]

    def status(self) -> dict[str, Any]:
        return self.api.round_status()

    def upload(self, round_number: int, vector: torch.Tensor, num_samples: int = 10, key: str | None = None,
               meta: dict[str, Any] | None = None) -> dict[str, Any]:
        packed = wire.encode_update(vector, "none", "zstd", meta=meta or {"num_samples": num_samples, "metrics": {"train_loss": 1.0}})
        return self.api.upload_update(round_number, packed, key or f"k-{round_number}-{self.id}", encrypted=True)

    def global_vector(self, numel: int) -> torch.Tensor:
        payload, _ = self.api.download_model(None, encrypted=True)
        assert payload is not None
        vec, _ = wire.decode_update(payload, numel)
        return vec


def wait_for(predicate: Any, timeout: float = 120.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
