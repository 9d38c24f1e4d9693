"""Real client daemon processes against a real gunicorn server on loopback."""

from __future__ import annotations

import csv
import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
from tests.e2e.harness import GunicornServer, ScriptedClient, make_cfg, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")


def start_client(server: GunicornServer, env: dict, name: str, state: Path, *extra: str, verify: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fl_client", "--server-url", server.url, "--client-id", name, "--state-dir", str(state / name),
           "--threads", "1", *extra]
    if verify:
        cmd += ["--ca-cert", verify]
    log = open(state / f"{name}.log", "ab")
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def shutdown(server: GunicornServer, clients: list[subprocess.Popen]) -> None:
    """Kill whatever a failed test left running: daemons first, then the server."""
    for c in clients:
        if c.poll() is None:
            c.kill()
    server.stop()


@pytest.mark.slow
def test_daemons_train_a_federation_and_survive_a_restart(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(num_clients=4, num_rounds=3), tmp_path / "srv", env)
    server.start()
    clients = []
    try:
        clients = [start_client(server, env, f"d{i}", tmp_path) for i in range(4)]
        wait_for(lambda: server.status()["completed_rounds"] >= 1, timeout=240)
        # restart one daemon: it must reuse its stored credentials, not register again
        clients[0].send_signal(signal.SIGTERM)
        assert clients[0].wait(timeout=60) == 0
        clients[0] = start_client(server, env, "d0", tmp_path)
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)
        for c in clients:
            assert c.wait(timeout=120) == 0, "a daemon did not exit cleanly when the federation finished"
        assert status["completed_rounds"] == 3 and status["accuracy"] > 0.5
        assert status["clients"]["registered"] == 4
        with open(tmp_path / "srv" / "run" / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["round"]) for r in rows] == [1, 2, 3]
        assert all(int(r["bytes"]) > 0 for r in rows)
        assert (tmp_path / "d1" / "credentials.json").stat().st_mode & 0o077 == 0, "credentials must be private"
        admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
        table = requests.get(f"{server.url}/api/v1/clients", headers=admin, timeout=10).json()["clients"]
        assert sorted(c["partition"] for c in table) == [0, 1, 2, 3]
        assert sum(c["rounds_participated"] for c in table) == 12
    finally:
        shutdown(server, clients)


@pytest.mark.slow
def test_two_of_ten_clients_killed_mid_round(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=10, num_rounds=2, model_type="cnn", samples_per_client=200, max_train_samples=None,
                   min_clients=6, round_timeout=40.0, client_liveness=6.0, round_start_wait=8.0, max_test_samples=500)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    clients = []
    try:
        clients = [start_client(server, env, f"k{i}", tmp_path) for i in range(10)]
        opened = wait_for(lambda: (server.status().get("current_round") or {}).get("round") == 1 and server.status(),
                          timeout=240, interval=0.05)
        for victim in clients[:2]:
            victim.kill()
        assert opened["current_round"]["selected"] == 10, "all ten clients must be in round 1 before two are killed"
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)
        assert status["completed_rounds"] == 2
        rounds = status["history"]
        assert rounds[0]["clients"] == 8, "round 1 must close at its deadline with the 8 survivors"
        assert rounds[1]["clients"] == 8
        admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
        table = requests.get(f"{server.url}/api/v1/clients", headers=admin, timeout=10).json()["clients"]
        assert sum(c["dropped"] for c in table) == 2
    finally:
        shutdown(server, clients)


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.slow
def test_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    env = token_env()
    server = GunicornServer(make_cfg(num_clients=2, client_selection_ratio=0.5, num_rounds=1), tmp_path / "srv", env,
                            certfile=cert, keyfile=key)
    server.start(verify=cert)
    clients: list[subprocess.Popen] = []
    try:
        assert server.url.startswith("https://")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{server.url}/health", timeout=10)  # an unknown certificate is refused by default
        client = start_client(server, env, "tls0", tmp_path, verify=cert)
        clients.append(client)
        status = wait_for(lambda: (s := server.status(verify=cert))["state"] == "finished" and s, timeout=240)
        assert client.wait(timeout=60) == 0 and status["completed_rounds"] == 1
        scripted = ScriptedClient(server.url, env[ENV_ENROLLMENT_TOKEN], "tls-scripted", verify=cert)
        assert scripted.status()["state"] == "finished"
    finally:
        shutdown(server, clients)


@pytest.mark.slow
def test_topk_daemons_keep_their_error_feedback(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(num_clients=2, num_rounds=2, codec="topk:0.05"), tmp_path / "srv", env)
    server.start()
    clients: list[subprocess.Popen] = []
    try:
        clients += [start_client(server, env, f"t{i}", tmp_path) for i in range(2)]
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=240)
        assert all(c.wait(timeout=60) == 0 for c in clients)
        assert status["codec"] == "topk:0.05"
        for i in range(2):
            residual = tmp_path / f"t{i}" / "error_feedback.bin"
            assert residual.is_file() and residual.stat().st_size > 0
            assert residual.stat().st_mode & 0o077 == 0
        # every round carried traffic (downloads + top-k uploads) and was recorded
        rows = status["history"]
        assert all(r["bytes"] > 0 for r in rows)
    finally:
        shutdown(server, clients)


@pytest.mark.slow
def test_daemons_ride_out_a_server_kill_9(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(num_clients=2, num_rounds=3), tmp_path / "srv", env)
    server.start()
    clients = []
    try:
        clients = [start_client(server, env, f"r{i}", tmp_path) for i in range(2)]
        wait_for(lambda: server.status()["completed_rounds"] >= 1, timeout=240)
        server.kill9()
        server.start()  # same port, same state dir: the daemons keep polling and carry on
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)
        assert status["completed_rounds"] == 3 and status["clients"]["registered"] == 2
        assert all(c.wait(timeout=120) == 0 for c in clients)
    finally:
        shutdown(server, clients)
