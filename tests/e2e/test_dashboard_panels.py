"""The dashboard's secure-aggregation and asynchronous panels in a real headless Chromium.

Real threaded servers on loopback, driven by scripted clients (real HTTP, signing, encryption; the
real SecAgg client state machine) so the test knows every number the server must report. The page
polls on its own; the test waits until it shows the state the clients left the server in (a state
that no deadline can move) and then checks that every shown number is the one ``/status`` has:

* secure aggregation: an attempt aborted below the threshold, then a second attempt held in its
  key-sharing phase (the panel's phase, per-phase client counts and dropouts equal the ``secagg``
  block), then completed (rounds, aborts, dropouts and the last round's threshold and scheme);
* asynchronous FedBuff: the buffer fill while an update waits in it, then the staleness per model
  version and the histogram of accepted updates' staleness, point for point.

Both also check the other panel's off-state, that nothing was requested outside the server's
origin and that the page logged no error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from fl_client.api import ApiRefused
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from tests.e2e.harness import ScriptedClient, threaded_server, token_env, wait_for
from tests.e2e.scripted_rounds import tiny_cfg
from tests.e2e.test_dashboard_browser import Browser, _chromium, _from_status, _playwright
from tests.e2e.test_rest_secagg import SecureClient

#: every phase closes as soon as all expected clients have answered; the deadlines are far enough
#: away that the test can hold an attempt in a phase while the page catches up, on a loaded machine
SECURE: dict[str, Any] = {"secure_aggregation": True, "poll_interval": 0.05, "secagg_phase_timeout": 300.0,
                          "round_timeout": 300.0, "over_selection": 0.0, "client_selection_ratio": 1.0,
                          "secagg_threshold": 0.6}
PHASES = (("advertise_keys", "u1"), ("share_keys", "u2"), ("masked_input", "u3"), ("consistency_check", "signed"),
          ("unmask", "u4"))
#: the page's timeouts, in ms: generous, only ever reached when something is broken
PAGE_MS = 120_000


def _status(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/status", timeout=10).json()


def _dataset(ui: Browser, selector: str) -> dict[str, str]:
    return ui.page.eval_on_selector(selector, "e => Object.assign({}, e.dataset)")


def _secagg_shown(ui: Browser) -> dict[str, Any]:
    """The secure-aggregation panel's data attributes and its per-phase table (the numbers it shows)."""
    rows = ui.page.eval_on_selector_all("#secagg-phases tbody tr", """rows => rows.map(r => [r.dataset.phase,
        Object.fromEntries([...r.cells].filter(c => c.dataset.field !== 'phase')
                                       .map(c => [c.dataset.field, c.dataset.value ?? null])), r.className])""")
    return {"data": _dataset(ui, "#secagg-panel"), "rows": [(p, cells, cls) for p, cells, cls in rows]}


def _secagg_expected(sa: dict[str, Any]) -> dict[str, Any]:
    """What the panel must show for a ``secagg`` block of /status, as strings, the way the DOM holds them."""
    cur, last = sa["current"], sa["last_round"]
    params = cur or (last or {}).get("params")
    data = {"enabled": "true", "phase": cur["phase"] if cur else "none", "roundsCompleted": str(sa["rounds_completed"]),
            "abortedAttempts": str(sa["aborted_attempts"])}
    if params:
        data["threshold"] = str(params["threshold"])
    auth = (cur or {}).get("auth") or (last or {}).get("auth")
    if auth:
        data["auth"] = auth
    if cur:
        data["attempt"] = str(cur["attempt"])
    rows = []
    for phase, u in PHASES:
        cells = {"clients": str(cur[u]) if cur else None,
                 "dropped": str(cur["dropouts_by_phase"].get(phase, 0)) if cur else None,
                 "dropped_total": str(sa["dropouts_by_phase"].get(phase, 0))}
        rows.append((phase, cells, "current" if cur and cur["phase"] == phase else ""))
    return {"data": data, "rows": rows}


def _refused_and_dropped(call: Any) -> None:
    with pytest.raises(ApiRefused) as err:
        call()
    assert 400 <= err.value.status < 500 and err.value.data.get("dropped") is True, err.value.data


def _common_checks(ui: Browser, url: str) -> None:
    assert ui.errors == [], ui.errors
    foreign = [u for u in ui.requests if not u.startswith((url + "/", "data:"))]
    assert foreign == [], f"the dashboard must work offline; it requested {foreign}"


@pytest.mark.slow
def test_secure_aggregation_panel_shows_the_status_secagg_block(tmp_path: Path) -> None:
    chromium, sync_playwright = _chromium(), _playwright()
    env = token_env()
    cfg = tiny_cfg(num_clients=5, num_rounds=1, **SECURE)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service), sync_playwright() as pw:
        ui = Browser(pw, chromium)
        try:
            ui.page.goto(f"{url}/dashboard?poll=300")
            ui.page.wait_for_selector("#secagg-panel[data-enabled='true']", timeout=PAGE_MS)
            assert ui.page.get_attribute("#async-panel", "data-mode") == "sync"
            assert "Synchronous run: no staleness" in ui.page.inner_text("#async-panel")
            numel = service.coordinator.spec.numel
            clients = [SecureClient(url, env, f"s{i}", seed=200 + i) for i in range(5)]

            # attempt 1: everyone advertises, three send garbage instead of their shares (a refusal is a
            # drop): 2 shares < threshold 4 (0.6 x 5 holders, raised to withstand one colluding holder), so the
            # attempt aborts and applies nothing
            first = [c.join(1) for c in clients]
            assert first[0].params.threshold == 4
            for s in first:
                s.advertise()
            for c in clients[:2]:
                c.s.share_keys()
            for c in clients[2:]:
                _refused_and_dropped(lambda c=c: c.send("shares", b"not a share message"))
            wait_for(lambda: _status(url)["secagg"]["aborted_attempts"] == 1, timeout=120)

            # attempt 2: one client sends a garbage key advertisement, four go on; two share their keys
            # and the attempt then waits in share_keys for the other two (deadline minutes away)
            second = [c.join(1) for c in clients]
            assert second[0].attempt != first[0].attempt
            _refused_and_dropped(lambda: clients[4].send("advertise", b"not an advertisement"))
            for s in second[:4]:
                s.advertise()
            for c in clients[:2]:
                c.s.share_keys()
            held = _status(url)["secagg"]
            cur = held["current"]
            assert (cur["phase"], cur["u1"], cur["u2"], cur["dropouts_by_phase"]) == ("share_keys", 4, 2, {"advertise_keys": 1})
            assert held["dropouts_by_phase"] == {"share_keys": 3} and held["aborted_attempts"] == 1
            assert cur["auth"] == "ed25519" and cur["threshold"] == 4 and cur["complete_graph"] is True
            wait_for(lambda: _secagg_shown(ui) == _secagg_expected(_status(url)["secagg"]), timeout=120)
            shown = _secagg_shown(ui)
            assert shown == _secagg_expected(held)  # nothing moved while the page caught up
            assert {p: c["clients"] for p, c, _ in shown["rows"]} == \
                {"advertise_keys": "4", "share_keys": "2", "masked_input": "0", "consistency_check": "0", "unmask": "0"}
            text = ui.page.inner_text("#secagg-panel")
            assert f"attempt {cur['attempt']}: phase share keys" in text and "Threshold 4" in text
            assert "tolerates 2 colluding client(s)" in text  # 2t > h + c: 8 > 5 + 2
            assert "classic SecAgg" in text and "Ed25519" in text and "1 attempt(s) aborted" in text
            assert "threshold" in ui.page.inner_text("#secagg-panel .abort-reasons")
            ui.page.screenshot(path=str(tmp_path / "dashboard-secagg.png"), full_page=True)
            print(f"dashboard screenshot: {tmp_path / 'dashboard-secagg.png'}")

            # the rest of attempt 2: it completes with the four
            for c in clients[2:4]:
                c.s.share_keys()
            rng = np.random.default_rng(5)
            for k, c in enumerate(clients[:4]):
                c.s.masked_input(c.plain(rng.normal(0.0, 0.01, numel), 10 + 5 * k), {})
            for c in clients[:4]:
                c.s.consistency()
            for c in clients[:4]:
                c.s.unmask()
            assert clients[0].s.outcome()["state"] == "closed"
            ui.page.wait_for_selector("body[data-state='finished']", timeout=PAGE_MS)
            wait_for(lambda: _secagg_shown(ui) == _secagg_expected(_status(url)["secagg"]), timeout=120)
            final = _status(url)["secagg"]
            assert final["current"] is None and final["rounds_completed"] == 1 and final["aborted_attempts"] == 1
            assert final["dropouts_by_phase"] == {"share_keys": 3, "advertise_keys": 1}
            assert final["last_round"]["params"]["threshold"] == 4 and final["last_round"]["auth"] == "ed25519"
            shown = _secagg_shown(ui)
            assert shown == _secagg_expected(final)
            assert shown["data"]["phase"] == "none" and shown["data"]["threshold"] == "4"
            assert {p: c["dropped_total"] for p, c, _ in shown["rows"]} == \
                {"advertise_keys": "1", "share_keys": "3", "masked_input": "0", "consistency_check": "0", "unmask": "0"}
            assert "No secure attempt is open" in ui.page.inner_text("#secagg-panel")
            _common_checks(ui, url)
        finally:
            ui.close()


def test_asynchronous_panel_shows_buffer_and_staleness_of_status(tmp_path: Path) -> None:
    """FedBuff, K=2, three clients holding jobs on version 0: the third update arrives one version stale."""
    chromium, sync_playwright = _chromium(), _playwright()
    env = token_env()
    cfg = tiny_cfg(num_clients=3, num_rounds=2, training_mode="async", async_algorithm="fedbuff", fedbuff_k=2,
                   over_selection=0.3)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service), sync_playwright() as pw:
        ui = Browser(pw, chromium)
        try:
            assert requests.get(f"{url}/dashboard", timeout=10).status_code == 200  # the async server serves the page
            ui.page.goto(f"{url}/dashboard?poll=300")
            ui.page.wait_for_selector("#async-panel[data-mode='async']", timeout=PAGE_MS)
            assert ui.page.get_attribute("#secagg-panel", "data-enabled") == "false"
            assert "Secure aggregation is off for this run" in ui.page.inner_text("#secagg-panel")
            numel = service.coordinator.spec.numel
            a, b, c = (ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"a{i}") for i in range(3))
            assert [(s["state"], s["round"]) for s in (a.status(), b.status(), c.status())] == [("selected", 0)] * 3
            vec = torch.full((numel,), 0.001)
            assert a.upload(0, vec)["status"] == "buffered"  # buffer 1 of 2, model still version 0

            def buffer_shown() -> dict[str, str]:
                d = _dataset(ui, "#async-panel")
                return {k: d.get(k) for k in ("modelVersion", "buffered", "bufferK", "inFlight", "concurrency",
                                              "updatesApplied", "algorithm")}

            def buffer_expected(st: dict[str, Any]) -> dict[str, str]:
                x = st["asynchronous"]
                return {"modelVersion": str(x["model_version"]), "buffered": str(x["buffered"]), "bufferK": str(x["buffer_k"]),
                        "inFlight": str(x["in_flight"]), "concurrency": str(x["concurrency"]),
                        "updatesApplied": str(x["updates_applied"]), "algorithm": x["algorithm"]}

            held = _status(url)
            assert (held["asynchronous"]["buffered"], held["asynchronous"]["buffer_k"], held["model_version"]) == (1, 2, 0)
            wait_for(lambda: buffer_shown() == buffer_expected(_status(url)), timeout=120)
            assert buffer_shown() == buffer_expected(held)
            assert float(ui.page.get_attribute("#async-summary meter", "value")) == 1.0
            assert "Buffer: 1 of K = 2" in ui.page.inner_text("#async-summary")
            assert "asynchronous run" in ui.page.inner_text("#round-progress")

            assert b.upload(0, vec)["status"] == "applied"  # version 1, both updates fresh (staleness 0)
            assert c.upload(0, vec)["staleness"] == 1  # trained on version 0, arrives at version 1: buffered
            job = b.status()  # b's slot was refilled at once, on version 1
            assert (job["state"], job["round"]) == ("selected", 1)
            done = b.upload(1, vec)
            assert (done["status"], done["staleness"], done["model_version"]) == ("applied", 0, 2)
            ui.page.wait_for_selector("body[data-state='finished']", timeout=PAGE_MS)
            polls = ui.polls()
            wait_for(lambda: ui.polls() >= polls + 2, timeout=120)  # a full poll after the end

            st = _status(url)
            history, x = st["history"], st["asynchronous"]
            assert _from_status(history, "staleness_mean") == [(1, 0.0), (2, 0.5)]
            assert _from_status(history, "staleness_max") == [(1, 0.0), (2, 1.0)]
            assert x["staleness"]["histogram"] == {"0": 3, "1": 1}
            # the charts hold exactly the numbers of /status
            assert ui.points("chart-staleness", "staleness_mean") == _from_status(history, "staleness_mean")
            assert ui.points("chart-staleness", "staleness_max") == _from_status(history, "staleness_max")
            assert ui.points("chart-staleness-hist", "updates") == \
                sorted((int(k), float(v)) for k, v in x["staleness"]["histogram"].items())
            assert buffer_shown() == buffer_expected(st)
            assert ui.page.is_visible("#chart-staleness svg")
            text = ui.page.inner_text("#async-summary")
            assert f"model version {x['model_version']} of {st['num_rounds']}" in text
            assert f"mean {x['staleness']['mean']:.2f}" in text and f"max {x['staleness']['max']}" in text
            ui.page.screenshot(path=str(tmp_path / "dashboard-async.png"), full_page=True)
            print(f"dashboard screenshot: {tmp_path / 'dashboard-async.png'}")
            _common_checks(ui, url)
        finally:
            ui.close()


@pytest.mark.slow
def test_ckks_panel_shows_the_status_ckks_block(tmp_path: Path) -> None:
    """A CKKS run: the secure-aggregation panel shows the ``ckks`` block (never "off"), held with two of three inputs
    in the sum, then after the round is decrypted and applied."""
    from fl_common.he import available
    from tests.e2e.test_rest_ckks import CKKS, Client

    if not available():
        pytest.skip("the [he] extra (tenseal) is not installed")
    chromium, sync_playwright = _chromium(), _playwright()
    env = token_env()
    cfg = tiny_cfg(num_clients=3, num_rounds=1, **{**CKKS, "secagg_phase_timeout": 300.0, "round_timeout": 300.0})

    def shown(ui: Browser) -> dict[str, Any]:
        rows = ui.page.eval_on_selector_all("#ckks-phases tbody tr", """rows => rows.map(r => [r.dataset.phase,
            r.querySelector("[data-field=state]").dataset.value ?? null, r.className])""")
        return {"data": _dataset(ui, "#secagg-panel"), "rows": rows}

    def expected(ck: dict[str, Any]) -> dict[str, Any]:
        cur = ck["current"]
        data = {"enabled": "true", "method": "ckks", "phase": cur["phase"] if cur else "none",
                "roundsCompleted": str(ck["rounds_completed"]), "abortedAttempts": str(ck["aborted_attempts"])}
        if cur:
            data.update(attempt=str(cur["attempt"]), inputs=str(cur["inputs"]), selected=str(cur["selected"]))
        order = ["public_key", "inputs", "decrypt"]
        at = order.index(cur["phase"]) if cur and cur["phase"] in order else len(order)
        rows = [[p, None if not cur else "done" if i < at else "open" if i == at else "pending",
                 "current" if cur and cur["phase"] == p else ""] for i, p in enumerate(order)]
        return {"data": data, "rows": rows}

    with threaded_server(cfg, tmp_path / "srv", env) as (url, service), sync_playwright() as pw:
        ui = Browser(pw, chromium)
        try:
            ui.page.goto(f"{url}/dashboard?poll=300")
            ui.page.wait_for_selector("#secagg-panel[data-method='ckks']", timeout=PAGE_MS)
            numel = service.coordinator.spec.numel
            clients = [Client(url, env, f"k{i}", 100) for i in range(3)]
            sessions = [c.join(1) for c in clients]
            dec = next(s for s in sessions if s.decryptor)
            dec.publish_key()
            rng = np.random.default_rng(3)
            waiting = next(s for s in sessions if s is not dec)
            for s in sessions:
                if s is not waiting:
                    s.send_input(rng.normal(0.0, 0.01, numel), 50, {})
            held = _status(url)["ckks"]
            assert (held["current"]["phase"], held["current"]["inputs"], held["current"]["selected"]) == ("inputs", 2, 3)
            wait_for(lambda: shown(ui) == expected(_status(url)["ckks"]), timeout=120)
            assert shown(ui) == expected(held)  # nothing moved while the page caught up
            text = ui.page.inner_text("#secagg-panel")
            assert "phase encrypted inputs" in text and "2 of 3 selected clients' inputs" in text
            assert "Secure aggregation is off" not in text

            waiting.send_input(rng.normal(0.0, 0.01, numel), 50, {})
            dec.decrypt_sum()
            ui.page.wait_for_selector("body[data-state='finished']", timeout=PAGE_MS)
            wait_for(lambda: shown(ui) == expected(_status(url)["ckks"]), timeout=120)
            final = _status(url)["ckks"]
            assert final["current"] is None and final["rounds_completed"] == 1 and final["aborted_attempts"] == 0
            assert "No CKKS attempt is open" in ui.page.inner_text("#secagg-panel")
            assert "1 CKKS round(s) completed; 0 attempt(s) aborted" in ui.page.inner_text("#secagg-panel")
            _common_checks(ui, url)
        finally:
            ui.close()
