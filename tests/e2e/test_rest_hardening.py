"""A malicious-but-enrolled client, a hostile network and a bad day, against a real server on loopback.

Each test is one defect of the outside probe (issue 16): it failed before the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from fl_client.api import ApiRefused, ServerApi
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN, PATH_REGISTER
from fl_common.tensors import wire
from fl_server.rest.json_provider import NON_FINITE_KEY, finite_json
from tests.e2e.harness import ScriptedClient, threaded_server, token_env, wait_for
from tests.e2e.scripted_rounds import register, status, tiny_cfg


def admin(url: str, env: dict[str, str], method: str, path: str, body: dict | None = None) -> requests.Response:
    return requests.request(method, url + path, json=body, timeout=10,
                            headers={"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"})


def test_a_non_finite_aggregate_aborts_the_attempt_and_the_run_goes_on(tmp_path: Path) -> None:
    """One client's huge update made the server step non-finite: before, the ticker raised every 0.5 s
    forever and the round never closed; now the attempt is aborted with nothing applied, the sender
    is named in the audit log and left out, and the next attempt closes."""
    env = token_env()
    cfg = tiny_cfg(num_clients=3, num_rounds=1, min_clients=2, server_learning_rate=10.0, round_start_wait=0.5)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = register(url, env, 3)
        numel = service.coordinator.spec.numel
        before = service.coordinator.global_vector.clone()
        for c in clients:
            wait_for(lambda c=c: c.status()["state"] == "selected", timeout=60)
        attacker, honest = clients[0], clients[1:]
        attacker.upload(1, torch.full((numel,), 3e38), num_samples=10)
        for c in honest:
            c.upload(1, torch.full((numel,), 1e-3), num_samples=10)
        st = wait_for(lambda: (s := status(url))["unusable_aggregates"] == 1 and s, timeout=60)
        assert st["completed_rounds"] == 0
        assert torch.equal(service.coordinator.global_vector, before)  # nothing of the attempt was applied
        rows = service.store.round_rows()
        assert [r.state for r in rows][:1] == ["aborted"] and "not finite" in (rows[0].reason or "")
        events = admin(url, env, "GET", "/api/v1/audit").json()["events"]
        assert [e["client_id"] for e in events if e["kind"] == "update_unusable_aggregate"] == [attacker.id]
        # the next attempt leaves the attacker out and closes with the two honest clients
        for c in honest:
            wait_for(lambda c=c: c.status()["state"] == "selected", timeout=60)
        assert attacker.status()["state"] in ("waiting", "not_selected")
        for c in honest:
            c.upload(1, torch.full((numel,), 1e-3), num_samples=10, key=f"again-{c.id}")
        st = wait_for(lambda: (s := status(url))["state"] == "finished" and s, timeout=60)
        assert bool(torch.isfinite(service.coordinator.global_vector).all())
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert "fl_unusable_aggregates_total 1.0" in metrics


def test_num_samples_is_bounded_by_the_partition_and_nothing_is_written_first(tmp_path: Path) -> None:
    env = token_env()
    cfg = tiny_cfg(num_clients=2, num_rounds=1)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        api = ServerApi(url, timeout=10, max_retries=0)
        with pytest.raises(ApiRefused) as err:
            api.register(env[ENV_ENROLLMENT_TOKEN], client_name="big", partition=None, num_samples=2**63, capability={})
        assert (err.value.status, err.value.code) == (400, "bad_num_samples")
        clients = register(url, env, 2)
        numel = service.coordinator.spec.numel
        for c in clients:
            wait_for(lambda c=c: c.status()["state"] == "selected", timeout=60)
        partition = service.gateway.records_bound_of(clients[0].id)
        assert 0 < partition < 2**31
        for claimed in (2**62, 2**63 + 5, partition + 1):
            with pytest.raises(ApiRefused) as err:
                clients[0].upload(1, torch.zeros(numel), num_samples=claimed, key=f"k{claimed % 997}")
            assert (err.value.status, err.value.code) == (422, "num_samples_too_large")
        assert not (tmp_path / "srv" / "updates").exists() or not any((tmp_path / "srv" / "updates").rglob("*.bin"))
        assert service.store.count_updates() == 0
        assert clients[0].upload(1, torch.zeros(numel), num_samples=partition)["accepted"] is True


def test_a_known_name_cannot_be_taken_over_with_the_shared_token(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(tiny_cfg(num_clients=3), tmp_path / "srv", env) as (url, _service):
        alice = ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "alice")
        intruder = ServerApi(url, timeout=10, max_retries=0)
        with pytest.raises(ApiRefused) as err:
            intruder.register(env[ENV_ENROLLMENT_TOKEN], client_name="alice", partition=None, num_samples=None, capability={})
        assert (err.value.status, err.value.code) == (409, "client_exists")
        assert alice.status()["state"] in ("waiting", "selected", "not_selected")  # the real alice is not locked out
        # alice herself registers again: the request is signed with her current keys
        old = alice.api.creds
        assert old is not None and alice.status()["state"] in ("waiting", "selected", "not_selected")  # keys in use
        again = alice.api.register(env[ENV_ENROLLMENT_TOKEN], client_name="alice", partition=None, num_samples=None,
                                   capability={})
        assert again["client_id"] == alice.id
        assert alice.status()["state"] in ("waiting", "selected", "not_selected")
        # her replaced signing key no longer verifies (the gateway keeps unwrapped keys per wrapped blob: no stale hit)
        new = alice.api.creds
        assert new is not None and new.keys.hmac_key != old.keys.hmac_key
        stale = ServerApi(url, timeout=10, max_retries=0)
        stale.creds = dataclasses.replace(new, keys=old.keys)
        with pytest.raises(ApiRefused) as err:
            stale.round_status()
        assert (err.value.status, err.value.code) == (401, "signature_bad_signature")
        # revoked: her token stops working and her name cannot register again
        assert admin(url, env, "POST", f"/api/v1/clients/{alice.id}/revoke", {}).json()["revoked"] is True
        with pytest.raises(ApiRefused) as err:
            alice.status()
        assert (err.value.status, err.value.code) == (403, "client_revoked")
        with pytest.raises(ApiRefused) as err:
            alice.api.register(env[ENV_ENROLLMENT_TOKEN], client_name="alice", partition=None, num_samples=None, capability={})
        assert (err.value.status, err.value.code) == (403, "client_revoked")
        kinds = {e["kind"] for e in admin(url, env, "GET", "/api/v1/audit").json()["events"]}
        assert {"takeover_refused", "client_revoked", "revoked_client"} <= kinds


def test_per_client_enrollment_tokens_limits_and_erasure(tmp_path: Path) -> None:
    env = token_env()
    cfg = tiny_cfg(num_clients=4, shared_enrollment_max_clients=1, round_start_wait=0.5)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        token_file = tmp_path / "admin_token"
        token_file.write_text(env[ENV_ADMIN_TOKEN] + "\n")
        cli = [sys.executable, "-m", "fl_server", "admin", "--server-url", url, "--admin-token-file", str(token_file)]
        made = subprocess.run([*cli, "--json", "enrollments", "create", "--name", "bob"], capture_output=True, text=True,
                              timeout=60, env={k: v for k, v in os.environ.items() if k != ENV_ADMIN_TOKEN})
        assert made.returncode == 0, made.stderr
        bob_token = json.loads(made.stdout)["enrollment_token"]
        with pytest.raises(ApiRefused) as err:  # bound to bob
            ServerApi(url, timeout=10, max_retries=0).register(bob_token, client_name="carol", partition=None, num_samples=None,
                                                               capability={})
        assert (err.value.status, err.value.code) == (403, "enrollment_name_mismatch")
        bob = ScriptedClient(url, bob_token, "bob")
        with pytest.raises(ApiRefused) as err:  # one use only
            ServerApi(url, timeout=10, max_retries=0).register(bob_token, client_name="bob2", partition=None, num_samples=None,
                                                               capability={})
        assert err.value.status == 401
        first = ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "shared-1")
        with pytest.raises(ApiRefused) as err:  # the shared token enrols one client here
            ServerApi(url, timeout=10, max_retries=0).register(env[ENV_ENROLLMENT_TOKEN], client_name="shared-2",
                                                               partition=None, num_samples=None, capability={})
        assert (err.value.status, err.value.code) == (403, "enrollment_limit")
        listed = subprocess.run([*cli, "enrollments", "list"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "bob" in listed.stdout and "uses 1/1" in listed.stdout
        assert bob_token not in listed.stdout  # tokens are shown once, at creation
        # remove (erase) a client that took part: no row and no file of it is left
        numel = service.coordinator.spec.numel
        for c in (bob, first):
            wait_for(lambda c=c: c.status()["state"] == "selected", timeout=60)
        bob.upload(1, torch.zeros(numel), num_samples=5)
        files = list((tmp_path / "srv" / "updates").rglob("*.bin"))
        assert len(files) == 1
        removed = subprocess.run([*cli, "clients", "remove", bob.id], capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0, removed.stderr
        assert not files[0].exists()
        db = sqlite3.connect(tmp_path / "srv" / "server.db")
        for table in ("clients", "updates", "participants", "nonces", "security_events", "async_updates", "async_jobs"):
            assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE client_id=?", (bob.id,)).fetchone()[0] == 0, table
        bad = subprocess.run([*cli, "clients", "remove", "c-doesnotexist"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "unknown_client" in bad.stderr


def test_no_body_is_read_before_the_token_and_small_routes_take_small_bodies(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(tiny_cfg(), tmp_path / "srv", env) as (url, _service):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # 200 MB announced, nothing sent: the answer comes from the headers alone
            sock.sendall(b"POST /api/v1/rounds/1/update HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n"
                         b"Content-Type: application/octet-stream\r\n\r\n")
            head = sock.recv(4096).decode("latin-1")
        assert head.startswith("HTTP/1.1 401"), head
        big = requests.post(f"{url}{PATH_REGISTER}", data=b"x" * (65 * 1024), timeout=10,
                            headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"] == "body_too_large"
        with_body = requests.get(f"{url}/status", data=b"x" * 10, timeout=10)
        assert with_body.status_code == 413
        wrong_method = requests.get(f"{url}{PATH_REGISTER}", timeout=10)
        assert wrong_method.status_code == 405 and wrong_method.headers.get("Allow") is not None
        assert "POST" in wrong_method.headers["Allow"]


def test_state_files_are_private(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(tiny_cfg(), tmp_path / "srv", env) as (url, _service):
        ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "a")
        assert stat.S_IMODE((tmp_path / "srv" / "server.db").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "srv").stat().st_mode) == 0o700
        for p in (tmp_path / "srv").iterdir():
            if p.is_file():
                assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


def test_json_never_carries_nan() -> None:
    replaced: list[str] = []
    clean = finite_json({"accuracy": float("nan"), "history": [{"loss": float("inf")}, {"loss": 1.0}]}, "$", replaced)
    assert clean == {"accuracy": None, "history": [{"loss": None}, {"loss": 1.0}]}
    assert replaced == ["$.accuracy", "$.history[0].loss"]
    from flask import Flask

    from fl_server.rest.json_provider import FiniteJSONProvider

    app = Flask("t")
    app.json = FiniteJSONProvider(app)
    text = app.json.dumps({"accuracy": float("nan")})
    assert json.loads(text) == {"accuracy": None, NON_FINITE_KEY: ["$.accuracy"]}  # strict JSON, reason included


def test_health_reports_a_stalled_round(tmp_path: Path) -> None:
    env = token_env()
    offset = [0.0]  # the server's clock runs ahead once the ticker is stopped (client signatures use real time)
    cfg = tiny_cfg(num_clients=2, round_timeout=60.0, min_clients=2)
    with threaded_server(cfg, tmp_path / "srv", env, clock=lambda: time.time() + offset[0]) as (url, service):
        clients = register(url, env, 2)
        wait_for(lambda: clients[0].status()["state"] == "selected", timeout=60)
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        service.stop()  # no ticker: the deadline passes and nothing closes the round
        offset[0] += 60.0 + 31.0
        resp = requests.get(f"{url}/health", timeout=10)
        assert resp.status_code == 503 and "past its deadline" in resp.json()["reason"]


def test_repeated_refusals_cost_one_audit_row_a_window_and_the_log_is_pruned(tmp_path: Path) -> None:
    from fl_server.rest.refusals import WINDOW_SECONDS, RefusalRecorder
    from fl_server.store.sqlite import ServerStore

    now = [1000.0]
    store = ServerStore(tmp_path / "server.db")
    rec = RefusalRecorder(store, lambda: now[0], retention_days=1.0, max_events=1000)
    for _ in range(1000):
        rec.refuse("bad_token", None, "GET /api/v1/round with an unknown session token")
    assert len(store.security_events(limit=10_000)) == 1  # the first one, at once
    assert rec.rejections() == {"bad_token": 1000}  # /status counts what is not written yet
    assert store.rejections() == {}
    now[0] += WINDOW_SECONDS
    rec.flush()
    events = store.security_events(limit=10_000)
    assert store.rejections() == {"bad_token": 1000} and rec.rejections() == {"bad_token": 1000}
    assert len(events) == 2 and events[0]["detail"].startswith("repeated 999 more time(s)")
    # retention: older than a day goes, and never more than max_events
    now[0] += 2 * 86400.0
    for i in range(1200):
        rec.refuse(f"reason_{i}", None, "x")
    rec.flush(force=True)
    kept = store.security_events(limit=10_000)
    assert len(kept) == 1000 and all(e["at"] >= now[0] - 86400.0 for e in kept)
    assert kept[0]["kind"] == "reason_1199"  # the newest are the ones kept
    store.close()


def test_a_restart_mid_round_keeps_the_round_accounting(tmp_path: Path) -> None:
    """history.csv's seconds and bytes of a round that a server restart cut in two count the whole round
    (before: only what came after the restart)."""
    import csv

    from tests.e2e.harness import GunicornServer

    env = token_env()
    cfg = tiny_cfg(num_clients=2, num_rounds=1, min_clients=2)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    try:
        clients = register(server.url, env, 2)
        for c in clients:
            wait_for(lambda c=c: c.status()["state"] == "selected", timeout=60)
        downloaded = 0
        for c in clients:
            payload, _ = c.api.download_model(None, encrypted=True)
            assert payload is not None
            downloaded += len(payload)
        vec = torch.zeros(wire.unpack(payload, 2**30)[0].numel)
        first = clients[0].upload(1, torch.zeros_like(vec), num_samples=5)
        assert first["accepted"] is True
        time.sleep(1.0)
        server.kill9()
        time.sleep(2.0)
        server.start()
        clients[1].upload(1, torch.zeros_like(vec), num_samples=5)
        wait_for(lambda: server.status()["state"] == "finished", timeout=60)
    finally:
        server.stop()
    rows = list(csv.DictReader((tmp_path / "srv" / "run" / "history.csv").open()))
    assert len(rows) == 1
    assert float(rows[0]["seconds"]) >= 3.0  # the second before the kill and the two it was down count
    assert int(rows[0]["bytes"]) >= downloaded  # the downloads before the restart count

