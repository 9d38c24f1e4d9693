"""The algorithms summary computes its aims from the runs' own files (benchmarks/plot_algorithms.py).

The verdicts in ``algorithms_summary.md`` are what the README and the closing notes quote, so the
arithmetic behind them (gap to clean FedAvg, which SCAFFOLD run stands for a setting, met / missed /
not run) is checked here on small run folders written the way ``run_grid.py`` copies them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import plot_algorithms
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return plot_algorithms


def _run(results: Path, name: str, curve: list[float], *, stop_reason: str | None = None, lr: float = 0.02,
         client_accuracy: dict | None = None) -> None:
    folder = results / name
    folder.mkdir(parents=True)
    rows = ["round,test_accuracy,test_loss,train_loss,clients,seconds,bytes,epsilon"]
    rows += [f"{5 * (i + 1)},{acc},0.5,0.5,10,1.0,100," for i, acc in enumerate(curve)]
    (folder / "history.csv").write_text("\n".join(rows) + "\n")
    summary = {"final_accuracy": curve[-1], "best_accuracy": max(curve), "rounds_completed": 5 * len(curve),
               "stop_reason": stop_reason, "config": {"learning_rate": lr}, "client_accuracy": client_accuracy}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_aims_and_gaps_come_from_the_run_files(tmp_path: Path) -> None:
    mod = _module()
    results = tmp_path / "algorithms"
    _run(results, "fedavg_iid", [0.80, 0.905])
    _run(results, "fedavg_dirichlet0.1", [0.60, 0.70])
    _run(results, "scaffold_dirichlet0.1", [0.74], stop_reason="training diverged in round 51: client 57: ...", lr=0.05)
    _run(results, "scaffold_lr0.02_dirichlet0.1", [0.65, 0.72], lr=0.02)
    _run(results, "fedavg_attack", [0.10, 0.09])
    _run(results, "median_attack", [0.80, 0.89])  # 1.5 points below clean
    _run(results, "trimmed_mean_attack", [0.80, 0.88])  # 2.5
    _run(results, "multikrum_attack", [0.80, 0.87])  # 3.5: misses the 3-point aim (no better Multi-Krum setting run)
    runs = mod.load_runs(results)
    assert runs["fedavg_iid"].curve == [(5, 80.0), (10, 90.5)]
    assert mod.scaffold_run(runs, "dirichlet0.1").name == "scaffold_lr0.02_dirichlet0.1", "the diverged run must not stand"

    text = "\n".join(mod.summary_lines(runs, None))
    assert "| coordinate-wise median | 89.00 % | 89.00 % | 1.50 points |" in text
    assert "| Multi-Krum (f = 3, m = n - f = 7) | 87.00 % | 87.00 % | 3.50 points |" in text
    table = [row for row in text.split("## Aims of the issue")[1].splitlines() if row.startswith("| ")]
    aim_rows = table[1:]  # past the header (the |---| rule does not start with "| ")
    aims = {row.split(" | ")[0].lstrip("| "): row.rsplit(" | ", 1)[1].rstrip(" |") for row in aim_rows}
    assert aims["FedAvg IID >= 90 %"] == "**met**"
    assert aims["FedAvg Dirichlet(0.1) >= 85 %"] == "**missed**"
    assert aims["FedAvg Dirichlet(0.5) >= 88.5 %"] == "not run yet"
    _run(results, "fedavg_dirichlet0.5", [0.88])
    _run(results, "fedavg_sgd_dirichlet0.5", [0.886])  # the issue leaves the client optimiser free: the better one counts
    again = "\n".join(mod.summary_lines(mod.load_runs(results), None))
    assert "| FedAvg Dirichlet(0.5) >= 88.5 % | 88.60 % (fedavg_sgd_dirichlet0.5) | **met** |" in again
    assert aims["SCAFFOLD or FedProx ahead of FedAvg at Dirichlet(0.1)"] == "**met**"  # 72 % (lr 0.02) > 70 %
    robust = "robust rules within 3 points of clean FedAvg under attack (each rule's best setting)"
    assert aims[robust] == "**missed**"
    _run(results, "multikrum_m5_attack", [0.80, 0.90])  # a better Multi-Krum setting: each family's best now counts
    text = "\n".join(mod.summary_lines(mod.load_runs(results), None))
    assert "| Multi-Krum (f = 3, m = 5) | 90.00 % | 90.00 % | 0.50 points |" in text
    verdict = next(row for row in text.splitlines() if row.startswith(f"| {robust}"))
    assert verdict.endswith("| **met** |") and "Multi-Krum (f = 3, m = 5) 0.50" in verdict and "3.50" not in verdict
    (results / "fedavg_sgd_dirichlet0.5" / "summary.json").write_text(json.dumps({
        "final_accuracy": 0.886, "best_accuracy": 0.886, "rounds_completed": 5, "config": {},
        "client_accuracy": {"mean": 0.86, "worst_10pct": 0.6, "min": 0.5, "std": 0.1}}))
    fairness = "\n".join(mod.summary_lines(mod.load_runs(results), None))
    assert "| fedavg_sgd_dirichlet0.5 | 88.60 % | 86.00 % | 60.00 % | 50.00 % | 10.00 % |" in fairness

    assert mod.main(["--results", str(results), "--centralized", str(tmp_path / "none")]) == 0
    assert (results / "algorithms_summary.md").read_text().startswith("# Algorithms on the reference experiment")
    assert (results / "algorithms_by_setting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
