"""REST at scale (issue 13): 1,000 registered clients, 200 polling at once, 100 in a round of the cnn.

Runs the real server (``python -m fl_server serve``: gunicorn, one worker, its gthread pool sized for the
federation) on loopback, once per *arm*, and drives it with light scripted clients in threads of this
process that speak the real protocol through ``fl_client.api.ServerApi``: registration with the
enrollment token (X25519 key agreement), bearer token + HMAC-signed requests with fresh nonces,
encrypted model downloads and uploads. No training: an update is random, int8 + zstd encoded, the
size a cnn client sends (1,663,370 parameters, about 1.7 MB).

Each arm, in order:

1. **Registration** of ``--registered`` clients (8 at a time). At every quarter, what grows with the
   number of registered clients: registration latency, a single client's poll latency (alone),
   ``/status`` latency, the worker's RSS, the SQLite files' size.
2. **Plain polls**: ``--pollers`` clients (a seeded random subset) each ``GET /api/v1/round`` every
   ``--interval`` s for ``--seconds`` s, while a round is open (its 100 selected clients are idle):
   p50 / p99 / max latency and the polls answered per second. Then the same pollers back to back (no
   pause between a poll's answer and the next poll) for ``--burst-seconds`` s: the server's poll
   throughput when 200 clients ask as fast as it answers.
3. **A round of the cnn with long-polls**: the ``--round-clients`` selected clients download the model
   and upload an update, all at once, while ``--pollers`` unselected clients long-poll
   (``GET /api/v1/round?wait=S`` with the last ETag). The worker's RSS (every 50 ms), PSS (every
   250 ms) and its VmHWM are read throughout; the round closes (aggregation + evaluation) and the next
   one opens, which wakes the parked long-polls: how long after the last upload's answer they hear it.

Arms: ``after`` is this checkout; ``before`` is the commit :data:`BEFORE_REV` (the code before the
scaling fixes), extracted with ``git archive`` into a temporary folder, so both run side by side in one
invocation on the same machine, against the same client code.

    python benchmarks/rest_scale.py                       # both arms, the issue's numbers
    python benchmarks/rest_scale.py --arms after --registered 200 --pollers 50 --round-clients 20

Writes ``benchmarks/results/rest_scale/results.json``; the table and its reading are in that folder's
README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_client.api import ServerApi  # noqa: E402
from fl_common.config import config_from_dict, dump_config  # noqa: E402
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN  # noqa: E402
from fl_common.tensors import wire  # noqa: E402
from fl_server.rest.demo import free_port, wait_healthy  # noqa: E402
from fl_server.rest.secrets import ENV_SERVER_SECRET  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "rest_scale"
#: the code before the scaling fixes of this benchmark's issue (the ``before`` arm)
BEFORE_REV = "9ebc512fcbe695f158d64b3987743351e7159e8e"
CNN_NUMEL = 1_663_370

#: Fashion-MNIST, McMahan's CNN, int8 uploads, encryption on (docker/server.yaml's federation), scaled to
#: ``registered`` clients with a tenth of them in a round; no over-selection, so the round closes at its 100th upload
SERVER_CFG: dict[str, Any] = {
    "dataset": "fashion_mnist", "model_type": "cnn", "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05,
    "momentum": 0.9, "data_distribution": "iid", "evaluation_frequency": 1, "aggregation_method": "fedavg",
    "compression": True, "codec": "int8", "encryption": True, "round_timeout": 1800.0, "round_start_wait": 5.0,
    "poll_interval": 1.0, "over_selection": 0.0, "differential_privacy": False, "secure_aggregation": False,
    "client_liveness": 1800.0, "seed": 11, "num_rounds": 3, "max_test_samples": 1000,
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else float("nan")


@dataclass
class Growth:
    """What the server costs at one number of registered clients."""

    registered: int
    register_ms_p50: float
    poll_ms_p50: float
    status_ms_p50: float
    worker_rss_mib: float
    db_kib: float


@dataclass
class ArmResult:
    arm: str
    growth: list[Growth] = field(default_factory=list)
    register_s: float = 0.0
    poll: dict[str, float | None] = field(default_factory=dict)
    burst: dict[str, float | None] = field(default_factory=dict)
    round: dict[str, float] = field(default_factory=dict)


class Server:
    """``python -m fl_server serve`` of one code tree, as a child process."""

    def __init__(self, tree: Path, work: Path, cfg_overrides: dict[str, Any]) -> None:
        self.state = work / "state"
        self.state.mkdir(parents=True)
        cfg = config_from_dict({**SERVER_CFG, **cfg_overrides})
        self.config = work / "server.yaml"
        dump_config(cfg, self.config)
        self.tokens = {ENV_ENROLLMENT_TOKEN: secrets.token_urlsafe(24), ENV_ADMIN_TOKEN: secrets.token_urlsafe(24),
                       ENV_SERVER_SECRET: secrets.token_urlsafe(32)}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **self.tokens, "PYTHONPATH": str(tree)}
        with open(work / "server.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fl_server", "serve", "--config", str(self.config),
                                          "--state-dir", str(self.state), "--port", str(self.port)],
                                         cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc)
        self.master = psutil.Process(self.proc.pid)

    def worker(self) -> psutil.Process:
        workers = self.master.children(recursive=True)
        if not workers:
            raise RuntimeError("the gunicorn worker is gone")
        return workers[0]

    def db_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.state.glob("server.db*"))

    def status(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/status", timeout=60).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def vm_hwm_mib(proc: psutil.Process) -> float:
    """The process's peak resident memory so far (VmHWM, kernel-maintained: no sample can miss a peak)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemorySampler(threading.Thread):
    """The worker's RSS every 50 ms and PSS every 250 ms, while a phase runs."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.stop_event = threading.Event()
        self.rss: list[float] = []
        self.pss: list[float] = []

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            try:
                self.rss.append(self.proc.memory_info().rss / 2**20)
                if n % 5 == 0:
                    self.pss.append(self.proc.memory_full_info().pss / 2**20)
            except psutil.Error:
                return
            n += 1
            self.stop_event.wait(0.05)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def new_client(server: Server, name: str) -> ServerApi:
    api = ServerApi(server.url, timeout=300, max_retries=2)  # as the daemon: a keep-alive race is retried
    api.register(server.tokens[ENV_ENROLLMENT_TOKEN], client_name=name, partition=None, num_samples=None, capability={})
    return api


def register_all(server: Server, n: int, result: ArmResult) -> list[ServerApi]:
    """Register ``n`` clients, 8 at a time, measuring what grows at each quarter."""
    clients: list[ServerApi] = []
    marks = sorted({max(1, n * q // 4) for q in (1, 2, 3, 4)})
    t_start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        done = 0
        for mark in marks:
            names = [f"s{i:05d}" for i in range(done, mark)]
            lat: list[float] = []

            def one(name: str) -> ServerApi:
                t0 = time.perf_counter()
                api = new_client(server, name)
                lat.append(1000 * (time.perf_counter() - t0))  # noqa: B023 - this quarter's list, drained before the next
                return api

            clients += list(pool.map(one, names))
            done = mark
            probe = clients[-1]
            polls = [timed(probe.round_status) for _ in range(20)]
            status = [timed(server.status) for _ in range(5)]
            g = Growth(mark, pct(lat, 0.5), pct(polls, 0.5), pct(status, 0.5),
                       round(server.worker().memory_info().rss / 2**20, 1), round(server.db_bytes() / 1024, 1))
            result.growth.append(g)
            print(f"  {result.arm}: {g}", flush=True)
    result.register_s = round(time.perf_counter() - t_start, 1)
    return clients


def poll_phase(pollers: list[ServerApi], seconds: float, interval: float) -> dict[str, float | None]:
    """Every poller polls every ``interval`` s (staggered start; 0: back to back) for ``seconds`` s."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(api: ServerApi, offset: float) -> None:
        time.sleep(offset)
        next_at = time.monotonic()
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                api.round_status()
            except Exception:  # counted: an error is a result here
                with lock:
                    errors[0] += 1
            else:
                with lock:
                    latencies.append(1000 * (time.perf_counter() - t0))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    rng = random.Random(1)
    threads = [threading.Thread(target=run, args=(api, rng.uniform(0, interval))) for api in pollers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"polls": len(latencies), "errors": errors[0], "polls_per_s": round(len(latencies) / wall, 1),
            "offered_per_s": round(len(pollers) / interval, 1) if interval > 0 else None, "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99), "max_ms": pct(latencies, 1.0)}


def round_phase(server: Server, selected: list[ServerApi], pollers: list[ServerApi], round_number: int,
                wait: float) -> dict[str, float]:
    """The selected clients download and upload at once while the pollers long-poll; memory sampled throughout."""
    worker = server.worker()
    rss_before = worker.memory_info().rss / 2**20
    pss_before = worker.memory_full_info().pss / 2**20
    hwm_before = vm_hwm_mib(worker)
    sampler = MemorySampler(worker)
    sampler.start()
    heard: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def long_poll(api: ServerApi) -> None:
        answer, etag = api.poll_round(None, 0.0)
        while not done.is_set() and answer.get("round") == round_number:
            answer, etag = api.poll_round(etag, wait)
        with lock:
            heard.append(time.perf_counter())

    upload_ms: list[float] = []
    last_upload = [0.0]

    def play(api: ServerApi, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        payload, _ = api.download_model(None, encrypted=True)
        assert payload is not None
        vec = torch.randn(CNN_NUMEL, generator=gen) * 1e-3
        packed = wire.encode_update(vec, "int8", "zstd", rng=gen, meta={"num_samples": 10, "metrics": {"train_loss": 1.0}})
        api.upload_update(round_number, packed, f"r{round_number}", encrypted=True)
        t1 = time.perf_counter()
        with lock:
            upload_ms.append(1000 * (t1 - t0))
            last_upload[0] = max(last_upload[0], t1)

    parked = [threading.Thread(target=long_poll, args=(api,)) for api in pollers]
    for t in parked:
        t.start()
    time.sleep(1.0)  # the long-polls are parked before the round's traffic starts
    t_round = time.perf_counter()
    players = [threading.Thread(target=play, args=(api, i)) for i, api in enumerate(selected)]
    for t in players:
        t.start()
    for t in players:
        t.join()
    deadline = time.monotonic() + 600
    while server.status()["completed_rounds"] < round_number:
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {round_number} did not close")
        time.sleep(0.1)
    t_closed = time.perf_counter()
    for t in parked:
        t.join(timeout=wait + 60)
    done.set()
    sampler.stop_event.set()
    sampler.join()
    after_last = [1000 * (h - last_upload[0]) for h in heard]
    return {
        "clients_in_round": len(selected), "round_s": round(t_closed - t_round, 1),
        "download_upload_ms_p50": pct(upload_ms, 0.5), "download_upload_ms_p99": pct(upload_ms, 0.99),
        "worker_rss_before_mib": round(rss_before, 1), "worker_rss_peak_mib": round(max(sampler.rss, default=0.0), 1),
        "worker_pss_before_mib": round(pss_before, 1), "worker_pss_peak_mib": round(max(sampler.pss, default=0.0), 1),
        "worker_vmhwm_before_mib": round(hwm_before, 1), "worker_vmhwm_after_mib": round(vm_hwm_mib(worker), 1),
        "long_polls": len(pollers), "long_polls_heard": len(heard),
        "heard_after_last_upload_ms_p50": pct(after_last, 0.5), "heard_after_last_upload_ms_p99": pct(after_last, 0.99),
        "heard_spread_ms": round(1000 * (max(heard) - min(heard)), 1) if heard else float("nan"),
    }


def run_arm(arm: str, tree: Path, args: argparse.Namespace) -> ArmResult:
    result = ArmResult(arm)
    with tempfile.TemporaryDirectory(prefix=f"rest-scale-{arm}-") as tmp:
        server = Server(tree, Path(tmp), {"num_clients": args.registered,
                                          "client_selection_ratio": args.round_clients / args.registered})
        try:
            clients = register_all(server, args.registered, result)
            # the round opened once round_clients were live: who is in it, who is not
            states = {id(c): c.round_status() for c in clients}
            round_number = next(s["round"] for s in states.values() if s.get("round") is not None)
            selected = [c for c in clients if states[id(c)]["state"] == "selected"]
            others = [c for c in clients if states[id(c)]["state"] != "selected"]
            if len(selected) != args.round_clients:
                raise RuntimeError(f"{len(selected)} clients selected, expected {args.round_clients}")
            rng = random.Random(7)
            pollers = rng.sample(clients, args.pollers)
            result.poll = poll_phase(pollers, args.seconds, args.interval)
            print(f"  {arm}: plain polls {result.poll}", flush=True)
            if args.burst_seconds > 0:
                result.burst = poll_phase(pollers, args.burst_seconds, 0.0)
                print(f"  {arm}: back-to-back polls {result.burst}", flush=True)
            long_pollers = rng.sample(others, args.pollers)
            result.round = round_phase(server, selected, long_pollers, round_number, args.wait)
            print(f"  {arm}: round {result.round}", flush=True)
        finally:
            server.stop()
    return result


def extract(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (``git archive``), for the ``before`` arm."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def markdown(arms: list[dict[str, Any]]) -> str:
    """The README's tables from the results (arms side by side)."""
    names = [a["arm"] for a in arms]
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"

    def row(label: str, get: Callable[[dict[str, Any]], Any]) -> str:
        return f"| {label} | " + " | ".join(str(get(a)) for a in arms) + " |\n"

    out = head
    out += row("register 1,000 clients (8 at a time), s", lambda a: a["register_s"])
    for key, label in (("poll", "plain polls, 1 per s each"), ("burst", "back-to-back polls")):
        def rate(a: dict[str, Any], k: str = key) -> Any:
            return a[k].get("polls_per_s")

        def lat(a: dict[str, Any], k: str = key) -> str:
            return f"{a[k].get('p50_ms')} / {a[k].get('p99_ms')} / {a[k].get('max_ms')}"

        out += row(f"{label}: polls answered per s", rate)
        out += row(f"{label}: p50 / p99 / max ms", lat)
    r = "round"
    out += row("round of 100: download + upload per client p50 / p99 ms",
               lambda a: f"{a[r]['download_upload_ms_p50']} / {a[r]['download_upload_ms_p99']}")
    out += row("round of 100: first upload to close, s", lambda a: a[r]["round_s"])
    out += row("worker RSS before the round -> peak, MiB", lambda a: f"{a[r]['worker_rss_before_mib']} -> "
                                                                      f"{a[r]['worker_rss_peak_mib']}")
    out += row("worker PSS before the round -> peak, MiB", lambda a: f"{a[r]['worker_pss_before_mib']} -> "
                                                                      f"{a[r]['worker_pss_peak_mib']}")
    out += row("worker VmHWM (peak RSS since start), MiB", lambda a: a[r]["worker_vmhwm_after_mib"])
    out += row("200 parked long-polls answered after the last upload, p50 / p99 ms",
               lambda a: f"{a[r]['heard_after_last_upload_ms_p50']} / {a[r]['heard_after_last_upload_ms_p99']}")
    out += "\n| registered | " + " | ".join(f"{n}: register p50 ms / poll p50 ms / status p50 ms / RSS MiB / db KiB"
                                           for n in names) + " |\n|---|" + "---|" * len(names) + "\n"
    for i, g in enumerate(arms[0]["growth"]):
        out += f"| {g['registered']} | " + " | ".join(
            "{register_ms_p50} / {poll_ms_p50} / {status_ms_p50} / {worker_rss_mib} / {db_kib}".format(**a["growth"][i])
            for a in arms) + " |\n"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--before-rev", default=BEFORE_REV)
    ap.add_argument("--registered", type=int, default=1000)
    ap.add_argument("--pollers", type=int, default=200)
    ap.add_argument("--round-clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0, help="plain-poll phase length")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between one poller's polls")
    ap.add_argument("--burst-seconds", type=float, default=10.0, help="back-to-back poll phase length (0: skip)")
    ap.add_argument("--wait", type=float, default=20.0, help="long-poll wait (s)")
    ap.add_argument("--out", type=Path, default=OUT / "results.json")
    args = ap.parse_args()
    if args.pollers > args.registered - args.round_clients:
        ap.error("--pollers must leave --round-clients clients out of --registered")
    results = []
    with tempfile.TemporaryDirectory(prefix="rest-scale-trees-") as trees:
        for arm in args.arms:
            tree = ROOT if arm == "after" else extract(args.before_rev, Path(trees) / "before")
            print(f"arm {arm}: {tree}", flush=True)
            results.append(run_arm(arm, tree, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
           "arms": [asdict(r) for r in results]}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(markdown(doc["arms"]))


if __name__ == "__main__":
    main()
