"""The main job, private (its default) against ``--no-privacy``: accuracy and wall time, same rounds.

Runs ``python -m fl_server demo --clients N --rounds R`` twice, one arm after the other on the same
machine (private first, then plain), and writes what each printed as its last line (accuracy, the
privacy block) with its wall time to ``benchmarks/results/private_demo/results.json`` and a table to
``README.md`` there. Resumable: an arm whose result is on file is not run again (``--force`` reruns).

    python benchmarks/private_demo.py                # 10 clients, 5 rounds, both arms
    python benchmarks/private_demo.py --repeats 2    # alternate the arms twice, report medians
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "private_demo"
ARMS = {"private": [], "plain": ["--no-privacy"]}


def run_arm(extra: list[str], clients: int, rounds: int) -> dict[str, Any]:
    """One demo run: its last stdout line (JSON) and its wall time."""
    with tempfile.TemporaryDirectory(prefix="private-demo-") as tmp:
        cmd = [sys.executable, "-m", "fl_server", "demo", "--clients", str(clients), "--rounds", str(rounds),
               "--output", str(Path(tmp) / "demo"), "--no-progress", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        last = json.loads(proc.stdout.strip().splitlines()[-1])
        history = Path(last["history"]).read_text(encoding="utf-8").strip().splitlines()
        log_lines = [line for line in proc.stderr.splitlines() if "DP recipe" in line]
        return {"wall_s": round(wall, 1), "final_accuracy": last["final_accuracy"], "rounds": last["rounds"],
                "privacy": last["privacy"], "history": history, "recipe_log": log_lines[:1]}


def write_readme(results: dict[str, list[dict[str, Any]]], clients: int, rounds: int) -> None:
    rows = []
    for arm, runs in results.items():
        if not runs:
            continue
        acc = statistics.median(float(r["final_accuracy"]) for r in runs)
        wall = statistics.median(float(r["wall_s"]) for r in runs)
        p = runs[-1]["privacy"]
        eps = f"{p['epsilon_spent']:.3f} of {p['epsilon_budget']:g} (delta {p['delta']:g})" if p.get("differential_privacy") else "-"
        rows.append(f"| {arm} | {len(runs)} | {100 * acc:.2f} % | {wall:.0f} s | {eps} | "
                    f"{'on' if p.get('secure_aggregation') else 'off'} | {p.get('encryption')} |")
    private = results.get("private") or []
    meaning = private[-1]["privacy"].get("guarantee", "") if private else ""
    sigma = private[-1]["privacy"].get("noise_multiplier_range") if private else None
    recipe = private[-1]["recipe_log"][0].split("] ", 1)[-1] if private and private[-1]["recipe_log"] else ""
    text = f"""# The main job, private against plain

`python benchmarks/private_demo.py` runs `python -m fl_server demo --clients {clients} --rounds {rounds}` (the README's main
job: REST server + {clients} client daemons on loopback, Fashion-MNIST, 600 records per client, IID) with its defaults,
which are private, and again with `--no-privacy`, one after the other on the same machine (a 2-core machine shared
with other jobs while this ran: wall times are rough, compare them only with each other). Medians over the runs.

| arm | runs | final accuracy (2,000 test images) | wall time | epsilon spent | secure aggregation | encryption |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

What the private run's epsilon means: {meaning}.
{f"Noise multiplier per client: {sigma[0]} to {sigma[1]}." if sigma else ""}

Training settings of the private arm: {recipe or "see results.json"}. The plain arm trains the demo's own
settings (cnn, batch 32, lr 0.05, momentum 0.9, constant lr). `results.json` holds every run's history.csv.
"""
    (OUT / "README.md").write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="run again even where results are on file")
    args = ap.parse_args()
    if not 1 <= args.clients <= 200 or not 1 <= args.rounds <= 100 or not 1 <= args.repeats <= 10:
        ap.error("--clients 1..200, --rounds 1..100, --repeats 1..10")
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "results.json"
    key = f"clients{args.clients}_rounds{args.rounds}"
    saved: dict[str, Any] = json.loads(store.read_text()) if store.is_file() and not args.force else {}
    results: dict[str, list[dict[str, Any]]] = saved.get(key, {arm: [] for arm in ARMS})
    for _ in range(args.repeats):
        for arm, extra in ARMS.items():
            if len(results[arm]) >= args.repeats:
                continue
            print(f"running {arm} ({len(results[arm]) + 1}/{args.repeats}) ...", flush=True)
            results[arm].append(run_arm(extra, args.clients, args.rounds))
            saved[key] = results
            store.write_text(json.dumps(saved, indent=1), encoding="utf-8")
            print(f"  {results[arm][-1]['final_accuracy']} in {results[arm][-1]['wall_s']} s", flush=True)
    write_readme(results, args.clients, args.rounds)
    print(f"wrote {OUT / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
