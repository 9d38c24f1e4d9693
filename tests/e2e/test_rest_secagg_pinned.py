"""Pinned Ed25519 verifying keys over REST: real gunicorn server, real daemons.

The operator's workflow as the README gives it: ``python -m fl_client --print-verify-key`` in each
client's state dir (which makes the identity the daemon then signs with), the lines collected into
one file, each daemon started with ``--secagg-trusted-keys FILE``. What must hold: with every key
pinned the secure rounds complete as without pinning; a daemon whose file lacks a peer's key refuses
each roster that carries it, says so in its log, is counted dropped in the key-sharing phase, keeps
running, and the round completes with the others when the threshold allows.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_client.daemon import ClientDaemon, DaemonOptions
from fl_client.trusted_keys import IDENTITY_FILE, load_or_create_identity
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from fl_common.secagg import SigningIdentity
from tests.e2e.harness import GunicornServer, make_cfg, threaded_server, token_env, wait_for
from tests.e2e.test_rest_daemons import shutdown, start_client

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent


def print_verify_keys(tmp_path: Path, names: list[str]) -> dict[str, str]:
    """Each client's pinned-keys line, made by the CLI in the state dir its daemon will use (``start_client``'s)."""
    lines = {}
    for name in names:
        out = subprocess.run([sys.executable, "-m", "fl_client", "--print-verify-key", "--state-dir", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.count("\n") == 1 and out.split()[1] == str(tmp_path / name), out
        lines[name] = out
    return lines


def pinned_file(path: Path, lines: list[str]) -> Path:
    path.write_text("# pinned secure-aggregation keys\n" + "".join(lines), encoding="utf-8")
    return path


def log_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")


@pytest.mark.slow
def test_daemons_with_every_key_pinned_run_secure_rounds(tmp_path: Path) -> None:
    names = [f"d{i}" for i in range(3)]
    lines = print_verify_keys(tmp_path, names)
    keys = pinned_file(tmp_path / "keys.txt", list(lines.values()))
    env = token_env()
    cfg = make_cfg(num_clients=3, num_rounds=1, secure_aggregation=True, secagg_phase_timeout=20.0)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    clients: list[subprocess.Popen] = []
    try:
        clients = [start_client(server, env, n, tmp_path, "--secagg-trusted-keys", str(keys)) for n in names]
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)
        assert all(c.wait(timeout=120) == 0 for c in clients)
        assert [r["clients"] for r in status["history"]] == [3], status["history"]
        assert status["secagg"]["rounds_completed"] == 1 and status["secagg"]["aborted_attempts"] == 0
        assert sum(status["secagg"]["dropouts_by_phase"].values()) == 0
        for n in names:
            text = log_of(tmp_path, n)
            assert f"secure aggregation: 3 pinned verifying keys from {keys}" in text
            assert "secure round closed with this client's input in the sum" in text
            assert "refusing the roster" not in text
            # the daemon signed with the identity --print-verify-key made (it did not make another one)
            identity = SigningIdentity.ed25519((tmp_path / n / IDENTITY_FILE).read_bytes())
            assert lines[n].startswith(identity.verify_key.hex())
            assert lines[n].split()[0] not in text  # key bytes are never logged
    finally:
        shutdown(server, clients)


@pytest.mark.slow
def test_a_daemon_missing_a_peers_key_refuses_each_roster_and_the_others_complete(tmp_path: Path) -> None:
    """Four daemons; d3's file lacks d0's key. n = 4 gives a complete graph with threshold t = 3
    (fl_common/secagg/planning.py), so the three others still hold t shares each and the rounds complete
    with them; min_clients = 3 lets the server close with three masked inputs."""
    names = [f"d{i}" for i in range(4)]
    lines = print_verify_keys(tmp_path, names)
    everyone = pinned_file(tmp_path / "keys.txt", list(lines.values()))
    partial = pinned_file(tmp_path / "keys-without-d0.txt", [lines[n] for n in names[1:]])
    env = token_env()
    cfg = make_cfg(num_clients=4, num_rounds=2, secure_aggregation=True, secagg_phase_timeout=10.0, min_clients=3,
                   round_start_wait=120.0)  # round 1 waits for all four daemons to be live
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    clients: list[subprocess.Popen] = []
    try:
        clients = [start_client(server, env, n, tmp_path, "--secagg-trusted-keys", str(everyone)) for n in names[:3]]
        clients.append(start_client(server, env, "d3", tmp_path, "--secagg-trusted-keys", str(partial)))
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=360)
        # d3 stayed up through both refusals and exits like the others when the federation finishes
        assert [c.wait(timeout=120) for c in clients] == [0, 0, 0, 0]
        assert [r["clients"] for r in status["history"]] == [3, 3], status["history"]
        assert status["secagg"]["rounds_completed"] == 2 and status["secagg"]["aborted_attempts"] == 0
        assert status["secagg"]["dropouts_by_phase"] == {"share_keys": 2}, status["secagg"]
        refusing = log_of(tmp_path, "d3")
        assert "secure aggregation: 3 pinned verifying keys from" in refusing
        refusals = re.findall(r"round (\d+): refusing the roster of secure attempt \d+ \(bad_roster_signature\): no trusted "
                              r"verifying key for client \d+", refusing)
        assert refusals == ["1", "2"], refusing
        assert "secure round closed" not in refusing and lines["d0"].split()[0] not in refusing
        for n in names[:3]:
            text = log_of(tmp_path, n)
            assert text.count("secure round closed with this client's input in the sum") == 2, text
            assert "refusing the roster" not in text
    finally:
        shutdown(server, clients)


def test_a_key_made_by_print_verify_key_after_registration_is_registered_by_the_daemon(tmp_path: Path) -> None:
    """The identity file deleted and a new one made by ``--print-verify-key`` (the operator pins *that* key):
    the daemon sees that its credentials recorded another key and registers again, so the server ships the
    pinned key in its rosters rather than the stale one."""
    env = token_env()
    with threaded_server(make_cfg(num_clients=3, secure_aggregation=True), tmp_path / "srv", env) as (url, service):
        def registered(state: Path) -> tuple[str, bytes]:
            daemon = ClientDaemon(DaemonOptions(server_url=url, state_dir=state, enrollment_token=env[ENV_ENROLLMENT_TOKEN],
                                                client_name="alice"))
            daemon._load_or_register()
            assert daemon.api.creds is not None
            cid = daemon.api.creds.client_id
            return cid, base64.urlsafe_b64decode(service.store.secagg_verify_key(cid) + "==")

        state = tmp_path / "alice"
        cid, first = registered(state)
        assert first == load_or_create_identity(state)[0].verify_key
        assert registered(state) == (cid, first)  # a restart with the same key keeps its credentials
        (state / IDENTITY_FILE).unlink()
        new_key = load_or_create_identity(state)[0].verify_key  # what --print-verify-key does
        cid2, second = registered(state)
        assert second == new_key != first and cid2 == cid
