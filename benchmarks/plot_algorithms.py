"""Summary of the algorithms grid: one panel per data setting, the attack panel, and the aims.

    python benchmarks/plot_algorithms.py [--results benchmarks/results/algorithms]

``run_grid.py`` draws every run of a grid on one chart, which is unreadable at 25 runs. This
script reads the per-run ``summary.json`` / ``history.csv`` that the grid copies into its results
folder and writes, beside them:

- ``algorithms_by_setting.png``: test accuracy per round, one panel each for IID, Dirichlet(0.5),
  Dirichlet(0.1) (FedAvg, FedProx, SCAFFOLD, FedYogi, the plain-SGD FedAvg references dashed,
  local-only as a flat dotted line) and one for the Gaussian-noise attack (clean FedAvg beside
  FedAvg, median, trimmed mean and Multi-Krum under attack);
- ``algorithms_summary.md``: the strategy x setting matrix, the attack table with each rule's gap
  to clean FedAvg, q-FedAvg's per-client fairness beside plain-SGD FedAvg's, the personalization
  comparison, and every aim of the issue marked met / missed / not run, computed from the files.

A run still in progress (no ``summary.json`` yet) is left out; re-run the script when it ends.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"iid": "IID", "dirichlet0.5": "Dirichlet(0.5)", "dirichlet0.1": "Dirichlet(0.1)"}
STRATEGIES = {"fedavg": "FedAvg (lr 0.02, momentum 0.9)", "fedprox": "FedProx (mu 0.01)",
              "scaffold": "SCAFFOLD (plain SGD)", "fedyogi": "FedYogi (server lr 0.01)"}
ATTACK_RULES = {"fedavg_attack": "FedAvg", "median_attack": "coordinate-wise median",
                "trimmed_mean_attack": "trimmed mean (30 %)",
                "trimmed_mean_0.4_attack": "trimmed mean (40 %: of 10, the middle 2 = the median)",
                "multikrum_attack": "Multi-Krum (f = 3, m = n - f = 7)", "multikrum_m5_attack": "Multi-Krum (f = 3, m = 5)"}
#: the rule family of each robust run: the aim is judged on each family's best measured setting
ATTACK_FAMILY = {"median_attack": "median", "trimmed_mean_attack": "trimmed mean", "trimmed_mean_0.4_attack": "trimmed mean",
                 "multikrum_attack": "Multi-Krum", "multikrum_m5_attack": "Multi-Krum"}
ROBUST_GAP_AIM = 3.0  # points below clean FedAvg (issue 4)


@dataclass
class Run:
    """What one finished run left in its results folder."""

    name: str
    final: float | None
    best: float | None
    rounds: int
    stop_reason: str | None
    curve: list[tuple[int, float]]  # (round, test accuracy in %)
    client_accuracy: dict | None
    personalization: dict | None
    config: dict


def load_runs(results: Path) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    for summary_path in sorted(results.glob("*/summary.json")):
        folder = summary_path.parent
        summary = json.loads(summary_path.read_text())
        curve: list[tuple[int, float]] = []
        history = folder / "history.csv"
        if history.is_file():
            with history.open() as f:
                curve = [(int(r["round"]), 100 * float(r["test_accuracy"])) for r in csv.DictReader(f) if r.get("test_accuracy")]
        runs[folder.name] = Run(folder.name, summary.get("final_accuracy"), summary.get("best_accuracy"),
                                int(summary.get("rounds_completed") or 0), summary.get("stop_reason"), curve,
                                summary.get("client_accuracy"), summary.get("personalization"), summary.get("config") or {})
    return runs


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def scaffold_run(runs: dict[str, Run], setting: str) -> Run | None:
    """The SCAFFOLD run shown for a setting: the lower-lr rerun where the first one diverged."""
    for name in (f"scaffold_lr0.02_{setting}", f"scaffold_{setting}"):
        run = runs.get(name)
        if run is not None and not (run.stop_reason and "diverged" in run.stop_reason):
            return run
    return runs.get(f"scaffold_{setting}")


def strategy_run(runs: dict[str, Run], strategy: str, setting: str) -> Run | None:
    return scaffold_run(runs, setting) if strategy == "scaffold" else runs.get(f"{strategy}_{setting}")


def cell(run: Run | None) -> str:
    if run is None:
        return "not run"
    text = f"{pct(run.final)} (best {pct(run.best)})"
    if run.stop_reason:
        text += f", {run.stop_reason.split(':')[0]}"
    lr = run.config.get("learning_rate")
    if run.name.startswith("scaffold") and lr is not None:
        text += f", lr {lr}"
    return text


def aim(ok: bool | None) -> str:
    return "not run yet" if ok is None else ("**met**" if ok else "**missed**")


def summary_lines(runs: dict[str, Run], centralized: Run | None) -> list[str]:
    lines = ["# Algorithms on the reference experiment: summary", "",
             "Fashion-MNIST, `cnn`, 100 clients, 10 per round, 1 local epoch, batch 32, 100 rounds "
             "(`benchmarks/grids/algorithms.yaml`). final = test accuracy of the model after round 100 (or the round the "
             "run ended), best = the best evaluated round (every 5th).", "",
             "## Strategy x data setting", "", "| strategy | " + " | ".join(SETTINGS.values()) + " |",
             "|---" * (len(SETTINGS) + 1) + "|"]
    for key, label in STRATEGIES.items():
        lines.append(f"| {label} | " + " | ".join(cell(strategy_run(runs, key, s)) for s in SETTINGS) + " |")
    for prefix, label in (("fedavg_sgd_", "FedAvg plain SGD (lr 0.1)"), ("fedavg_sgd_lr0.05_", "FedAvg plain SGD (lr 0.05)"),
                          ("local_only_", "local-only (20 epochs, each client alone)")):
        lines.append(f"| {label} | " + " | ".join(cell(runs.get(prefix + s)) for s in SETTINGS) + " |")
    if centralized is not None:
        lines += ["", f"Centralized baseline (pooled data, same samples per round; core grid): {pct(centralized.final)} "
                      f"(best {pct(centralized.best)})."]

    clean = runs.get("fedavg_iid")
    lines += ["", "## 20 % of clients send Gaussian noise (IID)", "",
              "| aggregation | final | best | gap to clean FedAvg (final) |", "|---|---|---|---|"]
    if clean is not None:
        lines.append(f"| FedAvg, no attack | {pct(clean.final)} | {pct(clean.best)} | - |")
    gaps: dict[str, float] = {}
    for name, label in ATTACK_RULES.items():
        run = runs.get(name)
        if run is None:
            lines.append(f"| {label} | not run | | |")
            continue
        gap = None if clean is None or run.final is None or clean.final is None else 100 * (clean.final - run.final)
        if gap is not None and name != "fedavg_attack":
            gaps[name] = gap
        lines.append(f"| {label} | {pct(run.final)} | {pct(run.best)} | {'-' if gap is None else f'{gap:.2f} points'} |")

    lines += ["", "## Fairness: q-FedAvg at Dirichlet(0.5)", "",
              "client accuracy = the final global model on each client's own training data (summary.json `client_accuracy`).",
              "", "| run | final | client mean | worst 10 % | min | std across clients |", "|---|---|---|---|---|---|"]
    for name in ("fedavg_sgd_dirichlet0.5", "qfedavg_q0.1_dirichlet0.5", "qfedavg_q1_dirichlet0.5", "fedavg_dirichlet0.5"):
        run = runs.get(name)
        ca = (run.client_accuracy or {}) if run else {}
        if run is None:
            lines.append(f"| {name} | not run | | | | |")
        else:
            lines.append(f"| {name} | {pct(run.final)} | {pct(ca.get('mean'))} | {pct(ca.get('worst_10pct'))} | "
                         f"{pct(ca.get('min'))} | {pct(ca.get('std'))} |")

    personal = [(n, runs[n]) for n in ("personalization_dirichlet0.5", "personalization_dirichlet0.1") if n in runs]
    if personal:
        lines += ["", "## Personalization (each client's held-out 20 %, mean over clients)", "",
                  "| run | federated (global model) | fine-tuned 1 epoch | local-only | clients gaining from fine-tuning |",
                  "|---|---|---|---|---|"]
        for name, run in personal:
            p = run.personalization or {}
            gain = p.get("gain_finetuned_vs_federated") or {}
            gained = f"{gain['clients_improved']} of {p.get('clients', '?')}" if "clients_improved" in gain else "-"
            means = " | ".join(pct((p.get(k) or {}).get("mean")) for k in ("federated", "finetuned", "local_only"))
            lines.append(f"| {name} | {means} | {gained} |")

    def best_fedavg(setting: str) -> Run | None:
        """FedAvg at its best measured client optimiser for a setting (the issue leaves lr and momentum free)."""
        candidates = [runs[n] for n in (f"fedavg_{setting}", f"fedavg_sgd_{setting}", f"fedavg_sgd_lr0.05_{setting}")
                      if n in runs and runs[n].final is not None]
        return max(candidates, key=lambda r: r.final or 0.0, default=None)

    def reached(setting: str, threshold: float) -> bool | None:
        run = best_fedavg(setting)
        return None if run is None or run.final is None else run.final >= threshold

    def final_of(setting: str) -> str:
        run = best_fedavg(setting)
        return "not run" if run is None else f"{pct(run.final)} ({run.name})"

    fedavg01 = best_fedavg("dirichlet0.1")
    contenders = [r for r in (scaffold_run(runs, "dirichlet0.1"), runs.get("fedprox_dirichlet0.1")) if r is not None]
    ahead = None if fedavg01 is None or not contenders else any((r.final or 0) > (fedavg01.final or 0) for r in contenders)
    best_gap: dict[str, tuple[float, str]] = {}
    for name, gap in gaps.items():
        family = ATTACK_FAMILY[name]
        if family not in best_gap or gap < best_gap[family][0]:
            best_gap[family] = (gap, name)
    robust = None if len(best_gap) < 3 else all(g <= ROBUST_GAP_AIM for g, _ in best_gap.values())
    lines += ["", "## Aims of the issue", "",
              "FedAvg's aims are judged at its best measured client optimiser (momentum 0.9 at lr 0.02, or plain SGD).", "",
              "| aim | measured | verdict |", "|---|---|---|",
              f"| FedAvg IID >= 90 % | {final_of('iid')} | {aim(reached('iid', 0.90))} |",
              f"| FedAvg Dirichlet(0.5) >= 88.5 % | {final_of('dirichlet0.5')} | {aim(reached('dirichlet0.5', 0.885))} |",
              f"| FedAvg Dirichlet(0.1) >= 85 % | {final_of('dirichlet0.1')} | {aim(reached('dirichlet0.1', 0.85))} |",
              "| SCAFFOLD or FedProx ahead of FedAvg at Dirichlet(0.1) | "
              + ", ".join(f"{r.name} {pct(r.final)}" for r in contenders)
              + f" vs FedAvg's best {pct(fedavg01.final if fedavg01 else None)}"
              + f" | {aim(ahead)} |",
              "| robust rules within 3 points of clean FedAvg under attack (each rule's best setting) | "
              + ", ".join(f"{ATTACK_RULES[n]} {g:.2f}" for _, (g, n) in sorted(best_gap.items())) + f" | {aim(robust)} |"]
    return lines


def plot(runs: dict[str, Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True)
    colours = {"fedavg": "C0", "fedprox": "C1", "scaffold": "C2", "fedyogi": "C3"}
    for ax, (setting, label) in zip(axes.flat, SETTINGS.items(), strict=False):  # 3 settings; the 4th panel is the attack
        for key, name in STRATEGIES.items():
            run = strategy_run(runs, key, setting)
            if run is not None and run.curve:
                ax.plot(*zip(*run.curve, strict=True), marker=".", color=colours[key], label=f"{name}: {pct(run.final)}")
        for prefix, style, text in (("fedavg_sgd_", "--", "FedAvg plain SGD lr 0.1"),
                                    ("fedavg_sgd_lr0.05_", ":", "FedAvg plain SGD lr 0.05")):
            run = runs.get(prefix + setting)
            if run is not None and run.curve:
                ax.plot(*zip(*run.curve, strict=True), linestyle=style, color="grey", label=f"{text}: {pct(run.final)}")
        local = runs.get(f"local_only_{setting}")
        if local is not None and local.final is not None:
            ax.axhline(100 * local.final, linestyle=":", color="black",
                       label=f"local-only: {pct(local.final)}")
        ax.set_title(label)
    attack_ax = axes.flat[3]
    clean = runs.get("fedavg_iid")
    if clean is not None and clean.curve:
        attack_ax.plot(*zip(*clean.curve, strict=True), color="black", linestyle="--",
                       label=f"FedAvg, no attack: {pct(clean.final)}")
    for i, (name, label) in enumerate(ATTACK_RULES.items()):
        run = runs.get(name)
        if run is not None and run.curve:
            attack_ax.plot(*zip(*run.curve, strict=True), marker=".", color=f"C{i + 4}", label=f"{label}: {pct(run.final)}")
    attack_ax.set_title("IID, 20 % of clients send N(0, 1) updates")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[1]:
        ax.set_xlabel("round")
    fig.suptitle("Fashion-MNIST, cnn, 100 clients, 10 per round, 100 rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "algorithms")
    parser.add_argument("--centralized", type=Path, default=ROOT / "benchmarks" / "results" / "core_accuracy",
                        help="results folder holding the centralized baseline run")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"no results folder at {args.results}")
    runs = load_runs(args.results)
    if not runs:
        parser.error(f"no run in {args.results} has a summary.json yet")
    centralized = load_runs(args.centralized).get("centralized") if args.centralized.is_dir() else None
    (args.results / "algorithms_summary.md").write_text("\n".join(summary_lines(runs, centralized)) + "\n")
    plot(runs, args.results / "algorithms_by_setting.png")
    print(f"wrote {args.results / 'algorithms_summary.md'} and {args.results / 'algorithms_by_setting.png'} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
