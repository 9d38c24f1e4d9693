"""Client selection over REST, on real servers on loopback.

What must hold in deployment: a client reports its profile after loading its data and the server
checks every field (4xx JSON, nothing stored on a refusal); under a policy other than uniform only
clients whose profile arrived are candidates; each round attempt records the inclusion
probabilities the policy gave its selected clients, keeps them across a restart, and writes them
to ``participation_rounds.csv``; fairness shows in ``/status`` and ``summary.json``; real daemons
measure or declare their speed and complete a run under ``selection: adaptive`` (the seed's rule).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from werkzeug.serving import make_server

from fl_client.api import ApiRefused
from fl_common.config import FLConfig
from fl_common.crypto import sign_request
from fl_common.data import load_dataset
from fl_common.data.assignment import partition_sizes, training_subset
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN, PATH_PROFILE
from fl_server.rest.app import create_app
from fl_server.rest.secrets import ServerSecrets
from fl_server.rest.service import FederationService
from fl_server.selection import inclusion_probabilities
from tests.e2e.harness import GunicornServer, ScriptedClient, make_cfg, threaded_server, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")

NUMEL = 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # the harness's MLP


@contextmanager
def paused_server(cfg: FLConfig, state_dir: Path, env: dict[str, str]) -> Iterator[tuple[str, FederationService]]:
    """A real server whose round ticker waits for ``service.start()``: clients register and report
    their profiles first, so the first round sees every candidate."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        service = FederationService(cfg, state_dir, secrets_=ServerSecrets.load(state_dir))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    server = make_server("127.0.0.1", 0, create_app(service, start_ticker=False), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", service
    finally:
        server.shutdown()
        service.close()


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_weighted_selection_records_its_probabilities_and_keeps_them_across_a_restart(tmp_path: Path) -> None:
    cfg = make_cfg(num_clients=5, client_selection_ratio=0.4, num_rounds=2, selection="weighted")
    env = token_env()
    sizes = [100, 200, 300, 400]
    state = tmp_path / "srv"
    with paused_server(cfg, state, env) as (url, service):
        clients = [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"w{i}") for i in range(5)]
        spec = clients[4].api.profile_spec()
        assert spec["required"] == ["num_samples"] and spec["needed_for_selection"] and spec["profile"] is None
        for c, n in zip(clients, sizes, strict=False):
            assert c.api.send_profile({"num_samples": n})["profile"]["num_samples"] == n
        with pytest.raises(ApiRefused) as err:  # weighted selection reads no label histogram: none is taken
            clients[4].api.send_profile({"num_samples": 50, "label_histogram": [5] * 10})
        assert (err.value.status, err.value.code) == (400, "label_histogram_not_wanted")
        assert clients[4].api.profile_spec()["profile"] is None
        assert service.status()["clients"] == {"registered": 5, "online": 5, "profiled": 4}
        service.start()
        row = wait_for(lambda: service.store.current_open_round(), timeout=30)
        by_id = {c.id: n for c, n in zip(clients, sizes, strict=False)}
        pi = dict(zip(by_id, inclusion_probabilities(np.array(sizes, dtype=float), 2).tolist(), strict=False))
        assert len(row.selected) == 2 and clients[4].id not in row.selected, "a client without a profile was selected"
        assert row.probabilities == {cid: pi[cid] for cid in row.selected}
        first, second = (next(c for c in clients if c.id == cid) for cid in row.selected)
        first.upload(1, torch.full((NUMEL,), 1.0), num_samples=by_id[first.id])
    # a restart with the round open: the attempt's probabilities come back from the store
    with threaded_server(cfg, state, env) as (url, service):
        for c in clients:
            c.api.base_url = url
        assert service.coordinator.current_round == 1
        second.upload(1, torch.full((NUMEL,), 1.0), num_samples=by_id[second.id])
        wait_for(lambda: service.coordinator.completed_rounds == 1, timeout=30)
        with service.lock:  # the round's close (files included) runs under the lock
            pass
        recorded = rows(state / "run" / "participation_rounds.csv")
        assert {r["client_id"]: float(r["probability"]) for r in recorded if r["round"] == "1"} == row.probabilities
        assert all(r["selected"] == "1" and r["arrived"] == "1" for r in recorded)
        row2 = wait_for(lambda: service.store.current_open_round(), timeout=30)
        assert row2.round == 2 and row2.probabilities == {cid: pi[cid] for cid in row2.selected}
        for cid in row2.selected:
            next(c for c in clients if c.id == cid).upload(2, torch.full((NUMEL,), 1.0), num_samples=by_id[cid])
        status = wait_for(lambda: (s := service.status())["state"] == "finished" and s, timeout=60)
    assert status["selection"]["policy"] == "weighted"
    part = status["participation"]
    assert part["clients"] == 5 and part["never_selected"] >= 1 and part["selected"]["max"] <= 2
    assert part["selected"]["min"] == 0.0  # w4 never reported a profile, so it was never a candidate
    summary = json.loads((state / "run" / "summary.json").read_text())
    assert summary["participation"] == part and summary["selection"]["policy"] == "weighted"
    recorded = rows(state / "run" / "participation_rounds.csv")
    assert [int(r["round"]) for r in recorded] == [1, 1, 2, 2]
    assert all(float(r["probability"]) == pi[r["client_id"]] for r in recorded)
    assert clients[4].id not in {r["client_id"] for r in recorded}
    per_client = rows(state / "run" / "participation.csv")  # the report's table still has its own format
    assert sum(int(r["participated"]) for r in per_client) == 4


# ------------------------------------------------------------------------------------ bad profiles
GOOD_HIST = [3] * 10  # exact counts (no label_histogram_epsilon), adding up to num_samples=30


def _raw_post(url: str, client: ScriptedClient, body: bytes, *, sign: bool = True, token: bool = True,
              hmac_key: bytes | None = None) -> requests.Response:
    creds = client.api.creds
    headers = {"Content-Type": "application/json"}
    if sign:
        headers.update(sign_request("POST", PATH_PROFILE, body, client_id=creds.client_id,
                                    hmac_key=hmac_key or creds.keys.hmac_key))
    if token:
        headers["Authorization"] = f"Bearer {creds.session_token}"
    return requests.post(url + PATH_PROFILE, data=body, headers=headers, timeout=30)


BAD_PROFILES: list[tuple[str, Any, int, str]] = [
    ("not_json", b"{not json", 400, "bad_json"),
    ("json_list", [1, 2], 400, "bad_json"),
    ("unknown_field", {"num_samples": 30, "label_histogram": GOOD_HIST, "ram": 4}, 400, "bad_profile"),
    ("no_num_samples", {"label_histogram": GOOD_HIST}, 422, "profile_incomplete"),
    ("zero_samples", {"num_samples": 0, "label_histogram": GOOD_HIST}, 400, "bad_num_samples"),
    ("bool_samples", {"num_samples": True, "label_histogram": GOOD_HIST}, 400, "bad_num_samples"),
    ("text_samples", {"num_samples": "30", "label_histogram": GOOD_HIST}, 400, "bad_num_samples"),
    ("huge_samples", {"num_samples": 10**10, "label_histogram": GOOD_HIST}, 400, "bad_num_samples"),
    ("unknown_capability", {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": {"gpu": 1}}, 400, "bad_capability"),
    ("capability_list", {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": [1]}, 400, "bad_capability"),
    ("zero_speed", {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": {"compute_speed": 0}}, 400, "bad_capability"),
    ("negative_bandwidth", {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": {"bandwidth": -1}}, 400,
     "bad_capability"),
    ("huge_speed", {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": {"compute_speed": 1e16}}, 400,
     "bad_capability"),
    ("nan_speed", b'{"num_samples": 30, "label_histogram": [3,3,3,3,3,3,3,3,3,3], "capability": {"compute_speed": NaN}}',
     400, "bad_capability"),
    ("text_speed", {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": {"compute_speed": "fast"}}, 400,
     "bad_capability"),
    ("no_histogram", {"num_samples": 30}, 422, "profile_incomplete"),
    ("short_histogram", {"num_samples": 27, "label_histogram": [3] * 9}, 400, "bad_label_histogram"),
    ("negative_count", {"num_samples": 30, "label_histogram": [-3] + [3] * 9}, 400, "bad_label_histogram"),
    ("inf_count", b'{"num_samples": 30, "label_histogram": [Infinity,3,3,3,3,3,3,3,3,3]}', 400, "bad_label_histogram"),
    ("text_count", {"num_samples": 30, "label_histogram": ["3"] * 10}, 400, "bad_label_histogram"),
    ("sum_mismatch", {"num_samples": 31, "label_histogram": GOOD_HIST}, 422, "label_histogram_mismatch"),
    ("fractional_exact", {"num_samples": 30, "label_histogram": [2.5, 3.5] + [3] * 8}, 422, "label_histogram_mismatch"),
    ("oversized", {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": {"x" * 70000: 1}}, 413, "body_too_large"),
    ("unsigned", {"num_samples": 30, "label_histogram": GOOD_HIST}, 401, "missing_token"),
    ("bad_signature", {"num_samples": 30, "label_histogram": GOOD_HIST}, 401, "signature_bad_signature"),
]


def test_the_profile_endpoint_refuses_bad_input_with_4xx_json_and_changes_nothing(tmp_path: Path) -> None:
    cfg = make_cfg(num_clients=4, client_selection_ratio=0.5, selection="stratified", stratify_by="label", num_strata=2)
    env = token_env()
    with paused_server(cfg, tmp_path / "srv", env) as (url, service):
        client, other = (ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"p{i}") for i in range(2))
        spec = client.api.profile_spec()
        assert spec["required"] == ["num_samples", "label_histogram"] and spec["label_histogram_epsilon"] is None
        assert spec["num_classes"] == 10

        def snapshot() -> tuple:
            rows_ = [(c.client_id, c.profile, c.num_samples, c.capability) for c in service.store.clients()]
            return rows_, service.store.profiles()

        def check_all(expected_profile: dict | None) -> None:
            for name, body, status, code in BAD_PROFILES:
                before = snapshot()
                refused = sum(service.gateway.refusals.rejections().values())
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                if name == "unsigned":
                    resp = _raw_post(url, client, raw, sign=False, token=False)
                elif name == "bad_signature":
                    resp = _raw_post(url, client, raw, hmac_key=b"k" * 32)
                else:
                    resp = _raw_post(url, client, raw)
                assert resp.status_code == status, (name, resp.status_code, resp.text)
                data = resp.json()
                assert set(data) == {"error", "message"} and data["error"] == code and data["message"], (name, data)
                assert snapshot() == before, f"{name}: a refused profile changed the store"
                assert sum(service.gateway.refusals.rejections().values()) == refused + 1, f"{name}: the refusal was not counted"
                assert client.api.profile_spec()["profile"] == expected_profile

        check_all(None)
        good = {"num_samples": 30, "label_histogram": GOOD_HIST, "capability": {"compute_speed": 1234.5, "bandwidth": 1e6}}
        stored = client.api.send_profile(good)["profile"]
        assert stored["num_samples"] == 30 and stored["label_histogram"] == [3.0] * 10
        assert stored["capability"] == {"compute_speed": 1234.5, "bandwidth": 1e6}
        check_all(stored)  # a refused report leaves the good profile as it was
        assert other.api.profile_spec()["profile"] is None
        admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
        table = {c["client_id"]: c for c in requests.get(f"{url}/api/v1/clients", headers=admin, timeout=10).json()["clients"]}
        assert table[client.id]["profile"] == stored and table[client.id]["num_samples"] == 30
        assert table[client.id]["capability"]["compute_speed"] == 1234.5
        audit = requests.get(f"{url}/api/v1/audit?limit=200", headers=admin, timeout=10).json()["events"]
        assert any(e["kind"] == "profile_label_histogram_mismatch" for e in audit)


# ------------------------------------------------------------------------------------ real daemons
def start_daemon(server: GunicornServer, env: dict, name: str, state: Path, *extra: str) -> subprocess.Popen:
    log = open(state / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "fl_client", "--server-url", server.url, "--client-id", name,
                             "--state-dir", str(state / name), "--threads", "1", *extra],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def _capability(profile: dict[str, Any], epochs: int) -> float:
    """1 / T_k with T_k = E n_k / compute_speed_k + 2 model_bytes / bandwidth_k (no bandwidth: no transfer time)."""
    cap = profile["capability"]
    transfer = 2.0 * (4 * NUMEL) / cap["bandwidth"] if cap.get("bandwidth") else 0.0
    return 1.0 / (epochs * profile["num_samples"] / cap["compute_speed"] + transfer)


@pytest.mark.slow
def test_adaptive_selection_with_real_daemons(tmp_path: Path) -> None:
    """p_k ~ (n_k / sum n) x staleness_k^-1 x capability_k, from what real daemons reported."""
    cfg = make_cfg(num_clients=4, client_selection_ratio=0.5, num_rounds=3, selection="adaptive",
                   data_distribution="dirichlet", non_iid_alpha=0.5)
    env = token_env()
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    daemons: list[subprocess.Popen] = []
    try:  # one daemon declares its speeds, the others measure their training speed
        daemons = [start_daemon(server, env, "cap0", tmp_path, "--compute-speed", "5000", "--bandwidth", "2e6")]
        daemons += [start_daemon(server, env, f"cap{i}", tmp_path) for i in range(1, 4)]
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=400)
        for d in daemons:
            assert d.wait(timeout=120) == 0, "a daemon did not exit cleanly"
        admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
        table = requests.get(f"{server.url}/api/v1/clients", headers=admin, timeout=10).json()["clients"]
    finally:
        for d in daemons:
            if d.poll() is None:
                d.kill()
        server.stop()
    assert status["completed_rounds"] == 3 and status["selection"]["policy"] == "adaptive"
    profiles = {c["client_id"]: c["profile"] for c in table}
    assert all(p is not None for p in profiles.values()), "every daemon reports its profile"
    # the records each daemon reports are the size of its partition, computed here independently
    train = training_subset(load_dataset("fashion_mnist", "train", seed=cfg.seed), cfg.seed, cfg.max_train_samples)
    sizes = partition_sizes(train.y.numpy(), 4, "dirichlet", seed=cfg.seed, alpha=0.5, samples_per_client=None,
                            shards_per_client=cfg.shards_per_client)
    for c in table:
        assert c["profile"]["num_samples"] == sizes[c["partition"]]
        assert "label_histogram" not in c["profile"], "adaptive selection does not ask for a label histogram"
    declared = next(c["profile"] for c in table if c["name"] == "cap0")
    assert declared["capability"] == {"compute_speed": 5000.0, "bandwidth": 2e6}
    measured = [c["profile"]["capability"] for c in table if c["name"] != "cap0"]
    assert all(set(m) == {"compute_speed"} and m["compute_speed"] > 0 for m in measured)
    # every round's recorded probabilities are the policy's for the profiles, among the candidates of
    # that round (a superset of those selected: which daemons had reported by then depends on timing)
    capability = {cid: _capability(p, cfg.local_epochs) for cid, p in profiles.items()}
    recorded = rows(tmp_path / "srv" / "run" / "participation_rounds.csv")
    assert sorted({int(r["round"]) for r in recorded}) == [1, 2, 3]
    for rnd in (1, 2, 3):
        got = {r["client_id"]: float(r["probability"]) for r in recorded if int(r["round"]) == rnd}
        # 2 selected, or 1 when round_start_wait ran out with a single candidate reported
        assert len(got) in (1, 2) and all(0 < p <= 1 for p in got.values())
        last = {cid: max([int(r["round"]) for r in recorded if r["client_id"] == cid and r["arrived"] == "1"
                          and int(r["round"]) < rnd], default=0) for cid in capability}
        ids = sorted(capability)
        matches = False
        for m in range(len(got), 5):
            for cand in itertools.combinations(ids, m):
                if not set(got) <= set(cand):
                    continue
                n = np.array([profiles[c]["num_samples"] for c in cand], dtype=float)
                stale = np.maximum(1.0, rnd - np.array([last[c] for c in cand], dtype=float))
                weight = n / n.sum() * stale ** -1.0 * np.array([capability[c] for c in cand])
                pi = dict(zip(cand, inclusion_probabilities(weight, min(2, m)).tolist(), strict=False))
                matches = matches or all(abs(pi[c] - p) <= 1e-9 * max(1.0, p) for c, p in got.items())
        assert matches, f"round {rnd}: recorded probabilities {got} are not the adaptive policy's"
    summary = json.loads((tmp_path / "srv" / "run" / "summary.json").read_text())
    assert summary["selection"]["policy"] == "adaptive" and summary["participation"]["clients"] == 4
    assert summary["participation"]["selected"]["mean"] == pytest.approx(len(recorded) / 4)


def test_async_jobs_are_drawn_by_the_selection_policy(tmp_path: Path) -> None:
    """training_mode async: each free slot is filled by the policy among the idle clients with a profile."""
    cfg = make_cfg(num_clients=3, num_rounds=5, selection="weighted", training_mode="async", async_algorithm="fedbuff",
                   fedbuff_k=2, async_concurrency=1, over_selection=0.3)
    env = token_env()
    with paused_server(cfg, tmp_path / "srv", env) as (url, service):
        a, b, c = (ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"j{i}") for i in range(3))
        assert a.status()["state"] == "waiting", "no profile yet: not a candidate"
        a.api.send_profile({"num_samples": 100})
        b.api.send_profile({"num_samples": 300})
        polled = {cl: cl.status() for cl in (a, b, c)}  # the first poll draws one of a and b for the one slot
        holders = [cl for cl, st in polled.items() if st["state"] == "selected"]
        assert len(holders) == 1 and holders[0] in (a, b)
        first = service.coordinator.jobs[0]
        assert first.probability == pytest.approx({a.id: 0.25, b.id: 0.75}[first.client_id], rel=1e-12)
        c.api.send_profile({"num_samples": 600})
        holders[0].upload(0, torch.full((NUMEL,), 1.0), key="first")  # the freed slot is drawn among all three
        second = service.coordinator.jobs[1]
        assert second.probability == pytest.approx({a.id: 0.1, b.id: 0.3, c.id: 0.6}[second.client_id], rel=1e-12)
        status = service.status()
        assert status["asynchronous"]["in_flight"] == 1 and status["participation"]["selected"]["max"] == 1
        assert status["selection"]["policy"] == "weighted"


@pytest.mark.slow
def test_under_sample_level_dp_the_profile_must_report_the_partitions_size(tmp_path: Path) -> None:
    """Sample-level DP plans each client's DP-SGD from its partition's size: a profile saying otherwise is
    refused, as registration refuses it."""
    cfg = make_cfg(num_clients=4, differential_privacy=True, dp_mode="sample", dp_epsilon=8.0, dp_delta=1e-5,
                   clip_grad_norm=1.0, selection="weighted")
    env = token_env()
    with paused_server(cfg, tmp_path / "srv", env) as (url, service):
        client = ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "dp0")
        size = service.partition_sizes[client.reg["data"]["partition_index"]]
        with pytest.raises(ApiRefused) as err:
            client.api.send_profile({"num_samples": size + 1})
        assert (err.value.status, err.value.code) == (409, "num_samples_mismatch")
        assert client.api.profile_spec()["profile"] is None
        assert client.api.send_profile({"num_samples": size})["profile"]["num_samples"] == size
