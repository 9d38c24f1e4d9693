"""The simulation's test-set evaluation: sliced forward passes and per-batch scores give the numbers of
``LocalTrainer.evaluate`` (the evaluator before it), in the driver and split across the worker pool."""

from __future__ import annotations

import pytest
import torch

from fl_common.config import config_from_dict
from fl_common.models import model_from_config
from fl_common.training import LocalTrainer
from fl_server.simulation import Simulation, evaluation
from fl_server.simulation.executor import ProcessPoolExecutor

SYNTH = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 32, "num_clients": 8, "client_selection_ratio": 0.5,
         "num_rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "max_train_samples": 800,
         "max_test_samples": 200, "compression": False, "seed": 3, "data_distribution": "dirichlet",
         "differential_privacy": False, "secure_aggregation": False}


def test_batch_ranges_cover_the_rows_in_batches() -> None:
    assert evaluation.batch_ranges(300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert evaluation.batch_ranges(0, 10) == []
    with pytest.raises(ValueError, match="batch_size"):
        evaluation.batch_ranges(10, 0)


@pytest.mark.parametrize("batch_size", [1000, 64])
def test_sliced_evaluation_equals_the_trainers_whole_batches(batch_size: int) -> None:
    """The reference CNN on 160 images: one batch of two slices (128 + 32), and batches smaller than a slice."""
    cfg = config_from_dict({"dataset": "fashion_mnist", "model_type": "cnn", "seed": 1})
    trainer = LocalTrainer(model_from_config(cfg, (1, 28, 28), 10))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(160, 1, 28, 28, generator=gen), torch.randint(0, 10, (160,), generator=gen)
    want = trainer.evaluate(None, x, y, batch_size)
    got = evaluation.evaluate(trainer.model, x, y, batch_size)
    assert (got.accuracy, got.num_samples) == (want.accuracy, want.num_samples)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    scores = evaluation.score_batches(trainer.model, x, y, batch_size)
    assert len(scores) == len(evaluation.batch_ranges(160, batch_size))
    assert evaluation.combine(scores, 160) == got  # per-batch scores summed in order: the same result


def test_the_worker_pool_scores_the_test_set_as_the_driver_does() -> None:
    """Between rounds the pool's workers split the test set's batches; the result is the driver's serial pass."""
    with Simulation({**SYNTH, "workers": 2, "eval_batch_size": 64}, progress=False) as sim:  # 200 rows: 4 batches
        history = sim.train()
        vector = sim.coordinator.global_vector.clone()
        assert isinstance(sim.executor(), ProcessPoolExecutor)  # a real pool, not the in-process executor
        in_workers = sim.evaluate_vector(vector)
        serial = sim.evaluator_trainer.evaluate(vector, sim.test_set.x, sim.test_set.y, 64)
        assert history[-1].test_accuracy == in_workers.accuracy
    assert (in_workers.accuracy, in_workers.num_samples) == (serial.accuracy, serial.num_samples)
    assert in_workers.loss == pytest.approx(serial.loss, rel=1e-6)
