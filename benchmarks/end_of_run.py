"""End-of-run cost: what a simulation does after its last round (per-client evaluation, summary,
model, report and plots), measured for one or more checkouts side by side in one invocation.

Each checkout runs the reference speed config (configs/reference_speed.yaml) shortened to
``--rounds`` rounds in a child process; the child times ``save_results()`` plus ``close()`` after
``train()``, which is the same work after the last round whatever the number of rounds (the
history table has fewer rows). Wall seconds, and the CPU seconds of save_results in the driver and
its live workers (per-client evaluation runs there now); also the load average, since on a shared
machine wall time mostly measures the neighbours:

    python benchmarks/end_of_run.py --checkout before=/path/to/old --checkout after=. --rounds 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "end_of_run"

CHILD = r"""
import json, sys, time
import psutil
from fl_common.config import load_config
from fl_server.simulation import Simulation
cfg = load_config(sys.argv[1], ["num_rounds=" + sys.argv[2]] + sys.argv[4:])

def cpu():  # this process and its live workers (a worker's CPU is counted before it exits)
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total

with Simulation(cfg, sys.argv[3], progress=False) as sim:
    sim.train()
    wall, cpu0 = time.perf_counter(), cpu()
    sim.save_results()
    saved, cpu1 = time.perf_counter(), cpu()
    sim.close()
    print(json.dumps({"end_of_run_seconds": time.perf_counter() - wall, "save_results_seconds": saved - wall,
                      "close_seconds": time.perf_counter() - saved, "save_results_cpu_seconds": cpu1 - cpu0}))
"""


def run(checkout: Path, config: Path, rounds: int, out: Path, overrides: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config), str(rounds), str(out), *overrides], cwd=checkout,
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout}: {proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", action="append", required=True, metavar="NAME=PATH", help="a source tree to measure")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "reference_speed.yaml")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per checkout; medians are reported")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=RESULTS / "end_of_run_cpu.json")
    args = ap.parse_args()
    checkouts = [(name, Path(path).resolve()) for name, path in (c.split("=", 1) for c in args.checkout)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, path in checkouts if i % 2 == 0 else checkouts[::-1]:
                res = run(path, args.config.resolve(), args.rounds, Path(tmp) / f"{name}-{i}", args.overrides)
                runs[name].append(res)
                print(f"{name} #{i}: end of run {res['end_of_run_seconds']:.2f} s wall (save_results "
                      f"{res['save_results_seconds']:.2f} s wall, {res['save_results_cpu_seconds']:.2f} s CPU)", flush=True)
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    result = {"config": str(args.config), "rounds": args.rounds, "overrides": args.overrides, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "median": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
