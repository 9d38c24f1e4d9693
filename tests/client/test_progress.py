"""The client daemon's local-training progress bar: on a terminal yes, in a pipe no; JSON log lines.

Real ``python -m fl_client`` processes train one tiny round against a real server on loopback.
The terminal is a pseudo-terminal from the ``pty`` module, attached as the daemon's stderr.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from tests.e2e.harness import threaded_server, token_env
from tests.e2e.scripted_rounds import tiny_cfg

#: what tqdm draws: "round 1 epoch 1/1: 100%|#####| 10/10 [00:00<00:00, 99.0batch/s]"
BAR = re.compile(r"round 1 epoch 1/1: +100%\|.*\| (\d+)/(\d+) \[")


def _cfg():  # one client, one round, 300 samples in batches of 32: 10 batches
    return tiny_cfg(num_clients=1, num_rounds=1, samples_per_client=300, batch_size=32, local_epochs=1)


def _client_cmd(url: str, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fl_client", "--server-url", url, "--client-id", "tty-client", "--state-dir", str(state),
            "--threads", "1", *extra]


def _run_on_pty(cmd: list[str], env: dict[str, str], timeout: float = 180.0) -> tuple[int, str]:
    """Run with stderr (and stdin/stdout) on a pseudo-terminal; return (exit status, everything written)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(_cfg(), tmp_path / "srv", env) as (url, service):
        client_env = {**os.environ, ENV_ENROLLMENT_TOKEN: env[ENV_ENROLLMENT_TOKEN]}
        rc, out = _run_on_pty(_client_cmd(url, tmp_path / "client"), client_env)
        assert service.coordinator.completed_rounds == 1
    assert rc == 0, out
    assert "\r" in out, "tqdm redraws its line with carriage returns on a terminal"
    matches = BAR.findall(out)
    assert matches, f"no finished progress bar on the terminal:\n{out}"
    done, total = map(int, matches[-1])
    assert done == total == 10  # ceil(300 / 32) batches of the one local epoch


@pytest.mark.slow
def test_no_progress_bar_in_a_pipe_and_json_log_lines(tmp_path: Path) -> None:
    env = token_env()
    with threaded_server(_cfg(), tmp_path / "srv", env) as (url, service):
        proc = subprocess.run(_client_cmd(url, tmp_path / "client", "--log-format", "json"),
                              env={**os.environ, ENV_ENROLLMENT_TOKEN: env[ENV_ENROLLMENT_TOKEN]},
                              capture_output=True, text=True, timeout=180, check=False)
        assert service.coordinator.completed_rounds == 1
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "batch/s" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message", "process"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert any("round 1: training 1 epoch(s) on 300 samples" in m for m in messages), messages
    assert any("update accepted" in m for m in messages), messages
    assert env[ENV_ENROLLMENT_TOKEN] not in proc.stderr, "the enrollment token reached the log"
