"""Plain vs masking (SecAgg) vs CKKS over REST, side by side in one invocation: the round wall time of a real
deployment on loopback (issue 14's REST column; ``benchmarks/he_compare.py`` measures the same three in one
process, without transport).

Each method: ``python -m fl_server serve`` (gunicorn, the production path) with the cnn (1,663,370 parameters)
on Fashion-MNIST, ``--clients`` real client daemons (``python -m fl_client``: registration, signed and
encrypted requests, long-polls, local training, and for masking / CKKS the real client protocol sessions),
all of them in every round, ``--rounds`` rounds. Local training is kept small (``max_train_samples`` split
over the clients, one epoch) so that the round is mostly the aggregation protocol and its transport; it is the
same work under all three methods. Uploads are float32 under every method (no codec: neither masking nor CKKS
can use one), Fernet-encrypted, DP off.

Reported per method: the median of the rounds' wall times (the server's history ``seconds``: from the attempt's
opening to its close, aggregation and evaluation included; a method's aborted attempts would show in it), the
server worker's CPU per round and the daemons' CPU per client per round (``os.wait4`` rusage of each daemon,
minus the same daemon's CPU before its first round: start-up and registration are left out), and the bytes per
round the server counted. The machine is shared (2 cores): compare side by side only.

    python benchmarks/he_compare_rest.py [--rounds 3] [--clients 10] [--methods plain,masking,ckks]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_common.config import config_from_dict  # noqa: E402
from tests.e2e.harness import GunicornServer, token_env  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "he" / "he_compare_rest.json"

BASE: dict[str, Any] = {
    "dataset": "fashion_mnist", "model_type": "cnn", "client_selection_ratio": 1.0, "local_epochs": 1, "batch_size": 32,
    "learning_rate": 0.05, "momentum": 0.9, "data_distribution": "iid", "max_train_samples": 2000, "max_test_samples": 1000,
    "evaluation_frequency": 1, "compression": False, "encryption": True, "differential_privacy": False,
    "round_timeout": 900.0, "round_start_wait": 120.0, "over_selection": 0.0,
    "poll_interval": 0.5, "client_liveness": 600.0, "seed": 5,
}
METHODS: dict[str, dict[str, Any]] = {
    "plain": {"secure_aggregation": False},
    "masking": {"secure_aggregation": True, "secure_aggregation_method": "masking", "secagg_phase_timeout": 300.0},
    "ckks": {"secure_aggregation": True, "secure_aggregation_method": "ckks", "secagg_phase_timeout": 300.0},
}


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def reap(daemon: subprocess.Popen, timeout: float = 120.0) -> float:
    """Wait for a daemon that saw the run finish to exit; its CPU seconds (user + system) from ``os.wait4``."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(daemon.pid, os.WNOHANG)
        if pid == daemon.pid:
            daemon.returncode = os.waitstatus_to_exitcode(status)
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon {daemon.pid} did not exit after the run finished")
        time.sleep(0.1)


def run(method: str, clients: int, rounds: int, work: Path) -> dict[str, Any]:
    cfg = config_from_dict({**BASE, **METHODS[method], "num_clients": clients, "num_rounds": rounds})
    env = token_env()
    server = GunicornServer(cfg, work / method / "srv", env)
    server.start()
    daemons: list[subprocess.Popen] = []
    try:
        worker = psutil.Process(server.proc.pid).children(recursive=True)[0]  # type: ignore[union-attr]
        for i in range(clients):
            with open(work / method / f"d{i}.log", "ab") as log:
                daemons.append(subprocess.Popen(
                    [sys.executable, "-m", "fl_client", "--server-url", server.url, "--client-id", f"{method}-{i}",
                     "--state-dir", str(work / method / f"d{i}"), "--threads", "1", "--no-progress"],
                    env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT))
        # CPU before the first round: every daemon registered, the first attempt not yet worked on
        deadline = time.monotonic() + 600
        while server.status()["clients"]["registered"] < clients:
            if time.monotonic() > deadline:
                raise TimeoutError("the daemons did not register")
            time.sleep(0.2)
        server_cpu0 = cpu_s(worker)
        client_cpu0 = [cpu_s(psutil.Process(d.pid)) for d in daemons]
        t0 = time.perf_counter()
        deadline = time.monotonic() + 1800
        while (st := server.status())["state"] != "finished":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method}: the run did not finish")
            time.sleep(0.5)
        total_wall = time.perf_counter() - t0
        server_cpu = cpu_s(worker) - server_cpu0
        client_cpu = []
        for d, before in zip(daemons, client_cpu0, strict=True):
            client_cpu.append(reap(d) - before)
        history = st["history"]
        walls = [float(r["seconds"]) for r in history]
        block = st.get("secagg") or st.get("ckks") or {}
        return {"method": method, "rounds": len(history), "round_wall_s_median": round(statistics.median(walls), 2),
                "round_wall_s": [round(w, 2) for w in walls], "run_wall_s": round(total_wall, 1),
                "server_cpu_s_per_round": round(server_cpu / rounds, 2),
                "client_cpu_s_per_client_round": round(statistics.median(client_cpu) / rounds, 2),
                "bytes_per_round_median": statistics.median(float(r["bytes"]) for r in history),
                "aborted_attempts": block.get("aborted_attempts", 0), "test_accuracy": history[-1].get("test_accuracy")}
    finally:
        for d in daemons:
            if d.poll() is None:
                d.kill()
                d.wait()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--methods", default="plain,masking,ckks")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="he-rest-") as tmp:
        for method in args.methods.split(","):
            (Path(tmp) / method).mkdir()
            row = run(method, args.clients, args.rounds, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
           "cpus": os.cpu_count(), "load_average_end": list(os.getloadavg()), "clients": args.clients,
           "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("| method | round wall (median) | rounds | server CPU per round | client CPU per client per round | "
          "bytes per round |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['round_wall_s_median']:.2f} s | {r['round_wall_s']} | {r['server_cpu_s_per_round']:.2f} s "
              f"| {r['client_cpu_s_per_client_round']:.2f} s | {r['bytes_per_round_median'] / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
