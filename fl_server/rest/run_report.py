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

and calls :func:`fl_server.reports.write_report`, which draws the plots and writes ``report.md``
and ``report.html``. A failure is logged and never costs the run its results.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

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
    return write_report_logged(run_dir)


class RunReportWriter(ServiceObserver):
    """Writes the report once the run has finished."""

    def run_finished(self, run: FinishedRun) -> None:
        write_rest_report(run)


__all__ = ["ACCURACY_MEASURE", "RunReportWriter", "client_accuracy_rows", "participation_rows", "write_rest_report"]
