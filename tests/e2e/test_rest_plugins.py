"""Plug-ins behind the REST server: a real server on loopback runs the example strategy and selection
policy through the same coordinator as the simulation, and refuses a broken plug-in before serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_common.config import dump_config
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from fl_server.selection import inclusion_probabilities
from tests.e2e.harness import ScriptedClient, make_cfg, threaded_server, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent

NUMEL = 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # the harness's MLP
PLUGINS = {"aggregation_method": "custom", "custom_strategy": "examples.plugins.median_norm_clipping:MedianNormClipping",
           "selection": "custom", "custom_selection": "examples.plugins.sqrt_size_selection:SqrtSizeSelection"}


def test_the_example_plugins_run_a_round_over_rest(tmp_path: Path) -> None:
    env = token_env()
    # every client is needed (min_clients 3), and the round waits for all three profiles before drawing
    cfg = make_cfg(num_clients=3, min_clients=3, round_start_wait=60.0, max_update_bytes=6 * NUMEL + 8192, **PLUGINS)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"p{i}") for i in range(3)]
        sizes = [10, 40, 90]
        for c, n in zip(clients, sizes, strict=False):
            c.api.send_profile({"num_samples": n})
        wait_for(lambda: all(c.status()["state"] == "selected" for c in clients), timeout=60)
        assert service.status()["selection"]["policy"] == "sqrt_size"
        start = service.coordinator.global_vector.clone()
        r = clients[0].status()["round"]
        # norms sqrt(NUMEL) x 1, 2, 4: the median clips the third to half its size
        clients[0].upload(r, torch.full((NUMEL,), 1.0), num_samples=10)
        clients[1].upload(r, torch.full((NUMEL,), 2.0), num_samples=30)
        clients[2].upload(r, torch.full((NUMEL,), -4.0), num_samples=60)
        wait_for(lambda: service.coordinator.completed_rounds == 1, timeout=60)
        expected = start + (10 * 1.0 + 30 * 2.0 + 60 * -2.0) / 100
        assert torch.allclose(service.coordinator.global_vector, expected, atol=1e-6)
        assert torch.allclose(clients[0].global_vector(NUMEL), expected, atol=1e-6)
        # all three of three are drawn (pi = 1), and the policy says so through the same records as the simulation
        rows = service.coordinator.participation.rows
        pi = inclusion_probabilities(np.sqrt(np.asarray(sizes, dtype=np.float64)), 3)
        assert sorted(p for (_r, _c, _s, _a, p) in rows if _r == 1) == pytest.approx(sorted(pi.tolist()))


def test_serve_refuses_a_broken_plugin_before_it_serves(tmp_path: Path) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    dump_config(make_cfg(aggregation_method="custom", custom_strategy="examples.plugins.median_norm_clipping:Nope"), cfg_path)
    proc = subprocess.run([sys.executable, "-m", "fl_server", "serve", "--config", str(cfg_path), "--state-dir",
                           str(tmp_path / "srv")], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "custom_strategy" in lines[0] and "has no attribute 'Nope'" in lines[0]
