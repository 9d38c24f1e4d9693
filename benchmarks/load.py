"""Load on a real server: N signed pollers and M bad requests per second, side by side with a quiet baseline.

Starts ``python -m fl_server serve`` (gunicorn, the production path) on loopback, registers N clients
that poll ``GET /api/v1/round`` (signed, encrypted session like the daemon), and measures their poll
latency twice in one invocation: quiet, then while attacker threads send M requests per second with no
token, a bad token, a forged signature and oversized bodies. Reports p50 / p99 of the real clients'
latency in both phases, the server's RSS before and after, the refusals counted and the audit rows
written (refusals are aggregated: fl_server/rest/refusals.py).

    python benchmarks/load.py --pollers 50 --bad-per-second 200 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN  # noqa: E402
from tests.e2e.harness import GunicornServer, ScriptedClient, make_cfg  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def poll_phase(clients: list[ScriptedClient], seconds: float) -> list[float]:
    """Every client polls in a loop for ``seconds``; returns each poll's latency in ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(c: ScriptedClient) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            c.status()
            with lock:
                latencies.append(1000 * (time.perf_counter() - t0))
            time.sleep(0.2)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def attack(url: str, per_second: float, seconds: float) -> int:
    """Bad requests at a fixed rate from 4 threads: no token, a wrong token, a forged signature, a huge body."""
    sent = [0]
    stop = time.monotonic() + seconds
    session = requests.Session()

    def run(kind: int) -> None:
        gap = 4.0 / per_second
        while time.monotonic() < stop:
            try:
                if kind == 0:
                    session.get(f"{url}/api/v1/round", timeout=5)
                elif kind == 1:
                    session.get(f"{url}/api/v1/round", headers={"Authorization": "Bearer " + secrets.token_urlsafe(32)}, timeout=5)
                elif kind == 2:
                    session.post(f"{url}/api/v1/token", headers={"X-FL-Client": "c-0", "X-FL-Timestamp": str(int(time.time())),
                                                                  "X-FL-Nonce": secrets.token_hex(16), "X-FL-Signature": "0" * 64,
                                                                  "X-FL-Content-SHA256": "0" * 64}, data=b"", timeout=5)
                else:
                    session.post(f"{url}/api/v1/register", data=b"x" * 200_000, timeout=5,
                                 headers={"Content-Type": "application/json"})
            except requests.RequestException:
                pass
            sent[0] += 1
            time.sleep(gap)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent[0]


def server_rss_mb(server: GunicornServer) -> float:
    assert server.proc is not None
    parent = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--bad-per-second", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load" / "load.json")
    args = ap.parse_args()
    env = {ENV_ENROLLMENT_TOKEN: secrets.token_urlsafe(24), ENV_ADMIN_TOKEN: secrets.token_urlsafe(24),
           "FL_SERVER_SECRET": secrets.token_urlsafe(32)}
    cfg = make_cfg(dataset="synthetic", max_train_samples=None, max_test_samples=300, num_clients=args.pollers,
                   num_rounds=1, round_start_wait=3600.0, client_liveness=3600.0)  # never opens a round: polls only
    with tempfile.TemporaryDirectory() as tmp:
        server = GunicornServer(cfg, Path(tmp) / "srv", env)
        server.start()
        try:
            clients = [ScriptedClient(server.url, env[ENV_ENROLLMENT_TOKEN], f"p{i}") for i in range(args.pollers)]
            rss_before = server_rss_mb(server)
            quiet = poll_phase(clients, args.seconds)
            result: dict[str, object] = {}
            attacker = threading.Thread(target=lambda: result.setdefault("bad_sent", attack(server.url, args.bad_per_second,
                                                                                            args.seconds)))
            attacker.start()
            loaded = poll_phase(clients, args.seconds)
            attacker.join()
            time.sleep(6)  # one refusal flush
            rss_after = server_rss_mb(server)
            status = server.status()
            admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
            audit_rows = len(requests.get(f"{server.url}/api/v1/audit?limit=10000", headers=admin, timeout=30).json()["events"])
        finally:
            server.stop()
    report = {
        "pollers": args.pollers, "bad_per_second_target": args.bad_per_second, "seconds_per_phase": args.seconds,
        "bad_sent": result.get("bad_sent"), "quiet_ms": {"p50": _percentile(quiet, 0.5), "p99": _percentile(quiet, 0.99),
                                                         "polls": len(quiet)},
        "under_attack_ms": {"p50": _percentile(loaded, 0.5), "p99": _percentile(loaded, 0.99), "polls": len(loaded)},
        "p50_ratio": _percentile(loaded, 0.5) / _percentile(quiet, 0.5),
        "server_rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "refusals_counted": sum(status["rejected"].values()), "audit_rows": audit_rows,
        "median_quiet_ms": statistics.median(quiet) if quiet else None, "cpu_count": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
