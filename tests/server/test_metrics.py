"""GET /metrics against real servers on loopback, parsed with prometheus-client's own parser.

The numbers must move as rounds run and equal what /status says at the same moment; HTTP
latency is labelled by URL rule; every app has its own registry; under gunicorn (one worker,
gthread) the endpoint works and ``--log-format json`` makes every log line, gunicorn's included,
one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from fl_client.api import ApiRefused
from fl_server.rest.demo import wait_healthy
from tests.e2e.harness import GunicornServer, threaded_server, token_env, wait_for
from tests.e2e.scripted_rounds import play_round, register, status, tiny_cfg

UPLOAD_RULE = "/api/v1/rounds/<int:round_number>/update"


class Scrape:
    """One parsed scrape: sample values by (sample name, labels)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def get(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def model_numel(cfg: Any) -> int:
    from fl_common.data import load_dataset
    from fl_common.models import model_from_config

    test = load_dataset(cfg.dataset, "test", seed=cfg.seed)
    return sum(p.numel() for p in model_from_config(cfg, test.input_shape, test.num_classes).state_dict().values())


def scrape(url: str) -> Scrape:
    resp = requests.get(f"{url}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    return Scrape(resp.text)


def test_metrics_move_as_rounds_run_and_match_status(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(tiny_cfg(num_rounds=2), tmp_path / "srv", env) as (url, service):
        m = scrape(url)
        assert m.get("fl_federation_state", state="waiting_for_clients") == 1.0
        assert m.get("fl_federation_state", state="training") == 0.0
        assert m.get("fl_clients_registered") == 0.0 and m.get("fl_round_current") == 0.0
        assert m.get("fl_rounds_planned") == 2.0 and m.get("fl_rounds_completed") == 0.0
        assert m.get("fl_global_accuracy") is None, "no accuracy is claimed before an evaluation"
        assert m.get("fl_privacy_enabled") == 0.0 and "fl_privacy_epsilon_spent" not in m.names()

        clients = register(url, env, 2)
        numel = service.coordinator.spec.numel
        wait_for(lambda: status(url)["current_round"] is not None)
        m = scrape(url)
        assert m.get("fl_federation_state", state="training") == 1.0
        assert (m.get("fl_round_current"), m.get("fl_round_selected_clients"), m.get("fl_round_quorum")) == (1.0, 2.0, 2.0)
        assert m.get("fl_clients_registered") == 2.0 and m.get("fl_clients_online") == 2.0
        assert 0 < m.get("fl_round_deadline_seconds") <= 120.0

        for c in clients:
            wait_for(lambda c=c: c.status()["state"] == "selected")
        clients[0].upload(1, torch.full((numel,), 0.001))
        m = scrape(url)
        assert m.get("fl_round_arrived_updates") == 1.0 and m.get("fl_updates_accepted_total") == 1.0
        # a refused update (second upload, new key) and a refused admin request: counted by reason
        with pytest.raises(ApiRefused) as refused:
            clients[0].upload(1, torch.full((numel,), 0.002), key="another-key")
        assert refused.value.code == "duplicate"
        assert requests.get(f"{url}/api/v1/clients", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        m = scrape(url)
        assert m.get("fl_updates_rejected_total", reason="duplicate") == 1.0
        assert m.get("fl_requests_refused_total", reason="bad_admin_token") == 1.0
        assert status(url)["rejected"] == {"update_duplicate": 1, "bad_admin_token": 1}

        clients[1].upload(1, torch.full((numel,), 0.003))
        wait_for(lambda: status(url)["completed_rounds"] == 1)
        play_round(url, clients, numel, 2)
        st = wait_for(lambda: (s := status(url))["state"] == "finished" and s)
        m = scrape(url)
        accepted_bodies = sum(u.nbytes for r in service.store.round_rows() for u in service.store.updates_for_round(r.round_id))

    assert m.get("fl_federation_state", state="finished") == 1.0
    assert m.get("fl_rounds_completed") == 2.0 and m.get("fl_round_current") == 0.0
    assert m.get("fl_updates_accepted_total") == float(st["updates_accepted"]) == 4.0
    assert m.get("fl_global_accuracy") == st["accuracy"] and m.get("fl_global_loss") == st["loss"]
    last = st["history"][-1]
    assert m.get("fl_round_last_clients") == float(last["clients"]) == 2.0
    assert m.get("fl_round_last_bytes") == float(last["bytes"]) > 0
    assert m.get("fl_clients_dropped_total") == 0.0
    for hist in ("fl_round_duration_seconds", "fl_aggregation_duration_seconds", "fl_evaluation_duration_seconds"):
        assert m.get(f"{hist}_count") == 2.0, hist
        assert m.get(f"{hist}_bucket", le="+Inf") == 2.0, hist
        assert m.get(f"{hist}_sum") >= 0.0
    assert m.get("fl_rounds_closed_total", reason="quorum") == 2.0
    # HTTP latency by URL rule, never by raw path; bytes in at least what the rounds counted
    assert m.get("fl_http_request_duration_seconds_count", endpoint=UPLOAD_RULE, method="POST", status="202") == 4.0
    assert m.get("fl_http_request_duration_seconds_count", endpoint=UPLOAD_RULE, method="POST", status="409") == 1.0
    endpoints = {s.labels.get("endpoint") for s in m.samples if s.name.startswith("fl_http_")}
    assert "/status" in endpoints and "/api/v1/round" in endpoints
    assert not any(e and "/rounds/1/" in e for e in endpoints), endpoints
    received = m.get("fl_http_received_bytes_total", endpoint=UPLOAD_RULE)
    assert received > accepted_bodies > 0  # the four accepted bodies plus the refused duplicate


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    env_a, env_b = token_env(), token_env()
    with threaded_server(tiny_cfg(), tmp_path / "a", env_a) as (url_a, _), \
            threaded_server(tiny_cfg(), tmp_path / "b", env_b) as (url_b, _):
        register(url_a, env_a, 1, prefix="only-a")
        a, b = scrape(url_a), scrape(url_b)
        assert a.get("fl_clients_registered") == 1.0 and b.get("fl_clients_registered") == 0.0
        a_requests = a.get("fl_http_request_duration_seconds_count", endpoint="/api/v1/register", method="POST", status="201")
        assert a_requests == 1.0
        assert b.get("fl_http_request_duration_seconds_count", endpoint="/api/v1/register", method="POST", status="201") is None
    global_names = {s.name for f in prometheus_client.REGISTRY.collect() for s in f.samples}
    assert not any(n.startswith("fl_") for n in global_names), "metrics must not leak into the global registry"


def test_privacy_budget_metrics_when_dp_is_on(tmp_path: Path) -> None:
    env = token_env()
    cfg = tiny_cfg(differential_privacy=True, dp_epsilon=2.0, dp_delta=1e-5)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, _):
        m = scrape(url)
        privacy = status(url)["privacy"]
    assert privacy["differential_privacy"] is True
    assert m.get("fl_privacy_enabled") == 1.0
    assert m.get("fl_privacy_epsilon_budget") == privacy["epsilon_budget"] == 2.0
    assert m.get("fl_privacy_epsilon_spent") == privacy["epsilon_spent"]
    assert m.get("fl_privacy_delta") == privacy["delta"] == 1e-5
    assert m.get("fl_federation_info", aggregation_method="fedavg", differential_privacy="true", encryption="true",
                 codec="int8", secure_aggregation="false") == 1.0


class _JsonLogServer(GunicornServer):
    """``python -m fl_server --log-format json serve ...`` (gunicorn, one gthread worker)."""

    def start(self, verify: bool | str = True) -> None:
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "fl_server", "--log-format", "json", "serve", "--config",
                                          str(self.config_path), "--state-dir", str(self.state_dir), "--port",
                                          str(self.port), "--threads", "4"], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc, verify=verify)


def test_metrics_under_gunicorn_and_json_logs(tmp_path: Path) -> None:
    env = token_env()
    server_cfg = tiny_cfg(num_rounds=1)
    server = _JsonLogServer(server_cfg, tmp_path / "srv", env)
    server.start()
    try:
        clients = register(server.url, env, 2)
        numel = model_numel(server_cfg)
        wait_for(lambda: clients[0].status()["state"] == "selected")
        model = clients[0].global_vector(numel)  # one real model download, encrypted, decoded
        assert model.numel() == numel
        play_round(server.url, clients, numel, 1)
        st = wait_for(lambda: (s := status(server.url))["state"] == "finished" and s)
        m = scrape(server.url)
    finally:
        server.stop()
    assert m.get("fl_rounds_completed") == 1.0 and m.get("fl_federation_state", state="finished") == 1.0
    assert m.get("fl_global_accuracy") == st["accuracy"]
    assert m.get("fl_http_request_duration_seconds_count", endpoint="/api/v1/model", method="GET", status="200") == 1.0
    assert m.get("fl_http_sent_bytes_total", endpoint="/api/v1/model") > 4 * numel * 0.5  # the model went out
    lines = [line for line in server.log.read_text(encoding="utf-8").splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    loggers = {r["logger"] for r in records}
    assert "gunicorn.error" in loggers and {"fl_server.rest.gateway", "fl_server.rest.sync_driver"} <= loggers, loggers
    assert "gunicorn.access" not in loggers, "JSON mode must not turn on the access log that text mode leaves off"
    assert any("round 1 closed" in r["message"] for r in records)
    for secret in env.values():
        assert secret not in server.log.read_text(encoding="utf-8"), "a secret reached the log"
