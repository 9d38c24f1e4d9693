"""Reports of REST server runs: written when the last round closes, numbers equal to history.csv.

Real servers on loopback, real scripted clients (signed, encrypted uploads). Also the report's
per-client sections (participation, per-client accuracy) and the privacy statement's exact wording.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import requests

from fl_common.protocol.rest import ENV_ADMIN_TOKEN
from fl_server import report_template as T
from fl_server.reports import write_report
from fl_server.rest.run_report import ACCURACY_MEASURE
from tests.e2e.harness import threaded_server, token_env
from tests.e2e.scripted_rounds import play_rounds, register, tiny_cfg

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _md_row(md: str, first_cell: str, unique: bool = True) -> list[str]:
    """The cells of the markdown table row starting with ``first_cell`` (the first such row when not unique)."""
    lines = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(lines) == 1 if unique else lines, (first_cell, lines)
    return [c.strip() for c in lines[0].strip().strip("|").split("|")]


def test_rest_run_writes_its_report_with_the_numbers_of_history_csv(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(tiny_cfg(num_clients=3, num_rounds=3), tmp_path / "srv", env) as (url, service):
        clients = register(url, env, 3)
        st = play_rounds(url, clients, service.coordinator.spec.numel, 3)
        table = requests.get(f"{url}/api/v1/clients", headers={"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"},
                             timeout=10).json()["clients"]
    run = tmp_path / "srv" / "run"
    for name in ("report.md", "report.html", "accuracy_loss.png", "participation.png", "client_accuracy.png",
                 "participation.csv", "client_accuracy.csv"):
        assert (run / name).is_file(), name
    for png in ("accuracy_loss.png", "participation.png", "client_accuracy.png"):
        assert (run / png).read_bytes()[:8] == PNG
    assert not (run / "privacy_budget.png").exists(), "no differential privacy: no budget plot"
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    history = _rows(run / "history.csv")
    assert len(history) == 3 and [h["round"] for h in history] == ["1", "2", "3"]
    # every cell of history.csv, exactly, in the report's per-round table; and the status history agrees
    header = list(history[0])
    for row, live in zip(history, st["history"], strict=False):
        cells = _md_row(md, row["round"])
        assert cells == [row[c] or T.EMPTY_CELL for c in header]
        assert float(row["test_accuracy"]) == live["test_accuracy"] and int(row["bytes"]) == live["bytes"]
        assert f">{row['test_accuracy']}<" in page
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "rest" and summary["final_accuracy"] == float(history[-1]["test_accuracy"])
    assert _md_row(md, "final test accuracy")[1] == repr(summary["final_accuracy"])
    assert _md_row(md, "rounds completed")[1] == "3"
    assert _md_row(md, "total bytes")[1].startswith(str(sum(int(h["bytes"]) for h in history)))
    assert _md_row(md, "codec", unique=False)[1] == "int8 + zstd" == summary["codec"]  # results; config has "int8"
    # per client: participation.csv equals the server's own client table
    part = {r["client"]: r for r in _rows(run / "participation.csv")}
    assert set(part) == {c["name"] for c in table}
    for c in table:
        assert int(part[c["name"]]["participated"]) == c["rounds_participated"] == 3
        assert int(part[c["name"]]["dropped"]) == c["dropped"] == 0
        assert int(part[c["name"]]["selected"]) == 3
    acc = {r["client"]: r for r in _rows(run / "client_accuracy.csv")}
    assert {k: float(v["accuracy"]) for k, v in acc.items()} == {c["name"]: c["last_metrics"]["train_accuracy"] for c in table}
    assert all(r["measure"] == ACCURACY_MEASURE for r in acc.values())
    assert "3 clients; rounds taken part in per client: min 3, median 3, max 3; 0 selections ended without" in md
    # the privacy statement: exactly what this run did
    for text in (md, page):
        assert T.NO_DP_SENTENCE in text
        assert "Secure aggregation: off." in text
        assert f"Encryption: {T.REST_ENCRYPTION_ON}." in text
        assert T.REST_DATA_SENTENCE.format(metrics=" (train_accuracy, train_loss)") in text
    assert summary["client_metrics_sent"] == ["train_accuracy", "train_loss"]


def test_rest_run_with_differential_privacy_states_its_budget(tmp_path: Path) -> None:
    env = token_env()
    cfg = tiny_cfg(num_rounds=2, differential_privacy=True, dp_mode="client", dp_epsilon=3.0, clip_grad_norm=1.0)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = register(url, env, 2)
        play_rounds(url, clients, service.coordinator.spec.numel, 2, metrics={"steps": 1.0})
    run = tmp_path / "srv" / "run"
    summary = json.loads((run / "summary.json").read_text())
    privacy = summary["privacy"]
    history = _rows(run / "history.csv")
    assert float(history[-1]["epsilon"]) == privacy["epsilon_spent"]
    assert (run / "privacy_budget.png").read_bytes()[:8] == PNG
    md = (run / "report.md").read_text()
    assert T.NO_DP_SENTENCE not in md
    assert (f"Privacy spent: (epsilon, delta) = ({privacy['epsilon_spent']!r}, {privacy['delta']!r}) of an epsilon "
            f"budget of {privacy['epsilon_budget']!r}.") in md
    assert f"Differential privacy was on (client-level, accountant: {privacy['accountant']})." in md
    assert f"clip norm {privacy['clip_norm']!r}" in md and f"noise multiplier {privacy['noise_multiplier']!r}" in md
    assert T.REST_DATA_SENTENCE.format(metrics=" (steps)") in md
    # no client reported a training accuracy: the section says so instead of plotting nothing
    assert not (run / "client_accuracy.png").exists()
    assert "client_accuracy.csv holds no accuracy values" in md
    for row in history:
        assert _md_row(md, row["round"])[list(row).index("epsilon")] == row["epsilon"]


def _folder(tmp_path: Path, summary: dict, participation: str | None = None, accuracy: str | None = None) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "history.csv").write_text("round,test_accuracy,test_loss,train_loss,clients,seconds,bytes,epsilon\n"
                                   "1,0.5,1.2,1.4,3,0.5,1000,\n2,0.625,1.0,1.1,2,0.5,900,\n")
    (d / "summary.json").write_text(json.dumps(summary))
    if participation is not None:
        (d / "participation.csv").write_text(participation)
    if accuracy is not None:
        (d / "client_accuracy.csv").write_text(accuracy)
    return d


def test_per_client_sections_from_the_files(tmp_path: Path) -> None:
    summary = {"mode": "rest", "rounds_completed": 2, "final_accuracy": 0.625, "encryption": False,
               "privacy": {"differential_privacy": False}, "config": {"secure_aggregation": False}}
    d = _folder(tmp_path, summary,
                participation="client,selected,participated,dropped\na,2,2,0\nb,2,1,1\nc,2,2,0\n",
                accuracy="client,accuracy,measure\na,0.5,local accuracy\nb,0.75,local accuracy\nc,0.25,local accuracy\n")
    files = write_report(d)
    assert {"participation.png", "client_accuracy.png"} <= set(files)
    md = (d / "report.md").read_text()
    assert "3 clients; rounds taken part in per client: min 1, median 2, max 2; 1 selections ended without" in md
    assert _md_row(md, "b") == ["b", "2", "1", "1"]
    assert "3 of 3 clients; accuracy min 0.2500, median 0.5000, max 0.7500, mean 0.5000" in md
    assert "Measured: local accuracy." in md
    assert f"Encryption: {T.ENCRYPTION_OFF}." in md
    assert T.REST_DATA_SENTENCE.format(metrics="") in md  # no metric names recorded: none are claimed


def test_dp_configured_but_not_accounted_claims_nothing(tmp_path: Path) -> None:
    summary = {"mode": "federated", "rounds_completed": 2, "config": {"differential_privacy": True}}
    d = _folder(tmp_path, summary)
    write_report(d)
    md = (d / "report.md").read_text()
    assert T.DP_UNRECORDED_SENTENCE in md and T.NO_DP_SENTENCE not in md and "Privacy spent" not in md
