"""Speed and memory: our simulation against a plain PyTorch loop doing the same work.

Both run as child processes, one after the other in the same invocation (so they see the same
machine), each watched by a sampler that records the peak memory of its whole process tree:
PSS (proportional set size: shared pages such as torch's libraries and the shared-memory
dataset counted once across processes) and, for reference, the sum of RSS (which counts them
once per process). Wall time is the child's whole life; start-up is wall time minus the rounds.

    python benchmarks/speed.py --rounds 20 --repeats 1
    python benchmarks/speed.py --rounds 20 --backends process,ray   # the pool and Ray side by side

With Ray the driver starts a private one-node Ray (``ray.init``): its GCS, raylet and workers are
children of the simulation process, so the sampler counts Ray's daemons in the peak memory too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            pss += info.pss
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def run_watched(cmd: list[str]) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"pss": 0, "rss": 0}
    proc = psutil.Process(child.pid)

    def sample() -> None:
        while child.poll() is None:
            try:
                pss, rss = _tree_memory(proc)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(1.0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = child.communicate()
    wall = time.perf_counter() - start
    t.join()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    # the 1-minute load average before and after (this machine is shared: a run next to other work is slower)
    return {"wall_seconds": wall, "peak_pss_mb": peak["pss"] / 2**20, "peak_rss_sum_mb": peak["rss"] / 2**20,
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}


def run_plain(config: Path, rounds: int, work: Path, tag: str) -> dict:
    out = work / f"plain-{tag}.json"
    res = run_watched([sys.executable, "benchmarks/plain_loop.py", "--config", str(config), "--rounds", str(rounds),
                       "--out", str(out)])
    data = json.loads(out.read_text())
    secs = [r["seconds"] for r in data["rounds"]]
    accuracy = [(r["round"], r["test_accuracy"]) for r in data["rounds"] if r["test_accuracy"] is not None]
    res.update(ready_seconds=data["startup_seconds"], round_seconds=secs, accuracy=accuracy, threads=data["threads"])
    return res


def run_ours(config: Path, rounds: int, work: Path, tag: str, backend: str = "process") -> dict:
    out = work / f"ours-{backend}-{tag}"
    res = run_watched([sys.executable, "-m", "fl_server", "simulate", "--config", str(config), "--set", f"num_rounds={rounds}",
                       "--set", f"backend={backend}", "--output", str(out), "--no-progress"])
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    res.update(ready_seconds=summary["ready_after_process_start_seconds"], round_seconds=[float(r["seconds"]) for r in rows],
               accuracy=[(int(r["round"]), float(r["test_accuracy"])) for r in rows if r["test_accuracy"]])
    return res


def summarise(runs: list[dict]) -> dict:
    walls = [r["wall_seconds"] for r in runs]
    per_round = [statistics.median(r["round_seconds"]) for r in runs]
    startup = [r["ready_seconds"] for r in runs]
    other = [r["wall_seconds"] - r["ready_seconds"] - sum(r["round_seconds"]) for r in runs]
    return {
        "wall_seconds_median": statistics.median(walls),
        "round_seconds_median": statistics.median(per_round),
        "rounds_total_seconds_median": statistics.median(sum(r["round_seconds"]) for r in runs),  # all rounds, evaluation included
        "startup_seconds_median": statistics.median(startup),  # process start -> first round
        "outside_rounds_seconds_median": statistics.median(other),  # checkpoints, final save, shutdown
        "peak_pss_mb_max": max(r["peak_pss_mb"] for r in runs),
        "peak_rss_sum_mb_max": max(r["peak_rss_sum_mb"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "reference_speed.yaml")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="rotations of the run order; medians are reported")
    ap.add_argument("--backends", default="process", help="comma-separated simulation backends: process, ray")
    ap.add_argument("--name", default=None,
                    help="result file name under benchmarks/results/ (default: speed_vs_plain[_<backends>].json)")
    args = ap.parse_args()
    if args.name is not None and (Path(args.name).name != args.name or not args.name.endswith(".json")):
        ap.error(f"--name: {args.name!r} is not a plain file name ending in .json")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"process", "ray"})
    if unknown or not backends:
        ap.error(f"--backends: {', '.join(unknown) or 'empty'} is not one of process, ray")
    names = ["plain", *backends]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            order = names[i % len(names):] + names[:i % len(names)]  # each arm first once per rotation
            for name in order:
                if name == "plain":
                    res = run_plain(args.config, args.rounds, work, str(i))
                else:
                    res = run_ours(args.config, args.rounds, work, str(i), backend=name)
                runs[name].append(res)
                median_round = statistics.median(res["round_seconds"])
                print(f"{name} #{i}: wall {res['wall_seconds']:.1f} s, start-up {res['ready_seconds']:.1f} s, median round "
                      f"{median_round:.2f} s, peak PSS {res['peak_pss_mb']:.0f} MB, load average "
                      f"{res['load_average_before']:.1f} -> {res['load_average_after']:.1f}", flush=True)
    summaries = {name: summarise(r) for name, r in runs.items()}
    sp = summaries["plain"]
    result: dict[str, Any] = {
        "config": str(args.config.relative_to(ROOT)), "rounds": args.rounds, "repeats": args.repeats,
        "cpu_count": psutil.cpu_count(), "plain": sp, "accuracy_plain": runs["plain"][0]["accuracy"],
    }
    for backend in backends:
        key = "ours" if backend == "process" else f"ours_{backend}"
        so = summaries[backend]
        result[key] = so
        result[f"wall_ratio_{key}_over_plain"] = so["wall_seconds_median"] / sp["wall_seconds_median"]
        # each rotation's own ratio (the two ran minutes apart): robust to load that changes between rotations
        pairs = [o["wall_seconds"] / p["wall_seconds"] for o, p in zip(runs[backend], runs["plain"], strict=True)]
        result[f"wall_ratio_{key}_over_plain_per_rotation"] = pairs
        result[f"wall_ratio_{key}_over_plain_median_of_rotations"] = statistics.median(pairs)
        result[f"round_ratio_{key}_over_plain"] = so["round_seconds_median"] / sp["round_seconds_median"]
        result[f"max_accuracy_difference_{key}"] = max(
            abs(a[1] - b[1]) for a, b in zip(runs["plain"][0]["accuracy"], runs[backend][0]["accuracy"], strict=True))
        result[f"accuracy_{key}"] = runs[backend][0]["accuracy"]
    result["runs"] = runs
    result["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or ("speed_vs_plain.json" if backends == ["process"] else f"speed_vs_plain_{'_'.join(backends)}.json")
    (RESULTS / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
