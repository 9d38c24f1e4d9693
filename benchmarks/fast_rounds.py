"""Issue 12, measured side by side in one invocation: push (long-polls) against polling, plain and secure rounds.

Every run is the real stack on loopback: ``python -m fl_server serve`` (gunicorn) and N client daemon processes
(this script's ``--daemon`` mode: ``fl_client.daemon.ClientDaemon`` with ``long_poll`` on or off, since the
client CLI has no switch for it). Afterwards the server's SQLite store gives each closed round's open and close
times and every client's training seconds, and the daemons' logs give the moment each one started training.

Runs (``--only`` picks some; each writes ``benchmarks/results/fast_rounds/<run>.json`` and is skipped when that
file exists, so an interrupted invocation resumes; ``--force`` runs again):

- ``plain10_poll`` / ``plain10_push``: 10 clients, cnn, plain rounds, polling every 0.2 s vs long-polls;
  ``plain10_push_f16``: ``plain10_push`` with float16 model downloads (``download_codec``; the default is float32);
- ``secure10_poll`` / ``secure10_push``: the same with secure aggregation on;
- ``daemons50_poll`` / ``daemons50_push``: 50 daemons, the lighter model (mlp, hidden 64, 200 samples each);
- ``dropout10_push``: secure rounds, 10 clients, 20 % of each attempt's selected daemons killed by SIGKILL at a
  random phase (restarted once the attempt ends), over_selection 0.25 over a quorum of 8, client_liveness 10 s;
  ``dropout10_none`` is the same configuration without kills;
- ``demo10``: the private demo's configuration (DP-SGD + secure aggregation, cnn) with 10 daemons, 2 rounds: the
  time from the server being up to round 1 opening and closing.

Plain runs also report the round's timeline (median seconds per span, ``plain_timeline_median_s``): the server's
marks stored with each attempt (fl_server/rest/round_timeline.py) joined with the daemons' log lines (selected,
training start and end, update accepted). Then ``README.md`` there is rebuilt from every JSON present.

    python benchmarks/fast_rounds.py                    # all runs (about an hour on 2 shared cores)
    python benchmarks/fast_rounds.py --only plain10_push plain10_poll --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fast_rounds"
TRAIN_LINE = re.compile(r"^(\d+\.\d+) .*round (\d+): training \d+ epoch")
#: the daemon's own measure of its local training (secure rounds do not send it to the server)
TRAINED_LINE = re.compile(r"^(\d+\.\d+) .*round (\d+): local training took (\d+\.\d+) s")
#: the daemon heard it is selected
SELECTED_LINE = re.compile(r"^(\d+\.\d+) .*round (\d+): selected; fetching the model")
#: the server answered 202 to the daemon's upload
ACCEPTED_LINE = re.compile(r"^(\d+\.\d+) .*round (\d+): update accepted")

RUNS: dict[str, dict[str, Any]] = {
    "smoke": {"clients": 3, "push": True, "cfg": {"model_type": "mlp", "hidden_size": 32, "samples_per_client": 100,
                                                  "secure_aggregation": True}},
    "plain10_poll": {"clients": 10, "push": False, "cfg": {}},
    "plain10_push": {"clients": 10, "push": True, "cfg": {}},
    # the same with the model going down as float16 (config download_codec; the default is float32)
    "plain10_push_f16": {"clients": 10, "push": True, "cfg": {"download_codec": "float16"}},
    "secure10_push": {"clients": 10, "push": True, "cfg": {"secure_aggregation": True}},
    "secure10_poll": {"clients": 10, "push": False, "cfg": {"secure_aggregation": True}},
    # client_liveness 10 s: a daemon killed in any phase (training included: fl_client/heartbeat.py) is dropped
    # about 10 s after its last request instead of at the phase's or the round's deadline
    "dropout10_none": {"clients": 10, "push": True,
                       "cfg": {"secure_aggregation": True, "client_selection_ratio": 0.8, "over_selection": 0.25,
                               "secagg_phase_timeout": 20.0, "round_timeout": 120.0, "client_liveness": 10.0}},
    "dropout10_push": {"clients": 10, "push": True, "kill_fraction": 0.2,
                       "cfg": {"secure_aggregation": True, "client_selection_ratio": 0.8, "over_selection": 0.25,
                               "secagg_phase_timeout": 20.0, "round_timeout": 120.0, "client_liveness": 10.0}},
    # the private demo's own configuration (fl_server/rest/demo.py demo_config: DP-SGD, secure aggregation, cnn),
    # 10 daemons, 2 rounds: what it measures is the time from the server being up to round 1
    "demo10": {"clients": 10, "push": True, "demo": True, "rounds": 2, "cfg": {}},
    "daemons50_push": {"clients": 50, "push": True, "cfg": {"model_type": "mlp", "hidden_size": 64,
                                                            "samples_per_client": 200}},
    "daemons50_poll": {"clients": 50, "push": False, "cfg": {"model_type": "mlp", "hidden_size": 64,
                                                             "samples_per_client": 200}},
}


# ------------------------------------------------------------------ the daemon side (a child process)
def daemon_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-url", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--poll", action="store_true", help="poll every poll_interval (no long-polls)")
    args = ap.parse_args(argv)
    import logging

    from fl_client.daemon import ClientDaemon, DaemonOptions
    from fl_common.logs import configure_logging
    from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN

    configure_logging("INFO", "text", text_format="%(created).3f %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    daemon = ClientDaemon(DaemonOptions(server_url=args.server_url, state_dir=args.state_dir,
                                        enrollment_token=os.environ[ENV_ENROLLMENT_TOKEN], client_name=args.name,
                                        threads=1, progress=False, long_poll=not args.poll))
    daemon.install_signal_handlers()
    return daemon.run()


# ------------------------------------------------------------------ notification latency, no training
def notify_run(name: str, clients: int, rounds: int, push: bool) -> dict[str, Any]:
    """``clients`` scripted clients (threads of this process, the real ServerApi: signing, encryption) against the real
    gunicorn server; each uploads a zero update the moment it learns it is selected, so rounds follow each other
    as fast as the protocol allows. Measured: round open (server clock) -> each client's receipt of 'selected'."""
    import threading

    import torch

    from fl_client.api import ServerApi
    from fl_common.config import config_from_dict, dump_config
    from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
    from fl_common.tensors import wire
    from fl_server.rest.secrets import ENV_SERVER_SECRET

    cfg = config_from_dict({**_config({"clients": clients, "cfg": {"model_type": "mlp", "hidden_size": 16,
                                                                   "samples_per_client": 50}}, rounds),
                            "evaluation_frequency": 1000, "round_start_wait": 600.0})
    env = {**os.environ, "PYTHONPATH": str(ROOT), ENV_ENROLLMENT_TOKEN: secrets.token_urlsafe(24),
           ENV_ADMIN_TOKEN: secrets.token_urlsafe(24), ENV_SERVER_SECRET: secrets.token_urlsafe(32)}
    received: list[tuple[int, float]] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix=f"fast_rounds_{name}_") as tmp:
        out = Path(tmp)
        dump_config(cfg, out / "config.yaml")
        stack = Stack(out, clients, push, env)
        stack.start_server(out / "config.yaml")
        stop = threading.Event()

        def client(i: int) -> None:
            api = ServerApi(stack.url, timeout=60, max_retries=3)
            api.register(env[ENV_ENROLLMENT_TOKEN], client_name=f"n{i:03d}", partition=None, num_samples=None,
                         capability={})
            model, _ = api.download_model(None, True)
            assert model is not None
            numel = wire.unpack(model, 2**30, max_numel=2**30)[0].numel  # the server's model, whatever its layers
            zero = wire.encode_update(torch.zeros(numel), "none", "zstd", meta={"num_samples": 1,
                                                                                 "metrics": {"seconds": 0.0}})
            etag: str | None = None
            done: set[int] = set()
            while not stop.is_set():
                status, etag = api.poll_round(etag, 20.0 if push else 0.0)
                if status["state"] == "finished":
                    return
                if status["state"] == "selected" and int(status["round"]) not in done:
                    r = int(status["round"])
                    with lock:
                        received.append((r, time.time()))
                    done.add(r)
                    api.upload_update(r, zero, f"{r}-{i}", True)
                    continue
                if not push:
                    time.sleep(0.2 * (0.75 + 0.5 * random.random()))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        try:
            for t in threads:
                t.start()
            deadline = time.time() + 120.0 * rounds + 300.0
            while time.time() < deadline and stack.status()["state"] != "finished":
                time.sleep(0.5)
        finally:
            stop.set()
            stack.stop()
        db = sqlite3.connect(out / "server" / "server.db")
        opened = {r: s for r, s, st in db.execute("SELECT round, started_at, state FROM rounds").fetchall() if st == "closed"}
        rows = db.execute("SELECT round, started_at, closed_at FROM rounds WHERE state='closed' ORDER BY round").fetchall()
    lat: dict[int, list[float]] = {}
    for r, at in received:
        if r in opened:
            lat.setdefault(r, []).append(at - opened[r])
    steady = [r for r in sorted(lat) if r > 1] or sorted(lat)
    last = [max(lat[r]) for r in steady]
    allv = sorted(v for r in steady for v in lat[r])
    return {"run": name, "clients": clients, "push": push, "model": "mlp (hidden 16), no training: scripted clients",
            "rounds_planned": rounds, "rounds_completed": len(rows),
            "open_to_selected_median_s": round(statistics.median(allv), 4) if allv else None,
            "open_to_last_selected_median_s": round(statistics.median(last), 4) if last else None,
            "open_to_last_selected_max_s": round(max(last), 4) if last else None,
            "median_round_s": round(statistics.median(c - s for _, s, c in rows[1:] or rows), 4) if rows else None,
            "total_wall_s": round(time.perf_counter() - t0, 1), "cores": os.cpu_count(),
            "load_average_after": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------ the orchestrator
@dataclass
class Stack:
    out: Path
    clients: int
    push: bool
    env: dict[str, str]
    url: str = ""
    server: subprocess.Popen | None = None
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    server_up_at: float = 0.0
    #: /status requests that timed out (the server was busy past 30 s)
    slow_status: int = 0

    def start_server(self, cfg_path: Path) -> None:
        from fl_server.rest.demo import free_port, wait_healthy

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.out / "server.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.server = subprocess.Popen([sys.executable, "-m", "fl_server", "serve", "--config", str(cfg_path),
                                            "--state-dir", str(self.out / "server"), "--port", str(port)], env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.server, timeout=300)
        self.server_up_at = time.time()

    def start_daemon(self, name: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--daemon", "--server-url", self.url, "--name", name,
               "--state-dir", str(self.out / "clients" / name)]
        with open(self.out / f"{name}.log", "ab") as log:
            self.daemons[name] = subprocess.Popen(cmd + ([] if self.push else ["--poll"]), env=self.env, stdout=log,
                                                  stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        """/status, asked again while the server is too busy to answer (e.g. unmasking under the lock)."""
        for _ in range(20):
            try:
                return requests.get(f"{self.url}/status", timeout=30).json()
            except requests.RequestException as exc:
                self.slow_status += 1
                print(f"/status did not answer ({type(exc).__name__}); asking again", flush=True)
        raise RuntimeError("/status did not answer 20 times in a row")

    def stop(self) -> None:
        for proc in [*self.daemons.values(), self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.daemons.values(), self.server]:
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _config(run: dict[str, Any], rounds: int) -> dict[str, Any]:
    from fl_server.rest.demo import DEMO_DEFAULTS

    # the demo is private by default (DP-SGD and secure aggregation): these runs compare plain and secure rounds
    # without DP, so both are switched off here and a run's own cfg switches secure aggregation on
    return {**DEMO_DEFAULTS, "num_clients": run["clients"], "num_rounds": rounds, "evaluation_frequency": rounds,
            "poll_interval": 0.2, "client_liveness": 60.0, "differential_privacy": False, "secure_aggregation": False,
            **run["cfg"]}


def _names_by_id(stack: Stack) -> dict[str, str]:
    from fl_common.protocol.rest import ENV_ADMIN_TOKEN, PATH_CLIENTS

    rows = requests.get(f"{stack.url}{PATH_CLIENTS}", headers={"Authorization": f"Bearer {stack.env[ENV_ADMIN_TOKEN]}"},
                        timeout=30).json()["clients"]
    return {r["client_id"]: r["name"] for r in rows}


def _killer(stack: Stack, fraction: float, rng: random.Random, deadline: float) -> dict[str, Any]:
    """Each new attempt: pick fraction x its selected daemons and a phase for each; SIGKILL each when its attempt reaches
    that phase; restart the killed daemons when the attempt ends. Returns what it did."""
    db_path = stack.out / "server" / "server.db"
    phases = ["advertise_keys", "share_keys", "masked_input", "unmask"]
    kills: list[dict[str, Any]] = []
    seen_attempts: set[int] = set()
    plan: dict[str, str] = {}
    attempt: int | None = None
    names: dict[str, str] = {}
    while time.time() < deadline:
        status = stack.status()
        if status["state"] == "finished":
            break
        cur = ((status.get("secagg") or {}).get("current") or {})
        now_attempt = cur.get("attempt")
        if now_attempt != attempt:  # the previous attempt ended: bring its killed daemons back
            for name in [n for n, p in stack.daemons.items() if p.poll() is not None]:
                stack.start_daemon(name)
            attempt, plan = now_attempt, {}
            if attempt is not None and attempt not in seen_attempts:
                seen_attempts.add(attempt)
                db = sqlite3.connect(db_path)
                row = db.execute("SELECT selected FROM rounds WHERE round_id=?", (attempt,)).fetchone()
                db.close()
                if row is not None:
                    if not names or any(c not in names for c in json.loads(row[0])):
                        names = _names_by_id(stack)
                    selected = [names[c] for c in json.loads(row[0]) if c in names]
                    victims = rng.sample(selected, max(1, round(fraction * len(selected))))
                    plan = {v: rng.choice(phases) for v in victims}
        phase = cur.get("phase")
        for name, at in list(plan.items()):
            if phase is not None and phases.index(at) <= (phases.index(phase) if phase in phases else 4):
                proc = stack.daemons.get(name)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills.append({"attempt": attempt, "daemon": name, "planned_phase": at, "phase": phase,
                                  "round": cur.get("round")})
                del plan[name]
        time.sleep(0.1)
    return {"kills": kills}


def _measure(stack: Stack, rounds_planned: int, extra: dict[str, Any]) -> dict[str, Any]:
    db = sqlite3.connect(stack.out / "server" / "server.db")
    rows = db.execute("SELECT round_id, round, state, selected, started_at, closed_at, reason FROM rounds ORDER BY round_id"
                      ).fetchall()
    starts: dict[int, list[float]] = {}
    trained: dict[int, list[float]] = {}  # round -> each daemon's training seconds, from its own log line
    #: round -> daemon -> event ("selected", "start", "end", "accepted") -> when (the daemons' clock, the server's)
    events: dict[int, dict[str, dict[str, float]]] = {}
    for log in stack.out.glob("*.log"):
        if log.name == "server.log":
            continue
        for line in log.read_text(errors="replace").splitlines():
            m = TRAIN_LINE.match(line)
            if m:
                starts.setdefault(int(m.group(2)), []).append(float(m.group(1)))
                events.setdefault(int(m.group(2)), {}).setdefault(log.stem, {})["start"] = float(m.group(1))
            t = TRAINED_LINE.match(line)
            if t:
                trained.setdefault(int(t.group(2)), []).append(float(t.group(3)))
                events.setdefault(int(t.group(2)), {}).setdefault(log.stem, {})["end"] = float(t.group(1))
            for kind, pattern in (("selected", SELECTED_LINE), ("accepted", ACCEPTED_LINE)):
                e = pattern.match(line)
                if e:
                    events.setdefault(int(e.group(2)), {}).setdefault(log.stem, {})[kind] = float(e.group(1))
    per_round = []
    for round_id, number, state, selected, started, closed, reason in rows:
        if state != "closed" or closed is None:
            continue
        ups = db.execute("SELECT metrics FROM updates WHERE round_id=?", (round_id,)).fetchall()
        # plain rounds: the seconds the updates report; masked ones report none, so the daemons' log lines (a
        # retried attempt of the same round adds lines: the round's lines are an upper bound then)
        train = [float(json.loads(m[0])["seconds"]) for m in ups if "seconds" in json.loads(m[0])] \
            or trained.get(number, [])
        wall = closed - started
        lat = sorted(t - started for t in starts.get(number, []) if t >= started - 1.0)
        per_round.append({"round": number, "attempt": round_id, "selected": len(json.loads(selected)), "updates": len(ups),
                          "wall_s": round(wall, 3), "slowest_training_s": round(max(train), 3) if train else None,
                          "overhead_fraction": round((wall - max(train)) / wall, 4) if train else None,
                          "open_to_first_training_s": round(lat[0], 3) if lat else None,
                          "open_to_last_training_s": round(lat[-1], 3) if lat else None, "reason": reason})
    aborted = [{"round": r[1], "attempt": r[0], "reason": r[6]} for r in rows if r[2] == "aborted"]
    steady = [r for r in per_round if r["round"] > 1] or per_round
    last_starts = [r["open_to_last_training_s"] for r in steady if r["open_to_last_training_s"] is not None]
    first = next((r for r in rows if r[1] == 1), None)
    first_closed = next((r for r in rows if r[1] == 1 and r[2] == "closed"), None)

    def med(key: str) -> float | None:
        vals = [r[key] for r in steady if r[key] is not None]
        return round(statistics.median(vals), 4) if vals else None

    timeline = _phase_timeline(db, {r["attempt"] for r in steady})
    return {
        "rounds_planned": rounds_planned, "rounds_completed": len(per_round), "aborted_attempts": aborted,
        "secure_phase_median_s": timeline,
        "plain_timeline_median_s": None if timeline is not None else _plain_timeline(db, steady, events),
        "median_round_s": med("wall_s"), "median_slowest_training_s": med("slowest_training_s"),
        "median_overhead_fraction": med("overhead_fraction"),
        "open_to_last_training_median_s": round(statistics.median(last_starts), 3) if last_starts else None,
        "open_to_last_training_max_s": round(max(last_starts), 3) if last_starts else None,
        "server_up_to_first_round_open_s": round(first[4] - stack.server_up_at, 3) if first else None,
        "server_up_to_first_round_closed_s": round(first_closed[5] - stack.server_up_at, 3) if first_closed else None,
        "rows": per_round, **extra,
    }


#: the secure round's phases in order, as the server's timeline names them (fl_server/rest/secure_driver.py)
SECURE_PHASES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")


def _phase_timeline(db: sqlite3.Connection, attempts: set[int]) -> dict[str, float] | None:
    """Median seconds per secure phase over the closed attempts ``attempts`` (round 1, the warm-up, left out by
    the caller), from the server's own timeline of each attempt (when it opened and when each phase closed, on the
    server clock): ``open`` is from the round row's opening to the protocol's start, ``apply`` from the unmasking's
    end to the round row's close (strategy step, model version, store). The masked-input phase holds the local
    training. None for plain runs."""
    row = db.execute("SELECT value FROM meta WHERE key='secagg_history'").fetchone()
    if row is None:
        return None
    opened = dict(db.execute("SELECT round_id, started_at FROM rounds").fetchall())
    closed = dict(db.execute("SELECT round_id, closed_at FROM rounds").fetchall())
    per: dict[str, list[float]] = {}
    for entry in json.loads(row[0]).get("attempts", []):
        t = entry.get("timeline")
        rid = entry.get("attempt")
        if not t or rid not in attempts or entry.get("aborted") is not None or any(ph not in t for ph in SECURE_PHASES):
            continue
        marks = [0.0] + [float(t[ph]) for ph in SECURE_PHASES]
        spans = {"open": float(t["opened_at"]) - float(opened[rid]),
                 **{ph: marks[i + 1] - marks[i] for i, ph in enumerate(SECURE_PHASES)},
                 "apply": float(closed[rid]) - (float(t["opened_at"]) + marks[-1])}
        for k, v in spans.items():
            per.setdefault(k, []).append(v)
    return {k: round(statistics.median(v), 3) for k, v in per.items()} or None


#: the plain round's timeline, in order: each span ends at the named moment and starts at the one before it
PLAIN_SPANS = (
    ("push", "the last daemon heard it is selected"),
    ("download", "the last model download was served (server)"),
    ("to_training", "the last daemon started training"),
    ("training_tail", "the last daemon ended training"),
    ("upload_send", "the last accepted upload's request reached the driver (daemon: encode, keep, seal, send)"),
    ("upload_open", "it was decrypted, decoded and checked (server)"),
    ("upload_write", "its payload file was written and fsynced (server)"),
    ("upload_sum", "its row was committed and it was summed (server)"),
    ("apply", "the aggregate was applied (server)"),
    ("evaluate", "the model was evaluated, when due (server)"),
    ("checkpoint", "the checkpoint was written and fsynced (server)"),
    ("close", "history and participation written, the row closed (server)"),
    ("reopen", "the next round opened (server)"),
)


def _plain_timeline(db: sqlite3.Connection, steady: list[dict[str, Any]],
                    events: dict[int, dict[str, dict[str, float]]]) -> dict[str, float] | None:
    """Median seconds per span of a plain round (PLAIN_SPANS) over the closed attempts ``steady``: the server's
    timeline stored with each attempt (fl_server/rest/round_timeline.py) and the daemons' log lines (same machine,
    same clock). Each span runs from the moment before it to its own (the last client's, where clients differ), so
    the spans add up to the time from one round's opening to the next's. Also: the slowest training, and the
    critical client's wait (open -> the training start of the daemon whose training ended last)."""
    rows = {rid: (started, tl) for rid, started, tl in db.execute("SELECT round_id, started_at, timeline FROM rounds").fetchall()}
    opens = sorted(started for started, _ in rows.values())
    per: dict[str, list[float]] = {}
    for r in steady:
        started, raw = rows[r["attempt"]]
        daemons = events.get(r["round"], {})  # a retried attempt's lines: the last one per daemon is kept
        ev = {k: [d[k] for d in daemons.values() if k in d and d[k] >= started - 1.0] for k in ("selected", "start", "end")}
        if raw is None or not all(ev.values()):
            continue
        tl = json.loads(raw)
        lu = tl.get("last_upload") or {}
        later = [t for t in opens if t > started]
        marks = {"push": max(ev["selected"]) - started, "download": tl["downloads"]["last"],
                 "to_training": max(ev["start"]) - started, "training_tail": max(ev["end"]) - started,
                 "upload_send": lu.get("received"), "upload_open": lu.get("opened"), "upload_write": lu.get("written"),
                 "upload_sum": tl["uploads"]["last"], "apply": tl.get("aggregated"), "evaluate": tl.get("evaluated"),
                 "checkpoint": tl.get("checkpointed"), "close": tl.get("closed"),
                 "reopen": (later[0] - started) if later else None}
        prev = 0.0
        for name, _ in PLAIN_SPANS:
            mark = marks[name]
            if mark is None:
                continue
            per.setdefault(name, []).append(mark - prev)
            prev = mark
        # the critical daemon: the one whose training ended last; its wait from the opening to its training start
        critical = max((d for d in daemons.values() if "start" in d and "end" in d), key=lambda d: d["end"])
        per.setdefault("critical_wait", []).append(critical["start"] - started)
        per.setdefault("critical_training", []).append(critical["end"] - critical["start"])
        if "accepted" in critical:  # its end of training -> the 202 for its upload, on its own clock
            per.setdefault("critical_upload", []).append(critical["accepted"] - critical["end"])
        if marks["reopen"] is not None:  # (the run's last round has no next one)
            per.setdefault("cycle", []).append(marks["reopen"])
    out = {k: round(statistics.median(v), 3) for k, v in per.items() if v}
    return out or None


NOTIFY_RUNS = {"notify50_push": True, "notify50_poll": False}


def run_one(name: str, rounds: int, seed: int, keep_logs: Path | None = None) -> dict[str, Any]:
    if name in NOTIFY_RUNS:
        return notify_run(name, 50, max(rounds, 6), NOTIFY_RUNS[name])
    from fl_common.config import config_from_dict, dump_config
    from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
    from fl_server.rest.secrets import ENV_SERVER_SECRET

    run = RUNS[name]
    rounds = int(run.get("rounds", rounds))
    if run.get("demo"):
        from fl_server.rest.demo import demo_config

        cfg = demo_config(run["clients"], rounds=rounds)
    else:
        cfg = config_from_dict(_config(run, rounds))
    env = {**os.environ, "PYTHONPATH": str(ROOT), ENV_ENROLLMENT_TOKEN: secrets.token_urlsafe(24),
           ENV_ADMIN_TOKEN: secrets.token_urlsafe(24), ENV_SERVER_SECRET: secrets.token_urlsafe(32), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix=f"fast_rounds_{name}_") as tmp:
        out = Path(tmp)
        dump_config(cfg, out / "config.yaml")
        stack = Stack(out, run["clients"], run["push"], env)
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        try:
            stack.start_server(out / "config.yaml")
            for i in range(run["clients"]):
                stack.start_daemon(f"bench-{i:02d}")
            deadline = time.time() + 240.0 * rounds + 600.0
            if run.get("kill_fraction"):
                extra = _killer(stack, float(run["kill_fraction"]), random.Random(seed), deadline)
            while time.time() < deadline and stack.status()["state"] != "finished":
                time.sleep(1.0)
        finally:
            stack.stop()
        result = _measure(stack, rounds, extra)
        if keep_logs is not None:  # the daemons' and the server's logs and the store, for a closer look
            dest = keep_logs / name
            dest.mkdir(parents=True, exist_ok=True)
            for item in [*out.glob("*.log"), out / "server" / "server.db"]:
                if item.is_file():
                    shutil.copy2(item, dest / item.name)
        result.update({"status_timeouts": stack.slow_status, "run": name,
                       "clients": run["clients"], "push": run["push"], "config": run["cfg"],
                       "model": cfg.model_type, "samples_per_client": cfg.samples_per_client,
                       "total_wall_s": round(time.perf_counter() - t0, 1), "cores": os.cpu_count(),
                       "load_average_after": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    return result


def write_readme() -> None:
    """The README's tables from every result present (the prose around them is kept in README.head.md)."""
    everything = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))
                  if p.stem in RUNS or p.stem in NOTIFY_RUNS}  # not download_codec.json (its own script)
    notify = {k: v for k, v in everything.items() if k in NOTIFY_RUNS}
    results = {k: v for k, v in everything.items() if k not in NOTIFY_RUNS}
    head = (RESULTS / "README.head.md").read_text() if (RESULTS / "README.head.md").is_file() else "# fast rounds\n"
    lines = [head.rstrip(), "", "## Runs", "",
             "| run | clients | model | push | rounds done/planned | median round s | median slowest training s | "
             "median overhead | open -> last client training, median / max s | server up -> round 1 open / closed s |"
             " load avg after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['clients']} | {r['model']} | {r['push']} | {r['rounds_completed']}/{r['rounds_planned']} "
                     f"| {r['median_round_s']} | {r['median_slowest_training_s']} | {r['median_overhead_fraction']} | "
                     f"{r['open_to_last_training_median_s']} / {r['open_to_last_training_max_s']} | "
                     f"{r['server_up_to_first_round_open_s']} / {r['server_up_to_first_round_closed_s']} | "
                     f"{', '.join(f'{x:.1f}' for x in r['load_average_after'])} |")
    if notify:
        lines += ["", "## Notification latency, 50 scripted clients, no training", "",
                  "| run | rounds done/planned | open -> 'selected' received, median s | open -> last client, median / max s |"
                  " median round s | load avg after |", "|---|---|---|---|---|---|"]
        for name, r in notify.items():
            lines.append(f"| {name} | {r['rounds_completed']}/{r['rounds_planned']} | {r['open_to_selected_median_s']} | "
                         f"{r['open_to_last_selected_median_s']} / {r['open_to_last_selected_max_s']} | "
                         f"{r['median_round_s']} | {', '.join(f'{x:.1f}' for x in r['load_average_after'])} |")
    timed = {k: v for k, v in results.items() if v.get("secure_phase_median_s")}
    if timed:
        spans = ["open", *SECURE_PHASES, "apply"]
        lines += ["", "## Secure round timeline (server clock, median s per phase over rounds 2+)", "",
                  "| run | " + " | ".join(spans) + " | sum |", "|---|" + "---|" * (len(spans) + 1)]
        for name, r in timed.items():
            t = r["secure_phase_median_s"]
            lines.append(f"| {name} | " + " | ".join(str(t.get(k, "")) for k in spans)
                         + f" | {round(sum(float(t.get(k, 0.0)) for k in spans), 3)} |")
    planned = {k: v for k, v in results.items() if v.get("plain_timeline_median_s")}
    if planned:
        spans = [name for name, _ in PLAIN_SPANS]
        lines += ["", "## Plain round timeline (median s per span over rounds 2+; server clock and daemons' logs)", "",
                  "Each span ends at: " + "; ".join(f"**{n}**: {what}" for n, what in PLAIN_SPANS) + ". The spans add up "
                  "to `cycle` (one round's opening to the next's). `critical_wait`: opening -> training start of the "
                  "daemon whose training ended last; `critical_training`: that daemon's training; `critical_upload`: "
                  "its end of training -> its upload's 202.", "",
                  "| run | " + " | ".join(spans) + " | cycle | critical_wait | critical_training | critical_upload |",
                  "|---|" + "---|" * (len(spans) + 4)]
        for name, r in planned.items():
            t = r["plain_timeline_median_s"]
            lines.append(f"| {name} | " + " | ".join(str(t.get(k, "")) for k in
                                                   [*spans, "cycle", "critical_wait", "critical_training",
                                                    "critical_upload"]) + " |")
    pairs = [("secure10_push", "plain10_push"), ("secure10_poll", "plain10_poll"), ("plain10_push", "plain10_poll"),
             ("plain10_push_f16", "plain10_push"), ("daemons50_push", "daemons50_poll"), ("dropout10_push", "dropout10_none")]
    lines += ["", "## Ratios (median round time, same invocation)", ""]
    for a, b in pairs:
        if a in results and b in results and results[a]["median_round_s"] and results[b]["median_round_s"]:
            lines.append(f"- {a} / {b}: {results[a]['median_round_s'] / results[b]['median_round_s']:.3f}")
    if "dropout10_push" in results:
        d = results["dropout10_push"]
        lines += ["", "## Dropout run", "", f"- rounds completed / planned: {d['rounds_completed']}/{d['rounds_planned']}",
                  f"- aborted attempts: {len(d['aborted_attempts'])}: " + "; ".join(a["reason"] or "" for a in d["aborted_attempts"]),
                  f"- daemons killed: {len(d.get('kills', []))} (phases: "
                  + ", ".join(k["phase"] or "?" for k in d.get("kills", [])) + ")"]
    tail = RESULTS / "README.tail.md"  # the reading of the numbers, written by hand once they are in
    if tail.is_file():
        lines += ["", tail.read_text().rstrip()]
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--daemon":
        sys.exit(daemon_main(sys.argv[2:]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=sorted([*RUNS, *NOTIFY_RUNS]), help="runs to do (default: all)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (the first is a warm-up, left out of medians)")
    ap.add_argument("--force", action="store_true", help="run again even when the run's JSON exists")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--keep-logs", type=Path, default=None,
                    help="copy each run's daemon and server logs and its server.db into DIR/<run>/")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.only or [*NOTIFY_RUNS, *(r for r in RUNS if r != "smoke")]:
        dest = RESULTS / f"{name}.json"
        if dest.is_file() and not args.force:
            print(f"{name}: kept ({dest})", flush=True)
            continue
        print(f"{name}: running", flush=True)
        result = run_one(name, args.rounds, args.seed, args.keep_logs)
        dest.write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
        write_readme()
    write_readme()


if __name__ == "__main__":
    main()
