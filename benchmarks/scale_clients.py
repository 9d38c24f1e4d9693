"""Thousands of simulated clients: time per round and peak memory as the federation grows.

Fashion-MNIST's 60,000 training records split IID over 100 / 1,000 / 10,000 clients (600, 60 and
6 records each), 10 % of them per round, a small MLP, a few rounds. Each size runs as a child
``python -m fl_server simulate`` with a run folder (client state on disk), watched by the same
sampler as benchmarks/speed.py: peak PSS of the whole process tree (driver and workers).

What should stay flat is memory: the clients *per round* grow 100x, and so does the work per
round, but nothing should be held per client beyond a few numbers (sizes, label counts, speeds).

Resumable: each size's result is written to benchmarks/results/scale/scale_clients.json as it
finishes and skipped on the next invocation (``--force`` measures again).

    nice -n 15 python benchmarks/scale_clients.py --clients 100 1000 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "scale"


def _speed_module() -> Any:
    """benchmarks/speed.py's watched runner (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("speed_bench", ROOT / "benchmarks" / "speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(clients: int, rounds: int, model: str, hidden: int, extra: list[str], work: Path) -> dict[str, Any]:
    speed = _speed_module()
    out = work / f"run-{clients}"
    settings = [f"num_clients={clients}", "client_selection_ratio=0.1", f"num_rounds={rounds}", f"evaluation_frequency={rounds}",
                f"model_type={model}", f"hidden_size={hidden}", "dataset=fashion_mnist", "data_distribution=iid",
                "local_epochs=1", "batch_size=32", "learning_rate=0.05", "differential_privacy=false",
                "secure_aggregation=false", "compression=false", "seed=0", *extra]
    cmd = [sys.executable, "-m", "fl_server", "simulate", "--output", str(out), "--no-progress"]
    for s in settings:
        cmd += ["--set", s]
    res = speed.run_watched(cmd)
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    seconds = [float(r["seconds"]) for r in rows]
    return {"clients": clients, "clients_per_round": max(1, round(0.1 * clients)),
            "records_per_client": summary["client_samples"]["mean"], "rounds": len(rows),
            "round_seconds_median": statistics.median(seconds), "round_seconds": seconds,
            "wall_seconds": res["wall_seconds"], "ready_seconds": summary["ready_after_process_start_seconds"],
            "peak_pss_mb": res["peak_pss_mb"], "peak_rss_sum_mb": res["peak_rss_sum_mb"],
            "final_accuracy": summary["final_accuracy"], "model_parameters": summary["model_parameters"],
            "settings": settings, "load_average_after": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_outputs(results: dict[str, Any]) -> None:
    rows = sorted(results["sizes"].values(), key=lambda r: r["clients"])
    lines = ["| clients | per round | records each | median s / round | per client trained | peak PSS (MB) "
             "| peak RSS sum (MB) | start-up (s) | final acc |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['clients_per_round']} | {r['records_per_client']:g} | {r['round_seconds_median']:.2f} | "
                     f"{r['round_seconds_median'] / r['clients_per_round'] * 1000:.1f} ms | {r['peak_pss_mb']:.0f} | "
                     f"{r['peak_rss_sum_mb']:.0f} | {r['ready_seconds']:.1f} | {r['final_accuracy']:.4f} |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    xs = [r["clients"] for r in rows]
    ax_t.plot(xs, [r["round_seconds_median"] for r in rows], marker="o")
    ax_t.set(xscale="log", yscale="log", xlabel="clients (10 % per round)", ylabel="seconds per round (median)",
             title="Time per round")
    ax_m.plot(xs, [r["peak_pss_mb"] for r in rows], marker="o", label="peak PSS, process tree")
    ax_m.set(xscale="log", xlabel="clients (10 % per round)", ylabel="MB", title="Peak memory")
    ax_m.set_ylim(bottom=0)
    ax_m.legend(loc="best")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3, which="both")
    fig.savefig(OUT / "scale_clients.png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--force", action="store_true", help="measure sizes already in the results file again")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "scale_clients.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"sizes": {}}
    results.update(cpu_count=os.cpu_count(), rounds=args.rounds, model=args.model, hidden=args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            if str(n) in results["sizes"] and not args.force:
                print(f"{n} clients: already measured (use --force)", flush=True)
                continue
            r = measure(n, args.rounds, args.model, args.hidden, args.extra, Path(tmp))
            results["sizes"][str(n)] = r
            path.write_text(json.dumps(results, indent=1))  # resumable: one size at a time
            write_outputs(results)
            print(f"{n} clients: {r['round_seconds_median']:.2f} s/round, peak PSS {r['peak_pss_mb']:.0f} MB", flush=True)
    write_outputs(results)


if __name__ == "__main__":
    main()
