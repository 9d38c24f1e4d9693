"""The end of a simulation's run: its report drawn serially (``write_report``) against the plots drawn in
forked processes (``start_report(parallel=True)``, fl_server/forked_plots.py), side by side, alternating.

Each measurement runs in a fresh process that first imports torch and loads Fashion-MNIST (so it forks a
process as large as the simulation's driver, which has not imported matplotlib), copies the report's inputs
of RUN_DIR into a new folder and times the report from start to the last file written.

    python benchmarks/report_parallel.py RUN_DIR [--repeats 5] [--out results/report_parallel.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ("summary.json", "history.csv", "label_histograms.csv", "participation.csv", "client_accuracy.csv",
          "personalization.csv", "participation_rounds.csv", "config.yaml", "model.pt")

CHILD = """
import json, sys, time
from pathlib import Path
from fl_common.data import load_dataset
train = load_dataset("fashion_mnist", "train")
from fl_server import reports
run, arm = Path(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
files = reports.write_report(run) if arm == "serial" else reports.start_report(run, parallel=True).finish()
print(json.dumps({"seconds": time.perf_counter() - t, "files": sorted(files)}))
"""


def measure(run_dir: Path, arm: str, work: Path) -> dict:
    target = work / f"{arm}-{time.monotonic_ns()}"
    target.mkdir()
    for name in INPUTS:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, target / name)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, str(target), arm], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path, help="a finished simulation's run folder (its report inputs are copied)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, help="JSON file for the results")
    args = ap.parse_args()
    if not (args.run_dir / "summary.json").is_file():
        ap.error(f"{args.run_dir} has no summary.json: not a finished run folder")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    runs: dict[str, list[float]] = {"serial": [], "parallel": []}
    files: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for arm in (("serial", "parallel") if i % 2 == 0 else ("parallel", "serial")):
                res = measure(args.run_dir, arm, Path(tmp))
                runs[arm].append(res["seconds"])
                files[arm] = res["files"]
                print(f"{arm} #{i}: {res['seconds']:.3f} s", flush=True)
    if files["serial"] != files["parallel"]:
        raise SystemExit(f"the two arms wrote different files: {files}")
    result = {"run_dir": str(args.run_dir), "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg()[0], "files": files["serial"],
              "serial_seconds_median": statistics.median(runs["serial"]),
              "parallel_seconds_median": statistics.median(runs["parallel"]),
              "runs": runs, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
