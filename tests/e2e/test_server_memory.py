"""The server's memory stays flat over many rounds (issue 16, defect 8).

``python -m fl_server serve`` (gunicorn, 8 threads) on loopback, four scripted clients uploading
concurrently (real signing and encryption) for 40 small rounds. After every round the worker's
resident memory is read (median of five readings: RSS is noisy). Once warmed up (round 10) it
must not keep rising: before the fix (FL_SERVER_MALLOC=0 gives the old behaviour) every round
left a little more in glibc's per-thread arenas, and the server went up by tens of MiB over
these rounds, 165 MiB in all (hundreds over a 100-round cnn run: benchmarks/results/server_memory/README.md).

A memory bound, not a time bound: it holds on a slow or loaded machine too.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import psutil
import torch

from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from fl_common.tensors import wire
from tests.e2e.harness import GunicornServer, ScriptedClient, token_env, wait_for
from tests.e2e.scripted_rounds import tiny_cfg

ROUNDS = 40
WARMUP = 10
#: what the server may add to its start-up footprint over the 40 rounds (medians of five rounds): the fixed
#: server stays within ~10 MiB of it, the old one rose by ~165 MiB (386 -> 551 MiB)
MAX_RISE_MIB = 64.0
#: what it may add between round 10 and round 40: a leak of half a MiB per round fails this
MAX_GROWTH_AFTER_WARMUP_MIB = 16.0


def worker_rss_mib(master: psutil.Process) -> float:
    readings = []
    for _ in range(5):
        readings.append(sum(p.memory_info().rss for p in master.children(recursive=True)))
        time.sleep(0.05)
    return statistics.median(readings) / 2**20


def play_concurrently(clients: list[ScriptedClient], numel: int, round_number: int, gen: torch.Generator) -> None:
    vectors = [torch.randn(numel, generator=gen) * 1e-3 for _ in clients]
    errors: list[BaseException] = []

    def play(c: ScriptedClient, vec: torch.Tensor) -> None:
        try:
            wait_for(lambda: (s := c.status())["state"] == "selected" and s["round"] == round_number, timeout=120)
            c.global_vector(numel)
            c.upload(round_number, vec)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=play, args=(c, v)) for c, v in zip(clients, vectors, strict=False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def rss_per_round(tmp_path: Path, extra_env: dict[str, str]) -> list[float]:
    """RSS (MiB) after start-up and after each of ROUNDS rounds of a server with ``extra_env``."""
    env = {**token_env(), **extra_env}
    # 4 clients, a 784-512-10 MLP (0.4 M parameters: 1.6 MB float32 uploads), evaluation every round; the run does
    # not finish within the measured rounds (its end-of-run report draws plots, a one-off allocation)
    cfg = tiny_cfg(num_clients=4, num_rounds=ROUNDS + 5, hidden_size=512, max_test_samples=1000, round_start_wait=30.0,
                   client_liveness=600.0)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    try:
        master = psutil.Process(server.proc.pid)
        clients = [ScriptedClient(server.url, env[ENV_ENROLLMENT_TOKEN], f"mem{i}") for i in range(4)]
        payload, _ = clients[0].api.download_model(None, encrypted=True)
        assert payload is not None
        numel = wire.unpack(payload)[0].numel
        gen = torch.Generator().manual_seed(0)
        rss = [worker_rss_mib(master)]
        for r in range(1, ROUNDS + 1):
            play_concurrently(clients, numel, r, gen)
            wait_for(lambda: server.status()["completed_rounds"] >= r, timeout=120)  # noqa: B023 - called at once
            rss.append(worker_rss_mib(master))
        return rss
    finally:
        server.stop()


def medians(rss: list[float]) -> tuple[float, float, float]:
    """Start-up, around the end of the warm-up (rounds 8-12), and the last five rounds."""
    return rss[0], statistics.median(rss[WARMUP - 2:WARMUP + 3]), statistics.median(rss[-5:])


def test_server_memory_is_flat_after_warm_up(tmp_path: Path) -> None:
    rss = rss_per_round(tmp_path, {})
    start, warm, last = medians(rss)
    trace = f"RSS per round (MiB): {[round(x) for x in rss]}"
    assert last - start < MAX_RISE_MIB, trace
    assert last - warm < MAX_GROWTH_AFTER_WARMUP_MIB, trace
