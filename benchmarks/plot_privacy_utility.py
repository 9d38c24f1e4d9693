"""Privacy-utility plot of the privacy grid: final test accuracy against the epsilon each run spent.

    python benchmarks/plot_privacy_utility.py [--results benchmarks/results/privacy]

Reads the per-run ``summary.json`` files that ``run_grid.py`` copies into the results folder
(the epsilon *spent*, from the run's accountant, not the budget asked for) and writes
``privacy_utility.png`` and ``privacy_utility.md`` beside them. Runs named ``sample_eps*`` and
``client_eps*`` are the two series (``sample_eps1_cosine``: a variant series of its own);
``nonprivate`` is drawn as a horizontal line. A run that
ended early (diverged, budget) is drawn hollow, at the accuracy of the model it ended with. The x axis is
the budget asked for (so a run that diverged early stays at its column); each point is labelled with
the epsilon its accountant says it spent.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERIES = {"sample": "sample-level DP-SGD (per-record)", "client": "client-level DP-FedAvg (per-client)"}


def load_rows(results: Path) -> list[dict]:
    """One row per run folder: its series, the budget asked, epsilon spent and accuracy."""
    rows = []
    for summary_path in sorted(results.glob("*/summary.json")):
        name = summary_path.parent.name
        summary = json.loads(summary_path.read_text())
        privacy = summary.get("privacy") or {}
        match = re.fullmatch(r"(sample|client)_eps([0-9]+(?:\.[0-9]+)?)(?:_(\w+))?", name)
        series = None
        if match:
            series = match.group(1) + (f"_{match.group(3)}" if match.group(3) else "")
        elif name.startswith("nonprivate"):
            series = "nonprivate"
        rows.append({
            "name": name,
            "series": series,
            "budget": float(match.group(2)) if match else None,
            "epsilon": privacy.get("epsilon_spent"),
            "accuracy": summary.get("final_accuracy"),
            "best": summary.get("best_accuracy"),
            "rounds": summary.get("rounds_completed"),
            "stop_reason": summary.get("stop_reason"),
            "sigma": privacy.get("noise_multiplier"),
            "sigma_by_size": privacy.get("noise_multiplier_by_size"),
        })
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f} %"

    lines = ["| run | budget epsilon | epsilon spent | rounds | final accuracy | best | noise multiplier | ended |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (str(r["series"]), r["budget"] or 0.0)):
        sigma = "-"
        if r["sigma_by_size"]:
            values = [s for _, s in r["sigma_by_size"]]
            sigma = f"{min(values):.2f} - {max(values):.2f} (per client)"
        elif r["sigma"] is not None:
            sigma = f"{r['sigma']:.2f}"
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        ended = r["stop_reason"] or "all rounds"
        lines.append(f"| {r['name']} | {r['budget'] if r['budget'] is not None else '-'} | {eps} | {r['rounds']} | "
                     f"{pct(r['accuracy'])} | {pct(r['best'])} | {sigma} | {ended[:90]} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str = "Fashion-MNIST, cnn, 100 clients, Dirichlet(0.5), 100 rounds",
         compare: list[dict] | None = None, compare_label: str = "") -> None:
    """``compare``: another grid's rows, its sample-level series and non-private run drawn grey beside these."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    variants = sorted({r["series"] for r in rows if r["series"] and r["series"].split("_")[0] in SERIES} - set(SERIES))
    labels = {**SERIES, **{v: f"{SERIES[v.split('_')[0]]}, {v.split('_', 1)[1]}" for v in variants}}
    for series, label in labels.items():
        pts = sorted((r for r in rows if r["series"] == series and r["budget"] and r["accuracy"] is not None),
                     key=lambda r: r["budget"])
        if not pts:
            continue
        line, = ax.plot([r["budget"] for r in pts], [100 * r["accuracy"] for r in pts], marker="", label=label)
        for r in pts:
            early = r["stop_reason"] is not None
            ax.plot(r["budget"], 100 * r["accuracy"], marker="o", color=line.get_color(),
                    markerfacecolor="none" if early else line.get_color())
            ax.annotate(f"spent {r['epsilon']:.2g}" + (f", ended r{r['rounds']}" if early else ""),
                        (r["budget"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 6), fontsize=7,
                        color=line.get_color())
    if compare:
        pts = sorted((r for r in compare if r["budget"] and r["accuracy"] is not None),
                     key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in pts], [100 * r["accuracy"] for r in pts], marker="s", color="silver",
                label=f"{compare_label}: sample-level DP-SGD")
        for r in compare:
            if r["name"] == "nonprivate" and r["accuracy"] is not None:
                ax.axhline(100 * r["accuracy"], color="silver", linestyle=":",
                           label=f"{compare_label}: non-private ({100 * r['accuracy']:.2f} %)")
    for r in rows:
        if r["series"] == "nonprivate" and r["accuracy"] is not None:
            ax.axhline(100 * r["accuracy"], color="grey", linestyle="--" if r["name"] == "nonprivate" else "-.",
                       label=f"{r['name'].replace('_', ', ')} ({100 * r['accuracy']:.2f} %)")
    ax.axhline(10, color="lightgrey", linestyle=":", label="chance (10 %)")
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in rows + (compare or []) if r["budget"]})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("epsilon budget of the run (delta = 1e-5); each point says the epsilon actually spent")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"Privacy-utility: {title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "privacy")
    ap.add_argument("--title", default="Fashion-MNIST, cnn, 100 clients, Dirichlet(0.5), 100 rounds")
    ap.add_argument("--compare", type=Path, help="another results folder whose sample-level series is drawn beside (grey)")
    ap.add_argument("--compare-label", default="before")
    ap.add_argument("--compare-series", default="sample_cosine", help="which of its series (run names <series>_eps<E>[_<variant>])")
    args = ap.parse_args()
    rows = load_rows(args.results)
    if not rows:
        raise SystemExit(f"no */summary.json under {args.results}")
    write_table(rows, args.results / "privacy_utility.md")
    compare = None
    if args.compare:
        compare = [r for r in load_rows(args.compare) if r["series"] == args.compare_series or r["name"] == "nonprivate"]
    plot(rows, args.results / "privacy_utility.png", args.title, compare, args.compare_label)
    print(f"wrote {args.results / 'privacy_utility.md'} and privacy_utility.png ({len(rows)} runs)")


if __name__ == "__main__":
    main()
