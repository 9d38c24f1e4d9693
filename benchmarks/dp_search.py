"""A short, resumable hyper-parameter search for sample-level DP-SGD at a fixed epsilon.

A search file (``benchmarks/grids/privacy_search_*.yaml``) names a base config, settings common to
every run, and either a ``grid`` (key -> list of values, expanded as a cartesian product: lr, clip
norm, batch, model...) or explicit ``experiments`` (name + settings), or both. Every run is a real
simulation through the project's Python API (``fl_server.simulation.Simulation``: the same
coordinator, privacy engine, accountant and trainer as ``python -m fl_server simulate``), one at a
time, in this process, on one thread.

Resumable: a run's checkpoints live in ``benchmarks/work/privacy_search/<search>/<run>/``
(git-ignored); a finished run writes ``summary.json`` and ``history.csv`` to
``benchmarks/results/privacy_search/<search>/<run>/`` and is skipped next time; an interrupted one
continues from its last checkpoint. After every run the table of all runs of the search is
rewritten (``results.md`` and ``results.csv`` beside the run folders), so whatever finished before
a session ended is on disk to commit.

Why the calibration cache: under per-client calibration (the default) the privacy engine calibrates
sigma for each distinct shard size by bisection over the accountant (100 sizes x ~1-3 s on this
machine: more than a 20-round run of a small model takes to train). sigma depends only on
(epsilon, delta, q, steps, accountant), not on the learning rate, the clip norm or the model, so the
search memoises ``calibrate_noise_multiplier`` (a pure function) in
``benchmarks/work/privacy_search/calibration_cache.json``: the values are identical, only computed
once per setting. (A persistent cache in the engine itself would give every run this speed.)

    OMP_NUM_THREADS=1 nice python benchmarks/dp_search.py benchmarks/grids/privacy_search_eps1.yaml [--list] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "privacy_search"
RESULTS = ROOT / "benchmarks" / "results" / "privacy_search"

#: Short names for the keys a run name is built from (grid expansion).
ABBREVIATIONS = {"model_type": "", "hidden_size": "h", "learning_rate": "lr", "clip_grad_norm": "C", "batch_size": "B",
                 "momentum": "m", "dp_epsilon": "eps", "lr_schedule": "", "local_epochs": "E", "differential_privacy": "dp",
                 "aggregation_method": "", "server_momentum": "sm", "server_learning_rate": "slr",
                 "server_model_ema": "ema", "dp_client_rounds": "R"}
TABLE_KEYS = ("model_type", "hidden_size", "learning_rate", "clip_grad_norm", "batch_size", "momentum", "lr_schedule",
              "local_epochs", "num_rounds", "aggregation_method", "server_momentum")


#: Marks a common setting an experiment removes (``unset: [key, ...]`` in the search file).
UNSET = object()


def run_name(settings: dict[str, Any]) -> str:
    parts = []
    for key, value in settings.items():
        short = ABBREVIATIONS.get(key, key)
        text = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{short}{text}")
    return "_".join(parts)


def load_search(path: Path) -> tuple[str, str, dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """(search name, base config path, common settings, [(run name, its settings)])."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "config" not in data:
        raise SystemExit(f"{path}: a search file needs 'config' (the base config file) and 'grid' and/or 'experiments'")
    name = data.get("name") or path.stem
    common = dict(data.get("common") or {})
    runs: list[tuple[str, dict[str, Any]]] = []
    grid = data.get("grid") or {}
    if grid:
        keys = list(grid)
        for values in itertools.product(*(grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys)):
            settings = dict(zip(keys, values, strict=False))
            runs.append((run_name(settings), settings))
    for exp in data.get("experiments") or []:
        if "set" not in exp:
            raise SystemExit(f"{path}: every experiment needs 'set' (its settings)")
        settings = dict(exp["set"])
        for key in exp.get("unset") or []:  # a common key this run must not have (a non-private twin: no dp_* keys)
            settings[key] = UNSET
        runs.append((exp.get("name") or run_name({k: v for k, v in settings.items() if v is not UNSET}), settings))
    names = [n for n, _ in runs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"{path}: run names repeat: {', '.join(sorted(dupes))}")
    if not runs:
        raise SystemExit(f"{path}: no runs (give 'grid' or 'experiments')")
    return name, str(data["config"]), common, runs


def cached_calibration(cache_path: Path) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Wraps a pure calibration function with a JSON file cache keyed on its arguments."""
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def wrap(fn: Callable[..., float]) -> Callable[..., float]:
        def cached(*args: Any, **kwargs: Any) -> float:
            key = json.dumps([fn.__name__, [repr(a) for a in args], sorted((k, repr(v)) for k, v in kwargs.items())])
            if key not in cache:
                cache[key] = fn(*args, **kwargs)
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache_path.write_text(json.dumps(cache, indent=0))
            return cache[key]

        return cached

    return wrap


def install_calibration_cache() -> None:
    """Memoise the engine's sigma calibration (see the module docstring: same values, computed once)."""
    import fl_server.privacy.client_level as client_level
    import fl_server.privacy.sample_level as sample_level

    cached = cached_calibration(WORK / "calibration_cache.json")(sample_level.calibrate_noise_multiplier)
    for module in (sample_level, client_level):  # those that import the function by name
        if hasattr(module, "calibrate_noise_multiplier"):
            setattr(module, "calibrate_noise_multiplier", cached)  # noqa: B010 (client_level may not have it)


class ScatteringCache:
    """Memoises the scattering transform per image (``scatter_linear`` / ``scatter_cnn``): same values, computed once.

    Why: the transform is fixed (no parameters, nothing learned), so an image's features never change, but the
    models recompute them at every visit: ~0.2-0.4 s per 128 images on one thread here, more than the rest of a
    DP step of the linear head, and ~3 minutes for one pass over Fashion-MNIST's 70,000 images. Keyed on the
    image's bytes and the transform's settings; ~16 KB per 28x28 image (about 1.1 GB for all of Fashion-MNIST),
    kept on disk in ``benchmarks/work/privacy_search/scattering_cache.pt`` between runs. Only this benchmark
    process does it; the model itself stays a plain function of its input."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache: dict[bytes, torch.Tensor] = {}
        self.saved = 0
        if path.is_file():
            data = torch.load(path, weights_only=True)
            keys = data["keys"].numpy().tobytes()
            width = int(data["key_bytes"])
            for i, value in enumerate(data["values"]):
                self.cache[keys[i * width:(i + 1) * width]] = value
            self.saved = len(self.cache)

    def install(self) -> None:
        import hashlib

        from fl_common.models.scattering import Scattering2D

        original = Scattering2D.forward
        cache = self.cache

        def forward(module: Scattering2D, x: torch.Tensor) -> torch.Tensor:
            if x.requires_grad or x.device.type != "cpu" or x.dim() != 4 or x.dtype != torch.float32:
                return original(module, x)
            tag = repr((module.scales, module.angles, module.shape, tuple(x.shape[1:]))).encode()
            rows = x.detach().contiguous().reshape(x.shape[0], -1).numpy()
            keys = [hashlib.blake2b(row.tobytes(), digest_size=20, key=tag[:64]).digest() for row in rows]
            missing = [i for i, k in enumerate(keys) if k not in cache]
            if missing:
                fresh = original(module, x[missing])
                for j, i in enumerate(missing):
                    cache[keys[i]] = fresh[j].clone()
            return torch.stack([cache[k] for k in keys])

        Scattering2D.forward = forward  # type: ignore[method-assign,assignment]

    def save(self) -> None:
        """Write the cache if it grew (one shape of features per file: the searches use one dataset)."""
        if len(self.cache) == self.saved:
            return
        shapes = {tuple(v.shape) for v in self.cache.values()}
        if len(shapes) != 1:
            return
        keys = list(self.cache)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"key_bytes": len(keys[0]), "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8),
                    "values": torch.stack([self.cache[k] for k in keys])}, tmp)
        tmp.replace(self.path)
        self.saved = len(keys)


class SideEvaluation:
    """Benchmark-only: on every evaluation round, also the raw global model's accuracy and that of extra
    moving averages of it (``--side-ema``), written to ``side_eval.csv`` beside the run's history.

    Why: whether the server's model average (``server_model_ema``) helps, and at which decay, would take
    one 100-round run per decay (40 minutes each on this shared machine); the averages are post-processing
    of the global models the run produces anyway, so one run measures them all, with the run's own
    evaluator on the same test set. The extra averages are not checkpointed: a resumed run restarts them
    (its rows say so in ``since_round``)."""

    def __init__(self, sim: Any, decays: list[float], path: Path) -> None:
        from fl_server.strategies.model_ema import ServerModelEMA

        self.coord = sim.coordinator
        self.path = path
        self.averages = {d: ServerModelEMA(d) for d in decays}
        self.since = self.coord.completed_rounds + 1

    def install(self) -> None:
        coord, original = self.coord, self.coord.close_round

        def close_round() -> Any:
            record = original()
            for average in self.averages.values():
                average.update(coord.global_vector)
            if record.test_accuracy is not None and coord.evaluator is not None:
                self.write(record.round, record.test_accuracy)
            return record

        setattr(coord, "close_round", close_round)  # noqa: B010 (an instance's method, this process only)

    def write(self, round_number: int, released: float) -> None:
        evaluate = self.coord.evaluator
        row: dict[str, Any] = {"round": round_number, "since_round": self.since, "released": released,
                               "raw": evaluate(self.coord.global_vector).accuracy}
        for decay, average in self.averages.items():
            row[f"ema{decay:g}"] = evaluate(average.value()).accuracy
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


def is_finished(result_dir: Path) -> bool:
    return (result_dir / "summary.json").is_file() and (result_dir / "history.csv").is_file()


def run_one(base_config: Path, settings: dict[str, Any], work: Path, result_dir: Path, side_ema: list[float] | None = None) -> None:
    from fl_common.config import load_config
    from fl_server.simulation import Simulation

    cfg = load_config(base_config, settings)
    resume = (work / "checkpoint.pt").is_file()
    sim = Simulation(cfg, output_dir=work, resume=resume, progress=False)
    if side_ema is not None:
        SideEvaluation(sim, side_ema, work / "side_eval.csv").install()
    try:
        sim.train()
        sim.save_results()
    finally:
        sim.close()
    result_dir.mkdir(parents=True, exist_ok=True)
    for f in ("history.csv", "summary.json", "config.yaml", "side_eval.csv"):
        if (work / f).is_file():
            shutil.copy2(work / f, result_dir / f)


def collect(search: str, runs: list[tuple[str, dict[str, Any]]], common: dict[str, Any], results: Path) -> list[dict[str, Any]]:
    """One row per finished run; writes results.md and results.csv (sorted by final accuracy within an epsilon)."""
    rows = []
    for name, _ in runs:
        d = results / name
        if not is_finished(d):
            continue
        summary = json.loads((d / "summary.json").read_text())
        cfg = summary["config"]
        with open(d / "history.csv") as f:
            hist = list(csv.DictReader(f))
        evaluated = [float(r["test_accuracy"]) for r in hist if r["test_accuracy"]]
        privacy = summary.get("privacy") or {}
        dp = bool(privacy.get("differential_privacy"))
        rows.append({
            "run": name, **{k: cfg.get(k) for k in TABLE_KEYS},
            "parameters": summary.get("model_parameters"),
            "dp": dp, "epsilon_target": cfg.get("dp_epsilon") if dp else None,
            "epsilon_spent": round(privacy["epsilon_spent"], 4) if dp else None,
            "sigma_min": (min(s for _, s in privacy["noise_multiplier_by_size"]) if privacy.get("noise_multiplier_by_size")
                          else privacy.get("noise_multiplier")) if dp else None,  # client level: one sigma
            "sigma_max": privacy.get("noise_multiplier") if dp else None,
            "rounds": int(summary.get("rounds_completed") or 0),
            "final_accuracy": round(evaluated[-1], 4) if evaluated else None,
            "best_accuracy": round(max(evaluated), 4) if evaluated else None,
            "final_test_loss": float(hist[-1]["test_loss"]) if hist and hist[-1].get("test_loss") else None,
            "hours": round(float(summary.get("wall_seconds") or 0.0) / 3600, 3),
            "stop_reason": summary.get("stop_reason") or "",
        })
    rows.sort(key=lambda r: (r["epsilon_target"] is None, r["epsilon_target"] or 0, -(r["final_accuracy"] or 0)))
    results.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["run"]
    with open(results / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    common_text = ", ".join(f"{k}={v}" for k, v in common.items())
    lines = [f"# privacy search: {search}", "", f"Common settings: {common_text or '(base config only)'}.", "",
             "| run | model | hidden | params | lr | C | B | momentum | schedule | server | epsilon (target / spent) | sigma range "
             "| rounds | final acc | best acc | final test loss | hours |", "|" + "---|" * 17]
    for r in rows:
        pct = lambda v: "" if v is None else f"{100 * v:.2f} %"
        eps = "non-private" if not r["dp"] else f"{r['epsilon_target']:g} / {r['epsilon_spent']:.3f}"
        sig = "" if r["sigma_max"] is None else f"{r['sigma_min']:.2f}-{r['sigma_max']:.2f}"
        hidden = r["hidden_size"] if r["model_type"] not in ("cnn", "resnet", "scatter_linear") else ""
        loss = "" if r["final_test_loss"] is None else f"{r['final_test_loss']:.3f}"
        server = r["aggregation_method"] + (f" (momentum {r['server_momentum']:g})" if r["aggregation_method"] == "fedavgm" else "")
        lines.append(f"| {r['run']} | {r['model_type']} | {hidden} | {r['parameters']:,} | {r['learning_rate']:g} | "
                     f"{r['clip_grad_norm'] if r['dp'] else '-'} | {r['batch_size']} | {r['momentum']:g} | {r['lr_schedule']} | "
                     f"{server} | {eps} | {sig} | "
                     f"{r['rounds']} | {pct(r['final_accuracy'])} | {pct(r['best_accuracy'])} | {loss} | {r['hours']:.2f} |"
                     + (f" stopped: {r['stop_reason']}" if r["stop_reason"] else ""))
    lines += ["", (f"_Written by benchmarks/dp_search.py at {time.strftime('%Y-%m-%d %H:%M:%S')}; one run at a time, "
                  f"one thread, on a 2-core machine shared with other jobs (hours are wall time, read them as rough)._")]
    (results / "results.md").write_text("\n".join(lines) + "\n")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("search", type=Path)
    ap.add_argument("--only", nargs="*", help="run only these runs, in this order")
    ap.add_argument("--list", action="store_true", help="show each run's status and exit")
    ap.add_argument("--collect", action="store_true", help="only rewrite the table from the finished runs")
    ap.add_argument("--side-ema", nargs="*", type=float, metavar="DECAY",
                    help="also evaluate the raw global model and these moving averages of it (side_eval.csv)")
    args = ap.parse_args()
    search, base, common, runs = load_search(args.search)
    base_config = ROOT / base
    results = RESULTS / search
    if args.list:
        for name, settings in runs:
            status = "done" if is_finished(results / name) else "partial" if (WORK / search / name / "checkpoint.pt").is_file() else "todo"
            print(f"{name}: {status}  {({k: v for k, v in settings.items() if v is not UNSET})}")
        return
    if not args.collect:
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        install_calibration_cache()
        scattering = ScatteringCache(WORK / "scattering_cache.pt")
        scattering.install()
        by_name = dict(runs)
        order = args.only or [n for n, _ in runs]
        unknown = [n for n in order if n not in by_name]
        if unknown:
            raise SystemExit(f"error: {args.search} has no run named {', '.join(unknown)}")
        for name in order:
            if is_finished(results / name):
                continue
            merged = {**common, "workers": 0, "threads_per_worker": 1, **by_name[name]}
            settings = {k: v for k, v in merged.items() if v is not UNSET}
            t0 = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {settings}", flush=True)
            try:
                run_one(base_config, settings, WORK / search / name, results / name, args.side_ema)
            finally:
                scattering.save()
            rows = collect(search, runs, common, results)
            done = next(r for r in rows if r["run"] == name)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: final {done['final_accuracy']}, best {done['best_accuracy']}, "
                  f"epsilon {done['epsilon_spent']}, {time.time() - t0:.0f} s", flush=True)
    collect(search, runs, common, results)


if __name__ == "__main__":
    main()
