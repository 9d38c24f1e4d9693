"""What a private client update carries besides its noised delta: only what the accountant covers."""

from __future__ import annotations

import torch
from torch import nn

from fl_common.protocol import TrainInstructions
from fl_common.training import LocalTrainer

#: metrics a DP update may carry: the plan (sample rate, steps) is data independent; the clip bit is
#: released under its own noise (adaptive clipping); nothing measured on the data or its timing
ALLOWED_UNDER_DP = {"steps", "dp_sample_rate", "dp_steps", "dp_unclipped"}


def _train(**kw: object) -> dict[str, float]:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)), seeded_noise=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 20, generator=gen)
    y = x[:, :4].argmax(1).long()
    instr = TrainInstructions(**{"round": 1, "epochs": 1, "batch_size": 16, "learning_rate": 0.1, "seed": 5, **kw})
    return trainer.train(trainer.vector(), x, y, instr).metrics


def test_a_private_update_carries_no_timing_and_no_data_statistics() -> None:
    sample_level = _train(dp_sample_level=True, dp_noise_multiplier=1.0, dp_clip=1.0)
    client_level = _train(update_clip=1.0, update_noise_std=0.1)
    for metrics in (sample_level, client_level):
        assert set(metrics) <= ALLOWED_UNDER_DP, set(metrics) - ALLOWED_UNDER_DP
        assert "seconds" not in metrics


def test_a_plain_update_still_reports_its_training_time() -> None:
    plain = _train()
    assert plain["seconds"] > 0 and "train_loss" in plain
