"""The end-of-run report of a REST server run: the same report simulation runs get, plus per-client tables.

When the round driver finishes the last round it has written ``history.csv``, ``summary.json`` and
``model.pt`` into ``STATE_DIR/run/``. :class:`RunReportWriter` (an observer the service attaches)
then adds, from the server's store:

* ``participation.csv`` - per client: round attempts it was selected for, rounds its update was
  aggregated in, and selections that ended without its update;
* ``client_accuracy.csv`` - per client, the training accuracy it reported with its last update
  (only clients that report one; clients under differential privacy do not);
* two keys in ``summary.json`` the report states exactly: ``codec`` (when the service did not record
  it) and ``client_metrics_sent``, the names of every metric any client sent with an update;

and calls :func:`fl_server.reports.write_report`, which draws the plots and writes ``report.md``,
``report.html`` and ``compliance.json``, the latter with the :class:`~fl_server.compliance.DeploymentFacts`
built here from the store (pseudonymous ids, uploaded bytes per round, the audit log's digest, the
erasures handled, retention settings) and from ``STATE_DIR/transport.json`` (TLS, written by ``serve``).
A failure is logged and never costs the run its results.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fl_server.compliance import (
    ERASURE_EVENT,
    AuditDigest,
    AuditEvent,
    DeploymentFacts,
    read_transport_record,
    receipt_of,
)
from fl_server.rest.observer import FinishedRun, ServiceObserver
from fl_server.store.sqlite import ServerStore

log = logging.getLogger("fl_server.rest.run_report")

ACCURACY_MEASURE = "training accuracy the client reported with its last update (its own data, during local training)"


def participation_rows(store: ServerStore) -> list[dict[str, Any]]:
    counts = store.participation()
    rows = []
    for c in store.clients():
        mine = counts.get(c.client_id, {})
        rows.append({"client": c.name or c.client_id, "selected": sum(mine.values()),
                     "participated": c.rounds_participated, "dropped": mine.get("dropped", 0)})
    return rows


def client_accuracy_rows(store: ServerStore) -> list[dict[str, Any]]:
    rows = []
    for c in store.clients():
        acc = (c.last_metrics or {}).get("train_accuracy")
        if isinstance(acc, (int, float)) and not isinstance(acc, bool):
            rows.append({"client": c.name or c.client_id, "accuracy": float(acc), "measure": ACCURACY_MEASURE})
    return rows


def metrics_sent(store: ServerStore) -> list[str]:
    """Every metric name any client sent with an accepted update, over all round attempts (and asynchronous jobs)."""
    names: set[str] = set()
    for row in store.round_rows(limit=1_000_000):
        for update in store.updates_for_round(row.round_id):
            names.update(update.metrics)
    for metrics in store.async_update_metrics():  # training_mode async: no round attempts
        names.update(metrics)
    return sorted(names)


def audit_events(store: ServerStore) -> list[AuditEvent]:
    """Every event the audit log keeps, oldest first."""
    rows = store.security_events(limit=2**62)
    return [AuditEvent(int(r["id"]), float(r["at"]), str(r["kind"]), r["client_id"], str(r["detail"])) for r in reversed(rows)]


def update_bytes_per_round(store: ServerStore) -> dict[int, int]:
    """Bytes of the accepted updates (as uploaded) per round number, over all attempts of a round."""
    out: dict[int, int] = {}
    for row in store.round_rows(limit=1_000_000):
        for update in store.updates_for_round(row.round_id):
            out[update.round] = out.get(update.round, 0) + int(update.nbytes)
    return out


def deployment_facts(run: FinishedRun) -> DeploymentFacts:
    """What the compliance record of a REST run adds to the run folder's files (see fl_server/compliance.py)."""
    state_dir = run.run_dir.path.parent  # the service keeps its run folder in STATE_DIR/run
    events = audit_events(run.store)
    receipts = tuple(r for r in (receipt_of(e.detail) for e in events if e.kind == ERASURE_EVENT) if r)
    cfg = run.cfg
    notes = ("asynchronous mode: uploaded bytes are not broken down per round",) if cfg.training_mode == "async" else ()
    return DeploymentFacts(state_dir=state_dir, transport=read_transport_record(state_dir),
                           client_ids=tuple(run.store.client_ids()), update_bytes_per_round=update_bytes_per_round(run.store),
                           audit=AuditDigest.of(events), erasure_receipts=receipts,
                           audit_retention_days=cfg.audit_retention_days, audit_max_events=cfg.audit_max_events,
                           session_ttl_s=cfg.session_ttl, notes=notes)


def write_rest_report(run: FinishedRun) -> dict[str, Path]:
    from fl_server.reports import (  # lazily: matplotlib only at the end
        write_client_tables,
        write_report_logged,
    )

    run_dir = run.run_dir.path
    write_client_tables(run_dir, participation_rows(run.store), client_accuracy_rows(run.store))
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        cfg = run.cfg  # the simulation's spelling: "<update codec> + <wire compression>", or "none"
        summary.setdefault("codec", f"{run.codec_name} + {cfg.wire_compression}" if cfg.compression else "none")
        summary["client_metrics_sent"] = metrics_sent(run.store)
        run.run_dir.write_json("summary.json", summary)
    return write_report_logged(run_dir, deployment_facts(run))


class RunReportWriter(ServiceObserver):
    """Writes the report once the run has finished."""

    def run_finished(self, run: FinishedRun) -> None:
        write_rest_report(run)


__all__ = ["ACCURACY_MEASURE", "RunReportWriter", "audit_events", "client_accuracy_rows", "deployment_facts", "participation_rows",
           "update_bytes_per_round", "write_rest_report"]
