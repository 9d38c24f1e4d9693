"""The README's main job, `python -m fl_server demo`, end to end on a smaller federation.

The command is the same one the README gives (gunicorn server + client daemon processes on
loopback); only the size is reduced with the demo's own flags so the test suite stays short.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("small_config")


@pytest.mark.slow
def test_the_demo_trains_a_federation_and_leaves_its_results(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fl_server", "demo", "--clients", "3", "--rounds", "2", "--output", str(out),
                           "--no-progress", "--set", "model_type=mlp", "--set", "max_train_samples=3000",
                           "--set", "num_clients=3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["rounds"] == 2 and printed["final_accuracy"] > 0.3
    # the last line says what was protected and how (the demo defaults; DP off here)
    assert printed["privacy"]["differential_privacy"] is False and "not differentially private" in printed["privacy"]["guarantee"]
    assert printed["privacy"]["encryption"] == "Fernet + HMAC-SHA256"
    run = out / "server" / "run"
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2] and all(int(r["clients"]) == 3 for r in rows)
    for name in ("summary.json", "model.pt", "report.html", "accuracy_loss.png"):
        assert (run / name).is_file(), name
    assert len(list((out / "logs").glob("demo-client-*.log"))) == 3
    # https on loopback: the clients verified the server against the CA the demo made in its state folder
    assert (out / "server" / "tls" / "ca.pem").is_file() and (out / "server" / "tls" / "server-key.pem").stat().st_mode & 0o077 == 0
    assert "https to 127.0.0.1, verified against" in (out / "logs" / "demo-client-00.log").read_text()


def test_the_demo_line_states_a_dp_guarantee_exactly() -> None:
    from fl_server.rest.demo import privacy_line

    status = {"privacy": {"differential_privacy": True, "mode": "sample", "epsilon_spent": 0.97, "delta": 1e-5,
                          "epsilon_budget": 1.0, "accountant": "prv"},
              "stop_reason": None, "num_rounds": 5, "secure_aggregation": True, "encryption": True, "codec": "int8"}
    line = privacy_line(status)
    assert (line["epsilon_spent"], line["delta"], line["epsilon_budget"]) == (0.97, 1e-5, 1.0)
    assert line["guarantee"].startswith("record-level") and "maximum over clients" in line["guarantee"]
    assert line["stop_reason"] == "all 5 rounds done" and line["secure_aggregation"] is True
