"""The simulation driver end to end on real Fashion-MNIST subsets with the real CNN."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from fl_common.config import config_from_dict
from fl_server.simulation import CentralizedBaseline, Simulation


def _history_rows(path: Path) -> list[dict[str, str]]:
    with open(path / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _comparable(rows: list[dict[str, str]]) -> list[tuple]:
    """Everything but wall time, which legitimately differs between runs."""
    return [tuple(v for k, v in row.items() if k != "seconds") for row in rows]


def test_three_rounds_learn_well_above_chance(small_config: dict, tmp_path: Path) -> None:
    with Simulation(small_config, tmp_path / "run", progress=False) as sim:
        history = sim.train()
        sim.save_results()
    accs = [r.test_accuracy for r in history]
    assert len(accs) == 3 and all(a is not None for a in accs)
    assert accs[-1] > 0.5, f"10 classes: chance is 0.1, got {accs}"
    assert history[-1].train_loss < history[0].train_loss
    assert all(r.clients == 5 for r in history)
    for name in ("history.csv", "summary.json", "config.yaml", "checkpoint.pt", "model.pt", "label_histograms.csv"):
        assert (tmp_path / "run" / name).is_file(), name
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["final_accuracy"] == pytest.approx(accs[-1])
    assert stored["config"]["num_clients"] == 10
    rows = _history_rows(tmp_path / "run")
    assert [float(r["test_accuracy"]) for r in rows] == pytest.approx(accs)
    assert list(rows[0]) == ["round", "test_accuracy", "test_loss", "train_loss", "clients", "seconds", "bytes", "epsilon"]
    # per-client label histograms: one row per client, covering the whole training subset
    with open(tmp_path / "run" / "label_histograms.csv") as f:
        hist = list(csv.DictReader(f))
    assert len(hist) == 10 and sum(int(r["total"]) for r in hist) == 2000
    # the saved model is a loadable state_dict of the configured model
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["classifier.3.weight"].shape == (10, 512)


def test_worker_pool_and_in_process_training_compute_the_same_run(small_config: dict, tmp_path: Path) -> None:
    cfg = {**small_config, "num_rounds": 2, "max_train_samples": 1000}
    torch.set_num_threads(1)  # same arithmetic as the single-threaded workers
    try:
        with Simulation({**cfg, "workers": 0}, progress=False) as seq:
            a = seq.train()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    with Simulation({**cfg, "workers": 2}, progress=False) as par:
        b = par.train()
    assert [(r.test_accuracy, r.test_loss, r.train_loss) for r in a] == [(r.test_accuracy, r.test_loss, r.train_loss) for r in b]


def test_resume_in_process_continues_identically(small_config: dict, tmp_path: Path) -> None:
    cfg = {**small_config, "workers": 0}
    with Simulation(cfg, tmp_path / "full", progress=False) as full:
        full.train()
    with Simulation(cfg, tmp_path / "part", progress=False) as first:
        first.train(rounds=1)
    with pytest.raises(Exception, match="--resume"):
        Simulation(cfg, tmp_path / "part", progress=False)
    with Simulation(cfg, tmp_path / "part", resume=True, progress=False) as second:
        assert second.coordinator.completed_rounds == 1
        second.train()
    assert _comparable(_history_rows(tmp_path / "part")) == _comparable(_history_rows(tmp_path / "full"))


def test_resume_refuses_a_changed_experiment(small_config: dict, tmp_path: Path) -> None:
    cfg = {**small_config, "workers": 0, "num_rounds": 1}
    with Simulation(cfg, tmp_path / "r", progress=False) as sim:
        sim.train()
    with pytest.raises(Exception, match="learning_rate"):
        Simulation({**cfg, "learning_rate": 0.01}, tmp_path / "r", resume=True, progress=False)
    with Simulation({**cfg, "num_rounds": 2}, tmp_path / "r", resume=True, progress=False) as longer:
        assert len(longer.train()) == 2


def test_killed_cli_run_resumes_to_the_uninterrupted_history(small_config: dict, tmp_path: Path) -> None:
    overrides = [f"--set={k}={v}" for k, v in {**small_config, "num_rounds": 4}.items()]
    cmd = [sys.executable, "-m", "fl_server", "simulate", "--no-progress", *overrides]
    subprocess.run([*cmd, "--output", str(tmp_path / "full")], check=True, capture_output=True, timeout=600)

    victim = subprocess.Popen([*cmd, "--output", str(tmp_path / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    history = tmp_path / "cut" / "history.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 2:  # header + round 1
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be interrupted"
    workers = psutil.Process(victim.pid).children(recursive=True)
    os.kill(victim.pid, signal.SIGKILL)  # only the driver: its worker processes must notice and exit
    victim.wait(timeout=30)
    _gone, alive = psutil.wait_procs(workers, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, "client workers outlived their killed driver"
    done = len(_history_rows(tmp_path / "cut"))
    assert 1 <= done < 4
    subprocess.run([*cmd, "--output", str(tmp_path / "cut"), "--resume"], check=True, capture_output=True, timeout=600)
    assert _comparable(_history_rows(tmp_path / "cut")) == _comparable(_history_rows(tmp_path / "full"))


def test_centralized_baseline_writes_the_same_files(small_config: dict, tmp_path: Path) -> None:
    base = CentralizedBaseline(config_from_dict({**small_config, "num_rounds": 2}), tmp_path / "c", progress=False)
    history = base.train()
    summary = base.save_results()
    assert summary["mode"] == "centralized" and len(history) == 2
    assert summary["samples_per_round"] == 5 * 1 * 200  # clients per round x epochs x mean client size
    assert history[-1].test_accuracy > 0.5
    assert list(_history_rows(tmp_path / "c")[0]) == ["round", "test_accuracy", "test_loss", "train_loss", "clients", "seconds", "bytes",
                                                      "epsilon"]


@pytest.mark.parametrize("codec", ["int8", "topk:0.05"])
def test_compression_in_simulation_uses_the_real_codec(small_config: dict, codec: str) -> None:
    cfg = {**small_config, "num_rounds": 2, "workers": 0, "max_train_samples": 1000}
    with Simulation(cfg, progress=False) as plain:
        plain_hist = plain.train()
        plain_model = plain.coordinator.global_vector
    with Simulation({**cfg, "compression": True, "codec": codec}, progress=False) as packed:
        packed_hist = packed.train()
        assert packed.summary()["codec"].startswith(codec)
        packed_model = packed.coordinator.global_vector
    numel = 1_663_370
    per_update_plain = (plain_hist[0].bytes - 5 * 4 * numel) / 5
    per_update_packed = (packed_hist[0].bytes - 5 * 4 * numel) / 5  # downloads stay float32
    assert per_update_plain == 4 * numel
    assert per_update_packed < per_update_plain / 3, "the codec's bytes must be what is counted"
    assert not torch.equal(packed_model, plain_model)  # the lossy codec really ran
    assert packed_hist[-1].test_accuracy > 0.3


def test_codec_in_workers_matches_codec_in_process(small_config: dict) -> None:
    cfg = {**small_config, "num_rounds": 1, "max_train_samples": 1000, "compression": True, "codec": "int8"}
    torch.set_num_threads(1)
    try:
        with Simulation({**cfg, "workers": 0}, progress=False) as seq:
            a = seq.train()
            va = seq.coordinator.global_vector
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    with Simulation({**cfg, "workers": 2}, progress=False) as par:
        b = par.train()
        vb = par.coordinator.global_vector
    assert torch.equal(va, vb) and a[0].bytes == b[0].bytes
