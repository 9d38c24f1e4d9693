"""DP in the client's trainer: the DP-SGD schedule, client-level clipping and noise on real
updates, the local noise scale, reproducibility, and worst-client calibration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl_common.privacy import make_accountant
from fl_common.privacy.client_dp import (
    adaptive_count_noise_std,
    calibrate_worst_case,
    distributed_noise_std,
    sample_level_schedule,
    worst_case_epsilon,
)
from fl_common.privacy.mechanisms import adaptive_clip_noise_multiplier
from fl_common.protocol import TrainInstructions
from fl_common.training import LocalTrainer


def _trainer(seed: int = 0, width: int = 100, seeded: bool = True, batchnorm: bool = False) -> LocalTrainer:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(20, width)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, 4)]
    return LocalTrainer(nn.Sequential(*layers), seeded_noise=seeded)


def _data(n: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=gen)
    y = (x[:, :4].argmax(1)).long()  # learnable labels
    return x, y


def _instr(**kw) -> TrainInstructions:
    return TrainInstructions(**{"round": 1, "epochs": 1, "batch_size": 16, "learning_rate": 0.1, "seed": 123, **kw})


def test_sample_level_schedule_closed_forms() -> None:
    assert sample_level_schedule(320, 32, 2) == (0.1, 20)
    assert sample_level_schedule(96, 16, 1) == (1 / 6, 6)
    assert sample_level_schedule(10, 32, 3) == (1.0, 3)  # smaller than a batch: every record, every step
    assert sample_level_schedule(48, 32, 1) == (32 / 48, 2)  # round(1.5) = 2 expected-batch steps
    with pytest.raises(ValueError):
        sample_level_schedule(0, 32, 1)


def test_client_level_clipping_holds_on_real_updates() -> None:
    x, y = _data()
    trainer = _trainer()
    start = trainer.vector()
    free = trainer.train(start, x, y, _instr())
    assert free.metrics["train_loss"] > 0 and float(free.delta.norm()) > 0.05
    for clip in (0.01, 0.05, float(free.delta.norm()) * 0.5):
        up = trainer.train(start, x, y, _instr(update_clip=clip, report_clip_bit=True))
        norm = float(torch.linalg.vector_norm(up.delta, dtype=torch.float64))
        assert norm <= clip and norm == pytest.approx(clip, rel=1e-5)
        assert up.metrics["dp_unclipped"] == 0.0
        assert "train_loss" not in up.metrics and "train_accuracy" not in up.metrics, "loss and accuracy are not private"
    big = trainer.train(start, x, y, _instr(update_clip=1e3, report_clip_bit=True))
    assert big.metrics["dp_unclipped"] == 1.0 and torch.equal(big.delta, free.delta)
    no_bit = trainer.train(start, x, y, _instr(update_clip=0.01))
    assert "dp_unclipped" not in no_bit.metrics, "the bit is released only when the server noises its count"


def test_distributed_noise_has_the_stated_std() -> None:
    x, y = _data()
    trainer = _trainer(width=400)  # 10 004 parameters
    std = distributed_noise_std(1.2, 0.5, 4)
    assert std == pytest.approx(1.2 * 0.5 / 2)
    up = trainer.train(trainer.vector(), x, y, _instr(learning_rate=0.0, update_clip=0.5, update_noise_std=std))
    d = up.delta.double()
    assert float(d.std()) == pytest.approx(std, rel=5 / math.sqrt(2 * d.numel()))
    assert abs(float(d.mean())) < 5 * std / math.sqrt(d.numel())


def test_dp_sgd_local_noise_has_the_stated_scale() -> None:
    """Tiny C makes the clipped gradients negligible: the delta is then lr x the summed noise."""
    x, y = _data(n=160)
    trainer = _trainer(width=400)
    sigma, clip, lr = 3.0, 1e-6, 1.0
    q, steps = sample_level_schedule(160, 16, 2)
    up = trainer.train(trainer.vector(), x, y, _instr(learning_rate=lr, dp_sample_level=True, dp_noise_multiplier=sigma,
                                                      dp_clip=clip, dp_sample_rate=q, dp_steps=steps))
    expected = lr * sigma * clip * math.sqrt(steps) / (q * 160)  # each step: N(0, (σC)²) / (q n)
    d = up.delta.double()
    assert float(d.std()) == pytest.approx(expected, rel=0.05)
    assert up.metrics["dp_sample_rate"] == q and up.metrics["dp_steps"] == steps == 20


def test_dp_sgd_training_reports_its_schedule_and_is_reproducible_only_when_seeded() -> None:
    x, y = _data()
    instr = _instr(epochs=2, dp_sample_level=True, dp_noise_multiplier=0.8, dp_clip=1.0)
    a = _trainer().train(_trainer().vector(), x, y, instr)
    b = _trainer().train(_trainer().vector(), x, y, instr)
    assert torch.equal(a.delta, b.delta), "simulation: seeded noise, reproducible runs"
    assert (a.metrics["dp_sample_rate"], a.metrics["dp_steps"]) == (16 / 96, 12.0)
    assert "train_loss" not in a.metrics
    c = _trainer(seeded=False).train(_trainer().vector(), x, y, instr)
    d = _trainer(seeded=False).train(_trainer().vector(), x, y, instr)
    assert not torch.equal(c.delta, d.delta), "deployment: noise from the OS CSPRNG, not from the server's seed"


def test_dp_sgd_learns_at_a_generous_budget() -> None:
    x, y = _data(n=400)
    trainer = _trainer()
    vec = trainer.vector()
    before = trainer.evaluate(vec, x, y).accuracy
    for r in range(1, 6):
        instr = _instr(round=r, seed=r, epochs=2, dp_sample_level=True, dp_noise_multiplier=0.6, dp_clip=1.0, learning_rate=0.5)
        up = trainer.train(vec, x, y, instr)
        vec = vec + up.delta
    after = trainer.evaluate(vec, x, y).accuracy
    assert after > max(0.6, before + 0.2), (before, after)


def test_dp_sgd_refuses_batchnorm_and_zero_noise() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="GroupNorm"):
        _trainer(batchnorm=True).train(_trainer(batchnorm=True).vector(), x, y,
                                       _instr(dp_sample_level=True, dp_noise_multiplier=1.0, dp_clip=1.0))
    with pytest.raises(ValueError, match="no privacy"):
        _trainer().train(_trainer().vector(), x, y, _instr(dp_sample_level=True, dp_noise_multiplier=0.0, dp_clip=1.0))


def test_worst_case_calibration_keeps_every_client_within_the_target() -> None:
    phases = [(min(1.0, 32 / n), max(1, round(n / 32)) * 10) for n in (240, 300, 450, 620, 800, 1190, 40)]
    sigma, binding = calibrate_worst_case(2.0, 1e-5, phases, "rdp")
    eps = [make_accountant("rdp", [(sigma, q, s)]).epsilon(1e-5) for q, s in phases]
    assert max(eps) <= 2.0 and max(eps) >= 0.99 * 2.0
    assert binding == phases[int(torch.tensor(eps).argmax())] == (0.8, 10)  # the 40-record client binds
    assert worst_case_epsilon(sigma, phases, 1e-5, "rdp") == max(eps)


def test_adaptive_clipping_count_noise_keeps_the_update_noise_usable() -> None:
    z = 2.5
    sb = adaptive_count_noise_std(z, expected_clients=10)  # m/20 = 0.5 would need z < 1
    assert adaptive_clip_noise_multiplier(z, sb) == pytest.approx(1.1 * z)
    assert adaptive_count_noise_std(0.5, expected_clients=400) == 20.0  # Andrew et al.'s m/20 when it suffices
