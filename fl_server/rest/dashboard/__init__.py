"""The live dashboard: ``GET /dashboard`` (and ``GET /`` redirects there).

A static page (``static/index.html``, ``dashboard.js``, ``dashboard.css``; shipped as package
data) that polls JSON and redraws itself without reloading. It needs nothing from the internet:
the charts are small SVG drawn by our own plain JavaScript, no chart library, no CDN, and the
page's Content-Security-Policy only allows this server as a source.

What it reads, and who may read it:

* ``GET /status`` (public) - the run summary and per-round history; the charts plot its numbers,
  and its ``secagg`` block (secure aggregation: phase, threshold, dropouts per phase) or, under CKKS, its
  ``ckks`` block (phase, inputs summed, completed and aborted attempts) and ``asynchronous``
  block (buffer fill, staleness per model version and histogram) fill the two mode panels, which
  say plainly when the run uses neither.
* ``GET /api/v1/dashboard/rounds`` (public) - per round attempt: how many clients were selected,
  submitted and dropped, and how the attempt ended. Counts only, as public as ``/status``.
* ``GET /api/v1/clients`` (admin) - the client table. Client names, liveness, capabilities and the
  training accuracy each client reported are per-client facts, so the page asks for the admin token
  and sends it only to this server, held in the page's memory (never stored, never in a URL).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, jsonify, redirect, send_from_directory

if TYPE_CHECKING:  # pragma: no cover
    from fl_server.rest.service import FederationService
    from fl_server.store.sqlite import RoundRow

STATIC_DIR = Path(__file__).resolve().parent / "static"
PATH_DASHBOARD = "/dashboard"
PATH_DASHBOARD_ROUNDS = "/api/v1/dashboard/rounds"
#: The page may load from and talk to this server only; no inline script, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: most recent attempts returned by the rounds endpoint (the charts show the last 200 rounds of /status)
MAX_ATTEMPTS = 400


class RoundAttempts:
    """Per-attempt participation counts, with finished attempts cached: they never change again."""

    def __init__(self, service: FederationService) -> None:
        self.service = service
        self._done: dict[int, dict[str, Any]] = {}

    def _summarise(self, row: RoundRow) -> dict[str, Any]:
        statuses = self.service.store.round_participants(row.round_id).values()
        submitted = sum(1 for s in statuses if s == "submitted")
        dropped = sum(1 for s in statuses if s == "dropped")
        return {"attempt": row.round_id, "round": row.round, "state": row.state, "reason": row.reason,
                "selected": len(row.selected), "quorum": row.target, "submitted": submitted, "dropped": dropped,
                "started_at": row.started_at, "closed_at": row.closed_at}

    def list(self) -> list[dict[str, Any]]:
        out = []
        for row in reversed(self.service.store.round_rows(limit=MAX_ATTEMPTS)):
            if row.round_id in self._done:
                out.append(self._done[row.round_id])
                continue
            item = self._summarise(row)
            if row.state != "open":
                self._done[row.round_id] = item
            out.append(item)
        return out


def _static(name: str) -> Response:
    resp = send_from_directory(STATIC_DIR, name, max_age=0)
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


def dashboard_blueprint(service: FederationService) -> Blueprint:
    bp = Blueprint("dashboard", __name__)
    attempts = RoundAttempts(service)

    @bp.get("/")
    def root() -> Any:
        return redirect(PATH_DASHBOARD, code=302)

    @bp.get(PATH_DASHBOARD)
    def page() -> Response:
        return _static("index.html")

    @bp.get(f"{PATH_DASHBOARD}/static/<path:name>")
    def asset(name: str) -> Response:
        return _static(name)  # send_from_directory refuses paths outside STATIC_DIR (404)

    @bp.get(PATH_DASHBOARD_ROUNDS)
    def rounds() -> Response:
        cfg = service.cfg
        return jsonify({"rounds": attempts.list(),
                        "config": {"num_rounds": cfg.num_rounds, "clients_per_round": cfg.clients_per_round,
                                   "min_clients": cfg.min_clients, "round_timeout": cfg.round_timeout}})

    return bp


OPENAPI_PATHS: dict[str, Any] = {
    "/": {"get": {"summary": "Redirects to /dashboard", "responses": {"302": {"description": "to the dashboard"}}}},
    PATH_DASHBOARD: {"get": {"summary": "Live dashboard (HTML; polls /status, the rounds endpoint and, with the admin "
                                        "token, /api/v1/clients)", "responses": {"200": {"description": "page"}}}},
    PATH_DASHBOARD_ROUNDS: {"get": {"summary": "Participation per round attempt: selected, submitted, dropped (public)",
                                    "responses": {"200": {"description": "round attempts"}}}},
    "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format; public, no per-client values)",
                         "responses": {"200": {"description": "metrics"}}}},
}

__all__ = ["CSP", "OPENAPI_PATHS", "PATH_DASHBOARD", "PATH_DASHBOARD_ROUNDS", "STATIC_DIR", "dashboard_blueprint"]
