"""The compliance record of a simulation (the seed's defaults: sample-level DP and secure aggregation on).

One tiny in-process federation on synthetic data (marked slow: DP calibration and secure aggregation
take tens of seconds on two busy cores), and a fast check of the record built from a run folder
written here: the record's numbers equal summary.json, history.csv and participation_rounds.csv,
and what does not apply to a simulation or a baseline (transport, the audit log, data-subject
requests, aggregation) says so.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fl_common.config import config_from_dict
from fl_server.compliance import DP_MEANING, build_record, section_rows
from fl_server.simulation import Simulation


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_simulation_records_what_left_the_clients_and_what_does_not_apply(tmp_path: Path) -> None:
    cfg = config_from_dict({"dataset": "synthetic", "num_clients": 4, "client_selection_ratio": 1.0, "num_rounds": 2,
                            "local_epochs": 1, "model_type": "mlp", "hidden_size": 16, "max_test_samples": 200, "seed": 5})
    assert cfg.differential_privacy and cfg.secure_aggregation  # the defaults
    out = tmp_path / "run"
    with Simulation(cfg, out, progress=False) as sim:
        sim.train()
        sim.save_results()
    record = json.loads((out / "compliance.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    history = _rows(out / "history.csv")
    assert record["run"]["driver"] == "simulation" and record["run"]["rounds_completed"] == 2
    left = record["left_the_clients"]
    assert left["traffic_bytes_per_round"] == [int(h["bytes"]) for h in history]
    assert left["traffic_bytes_total"] == summary["total_bytes"] and left["codec"] == summary["codec"]
    assert left["individual_updates_visible_to_server"] is False  # secure aggregation: only sums
    assert left["encryption"]["applies"] is False
    dp = record["protections"]["differential_privacy"]
    privacy = summary["privacy"]
    assert dp["on"] is True and dp["granularity"] == "sample" == privacy["mode"]
    assert (dp["epsilon_spent"], dp["delta"], dp["epsilon_budget"]) == (privacy["epsilon_spent"], privacy["delta"],
                                                                          privacy["epsilon_budget"])
    assert dp["epsilon_spent"] == float(history[-1]["epsilon"]) and dp["meaning"] == DP_MEANING["sample"]
    sa = record["protections"]["secure_aggregation"]
    assert sa["on"] is True and sa["last_round"]["threshold"] == summary["secure_aggregation"]["last_round_parameters"]["threshold"]
    assert record["protections"]["transport_tls"]["applies"] is False
    part = record["participation"]
    assert part["pseudonymous_ids"] == ["0", "1", "2", "3"]
    per_round = _rows(out / "participation_rounds.csv")
    for r, h in zip(part["per_round"], history, strict=True):
        assert r["arrived"] == int(h["clients"]) == sum(int(p["arrived"]) for p in per_round if int(p["round"]) == r["round"])
    for key in ("audit_log", "data_subject_requests"):
        assert record[key]["applies"] is False
    # the report renders every group of the record; the builder gives the same record again
    md = (out / "report.md").read_text()
    assert "## Compliance record" in md and DP_MEANING["sample"][:60] in md
    assert [t for t, _ in section_rows(record)] == ["What left the clients", "Protections in force", "Who took part",
                                                    "Where state is kept, and for how long", "Audit log",
                                                    "Data-subject requests"]
    again = build_record(out)
    assert {k: v for k, v in again.items() if k != "generated_at"} == {k: v for k, v in record.items() if k != "generated_at"}


HISTORY = ("round,test_accuracy,test_loss,train_loss,clients,seconds,bytes,epsilon\n"
           "1,0.5,1.2,,3,1.0,3000,0.5\n2,0.6,1.1,,2,1.0,2000,0.8\n")
ROUNDS = "round,client_id,selected,arrived,probability\n1,0,1,1,1.0\n1,1,1,1,1.0\n1,2,1,1,1.0\n2,0,1,1,1.0\n2,1,1,0,1.0\n2,2,1,1,1.0\n"


def _folder(tmp_path: Path, **summary: object) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "history.csv").write_text(HISTORY)
    (d / "participation_rounds.csv").write_text(ROUNDS)
    base = {"mode": "federated", "rounds_completed": 2, "total_bytes": 5000, "codec": "int8 + zstd",
            "privacy": {"differential_privacy": True, "mode": "client", "epsilon_spent": 0.8, "delta": 1e-5,
                        "epsilon_budget": 1.0, "accountant": "rdp"},
            "config": {"secure_aggregation": False, "differential_privacy": True}}
    (d / "summary.json").write_text(json.dumps({**base, **summary}))
    return d


def test_the_record_of_a_run_folder_copies_its_numbers(tmp_path: Path) -> None:
    record = build_record(_folder(tmp_path))
    left = record["left_the_clients"]
    assert left["traffic_bytes_per_round"] == [3000, 2000] and left["traffic_bytes_total"] == 5000
    assert left["individual_updates_visible_to_server"] is True and left["codec"] == "int8 + zstd"
    dp = record["protections"]["differential_privacy"]
    assert (dp["granularity"], dp["epsilon_spent"], dp["delta"], dp["meaning"]) == ("client", 0.8, 1e-5, DP_MEANING["client"])
    assert record["protections"]["secure_aggregation"]["on"] is False
    assert record["participation"]["per_round"] == [{"round": 1, "selected": 3, "arrived": 3, "aggregated": 3},
                                                    {"round": 2, "selected": 3, "arrived": 2, "aggregated": 2}]
    assert record["participation"]["pseudonymous_ids"] == ["0", "1", "2"]


def test_baselines_and_runs_without_dp_claim_nothing(tmp_path: Path) -> None:
    central = build_record(_folder(tmp_path, mode="centralized", privacy={"differential_privacy": False}))
    assert central["protections"]["secure_aggregation"]["applies"] is False
    assert central["participation"]["applies"] is False
    assert "pooled" in central["left_the_clients"]["raw_training_data"]
    assert central["protections"]["differential_privacy"] == {"on": None, "statement": "configured on, but summary.json "
                                                              "records no accounting: no guarantee is claimed"}


def test_a_folder_without_a_mode_claims_nothing_about_the_data(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    summary = json.loads((d / "summary.json").read_text())
    del summary["mode"]
    (d / "summary.json").write_text(json.dumps(summary))
    assert build_record(d)["left_the_clients"]["raw_training_data"].startswith("not stated")
