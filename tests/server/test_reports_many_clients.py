"""The report's per-client plots and tables past a few hundred clients (stepped areas instead of bars, a
labelled tick every k-th client, no per-client table rows past MAX_CLIENT_ROWS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_server import reports


def _folder(tmp_path: Path, clients: int) -> Path:
    run = tmp_path / f"run{clients}"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"mode": "federated", "rounds_completed": 2, "config": {}}))
    (run / "history.csv").write_text("round,test_accuracy,test_loss,train_loss,clients,seconds,bytes,epsilon\n"
                                     "1,0.5,1.2,1.3,10,1.0,100,\n2,0.6,1.1,1.2,10,1.0,100,\n")
    rows = ["client,class_0,class_1,total"] + [f"{c},{c % 7},{6 - c % 7},6" for c in range(clients)]
    (run / "label_histograms.csv").write_text("\n".join(rows) + "\n")
    reports.write_client_tables(run, participation=[{"client": c, "selected": c % 3, "participated": c % 2,
                                                     "dropped": c % 3 - c % 2 if c % 3 >= c % 2 else 0}
                                                    for c in range(clients)])
    return run


@pytest.mark.parametrize("clients", [100, reports.MAX_BARS + 50])
def test_per_client_plots_and_tables_with_many_clients(tmp_path: Path, clients: int) -> None:
    files = reports.write_report(_folder(tmp_path, clients))
    for name in (reports.CLIENT_DATA_PNG, reports.PARTICIPATION_PNG):
        assert files[name].read_bytes().startswith(b"\x89PNG"), name
    md = files[reports.REPORT_MD].read_text()
    assert f"{clients} clients; rounds taken part in per client" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and line.count("|") == 5]
    assert len(table_rows) == (clients + 1 if clients <= reports.MAX_CLIENT_ROWS else 0)  # header + one per client
