"""The simulation's test-set evaluation: sliced forward passes and per-batch scores give the numbers of
``LocalTrainer.evaluate`` (the evaluator before it). The worker pool's split of the test set is checked in
test_simulation_execution.py, on the pool that test starts anyway."""

from __future__ import annotations

import pytest
import torch

from fl_common.config import config_from_dict
from fl_common.models import model_from_config
from fl_common.training import LocalTrainer
from fl_server.simulation import evaluation


def test_batch_ranges_cover_the_rows_in_batches() -> None:
    assert evaluation.batch_ranges(300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert evaluation.batch_ranges(0, 10) == []
    with pytest.raises(ValueError, match="batch_size"):
        evaluation.batch_ranges(10, 0)


@pytest.mark.parametrize("batch_size", [1000, 64])
def test_sliced_evaluation_equals_the_trainers_whole_batches(batch_size: int) -> None:
    """The reference CNN on 160 images: one batch of three slices (64 + 64 + 32), and batches of one slice."""
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

