"""Plots and a report for a finished run, built only from the files in its output folder.

``write_report(run_dir)`` reads ``history.csv``, ``summary.json`` and (when present)
``label_histograms.csv`` and writes, into the same folder:

* ``accuracy_loss.png``   test accuracy and test loss per evaluated round, train loss per round;
* ``privacy_budget.png``  epsilon spent per round against ``config["dp_epsilon"]`` (only when
                          history.csv holds epsilon values);
* ``client_data.png``     samples per client stacked by class (only with label_histograms.csv);
* ``participation.png``   rounds each client was selected for, took part in and dropped out of
                          (only with participation.csv, which the REST server writes);
* ``client_accuracy.png`` the distribution of per-client accuracy (only with client_accuracy.csv, whose
                          ``measure`` column says what was measured: the REST server writes the training
                          accuracy each client reported, when clients report it);
* a "Personalization per client" table (only with personalization.csv, which simulations with a held-out
                          split write): mean, median and worst-10 % of the federated, fine-tuned and local-only
                          accuracies over clients, and of the per-client gains;
* ``report.md`` and ``report.html``  configuration, results, the per-round table (cells exactly as
                          in history.csv) and a privacy statement that claims only what the files say;
* ``compliance.json``     the run's compliance record (fl_server/compliance.py), rendered as the report's
                          "Compliance record" section; the REST server adds its deployment facts.

The HTML page is self-contained (inline CSS, images by relative file name, no scripts) and every
value in it is HTML-escaped; the markdown escapes the same way, since markdown viewers render HTML.
A plot that fails is logged and left out; the report is still written.

``start_report(run_dir, parallel=True)`` reads the inputs and starts drawing the plots in forked processes
(:mod:`fl_server.forked_plots`) so the caller can go on; ``PendingReport.finish()`` waits for them and writes
the rest. The files are the same as ``write_report``'s, which draws in process.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_server import report_template as T
from fl_server.compliance import COMPLIANCE_JSON, DeploymentFacts, section_rows, write_compliance
from fl_server.forked_plots import ForkedPlots, PlotJob, PlotOutcome, WarmRenderer, start_forked_plots
from fl_server.privacy.statement import statement_lines
from fl_server.store.run_dir import atomic_write_bytes

log = logging.getLogger("fl_server.reports")

ACCURACY_LOSS_PNG = "accuracy_loss.png"
PRIVACY_BUDGET_PNG = "privacy_budget.png"
CLIENT_DATA_PNG = "client_data.png"
PARTICIPATION_PNG = "participation.png"
CLIENT_ACCURACY_PNG = "client_accuracy.png"
PARTICIPATION_CSV = "participation.csv"
CLIENT_ACCURACY_CSV = "client_accuracy.csv"
PARTICIPATION_COLUMNS = ("client", "selected", "participated", "dropped")
CLIENT_ACCURACY_COLUMNS = ("client", "accuracy", "measure")
LOCAL_ONLY_DATA_SENTENCE = ("This was the local-only baseline: every client trained alone on its own data, and nothing "
                            "(neither data nor model updates) was exchanged.")
#: per-client federated / fine-tuned / local-only accuracies (fl_server/simulation/personalization.py)
PERSONALIZATION_CSV = "personalization.csv"
_PERSONALIZATION_MODELS = (("federated_accuracy", "federated (final global model)"),
                           ("finetuned_accuracy", "fine-tuned (global model + local epochs)"),
                           ("local_only_accuracy", "local-only (client's own data only)"),
                           ("local_only_test_accuracy", "local-only, on the global test set"),
                           ("gain_finetuned_vs_federated", "gain: fine-tuned - federated"),
                           ("gain_federated_vs_local_only", "gain: federated - local-only"),
                           ("gain_finetuned_vs_local_only", "gain: fine-tuned - local-only"))
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
#: the per-client participation table is printed in full up to this many clients (the plot always shows all)
MAX_CLIENT_ROWS = 100


# ----------------------------------------------------------------------------------------- reading
def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [dict(r) for r in reader]
        return list(reader.fieldnames or []), rows


def _num(v: str | None) -> float | None:
    """A CSV cell as a float; None for an empty (or unparsable) cell."""
    if v is None or str(v).strip() == "":
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _series(rows: list[dict[str, str]], column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = _num(r.get("round")), _num(r.get(column))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


# ------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())  # same atomic write (and owner-only mode) as the run's other files


def _plot_accuracy_loss(rows: list[dict[str, str]], path: Path) -> None:
    fig = _figure(10, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    xs, ys = _series(rows, "test_accuracy")
    if xs:
        ax_acc.plot(xs, ys, marker="o", color="tab:blue", label="test accuracy")
        ax_acc.legend(loc="best")
    else:
        ax_acc.text(0.5, 0.5, "no evaluated round", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set(title="Test accuracy per evaluated round", xlabel="round", ylabel="accuracy")
    ax_acc.grid(alpha=0.3)
    plotted = False
    for column, label, style in (("test_loss", "test loss", {"marker": "o", "color": "tab:red"}),
                                 ("train_loss", "train loss", {"marker": ".", "color": "tab:gray"})):
        xs, ys = _series(rows, column)
        if xs:
            ax_loss.plot(xs, ys, label=label, **style)
            plotted = True
    if plotted:
        ax_loss.legend(loc="best")
    else:
        ax_loss.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set(title="Loss per round", xlabel="round", ylabel="loss")
    ax_loss.grid(alpha=0.3)
    for ax in (ax_acc, ax_loss):
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path)


def _plot_privacy(rows: list[dict[str, str]], budget: float | None, path: Path) -> None:
    fig = _figure(7, 4)
    ax = fig.subplots()
    xs, ys = _series(rows, "epsilon")
    ax.plot(xs, ys, marker="o", color="tab:purple", label="epsilon spent")
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget (dp_epsilon = {budget:g})")
    ax.set(title="Privacy budget spent per round", xlabel="round", ylabel="epsilon")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)


#: above this many clients the per-client bar plots draw each series as one stepped area instead of one
#: bar per client (thousands of bars are sub-pixel anyway, and each is an artist matplotlib lays out)
MAX_BARS = 200


def _stacked_bars(ax: Any, series: Sequence[tuple[str, Any, Sequence[float]]]) -> None:
    """Stacked per-client bars, one artist per series (label, color, heights), not one per bar.

    ``ax.bar`` makes a Rectangle per client and class: 1,000 artists for 100 clients of Fashion-MNIST,
    1.5 s of the report on their own. A PolyCollection (or, past MAX_BARS, a stepped area) draws the
    same picture with one artist per class."""
    import numpy as np
    from matplotlib.collections import PolyCollection

    n = len(series[0][2]) if series else 0
    x = np.arange(n, dtype=np.float64)
    bottom = np.zeros(n)
    for label, color, heights in series:
        h = np.asarray(heights, dtype=np.float64)
        if n > MAX_BARS:
            ax.fill_between(x, bottom, bottom + h, step="mid", color=color, label=label, linewidth=0)
        else:
            left, right, top = x - 0.4, x + 0.4, bottom + h
            verts = np.stack([np.stack(p, axis=1) for p in ((left, bottom), (left, top), (right, top), (right, bottom))], axis=1)
            ax.add_collection(PolyCollection(list(verts), facecolors=[color], edgecolors="none", label=label))
        bottom = bottom + h
    ax.set_xlim(-0.6, max(n, 1) - 0.4)
    ax.set_ylim(0, max(1.0, float(bottom.max()) if n else 1.0) * 1.05)


#: at most this many client labels on a per-client axis (every client still gets a tick): each label
#: is laid out and rendered, and 100 rotated labels were half of a 100-client report's plotting time
MAX_CLIENT_LABELS = 25


def _client_ticks(ax: Any, clients: list[str], rotate_above: int, fontsize: int) -> None:
    """Up to MAX_CLIENT_ROWS clients, a labelled tick at every k-th client (at most MAX_CLIENT_LABELS);
    beyond, matplotlib's own integer ticks."""
    if len(clients) > MAX_CLIENT_ROWS:
        ax.xaxis.get_major_locator().set_params(integer=True)
        return
    step = max(1, math.ceil(len(clients) / MAX_CLIENT_LABELS))
    ax.set_xticks(list(range(0, len(clients), step)))
    ax.set_xticklabels(clients[::step], rotation=90 if len(clients[::step]) > rotate_above else 0, fontsize=fontsize)


def _plot_client_data(header: list[str], rows: list[dict[str, str]], path: Path) -> None:
    classes = [c for c in header if c.startswith("class_")]
    clients = [r.get("client", str(i)) for i, r in enumerate(rows)]
    fig = _figure(max(6.0, min(20.0, 0.35 * len(rows) + 3)), 4.5)
    ax = fig.subplots()
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    _stacked_bars(ax, [(c.removeprefix("class_"), cmap(k % cmap.N), [_num(r.get(c)) or 0.0 for r in rows])
                       for k, c in enumerate(classes)])
    _client_ticks(ax, clients, rotate_above=20, fontsize=8 if len(rows) > 20 else 10)
    ax.set(title="Training samples per client, by class", xlabel="client", ylabel="samples")
    if classes:
        ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    _save(fig, path)


def _plot_participation(rows: list[dict[str, str]], path: Path) -> None:
    """Per client: rounds it took part in and rounds it was selected for but dropped out of, stacked."""
    clients = [r.get("client", str(i)) for i, r in enumerate(rows)]
    took = [_num(r.get("participated")) or 0.0 for r in rows]
    dropped = [_num(r.get("dropped")) or 0.0 for r in rows]
    fig = _figure(max(6.0, min(20.0, 0.35 * len(rows) + 3)), 4.5)
    ax = fig.subplots()
    _stacked_bars(ax, [("took part (update aggregated)", "tab:green", took), ("selected, dropped out", "tab:red", dropped)])
    _client_ticks(ax, clients, rotate_above=8, fontsize=7 if len(rows) > 20 else 9)
    ax.set(title="Participation per client", xlabel="client", ylabel="rounds")
    ax.set_ylim(0, 1.3 * max([t + d for t, d in zip(took, dropped, strict=False)] + [1.0]))  # room for the legend above the bars
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def _plot_client_accuracy(values: list[float], measure: str, path: Path) -> None:
    fig = _figure(7, 4)
    ax = fig.subplots()
    lo, hi = min(values), max(values)
    bins = max(5, min(30, len(values)))
    ax.hist(values, bins=bins, range=(min(lo, 0.0), max(hi, 1.0)), color="tab:blue", edgecolor="white")
    ax.axvline(sum(values) / len(values), color="tab:red", linestyle="--", label=f"mean {sum(values) / len(values):.4f}")
    ax.set(title=f"Per-client accuracy ({len(values)} clients)", ylabel="clients",
           xlabel=measure if len(measure) <= 60 else "accuracy (what was measured: see the report)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def write_client_tables(run_dir: Path, participation: Iterable[dict[str, Any]] | None = None,
                        accuracy: Iterable[dict[str, Any]] | None = None) -> None:
    """Write ``participation.csv`` (client, selected, participated, dropped) and/or ``client_accuracy.csv``
    (client, accuracy, measure) into ``run_dir``: the per-client inputs of the report, for any driver."""
    for name, columns, rows in ((PARTICIPATION_CSV, PARTICIPATION_COLUMNS, participation),
                                (CLIENT_ACCURACY_CSV, CLIENT_ACCURACY_COLUMNS, accuracy)):
        if rows is None:
            continue
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
        atomic_write_bytes(Path(run_dir) / name, buf.getvalue().encode("utf-8"))


# ------------------------------------------------------------------------------------- formatting
def _fmt(v: Any) -> str:
    """A value as text, without rounding: JSON's spelling for everything but strings."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v, default=str)


def _md(text: str) -> str:
    """Escaped for a markdown table cell or paragraph (markdown viewers render raw HTML)."""
    return html.escape(text, quote=True).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _h(text: str) -> str:
    return html.escape(text, quote=True)


class _Doc:
    """A tiny document model rendered both to markdown and to HTML, so both say the same."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Iterable[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = False) -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows], numeric))

    def image(self, file: str, alt: str) -> None:
        self.blocks.append(("img", file, alt))

    def markdown(self, title: str, sources: str) -> str:
        out = [f"# {_md(title)}", "", f"_Generated from the files in this folder: {_md(sources)}._", ""]
        for b in self.blocks:
            kind = b[0]
            if kind == "h2":
                out += [f"## {_md(b[1])}", ""]
            elif kind == "p":
                out += [_md(b[1]), ""]
            elif kind == "ul":
                out += [f"- {_md(item)}" for item in b[1]] + [""]
            elif kind == "table":
                header, rows, numeric = b[1], b[2], b[3]
                out.append("| " + " | ".join(_md(h) for h in header) + " |")
                align = "---:" if numeric else "---"
                out.append("|" + "|".join(align for _ in header) + "|")
                out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                out += [f"![{_md(b[2])}]({b[1]})", ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def html(self, title: str, sources: str) -> str:
        body: list[str] = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h2":
                body.append(f"<h2>{_h(b[1])}</h2>")
            elif kind == "p":
                body.append(f"<p>{_h(b[1])}</p>")
            elif kind == "ul":
                body.append("<ul>\n" + "\n".join(f"<li>{_h(i)}</li>" for i in b[1]) + "\n</ul>")
            elif kind == "table":
                header, rows, numeric = b[1], b[2], b[3]
                cls = ' class="num"' if numeric else ""
                lines = ["<table>", "<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in header) + "</tr></thead>",
                         "<tbody>"]
                lines += ["<tr>" + "".join(f"<td{cls}>{_h(c)}</td>" for c in r) + "</tr>" for r in rows]
                lines += ["</tbody>", "</table>"]
                body.append("\n".join(lines))
            elif kind == "img":
                body.append(f'<p><img src="{_h(b[1])}" alt="{_h(b[2])}"></p>')
        return T.HTML_PAGE.format(title=_h(title), css=T.CSS, sources=_h(sources), body="\n".join(body))


# ---------------------------------------------------------------------------------------- sections
def _results_rows(summary: dict[str, Any], history_rows: int) -> list[list[str]]:
    def get(key: str) -> str:
        return _fmt(summary[key]) if key in summary else T.NOT_RECORDED

    best = get("best_accuracy")
    if summary.get("best_round") is not None:
        best += f" (round {_fmt(summary['best_round'])})"
    total_bytes = get("total_bytes")
    if isinstance(summary.get("total_bytes"), (int, float)) and not isinstance(summary.get("total_bytes"), bool):
        total_bytes += f" ({summary['total_bytes'] / 2**20:.2f} MiB)"
    rows = [
        ["mode", get("mode")],
        ["rounds completed", get("rounds_completed")],
        ["rows in history.csv", str(history_rows)],
        ["final test accuracy", get("final_accuracy")],
        ["best test accuracy", best],
    ]
    if "final_loss" in summary:
        rows.append(["final test loss", get("final_loss")])
    rows += [
        ["wall time (seconds)", get("wall_seconds")],
        ["total bytes", total_bytes],
        ["codec", get("codec")],
    ]
    if "stop_reason" in summary:
        rows.append(["stop reason", get("stop_reason")])
    return rows


#: files a simulation writes that a deployed server would never hold (the simulator has every client's data)
SIMULATOR_ONLY_FILES = {
    "label_histograms.csv": "the exact label counts of each client",
    CLIENT_ACCURACY_CSV: "the accuracy of each client, measured by the simulator on the data of that client",
    PERSONALIZATION_CSV: "per-client accuracies of the federated, fine-tuned and local-only models on the data of each client",
}


def _simulator_files_sentence(present: Sequence[str]) -> str:
    what = "; ".join(f"{name} ({SIMULATOR_ONLY_FILES[name]})" for name in present)
    return (f"This run was simulated: the simulator held the data of every client and wrote files that a deployed server "
            f"never receives: {what}. They are not covered by differential privacy or secure aggregation; the "
            f"statements above are about what the simulated protocol exchanged. Keep this run folder as protected as "
            f"the dataset itself.")


def _privacy_section(doc: _Doc, summary: dict[str, Any], config: dict[str, Any],
                     simulator_files: Sequence[str] = ()) -> None:
    privacy = summary.get("privacy")
    mode = summary.get("mode")
    dp_on = isinstance(privacy, dict) and privacy.get("differential_privacy") is True
    statements: list[str] = []
    if dp_on:
        what = "Differential privacy was on"
        details = [f"{privacy['mode']}-level" if "mode" in privacy else None,
                   f"accountant: {_fmt(privacy['accountant'])}" if "accountant" in privacy else None]
        details = [d for d in details if d]
        statements.append(what + (f" ({', '.join(details)})." if details else "."))
        per_client = privacy.get("noise_calibration") == "per_client" and privacy.get("noise_multiplier_by_size")
        mech = [f"{k.replace('_', ' ')} {_fmt(privacy[k])}" for k in ("noise", "clip_norm", "noise_multiplier")
                if k in privacy and not (per_client and k == "noise_multiplier")]
        if per_client:
            sigmas = [float(sigma) for _, sigma in privacy["noise_multiplier_by_size"]]
            mech.append(f"noise multiplier calibrated per client for its own sampling rate and steps, "
                        f"{_fmt(min(sigmas))} to {_fmt(max(sigmas))}")
        if mech:
            statements.append("Mechanism: " + ", ".join(mech) + ".")
        if "epsilon_spent" in privacy and "delta" in privacy:
            spent = f"Privacy spent: (epsilon, delta) = ({_fmt(privacy['epsilon_spent'])}, {_fmt(privacy['delta'])})"
            if "epsilon_budget" in privacy:
                spent += f" of an epsilon budget of {_fmt(privacy['epsilon_budget'])}"
            statements.append(spent + ".")
        else:
            statements.append("summary.json does not record both epsilon spent and delta: no (epsilon, delta) value is stated.")
        hist_eps = config.get("label_histogram_epsilon")
        statements.extend(line for line in statement_lines(privacy, float(hist_eps) if _num(str(hist_eps)) is not None else None)
                          if not line.startswith("Noise multiplier per client"))  # the mechanism line above says it
    elif config.get("differential_privacy") is True:
        statements.append(T.DP_UNRECORDED_SENTENCE)  # configured on but not accounted: claim nothing either way
    else:
        statements.append(T.NO_DP_SENTENCE)

    if mode == "local_only":
        sa = "not applicable (local-only baseline: there is no aggregation)"
    elif mode == "centralized":
        sa = ("not applicable (centralized baseline: there is no aggregation; configured value "
              f"secure_aggregation = {_fmt(config['secure_aggregation'])})" if "secure_aggregation" in config
              else "not applicable (centralized baseline: there is no aggregation)")
    elif "secure_aggregation" in config:
        sa = "on" if config["secure_aggregation"] is True else "off" if config["secure_aggregation"] is False \
            else _fmt(config["secure_aggregation"])
    else:
        sa = "not recorded in the configuration"
    statements.append(f"Secure aggregation: {sa}.")
    statements.append(f"Encryption: {_encryption(summary, mode)}.")
    if mode == "centralized":
        statements.append(T.CENTRALIZED_DATA_SENTENCE)
    elif mode == "local_only":
        statements.append(LOCAL_ONLY_DATA_SENTENCE)
    elif mode == "rest":
        sent = summary.get("client_metrics_sent")
        names = ", ".join(str(n) for n in sent) if isinstance(sent, list) and sent else None
        statements.append(T.REST_DATA_SENTENCE.format(metrics=f" ({names})" if names else ""))
    elif mode is None:
        statements.append(T.UNKNOWN_MODE_SENTENCE)
    else:
        statements.append(T.FEDERATED_DATA_SENTENCE)
    if simulator_files and mode in ("federated", "local_only"):
        statements.append(_simulator_files_sentence(simulator_files))

    doc.heading("Privacy statement")
    doc.bullets(statements)
    if dp_on:
        doc.para("The privacy block of summary.json, as recorded:")
        doc.table(["key", "value"], [[str(k), _fmt(v)] for k, v in privacy.items()])


def _encryption(summary: dict[str, Any], mode: Any) -> str:
    if "encryption" not in summary:
        return "not recorded in summary.json"
    value = summary["encryption"]
    if value is True:
        return T.REST_ENCRYPTION_ON if mode == "rest" else "on"
    if value is False:
        return T.ENCRYPTION_OFF
    return _fmt(value)


def _participation_section(doc: _Doc, rows: list[dict[str, str]], made: list[tuple[str, str]]) -> None:
    doc.heading("Participation per client")
    for name, alt in made:
        if name == PARTICIPATION_PNG:
            doc.image(name, alt)
    took = [_num(r.get("participated")) or 0.0 for r in rows]
    dropped = [_num(r.get("dropped")) or 0.0 for r in rows]
    ordered = sorted(took)
    median = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    doc.para(f"{len(rows)} clients; rounds taken part in per client: min {min(took):g}, median {median:g}, "
             f"max {max(took):g}; {sum(dropped):g} selections ended without an update from the selected client (from participation.csv).")
    if len(rows) <= MAX_CLIENT_ROWS:
        header = list(PARTICIPATION_COLUMNS)
        doc.table(header, [[r.get(c) or T.EMPTY_CELL for c in header] for r in rows], numeric=True)


def _client_accuracy_section(doc: _Doc, rows: list[dict[str, str]], made: list[tuple[str, str]]) -> None:
    values = [v for v in (_num(r.get("accuracy")) for r in rows) if v is not None]
    measures = sorted({r.get("measure") or "" for r in rows} - {""})
    doc.heading("Per-client accuracy")
    if not values:
        doc.para("client_accuracy.csv holds no accuracy values: no client reported one (under differential privacy, "
                 "training statistics stay on the clients).")
        return
    for name, alt in made:
        if name == CLIENT_ACCURACY_PNG:
            doc.image(name, alt)
    ordered = sorted(values)
    doc.para(f"{len(values)} of {len(rows)} clients; accuracy min {ordered[0]:.4f}, median {ordered[len(ordered) // 2]:.4f}, "
             f"max {ordered[-1]:.4f}, mean {sum(values) / len(values):.4f} (from client_accuracy.csv).")
    if measures:
        doc.para("Measured: " + "; ".join(measures) + ".")


def _personalization_section(doc: _Doc, rows: list[dict[str, str]]) -> None:
    """Per-model statistics over clients from personalization.csv (mean, median, mean of the worst 10 %)."""
    doc.heading("Personalization per client")
    table = []
    for column, label in _PERSONALIZATION_MODELS:
        values = sorted(v for v in (_num(r.get(column)) for r in rows) if v is not None)
        if not values:
            continue
        k = max(1, math.ceil(0.1 * len(values)))
        mid = len(values) // 2
        median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        table.append([label, str(len(values)), f"{sum(values) / len(values):.4f}", f"{median:.4f}",
                      f"{sum(values[:k]) / k:.4f}", f"{values[0]:.4f}", f"{values[-1]:.4f}"])
    if not table:
        doc.para("personalization.csv holds no accuracy values.")
        return
    doc.table(["model", "clients", "mean", "median", "worst 10 % (mean)", "min", "max"], table, numeric=True)
    measures = sorted({r.get("measure") or "" for r in rows} - {""})
    if measures:
        doc.para("Measured: " + "; ".join(measures) + " (from personalization.csv, one row per client).")


# -------------------------------------------------------------------------------------------- entry
def _compliance_section(doc: _Doc, record: dict[str, Any]) -> None:
    doc.heading("Compliance record")
    doc.para(f"The facts of {COMPLIANCE_JSON} (written beside this report): what left the clients, the protections in "
             "force, who took part, where state is kept and for how long, the audit log's digest and the data-subject "
             "requests handled. They are recorded by the software; they are not legal advice.")
    for title, rows in section_rows(record):
        if title == "Who took part" and len(rows) > MAX_CLIENT_ROWS + 8:
            rows = [*rows[:MAX_CLIENT_ROWS + 8], ("...", f"{len(rows) - MAX_CLIENT_ROWS - 8} more rows in {COMPLIANCE_JSON}")]
        doc.para(title)
        doc.table(["item", "record"], [[k, v] for k, v in rows])


@dataclass
class _Inputs:
    """What a report is built from: the run folder's files, read once."""

    run_dir: Path
    sources: list[str]
    summary: dict[str, Any]
    config: dict[str, Any]
    hist_header: list[str]
    hist_rows: list[dict[str, str]]
    labels_rows: list[dict[str, str]]
    part_rows: list[dict[str, str]]
    acc_rows: list[dict[str, str]]
    personal_rows: list[dict[str, str]]
    plots: list[tuple[str, str, PlotJob]]  # (file name, alt text, how to draw it) in the report's order


def _read_inputs(run_dir: Path) -> _Inputs:
    sources: list[str] = []
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        sources.append("summary.json")
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}

    hist_header: list[str] = []
    hist_rows: list[dict[str, str]] = []
    if (run_dir / "history.csv").is_file():
        hist_header, hist_rows = _read_csv(run_dir / "history.csv")
        sources.append("history.csv")

    labels_header: list[str] = []
    labels_rows: list[dict[str, str]] = []
    if (run_dir / "label_histograms.csv").is_file():
        labels_header, labels_rows = _read_csv(run_dir / "label_histograms.csv")
        sources.append("label_histograms.csv")

    part_rows: list[dict[str, str]] = []
    if (run_dir / PARTICIPATION_CSV).is_file():
        part_rows = _read_csv(run_dir / PARTICIPATION_CSV)[1]
        sources.append(PARTICIPATION_CSV)
    acc_rows: list[dict[str, str]] = []
    if (run_dir / CLIENT_ACCURACY_CSV).is_file():
        acc_rows = _read_csv(run_dir / CLIENT_ACCURACY_CSV)[1]
        sources.append(CLIENT_ACCURACY_CSV)
    acc_values = [v for v in (_num(r.get("accuracy")) for r in acc_rows) if v is not None]
    personal_rows: list[dict[str, str]] = []
    if (run_dir / PERSONALIZATION_CSV).is_file():
        personal_rows = _read_csv(run_dir / PERSONALIZATION_CSV)[1]
        sources.append(PERSONALIZATION_CSV)
    acc_measure = next((r.get("measure") for r in acc_rows if r.get("measure")), None) or "accuracy"

    has_epsilon = any(_num(r.get("epsilon")) is not None for r in hist_rows)
    budget = _num(str(config.get("dp_epsilon"))) if config.get("dp_epsilon") is not None else None
    if budget is None and isinstance(summary.get("privacy"), dict):
        budget = _num(str(summary["privacy"].get("epsilon_budget")))

    plots: list[tuple[str, str, Callable[[Path], None]]] = [
        (ACCURACY_LOSS_PNG, "Test accuracy and loss per round", lambda p: _plot_accuracy_loss(hist_rows, p)),
    ]
    if has_epsilon:
        plots.append((PRIVACY_BUDGET_PNG, "Epsilon spent per round against the budget",
                      lambda p: _plot_privacy(hist_rows, budget, p)))
    if labels_rows:
        plots.append((CLIENT_DATA_PNG, "Training samples per client, stacked by class",
                      lambda p: _plot_client_data(labels_header, labels_rows, p)))
    if part_rows:
        plots.append((PARTICIPATION_PNG, "Rounds each client took part in and dropped out of",
                      lambda p: _plot_participation(part_rows, p)))
    if acc_values:
        plots.append((CLIENT_ACCURACY_PNG, "Distribution of per-client accuracy",
                      lambda p: _plot_client_accuracy(acc_values, acc_measure, p)))
    return _Inputs(run_dir=run_dir, sources=sources, summary=summary, config=config, hist_header=hist_header,
                   hist_rows=hist_rows, labels_rows=labels_rows, part_rows=part_rows, acc_rows=acc_rows,
                   personal_rows=personal_rows, plots=[(name, alt, PlotJob(name, draw)) for name, alt, draw in plots])


def _draw_in_process(jobs: Sequence[PlotJob], run_dir: Path) -> list[PlotOutcome]:
    outcomes = []
    for job in jobs:
        try:
            job.draw(run_dir / job.name)
        except Exception as exc:
            outcomes.append(PlotOutcome(job.name, f"{type(exc).__name__}: {exc}"))
        else:
            outcomes.append(PlotOutcome(job.name, None))
    return outcomes


class PendingReport:
    """A report whose plots may still be drawing in child processes (:func:`start_report`).

    :meth:`finish` waits for the plots and writes ``compliance.json``, ``report.md`` and ``report.html``;
    only then is the report complete. Files the caller writes into the run folder between
    :func:`start_report` and :meth:`finish` (the model, say) are seen by the report's text."""

    def __init__(self, run_dir: Path, deployment: DeploymentFacts | None, parallel: bool,
                 warm: WarmRenderer | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._deployment = deployment
        self._error: Exception | None = None
        self._inputs: _Inputs | None = None
        self._forked: ForkedPlots | None = None
        self._written: dict[str, Path] | None = None
        try:
            self._inputs = _read_inputs(self.run_dir)
            jobs = [job for _, _, job in self._inputs.plots]
            if warm is not None and len(jobs) >= 2:
                self._forked = warm.draw(jobs)
            if self._forked is None and parallel:
                self._forked = start_forked_plots(jobs, self.run_dir)
        except Exception as exc:  # raised by finish(), where write_report raised it before
            self._error = exc
        finally:
            if warm is not None:
                warm.cancel()  # (nothing when it was told to draw)

    def finish(self) -> dict[str, Path]:
        """Wait for the plots, write the report; return name -> path of each file written (as write_report)."""
        if self._written is not None:
            return self._written
        run_dir = self.run_dir
        written: dict[str, Path] = {}
        compliance: dict[str, Any] | None = None
        try:
            compliance = write_compliance(run_dir, self._deployment)
            written[COMPLIANCE_JSON] = run_dir / COMPLIANCE_JSON
        except Exception as exc:  # the report must still be written; the log says why the record is missing
            log.warning("could not write %s in %s: %s: %s", COMPLIANCE_JSON, run_dir, type(exc).__name__, exc)
        if self._error is not None:
            raise self._error
        assert self._inputs is not None
        inputs = self._inputs
        jobs = [job for _, _, job in inputs.plots]
        outcomes = self._forked.wait() if self._forked is not None else _draw_in_process(jobs, run_dir)
        failed = {o.name: o.error for o in outcomes if o.error is not None}
        made: list[tuple[str, str]] = []
        for name, alt, _ in inputs.plots:
            if name in failed:
                log.warning("could not draw %s in %s: %s", name, run_dir, failed[name])
                continue
            written[name] = run_dir / name
            made.append((name, alt))
        written.update(_write_documents(inputs, compliance, made))
        self._written = written
        return written


def start_report(run_dir: Path, deployment: DeploymentFacts | None = None, *, parallel: bool = False,
                 warm: WarmRenderer | None = None) -> PendingReport:
    """Read the run folder and start the report; :meth:`PendingReport.finish` completes it.

    ``parallel``: draw the plots in forked child processes (fl_server/forked_plots.py) while the caller
    goes on (a simulation writes its model and stops its workers meanwhile); where this platform cannot
    fork, or for a single plot, they are drawn in process by finish(). ``warm``: a renderer started earlier
    (:func:`plot_jobs` of the same run folder), used instead of a fresh fork (and let go if not needed). The
    files are the same either way."""
    return PendingReport(run_dir, deployment, parallel, warm)


def plot_jobs(run_dir: Path) -> list[PlotJob]:
    """The report's plots for the run folder as it is now (what a warm renderer draws from)."""
    return [job for _, _, job in _read_inputs(Path(run_dir)).plots]


def write_report(run_dir: Path, deployment: DeploymentFacts | None = None) -> dict[str, Path]:
    """Write the plots, ``compliance.json`` and ``report.md``/``report.html`` into ``run_dir``; return name -> path
    of each file written. ``deployment``: what a REST server adds to the compliance record (None: a simulation)."""
    return start_report(run_dir, deployment).finish()


def _write_documents(inputs: _Inputs, compliance: dict[str, Any] | None, made: list[tuple[str, str]]) -> dict[str, Path]:
    """``report.md`` and ``report.html`` from the inputs and the plots that were drawn."""
    run_dir, summary, config = inputs.run_dir, inputs.summary, inputs.config
    hist_header, hist_rows, labels_rows = inputs.hist_header, inputs.hist_rows, inputs.labels_rows
    part_rows, acc_rows, personal_rows, sources = inputs.part_rows, inputs.acc_rows, inputs.personal_rows, inputs.sources
    written: dict[str, Path] = {}
    doc = _Doc()
    doc.heading("Results")
    doc.table(["quantity", "value"], _results_rows(summary, len(hist_rows)))
    for name, alt in made:
        if name == ACCURACY_LOSS_PNG:
            doc.image(name, alt)

    _privacy_section(doc, summary, config, [name for name in SIMULATOR_ONLY_FILES if (run_dir / name).is_file()])
    for name, alt in made:
        if name == PRIVACY_BUDGET_PNG:
            doc.image(name, alt)

    doc.heading("Per-round history")
    if hist_rows:
        doc.para(f"Every row of history.csv, cells exactly as written there; {T.EMPTY_CELL} marks an empty cell "
                 "(round not evaluated, or no differential privacy).")
        doc.table(hist_header, [[r.get(c) or T.EMPTY_CELL for c in hist_header] for r in hist_rows], numeric=True)
    else:
        doc.para("history.csv is missing or has no rows.")

    if labels_rows:
        doc.heading("Client data")
        for name, alt in made:
            if name == CLIENT_DATA_PNG:
                doc.image(name, alt)
        totals = [_num(r.get("total")) for r in labels_rows]
        known = [t for t in totals if t is not None]
        if known:
            doc.para(f"{len(labels_rows)} clients; samples per client: min {min(known):g}, max {max(known):g}, "
                     f"total {sum(known):g} (from label_histograms.csv).")

    if part_rows:
        _participation_section(doc, part_rows, made)
    if CLIENT_ACCURACY_CSV in sources:  # also when empty: the report then says that no client reported one
        _client_accuracy_section(doc, acc_rows, made)
    if PERSONALIZATION_CSV in sources:
        _personalization_section(doc, personal_rows)

    if compliance is not None:
        _compliance_section(doc, compliance)

    doc.heading("Configuration")
    if config:
        doc.table(["key", "value"], [[str(k), _fmt(v)] for k, v in config.items()])
    else:
        doc.para("summary.json records no configuration.")

    title = f"Run report: {run_dir.name}"
    src = ", ".join(sources) if sources else "none found"
    for name, text in ((REPORT_MD, doc.markdown(title, src)), (REPORT_HTML, doc.html(title, src))):
        atomic_write_bytes(run_dir / name, text.encode("utf-8"))
        written[name] = run_dir / name
    return written


def write_report_logged(run_dir: Path, deployment: DeploymentFacts | None = None) -> dict[str, Path]:
    """``write_report`` for the end of a run: logs where the report is; on any failure logs a warning
    and returns ``{}`` so the run's saved results are never lost to reporting."""
    return finish_report_logged(start_report(run_dir, deployment))


def finish_report_logged(report: PendingReport) -> dict[str, Path]:
    """``report.finish()`` for the end of a run: logs where the report is; on any failure logs a warning
    and returns ``{}`` so the run's saved results are never lost to reporting."""
    run_dir = report.run_dir
    try:
        files = report.finish()
    except Exception as exc:
        log.warning("could not write the report in %s: %s: %s", run_dir, type(exc).__name__, exc)
        return {}
    log.info("report: %s (plots: %s)", files.get(REPORT_HTML),
             ", ".join(n for n in files if n.endswith(".png")) or "none")
    return files


__all__ = [
    "ACCURACY_LOSS_PNG",
    "CLIENT_ACCURACY_CSV",
    "CLIENT_ACCURACY_PNG",
    "CLIENT_DATA_PNG",
    "PARTICIPATION_CSV",
    "PARTICIPATION_PNG",
    "PERSONALIZATION_CSV",
    "PRIVACY_BUDGET_PNG",
    "PendingReport",
    "REPORT_HTML",
    "REPORT_MD",
    "finish_report_logged",
    "start_report",
    "write_client_tables",
    "write_report",
    "write_report_logged",
]
