"""``python -m fl_client.forkserver``: many client daemons forked from one process that imported the client once.

Why: a daemon spends about 2.2 s of CPU importing torch and the client before it can register; the demo's ten
daemons on two cores took ~11 s of that before round 1 could open, and fifty separate processes each held
their own copy of the imported modules. This process imports the client once, then forks one daemon per
request: a fork costs milliseconds, and the children share the imported pages copy-on-write. ``python -m
fl_client`` stays the ordinary standalone daemon; this is for launchers that start many on one host (the demo,
fl_server/rest/demo.py; benchmarks/many_daemons.py).

Protocol: one JSON object per line on stdin, ``{"argv": [...fl_client arguments...], "log": "PATH"}``; each
line forks a daemon that runs ``fl_client.__main__.main(argv)`` with its stdout and stderr appended to PATH,
and this process writes ``{"pid": N, "log": "PATH"}`` on its stdout (a launcher may signal one daemon by its pid).
End of input means no more daemons; this process then waits for its children and exits 0 when every one
exited 0, else with the first other status (a signal N counts as 128 + N), or 2 when a request line was refused
(malformed: said on stderr with its line number and skipped; the daemons already started keep running). SIGTERM or SIGINT is passed on to
every child; children still running ``--stop-timeout`` seconds later are killed. The children are started
with this process's environment (give it the enrollment token, nothing of the server's).

Fork safety:

- **No threads in the parent.** Only imports run before a fork: no tensor operation (which could start
  torch's intra-op thread pool: a forked child of a process with a live OpenMP pool can hang), no HTTP, no
  logging handlers. Importing numpy and scipy starts OpenBLAS's worker threads, so this process sets
  ``OPENBLAS_NUM_THREADS=1`` before it imports anything (the daemons inherit it: their numpy work is
  partitions, histograms and vector adds, no BLAS; torch's threads are set by each daemon's ``--threads``).
  The parent checks that it is single-threaded (``/proc/self/task``) before each fork and refuses otherwise.
- **Nothing security-relevant is shared.** The parent never registers, never loads or makes a signing key,
  never opens a connection. Every secret of a daemon is made after the fork, in the child: its long-term
  Ed25519 identity (``load_or_create_identity`` in its own state dir), its session keys (registration), and
  every secure round's key pairs and seeds; these come from the OS (``os.urandom``) or from OpenSSL, whose
  generator reseeds itself in a forked child. Python's ``random`` reseeds in a forked child by itself and
  numpy's global generator is reseeded here, so no generator state is shared either (tests/client/
  test_forkserver.py checks that two forked daemons hold different keys).
- **What is shared** is read-only and public: the imported code and, when ``--warm DATASET`` is given, the
  page cache of the decoded dataset (fl_common/data/decoded_cache.py), decoded before the first fork.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

#: seconds between SIGTERM passed on to the children and SIGKILL for those still running
STOP_TIMEOUT = 15.0


class ForkRefused(RuntimeError):
    """Forking now would not be safe (the process has threads) or the request is malformed."""


@dataclass(frozen=True)
class DaemonRequest:
    """One daemon to fork: its ``python -m fl_client`` arguments and the file its output is appended to."""

    argv: tuple[str, ...]
    log: Path

    @classmethod
    def from_line(cls, line: str) -> DaemonRequest:
        try:
            doc: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ForkRefused(f"a request line is not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(doc, dict) or set(doc) != {"argv", "log"}:
            raise ForkRefused('a request is one JSON object {"argv": [...], "log": "PATH"} per line')
        argv, log = doc["argv"], doc["log"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ForkRefused('"argv" must be a list of strings')
        if not isinstance(log, str) or not log:
            raise ForkRefused('"log" must be a file path')
        return cls(tuple(argv), Path(log))

    def to_line(self) -> str:
        return json.dumps({"argv": list(self.argv), "log": str(self.log)}) + "\n"


def thread_count() -> int:
    """OS threads of this process (torch's pool included, which ``threading`` does not see)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: Python's own view
        import threading

        return threading.active_count()


def preload(warm_dataset: str | None = None, data_dir: str | None = None) -> None:
    """Import what every daemon imports (no code of it runs), and decode ``warm_dataset``'s training split into
    the decoded-data cache, so the children map it instead of decoding it each."""
    # torch.optim imports torch._dynamo (and sympy) when a process builds its first optimizer: 1.6 s of CPU in each
    # daemon's first round, paid once here instead (an import: no tensor operation, no thread)
    import torch._dynamo  # noqa: F401

    import fl_client.__main__
    import fl_client.daemon  # noqa: F401

    if warm_dataset is not None:
        from fl_common.data.datasets import DatasetUnavailable, warm_decoded_cache

        with contextlib.suppress(DatasetUnavailable):  # each daemon reports it with its own exit status
            warm_decoded_cache(warm_dataset, "train", data_dir)
    # the imported objects move to the collector's permanent generation: a child's collections then never write to
    # (and so never copy) the pages the parent's objects live in
    gc.freeze()


def _child(request: DaemonRequest) -> NoReturn:
    """In the forked child: run the daemon's CLI with its output in the request's log; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        request.log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(request.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # not the parent's request pipe
        os.close(null)
        import numpy as np

        np.random.seed()  # numpy's global generator is not reseeded by fork (the daemon does not use it; no copy shared)
        from fl_client.__main__ import main

        code = main(list(request.argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class ForkServer:
    """Forks daemons from this (single-threaded, pre-imported) process and reaps them."""

    def __init__(self, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.children: dict[int, DaemonRequest] = {}
        #: pid -> (its request, its exit status: a signal N as 128 + N) of every reaped child
        self.finished: dict[int, tuple[DaemonRequest, int]] = {}
        self.stop_timeout = stop_timeout
        self._stopping_since: float | None = None

    def fork(self, request: DaemonRequest) -> int:
        """Start one daemon; its pid."""
        threads = thread_count()
        if threads != 1:
            raise ForkRefused(f"this process runs {threads} threads: forking it is not safe (was torch used before the fork?)")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        self.children[pid] = request
        return pid

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Pass the stop on to every running child (once); :meth:`wait_all` kills those still up after the timeout."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reaped(self, pid: int, status: int) -> None:
        request = self.children.pop(pid, None)
        if request is not None:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            self.finished[pid] = (request, code)

    def wait_all(self, poll: float = 0.2) -> int:
        """Reap every child; 0 when all exited 0, else the first other status (a signal N as 128 + N)."""
        while self.children:
            if self._stopping_since is not None and time.monotonic() - self._stopping_since > self.stop_timeout:
                for pid in list(self.children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(poll)
                continue
            self._reaped(pid, status)
        bad = [code for _, code in self.finished.values() if code != 0]
        return bad[0] if bad else 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m fl_client.forkserver",
                description="fork client daemons from one pre-imported process (requests as JSON lines on stdin)")
    p.add_argument("--warm", metavar="DATASET", help="decode this dataset's training split into the cache before forking")
    p.add_argument("--data-dir", help="where the dataset files are (as the daemons' --data-dir)")
    p.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT,
                   help="seconds the daemons get after SIGTERM before they are killed")
    args = p.parse_args(argv)
    if not 0 < args.stop_timeout <= 3600:
        p.error("--stop-timeout must be in (0, 3600] seconds")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy is imported: no BLAS worker threads to fork
    server = ForkServer(args.stop_timeout)
    stop_requested = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True
        server.stop(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    preload(args.warm, args.data_dir)
    refused_lines = 0
    try:
        for number, line in enumerate(sys.stdin, start=1):
            if stop_requested:
                break
            if not line.strip():
                continue
            try:
                request = DaemonRequest.from_line(line)
            except ForkRefused as exc:  # one bad line costs its own daemon, not the ones already running
                refused_lines += 1
                print(f"error: request line {number} refused: {exc}", file=sys.stderr, flush=True)
                continue
            pid = server.fork(request)
            print(json.dumps({"pid": pid, "log": str(request.log)}), flush=True)  # for a launcher that signals one
    except ForkRefused as exc:  # forking is no longer safe: nothing more is started, the running daemons are stopped
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        server.wait_all()
        return 2
    code = server.wait_all()
    for pid, (request, status) in server.finished.items():
        if status != 0:
            print(f"daemon {pid} exited with status {status} (its log: {request.log})", file=sys.stderr)
    return code or (2 if refused_lines else 0)


if __name__ == "__main__":
    sys.exit(main())
