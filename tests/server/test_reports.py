"""Run reports: plots and report.md/report.html built only from a run folder's files."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest

from fl_server import report_template as T
from fl_server.reports import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY_PLAIN = """round,test_accuracy,test_loss,train_loss,clients,seconds,bytes,epsilon
1,0.4125,1.7324,2.0113,5,0.812,204800,
2,,,1.5012,5,0.790,204800,
3,0.6875,0.98125,1.1034,4,0.801,163840,
"""

HISTORY_DP = """round,test_accuracy,test_loss,train_loss,clients,seconds,bytes,epsilon
1,0.3012,2.1034,2.2201,5,0.9,204800,0.41237
2,0.4521,1.8876,1.9402,5,0.91,204800,0.61894
3,0.5113,1.5521,1.7012,5,0.92,204800,0.77731
"""

LABELS = """client,class_0,class_1,class_2,total
0,10,5,0,15
1,0,12,8,20
2,7,7,7,21
"""

CONFIG = {"dataset": "synthetic", "model_type": "mlp", "num_clients": 3, "num_rounds": 3,
          "differential_privacy": False, "secure_aggregation": False, "dp_epsilon": 1.0, "dp_delta": 1e-05}


def _summary(**over) -> dict:
    s = {"mode": "federated", "rounds_completed": 3, "final_accuracy": 0.6875, "final_loss": 0.98125,
         "best_accuracy": 0.6875, "best_round": 3, "wall_seconds": 2.431, "total_bytes": 573440,
         "encryption": "not applicable in simulation (no transport)", "codec": "none", "stop_reason": "completed",
         "privacy": {"differential_privacy": False}, "config": dict(CONFIG)}
    s.update(over)
    return s


def _run_dir(tmp_path: Path, history: str, summary: dict, labels: str | None = LABELS) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "history.csv").write_text(history)
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    if labels is not None:
        (d / "label_histograms.csv").write_text(labels)
    return d


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, f"{path} is only {len(data)} bytes"


def _csv_cells(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


def test_all_files_written_and_every_history_number_is_in_the_report(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, HISTORY_PLAIN, _summary())
    files = write_report(d)
    assert set(files) == {"accuracy_loss.png", "client_data.png", "report.md", "report.html", "compliance.json"}
    assert not (d / "privacy_budget.png").exists(), "no epsilon in history.csv: no privacy plot"
    for name, path in files.items():
        assert path == d / name and path.is_file()
    _assert_png(d / "accuracy_loss.png")
    _assert_png(d / "client_data.png")
    md, page = (d / "report.md").read_text(), (d / "report.html").read_text()
    for row in _csv_cells(HISTORY_PLAIN):
        table_rows = [line for line in md.splitlines() if line.startswith(f"| {row['round']} |")]
        assert len(table_rows) == 1, row["round"]
        cells = [c.strip() for c in table_rows[0].strip("|").split("|")]
        for col, value in row.items():
            assert cells[list(row).index(col)] == (value or T.EMPTY_CELL), (col, value)
        for value in (row["round"], row["test_accuracy"], row["test_loss"], row["train_loss"]):
            if value:
                assert value in md and f">{value}<" in page
    # results come from summary.json as stored
    assert "0.6875 (round 3)" in md and "573440" in md and "2.431" in md and "completed" in md
    # images by relative name, nothing fetched from anywhere, no scripts
    assert '<img src="accuracy_loss.png"' in page and '<img src="client_data.png"' in page
    assert "](accuracy_loss.png)" in md
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page


def test_privacy_statement_without_dp(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, HISTORY_PLAIN, _summary(), labels=None)
    files = write_report(d)
    assert "client_data.png" not in files
    for text in ((d / "report.md").read_text(), (d / "report.html").read_text()):
        assert T.NO_DP_SENTENCE in text
        assert T.FEDERATED_DATA_SENTENCE in text
        assert "Secure aggregation: off." in text
        assert "Encryption: not applicable in simulation (no transport)." in text
        assert "epsilon_spent" not in text and "Privacy spent" not in text
    # a null privacy block is no differential privacy either
    d2 = tmp_path / "null"
    d2.mkdir()
    (d2 / "history.csv").write_text(HISTORY_PLAIN)
    (d2 / "summary.json").write_text(json.dumps(_summary(privacy=None)))
    write_report(d2)
    assert T.NO_DP_SENTENCE in (d2 / "report.md").read_text()


def test_privacy_statement_and_budget_plot_with_dp(tmp_path: Path) -> None:
    privacy = {"differential_privacy": True, "mode": "client", "epsilon_spent": 0.77731, "epsilon_budget": 1.0,
               "delta": 1e-05, "accountant": "rdp", "noise_multiplier": 1.1234, "clip_norm": 0.5,
               "sampling": "Poisson sampling of clients"}
    cfg = {**CONFIG, "differential_privacy": True, "secure_aggregation": True}
    d = _run_dir(tmp_path, HISTORY_DP, _summary(privacy=privacy, config=cfg))
    files = write_report(d)
    assert "privacy_budget.png" in files
    _assert_png(d / "privacy_budget.png")
    md, page = (d / "report.md").read_text(), (d / "report.html").read_text()
    for text in (md, page):
        assert T.NO_DP_SENTENCE not in text
        assert "Differential privacy was on (client-level, accountant: rdp)." in text
        assert "Privacy spent: (epsilon, delta) = (0.77731, 1e-05) of an epsilon budget of 1.0." in text
        assert "clip norm 0.5" in text and "noise multiplier 1.1234" in text
        assert "Secure aggregation: on." in text
        assert "Poisson sampling of clients" in text  # every recorded key is printed
        assert '<img src="privacy_budget.png"' in text or "](privacy_budget.png)" in text
    for row in _csv_cells(HISTORY_DP):
        assert row["epsilon"] in md and row["test_accuracy"] in md


def test_per_client_noise_is_stated_as_its_range(tmp_path: Path) -> None:
    privacy = {"differential_privacy": True, "mode": "sample", "epsilon_spent": 0.9, "epsilon_budget": 1.0, "delta": 1e-05,
               "accountant": "prv", "noise_multiplier": 6.8125, "clip_norm": 1.0, "noise_calibration": "per_client",
               "noise_multiplier_by_size": [[232, 6.8125], [600, 4.03125], [1190, 3.0]]}
    cfg = {**CONFIG, "differential_privacy": True}
    d = _run_dir(tmp_path, HISTORY_DP, _summary(privacy=privacy, config=cfg))
    write_report(d)
    md = (d / "report.md").read_text()
    assert "noise multiplier calibrated per client for its own sampling rate and steps, 3.0 to 6.8125" in md
    assert "noise multiplier 6.8125" not in md, "the largest sigma alone would misstate what most clients ran"
    # what the number means, where users read it
    assert "Meaning: record-level: adding or removing any one training record" in md
    assert "the figure is the maximum over clients" in md and "record count is treated as public" in md
    assert "label histogram" not in md  # no policy read label histograms in this run


def test_the_label_histogram_release_is_listed_beside_epsilon(tmp_path: Path) -> None:
    privacy = {"differential_privacy": True, "mode": "sample", "epsilon_spent": 0.9, "epsilon_budget": 1.0, "delta": 1e-05,
               "accountant": "prv", "noise_multiplier": 3.0, "clip_norm": 1.0}
    cfg = {**CONFIG, "differential_privacy": True, "selection": "stratified", "label_histogram_epsilon": 0.5}
    d = _run_dir(tmp_path, HISTORY_DP, _summary(privacy=privacy, config=cfg))
    write_report(d)
    md = (d / "report.md").read_text()
    assert "label histogram once, with Laplace noise (pure epsilon = 0.5)" in md and "(epsilon + 0.5, delta)" in md


def test_simulator_only_files_are_named_and_not_claimed_private(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, HISTORY_PLAIN, _summary())
    (d / "client_accuracy.csv").write_text("client,accuracy,measure\n0,0.5,train\n")
    write_report(d)
    md = (d / "report.md").read_text()
    assert T.FEDERATED_DATA_SENTENCE in md and "This run was simulated" in md
    assert "label_histograms.csv (the exact label counts of each client)" in md
    assert "client_accuracy.csv (the accuracy of each client, measured by the simulator" in md
    assert "personalization.csv" not in md  # only the files that are there
    # a run folder without such files carries no such sentence
    d2 = tmp_path / "bare"
    d2.mkdir()
    (d2 / "history.csv").write_text(HISTORY_PLAIN)
    (d2 / "summary.json").write_text(json.dumps(_summary()))
    write_report(d2)
    assert "This run was simulated" not in (d2 / "report.md").read_text()


def test_centralized_wording(tmp_path: Path) -> None:
    summary = {"mode": "centralized", "rounds_completed": 3, "final_accuracy": 0.6875, "best_accuracy": 0.6875,
               "best_round": 3, "wall_seconds": 1.5, "config": {**CONFIG, "secure_aggregation": False}}
    d = _run_dir(tmp_path, HISTORY_PLAIN, summary, labels=None)
    write_report(d)
    md = (d / "report.md").read_text()
    assert T.CENTRALIZED_DATA_SENTENCE in md and "pooled" in md
    assert T.FEDERATED_DATA_SENTENCE not in md and "never left the clients" not in md
    assert T.NO_DP_SENTENCE in md
    assert "Encryption: not recorded in summary.json." in md
    assert "| total bytes | not recorded |" in md and "| codec | not recorded |" in md


def test_values_are_html_escaped(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    d = _run_dir(tmp_path, HISTORY_PLAIN, _summary(config={**CONFIG, "dataset": evil}, codec="a|b<c>"), labels=None)
    write_report(d)
    page, md = (d / "report.html").read_text(), (d / "report.md").read_text()
    for text in (page, md):
        assert "<script" not in text
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "a\\|b&lt;c&gt;" in md  # a pipe cannot break the markdown table


def test_a_failing_plot_still_leaves_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    import fl_server.reports as reports

    def boom(*a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(reports, "_plot_client_data", boom)
    d = _run_dir(tmp_path, HISTORY_PLAIN, _summary())
    with caplog.at_level(logging.WARNING, logger="fl_server.reports"):
        files = write_report(d)
    assert "client_data.png" not in files and not (d / "client_data.png").exists()
    assert {"accuracy_loss.png", "report.md", "report.html"} <= set(files)
    assert "client_data.png" not in (d / "report.html").read_text()
    assert any("client_data.png" in r.getMessage() for r in caplog.records)
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_simulation_writes_its_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fl_server.simulation import Simulation

    cfg = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 4,
           "client_selection_ratio": 0.5, "num_rounds": 2, "local_epochs": 1, "workers": 0,
           "differential_privacy": False, "secure_aggregation": False, "compression": False,
           "max_train_samples": 400, "max_test_samples": 200, "seed": 3}
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="fl_server.reports"), Simulation(cfg, out, progress=False) as sim:
        sim.train()
        sim.save_results()
    for name in ("accuracy_loss.png", "client_data.png", "report.md", "report.html"):
        assert (out / name).is_file(), name
    _assert_png(out / "accuracy_loss.png")
    md = (out / "report.md").read_text()
    for row in _csv_cells((out / "history.csv").read_text()):
        assert re.search(rf"^\| {row['round']} \| {re.escape(row['test_accuracy'] or T.EMPTY_CELL)} \|", md, re.M)
    assert T.NO_DP_SENTENCE in md and T.FEDERATED_DATA_SENTENCE in md
    assert any("report.html" in r.getMessage() for r in caplog.records)
