"""``python -m fl_client.forkserver``: daemons forked from one pre-imported process, each with its own keys.

One real fork server (a subprocess) serves the module: two daemons print their verifying keys, one is refused for
bad input, one waits for a server that is not there until the fork server passes SIGTERM on to it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fl_client.forkserver import DaemonRequest, ForkRefused, ForkServer
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN

#: the daemons' tests share one fork server (one torch import): on one xdist worker
pytestmark = pytest.mark.xdist_group("forkserver")

ROOT = Path(__file__).resolve().parents[2]
KEY_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.MULTILINE)


@dataclass
class Served:
    folder: Path
    returncode: int
    stderr: str
    started: list[dict[str, object]]  # the fork server's stdout: one {"pid", "log"} per daemon

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    folder = tmp_path_factory.mktemp("forkserver")
    port = unused_port()  # a loopback port nobody listens on: the daemon waits for its server
    requests = [DaemonRequest(("--print-verify-key", "--state-dir", str(folder / "a")), folder / "a.log"),
                DaemonRequest(("--print-verify-key", "--state-dir", str(folder / "b")), folder / "b.log"),
                DaemonRequest(("--server-url", "http://127.0.0.1:1", "--timeout", "5"), folder / "bad.log"),
                DaemonRequest(("--server-url", f"http://127.0.0.1:{port}", "--client-id", "waiting", "--state-dir",
                               str(folder / "waiting"), "--timeout", "10", "--max-retries", "1"), folder / "waiting.log")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), ENV_ENROLLMENT_TOKEN: "t" * 32}
    proc = subprocess.Popen([sys.executable, "-m", "fl_client.forkserver", "--stop-timeout", "30"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdin is not None and proc.stderr is not None
    lines = [r.to_line() for r in requests]
    lines.insert(2, "not json\n")  # a malformed request between good ones: refused, the others still start
    proc.stdin.write("".join(lines))
    proc.stdin.close()
    waiting = folder / "waiting.log"
    try:
        _wait_for(lambda: waiting.is_file() and "registration" in waiting.read_text(), "the daemon to wait for its server")
        _wait_for(lambda: all((folder / f"{n}.log").is_file() and (folder / f"{n}.log").read_text() for n in "ab"),
                  "the keys")
    finally:
        proc.send_signal(signal.SIGTERM)  # passed on to the daemons
        returncode = proc.wait(timeout=60)
    assert proc.stdout is not None
    return Served(folder, returncode, proc.stderr.read(), [json.loads(line) for line in proc.stdout.read().splitlines()])


def unused_port() -> int:
    """A free loopback port, closed again (nothing listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_forked_daemons_make_different_keys_each_in_its_own_state_dir(served: Served) -> None:
    keys = {}
    for name in ("a", "b"):
        match = KEY_LINE.search(served.log(name))
        assert match is not None, served.log(name)
        assert match.group(2) == str(served.folder / name)
        keys[name] = match.group(1)
        assert (served.folder / name).is_dir()
    assert keys["a"] != keys["b"]
    assert [s["log"] for s in served.started] == [str(served.folder / f"{n}.log") for n in ("a", "b", "bad", "waiting")]
    assert len({s["pid"] for s in served.started}) == 4


def test_a_stop_reaches_the_daemons_and_the_first_failure_is_the_exit_status(served: Served) -> None:
    assert "received SIGTERM" in served.log("waiting") and "stopped" in served.log("waiting")
    assert "--timeout must be between 10 and 300" in served.log("bad")
    assert served.returncode == 2  # the refused daemon's status (the stopped one exited 0)
    assert re.search(r"daemon \d+ exited with status 2 \(its log: .*bad\.log\)", served.stderr)
    assert "error: request line 3 refused: a request line is not JSON" in served.stderr


def test_a_process_with_threads_is_not_forked(tmp_path: Path) -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    thread.start()
    try:
        with pytest.raises(ForkRefused, match="threads: forking it is not safe"):
            ForkServer().fork(DaemonRequest(("--print-verify-key",), tmp_path / "x.log"))
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "not JSON"),
    ('["--server-url"]', "one JSON object"),
    ('{"argv": ["a"], "log": "x", "env": {}}', "one JSON object"),
    ('{"argv": "a b", "log": "x"}', "list of strings"),
    ('{"argv": ["a"], "log": ""}', "file path"),
])
def test_malformed_requests_are_refused(line: str, message: str) -> None:
    with pytest.raises(ForkRefused, match=message):
        DaemonRequest.from_line(line)


def test_a_request_survives_its_line() -> None:
    request = DaemonRequest(("--server-url", "https://h:1", "--client-id", "x y"), Path("/tmp/some log"))
    assert DaemonRequest.from_line(request.to_line()) == request
