"""Where and how the simulation executes: per-client and test-set evaluation in the workers, when it runs at all
(client_evaluation), the device setting, and the backend key's refusals."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fl_common.config import ConfigError, config_from_dict
from fl_common.training import resolve_device
from fl_server.simulation import Simulation
from fl_server.simulation.executor import ProcessPoolExecutor

SYNTH = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 32, "num_clients": 8, "client_selection_ratio": 0.5,
         "num_rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "max_train_samples": 800,
         "max_test_samples": 200, "compression": False, "seed": 3, "data_distribution": "dirichlet",
         "differential_privacy": False, "secure_aggregation": False}


def test_per_client_and_test_set_evaluation_in_the_workers_equal_the_drivers() -> None:
    """The pool evaluates every client where it trains them, and between rounds splits the test set's batches
    between its workers (simulation/evaluation.py); the numbers are the driver's own serial pass."""
    with Simulation({**SYNTH, "workers": 2, "eval_batch_size": 64}, progress=False) as pool:  # 200 test rows: 4 batches
        history = pool.train()
        vector = pool.coordinator.global_vector.clone()
        in_workers = pool.evaluate_clients()
        assert isinstance(pool.executor(), ProcessPoolExecutor)  # a real pool, not the in-process executor
        test_in_workers = pool.evaluate_vector(vector)
    serial = pool.evaluator_trainer.evaluate(vector, pool.test_set.x, pool.test_set.y, 64)
    assert history[-1].test_accuracy == test_in_workers.accuracy == serial.accuracy
    assert (test_in_workers.num_samples, test_in_workers.loss) == (200, pytest.approx(serial.loss, rel=1e-6))
    assert [r["client"] for r in in_workers] == list(range(8))
    x, y = pool.train_set.x, pool.train_set.y
    for row, part in zip(in_workers, pool.partitions, strict=True):
        ix = torch.as_tensor(part, dtype=torch.int64)
        direct = pool.evaluator_trainer.evaluate(vector, x.index_select(0, ix), y.index_select(0, ix))
        assert (row["accuracy"], row["num_samples"]) == (direct.accuracy, len(part))
        assert row["loss"] == pytest.approx(direct.loss, rel=1e-5)


@pytest.mark.parametrize(("setting", "measured"), [("auto", False), ("on", True)])
def test_client_evaluation_runs_only_where_asked(tmp_path: Path, setting: str, measured: bool) -> None:
    with Simulation({**SYNTH, "workers": 0, "client_evaluation": setting}, tmp_path / "run", progress=False) as sim:
        sim.train()
        summary = sim.save_results()
    assert ("client_accuracy" in summary) is measured
    assert ("client_accuracy" in json.loads((tmp_path / "run" / "summary.json").read_text())) is measured
    assert (tmp_path / "run" / "client_accuracy.csv").is_file() is measured
    assert (tmp_path / "run" / "participation.csv").is_file() and (tmp_path / "run" / "report.html").is_file()
    if measured:
        with open(tmp_path / "run" / "client_accuracy.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == 8


def test_client_evaluation_auto_measures_held_out_parts_and_qfedavg() -> None:
    for extra in ({"client_test_fraction": 0.25}, {"aggregation_method": "qfedavg"}):
        with Simulation({**SYNTH, "workers": 0, "num_rounds": 1, **extra}, progress=False) as sim:
            assert sim.wants_client_evaluation(), extra
    with Simulation({**SYNTH, "workers": 0, "num_rounds": 1, "client_evaluation": "off",
                     "client_test_fraction": 0.25}, progress=False) as sim:
        assert not sim.wants_client_evaluation()


def test_device_spellings_and_refusals() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for key_value in ("gpu", "cuda:x", "CPU", "cuda:"):
        with pytest.raises(ConfigError, match="config key 'device'"):
            config_from_dict({"device": key_value})
    assert config_from_dict({"device": "cuda:1"}).device == "cuda:1"  # the spelling is valid; availability is checked at start
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda:0")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            Simulation({**SYNTH, "device": "cuda"}, progress=False)


def test_ray_keys_need_backend_ray() -> None:
    with pytest.raises(ConfigError, match="'ray_num_cpus'.*backend is not 'ray'"):
        config_from_dict({"ray_num_cpus": 2.0})
    with pytest.raises(ConfigError, match="'ray_address'"):
        config_from_dict({"ray_address": "127.0.0.1:6379"})


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed: the refusal cannot show")
def test_backend_ray_without_ray_is_refused_with_the_install_command() -> None:
    with pytest.raises(ConfigError, match=r"pip install"):
        config_from_dict({"backend": "ray"})


def test_topk_error_feedback_lives_in_the_run_folder_and_resumes_exactly(tmp_path: Path) -> None:
    """Residuals are kept per client on disk (not in memory) and checkpointed: 1 + 2 rounds = 3 rounds."""
    cfg = {**SYNTH, "workers": 0, "num_rounds": 3, "compression": True, "codec": "topk:0.1"}
    with Simulation(cfg, tmp_path / "full", progress=False) as full:
        full.train()
        want = full.coordinator.global_vector.clone()
    with Simulation(cfg, tmp_path / "part", progress=False) as first:
        first.train(rounds=1)
    with Simulation(cfg, tmp_path / "part", resume=True, progress=False) as second:
        second.train()
        assert torch.equal(second.coordinator.global_vector, want)
    files = sorted(p.name for p in (tmp_path / "full" / "client_state" / "error_feedback").iterdir())
    assert files and all(name.startswith("client") and name.endswith(".pt") for name in files)
    assert len(files) == len({name.split("-")[0] for name in files})  # one current version per client, older ones pruned
