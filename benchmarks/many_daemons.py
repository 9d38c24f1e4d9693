"""Issue 12: the demo's time to first round, and plain REST rounds with 50 daemons, through the demo's own launcher.

Every run is ``fl_server.rest.demo.run_demo`` (what ``python -m fl_server demo`` runs: gunicorn over HTTPS on
loopback, the daemons as ``python -m fl_client``), with its daemons started either way it can:

- ``fork``: forked from one pre-imported ``python -m fl_client.forkserver`` (started together with the server);
- ``spawn``: one ``python -m fl_client`` process each (what the demo did before).

Runs (``--only`` picks some, in the order given; ``--repeat`` runs the list again, so fork/spawn alternate; each
run writes ``benchmarks/results/fast_rounds/startup/<run>-<n>.json`` and is skipped when that file exists, so an
interrupted invocation resumes; ``--force`` runs again):

- ``demo10_fork`` / ``demo10_spawn``: the private demo exactly (``demo_config(10)``: DP-SGD epsilon 1, secure
  aggregation, cnn), 2 rounds: server up -> round 1 open (the issue's "time to first round") and closed;
- ``plain50_mlp_fork``: 50 daemons, plain rounds (no DP, no masking: ``demo --no-privacy``), the lighter mlp
  (hidden 64, 200 samples per client), 4 rounds: round wall time, slowest client's training (the seconds each
  update reports), overhead = (wall - slowest training) / wall, medians over rounds 2-4; ``plain50_mlp_spawn``
  is the same with one process per daemon;
- ``plain50_cnn_fork``: 50 forked daemons, plain rounds, the cnn on the 60,000 training images split 50 ways (1,200
  records each, one epoch), 3 rounds: the overhead of a round whose training is real work; also the server's
  timeline marks (fl_server/rest/round_timeline.py: last download served, last upload accepted, close steps);
- ``startup``: no server; fresh-process CPU seconds of what a daemon does before it can register: importing the
  client, and its shard built the old way (whole split in float32) and the new way (mapped from the cache).

Also sampled every 2 s: the proportional set size (PSS) of every process of the run (server, fork server,
daemons), summed; the peak is reported.

    flock /work/notes/bench.lock python benchmarks/many_daemons.py --only demo10_fork demo10_spawn --repeat 2
    flock /work/notes/bench.lock python benchmarks/many_daemons.py --only plain50_mlp_fork
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fast_rounds" / "startup"

RUNS: dict[str, dict[str, Any]] = {
    "demo10_fork": {"clients": 10, "launch": "fork", "private": True, "rounds": 2, "set": []},
    "demo10_spawn": {"clients": 10, "launch": "spawn", "private": True, "rounds": 2, "set": []},
    "plain50_mlp_fork": {"clients": 50, "launch": "fork", "private": False, "rounds": 4,
                         "set": ["model_type=mlp", "hidden_size=64", "samples_per_client=200", "evaluation_frequency=4"]},
    "plain50_mlp_spawn": {"clients": 50, "launch": "spawn", "private": False, "rounds": 4,
                          "set": ["model_type=mlp", "hidden_size=64", "samples_per_client=200", "evaluation_frequency=4"]},
    # local training that is real work: the demo's cnn on the 60,000 training images split 50 ways (1,200 each),
    # one epoch, so the overhead is measured against a round of realistic length, not 0.05 s of mlp training
    "plain50_cnn_fork": {"clients": 50, "launch": "fork", "private": False, "rounds": 3,
                         "set": ["model_type=cnn", "samples_per_client=1200", "local_epochs=1", "evaluation_frequency=3"]},
}

#: the server's marks of a plain round (fl_server/rest/round_timeline.py), in order, and the next round's opening
SERVER_MARKS = ("downloads_last", "uploads_last", "aggregated", "evaluated", "checkpointed", "closed", "reopen")


def _server_timeline(db: sqlite3.Connection, attempts: set[int]) -> dict[str, float] | None:
    """Median seconds after each steady attempt's opening of the server's marks (SERVER_MARKS): when the last
    download was served and the last upload accepted, each step of the close, and the next attempt's opening."""
    rows = db.execute("SELECT round_id, started_at, timeline FROM rounds ORDER BY round_id").fetchall()
    opens = sorted(r[1] for r in rows)
    per: dict[str, list[float]] = {}
    for rid, started, raw in rows:
        if rid not in attempts or raw is None:
            continue
        tl = json.loads(raw)
        later = [t for t in opens if t > started]
        marks = {"downloads_last": tl["downloads"]["last"], "uploads_last": tl["uploads"]["last"],
                 **{k: tl.get(k) for k in ("aggregated", "evaluated", "checkpointed", "closed")},
                 "reopen": (later[0] - started) if later else None}
        for k, v in marks.items():
            if v is not None:
                per.setdefault(k, []).append(float(v))
    return {k: round(statistics.median(per[k]), 3) for k in SERVER_MARKS if k in per} or None


# ------------------------------------------------------------------ memory of the run's process tree
def _tree(root: int) -> list[int]:
    """Every descendant of ``root`` (from /proc: the fork server's daemons are grandchildren)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak of the summed PSS of this process's descendants (the run's server, fork server and daemons)."""

    def __init__(self, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.every, self.peak_mib, self.peak_processes = every, 0.0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            pids = _tree(os.getpid())
            total = sum(_pss_kib(p) for p in pids) / 1024
            if total > self.peak_mib:
                self.peak_mib, self.peak_processes = total, len(pids)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ------------------------------------------------------------------ one federation through run_demo
class _ServerUp(logging.Handler):
    """The moment run_demo says the server is healthy (its log line 'server up at ...')."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and record.getMessage().startswith("server up at"):
            self.at = record.created


def _client_starts(logs: Path) -> dict[str, float]:
    """Each daemon's first log line (its process is running the client) and the moment it registered."""
    out: dict[str, float] = {}
    for path in logs.glob("demo-client-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if " registered as " in line:
                stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float("0." + line[20:23])
                out[path.stem] = stamp
                break
    return out


def federation_run(name: str) -> dict[str, Any]:
    from fl_server.rest.demo import demo_config, run_demo
    from fl_server.rest.gateway import check_rest_config

    run = RUNS[name]
    cfg = demo_config(run["clients"], rounds=run["rounds"], overrides=run["set"], private=run["private"])
    check_rest_config(cfg)
    up = _ServerUp()
    demo_log = logging.getLogger("fl_server.rest.demo")
    demo_log.addHandler(up)
    demo_log.setLevel(logging.INFO)
    memory = MemorySampler()
    with tempfile.TemporaryDirectory(prefix=f"many_daemons_{name}_") as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        memory.start()
        try:
            status = run_demo(cfg, out, run["clients"], progress=False, launch=run["launch"])
        finally:
            memory.stop()
            demo_log.removeHandler(up)
        wall = time.perf_counter() - t0
        db = sqlite3.connect(out / "server" / "server.db")
        rows = db.execute("SELECT round_id, round, state, started_at, closed_at FROM rounds ORDER BY round_id").fetchall()
        per_round = []
        for round_id, number, state, started, closed in rows:
            if state != "closed" or closed is None:
                continue
            seconds = [float(json.loads(m[0])["seconds"]) for m in
                       db.execute("SELECT metrics FROM updates WHERE round_id=?", (round_id,)).fetchall()
                       if "seconds" in json.loads(m[0])]
            wall_s = closed - started
            per_round.append({"round": number, "attempt": round_id, "wall_s": round(wall_s, 3),
                              "slowest_training_s": round(max(seconds), 3) if seconds else None,
                              "overhead_fraction": round((wall_s - max(seconds)) / wall_s, 4) if seconds else None,
                              "updates": len(seconds)})
        timeline = _server_timeline(db, {r["attempt"] for r in per_round if r["round"] > 1})
        db.close()
        registered = sorted(_client_starts(out / "logs").values())
    assert up.at is not None, "run_demo never said the server was up"
    first = next((r for r in rows if r[1] == 1), None)
    first_closed = next((r for r in rows if r[1] == 1 and r[2] == "closed"), None)
    steady = [r for r in per_round if r["round"] > 1] or per_round

    def med(key: str) -> float | None:
        vals = [r[key] for r in steady if r[key] is not None]
        return round(statistics.median(vals), 4) if vals else None

    return {"run": name, "clients": run["clients"], "launch": run["launch"], "private": run["private"],
            "model": cfg.model_type, "samples_per_client": cfg.samples_per_client, "overrides": run["set"],
            "rounds_planned": run["rounds"], "rounds_completed": status.get("completed_rounds"),
            "server_up_to_first_registered_s": round(registered[0] - up.at, 3) if registered else None,
            "server_up_to_last_registered_s": round(registered[-1] - up.at, 3) if registered else None,
            "server_up_to_first_round_open_s": round(first[3] - up.at, 3) if first else None,
            "server_up_to_first_round_closed_s": round(first_closed[4] - up.at, 3) if first_closed else None,
            "median_round_s": med("wall_s"), "median_slowest_training_s": med("slowest_training_s"),
            "median_overhead_fraction": med("overhead_fraction"), "server_timeline_median_s": timeline,
            "rows": per_round,
            "peak_pss_mib": round(memory.peak_mib, 1), "peak_pss_processes": memory.peak_processes,
            "accuracy": status.get("accuracy"), "total_wall_s": round(wall, 1), "cores": os.cpu_count(),
            "load_average_after": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------ start-up costs, fresh processes
STARTUP_SNIPPETS = {
    "import fl_client.daemon": "import fl_client.daemon",
    "shard, whole split (before)": (
        "from fl_common.data import load_dataset, client_partition\n"
        "from fl_common.data.assignment import training_subset\n"
        "t = training_subset(load_dataset('fashion_mnist', 'train', seed=7), 7, None)\n"
        "t.subset(client_partition(t.y.numpy(), 10, 3, 'iid', seed=7, samples_per_client=600))"),
    "shard, mapped from the cache (now)": (
        "from fl_common.data.assignment import client_shard\n"
        "from fl_common.protocol.rest import DataAssignment\n"
        "client_shard(DataAssignment('fashion_mnist', 3, 10, 'iid', 0.5, 7, 600, 2, None))"),
}
#: what every snippet imports first, measured on its own and subtracted
STARTUP_BASE = "import torch, numpy, fl_common.data, fl_common.data.assignment, fl_common.protocol.rest"


def _cpu_seconds(code: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def startup_run(repeats: int = 3) -> dict[str, Any]:
    from fl_common.data.datasets import warm_decoded_cache

    warm_decoded_cache("fashion_mnist", "train")
    out: dict[str, Any] = {"run": "startup", "repeats": repeats, "cpu_s": {}}
    base = [_cpu_seconds(STARTUP_BASE) for _ in range(repeats)]
    out["cpu_s"]["python + the imports every snippet shares"] = round(statistics.median(base), 3)
    for label, code in STARTUP_SNIPPETS.items():
        runs = [_cpu_seconds(code if label.startswith("import") else f"{STARTUP_BASE}\n{code}") for _ in range(repeats)]
        extra = 0.0 if label.startswith("import") else statistics.median(base)
        out["cpu_s"][label] = round(statistics.median(runs) - extra, 3)
    out.update({"cores": os.cpu_count(), "load_average_after": os.getloadavg(),
                "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=[*RUNS, "startup"], required=True)
    ap.add_argument("--repeat", type=int, default=1, help="run the list this many times (fork/spawn alternate)")
    ap.add_argument("--force", action="store_true", help="run again even when the run's JSON exists")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for n in range(1, args.repeat + 1):
        for name in args.only:
            dest = RESULTS / f"{name}-{n}.json"
            if dest.is_file() and not args.force:
                print(f"{name} #{n}: kept ({dest})", flush=True)
                continue
            print(f"{name} #{n}: running", flush=True)
            result = startup_run() if name == "startup" else federation_run(name)
            dest.write_text(json.dumps(result, indent=1))
            print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)


if __name__ == "__main__":
    main()
