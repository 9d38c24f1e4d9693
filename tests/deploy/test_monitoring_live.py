"""The monitoring profile run for real: Debian's ``prometheus`` scraping a live server that trains.

``docker/prometheus/prometheus.yml`` is used as it is, with three rewrites: the target becomes the
loopback server, the CA file the test's certificate, and the scrape interval 0.5 s (so that the test
waits seconds, not minutes). The server is ``python -m fl_server serve`` (gunicorn, https, client-level
DP so the epsilon gauges exist); two scripted clients (real HTTP, signing, encryption) take part in
two rounds, one step at a time, and after each step the test waits until Prometheus itself reports
the value that step must produce (through its HTTP API: nothing is read from the server's /metrics
directly). At the end every expression of the Grafana dashboard is evaluated by Prometheus and must
return data. Grafana is not packaged for Debian: its dashboard JSON is checked against the metrics
(here and in tests/e2e/test_monitoring_config.py), not rendered.

Skipped with the reason when ``prometheus`` is not installed (scripts/setup.sh installs it).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml

from fl_client.api import ApiRefused
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN, PATH_CLIENTS
from fl_server.rest.demo import free_port
from tests.e2e.harness import GunicornServer, ScriptedClient, token_env, wait_for
from tests.e2e.scripted_rounds import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD_JSON = ROOT / "docker" / "grafana" / "dashboards" / "federation.json"
METRIC = re.compile(r"\bfl_[a-z0-9_]+\b")
ROUNDS = 2
CLIENTS = 2
EPSILON = 3.0

# one worker runs the whole module: the live federation and its Prometheus are set up once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("monitoring_live")]

if shutil.which("prometheus") is None:
    pytest.skip("prometheus is not installed (Debian package prometheus; scripts/setup.sh installs it)", allow_module_level=True)


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 that is its own CA (what Prometheus' ca_file gets)."""
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
    cert_path, key_path = folder / "server.pem", folder / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def loopback_config(server_port: int, ca_file: Path) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with the target and CA of the loopback server, scraping every second."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "fl_server"]
    assert job["scheme"] == "https" and set(job["tls_config"]) == {"ca_file"}, "the rewrite below assumes this shape"
    (static,) = job["static_configs"]
    assert static["targets"] == ["server:8080"]
    static["targets"] = [f"127.0.0.1:{server_port}"]
    job["tls_config"]["ca_file"] = str(ca_file)
    cfg["global"]["scrape_interval"] = "500ms"
    cfg["global"]["scrape_timeout"] = "500ms"
    return cfg


class Prometheus:
    """Debian's prometheus on a free loopback port, with its own data folder; queried over its HTTP API."""

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "wb")  # noqa: SIM115 (open while prometheus runs; closed in stop())
        self.proc = subprocess.Popen(["prometheus", f"--config.file={folder / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={self.url[7:]}",
                                      "--web.enable-lifecycle"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=60)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}; see {self.log.name}"
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None while it has no sample."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def sees(self, expr: str, expected: float) -> bool:
        return self.value(expr) == expected

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Run:
    """What the test observed, for the assertions after the federation."""

    def __init__(self, server: GunicornServer, prom: Prometheus, ca: str) -> None:
        self.server, self.prom, self.ca = server, prom, ca
        self.epsilon: list[float] = []          # Prometheus' fl_privacy_epsilon_spent after each round
        self.status_epsilon: list[float] = []   # /status' epsilon_spent after each round
        self.http_requests: list[float] = []    # sum of fl_http_request_duration_seconds_count after each round
        self.received_bytes: list[float] = []


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("monitoring")
    cert, key = _certificate(tmp)
    env = token_env()
    cfg = tiny_cfg(num_clients=CLIENTS, num_rounds=ROUNDS, differential_privacy=True, dp_mode="client", dp_epsilon=EPSILON,
                   round_timeout=600.0)
    server = GunicornServer(cfg, tmp / "srv", env, certfile=str(cert), keyfile=str(key))
    server.start(verify=str(cert))
    prom: Prometheus | None = None
    try:
        prom = Prometheus(loopback_config(server.port, cert), tmp / "prometheus")
        wait_for(lambda: prom.sees('up{job="fl_server"}', 1), timeout=60)
        yield federate(Run(server, prom, str(cert)), env)
    finally:
        if prom is not None:
            prom.stop()
        server.kill9()  # nothing here is about shutting down gracefully; gunicorn's graceful stop takes seconds


def federate(r: Run, env: dict[str, str]) -> Run:
    """The rounds, each step confirmed through Prometheus before the next."""
    p = r.prom
    clients = [ScriptedClient(r.server.url, env[ENV_ENROLLMENT_TOKEN], f"m{i}", verify=r.ca) for i in range(CLIENTS)]
    wait_for(lambda: p.sees("fl_clients_registered", CLIENTS))
    vector_size = model_size(r.server.config_path)
    for rnd in range(1, ROUNDS + 1):
        for c in clients:
            wait_for(lambda c=c, rnd=rnd: (s := c.status())["state"] == "selected" and s["round"] == rnd, timeout=120)
        # the open round, as the "current round" panels show it
        wait_for(lambda rnd=rnd: p.sees("fl_round_current", rnd) and p.sees("fl_round_selected_clients", CLIENTS))
        assert (p.value("fl_round_quorum") or 0) >= 1 and (p.value("fl_round_deadline_seconds") or 0) > 0
        assert p.sees('fl_federation_state{state="training"}', 1)
        for k, c in enumerate(clients):
            c.upload(rnd, torch.full((vector_size,), 0.001 * (k + 1)),
                     meta={"num_samples": 10 * (k + 1), "metrics": {"train_loss": 1.0 + k, "train_accuracy": 0.25 * (k + 1)}})
            if k == 0:
                wait_for(lambda rnd=rnd: p.sees("fl_round_arrived_updates", 1) and p.sees("fl_round_current", rnd))
        wait_for(lambda rnd=rnd: p.sees("fl_rounds_completed", rnd) and p.sees("fl_updates_accepted_total", CLIENTS * rnd))
        wait_for(lambda rnd=rnd: p.sees("fl_round_duration_seconds_count", rnd) and p.sees("fl_aggregation_duration_seconds_count", rnd))
        status = r.server.status(verify=r.ca)
        r.status_epsilon.append(float(status["privacy"]["epsilon_spent"]))
        wait_for(lambda: p.sees("fl_privacy_epsilon_spent", r.status_epsilon[-1]))
        r.epsilon.append(p.value("fl_privacy_epsilon_spent") or 0.0)
        r.http_requests.append(p.value("sum(fl_http_request_duration_seconds_count)") or 0.0)
        r.received_bytes.append(p.value("sum(fl_http_received_bytes_total)") or 0.0)
        if rnd == 1:
            refuse(r, clients[0], vector_size)
    wait_for(lambda: p.sees('fl_federation_state{state="finished"}', 1))
    return r


def model_size(config_path: Path) -> int:
    """The flat parameter count of the server's model, built as the server builds it (what an update must have)."""
    from fl_common.config import load_config
    from fl_common.data import load_dataset
    from fl_common.models import model_from_config

    cfg = load_config(config_path, [])
    test_set = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=False, seed=cfg.seed)
    model = model_from_config(cfg, test_set.input_shape, test_set.num_classes)
    return sum(p.numel() for p in model.state_dict().values())


def refuse(r: Run, client: ScriptedClient, numel: int) -> None:
    """One refused update and one refused admin request: the refusal counters get labelled samples."""
    with pytest.raises(ApiRefused):
        client.upload(2, torch.zeros(numel + 1), key="wrong-size")
    resp = requests.get(f"{r.server.url}{PATH_CLIENTS}", headers={"Authorization": "Bearer not-the-admin-token"},
                        timeout=10, verify=r.ca)
    assert resp.status_code == 401
    wait_for(lambda: r.prom.sees("sum(fl_updates_rejected_total)", 1) and r.prom.sees("sum(fl_requests_refused_total)", 1))


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


# ----------------------------------------------------------------------------- assertions
def test_every_dashboard_metric_has_samples_in_prometheus(run: Run) -> None:
    used = {m for _, expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert len(used) >= 15, used
    scraped = {s["metric"]["__name__"] for s in run.prom.query('count by (__name__) ({__name__=~"fl_.+", job="fl_server"})')}
    missing = sorted(used - scraped)
    assert not missing, f"Prometheus has no samples of these dashboard metrics: {missing}"


def test_every_dashboard_expression_returns_data(run: Run) -> None:
    """The panels' own PromQL (rates, histogram quantiles over their windows) evaluated by Prometheus."""
    for title, expr in dashboard_exprs():
        result = run.prom.query(expr)
        assert result, f"panel {title!r}: {expr} returned nothing"
        if expr.startswith("histogram_quantile"):
            assert any(math.isfinite(float(s["value"][1])) for s in result), f"panel {title!r}: {expr} -> {result}"


def test_the_metrics_move_with_the_rounds(run: Run) -> None:
    p = run.prom
    # what the run must end with (rounds, updates, histograms were also awaited round by round above)
    assert p.value("fl_rounds_completed") == ROUNDS and p.value("fl_rounds_planned") == ROUNDS
    assert p.value("fl_updates_accepted_total") == CLIENTS * ROUNDS
    assert p.value("fl_round_last_clients") == CLIENTS
    assert p.value("fl_clients_registered") == CLIENTS
    assert p.value("fl_round_current") == 0  # no round open after the last one
    assert p.value("fl_evaluation_duration_seconds_count") >= ROUNDS
    assert p.value("fl_privacy_enabled") == 1 and p.value("fl_privacy_epsilon_budget") == EPSILON
    # epsilon: Prometheus' values are /status', and grow every round without passing the budget
    assert run.epsilon == run.status_epsilon
    assert all(a < b for a, b in zip(run.epsilon, run.epsilon[1:], strict=False)) and 0 < run.epsilon[-1] <= EPSILON
    # traffic counters grow with every round
    assert all(a < b for a, b in zip(run.http_requests, run.http_requests[1:], strict=False)), run.http_requests
    assert all(a < b for a, b in zip(run.received_bytes, run.received_bytes[1:], strict=False)), run.received_bytes
    status = run.server.status(verify=run.ca)
    assert p.value("fl_round_last_bytes") == status["history"][-1]["bytes"]
    assert p.value("fl_global_accuracy") == status["accuracy"] and p.value("fl_global_loss") == status["loss"]
    # the refusals made after round 1, by reason
    assert p.value('sum(fl_requests_refused_total{reason="bad_admin_token"})') == 1
    assert p.value("sum(fl_updates_rejected_total)") == 1
