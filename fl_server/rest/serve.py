"""Serving the Flask app with gunicorn: one worker process (the coordinator is one process) with
a gthread pool, so slow uploads do not block polls. TLS via gunicorn's certfile/keyfile.

Long-polls (fl_server/rest/state_changes.py) park one request thread each while they wait, so the pool
is sized for the federation: two threads per configured client (a round long-poll and a training heartbeat)
plus :data:`SPARE_THREADS` for uploads, downloads and monitoring, and at most that many minus the spare are ever parked (beyond it a
long-poll is answered at once and the client simply polls). Why gthread and not gevent: the worker
must also run the round ticker and the aggregation (torch, CPU bound, GIL released): under gevent's
monkey-patching they would block the event loop and every parked request with it, while a parked
gthread thread costs only its stack; see benchmarks/results/fast_rounds/README.md for the measurement."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from fl_common.config import FLConfig

log = logging.getLogger("fl_server.rest.serve")

#: request threads never parked by a long-poll (uploads, model downloads, /status, /metrics)
SPARE_THREADS = 8
#: the most request threads the pool is sized to, however many clients are configured
MAX_THREADS = 512
#: long-polls one client may have parked at once: its round (or secure-phase) long-poll and, while it trains,
#: its heartbeat (fl_client/heartbeat.py)
PARKED_PER_CLIENT = 2


def request_threads(requested: int, num_clients: int) -> int:
    """The gthread pool: what was asked for, raised to two threads per client plus the spare (bounded)."""
    return max(requested, min(MAX_THREADS, PARKED_PER_CLIENT * num_clients + SPARE_THREADS))


class _GunicornApp(BaseApplication):
    def __init__(self, factory: Callable[[], Any], options: dict[str, Any]) -> None:
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self._factory()


def answer_parked_on_stop(close: Callable[[], None]) -> None:
    """In the gunicorn worker: on SIGTERM, answer parked long-polls at once, then let gunicorn stop as it does.
    Without it a graceful stop waits for every parked request (up to graceful_timeout) before the worker exits."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        close()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def serve(cfg: FLConfig, state_dir: Path, *, host: str = "127.0.0.1", port: int = 8080, threads: int = 8,
          certfile: str | None = None, keyfile: str | None = None, log_format: str = "text",
          log_level: str = "INFO") -> None:
    threads = request_threads(threads, cfg.num_clients)

    def factory() -> Any:
        # Runs in the gunicorn worker (after fork): the service, its SQLite connection and its
        # round ticker thread belong to the process that serves requests.
        from fl_server.rest.app import create_app
        from fl_server.rest.memory import ReleaseAfterRound, limit_arenas
        from fl_server.rest.service import FederationService

        limit_arenas()  # before the ticker and the request threads exist (fl_server/rest/memory.py)
        service = FederationService(cfg, state_dir)
        service.changes.max_waiters = max(1, threads - SPARE_THREADS)  # an upload always finds a free thread
        answer_parked_on_stop(service.changes.close)
        service.observers.add(ReleaseAfterRound())
        return create_app(service)

    def worker_exit(server: Any, worker: Any) -> None:
        app = getattr(worker, "wsgi", None)
        service = getattr(app, "extensions", {}).get("fl_service") if app is not None else None
        if service is not None:
            service.close()

    options = {
        "bind": f"{host}:{port}", "workers": 1, "worker_class": "gthread", "threads": threads,
        "timeout": 300, "graceful_timeout": 20, "keepalive": 5, "certfile": certfile, "keyfile": keyfile,
        "accesslog": None, "errorlog": "-", "loglevel": "info", "worker_exit": worker_exit,
        "limit_request_line": 8190, "proc_name": "fl_server",
    }
    if log_format == "json":  # gunicorn's own lines too, not only the app's (fl_common/logs.py)
        from fl_common.logs import gunicorn_json_logconfig

        options["logconfig_dict"] = gunicorn_json_logconfig(log_level)
    scheme = "https" if certfile else "http"
    log.info("serving on %s://%s:%d (state in %s, %d request threads)", scheme, host, port, state_dir, threads)
    _GunicornApp(factory, options).run()
