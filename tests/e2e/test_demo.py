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
    run = out / "server" / "run"
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2] and all(int(r["clients"]) == 3 for r in rows)
    for name in ("summary.json", "model.pt", "report.html", "accuracy_loss.png"):
        assert (run / name).is_file(), name
    assert len(list((out / "logs").glob("demo-client-*.log"))) == 3
