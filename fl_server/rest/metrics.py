"""Prometheus metrics for the REST server: ``GET /metrics``.

Three sources, one registry per app (never prometheus-client's global one, so tests that build
many apps in one process do not collide, and a scrape shows exactly one federation):

* :class:`FederationCollector` reads the service's state at scrape time (``service.status()``
  and a few store counts): the round and state, clients, accepted and rejected updates, accuracy,
  loss and the privacy budget. Read, not mirrored: nothing can drift from ``/status``, and the
  durable counters (accepted updates, refusals by reason) keep counting across restarts.
* :class:`MetricsObserver` is a :class:`~fl_server.rest.observer.ServiceObserver`: the service tells
  it when rounds close, abort and are evaluated, and it fills the duration histograms.
* :func:`install_http_metrics` times every request in Flask's before/after hooks, labelled by the
  URL rule (``/api/v1/rounds/<int:round_number>/update``, not the raw path: bounded cardinality)
  and status, and counts request and response bytes.

Correct under gunicorn because the server runs exactly one worker process (``serve.py``: the
coordinator is one process) with a gthread pool: the registry lives in that worker, metric
updates are thread-safe, and no multiprocess mode is needed. A scrape costs one ``status()``
(the same lock and queries as ``GET /status``) plus two small SQL aggregates.

No metric carries a client id or any per-client value: the endpoint is as public as ``/status``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fl_server.rest.ckks_driver import PHASES as CKKS_PHASES
from fl_server.rest.ckks_driver import CKKSRounds
from fl_server.rest.observer import ServiceObserver
from fl_server.rest.secure_driver import PHASE_ORDER, SecureRounds

if TYPE_CHECKING:  # pragma: no cover
    from fl_server.rest.service import FederationService
    from fl_server.store import HistoryRecord

#: ``/status``'s ``state`` values, each a label of ``fl_federation_state``
STATES = ("waiting_for_clients", "training", "finished")
#: refusal counters whose reason starts with this are update refusals; the rest are auth / request refusals
UPDATE_PREFIX = "update_"

#: Round-scale buckets (seconds): a tiny test round closes in milliseconds, a real one in minutes.
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
#: Request-scale buckets (seconds): polls take milliseconds, a model download or upload up to seconds.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class FederationCollector:
    """Gauges and durable counters, read from the service at scrape time."""

    def __init__(self, service: FederationService) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        # Registered with auto_describe off: scraping, not registering, reads the service.
        return []

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        status = svc.status()
        yield from self._federation(status)
        yield from self._clients(status, svc)
        yield from self._updates(status)
        yield from self._model(status)
        yield from self._privacy(status.get("privacy") or {})

    @staticmethod
    def _federation(status: dict[str, Any]) -> Iterator[Metric]:
        state = GaugeMetricFamily("fl_federation_state", "1 for the federation's current state, 0 for the others",
                                  labels=["state"])
        for s in STATES:
            state.add_metric([s], 1.0 if status["state"] == s else 0.0)
        yield state
        info = GaugeMetricFamily("fl_federation_info", "Constant 1; the labels describe the run's settings",
                                 labels=["aggregation_method", "codec", "encryption", "differential_privacy",
                                         "secure_aggregation"])
        info.add_metric([str(status.get("aggregation_method")), str(status.get("codec")),
                         str(bool(status.get("encryption"))).lower(), str(bool(status.get("differential_privacy"))).lower(),
                         str(bool(status.get("secure_aggregation"))).lower()], 1.0)
        yield info
        yield _gauge("fl_rounds_completed", "Rounds completed (the global model's version)", status["completed_rounds"])
        yield _gauge("fl_rounds_planned", "Rounds the run is configured for (num_rounds)", status["num_rounds"])
        cur = status.get("current_round") or {}
        yield _gauge("fl_round_current", "Number of the open round; 0 when no round is open", cur.get("round", 0))
        yield _gauge("fl_round_selected_clients", "Clients selected for the open round (0 when none is open)",
                     cur.get("selected", 0))
        yield _gauge("fl_round_quorum", "Updates that close the open round early (0 when none is open)", cur.get("quorum", 0))
        yield _gauge("fl_round_arrived_updates", "Updates accepted so far in the open round", cur.get("arrived", 0))
        yield _gauge("fl_round_deadline_seconds", "Seconds until the open round's deadline (0 when none is open)",
                     cur.get("deadline_in_s", 0.0))
        yield CounterMetricFamily("fl_unusable_aggregates", "Round attempts (or asynchronous updates) refused because the "
                                  "aggregate was not finite: nothing of them was applied", value=status.get("unusable_aggregates", 0))
        yield _gauge("fl_uptime_seconds", "Seconds since this server process started its service", status.get("uptime_s", 0.0))

    @staticmethod
    def _clients(status: dict[str, Any], svc: FederationService) -> Iterator[Metric]:
        clients = status.get("clients") or {}
        yield _gauge("fl_clients_registered", "Clients registered with this server", clients.get("registered", 0))
        yield _gauge("fl_clients_online", "Clients heard from within client_liveness seconds", clients.get("online", 0))
        dropped = sum(p.get("dropped", 0) for p in svc.store.participation().values())
        yield CounterMetricFamily("fl_clients_dropped", "Selections that ended without the client's update "
                                  "(selected client missed a round's close), over all rounds", value=dropped)

    @staticmethod
    def _updates(status: dict[str, Any]) -> Iterator[Metric]:
        yield CounterMetricFamily("fl_updates_accepted", "Client updates accepted (durable, aggregated)",
                                  value=status.get("updates_accepted", 0))
        upd = CounterMetricFamily("fl_updates_rejected", "Client updates refused, by reason", labels=["reason"])
        other = CounterMetricFamily("fl_requests_refused", "Requests refused before reaching an update "
                                    "(authentication, signature, size, admin token), by reason", labels=["reason"])
        for reason, count in sorted((status.get("rejected") or {}).items()):
            if reason.startswith(UPDATE_PREFIX):
                upd.add_metric([reason[len(UPDATE_PREFIX):]], count)
            else:
                other.add_metric([reason], count)
        yield upd
        yield other

    @staticmethod
    def _model(status: dict[str, Any]) -> Iterator[Metric]:
        if status.get("accuracy") is not None:
            yield _gauge("fl_global_accuracy", "Test accuracy of the global model at its last evaluation", status["accuracy"])
        if status.get("loss") is not None:
            yield _gauge("fl_global_loss", "Test loss of the global model at its last evaluation", status["loss"])
        history = status.get("history") or []
        if history:
            last = history[-1]
            yield _gauge("fl_round_last_clients", "Updates aggregated in the last closed round", last["clients"])
            yield _gauge("fl_round_last_bytes", "Bytes (model downloads and updates) of the last closed round", last["bytes"])

    @staticmethod
    def _privacy(privacy: dict[str, Any]) -> Iterator[Metric]:
        on = privacy.get("differential_privacy") is True
        yield _gauge("fl_privacy_enabled", "1 when differential privacy is on for this run", 1.0 if on else 0.0)
        if not on:
            return  # no epsilon is claimed for a run without DP: no number rather than a misleading 0
        for key, name, doc in (("epsilon_spent", "fl_privacy_epsilon_spent", "Epsilon spent so far (the accountant's)"),
                               ("epsilon_budget", "fl_privacy_epsilon_budget", "Epsilon budget of the run (dp_epsilon)"),
                               ("delta", "fl_privacy_delta", "Delta of the (epsilon, delta) guarantee")):
            value = privacy.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield _gauge(name, doc, value)


class MetricsObserver(ServiceObserver):
    """Round, aggregation and evaluation durations, and round outcomes, as the service reports them.

    The aggregation time is ``close_round``'s wall time minus the evaluation inside it: finishing
    the streaming aggregate, applying it, checking it and the privacy accounting. (Folding each
    update into the aggregate happens as it arrives, inside the upload request's latency.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.round_seconds = Histogram("fl_round_duration_seconds", "Wall time of a round, from opening to closing",
                                       buckets=ROUND_BUCKETS, registry=registry)
        self.aggregation_seconds = Histogram("fl_aggregation_duration_seconds", "Wall time to finish, apply and account "
                                             "a round's aggregate (evaluation excluded)", buckets=ROUND_BUCKETS,
                                             registry=registry)
        self.evaluation_seconds = Histogram("fl_evaluation_duration_seconds", "Wall time of one evaluation of the global "
                                            "model on the test set", buckets=ROUND_BUCKETS, registry=registry)
        self.rounds_closed = Counter("fl_rounds_closed", "Rounds closed by this process, by what closed them",
                                     ["reason"], registry=registry)
        self.rounds_aborted = Counter("fl_rounds_aborted", "Round attempts aborted by this process (fewer than "
                                      "min_clients updates at the deadline)", registry=registry)
        self._eval_in_close = 0.0

    def evaluated(self, seconds: float) -> None:
        self.evaluation_seconds.observe(seconds)
        self._eval_in_close += seconds

    def round_closed(self, record: HistoryRecord, *, reason: str, selected: int, arrived: int,
                     close_seconds: float) -> None:
        self.round_seconds.observe(record.seconds)
        self.aggregation_seconds.observe(max(0.0, close_seconds - self._eval_in_close))
        self._eval_in_close = 0.0
        self.rounds_closed.labels(reason=reason).inc()

    def round_aborted(self, round_number: int, arrived: int) -> None:
        self.rounds_aborted.inc()


class HttpMetrics:
    """Request latency by URL rule, method and status; bytes in and out by URL rule."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram("fl_http_request_duration_seconds", "HTTP request latency, by endpoint (URL rule), "
                                 "method and status", ["endpoint", "method", "status"], buckets=HTTP_BUCKETS,
                                 registry=registry)
        self.bytes_in = Counter("fl_http_received_bytes", "Request body bytes received, by endpoint", ["endpoint"],
                                registry=registry)
        self.bytes_out = Counter("fl_http_sent_bytes", "Response body bytes sent, by endpoint", ["endpoint"],
                                 registry=registry)

    def observe(self, endpoint: str, method: str, status: int, seconds: float, received: int, sent: int) -> None:
        self.latency.labels(endpoint=endpoint, method=method, status=str(status)).observe(seconds)
        if received:
            self.bytes_in.labels(endpoint=endpoint).inc(received)
        if sent:
            self.bytes_out.labels(endpoint=endpoint).inc(sent)


def endpoint_label() -> str:
    """The matched URL rule, so that /api/v1/rounds/3/update and /4/update share one series."""
    rule = request.url_rule
    return rule.rule if rule is not None else "<unmatched>"


def install_http_metrics(app: Flask, http: HttpMetrics) -> None:
    @app.before_request
    def _metrics_start() -> None:
        g.fl_metrics_t0 = time.perf_counter()

    @app.after_request
    def _metrics_record(resp: Response) -> Response:
        t0: float | None = g.get("fl_metrics_t0")
        if t0 is not None:
            sent = resp.content_length  # set for every buffered body and for files sent by send_file
            if sent is None and not resp.is_streamed and not resp.direct_passthrough:
                sent = resp.calculate_content_length()
            http.observe(endpoint_label(), request.method, resp.status_code, time.perf_counter() - t0,
                         int(request.content_length or 0), int(sent or 0))
        return resp


class AppMetrics:
    """Everything ``/metrics`` shows for one app: its own registry and the three sources."""

    def __init__(self, service: FederationService) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FederationCollector(service))
        self.observer = MetricsObserver(self.registry)
        self.http = HttpMetrics(self.registry)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)


def install_metrics(app: Flask, service: FederationService) -> AppMetrics:
    """Create the app's registry, hook the service and Flask, and route ``GET /metrics``."""
    metrics = AppMetrics(service)
    if service.secure_rounds is not None:
        metrics.registry.register(SecAggCollector(service.secure_rounds, service.lock))
    if service.ckks_rounds is not None:
        metrics.registry.register(CKKSCollector(service.ckks_rounds, service.lock))
    service.observers.add(metrics.observer)
    install_http_metrics(app, metrics.http)
    app.add_url_rule("/metrics", "metrics", metrics.exposition, methods=["GET"])
    app.extensions["fl_metrics"] = metrics
    return metrics



class ProtectedRoundsCollector:
    """``/metrics`` of a protected-round method (masking or CKKS), read from its ``/status`` block at scrape time:
    the open attempt's phase (one gauge per phase, 1 for the current one), its client counts per set, the method's
    own extras, and the completed rounds and aborted attempts. The subclasses name the method's metrics, phases
    and sets; the shape is one, so a dashboard or alert written for one method reads the other the same way."""

    #: metric name prefix (``fl_<prefix>_phase``, ...), what the help texts call a round, phases and client sets
    prefix = ""
    what = ""
    phases: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    sets_doc = ""
    completed_doc = ""
    aborts_doc = ""

    def __init__(self, read_status: Callable[[], dict[str, Any]], lock: threading.RLock) -> None:
        self.read_status = read_status
        self.lock = lock

    def describe(self) -> list[Metric]:
        return []

    def extra(self, st: dict[str, Any], cur: dict[str, Any]) -> Iterator[Metric]:
        """The method's own metrics, between the client sets and the round counters."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            st = self.read_status()
        cur = st.get("current") or {}
        phase = GaugeMetricFamily(f"fl_{self.prefix}_phase", f"1 for the open {self.what} round's protocol phase (none: no "
                                  f"round open)", labels=["phase"])
        for p in ("none", *self.phases):
            phase.add_metric([p], 1.0 if cur.get("phase", "none") == p else 0.0)
        yield phase
        sets = GaugeMetricFamily(f"fl_{self.prefix}_round_clients", self.sets_doc, labels=["set"])
        for name in self.sets:
            sets.add_metric([name], float(cur.get(name, 0)))
        yield sets
        yield from self.extra(st, cur)
        yield CounterMetricFamily(f"fl_{self.prefix}_rounds_completed", self.completed_doc, value=st["rounds_completed"])
        yield CounterMetricFamily(f"fl_{self.prefix}_aborts", self.aborts_doc, value=st["aborted_attempts"])


class SecAggCollector(ProtectedRoundsCollector):
    """``/metrics`` for secure aggregation (masking): the open round's phase and set sizes, threshold, dropouts and aborts."""

    prefix, what = "secagg", "secure"
    phases = tuple(ph.value for ph in PHASE_ORDER)
    sets = ("selected", "u1", "u2", "u3", "u4")
    sets_doc = ("Clients of the open secure round: selected, and U1..U4 (advertised keys, shared keys, sent a masked input, "
                "answered the unmask request; so far while the phase is open)")
    completed_doc = "Secure rounds unmasked and applied"
    aborts_doc = ("Secure round attempts aborted (too few clients for the threshold, a server restart, ...): nothing of them "
                  "was applied")

    def __init__(self, rounds: SecureRounds, lock: threading.RLock) -> None:
        super().__init__(rounds.status, lock)

    def extra(self, st: dict[str, Any], cur: dict[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily("fl_secagg_threshold", "Shamir threshold t of the open secure round (0 when none)",
                                value=float(cur.get("threshold", 0)))
        drops = CounterMetricFamily("fl_secagg_dropouts", "Clients dropped from secure rounds, by the phase they dropped in "
                                    "(finished attempts, and the open one)", labels=["phase"])
        total = dict(st.get("dropouts_by_phase") or {})
        for ph, n in (cur.get("dropouts_by_phase") or {}).items():
            total[ph] = total.get(ph, 0) + n
        for p in self.phases:
            drops.add_metric([p], float(total.get(p, 0)))
        yield drops


class CKKSCollector(ProtectedRoundsCollector):
    """``/metrics`` for CKKS aggregation: the open round's phase, its selected clients and inputs summed so far, and
    completed rounds and aborted attempts (``/status``'s ``ckks`` block)."""

    prefix, what = "ckks", "CKKS"
    phases = CKKS_PHASES
    sets = ("selected", "inputs")
    sets_doc = "Clients of the open CKKS round: selected, and those whose ciphertexts are in the sum so far"
    completed_doc = "CKKS rounds decrypted and applied"
    aborts_doc = ("CKKS round attempts aborted (too few inputs, a silent decryptor, a server restart, ...): nothing of them "
                  "was applied")

    def __init__(self, rounds: CKKSRounds, lock: threading.RLock) -> None:
        super().__init__(rounds.status, lock)


__all__ = ["STATES", "AppMetrics", "CKKSCollector", "FederationCollector", "HttpMetrics", "MetricsObserver",
           "ProtectedRoundsCollector", "SecAggCollector", "install_metrics"]
