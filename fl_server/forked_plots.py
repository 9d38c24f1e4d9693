"""Draw a run report's plots in forked child processes while the caller goes on with its own work.

Why: at the end of a simulation the plots were the critical path of the end of the run (the
reference speed run: ~1.2 s of the ~1.9 s after its last round, 90 % of it matplotlib's import and
three figures drawn one after the other on one core while the other core idled). Here one child
process imports matplotlib once, then forks a helper per further core, and the plots are drawn
side by side (copy-on-write: the helpers share the imported modules) while the parent writes the
model and stops its worker pool. The parent then waits (:meth:`ForkedPlots.wait`) before it writes
the report that names the plots, so the report never names a plot that is not complete.

What a plot costs or fails with does not change: each plot is the same function, writing its PNG
with the same atomic write; a plot that raises is reported back as ``"Type: message"`` and left out,
as the serial loop leaves it out. Children end with ``os._exit`` (no atexit handlers, no flushing of
the parent's buffers), close every inherited descriptor but the result pipe and stdio, so they
hold none of the parent's pipes (a worker pool waiting for its pipes to close is not kept waiting),
and write warnings through new stdio streams, not the parent's (whose locks another thread may have
held when it forked). If a child still hangs or dies, :meth:`ForkedPlots.wait` stops it after
``timeout`` seconds and reports its plots as not drawn: the report is written without them.

Only where ``os.fork`` exists; elsewhere (and for fewer than two plots) the caller draws in process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FORK_AVAILABLE", "PLOT_MODULES", "PLOT_TIMEOUT_SECONDS", "ForkedPlots", "PlotJob", "PlotOutcome", "WarmRenderer",
           "start_forked_plots", "start_warm_renderer"]

#: whether this platform can fork (POSIX); without it plots are drawn in process
FORK_AVAILABLE = hasattr(os, "fork")
#: how long the parent waits for all plots before it stops the children and leaves the missing ones out
PLOT_TIMEOUT_SECONDS = 300.0
#: at most this many processes draw at once (the renderer and its helpers)
MAX_PROCESSES = 4
#: an error message sent back is cut to this many characters (one pipe write stays below PIPE_BUF)
MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class PlotJob:
    """One plot: the file name it writes in the run folder and the function that draws it to a path."""

    name: str
    draw: Callable[[Path], None]


@dataclass(frozen=True)
class PlotOutcome:
    """What became of one plot: ``error`` is None when its file was written, else ``"Type: message"``."""

    name: str
    error: str | None


#: what every plot needs, imported once by the renderer before it forks its helpers (they share it)
PLOT_MODULES = ("numpy", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.collections")


def _close_inherited(*keep: int) -> None:
    """Close the descriptors the child inherited (all but stdio and ``keep``)."""
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        limit = 4096
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(limit, low + 1))


def _fresh_stdio() -> None:
    """New text streams on fds 1 and 2 for the child: a warning a plot prints must not wait for a stream lock
    that another thread of the parent held at the moment of the fork (only the forking thread is copied)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            setattr(sys, name, open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False))  # noqa: SIM115
        except OSError:
            setattr(sys, name, None)


def _send(fd: int, message: dict[str, object]) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode("utf-8"))


def _draw_share(jobs: Sequence[PlotJob], run_dir: Path, fd: int) -> None:
    for job in jobs:
        try:
            job.draw(run_dir / job.name)
        except Exception as exc:  # reported back and left out, as in the serial loop
            _send(fd, {"name": job.name, "error": f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]})
        else:
            _send(fd, {"name": job.name, "error": None})


def _renderer(jobs: Sequence[PlotJob], run_dir: Path, fd: int, processes: int, preload: Sequence[str]) -> None:
    """The child: import ``preload``, fork helpers, each draws every ``processes``-th plot; reap the helpers."""
    for module in preload:
        importlib.import_module(module)
    helpers: list[int] = []
    for k in range(1, processes):
        try:
            pid = os.fork()
        except OSError:
            break  # no more processes: the renderer draws what would have been theirs
        if pid == 0:
            code = 1
            try:
                _send(fd, {"pid": os.getpid()})
                _draw_share(jobs[k::processes], run_dir, fd)
                code = 0
            finally:
                os._exit(code)
        helpers.append(pid)
    mine = list(jobs[0::processes])
    for k in range(len(helpers) + 1, processes):  # the shares of helpers that could not be forked
        mine += jobs[k::processes]
    _draw_share(mine, run_dir, fd)
    for pid in helpers:
        os.waitpid(pid, 0)


@dataclass
class ForkedPlots:
    """Plots being drawn by child processes; :meth:`wait` collects what became of each."""

    jobs: Sequence[PlotJob]
    pid: int
    fd: int
    started: float
    timeout: float
    _outcomes: list[PlotOutcome] | None = field(default=None, repr=False)

    def wait(self) -> list[PlotOutcome]:
        """Wait for every plot (at most ``timeout`` seconds from the start); one outcome per job, in job order.

        A plot not reported by then (a child that hung or died) is stopped and reported as not drawn."""
        if self._outcomes is not None:
            return self._outcomes
        results: dict[str, str | None] = {}
        pids = {self.pid}
        buf = b""
        deadline = self.started + self.timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ready, _, _ = select.select([self.fd], [], [], remaining)
                if not ready:
                    continue
                chunk = os.read(self.fd, 65536)
                if not chunk:  # every child has closed its end: all are done
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue  # (cannot happen: each line is one write of one JSON object)
                    if "pid" in message:
                        pids.add(int(message["pid"]))
                    else:
                        results[str(message["name"])] = message["error"]
        finally:
            os.close(self.fd)
        try:
            if len(results) < len(self.jobs) and os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                # out of time with the renderer still running: stop it and its helpers (it reaps them, so
                # while it runs their process ids are still theirs)
                for pid in [*sorted(pids - {self.pid}), self.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # already reaped
        missing = f"not drawn: its process ended or took longer than {self.timeout:g} s"
        self._outcomes = [PlotOutcome(job.name, results.get(job.name, missing)) for job in self.jobs]
        return self._outcomes


def start_forked_plots(jobs: Sequence[PlotJob], run_dir: Path, *, processes: int | None = None,
                       timeout: float = PLOT_TIMEOUT_SECONDS, preload: Sequence[str] = PLOT_MODULES) -> ForkedPlots | None:
    """Start drawing ``jobs`` into ``run_dir`` in child processes and return at once; None where this platform
    cannot fork or there are fewer than two plots (the caller then draws them itself).

    ``processes``: how many draw at once (default: one per plot, at most MAX_PROCESSES); ``preload``: modules
    the renderer imports before it forks its helpers."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not FORK_AVAILABLE or len(jobs) < 2:
        return None
    count = _process_count(processes, len(jobs))
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = _fork_child(lambda: _renderer(jobs, Path(run_dir), write_fd, count, preload), keep=(write_fd,), close=(read_fd,))
    os.close(write_fd)
    return ForkedPlots(jobs=list(jobs), pid=pid, fd=read_fd, started=started, timeout=timeout)


def _process_count(processes: int | None, plots: int) -> int:
    """One process per plot (the scheduler shares the cores; a core never idles while a plot waits), at most
    ``processes`` (default MAX_PROCESSES), at least one."""
    return max(1, min(MAX_PROCESSES if processes is None else processes, plots))


def _fork_child(body: Callable[[], None], *, keep: tuple[int, ...], close: tuple[int, ...]) -> int:
    """Fork; the child closes ``close`` and every other inherited descriptor but stdio and ``keep``, gets fresh stdio
    streams, runs ``body`` and ends with ``os._exit`` whatever happened (it never returns into the parent's code).
    Returns the child's pid to the parent."""
    for stream in (sys.stdout, sys.stderr):  # the child must not carry (and never writes) the parent's buffered text
        if stream is not None:
            stream.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in close:
                os.close(fd)
            _close_inherited(*keep)
            _fresh_stdio()
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


@dataclass
class WarmRenderer:
    """A renderer forked ahead of the end of a run (:func:`start_warm_renderer`): it has imported the plotting
    modules at the lowest CPU priority meanwhile, and waits to be told which plots to draw (:meth:`draw`) or to go
    (:meth:`cancel`, or the parent's exit: the end of its pipe).

    Why: matplotlib's import (~0.45 s on the reference machine) was the largest piece left on the end of a run's
    critical path; done while the run's last rounds still train, at nice 19, it takes the cycles the training
    leaves idle (the driver's aggregation, a round's straggler tail) rather than the training's."""

    pid: int
    go_fd: int
    result_fd: int
    timeout: float
    _used: bool = field(default=False, repr=False)

    def draw(self, jobs: Sequence[PlotJob]) -> ForkedPlots | None:
        """Draw ``jobs`` (by name: the renderer builds its own from the run folder) and return them being drawn;
        None when the renderer is no longer there (killed meanwhile, say): the caller draws them another way."""
        if self._used:
            raise RuntimeError("this renderer was already used")
        try:
            gone = os.waitpid(self.pid, os.WNOHANG) != (0, 0)
        except ChildProcessError:
            gone = True
        if gone:
            self.cancel()
            return None
        self._used = True
        names = json.dumps([job.name for job in jobs]).encode("utf-8") + b"\n"
        try:
            os.write(self.go_fd, names)  # a short message: one write (PIPE_BUF) on a pipe nobody else writes
        except OSError:
            pass  # the renderer is gone: wait() reports its plots as not drawn
        finally:
            os.close(self.go_fd)
        return ForkedPlots(jobs=list(jobs), pid=self.pid, fd=self.result_fd, started=time.monotonic(), timeout=self.timeout)

    def cancel(self) -> None:
        """Let the renderer go without drawing, and reap it."""
        if self._used:
            return
        self._used = True
        for fd in (self.go_fd, self.result_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ProcessLookupError):  # it may still be importing: nothing of it is worth waiting for
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _read_names(fd: int) -> list[str] | None:
    """The plot names the parent sends, or None when it closed the pipe without any (cancelled, or gone)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buf += chunk
    return [str(name) for name in json.loads(buf)]


def _warm_renderer(make_jobs: Callable[[], Sequence[PlotJob]], run_dir: Path, go_fd: int, fd: int,
                   processes: int | None, preload: Sequence[str]) -> None:
    with contextlib.suppress(OSError):
        os.nice(19)
    for module in preload:
        importlib.import_module(module)
    names = _read_names(go_fd)
    if names is None:
        return
    try:
        built = {job.name: job for job in make_jobs()}
        failure = None
    except Exception as exc:  # every asked plot is reported as failed, as a plot that raises
        built, failure = {}, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    jobs = []
    for name in names:
        if name in built:
            jobs.append(built[name])
        else:
            _send(fd, {"name": name, "error": failure or "the renderer found no such plot in the run folder"})
    _renderer(jobs, run_dir, fd, _process_count(processes, len(jobs)), ())


def start_warm_renderer(make_jobs: Callable[[], Sequence[PlotJob]], run_dir: Path, *, processes: int | None = None,
                        timeout: float = PLOT_TIMEOUT_SECONDS, preload: Sequence[str] = PLOT_MODULES) -> WarmRenderer | None:
    """Fork a renderer now that imports ``preload`` and later draws the plots :meth:`WarmRenderer.draw` names,
    from ``make_jobs()`` called in the renderer once told to draw (the run folder's files as they are then: a
    plot job built now would hold the data of now). None where this platform cannot fork."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not FORK_AVAILABLE:
        return None
    go_read, go_write = os.pipe()
    result_read, result_write = os.pipe()
    pid = _fork_child(lambda: _warm_renderer(make_jobs, Path(run_dir), go_read, result_write, processes, preload),
                      keep=(go_read, result_write), close=(go_write, result_read))
    os.close(go_read)
    os.close(result_write)
    return WarmRenderer(pid=pid, go_fd=go_write, result_fd=result_read, timeout=timeout)
