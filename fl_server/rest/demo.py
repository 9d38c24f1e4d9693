"""``python -m fl_server demo --clients 10``: a real federation on this machine.

Starts the REST server (gunicorn) and N client daemon processes on loopback, each client with
its own state folder and data partition, shows round progress from ``/status``, and stops
everything cleanly. Secrets (enrollment and admin tokens) are generated for the demo, handed to
the processes through their environment and never printed. The server speaks HTTPS even on
loopback: a private CA and a server certificate for 127.0.0.1 are made in its state folder
(``server/tls``, fl_common/crypto/tls.py) and the clients verify the server against that CA.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from fl_common.config import FLConfig, dump_config, load_config
from fl_common.config.loading import parse_overrides, read_yaml
from fl_common.crypto.tls import ensure_tls
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
from fl_server.privacy.statement import distributed_noise_note, guarantee, label_histogram_note, noise_multiplier_range
from fl_server.rest.secrets import ENV_SERVER_SECRET

log = logging.getLogger("fl_server.rest.demo")

#: Embedded defaults of the demo; any key can be overridden with --config / --set. Private by
#: default, as the card asks: sample-level DP-SGD at the seed's (epsilon, delta) = (1, 1e-5), with
#: the training settings of the DP recipe (fl_common/config/recipes.py) unless the config chooses a
#: model; secure aggregation (SecAgg+ masking); int8 where a codec applies; Fernet + HMAC.
DEMO_DEFAULTS: dict[str, Any] = {
    "dataset": "fashion_mnist", "model_type": "cnn", "num_rounds": 5, "local_epochs": 1, "batch_size": 32,
    "learning_rate": 0.05, "momentum": 0.9, "client_selection_ratio": 1.0, "data_distribution": "iid",
    "evaluation_frequency": 1, "differential_privacy": True, "dp_mode": "sample", "dp_epsilon": 1.0, "dp_delta": 1e-5,
    "secure_aggregation": True, "compression": True,
    "codec": "int8", "encryption": True, "poll_interval": 0.5, "round_timeout": 600.0, "over_selection": 0.0,
    # 600 samples per client (McMahan et al.'s 100-client split of 60k) and a 2,000-image test
    # subset keep a 10-client round to ~20 s on two cores; the full test set costs ~9 s per evaluation.
    "samples_per_client": 600, "max_test_samples": 2000,
}

#: The demo's training settings under DP when the user chose no model: measured for its own run (5 rounds, 10
#: IID clients of 600 records, epsilon 1) rather than the 100-round recipe of fl_common/config/recipes.py,
#: whose cosine-decayed lr 0.05 learns too little in five rounds (55.0 % against 59.6 % for these settings in the
#: simulation; benchmarks/results/private_demo/README.md has the search).
DEMO_DP_RECIPE: dict[str, Any] = {"model_type": "cnn", "batch_size": 128, "learning_rate": 0.2, "momentum": 0.9,
                                  "lr_schedule": "constant", "clip_grad_norm": 1.0}
DEMO_DP_RECIPE_SOURCE = "the demo's DP settings, measured for its five rounds (benchmarks/results/private_demo)"

#: Under DP-SGD an update carries its noise (sigma C / B per step and coordinate, over 1.66M coordinates: an L2
#: norm of tens), so secure aggregation's default clip of 10 would shrink every private update several-fold;
#: the demo's masked rounds clip at this instead (a few more bits of ring width per value).
DEMO_SECAGG_CLIP_NORM = 200.0

#: ``demo --no-privacy``: the same federation without DP and masking, for comparison.
NO_PRIVACY: dict[str, Any] = {"differential_privacy": False, "secure_aggregation": False}


def demo_config(clients: int, *, config: Path | None = None, rounds: int | None = None, overrides: Sequence[str] = (),
                private: bool = True) -> FLConfig:
    """The demo's configuration: embedded defaults (``NO_PRIVACY`` over them unless ``private``), then the
    user's file, ``--rounds`` and ``--set``; under DP with no model chosen by the user, the DP recipe."""
    defaults = {**DEMO_DEFAULTS, "num_clients": clients, "samples_per_client": min(600, 60000 // clients)}
    if not private:
        defaults.update(NO_PRIVACY)
    given = dict(read_yaml(config)) if config is not None else {}
    if rounds is not None:
        given["num_rounds"] = rounds
    given.update(parse_overrides(overrides))
    if given.get("secure_aggregation", defaults["secure_aggregation"]) is True and \
            given.get("differential_privacy", defaults["differential_privacy"]) is True:
        defaults["secagg_clip_norm"] = DEMO_SECAGG_CLIP_NORM
    return load_config(None, given, defaults=defaults, dp_recipe=(DEMO_DP_RECIPE, DEMO_DP_RECIPE_SOURCE))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0, verify: bool | str = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if requests.get(f"{url}/health", timeout=2, verify=verify).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: how the demo starts its daemons: forked from one pre-imported process (``python -m fl_client.forkserver``,
#: the default: ten daemons register in about a second instead of each importing torch on a shared core), or
#: one ``python -m fl_client`` process each (``spawn``: what an operator runs on every device)
DAEMON_LAUNCHES = ("fork", "spawn")
#: seconds the fork server gives its daemons after SIGTERM before it kills them (the demo waits a bit longer)
FORKSERVER_STOP_TIMEOUT = 15.0


def client_environment(env: dict[str, str]) -> dict[str, str]:
    """The daemons' environment: the demo's, without the server's secret and the admin token (a client needs only
    its enrollment token)."""
    return {k: v for k, v in env.items() if k not in (ENV_ADMIN_TOKEN, ENV_SERVER_SECRET)}


def daemon_args(url: str, name: str, state_dir: Path, threads: int, ca: str) -> list[str]:
    """``python -m fl_client`` arguments of one demo daemon."""
    return ["--server-url", url, "--client-id", name, "--state-dir", str(state_dir), "--threads", str(threads),
            "--ca-file", ca]


def start_forkserver(output: Path, env: dict[str, str], dataset: str) -> subprocess.Popen:
    """``python -m fl_client.forkserver``, started at once so that its imports (torch) and the dataset's decoding
    overlap the server's start-up; daemons are asked of it with :func:`fork_daemons`."""
    log = open(output / "logs" / "forkserver.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "fl_client.forkserver", "--warm", dataset, "--stop-timeout",
                                 str(FORKSERVER_STOP_TIMEOUT)], stdin=subprocess.PIPE, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child holds its own copy


def fork_daemons(forkserver: subprocess.Popen, requests_: Sequence[tuple[list[str], Path]]) -> None:
    """Hand the fork server every daemon to start (argv, log file) and close its input: it exits once they all have."""
    assert forkserver.stdin is not None
    lines = "".join(json.dumps({"argv": argv, "log": str(log)}) + "\n" for argv, log in requests_)
    try:
        forkserver.stdin.write(lines.encode())
        forkserver.stdin.close()
    except BrokenPipeError:
        raise RuntimeError(f"the client fork server exited with status {forkserver.wait()} before starting the daemons; "
                           "see logs/forkserver.log") from None


def run_demo(cfg: FLConfig, output: Path, clients: int, *, progress: bool | None = None, threads: int = 1,
             launch: str = "fork") -> dict[str, Any]:
    """Run the federation; ``launch`` says how the daemons start (:data:`DAEMON_LAUNCHES`)."""
    if launch not in DAEMON_LAUNCHES:
        raise ValueError(f"launch must be one of {', '.join(DAEMON_LAUNCHES)}, not {launch!r}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "logs").mkdir(exist_ok=True)
    config_path = output / "config.yaml"
    dump_config(cfg, config_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    tls = ensure_tls(output / "server" / "tls", ["127.0.0.1"]).files
    ca = str(tls.ca_cert)
    env = {**os.environ, ENV_ENROLLMENT_TOKEN: secrets.token_urlsafe(24), ENV_ADMIN_TOKEN: secrets.token_urlsafe(24),
           ENV_SERVER_SECRET: secrets.token_urlsafe(32), "PYTHONUNBUFFERED": "1"}
    client_env = client_environment(env)
    procs: list[subprocess.Popen] = []
    forkserver = start_forkserver(output, client_env, cfg.dataset) if launch == "fork" else None
    server_log = open(output / "logs" / "server.log", "ab")
    try:
        server = subprocess.Popen([sys.executable, "-m", "fl_server", "serve", "--config", str(config_path), "--state-dir",
                                   str(output / "server"), "--host", "127.0.0.1", "--port", str(port),
                                   "--certfile", str(tls.server_cert), "--keyfile", str(tls.server_key)],
                                  env=env, stdout=server_log, stderr=subprocess.STDOUT)
    except BaseException:
        if forkserver is not None:
            stop_process(forkserver)
        server_log.close()
        raise
    try:
        wait_healthy(url, server, verify=ca)
        log.info("server up at %s; starting %d clients (logs in %s)", url, clients, output / "logs")
        names = [f"demo-client-{i:02d}" for i in range(clients)]
        if forkserver is not None:
            fork_daemons(forkserver, [(daemon_args(url, name, output / "clients" / name, threads, ca),
                                       output / "logs" / f"{name}.log") for name in names])
            procs.append(forkserver)
        else:
            for name in names:
                with open(output / "logs" / f"{name}.log", "ab") as out:
                    procs.append(subprocess.Popen([sys.executable, "-m", "fl_client",
                                                   *daemon_args(url, name, output / "clients" / name, threads, ca)],
                                                  env=client_env, stdout=out, stderr=subprocess.STDOUT))
        status = _follow(url, cfg.num_rounds, server, progress, ca, forkserver)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop_process(p, timeout=FORKSERVER_STOP_TIMEOUT + 5.0)
        return status
    finally:
        for p in procs:
            stop_process(p, timeout=FORKSERVER_STOP_TIMEOUT + 5.0)
        if forkserver is not None:
            stop_process(forkserver, timeout=FORKSERVER_STOP_TIMEOUT + 5.0)
        stop_process(server)
        server_log.close()


def _follow(url: str, rounds: int, server: subprocess.Popen, progress: bool | None, ca: str,
            forkserver: subprocess.Popen | None = None) -> dict[str, Any]:
    bar = tqdm(total=rounds, desc="rounds", unit="round", file=sys.stderr, disable=None if progress is None else not progress)
    last = 0
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}; see its log")
            daemons_gone = forkserver.poll() if forkserver is not None else None  # it exits once every daemon has
            try:
                status = requests.get(f"{url}/status", timeout=10, verify=ca).json()
            except requests.RequestException:
                time.sleep(1)
                continue
            done = status["completed_rounds"]
            if done > last:
                bar.update(done - last)
                last = done
                if status.get("accuracy") is not None:
                    bar.set_postfix(acc=f"{status['accuracy']:.4f}", clients=status["clients"]["online"])
                    log.info("round %d: test accuracy %.4f", done, status["accuracy"])
            cur = status.get("current_round")
            if cur:
                bar.set_description(f"round {cur['round']}: {cur['arrived']}/{cur['quorum']} updates")
            if status["state"] == "finished":
                return status
            if daemons_gone is not None:  # (looked at before /status: daemons that left because it finished are fine)
                raise RuntimeError(f"every client daemon exited (the fork server's status {daemons_gone}) "
                                   "before the federation finished; see logs/demo-client-*.log and logs/forkserver.log")
            time.sleep(1.0)
    finally:
        bar.close()


#: what one (epsilon, delta) of each DP granularity protects, in the words the report uses
def privacy_line(status: dict[str, Any], label_histogram_epsilon: float | None = None) -> dict[str, Any]:
    """What the run protected and how, from /status: the demo's last line says it, not only the accuracy."""
    dp = status.get("privacy") or {}
    out: dict[str, Any] = {"secure_aggregation": bool(status.get("secure_aggregation")),
                           "encryption": "Fernet / AES-256-GCM + HMAC-SHA256" if status.get("encryption") else "off",
                           "codec": status.get("codec")}
    if not dp.get("differential_privacy"):
        return {"differential_privacy": False,
                "guarantee": "none: updates are protected in transit, not differentially private", **out}
    line: dict[str, Any] = {
        "differential_privacy": True, "guarantee": guarantee(dp.get("mode")),
        "epsilon_spent": dp.get("epsilon_spent"), "delta": dp.get("delta"), "epsilon_budget": dp.get("epsilon_budget"),
        "accountant": dp.get("accountant"),
        "stop_reason": status.get("stop_reason") or f"all {status.get('num_rounds')} rounds done"}
    sigmas = noise_multiplier_range(dp)
    if sigmas is not None:
        line["noise_multiplier_range"] = [round(sigmas[0], 4), round(sigmas[1], 4)]
    else:
        line["noise_multiplier"] = dp.get("noise_multiplier")
    distributed = distributed_noise_note(dp)
    if distributed is not None:
        line["noise"] = distributed
    hist = label_histogram_note(label_histogram_epsilon)
    if hist is not None:
        line["label_histograms"] = hist
    return {**line, **out}


def demo_summary(output: Path, status: dict[str, Any], label_histogram_epsilon: float | None = None) -> str:
    run = output / "server" / "run"
    return json.dumps({"output": str(run), "final_accuracy": status.get("accuracy"),
                       "rounds": status.get("completed_rounds"), "history": str(run / "history.csv"),
                       "privacy": privacy_line(status, label_histogram_epsilon)})
