"""Drive real REST rounds with scripted clients (real HTTP, signing, encryption) for the monitoring tests."""

from __future__ import annotations

from typing import Any

import requests
import torch

from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from tests.e2e.harness import ScriptedClient, make_cfg, wait_for

#: A tiny federation on synthetic data: no dataset files, a round closes in well under a second.
TINY: dict[str, Any] = {"dataset": "synthetic", "max_train_samples": None, "max_test_samples": 300, "hidden_size": 64,
                        "num_clients": 2, "num_rounds": 2, "round_start_wait": 60.0, "poll_interval": 0.1}


def tiny_cfg(**overrides: Any):  # -> FLConfig
    return make_cfg(**{**TINY, **overrides})


def register(url: str, env: dict[str, str], n: int, prefix: str = "c") -> list[ScriptedClient]:
    return [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"{prefix}{i}") for i in range(n)]


def status(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/status", timeout=10).json()


def play_round(url: str, clients: list[ScriptedClient], numel: int, round_number: int, *, scale: float = 0.001,
               metrics: dict[str, float] | None = None) -> None:
    """Every client waits to be selected for ``round_number`` and uploads a small update; then the round closes."""
    for c in clients:
        wait_for(lambda c=c: c.status()["state"] == "selected" and c.status()["round"] == round_number, timeout=60)
    for k, c in enumerate(clients):
        vec = torch.full((numel,), scale * (k + 1))
        c.upload(round_number, vec, meta={"num_samples": 10 * (k + 1),
                                          "metrics": metrics or {"train_loss": 1.0 + k, "train_accuracy": 0.25 * (k + 1)}})
    wait_for(lambda: status(url)["completed_rounds"] >= round_number, timeout=60)


def play_rounds(url: str, clients: list[ScriptedClient], numel: int, rounds: int, **kw: Any) -> dict[str, Any]:
    for r in range(1, rounds + 1):
        play_round(url, clients, numel, r, **kw)
    return wait_for(lambda: (s := status(url))["state"] == "finished" and s, timeout=60)
