"""The simulation's secure round against its plain round (issue 12: masking runs in the client workers, the key
phases while they train).

The real simulation, cnn, 10 of 20 clients per round, process-pool workers (one per core), plain and secure runs
alternated ABAB so the machine's drift hits both (the configuration of ``secagg_cost.simulation_rounds``). Besides
each round's wall time it records the CPU seconds each round took in the driver process and in the client workers:
on a machine other jobs load, wall times move with the load, while CPU time says what the secure path itself costs.

    PYTHONPATH=$PWD python benchmarks/sim_secure_vs_plain.py [--rounds 3] [--pairs 2] [--out FILE]

Another tree's code can be measured with this script: ``PYTHONPATH=/that/tree python benchmarks/sim_secure_vs_plain.py
--out ...`` (the script imports only the simulation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import psutil

DEST = Path(__file__).resolve().parent / "results" / "fast_rounds" / "simulation_secure_vs_plain.json"
#: the configuration secagg_cost.simulation_rounds measures (kept equal so the numbers stay comparable)
BASE: dict[str, Any] = {"dataset": "fashion_mnist", "model_type": "cnn", "num_clients": 20, "client_selection_ratio": 0.5,
                        "local_epochs": 1, "batch_size": 32, "learning_rate": 0.02, "max_train_samples": 6000,
                        "max_test_samples": 500, "differential_privacy": False, "compression": False, "seed": 0}


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` so far (a process that has gone counts 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def one_run(rounds: int, secure: bool) -> dict[str, Any]:
    """One simulation of ``rounds`` rounds: per round, its wall seconds (the round record's) and the CPU seconds
    the driver and the workers spent from its start to its end."""
    from fl_server.simulation import Simulation

    cfg = {**BASE, "num_rounds": rounds, "evaluation_frequency": rounds, "secure_aggregation": secure}
    out: dict[str, Any] = {"round_seconds": [], "driver_cpu_seconds": [], "worker_cpu_seconds": []}
    with Simulation(cfg, progress=False) as sim:
        driver = psutil.Process()
        history = sim.coordinator.history
        for _ in range(rounds):
            workers = driver.children(recursive=True)  # the pool starts with the first round; it is alive by the second
            d0, w0 = cpu_seconds([driver]), cpu_seconds(workers)
            history = sim.train(1)
            out["driver_cpu_seconds"].append(cpu_seconds([driver]) - d0)
            out["worker_cpu_seconds"].append(cpu_seconds(workers) - w0 if workers else float("nan"))
        out["round_seconds"] = [r.seconds for r in history]
        out["accuracy"] = history[-1].test_accuracy
        out["bytes_per_round"] = history[-1].bytes
    return out


def median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2, help="plain/secure pairs, alternated (2: ABAB)")
    ap.add_argument("--out", default=str(DEST))
    args = ap.parse_args()
    out: dict[str, Any] = {"config": {**BASE, "num_rounds": args.rounds, "evaluation_frequency": args.rounds}}
    for _ in range(args.pairs):
        for name in ("plain", "secagg"):  # ABAB: the machine's drift hits both
            run = one_run(args.rounds, name == "secagg")
            entry = out.setdefault(name, {"round_seconds": [], "accuracy": [], "bytes_per_round": [],
                                          "driver_cpu_seconds": [], "worker_cpu_seconds": []})
            for key in ("round_seconds", "driver_cpu_seconds", "worker_cpu_seconds"):
                entry[key] += run[key]
            entry["accuracy"].append(run["accuracy"])
            entry["bytes_per_round"].append(run["bytes_per_round"])
    for name in ("plain", "secagg"):
        e = out[name]
        e["median_round_seconds"] = statistics.median(e["round_seconds"])
        # the first round of a run starts the workers (its worker CPU is not counted): CPU medians skip it
        later = [i for i in range(len(e["round_seconds"])) if i % args.rounds != 0]
        e["median_driver_cpu_seconds"] = median([e["driver_cpu_seconds"][i] for i in later])
        e["median_worker_cpu_seconds"] = median([e["worker_cpu_seconds"][i] for i in later])
    p, s = out["plain"], out["secagg"]
    out.update({"extra_round_time": s["median_round_seconds"] / p["median_round_seconds"] - 1.0,
                "ratio_secure_to_plain": s["median_round_seconds"] / p["median_round_seconds"],
                "extra_cpu_seconds_per_round": {
                    "driver": s["median_driver_cpu_seconds"] - p["median_driver_cpu_seconds"],
                    "workers": s["median_worker_cpu_seconds"] - p["median_worker_cpu_seconds"]},
                "workers": "default (one per core)", "load_average": list(os.getloadavg()),
                "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("plain", "secagg", "config")}, indent=1))
    print("plain", [round(x, 3) for x in p["round_seconds"]], "secagg", [round(x, 3) for x in s["round_seconds"]])


if __name__ == "__main__":
    main()
