"""The dashboard's routes on a real server (no browser): page, assets, CSP, rounds endpoint, OpenAPI."""

from __future__ import annotations

from pathlib import Path

import requests

from fl_server.rest.dashboard import CSP, STATIC_DIR
from tests.e2e.harness import threaded_server, token_env
from tests.e2e.scripted_rounds import play_rounds, register, tiny_cfg


def test_dashboard_routes(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(tiny_cfg(num_rounds=2), tmp_path / "srv", env) as (url, service):
        root = requests.get(f"{url}/", allow_redirects=False, timeout=10)
        assert root.status_code == 302 and root.headers["Location"].endswith("/dashboard")
        page = requests.get(f"{url}/dashboard", timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert page.headers["Content-Security-Policy"] == CSP and "connect-src 'self'" in CSP
        assert page.text == (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        assert "http://" not in page.text and "https://" not in page.text, "no external resource"
        for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
            asset = requests.get(f"{url}/dashboard/static/{name}", timeout=10)
            assert asset.status_code == 200 and kind in asset.headers["Content-Type"], name
            assert "http://" not in asset.text.replace("http://www.w3.org/2000/svg", ""), name
        for bad in ("../__init__.py", "..%2F__init__.py", "nope.js"):
            r = requests.get(f"{url}/dashboard/static/{bad}", timeout=10)
            assert r.status_code == 404 and r.json()["error"] == "not_found", bad

        empty = requests.get(f"{url}/api/v1/dashboard/rounds", timeout=10).json()
        assert empty["rounds"] == [] and empty["config"]["num_rounds"] == 2
        clients = register(url, env, 2)
        play_rounds(url, clients, service.coordinator.spec.numel, 2)
        rounds = requests.get(f"{url}/api/v1/dashboard/rounds", timeout=10).json()["rounds"]
        assert [(r["round"], r["state"], r["reason"], r["selected"], r["submitted"], r["dropped"]) for r in rounds] == \
            [(1, "closed", "quorum", 2, 2, 0), (2, "closed", "quorum", 2, 2, 0)]
        assert all(not any(isinstance(v, str) and v.startswith("c-") for v in r.values()) for r in rounds), \
            "the public rounds endpoint carries counts, not client ids"
        doc = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
        assert {"/metrics", "/dashboard", "/api/v1/dashboard/rounds", "/"} <= set(doc["paths"])
