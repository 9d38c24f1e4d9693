"""Flask app factory: HTTP in, service calls, HTTP out. No algorithm logic lives here.

Every error a client can cause becomes a 4xx with ``{"error": code, "message": text}``; an
unexpected failure becomes a 500 with the same shape and no internals. Request bodies are read
only after the Content-Length check (413 above ``max_update_bytes``).

Monitoring: ``/status`` (JSON summary), ``/metrics`` (Prometheus, ``fl_server.rest.metrics``) and the
live dashboard at ``/dashboard`` (``fl_server.rest.dashboard``) are public and carry no per-client
values; the client table and the audit log (``/api/v1/clients``, ``/api/v1/audit``) need the
admin token. The app also attaches the end-of-run report writer (``fl_server.rest.run_report``).

Routes hold no mode branches: the service hands each call to the gateway (who the client is) or
to the round driver it picked once (synchronous, secure, asynchronous; fl_server/rest/driver.py).

Client selection: ``GET/POST /api/v1/profile`` (signed) let a client learn what the selection
policy reads and report it (fl_server/rest/client_profiles.py). Asynchronous mode: the same endpoints,
with ``GET /api/v1/model?version=V`` naming the version a job trains on (fl_server/rest/async_driver.py).

Secure aggregation: ``/api/v1/rounds/<r>/secagg/{advertise,roster,shares,consistency,unmask,outcome}`` (signed,
``?attempt=ID``) move the protocol's bytes to and from ``fl_server.rest.secure_driver``; the masked input
goes through the update route. A refusal there also says ``dropped`` and ``phase``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, cast

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from fl_common.protocol.rest import (
    HEADER_IDEMPOTENCY,
    HEADER_MODEL_KEY,
    HEADER_MODEL_VERSION,
    MAX_PROFILE_BYTES,
    MAX_SECAGG_MESSAGE_BYTES,
    PATH_CLIENTS,
    PATH_ENROLLMENTS,
    PATH_MODEL,
    PATH_OPENAPI,
    PATH_PROFILE,
    PATH_REGISTER,
    PATH_ROUND,
    PATH_TOKEN,
    QUERY_LIVENESS,
    QUERY_MODEL_VERSION,
    QUERY_SECAGG_ATTEMPT,
)
from fl_server.rest.dashboard import OPENAPI_PATHS as MONITORING_PATHS
from fl_server.rest.dashboard import dashboard_blueprint
from fl_server.rest.gateway import ApiError, Authenticated, SignedRequest
from fl_server.rest.json_provider import FiniteJSONProvider
from fl_server.rest.metrics import install_metrics
from fl_server.rest.openapi import MAX_ROUND_IN_PATH, openapi_document
from fl_server.rest.request_body import WholeBodyRequest
from fl_server.rest.run_report import RunReportWriter
from fl_server.rest.service import FederationService
from fl_server.rest.state_changes import QUERY_WAIT, WaitValueError, parse_wait

log = logging.getLogger("fl_server.http")


def _error(status: int, code: str, message: str, extra: dict[str, Any] | None = None) -> Response:
    resp = jsonify({**(extra or {}), "error": code, "message": message})
    resp.status_code = status
    return resp


def is_decimal(raw: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²' and other digits ``int()`` refuses (a 500)."""
    return raw.isascii() and raw.isdigit()


#: the largest body of a route that takes a small JSON document (registration, token, admin requests)
SMALL_BODY_BYTES = 64 * 1024
#: GET and HEAD carry no body
NO_BODY_BYTES = 0


def create_app(service: FederationService, *, start_ticker: bool = True) -> Flask:
    app = Flask("fl_server")
    app.request_class = WholeBodyRequest  # multi-megabyte uploads read in one piece (request_body.py)
    app.json = FiniteJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = service.cfg.max_update_bytes
    #: per-endpoint body limits, checked from the headers before anything reads a body
    secagg_limit = (MAX_SECAGG_MESSAGE_BYTES, "secagg_body_too_large")
    body_limits = {"upload": (service.cfg.max_update_bytes, "body_too_large"),
                   "profile_report": (MAX_PROFILE_BYTES, "profile_body_too_large"), "secagg_advertise": secagg_limit,
                   "secagg_share_keys": secagg_limit, "secagg_consistency": secagg_limit, "secagg_unmask": secagg_limit,
                   "ckks_key_post": (service.cfg.max_update_bytes, "body_too_large"),
                   "ckks_decrypted": (service.cfg.max_update_bytes, "body_too_large")}
    app.extensions["fl_service"] = service
    install_metrics(app, service)
    app.register_blueprint(dashboard_blueprint(service))
    if not any(isinstance(o, RunReportWriter) for o in service.observers):  # one report, however many apps
        service.observers.add(RunReportWriter())
    if start_ticker:
        service.start()

    def signed_path() -> str:
        return request.full_path if request.query_string else request.path

    def signed(require_token: bool = True) -> Authenticated:
        """Token from the headers first (no body is read for a caller without one), then the signature."""
        headers = cast("Mapping[str, str]", request.headers)  # werkzeug's Headers: case-insensitive get, items
        holder = service.gateway.token_holder(request.method, signed_path(), headers) if require_token else None
        body = request.get_data(cache=True)
        return service.gateway.verify_signature(holder, request.method, signed_path(), body, headers)

    def json_body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ApiError(400, "bad_json", "the request body must be a JSON object")
        return data

    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.before_request
    def _bound_round() -> None:
        """A 23-digit round number reached SQLite (OverflowError, a 500): no round is that large, so such a
        path names nothing (404). Not ``int(max=...)`` in the rule: werkzeug then answers 405 on some paths."""
        if (request.view_args or {}).get("round_number", 0) > MAX_ROUND_IN_PATH:
            raise ApiError(404, "unknown_round", f"round numbers go up to {MAX_ROUND_IN_PATH}")

    @app.before_request
    def _body_limit() -> None:
        """Content-Length checked against the route's own limit before any body is read: four concurrent
        unauthenticated 200 MB posts must not cost the server 800 MB (the global limit is for uploads).
        A request that matched no route (404) or not this method (405 with Allow) gets that answer: reading
        no body, it is as cheap, and it says what is wrong (a GET with a body to a POST route is a 405)."""
        if request.routing_exception is not None:
            return
        if request.method in ("GET", "HEAD", "OPTIONS"):
            if (request.content_length or 0) > NO_BODY_BYTES:
                service.gateway.refusals.count("body_too_large")
                raise ApiError(413, "body_too_large", f"{request.method} requests carry no body")
            return
        limit, refusal = body_limits.get(request.endpoint or "", (SMALL_BODY_BYTES, "body_too_large"))
        if request.content_length is None:
            if request.method == "POST":
                raise ApiError(411, "length_required", "a Content-Length header is required")
            return
        if request.content_length > limit:
            service.gateway.refusals.count(refusal)
            raise ApiError(413, "body_too_large", f"this endpoint reads at most {limit} bytes")

    @app.after_request
    def _log(resp: Response) -> Response:
        log.debug("%s %s -> %d in %.1f ms", request.method, request.path, resp.status_code, 1000 * (time.perf_counter() - g.t0))
        return resp

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.code, exc.message, exc.extra)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        service.gateway.refusals.count("body_too_large")
        return _error(413, "body_too_large", f"request bodies are limited to {service.cfg.max_update_bytes} bytes")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        resp = _error(exc.code or 400, (exc.name or "error").lower().replace(" ", "_"), exc.description or exc.name)
        for name, value in exc.get_headers():  # e.g. 405's Allow: which methods the path does take
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal_error", "the server failed to handle this request; it has been logged")

    # ------------------------------------------------------------------ public
    @app.get("/health")
    def health() -> Response:
        """200 while the federation can make progress; 503 with the reason when it cannot (the round
        ticker keeps failing, or the open round is far past its deadline)."""
        problem = service.health_problem()
        if problem is None:
            return jsonify({"status": "ok"})
        resp = jsonify({"status": "degraded", "reason": problem})
        resp.status_code = 503
        return resp

    @app.get("/status")
    def status() -> Response:
        return jsonify(service.status())

    @app.get(PATH_OPENAPI)
    def openapi() -> Response:
        doc = openapi_document()
        doc["paths"].update(MONITORING_PATHS)
        return jsonify(doc)

    # ------------------------------------------------------------------ clients
    @app.post(PATH_REGISTER)
    def register() -> Response:
        proof = SignedRequest(request.method, signed_path(), request.get_data(cache=True),
                              cast("Mapping[str, str]", request.headers))
        resp = jsonify(service.register(json_body(), remote=request.remote_addr or "", request=proof).to_json())
        resp.status_code = 201
        return resp

    @app.post(PATH_TOKEN)
    def token() -> Response:
        return jsonify(service.refresh_token(signed(require_token=False)))

    def wait_seconds() -> float:
        """``?wait=S`` checked (400 ``bad_wait``): seconds this request may be parked (0: a plain poll)."""
        try:
            return parse_wait(request.args.get(QUERY_WAIT), liveness=service.cfg.client_liveness)
        except WaitValueError as exc:
            raise ApiError(400, "bad_wait", str(exc)) from None

    @app.get(PATH_ROUND)
    def round_status() -> Response:
        """A poll; with ``?wait=S`` and ``If-None-Match: <the ETag of the last answer>`` a long-poll, answered
        as soon as the round's state moves (a round opens or closes, a secure phase changes) or after S s; with
        ``&liveness=1`` too (a heartbeat) answered only when this client's round or state moves (the round closes:
        its parked thread is free for the next round), never at a secure phase change, or after S s."""
        auth = signed()
        wait = wait_seconds()
        liveness = request.args.get(QUERY_LIVENESS)
        if liveness not in (None, "1"):
            raise ApiError(400, "bad_liveness", f"{QUERY_LIVENESS} takes only the value 1 (a heartbeat's long-poll)")
        status, etag = service.poll_round(auth, wait=wait, known=request.headers.get("If-None-Match"),
                                          liveness=liveness is not None)
        resp = jsonify(status.to_json())
        if etag is not None:
            resp.headers["ETag"] = etag
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get(PATH_PROFILE)
    def profile_spec() -> Response:
        return jsonify(service.profile(signed()))

    @app.post(PATH_PROFILE)
    def profile_report() -> Response:
        auth = signed()
        return jsonify(service.set_profile(auth, request.get_json(silent=True, force=True)))

    @app.get(PATH_MODEL)
    def model() -> Response:
        """The global model (synchronous rounds), or the version a job trains on (``?version=V``, asynchronous)."""
        auth = signed()
        raw = request.args.get(QUERY_MODEL_VERSION)
        if raw is not None and (not is_decimal(raw) or len(raw) > 9):
            raise ApiError(400, "bad_version", "version must be a non-negative integer")
        version = service.model_version(None if raw is None else int(raw))
        etag = f'"v{version}"'
        if request.headers.get("If-None-Match") == etag:
            resp = Response(status=304)
        else:
            version, payload, wrapped_key = service.model_payload(auth, version)
            etag = f'"v{version}"'
            resp = Response(payload, mimetype="application/octet-stream")
            if wrapped_key is not None:
                resp.headers[HEADER_MODEL_KEY] = wrapped_key.decode("ascii")
        resp.headers["ETag"] = etag
        resp.headers[HEADER_MODEL_VERSION] = str(version)
        return resp

    @app.post("/api/v1/rounds/<int:round_number>/update")
    def upload(round_number: int) -> Response:
        auth = signed()
        result = service.accept_update(auth, round_number, request.headers.get(HEADER_IDEMPOTENCY, ""), request.get_data(cache=True),
                                       attempt=request.args.get(QUERY_SECAGG_ATTEMPT))
        resp = jsonify(result)
        resp.status_code = 202
        return resp

    # ------------------------------------------------------------------ secure aggregation (fl_server/rest/secure_driver.py)
    def protocol_bytes(data: bytes) -> Response:
        return Response(data, mimetype="application/octet-stream" if service.cfg.encryption else "application/json")

    def secagg_post(round_number: int, step: str) -> Response:
        rounds = service.secure_protocol()
        auth = signed()
        handler = {"advertise": rounds.advertise, "shares": rounds.share_keys, "consistency": rounds.consistency,
                   "unmask": rounds.unmask}[step]
        return jsonify(handler(auth, round_number, request.args.get(QUERY_SECAGG_ATTEMPT), request.get_data(cache=True)))

    @app.post("/api/v1/rounds/<int:round_number>/secagg/advertise")
    def secagg_advertise(round_number: int) -> Response:
        return secagg_post(round_number, "advertise")

    def secagg_get(round_number: int, step: str) -> Response:
        """The GET side of a phase: what this client must read before its next message. With ``?wait=S`` a
        request that comes before the phase (409 ``wrong_phase``) is parked until the phase begins or S s pass."""
        rounds = service.secure_protocol()
        reader = {"roster": rounds.roster, "shares": rounds.bundle, "consistency": rounds.consistency_check,
                  "unmask": rounds.unmask_request}[step]
        auth = signed()
        attempt = request.args.get(QUERY_SECAGG_ATTEMPT)

        def read() -> bytes | ApiError:
            try:
                return reader(auth, round_number, attempt)
            except ApiError as exc:
                if exc.code != "wrong_phase":
                    raise
                return exc

        answer, _ = service.long_poll(read, wait=wait_seconds(), ready=lambda a: not isinstance(a, ApiError))
        if isinstance(answer, ApiError):
            raise answer
        return protocol_bytes(answer)

    @app.get("/api/v1/rounds/<int:round_number>/secagg/roster")
    def secagg_roster(round_number: int) -> Response:
        return secagg_get(round_number, "roster")

    @app.post("/api/v1/rounds/<int:round_number>/secagg/shares")
    def secagg_share_keys(round_number: int) -> Response:
        return secagg_post(round_number, "shares")

    @app.get("/api/v1/rounds/<int:round_number>/secagg/shares")
    def secagg_bundle(round_number: int) -> Response:
        return secagg_get(round_number, "shares")

    @app.get("/api/v1/rounds/<int:round_number>/secagg/consistency")
    def secagg_consistency_check(round_number: int) -> Response:
        return secagg_get(round_number, "consistency")

    @app.post("/api/v1/rounds/<int:round_number>/secagg/consistency")
    def secagg_consistency(round_number: int) -> Response:
        return secagg_post(round_number, "consistency")

    @app.get("/api/v1/rounds/<int:round_number>/secagg/unmask")
    def secagg_unmask_request(round_number: int) -> Response:
        return secagg_get(round_number, "unmask")

    @app.post("/api/v1/rounds/<int:round_number>/secagg/unmask")
    def secagg_unmask(round_number: int) -> Response:
        return secagg_post(round_number, "unmask")

    @app.get("/api/v1/rounds/<int:round_number>/secagg/outcome")
    def secagg_outcome(round_number: int) -> Response:
        """How an attempt ended; with ``?wait=S`` an attempt still open is waited for (at most S s)."""
        rounds = service.secure_protocol()
        auth = signed()
        attempt = request.args.get(QUERY_SECAGG_ATTEMPT)
        answer, _ = service.long_poll(lambda: rounds.outcome(auth, round_number, attempt), wait=wait_seconds(),
                                      ready=lambda a: a.get("state") != "open")
        return jsonify(answer)

    # ------------------------------------------------------------------ CKKS aggregation (fl_server/rest/ckks_driver.py)
    @app.post("/api/v1/rounds/<int:round_number>/ckks/key")
    def ckks_key_post(round_number: int) -> Response:
        auth = signed()
        return jsonify(service.ckks_protocol().post_key(auth, round_number, request.args.get(QUERY_SECAGG_ATTEMPT),
                                                        request.get_data(cache=True)))

    @app.get("/api/v1/rounds/<int:round_number>/ckks/key")
    def ckks_key_get(round_number: int) -> Response:
        return protocol_bytes(service.ckks_protocol().get_key(signed(), round_number, request.args.get(QUERY_SECAGG_ATTEMPT)))

    @app.get("/api/v1/rounds/<int:round_number>/ckks/sum")
    def ckks_sum(round_number: int) -> Response:
        return protocol_bytes(service.ckks_protocol().get_sum(signed(), round_number, request.args.get(QUERY_SECAGG_ATTEMPT)))

    @app.post("/api/v1/rounds/<int:round_number>/ckks/decrypted")
    def ckks_decrypted(round_number: int) -> Response:
        auth = signed()
        return jsonify(service.ckks_protocol().post_decrypted(auth, round_number, request.args.get(QUERY_SECAGG_ATTEMPT),
                                                              request.get_data(cache=True)))

    @app.get("/api/v1/rounds/<int:round_number>/ckks/outcome")
    def ckks_outcome(round_number: int) -> Response:
        return jsonify(service.ckks_protocol().outcome(signed(), round_number, request.args.get(QUERY_SECAGG_ATTEMPT)))

    # ------------------------------------------------------------------ admin
    def require_admin() -> None:
        if not service.is_admin(request.headers.get("Authorization", "")):
            service.refuse("bad_admin_token", f"{request.method} {request.path} from {request.remote_addr}")
            raise ApiError(401, "bad_admin_token", "this endpoint needs 'Authorization: Bearer <admin token>'")

    @app.get(PATH_CLIENTS)
    def clients() -> Response:
        require_admin()
        return jsonify({"clients": service.clients()})

    @app.post(f"{PATH_CLIENTS}/<client_id>/revoke")
    def client_revoke(client_id: str) -> Response:
        require_admin()
        return jsonify(service.revoke_client(client_id))

    @app.delete(f"{PATH_CLIENTS}/<client_id>")
    def client_remove(client_id: str) -> Response:
        require_admin()
        return jsonify(service.remove_client(client_id))

    @app.post(PATH_ENROLLMENTS)
    def enrollment_create() -> Response:
        require_admin()
        resp = jsonify(service.create_enrollment(json_body()))
        resp.status_code = 201
        return resp

    @app.get(PATH_ENROLLMENTS)
    def enrollment_list() -> Response:
        require_admin()
        return jsonify({"enrollments": service.enrollments()})

    @app.delete(f"{PATH_ENROLLMENTS}/<enrollment_id>")
    def enrollment_revoke(enrollment_id: str) -> Response:
        require_admin()
        return jsonify(service.revoke_enrollment(enrollment_id))

    @app.get("/api/v1/audit")
    def audit() -> Response:
        """Security events, newest first: registrations, token renewals, every refusal (bad tokens and
        signatures, replays, refused updates, bad admin tokens). ``?limit=N`` (1-10000, default 200)."""
        require_admin()
        raw = request.args.get("limit", "200")
        if not is_decimal(raw) or len(raw) > 5 or not 1 <= int(raw) <= 10000:
            raise ApiError(400, "bad_limit", "limit must be an integer from 1 to 10000")
        return jsonify({"events": service.store.security_events(limit=int(raw))})

    return app


__all__ = ["PATH_CLIENTS", "PATH_MODEL", "PATH_OPENAPI", "PATH_PROFILE", "PATH_REGISTER", "PATH_ROUND", "PATH_TOKEN", "create_app"]
