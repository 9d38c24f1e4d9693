"""Strategies that need more than FedAvg's plumbing, run by real daemons against a real server.

SCAFFOLD needs the server variate c to travel with the model and each client's variate delta
with its update, while the client keeps c_i in its state directory; q-FedAvg needs each
client's loss of the global model before training.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_client.daemon import CONTROL_FILE
from tests.e2e.harness import GunicornServer, make_cfg, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")


def run_federation(tmp_path: Path, **overrides: object) -> tuple[dict, GunicornServer]:
    env = token_env()
    server = GunicornServer(make_cfg(num_clients=3, **overrides), tmp_path / "srv", env)
    server.start()
    daemons: list[subprocess.Popen] = []
    try:
        for i in range(3):
            log = open(tmp_path / f"d{i}.log", "ab")
            daemons.append(subprocess.Popen([sys.executable, "-m", "fl_client", "--server-url", server.url, "--client-id",
                                             f"d{i}", "--state-dir", str(tmp_path / f"d{i}"), "--threads", "1"],
                                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT))
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)
        for d in daemons:
            assert d.wait(timeout=120) == 0
        return status, server
    finally:
        for d in daemons:
            if d.poll() is None:
                d.kill()
        server.stop()


@pytest.mark.slow
def test_scaffold_over_rest_keeps_the_server_variate_equal_to_the_mean_of_the_clients(tmp_path: Path) -> None:
    status, _ = run_federation(tmp_path, num_rounds=3, aggregation_method="scaffold", momentum=0.0, learning_rate=0.05,
                               compression=False)
    assert status["completed_rounds"] == 3 and status["accuracy"] > 0.5
    state = torch.load(tmp_path / "srv" / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    c = state["coordinator"]["strategy"]["control"]
    clients = [torch.load(io.BytesIO((tmp_path / f"d{i}" / CONTROL_FILE).read_bytes()), weights_only=True) for i in range(3)]
    # every client took part in every round, so c = sum_r (|S|/N) mean(dc_i) = mean_i(c_i)
    assert float(c.abs().max()) > 0
    torch.testing.assert_close(c, torch.stack(clients).mean(0), rtol=1e-4, atol=1e-6)
    for ci in clients:  # and each client really has its own variate
        assert float((ci - c).abs().max()) > 0


@pytest.mark.slow
def test_qfedavg_over_rest_receives_the_pre_training_losses(tmp_path: Path) -> None:
    status, _ = run_federation(tmp_path, num_rounds=2, aggregation_method="qfedavg", qffl_q=0.5, momentum=0.0,
                               learning_rate=0.1)
    assert status["completed_rounds"] == 2 and status["accuracy"] > 0.3
    # q-FedAvg refuses an update without the loss: a clean run proves the daemons sent it every round
    assert status["rejected"] == {}
