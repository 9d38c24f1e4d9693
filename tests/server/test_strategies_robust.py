"""Median, trimmed mean, Krum and Multi-Krum against hand-computed results, a planted outlier, and
the configurations they refuse."""

from __future__ import annotations

import pytest
import torch

from fl_common.config import ConfigError, config_from_dict
from fl_common.protocol import ClientUpdate
from fl_server.strategies import DRIVER_FEATURES, build_strategy, check_components
from fl_server.strategies.common import (
    coordinate_median,
    krum_scores,
    trim_count,
    trimmed_mean,
)

OFF = {"differential_privacy": False, "secure_aggregation": False}
#: 5 clients per round; min_clients 5 so Krum with f = 1 (needs > 4 updates) can always aggregate
FIVE = {"num_clients": 5, "client_selection_ratio": 1.0, "min_clients": 5, **OFF}


def _aggregate(method: str, rows: list[list[float]], samples: list[int] | None = None, **keys) -> torch.Tensor:
    strategy = build_strategy(config_from_dict({"aggregation_method": method, **FIVE, **keys}))
    agg = strategy.new_aggregator(1, torch.zeros(len(rows[0])))
    for i, r in enumerate(rows):
        agg.add(ClientUpdate(i, 1, torch.tensor(r), (samples or [1] * len(rows))[i], {"train_loss": 1.0}))
    result = agg.result()
    assert result.num_updates == len(rows)
    return result.delta


def test_median_odd_and_even_by_hand() -> None:
    rows = [[1.0, 5.0, 3.0], [2.0, 0.0, 9.0], [10.0, -1.0, 4.0]]
    assert torch.equal(_aggregate("median", rows), torch.tensor([2.0, 0.0, 4.0]))
    # even: the mean of the two middle values (1,2,4,10 -> 3; -1,0,2,5 -> 1; 0,3,4,9 -> 3.5)
    assert torch.equal(_aggregate("median", [*rows, [4.0, 2.0, 0.0]]), torch.tensor([3.0, 1.0, 3.5]))


def test_median_ignores_sample_counts() -> None:
    rows = [[0.0], [1.0], [2.0]]
    assert torch.equal(_aggregate("median", rows, samples=[1000, 1, 1]), torch.tensor([1.0]))


def test_trimmed_mean_by_hand() -> None:
    rows = [[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]]
    # trim_ratio 0.2 of 5 -> drop 1 from each end per coordinate: mean(2,3,4) = 3; mean(0,1,2) = 1
    assert torch.allclose(_aggregate("trimmed_mean", rows, trim_ratio=0.2), torch.tensor([3.0, 1.0]))


def test_trim_count_is_floor_and_robust_to_float_error() -> None:
    assert trim_count(10, 0.2) == 2
    assert trim_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert trim_count(9, 0.2) == 1
    with pytest.raises(ValueError, match="leaving none"):
        trimmed_mean(torch.zeros(4, 1, dtype=torch.float64), 0.5)


LINE = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]]


def test_krum_scores_by_hand() -> None:
    # n = 5, f = 1: each score sums the squared distances to the n - f - 2 = 2 nearest others
    scores = krum_scores(torch.tensor(LINE, dtype=torch.float64), 1)
    assert scores.tolist() == [1 + 4, 1 + 1, 1 + 1, 1 + 4, 97**2 + 98**2]


def test_krum_picks_the_best_scored_update() -> None:
    # points 1 and 2 tie at score 2: the earlier one wins
    assert torch.equal(_aggregate("krum", LINE, krum_byzantine=1), torch.tensor([1.0, 0.0]))


def test_multikrum_averages_the_m_best() -> None:
    assert torch.allclose(_aggregate("multikrum", LINE, krum_byzantine=1, multikrum_m=3), torch.tensor([1.0, 0.0]))
    # default m = n - f = 4: points 1, 2, 0, 3
    assert torch.allclose(_aggregate("multikrum", LINE, krum_byzantine=1), torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "krum", "multikrum"])
def test_a_planted_outlier_is_ignored(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    honest = torch.ones(9, 50) + 0.01 * torch.randn(9, 50, generator=gen)
    rows = [*honest.tolist(), [1e6] * 50]
    cfg = {"num_clients": 10, "client_selection_ratio": 1.0, "min_clients": 10, **OFF}
    strategy = build_strategy(config_from_dict({"aggregation_method": method, **cfg, "trim_ratio": 0.1, "krum_byzantine": 1}))
    agg = strategy.new_aggregator(1, torch.zeros(50))
    for i, r in enumerate(rows):
        agg.add(ClientUpdate(i, 1, torch.tensor(r), 10))
    delta = agg.result().delta
    assert float((delta - 1.0).abs().max()) < 0.05, f"{method} was moved by the outlier"
    fedavg = build_strategy(config_from_dict({"aggregation_method": "fedavg", **cfg})).new_aggregator(1, torch.zeros(50))
    for i, r in enumerate(rows):
        fedavg.add(ClientUpdate(i, 1, torch.tensor(r), 10))
    assert float(fedavg.result().delta.min()) > 1e4  # the weighted mean is not robust


def test_coordinate_median_matches_numpy_on_random_data() -> None:
    import numpy as np

    rows = torch.randn(6, 100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert np.allclose(coordinate_median(rows).numpy(), np.median(rows.numpy(), axis=0))


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "krum", "multikrum"])
def test_robust_strategies_keep_individual_updates(method: str) -> None:
    strategy = build_strategy(config_from_dict({"aggregation_method": method, **FIVE}))
    assert strategy.needs_individual_updates


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "krum", "multikrum", "qfedavg"])
def test_secure_aggregation_is_refused_with_the_reason(method: str) -> None:
    with pytest.raises(ConfigError, match=f"'{method}'.*secure aggregation lets the server see only the sum"):
        check_components(config_from_dict({"aggregation_method": method, **FIVE, "secure_aggregation": True}), DRIVER_FEATURES)


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "krum", "multikrum"])
def test_client_level_dp_is_refused_with_the_reason(method: str) -> None:
    with pytest.raises(ConfigError, match="needs individual updates, which client-level DP-FedAvg does not release"):
        check_components(config_from_dict({"aggregation_method": method, "num_clients": 1000, "client_selection_ratio": 0.01,
                                           "min_clients": 10, "differential_privacy": True, "dp_mode": "client",
                                           "secure_aggregation": False}), DRIVER_FEATURES)


def test_krum_with_too_many_byzantine_clients_is_refused() -> None:
    # 5 per round: f = 2 would need more than 2f + 2 = 6 updates
    with pytest.raises(ConfigError, match=r"krum_byzantine' has value 2: .*more than 2f \+ 2 = 6 updates.*selects 5"):
        config_from_dict({"aggregation_method": "krum", **FIVE, "krum_byzantine": 2})


def test_krum_needs_min_clients_above_2f_plus_2() -> None:
    with pytest.raises(ConfigError, match="set min_clients to at least 5"):
        config_from_dict({"aggregation_method": "multikrum", **FIVE, "min_clients": 1})


def test_multikrum_m_above_n_minus_f_is_refused() -> None:
    with pytest.raises(ConfigError, match="multikrum_m' has value 5: .*at most .* = 4"):
        config_from_dict({"aggregation_method": "multikrum", **FIVE, "multikrum_m": 5})


def test_trimmed_mean_leaving_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="leaving none to average"):
        config_from_dict({"aggregation_method": "trimmed_mean", "num_clients": 4, "client_selection_ratio": 1.0,
                          "trim_ratio": 0.5, **OFF})


def test_trimmed_mean_trimming_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="trims no update"):
        config_from_dict({"aggregation_method": "trimmed_mean", **FIVE, "trim_ratio": 0.1})
