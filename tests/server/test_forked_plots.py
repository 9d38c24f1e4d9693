"""A report's plots drawn in forked processes (fl_server/forked_plots.py, reports.start_report(parallel=True)):
the same files as the serial report, a failing plot left out with the same warning, a child that dies or
hangs reported as not drawn without hanging the caller."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from fl_server import reports
from fl_server.forked_plots import FORK_AVAILABLE, PlotJob, start_forked_plots, start_warm_renderer

pytestmark = pytest.mark.skipif(not FORK_AVAILABLE, reason="needs os.fork")

HISTORY = ("round,test_accuracy,test_loss,train_loss,clients,seconds,bytes,epsilon\n"
           "1,0.41,1.73,2.01,5,0.8,2048,0.41\n2,,,1.50,5,0.8,2048,0.62\n3,0.69,0.98,1.10,4,0.8,2048,0.78\n")


def _run_folder(parent: Path) -> Path:
    """A run folder with every input of the report: history with epsilon, labels, participation, client accuracy."""
    run = parent / "run"
    run.mkdir(parents=True)
    (run / "history.csv").write_text(HISTORY)
    (run / "summary.json").write_text(json.dumps({
        "mode": "federated", "rounds_completed": 3, "final_accuracy": 0.69, "best_accuracy": 0.69,
        "privacy": {"differential_privacy": True, "epsilon_spent": 0.78, "epsilon_budget": 1.0, "delta": 1e-5},
        "config": {"num_clients": 12, "differential_privacy": True, "dp_epsilon": 1.0}}))
    (run / "label_histograms.csv").write_text("client,class_0,class_1,total\n" +
                                               "".join(f"{c},{c % 5},{4 - c % 5},4\n" for c in range(12)))
    reports.write_client_tables(run, participation=[{"client": c, "selected": 2, "participated": 1 + c % 2,
                                                     "dropped": 1 - c % 2} for c in range(12)],
                                accuracy=[{"client": c, "accuracy": 0.5 + c / 40, "measure": "training data"}
                                          for c in range(12)])
    return run


def _contents(run: Path, files: dict[str, Path]) -> dict[str, bytes]:
    """Each file's bytes, the run folder's own path (which the compliance record names) replaced; compliance.json
    aside (it records when it was generated)."""
    return {name: path.read_bytes().replace(str(run).encode(), b"RUN") for name, path in files.items()
            if name != "compliance.json"}


def test_parallel_report_writes_the_serial_reports_files(tmp_path: Path) -> None:
    serial_dir, parallel_dir = _run_folder(tmp_path / "a"), _run_folder(tmp_path / "b")
    serial = reports.write_report(serial_dir)
    pending = reports.start_report(parallel_dir, parallel=True)
    parallel = pending.finish()
    assert pending.finish() is parallel  # finishing twice returns the same files, draws nothing again
    pngs = {reports.ACCURACY_LOSS_PNG, reports.PRIVACY_BUDGET_PNG, reports.CLIENT_DATA_PNG, reports.PARTICIPATION_PNG,
            reports.CLIENT_ACCURACY_PNG}
    assert pngs <= set(serial)
    assert sorted(parallel) == sorted(serial)
    # every plot byte for byte, and the report text (which names the plots) the same
    assert _contents(parallel_dir, parallel) == _contents(serial_dir, serial)
    assert not [p.name for p in parallel_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_plot_that_fails_in_a_child_is_left_out_with_the_in_process_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(rows: list[dict[str, str]], path: Path) -> None:  # a real failure inside the plot's own code
        raise ValueError("no participation to draw")

    monkeypatch.setattr(reports, "_plot_participation", broken)  # the forked children inherit it
    run = _run_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fl_server.reports"):
        files = reports.start_report(run, parallel=True).finish()
    assert reports.PARTICIPATION_PNG not in files and not (run / reports.PARTICIPATION_PNG).exists()
    assert reports.ACCURACY_LOSS_PNG in files and (run / reports.ACCURACY_LOSS_PNG).is_file()
    assert reports.PARTICIPATION_PNG not in (run / reports.REPORT_MD).read_text()
    # the words write_report logs for a plot that raises in process
    assert [r.getMessage() for r in caplog.records] == [
        f"could not draw {reports.PARTICIPATION_PNG} in {run}: ValueError: no participation to draw"]


def _writes(text: str):
    def draw(path: Path) -> None:
        path.write_text(text)
    return draw


def _dies(path: Path) -> None:
    os._exit(3)  # the drawing process ends without a word


def _hangs(path: Path) -> None:
    time.sleep(600)


def test_a_child_that_dies_or_hangs_is_reported_not_drawn_and_the_others_are_kept(tmp_path: Path) -> None:
    jobs = [PlotJob("a.txt", _writes("a")), PlotJob("dies.txt", _dies), PlotJob("b.txt", _writes("b")),
            PlotJob("hangs.txt", _hangs)]
    started = time.monotonic()
    forked = start_forked_plots(jobs, tmp_path, timeout=1.5, preload=())  # no plot here needs matplotlib
    assert forked is not None
    outcomes = forked.wait()
    assert time.monotonic() - started < 300  # stopped at its timeout, not after the 600 s sleep
    by_name = {o.name: o.error for o in outcomes}
    assert [o.name for o in outcomes] == [j.name for j in jobs]
    assert by_name["a.txt"] is None and by_name["b.txt"] is None
    assert (tmp_path / "a.txt").read_text() == "a" and (tmp_path / "b.txt").read_text() == "b"
    assert by_name["dies.txt"] is not None and by_name["dies.txt"].startswith("not drawn")
    assert by_name["hangs.txt"] is not None and by_name["hangs.txt"].startswith("not drawn")
    assert forked.wait() is outcomes


def test_fewer_than_two_plots_are_left_to_the_caller(tmp_path: Path) -> None:
    assert start_forked_plots([PlotJob("a.txt", _writes("a"))], tmp_path) is None
    with pytest.raises(ValueError, match="timeout"):
        start_forked_plots([PlotJob("a.txt", _writes("a")), PlotJob("b.txt", _writes("b"))], tmp_path, timeout=0)


LAST_ROUND = "4,0.72,0.91,1.02,5,0.8,2048,0.83\n"


def test_a_warm_renderer_forked_before_the_end_draws_the_run_folder_as_it_is_at_the_end(tmp_path: Path) -> None:
    serial_dir, warm_dir = _run_folder(tmp_path / "a"), _run_folder(tmp_path / "b")
    warm = start_warm_renderer(lambda: reports.plot_jobs(warm_dir), warm_dir)
    assert warm is not None
    for run in (serial_dir, warm_dir):  # the run goes on after the fork: one more round in the history
        with (run / "history.csv").open("a") as f:
            f.write(LAST_ROUND)
    serial = reports.write_report(serial_dir)
    warmed = reports.start_report(warm_dir, parallel=True, warm=warm).finish()
    assert sorted(warmed) == sorted(serial)
    assert _contents(warm_dir, warmed) == _contents(serial_dir, serial)  # the fourth round is in the plots too
    with pytest.raises(ChildProcessError):  # the renderer was reaped
        os.waitpid(warm.pid, os.WNOHANG)


def test_a_warm_renderer_that_is_gone_before_the_end_leaves_the_plots_to_a_fresh_fork(tmp_path: Path) -> None:
    serial_dir, warm_dir = _run_folder(tmp_path / "a"), _run_folder(tmp_path / "b")
    warm = start_warm_renderer(lambda: reports.plot_jobs(warm_dir), warm_dir, preload=())
    assert warm is not None
    os.kill(warm.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer, while the run still trained
    os.waitpid(warm.pid, 0)
    serial = reports.write_report(serial_dir)
    files = reports.start_report(warm_dir, parallel=True, warm=warm).finish()
    assert _contents(warm_dir, files) == _contents(serial_dir, serial)  # every plot drawn all the same


def test_a_warm_renderer_let_go_is_reaped_and_one_that_cannot_build_its_plots_says_so(tmp_path: Path) -> None:
    unused = start_warm_renderer(lambda: [PlotJob("a.txt", _writes("a"))], tmp_path, preload=())
    assert unused is not None
    unused.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(unused.pid, os.WNOHANG)
    assert not (tmp_path / "a.txt").exists()

    def no_run_folder() -> list[PlotJob]:
        raise FileNotFoundError("history.csv is gone")

    broken = start_warm_renderer(no_run_folder, tmp_path, preload=(), timeout=60)
    assert broken is not None
    outcomes = broken.draw([PlotJob("a.txt", _writes("a")), PlotJob("b.txt", _writes("b"))]).wait()
    assert [(o.name, o.error) for o in outcomes] == [("a.txt", "FileNotFoundError: history.csv is gone"),
                                                     ("b.txt", "FileNotFoundError: history.csv is gone")]
    with pytest.raises(RuntimeError, match="already used"):
        broken.draw([])
