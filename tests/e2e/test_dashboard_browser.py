"""The live dashboard in a real headless Chromium against a real server that trains.

Debian's ``chromium`` driven by Playwright from PyPI (``executable_path``; no browser download).
The page is opened before any client exists and never reloaded; real client daemons then train
a few tiny rounds. Checked: no console errors or page errors, no request leaves the server's
origin (works offline), the charts hold exactly the numbers of ``/status`` (every plotted point
carries ``data-round``/``data-value``), the round and client panels match the API, and a
screenshot is written (its path is printed).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
from tests.e2e.harness import ScriptedClient, threaded_server, token_env, wait_for
from tests.e2e.scripted_rounds import play_rounds, register, tiny_cfg

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def _chromium() -> str:
    path = next((p for p in CHROMIUM_PATHS if Path(p).is_file()), None) or shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it: apt-get install chromium)")
    return path


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]' installs it; no browser download is needed)")
    return sync_playwright


class Browser:
    """A headless page that records console errors, page errors and every URL it requests."""

    def __init__(self, pw: Any, chromium: str) -> None:
        self.browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                          args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("request", lambda req: self.requests.append(req.url))

    def points(self, chart: str, series: str) -> list[tuple[int, float]]:
        """The (round, value) pairs drawn in a chart for one series, from the SVG elements themselves."""
        pairs = self.page.eval_on_selector_all(
            f"#{chart} svg [data-series='{series}'][data-round]",
            "els => els.map(e => [e.getAttribute('data-round'), e.getAttribute('data-value')])")
        return [(int(r), float(v)) for r, v in pairs]

    def polls(self) -> int:
        # read from Python: wait_for_function evaluates strings in the page, which the page's CSP forbids
        return int(self.page.get_attribute("body", "data-polls") or 0)

    def close(self) -> None:
        self.browser.close()


def _from_status(history: list[dict[str, Any]], column: str) -> list[tuple[int, float]]:
    return [(int(r["round"]), float(r[column])) for r in history if r.get(column) not in ("", None)]


def _daemons(url: str, env: dict[str, str], tmp: Path, n: int) -> tuple[list[Any], list[threading.Thread]]:
    from fl_client.daemon import ClientDaemon, DaemonOptions

    daemons = [ClientDaemon(DaemonOptions(server_url=url, state_dir=tmp / f"client{i}", enrollment_token=env[ENV_ENROLLMENT_TOKEN],
                                          client_name=f"daemon-{i}", capability={"compute": float(i + 1)}, progress=False,
                                          timeout=30.0))
               for i in range(n)]
    threads = [threading.Thread(target=d.run, name=f"daemon-{i}", daemon=True) for i, d in enumerate(daemons)]
    return daemons, threads


@pytest.mark.slow
def test_dashboard_follows_a_training_federation(tmp_path: Path) -> None:
    chromium, sync_playwright = _chromium(), _playwright()
    env = token_env()
    cfg = tiny_cfg(num_clients=3, num_rounds=3, local_epochs=1, batch_size=32, samples_per_client=300)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service), sync_playwright() as pw:
        ui = Browser(pw, chromium)
        # two real daemons and one gate client that uploads only once the page has shown the open
        # round: tiny rounds otherwise open and close between two polls of the page
        daemons, threads = _daemons(url, env, tmp_path, 2)
        try:
            assert requests.get(f"{url}/", allow_redirects=False, timeout=10).headers["Location"].endswith("/dashboard")
            ui.page.goto(f"{url}/?poll=300")  # the redirect from / lands on the dashboard
            assert ui.page.url.startswith(f"{url}/dashboard")
            ui.page.wait_for_selector("body[data-polls]")
            assert ui.page.get_attribute("body", "data-state") == "waiting_for_clients"
            ui.page.evaluate("window.__notReloaded = true")  # a reload would lose this

            ui.page.fill("#admin-token", env[ENV_ADMIN_TOKEN])
            ui.page.click("#admin-show")
            gate = ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "gate")
            numel = service.coordinator.spec.numel
            for t in threads:
                t.start()
            for r in (1, 2, 3):  # while training: the current-round panel shows each open round
                wait_for(lambda r=r: gate.status()["state"] == "selected" and gate.status()["round"] == r, timeout=240)
                ui.page.wait_for_selector(f"#round-progress[data-round='{r}']", timeout=120_000)
                gate.upload(r, torch.zeros(numel), num_samples=300,
                            meta={"num_samples": 300, "metrics": {"train_loss": 1.0, "train_accuracy": 0.5}})
            ui.page.wait_for_selector("body[data-state='finished']", timeout=240_000)
            polls = ui.polls()
            wait_for(lambda: ui.polls() >= polls + 2, timeout=60)  # a full poll after the end
            for t in threads:
                t.join(timeout=60)

            status = requests.get(f"{url}/status", timeout=10).json()
            clients = requests.get(f"{url}/api/v1/clients", headers={"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"},
                                   timeout=10).json()["clients"]
            shot = tmp_path / "dashboard.png"
            ui.page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")

            history = status["history"]
            assert status["state"] == "finished" and len(history) == 3
            # the charts hold exactly the numbers of /status
            assert ui.points("chart-accuracy", "test_accuracy") == _from_status(history, "test_accuracy")
            assert ui.points("chart-loss", "test_loss") == _from_status(history, "test_loss")
            assert ui.points("chart-loss", "train_loss") == _from_status(history, "train_loss")
            assert ui.points("chart-participation", "clients") == _from_status(history, "clients")
            assert ui.points("chart-bytes", "bytes") == _from_status(history, "bytes")
            assert [v for _, v in ui.points("chart-participation", "selected")] == [3.0, 3.0, 3.0]
            assert len(_from_status(history, "test_accuracy")) == 3
            # summary cards and panels
            assert ui.page.inner_text("#v-rounds") == f"{status['completed_rounds']} / {status['num_rounds']}"
            assert ui.page.inner_text("#v-accuracy") == f"{status['accuracy']:.4f}"
            assert ui.page.get_attribute("#privacy-meter", "data-enabled") == "false"
            assert "Differential privacy is off" in ui.page.inner_text("#privacy-meter")
            assert "the run has finished" in ui.page.inner_text("#round-progress")
            # a plain synchronous run: both mode panels say they are off (test_dashboard_panels.py covers them on)
            assert "secagg" not in status and status["training_mode"] == "sync"
            assert ui.page.get_attribute("#secagg-panel", "data-enabled") == "false"
            assert "Secure aggregation is off for this run" in ui.page.inner_text("#secagg-panel")
            assert ui.page.get_attribute("#async-panel", "data-mode") == "sync"
            assert "Synchronous run: no staleness" in ui.page.inner_text("#async-panel")
            assert ui.page.is_hidden("#async-charts") and ui.points("chart-staleness", "staleness_mean") == []
            # the client table, behind the admin token, matches /api/v1/clients
            rows = ui.page.eval_on_selector_all("#client-table tbody tr", """rows => rows.map(r => ({
                id: r.dataset.clientId,
                fields: Object.fromEntries([...r.cells].map(c => [c.dataset.field, c.dataset.value ?? c.textContent]))}))""")
            assert sorted(r["id"] for r in rows) == sorted(c["client_id"] for c in clients)
            by_id = {c["client_id"]: c for c in clients}
            for r in rows:
                c = by_id[r["id"]]
                assert r["fields"]["name"] == c["name"]
                assert int(r["fields"]["rounds_participated"]) == c["rounds_participated"] == 3
                assert float(r["fields"]["last_accuracy"]) == c["last_metrics"]["train_accuracy"]
                assert r["fields"]["capability"] == (", ".join(f"{k}={v:g}" for k, v in c["capability"].items()) or "–")
            assert ui.page.evaluate("window.__notReloaded") is True, "the page must update without reloading"
            assert ui.errors == [], ui.errors
            foreign = [u for u in ui.requests if not u.startswith((url + "/", "data:"))]
            assert foreign == [], f"the dashboard must work offline; it requested {foreign}"
            assert shot.stat().st_size > 20_000
        finally:
            for d in daemons:
                d.stop_event.set()
            ui.close()


@pytest.mark.slow
def test_dashboard_shows_the_privacy_budget(tmp_path: Path) -> None:
    """Client-level DP with central noise: the epsilon chart and meter hold /status's numbers."""
    chromium, sync_playwright = _chromium(), _playwright()
    env = token_env()
    cfg = tiny_cfg(num_rounds=2, differential_privacy=True, dp_mode="client", dp_epsilon=3.0, clip_grad_norm=1.0)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service), sync_playwright() as pw:
        ui = Browser(pw, chromium)
        try:
            clients = register(url, env, 2)
            status = play_rounds(url, clients, service.coordinator.spec.numel, 2)
            ui.page.goto(f"{url}/dashboard?poll=300")
            ui.page.wait_for_selector("body[data-state='finished']")
            ui.page.screenshot(path=str(tmp_path / "dashboard-dp.png"), full_page=True)
            print(f"dashboard screenshot: {tmp_path / 'dashboard-dp.png'}")
            privacy = status["privacy"]
            assert ui.points("chart-privacy", "epsilon") == _from_status(status["history"], "epsilon")
            assert len(ui.points("chart-privacy", "epsilon")) == 2
            assert float(ui.page.get_attribute("#privacy-meter", "data-spent")) == privacy["epsilon_spent"]
            assert float(ui.page.get_attribute("#privacy-meter", "data-budget")) == privacy["epsilon_budget"] == 3.0
            budget = ui.page.get_attribute("#chart-privacy svg [data-series='budget']", "data-value")
            assert float(budget) == 3.0
            assert ui.errors == [], ui.errors
        finally:
            ui.close()
