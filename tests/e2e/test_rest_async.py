"""Asynchronous training (FedBuff) over REST, on real servers on loopback.

What must hold in deployment: clients of different speeds train and upload whenever they finish,
so updates arrive stale and the server says so; the 202 of an upload tells applied or buffered
with its staleness; a retry with the same Idempotency-Key is answered 202 again and counted once;
well-formed but unwanted uploads are 409 with the coordinator's reason; and neither ``kill -9``
nor a death between the store's commit and the checkpoint loses an accepted update (FedBuff's
buffer included).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from fl_client.api import ApiRefused
from fl_common.config import dump_config
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN, PATH_MODEL
from tests.e2e.harness import GunicornServer, ScriptedClient, make_cfg, threaded_server, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")

NUMEL = 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # the harness's MLP
#: the harness's base config sets over_selection 0.0, a synchronous key; async runs keep its default
ASYNC = {"training_mode": "async", "async_algorithm": "fedbuff", "over_selection": 0.3}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def start_daemon(url: str, env: dict, name: str, state: Path, *extra: str) -> subprocess.Popen:
    log = open(state / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "fl_client", "--server-url", url, "--client-id", name, "--state-dir",
                             str(state / name), "--threads", "1", *extra],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_fedbuff_with_daemons_of_different_speeds_completes_with_stale_updates(tmp_path: Path) -> None:
    # K=2, 3 server updates = 6 accepted updates. The slow daemon takes its job on model version 0
    # first and sleeps 15 s after training; the fast ones deliver two updates each (2 server
    # updates) meanwhile, so its update arrives at least one server update stale.
    cfg = make_cfg(num_clients=3, num_rounds=3, fedbuff_k=2, round_timeout=300.0, **ASYNC)
    env = token_env()
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(start_daemon(server.url, env, "slow", tmp_path, "--train-delay", "15"))
        wait_for(lambda: server.status()["asynchronous"]["in_flight"] >= 1, timeout=120)
        daemons += [start_daemon(server.url, env, f"fast{i}", tmp_path, "--max-rounds", str(2 + i)) for i in range(2)]
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=400)
        for d in daemons:
            assert d.wait(timeout=120) == 0, "a daemon did not exit cleanly"
    finally:
        for d in daemons:
            if d.poll() is None:
                d.kill()
        server.stop()
    a = status["asynchronous"]
    assert status["training_mode"] == "async" and status["model_version"] == 3 and a["algorithm"] == "fedbuff"
    assert a["updates_applied"] == 6 and a["buffered"] == 0
    assert a["staleness"]["max"] >= 1, "the slow daemon's update must arrive stale"
    assert status["updates_accepted"] == 6
    run = tmp_path / "srv" / "run"
    history = rows(run / "history.csv")
    assert [int(r["round"]) for r in history] == [1, 2, 3] and all(int(r["clients"]) == 2 for r in history)
    assert max(int(r["staleness_max"]) for r in history) >= 1
    assert all(float(r["test_accuracy"]) > 0.3 for r in history)
    jobs = rows(run / "updates.csv")
    accepted = [j for j in jobs if j["status"] == "accepted"]
    assert len(accepted) == 6 and any(int(j["staleness"]) >= 1 for j in accepted)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["training_mode"] == "async" and summary["server_updates"] == 3
    assert summary["staleness"]["max"] >= 1 and summary["participation"]["clients"] == 3
    assert "train_loss" in summary["client_metrics_sent"]  # the report's writer reads the asynchronous updates too
    per_job = rows(run / "participation_rounds.csv")
    assert len(per_job) == sum(1 for j in jobs if j["status"] != "training")
    assert {r["client_id"] for r in per_job} == {j["client_id"] for j in jobs}
    assert (run / "model.pt").is_file() and (run / "report.html").is_file()
    per_client = rows(run / "participation.csv")  # the report's per-client table, from the store's job records
    assert sum(int(r["participated"]) for r in per_client) == len(accepted)


def test_async_uploads_retries_and_refusals(tmp_path: Path) -> None:
    # two training slots for three clients; FedBuff K=2; an update staler than 0 server updates is refused
    cfg = make_cfg(num_clients=3, num_rounds=5, fedbuff_k=2, async_max_staleness=0, async_concurrency=2, **ASYNC)
    env = token_env()
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        a, b, c = (ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"s{i}") for i in range(3))
        ja, jb, jc = a.status(), b.status(), c.status()
        assert (ja["state"], ja["round"], jb["state"], jb["round"]) == ("selected", 0, "selected", 0), (ja, jb)
        assert jc["state"] == "waiting" and "job" not in jc  # both slots taken
        with pytest.raises(ApiRefused) as err:
            c.upload(0, torch.full((NUMEL,), 1.0), key="c-none")
        assert (err.value.status, err.value.code) == (409, "not_dispatched")
        start = a.global_vector(NUMEL)
        with pytest.raises(ApiRefused) as err:  # a malformed upload is refused and leaves the job open
            a.upload(0, torch.zeros(NUMEL - 1), key="a-bad")
        assert err.value.status == 422
        first = a.upload(0, torch.full((NUMEL,), 1.0), key="a-0")
        assert first == {"accepted": True, "round": 0, "job": ja["job"], "duplicate": False, "status": "buffered",
                         "staleness": 0, "model_version": 0}
        again = a.upload(0, torch.full((NUMEL,), 1.0), key="a-0")  # the retry: the job is gone, the key answers
        assert again["duplicate"] is True and again["job"] == first["job"] and again["status"] == "buffered"
        st = service.status()
        assert st["updates_accepted"] == 1 and st["asynchronous"]["buffered"] == 1
        assert sum(1 for j in service.coordinator.jobs if j.status == "accepted") == 1
        with pytest.raises(ApiRefused) as err:  # the same key for another version
            a.upload(3, torch.full((NUMEL,), 1.0), key="a-0")
        assert (err.value.status, err.value.code) == (409, "idempotency_key_reused")
        with pytest.raises(ApiRefused) as err:
            b.upload(7, torch.full((NUMEL,), 2.0), key="b-wrong")
        assert (err.value.status, err.value.code) == (409, "wrong_version")
        # a's slot went to a or c at once, on version 0 as well
        holder = next(cl for cl in (a, c) if (s := cl.status())["state"] == "selected" and s["round"] == 0)
        applied = b.upload(0, torch.full((NUMEL,), 2.0), key="b-0")
        assert applied["status"] == "applied" and applied["model_version"] == 1 and applied["staleness"] == 0
        # FedBuff: x + eta (1/K) sum s(staleness) delta, s(0) = 1
        assert torch.allclose(service.coordinator.global_vector, start + 1.5, atol=1e-6)
        assert holder.api.download_model(None, encrypted=True, version=0)[0] is not None  # its version is still served
        with pytest.raises(ApiRefused) as err:  # trained on version 0, now one server update old
            holder.upload(0, torch.full((NUMEL,), 3.0), key="h-0")
        assert (err.value.status, err.value.code) == (409, "too_stale")
        with pytest.raises(ApiRefused) as err:  # no job trains on version 0 any more
            holder.api.download_model(None, encrypted=True, version=0)
        assert (err.value.status, err.value.code) == (409, "version_gone")
        creds = c.api.creds
        from fl_common.crypto import sign_request

        path = f"{PATH_MODEL}?version=x"
        h = sign_request("GET", path, b"", client_id=creds.client_id, hmac_key=creds.keys.hmac_key)
        resp = requests.get(url + path, headers={**h, "Authorization": f"Bearer {creds.session_token}"}, timeout=30)
        assert resp.status_code == 400 and resp.json()["error"] == "bad_version"
        jobs_now = {cl: cl.status() for cl in (a, b, c)}  # the freed slots: new jobs on version 1
        assert sorted(s["state"] for s in jobs_now.values()).count("selected") == 2
        assert all(s["round"] == 1 for s in jobs_now.values() if s["state"] == "selected")
        cl, _s1 = next((k, v) for k, v in jobs_now.items() if v["state"] == "selected")
        payload, etag = cl.api.download_model(None, encrypted=True, version=1)
        assert payload is not None and etag == '"v1"'
        assert cl.api.download_model(etag, encrypted=True, version=1) == (None, etag)  # 304
        st = service.status()
        assert st["updates_accepted"] == 2 and st["asynchronous"]["staleness"]["refused_too_stale"] == 1
        assert st["rejected"]["update_too_stale"] == 1 and st["rejected"]["update_not_dispatched"] == 1
        assert st["state"] == "training" and st["model_version"] == 1 and st["history"][0]["clients"] == 2


@pytest.mark.slow
def test_kill_9_of_the_async_server_loses_no_accepted_update(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(num_clients=3, num_rounds=2, fedbuff_k=3, **ASYNC), tmp_path / "srv", env)
    server.start()
    try:
        a, b, c = (ScriptedClient(server.url, env[ENV_ENROLLMENT_TOKEN], f"k{i}") for i in range(3))
        assert all(cl.status()["state"] == "selected" for cl in (a, b, c))
        start = a.global_vector(NUMEL)
        assert a.upload(0, torch.full((NUMEL,), 1.0), key="a-0")["status"] == "buffered"
        assert b.upload(0, torch.full((NUMEL,), 2.0), key="b-0")["status"] == "buffered"
        server.kill9()
        server.start()
        st = server.status()
        assert st["model_version"] == 0 and st["updates_accepted"] == 2
        assert st["asynchronous"]["buffered"] == 2, "FedBuff's buffer must survive kill -9"
        assert a.upload(0, torch.full((NUMEL,), 1.0), key="a-0")["duplicate"] is True  # retry after the restart
        assert c.status()["job"] is not None  # its job survived too
        assert c.upload(0, torch.full((NUMEL,), -1.0), key="c-0")["status"] == "applied"
        assert torch.allclose(a.global_vector(NUMEL), start + (1.0 + 2.0 - 1.0) / 3, atol=1e-6)
        assert server.status()["asynchronous"]["updates_applied"] == 3
    finally:
        server.stop()


def test_an_update_committed_but_not_checkpointed_is_replayed(tmp_path: Path) -> None:
    """The window between the store's commit and the checkpoint: the restart replays the update."""
    cfg = make_cfg(num_clients=2, num_rounds=2, fedbuff_k=2, **ASYNC)
    env = token_env()
    state = tmp_path / "srv"
    with threaded_server(cfg, state, env) as (url, service):
        a, b = (ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"r{i}") for i in range(2))
        assert a.status()["state"] == "selected" and b.status()["state"] == "selected"
        start = service.coordinator.global_vector.clone()
        before = (state / "run" / "checkpoint.pt").read_bytes()  # both jobs out: nothing changes until an upload
        assert a.upload(0, torch.full((NUMEL,), 4.0), key="a-0")["status"] == "buffered"
    (state / "run" / "checkpoint.pt").write_bytes(before)  # as if the process died before checkpointing
    with threaded_server(cfg, state, env) as (url, service):
        st = service.status()
        assert st["asynchronous"]["buffered"] == 1 and st["updates_accepted"] == 1, "the committed update was not replayed"
        a.api.base_url = b.api.base_url = url
        assert a.upload(0, torch.full((NUMEL,), 4.0), key="a-0")["duplicate"] is True
        assert b.upload(0, torch.full((NUMEL,), 0.0), key="b-0")["status"] == "applied"
        assert torch.allclose(service.coordinator.global_vector, start + 2.0, atol=1e-6)


@pytest.mark.parametrize("override,words", [
    ({"client_speed_distribution": "lognormal"}, "client_speed_distribution"),
    ({"network_delay": 2.0}, "network_delay"),
    ({"attack": "gaussian_noise"}, "attack"),
])
@pytest.mark.slow
def test_the_rest_server_refuses_simulation_only_keys(tmp_path: Path, override: dict, words: str) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    dump_config(make_cfg(**ASYNC, **override), cfg_path)
    proc = subprocess.run([sys.executable, "-m", "fl_server", "serve", "--config", str(cfg_path), "--state-dir",
                           str(tmp_path / "srv")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "simulat" in lines[0], proc.stderr


def test_an_async_state_dir_is_not_continued_synchronously(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(make_cfg(num_clients=2, **ASYNC), tmp_path / "srv", env):
        pass
    from fl_common.config import ConfigError

    with pytest.raises(ConfigError, match="asynchronous run"), threaded_server(make_cfg(num_clients=2), tmp_path / "srv", env):
        pass
