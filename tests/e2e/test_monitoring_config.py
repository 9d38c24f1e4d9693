"""The `monitoring` compose profile (Prometheus + Grafana), checked without a Docker engine.

The compose services, the Prometheus scrape config and the Grafana provisioning are read with
PyYAML and checked against each other and against the server's real command line; every metric
name the Grafana dashboard's queries use is checked against what a real server's ``/metrics``
exposes (scraped from servers on loopback, one of them with differential privacy on, since the
epsilon gauges exist only then).
"""

from __future__ import annotations

import json
import re

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import threaded_server, token_env
from tests.e2e.scripted_rounds import play_rounds, register, tiny_cfg
from tests.e2e.test_compose_config import (
    ROOT,
    compose,
    interpolate,
    option,
    server_argv,
    service,
)

PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD_JSON = GRAFANA / "dashboards" / "federation.json"
METRIC = re.compile(r"\bfl_[a-z0-9_]+\b")


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> host path of a service's bind mounts and volumes."""
    out = {}
    for v in svc.get("volumes") or []:
        parts = str(v).split(":")
        out[parts[1]] = parts[0]
    return out


def test_monitoring_services_are_behind_a_profile() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        assert ":" in interpolate(services[name]["image"]) and not interpolate(services[name]["image"]).endswith(":latest"), \
            "pin the monitoring images"
        for port in services[name]["ports"]:
            assert interpolate(str(port)).startswith("127.0.0.1:"), f"{name} must publish on loopback by default: {port}"
    for name in ("server", "client"):
        assert "profiles" not in services[name], "a plain `docker-compose up` must still start the federation"
    named = set(compose()["volumes"])
    assert not {"prometheus-data", "grafana-data"} & named  # anonymous volumes: created only with the profile


def test_prometheus_scrapes_the_server() -> None:
    prom = service("prometheus")
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert _mounts(prom)[config_path] == "./docker/prometheus/prometheus.yml"
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["fl_server"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"server:{option(server_argv(), '--port')}"], targets
    assert prom["depends_on"]["server"]["condition"] == "service_healthy"


def test_grafana_is_provisioned_with_the_datasource_and_dashboard() -> None:
    graf = service("grafana")
    mounts = _mounts(graf)
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    dashboards_dir = next(c for c, h in mounts.items() if h == "./docker/grafana/dashboards")
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(str(p).endswith(":9090") for p in service("prometheus")["ports"])
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "federation.yml").read_text(encoding="utf-8"))
    assert providers["providers"][0]["options"]["path"] == dashboards_dir
    env = graf["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/federation.json"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert re.fullmatch(r"\$\{FL_GRAFANA_ADMIN_PASSWORD:-\}", str(env["GF_SECURITY_ADMIN_PASSWORD"])), \
        "no Grafana password may be committed"
    dash = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == source["uid"] and p["targets"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        assert all(t["expr"].strip() and t["datasource"]["uid"] == source["uid"] for t in p["targets"])
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("accuracy", "loss", "participation", "bytes", "privacy budget", "current round", "clients online",
                  "durations", "http latency", "refusals"):
        assert topic in titles, f"the Grafana dashboard lacks the dashboard page's '{topic}' panel"


def _exposed_names(text: str) -> set[str]:
    """Every series name a scrape can contain, from the families it declares (with or without samples)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(f"{fam.name}_total")
        elif fam.type == "histogram":
            names.update({f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"})
    return names


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    names: set[str] = set()
    for dp in (False, True):
        env = token_env()
        cfg = tiny_cfg(num_rounds=1, differential_privacy=dp, **({"dp_mode": "client", "dp_epsilon": 3.0} if dp else {}))
        with threaded_server(cfg, tmp_path_factory.mktemp(f"dp{int(dp)}"), env) as (url, service_):
            clients = register(url, env, 2)
            play_rounds(url, clients, service_.coordinator.spec.numel, 1)
            names |= _exposed_names(requests.get(f"{url}/metrics", timeout=10).text)
    return names


@pytest.mark.slow
def test_every_metric_the_dashboard_queries_is_exposed(exposed: set[str]) -> None:
    dash = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    used = {m for p in dash["panels"] for t in p["targets"] for m in METRIC.findall(t["expr"])}
    assert len(used) >= 15, used
    missing = sorted(used - exposed)
    assert not missing, f"the Grafana dashboard queries metrics /metrics does not expose: {missing}"
    for core in ("fl_global_accuracy", "fl_privacy_epsilon_spent", "fl_round_duration_seconds_bucket",
                 "fl_http_request_duration_seconds_bucket", "fl_updates_rejected_total"):
        assert core in used and core in exposed, core
