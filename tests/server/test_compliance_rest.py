"""The compliance record of a REST run, and erasure of a client's stored data.

A real server on loopback with real scripted clients (signed, encrypted uploads). One client is
erased through the admin CLI while round 1, which holds its update, is still open: its
contribution stays in the model and the round totals, and after the run no file under the state
folder (raw bytes, the SQLite files included) and no row of any table holds its id. The record's
numbers are checked against summary.json, history.csv, participation_rounds.csv, the store and the
audit log, each read here independently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch

from fl_common.protocol.rest import ENV_ADMIN_TOKEN
from fl_server.__main__ import main as server_main
from fl_server.compliance import DP_MEANING, ERASURE_LIMIT
from fl_server.rest.audit import read_events
from tests.e2e.harness import threaded_server, token_env, wait_for
from tests.e2e.scripted_rounds import play_round, register, status, tiny_cfg


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mentions(state_dir: Path, needle: str) -> list[str]:
    """Every file under the state folder whose name or raw bytes hold ``needle``, and every table with a row that does."""
    found = [p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*")
             if p.is_file() and (needle in p.name or needle.encode() in p.read_bytes())]
    con = sqlite3.connect(state_dir / "server.db")
    try:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in con.execute(f"SELECT * FROM {table}"):
                if any(needle in (v if isinstance(v, str) else v.decode("latin-1")) for v in row if isinstance(v, (str, bytes))):
                    found.append(f"table {table}")
                    break
    finally:
        con.close()
    return found


@pytest.fixture(scope="module")
def erased_run(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> dict:
    tmp = tmp_path_factory.mktemp("compliance")
    env = token_env()
    state = tmp / "srv"
    # round 2 starts with the two clients left after round_start_wait (3 s) instead of waiting for a third
    cfg = tiny_cfg(num_clients=3, num_rounds=2, round_start_wait=3.0, min_clients=2)
    with threaded_server(cfg, state, env) as (url, service):
        clients = register(url, env, 3)
        numel = service.coordinator.spec.numel
        for c in clients:
            wait_for(lambda c=c: c.status()["state"] == "selected" and c.status()["round"] == 1, timeout=60)
        victim = clients[1]
        victim.upload(1, torch.full((numel,), 0.002), meta={"num_samples": 20, "metrics": {"train_loss": 1.0}})
        monkeypatch_module.setenv(ENV_ADMIN_TOKEN, env[ENV_ADMIN_TOKEN])
        answer_file = tmp / "answer.json"
        with open(answer_file, "w") as out, pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdout", out)
            assert server_main(["admin", "--server-url", url, "--json", "clients", "remove", victim.id]) == 0
        answer = json.loads(answer_file.read_text())
        mid_run = _mentions(state, victim.id)
        for k, c in ((0, clients[0]), (2, clients[2])):
            c.upload(1, torch.full((numel,), 0.001 * (k + 1)), meta={"num_samples": 10, "metrics": {"train_loss": 1.0}})
        wait_for(lambda: status(url)["completed_rounds"] >= 1, timeout=60)
        play_round(url, [clients[0], clients[2]], numel, 2)
        final = wait_for(lambda: (s := status(url))["state"] == "finished" and s, timeout=60)
        ids = [c.id for c in clients]
    return {"state": state, "victim": victim.id, "name": "c1", "answer": answer, "mid_run": mid_run, "final": final,
            "ids": ids}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_an_erased_client_leaves_no_file_and_no_row(erased_run: dict) -> None:
    state, victim = erased_run["state"], erased_run["victim"]
    answer = erased_run["answer"]
    assert answer["erased"] is True and answer["remaining"] == [] and answer["files"] == 1  # its one update payload
    assert answer["receipt"].startswith("er-") and answer["kept"] == ERASURE_LIMIT
    assert erased_run["mid_run"] == [], "nothing right after the erasure"
    # round 1 still closed with its update in it, and after the run (two checkpoints, the reports) nothing names it
    assert _mentions(state, victim) == []
    history = _rows(state / "run" / "history.csv")
    assert [int(h["clients"]) for h in history] == [3, 2]
    names = {r["client"] for r in _rows(state / "run" / "participation.csv")}
    assert erased_run["name"] not in names and len(names) == 2
    # the audit log records the request with its receipt, and neither the id nor the name
    erasures = [e for e in read_events(state, limit=1000) if e["kind"] == "client_erased"]
    assert len(erasures) == 1 and erasures[0]["client_id"] is None
    assert answer["receipt"] in erasures[0]["detail"] and victim not in erasures[0]["detail"]


def test_the_compliance_record_equals_the_run_files_the_store_and_the_audit_log(erased_run: dict) -> None:
    state = erased_run["state"]
    run = state / "run"
    record = json.loads((run / "compliance.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    history = _rows(run / "history.csv")
    assert record["run"] == {"driver": "rest", "mode": "rest", "rounds_completed": 2, "rows_in_history_csv": 2}
    left = record["left_the_clients"]
    assert left["traffic_bytes_per_round"] == [int(h["bytes"]) for h in history]
    assert left["traffic_bytes_total"] == summary["total_bytes"] == sum(int(h["bytes"]) for h in history)
    assert left["codec"] == summary["codec"] and left["individual_updates_visible_to_server"] is True
    con = sqlite3.connect(state / "server.db")
    uploaded = {str(r): int(n) for r, n in con.execute("SELECT round, SUM(nbytes) FROM updates GROUP BY round")}
    con.close()
    # the erased client's upload is gone from the store, so its bytes are not in round 1's total any more
    assert left["update_bytes_uploaded_per_round"] == uploaded and left["update_bytes_uploaded_total"] == sum(uploaded.values())
    protections = record["protections"]
    assert protections["differential_privacy"]["on"] is False and protections["secure_aggregation"]["on"] is False
    assert protections["transport_tls"]["tls"] is None  # a threaded test server: not started by `serve`
    part = record["participation"]
    survivors = sorted(i for i in erased_run["ids"] if i != erased_run["victim"])
    assert sorted(part["pseudonymous_ids"]) == survivors
    per_round = _rows(run / "participation_rounds.csv")
    for r in part["per_round"]:
        mine = [p for p in per_round if int(p["round"]) == r["round"]]
        assert r["selected"] == sum(int(p["selected"]) for p in mine)
        assert r["arrived"] == sum(int(p["arrived"]) for p in mine) == int(history[r["round"] - 1]["clients"]) == r["aggregated"]
    assert [r["arrived"] for r in part["per_round"]] == [3, 2]
    assert sum(i.startswith("erased-") for i in part["took_part"]) == 1
    # the audit digest, recomputed here from `python -m fl_server audit`'s reader
    events = read_events(state, limit=100_000)
    lines = [json.dumps([e["id"], e["at"], e["kind"], e["client_id"], e["detail"]], separators=(",", ":"), ensure_ascii=False)
             for e in events]
    audit = record["audit_log"]
    assert audit["events"] == len(events) and audit["last_id"] == events[-1]["id"]
    assert audit["sha256"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()
    dsr = record["data_subject_requests"]
    assert dsr["erasures"] == 1 and dsr["erasure_receipts"] == [erased_run["answer"]["receipt"]]
    retention = record["storage"]["retention"]
    assert retention["audit_log_days"] == summary["config"]["audit_retention_days"]
    assert retention["audit_log_max_events"] == summary["config"]["audit_max_events"]
    # the report carries the same record
    md = (run / "report.md").read_text()
    assert "## Compliance record" in md and audit["sha256"] in md and erased_run["answer"]["receipt"] in md
    assert set(DP_MEANING)  # the meanings exist for both granularities (sample, client)
