"""q-FedAvg (Li et al. 2020) against a hand computation, its q = 0 case against FedAvg, and the
pre-training loss the trainer reports for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_common.config import ConfigError, config_from_dict
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_common.training import LocalTrainer
from fl_server.strategies import DRIVER_FEATURES, UpdateRejected, build_strategy, check_components

OFF = {"differential_privacy": False, "secure_aggregation": False}


def _cfg(**keys):
    return config_from_dict({"aggregation_method": "qfedavg", **OFF, **keys})


def _u(cid: int, values: list[float], n: int, loss: float | None) -> ClientUpdate:
    metrics = {"train_loss": 1.0} if loss is None else {"train_loss": 1.0, "pre_train_loss": loss}
    return ClientUpdate(cid, 1, torch.tensor(values), n, metrics)


def test_one_round_by_hand_at_q1() -> None:
    # lr = 0.5 -> L = 2. Client 1: delta (1, 0), F = 2; client 2: delta (0, -1), F = 0.5.
    # Dw1 = L (w - w1) = (-2, 0), |Dw1|^2 = 4, D1 = F1 Dw1 = (-4, 0), h1 = q F1^0 4 + L F1 = 8
    # Dw2 = (0, 2),               |Dw2|^2 = 4, D2 = (0, 1),           h2 = 4 + 2 * 0.5 = 5
    # w' = w - (D1 + D2) / (h1 + h2) = w + (4, -1) / 13
    strategy = build_strategy(_cfg(qffl_q=1.0, learning_rate=0.5))
    agg = strategy.new_aggregator(1, torch.zeros(2))
    agg.add(_u(0, [1.0, 0.0], 10, loss=2.0))
    agg.add(_u(1, [0.0, -1.0], 30, loss=0.5))
    result = agg.result()
    assert torch.allclose(result.delta, torch.tensor([4 / 13, -1 / 13]), rtol=1e-6)
    assert result.total_weight == pytest.approx(13.0)
    assert torch.allclose(strategy.apply(torch.ones(2), result), torch.tensor([1 + 4 / 13, 1 - 1 / 13]))


def test_larger_q_favours_the_client_with_the_larger_loss() -> None:
    def step(q: float) -> torch.Tensor:
        agg = build_strategy(_cfg(qffl_q=q, learning_rate=0.5)).new_aggregator(1, torch.zeros(2))
        agg.add(_u(0, [1.0, 0.0], 10, loss=4.0))
        agg.add(_u(1, [0.0, 1.0], 10, loss=1.0))
        d = agg.result().delta
        return d[0] / d[1]

    assert float(step(0.0)) == pytest.approx(1.0)
    assert float(step(1.0)) > 1.0 and float(step(5.0)) > float(step(1.0))


def test_q0_equals_fedavg_exactly_with_equal_sample_counts() -> None:
    # Dyadic values, a power-of-two L (lr = 0.5) and equal n make both computations exact, so the
    # equality is bitwise: at q = 0, sum(L delta_k) / sum(L) is the unweighted mean of the deltas.
    rows = [[0.5, -1.25, 2.0], [1.5, 0.25, -2.0], [-0.75, 0.125, 4.0], [2.0, -3.0, 0.5]]
    q = build_strategy(_cfg(qffl_q=0.0, learning_rate=0.5))
    avg = build_strategy(config_from_dict({"aggregation_method": "fedavg", "learning_rate": 0.5, **OFF}))
    qa, fa = q.new_aggregator(1, torch.zeros(3)), avg.new_aggregator(1, torch.zeros(3))
    for i, r in enumerate(rows):
        qa.add(_u(i, r, 8, loss=0.3 + i))
        fa.add(_u(i, r, 8, loss=None))
    assert torch.equal(qa.result().delta, fa.result().delta)
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(q.apply(x, qa.result()), avg.apply(x, fa.result()))


def test_q0_with_random_updates_matches_fedavg_to_rounding() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 100, generator=gen)
    qa = build_strategy(_cfg(qffl_q=0.0, learning_rate=0.05)).new_aggregator(1, torch.zeros(100))
    fa = build_strategy(config_from_dict({"aggregation_method": "fedavg", **OFF})).new_aggregator(1, torch.zeros(100))
    for i, r in enumerate(rows):
        qa.add(ClientUpdate(i, 1, r, 20, {"pre_train_loss": 2.0 + i}))
        fa.add(ClientUpdate(i, 1, r, 20, {}))
    assert torch.allclose(qa.result().delta, fa.result().delta, atol=1e-7)


def test_q0_with_unequal_sample_counts_is_the_unweighted_mean() -> None:
    agg = build_strategy(_cfg(qffl_q=0.0, learning_rate=0.5)).new_aggregator(1, torch.zeros(1))
    agg.add(_u(0, [1.0], 10, loss=1.0))
    agg.add(_u(1, [3.0], 30, loss=1.0))
    assert torch.equal(agg.result().delta, torch.tensor([2.0]))  # FedAvg would give 2.5


def test_lipschitz_estimate_follows_the_learning_rate_schedule() -> None:
    strategy = build_strategy(_cfg(learning_rate=0.1, lr_schedule="exponential", lr_decay=0.5))
    assert strategy.lipschitz(1) == pytest.approx(10.0)
    assert strategy.lipschitz(3) == pytest.approx(40.0)


@pytest.mark.parametrize("metrics", [{}, {"pre_train_loss": float("nan")}, {"pre_train_loss": -1.0}])
def test_an_update_without_its_loss_is_refused(metrics: dict) -> None:
    agg = build_strategy(_cfg()).new_aggregator(1, torch.zeros(2))
    with pytest.raises(UpdateRejected) as err:
        agg.add(ClientUpdate(0, 1, torch.zeros(2), 5, metrics))
    assert err.value.reason == "missing_pre_train_loss"
    assert agg.num_updates == 0


def test_clients_are_told_to_report_the_loss() -> None:
    strategy = build_strategy(_cfg(proximal_mu=0.5))
    instr = strategy.configure_client(TrainInstructions(round=1, epochs=1, batch_size=8, learning_rate=0.1, proximal_mu=0.5), 3)
    assert instr.report_pre_train_loss and instr.proximal_mu == 0.0
    assert TrainInstructions.from_json(instr.to_json()).report_pre_train_loss


def _tiny_trainer() -> tuple[LocalTrainer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(1)
    return LocalTrainer(model), torch.randn(20, 1, 2, 2, generator=gen), torch.randint(0, 3, (20,), generator=gen)


def test_trainer_reports_the_global_models_loss_before_training() -> None:
    trainer, x, y = _tiny_trainer()
    w = trainer.vector().clone()
    expected = trainer.evaluate(w, x, y).loss
    instr = TrainInstructions(round=1, epochs=2, batch_size=8, learning_rate=0.1, seed=3, report_pre_train_loss=True)
    update = trainer.train(w, x, y, instr)
    assert update.metrics["pre_train_loss"] == pytest.approx(expected)
    assert update.metrics["train_loss"] != pytest.approx(expected)
    # asking for the loss does not change the training itself
    plain = trainer.train(w, x, y, TrainInstructions(round=1, epochs=2, batch_size=8, learning_rate=0.1, seed=3))
    assert "pre_train_loss" not in plain.metrics
    assert torch.equal(plain.delta, update.delta)


def test_trainer_refuses_to_release_the_loss_under_dp() -> None:
    trainer, x, y = _tiny_trainer()
    instr = TrainInstructions(round=1, epochs=1, batch_size=8, learning_rate=0.1, report_pre_train_loss=True, update_clip=1.0)
    with pytest.raises(ValueError, match="not reported under differential privacy"):
        trainer.train(trainer.vector(), x, y, instr)


@pytest.mark.parametrize("mode", ["sample", "client"])
def test_qfedavg_with_differential_privacy_is_refused(mode: str) -> None:
    with pytest.raises(ConfigError, match="'qfedavg' needs each client's training loss F_k sent in the clear"):
        check_components(config_from_dict({"aggregation_method": "qfedavg", "differential_privacy": True, "dp_mode": mode,
                                           "secure_aggregation": False, "num_clients": 1000}), DRIVER_FEATURES)
