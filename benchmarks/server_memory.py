"""Server memory per round (issue 16, defect 8): is the growth a leak or the allocator's high-water mark?

Runs the real server (``python -m fl_server serve``: gunicorn, one worker, a gthread pool) on
loopback with N scripted clients in threads of this process (real registration, signing,
encryption; the update is random, int8-encoded like the compose clients send it). Every round each
client polls until selected, downloads the global model and uploads a cnn-sized update; once the
round has closed (aggregated and evaluated) the server worker's resident memory (psutil) is
sampled five times and the median is recorded.

Each *variant* is a fresh server with its own environment, so that allocator settings (read by
glibc at process start, or by the server when it starts) can be compared on the same workload:

    before          the server as it was: the trainer's mallopt tuning (fl_common/allocator.py, applied
                    because the server builds a LocalTrainer for evaluation), glibc's arenas per thread,
                    no trim (FL_SERVER_MALLOC=0 switches this change off)
    glibc-defaults  no mallopt tuning at all (FL_MALLOC_TUNING=0, FL_SERVER_MALLOC=0)
    arena2          the trainer's tuning, but MALLOC_ARENA_MAX=2 in the environment
    fixed           the server as it is now (fl_server/rest/serve.py: server_allocator)

    python benchmarks/server_memory.py                       # 100 rounds, 10 clients, every variant
    python benchmarks/server_memory.py --rounds 30 --variants before fixed

Writes ``benchmarks/results/server_memory/rss_per_round.csv`` (variant, round, rss_mib, seconds) and
``rss_per_round.png``; the numbers and their reading are in that folder's README.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
import torch

from fl_client.api import ServerApi
from fl_common.config import config_from_dict, dump_config
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
from fl_common.tensors import wire
from fl_server.rest.demo import free_port, wait_healthy
from fl_server.rest.secrets import ENV_SERVER_SECRET

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "server_memory"

#: the server environment of each variant (on top of this process's environment)
VARIANTS: dict[str, dict[str, str]] = {
    "before": {"FL_SERVER_MALLOC": "0"},
    "glibc-defaults": {"FL_SERVER_MALLOC": "0", "FL_MALLOC_TUNING": "0"},
    "arena2": {"FL_SERVER_MALLOC": "0", "MALLOC_ARENA_MAX": "2"},
    "fixed": {},
}

#: docker/server.yaml's federation (Fashion-MNIST, McMahan's CNN, 10 clients, all in every round, int8)
SERVER_CFG = {
    "dataset": "fashion_mnist", "model_type": "cnn", "num_clients": 10, "client_selection_ratio": 1.0,
    "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "momentum": 0.9, "data_distribution": "iid",
    "evaluation_frequency": 1, "aggregation_method": "fedavg", "compression": True, "codec": "int8", "encryption": True,
    "round_timeout": 600.0, "round_start_wait": 60.0, "poll_interval": 0.2, "over_selection": 0.0,
    "differential_privacy": False, "secure_aggregation": False, "client_liveness": 600.0, "seed": 11,
}


@dataclass
class Sample:
    variant: str
    round: int
    rss_mib: float
    seconds: float


def worker_rss(master: psutil.Process) -> int:
    """Resident bytes of the gunicorn worker (the process that serves and runs rounds)."""
    workers = master.children(recursive=True)
    if not workers:
        raise RuntimeError("the gunicorn worker is gone")
    return sum(p.memory_info().rss for p in workers)


def median_rss(master: psutil.Process, samples: int = 5, gap: float = 0.1) -> float:
    """RSS is noisy (a poll arriving, the ticker waking): the median of a few readings, in MiB."""
    values = []
    for _ in range(samples):
        values.append(worker_rss(master))
        time.sleep(gap)
    return statistics.median(values) / 2**20


class Client:
    """One scripted client: real HTTP, signing and encryption; its update is random and int8-encoded."""

    def __init__(self, url: str, enrollment: str, name: str, numel: int, seed: int) -> None:
        self.api = ServerApi(url, timeout=120, max_retries=3)
        self.api.register(enrollment, client_name=name, partition=None, num_samples=None, capability={})
        self.numel = numel
        self.gen = torch.Generator().manual_seed(seed)

    def play(self, round_number: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            st = self.api.round_status()
            if st["state"] == "selected" and st["round"] == round_number:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"not selected for round {round_number}")
        self.api.download_model(None, encrypted=True)
        vec = torch.randn(self.numel, generator=self.gen) * 1e-3
        packed = wire.encode_update(vec, "int8", "zstd", rng=self.gen, meta={"num_samples": 10, "metrics": {"train_loss": 1.0}})
        self.api.upload_update(round_number, packed, f"r{round_number}", encrypted=True)


def run_variant(name: str, env_extra: dict[str, str], rounds: int, clients: int, test_samples: int, threads: int,
                work: Path, progress: bool = True) -> list[Sample]:
    cfg = config_from_dict({**SERVER_CFG, "num_clients": clients, "num_rounds": rounds, "max_test_samples": test_samples})
    state = work / name
    state.mkdir(parents=True)
    dump_config(cfg, work / f"{name}.yaml")
    tokens = {ENV_ENROLLMENT_TOKEN: secrets.token_urlsafe(24), ENV_ADMIN_TOKEN: secrets.token_urlsafe(24),
              ENV_SERVER_SECRET: secrets.token_urlsafe(32)}
    env = {**os.environ, **tokens, **env_extra}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(work / f"{name}-server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fl_server", "serve", "--config", str(work / f"{name}.yaml"),
                                 "--state-dir", str(state), "--port", str(port), "--threads", str(threads)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    samples: list[Sample] = []
    try:
        wait_healthy(url, proc)
        master = psutil.Process(proc.pid)
        numel = cnn_numel()
        samples.append(Sample(name, 0, median_rss(master), 0.0))
        team = [Client(url, tokens[ENV_ENROLLMENT_TOKEN], f"m{i}", numel, seed=i) for i in range(clients)]
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            errors: list[BaseException] = []

            def play(c: Client, r: int = r) -> None:
                try:
                    c.play(r, time.monotonic() + 300)
                except BaseException as exc:  # reported below, in the main thread
                    errors.append(exc)  # noqa: B023 - the list of this round, joined below before the next

            workers = [threading.Thread(target=play, args=(c,)) for c in team]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if errors:
                raise RuntimeError(f"round {r}: {errors[0]!r}")
            deadline = time.monotonic() + 300
            while requests.get(f"{url}/status", timeout=30).json()["completed_rounds"] < r:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"round {r} did not close")
                time.sleep(0.1)
            samples.append(Sample(name, r, median_rss(master), time.perf_counter() - t0))
            if progress:
                print(f"{name:15s} round {r:3d}: {samples[-1].rss_mib:7.1f} MiB  ({samples[-1].seconds:6.1f} s)", flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    return samples


def cnn_numel() -> int:
    from fl_common.models import count_parameters, create_model

    return count_parameters(create_model("cnn", (1, 28, 28), 10))


def write_csv(samples: list[Sample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "round", "rss_mib", "seconds"])
        for s in samples:
            w.writerow([s.variant, s.round, f"{s.rss_mib:.1f}", f"{s.seconds:.1f}"])


def plot(samples: list[Sample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for variant in dict.fromkeys(s.variant for s in samples):
        mine = [s for s in samples if s.variant == variant]
        ax.plot([s.round for s in mine], [s.rss_mib for s in mine], marker=".", label=variant)
    ax.set_xlabel("round (0: after start-up)")
    ax.set_ylabel("server worker RSS (MiB, median of 5)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(samples: list[Sample], warmup: int) -> str:
    """Per variant: start-up, round 1, and medians of rounds warmup-2..warmup+2 and of the five rounds before the
    last (the last round also writes the end-of-run report, whose plots are a one-off allocation)."""
    lines = []
    for variant in dict.fromkeys(s.variant for s in samples):
        mine = {s.round: s.rss_mib for s in samples if s.variant == variant}
        last = max(mine)
        warm = statistics.median(mine[r] for r in range(max(1, warmup - 2), min(last, warmup + 2) + 1))
        late = statistics.median(mine[r] for r in range(max(1, last - 5), last))
        lines.append(f"{variant:15s} start {mine[0]:7.1f}  round 1 {mine.get(1, float('nan')):7.1f}  ~round {warmup} "
                     f"{warm:7.1f}  ~round {last - 3} {late:7.1f}  round {last} {mine[last]:7.1f}  "
                     f"growth after warm-up {late - warm:+7.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--threads", type=int, default=8, help="gunicorn gthread pool (fl_server serve's default is 8)")
    ap.add_argument("--test-samples", type=int, default=2000, help="evaluation set of each round (max_test_samples)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--warmup", type=int, default=10, help="rounds after which memory should stay flat")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            samples += run_variant(name, VARIANTS[name], args.rounds, args.clients, args.test_samples, args.threads, Path(tmp))
            write_csv(samples, args.out / "rss_per_round.csv")  # after every variant: a long run keeps what it measured
    plot(samples, args.out / "rss_per_round.png",
         f"fl_server serve, cnn / Fashion-MNIST, {args.clients} clients, int8 uploads, {args.threads} threads")
    print(summary(samples, args.warmup))


if __name__ == "__main__":
    main()
