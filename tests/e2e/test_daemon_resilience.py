"""A client daemon (``python -m fl_client``) rides out a server that is down: at its first registration, and
between finishing its training and uploading it (issue 16, defects 5 and 9). Real gunicorn server and real
daemon processes on loopback; what happened is read from the daemon's log and the server's records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fl_client.pending import PENDING_FILE
from fl_common.protocol.rest import ENV_ADMIN_TOKEN
from fl_server.rest.demo import free_port
from tests.e2e.harness import GunicornServer, make_cfg, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")

#: one client, one small round: what is tested is the daemon's waiting, not the learning
TINY = {"num_clients": 1, "num_rounds": 1, "max_train_samples": 500, "max_test_samples": 200}


def start_daemon(url: str, env: dict[str, str], state: Path, name: str, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fl_client", "--server-url", url, "--client-id", name, "--state-dir", str(state / name),
           "--threads", "1", "--no-progress", *extra]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def logged(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text) if log.is_file() else 0


def finished(server: GunicornServer) -> dict:
    return wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)


def participation(server: GunicornServer, env: dict[str, str]) -> list[int]:
    admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
    table = requests.get(f"{server.url}/api/v1/clients", headers=admin, timeout=10).json()["clients"]
    return [int(c["rounds_participated"]) for c in table]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_daemon_waiting_for_its_first_registration_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    env = token_env()
    log = tmp_path / "d.log"
    daemon = start_daemon(f"http://127.0.0.1:{free_port()}", env, tmp_path, "lonely", log)  # nothing listens there
    try:
        wait_for(lambda: logged(log, "registration: server unreachable"), timeout=120)
        assert daemon.poll() is None, "the daemon must wait for its server, not exit"
        daemon.send_signal(sig)
        assert daemon.wait(timeout=60) == 0
        text = log.read_text()
        assert "Traceback" not in text and "stopped" in text
    finally:
        if daemon.poll() is None:
            daemon.kill()


@pytest.mark.slow
def test_a_daemon_started_before_its_server_registers_once_it_is_up_and_trains(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(**TINY), tmp_path / "srv", env)  # its port is chosen, nothing listens yet
    log = tmp_path / "early.log"
    daemon = start_daemon(server.url, env, tmp_path, "early", log)
    try:
        wait_for(lambda: logged(log, "registration: server unreachable"), timeout=120)
        assert daemon.poll() is None, "the daemon must wait for its server, not exit"
        server.start()
        status = finished(server)
        assert daemon.wait(timeout=120) == 0
        assert status["completed_rounds"] == 1 and status["clients"]["registered"] == 1
        assert status["history"][0]["clients"] == 1
        assert logged(log, "registration: server unreachable") == 1, "one line per outage, not one per try"
        assert logged(log, "registration: server reachable again") == 1
        assert logged(log, "round 1: update accepted") == 1
        assert "Traceback" not in log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        server.stop()


@pytest.mark.slow
def test_an_update_finished_while_the_server_restarts_is_delivered_not_retrained(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(**TINY), tmp_path / "srv", env)
    server.start()
    log = tmp_path / "keeper.log"
    # --train-delay: the daemon holds its finished update a few seconds before uploading it, while the server is down
    daemon = start_daemon(server.url, env, tmp_path, "keeper", log, "--train-delay", "3")
    try:
        wait_for(lambda: logged(log, "round 1: training"), timeout=240, interval=0.05)
        server.kill9()
        wait_for(lambda: logged(log, "round 1: upload: server unreachable"), timeout=120)
        assert (tmp_path / "keeper" / PENDING_FILE).is_file(), "the finished update must be kept in the state dir"
        server.start()  # same state dir, same port
        status = finished(server)
        assert daemon.wait(timeout=120) == 0
        assert status["completed_rounds"] == 1 and status["history"][0]["clients"] == 1
        assert participation(server, env) == [1], "the server must count the update once"
        assert logged(log, "round 1: training") == 1, "the round must not be trained twice"
        assert logged(log, "round 1: update accepted") == 1
        assert logged(log, "round 1: upload: server reachable again") == 1
        assert logged(log, "dropping the finished update") == 0
        assert not (tmp_path / "keeper" / PENDING_FILE).exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        server.stop()


@pytest.mark.slow
def test_a_daemon_killed_with_an_undelivered_update_sends_it_after_its_restart(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(**TINY), tmp_path / "srv", env)
    server.start()
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    daemon = start_daemon(server.url, env, tmp_path, "phoenix", first, "--train-delay", "3")
    try:
        wait_for(lambda: logged(first, "round 1: training"), timeout=240, interval=0.05)
        server.kill9()
        wait_for(lambda: logged(first, "round 1: upload: server unreachable"), timeout=120)
        daemon.kill()  # SIGKILL: nothing is flushed but what is already in the state dir
        daemon.wait(timeout=30)
        assert (tmp_path / "phoenix" / PENDING_FILE).is_file()
        server.start()
        daemon = start_daemon(server.url, env, tmp_path, "phoenix", second)
        status = finished(server)
        assert daemon.wait(timeout=120) == 0
        assert status["completed_rounds"] == 1 and status["history"][0]["clients"] == 1
        assert participation(server, env) == [1]
        assert logged(second, "round 1: holding an update finished before a restart") == 1
        assert logged(second, "round 1: training") == 0, "the restarted daemon must send the kept update, not retrain"
        assert logged(second, "round 1: update accepted") == 1
        assert not (tmp_path / "phoenix" / PENDING_FILE).exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        server.stop()
