"""Run a grid of simulations, resumably, and write their results down as they finish.

A grid file lists experiments (a config file plus overrides). Each runs in
``benchmarks/work/<grid>/<name>/`` (git-ignored: checkpoints are large); a finished one is not
run again, an interrupted one continues from its last checkpoint. After every experiment the
small results (history.csv, summary.json) are copied to ``benchmarks/results/<grid>/<name>/``
and the grid's table (``results.md``) and curves (``curves.png``) are rewritten, so whatever
finished before a session ended is already on disk to commit.

    python benchmarks/run_grid.py benchmarks/grids/accuracy.yaml [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_grid(path: Path) -> tuple[str, dict, list[dict]]:
    data = yaml.safe_load(path.read_text())
    name = data.get("name") or path.stem
    common = data.get("common", {})
    experiments = data["experiments"]
    for e in experiments:
        if "name" not in e:
            raise SystemExit(f"{path}: every experiment needs a name")
    return name, common, experiments


def is_finished(run: Path) -> bool:
    summary = run / "summary.json"
    if not summary.is_file():
        return False
    s = json.loads(summary.read_text())
    return (s.get("rounds_completed") == s.get("config", {}).get("num_rounds") or s.get("mode") in ("centralized", "local_only")
            or bool(s.get("stop_reason")))  # ended early by its privacy budget: done, not to be retried


def run_experiment(exp: dict, common: dict, run: Path) -> None:
    settings = {**common.get("set", {}), **exp.get("set", {})}
    config = exp.get("config", common.get("config"))
    cmd = [sys.executable, "-m", "fl_server", "simulate", "--no-progress", "--output", str(run)]
    if config:
        cmd += ["--config", str(ROOT / config)]
    cmd += [f"--set={k}={v}" for k, v in settings.items()]
    if exp.get("centralized"):
        cmd.append("--centralized")
    elif exp.get("local_only"):  # one pass over all clients, no checkpoint: an interrupted one runs again
        cmd.append("--local-only")
    elif (run / "checkpoint.pt").is_file():
        cmd.append("--resume")
    print(f"[{time.strftime('%H:%M:%S')}] {exp['name']}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def collect(grid: str, experiments: list[dict], work: Path, results: Path) -> None:
    rows = []
    curves = {}
    for exp in experiments:
        run = work / exp["name"]
        if not (run / "history.csv").is_file():
            continue
        dest = results / exp["name"]
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("history.csv", "summary.json", "config.yaml"):
            if (run / f).is_file():
                shutil.copy2(run / f, dest / f)
        with open(run / "history.csv") as fh:
            hist = list(csv.DictReader(fh))
        evaluated = [(int(r["round"]), float(r["test_accuracy"])) for r in hist if r["test_accuracy"]]
        curves[exp["name"]] = evaluated
        done = is_finished(run)
        seconds = sum(float(r["seconds"]) for r in hist)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        privacy = summary.get("privacy") or {}
        rows.append({
            "name": exp["name"], "status": "done" if done else "partial", "rounds": len(hist),
            "final": evaluated[-1][1] if evaluated else None, "best": max(a for _, a in evaluated) if evaluated else None,
            "median_round_s": sorted(float(r["seconds"]) for r in hist)[len(hist) // 2] if hist else None,
            "hours": seconds / 3600, "note": exp.get("note", ""),
            "epsilon": privacy.get("epsilon_spent") if privacy.get("differential_privacy") else None,
            "mb_per_round": sum(int(r["bytes"]) for r in hist) / max(len(hist), 1) / 2**20,
            # per-client accuracy (summary.json "client_accuracy"; its "measure" says on which data)
            "client_mean": (summary.get("client_accuracy") or {}).get("mean"),
            "client_worst10": (summary.get("client_accuracy") or {}).get("worst_10pct"),
            "flat": summary.get("mode") == "local_only",
        })
    lines = [f"# {grid}", "", "| experiment | status | rounds | final acc | best acc | client acc mean / worst 10 % "
             "| epsilon spent | MB per round (up + down) | median s/round | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "" if v is None else f"{100 * v:.2f} %"
        eps = "" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        clients = "" if r["client_mean"] is None else f"{fmt(r['client_mean'])} / {fmt(r['client_worst10'])}"
        lines.append(f"| {r['name']} | {r['status']} | {r['rounds']} | {fmt(r['final'])} | {fmt(r['best'])} | {clients} | "
                     f"{eps} | {r['mb_per_round']:.1f} | {r['median_round_s']:.2f} | {r['note']} |")
    lines.append("")
    lines.append("_client acc_: summary.json \"client_accuracy\" - the final model(s) per client, on each client's training "
                 "data, or on its held-out part where client_test_fraction > 0 (its \"measure\" says which). Local-only rows: "
                 "final acc = mean over clients of each client's own model on the global test set (drawn as a flat line).")
    lines.append("")
    lines.append(f"_Written by benchmarks/run_grid.py at {time.strftime('%Y-%m-%d %H:%M:%S')}._")
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.md").write_text("\n".join(lines) + "\n")
    (results / "results.json").write_text(json.dumps(rows, indent=1))
    plot(curves, results / "curves.png", grid, flat={r["name"] for r in rows if r["flat"]})


def plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, flat: AbstractSet[str] = frozenset()) -> None:
    """Test accuracy per round; runs named in ``flat`` (the local-only baseline: no rounds) as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in curves.items():
        if pts and name in flat:
            ax.axhline(100 * pts[-1][1], label=f"{name} (no rounds)", linestyle="--", linewidth=1)
        elif pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=name, marker=".")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("grid", type=Path)
    ap.add_argument("--only", nargs="*", help="run only these experiments, in the order given (a priority queue)")
    ap.add_argument("--list", action="store_true", help="show the status of each experiment and exit")
    ap.add_argument("--collect", action="store_true", help="only rewrite the results (table, curves) from what has run")
    args = ap.parse_args()
    name, common, experiments = load_grid(args.grid)
    work = ROOT / "benchmarks" / "work" / name
    results = ROOT / "benchmarks" / "results" / name
    if args.collect:
        collect(name, experiments, work, results)
        return
    if args.only:
        by_name = {exp["name"]: exp for exp in experiments}
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            raise SystemExit(f"error: {args.grid} has no experiment named {', '.join(unknown)}")
        selected = [by_name[n] for n in dict.fromkeys(args.only)]
    else:
        selected = experiments
    for exp in selected:
        run = work / exp["name"]
        if args.list:
            print(f"{exp['name']}: {'done' if is_finished(run) else 'partial' if (run / 'checkpoint.pt').exists() else 'todo'}")
            continue
        if is_finished(run):
            print(f"{exp['name']}: already done", flush=True)
        else:
            run_experiment(exp, common, run)
        collect(name, experiments, work, results)
    if not args.list:
        collect(name, experiments, work, results)


if __name__ == "__main__":
    main()
