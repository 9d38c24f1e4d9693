"""Plug-in strategies and selection policies: the example plug-ins against hand computations, every
way a plug-in can be wrong refused at start-up in one line, entry-point names, and the plug-in
path in the simulation (bit for bit the built-in path when the plug-in is the built-in) and in the
asynchronous coordinator. The REST side is tests/e2e/test_rest_plugins.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.plugins.median_norm_clipping import MedianNormClipping, median_norm_clipped_mean
from examples.plugins.sqrt_size_selection import SqrtSizeSelection
from fl_common.config import ConfigError, config_from_dict
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_server.asynchronous import AsyncCoordinator
from fl_server.coordinator import Coordinator
from fl_server.selection import ClientInfo, build_selection, inclusion_probabilities
from fl_server.simulation import Simulation
from fl_server.strategies import DRIVER_FEATURES, build_strategy, check_components, check_strategy_features

OFF = {"differential_privacy": False, "secure_aggregation": False}
STRATEGY = "examples.plugins.median_norm_clipping:MedianNormClipping"
SELECTION = "examples.plugins.sqrt_size_selection:SqrtSizeSelection"
PLUGINS = {"aggregation_method": "custom", "custom_strategy": STRATEGY, "selection": "custom", "custom_selection": SELECTION}


def _u(cid: int, values: list[float], n: int) -> ClientUpdate:
    return ClientUpdate(cid, 1, torch.tensor(values, dtype=torch.float32), n, {"train_loss": 1.0})


# --------------------------------------------------------------------------- the example plug-ins


def test_median_norm_clipping_by_hand() -> None:
    strategy = build_strategy(config_from_dict({**OFF, **PLUGINS, "server_learning_rate": 0.5}))
    assert isinstance(strategy, MedianNormClipping) and strategy.server_learning_rate == 0.5
    agg = strategy.new_aggregator(1, torch.zeros(2))
    # norms 5, 1, 50: the median 5 leaves the first two alone and scales the third by 5/50 to (3, 4)
    for cid, values, n in ((0, [3.0, 4.0], 1), (1, [0.0, 1.0], 2), (2, [30.0, 40.0], 1)):
        agg.add(_u(cid, values, n))
    result = agg.result()
    # (1 (3, 4) + 2 (0, 1) + 1 (3, 4)) / 4 = (1.5, 2.5)
    torch.testing.assert_close(result.delta, torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(strategy.apply(torch.tensor([1.0, 1.0]), result), torch.tensor([1.75, 2.25]))


def test_median_norm_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    # tau = (2 + 4) / 2 = 3: rows scaled to norms 1, 2, 3, 3
    expected = (torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 2.0]) + torch.tensor([3.0, 0.0]) + torch.tensor([0.0, 3.0])) / 4
    torch.testing.assert_close(median_norm_clipped_mean(rows, [1, 1, 1, 1]).float(), expected)


def test_sqrt_size_selection_states_and_draws_its_probabilities() -> None:
    selector = build_selection(config_from_dict({**OFF, **PLUGINS, "seed": 4}), model_bytes=0)
    assert isinstance(selector, SqrtSizeSelection) and selector.seed == 4
    clients = [ClientInfo(i, num_samples=n) for i, n in enumerate([1, 4, 9, 16, 100])]
    # weights 1, 2, 3, 4, 10 over 2 slots: 2 x 10 / 20 = 1 caps the last client at 1, the other slot is shared 1:2:3:4
    assert list(selector.probabilities(1, clients, 2).values()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 1.0])
    counts = np.zeros(5)
    for r in range(1, 2001):
        for cid in selector.select(r, clients, 2):
            counts[cid] += 1
    assert counts[4] == 2000  # drawn with certainty
    assert counts[:4] / 2000 == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=4 * np.sqrt(0.25 / 2000))


# --------------------------------------------------------------------------- configuration and start-up refusals


@pytest.mark.parametrize(("values", "match"), [
    ({"aggregation_method": "custom"}, "'custom_strategy' must name the plug-in when aggregation_method is 'custom'"),
    ({"custom_strategy": STRATEGY}, "'custom_strategy' has value .* but aggregation_method is 'fedavg', not 'custom'"),
    ({"aggregation_method": "custom", "custom_strategy": "examples.plugins:"}, "allowed 'package.module:Class'"),
    ({"aggregation_method": "custom", "custom_strategy": "9lives.mod:X"}, "allowed 'package.module:Class'"),
    ({"aggregation_method": "custom", "custom_strategy": "not_installed"}, "entry-point group 'fl_hub.strategies'"),
    ({"selection": "custom"}, "'custom_selection' must name the plug-in when selection is 'custom'"),
    ({"custom_selection": SELECTION}, "'custom_selection' has value .* but selection is 'uniform', not 'custom'"),
    ({"aggregation_method": "custom", "custom_strategy": STRATEGY, "training_mode": "async"}, "allowed fedavg, fedprox"),
])
def test_the_config_refuses_malformed_plugin_keys(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**OFF, **values})


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of deliberately broken (and one working) plug-ins on sys.path."""
    name = f"broken_plugins_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import numpy as np

        from fl_server.selection import ProportionalSelector
        from fl_server.strategies import FedAvg, Strategy

        class NotAStrategy:
            pass

        class Abstract(Strategy):
            name = "abstract"

        class Misspelt(FedAvg):
            def __init__(self, *, server_learnin_rate: float = 1.0) -> None:
                super().__init__(server_learning_rate=server_learnin_rate)

        class Picky(FedAvg):
            def __init__(self, *, trim_ratio: float) -> None:
                if trim_ratio > 0.1:
                    raise ValueError(f"trim_ratio must be at most 0.1, got {trim_ratio}")
                super().__init__()

        class Nameless(ProportionalSelector):
            def weights(self, round_number, pool):
                return np.ones(len(pool))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize(("target", "match"), [
    ("no_such_module_xyz:Strategy", r"config key 'custom_strategy' \('no_such_module_xyz:Strategy'\): module "
                                    r"'no_such_module_xyz' cannot be imported: No module named"),
    ("{m}:Missing", "module '{m}' has no attribute 'Missing'"),
    ("{m}:NotAStrategy", "NotAStrategy is not a subclass of fl_server.strategies.base.Strategy"),
    ("{m}:Abstract", "Abstract does not implement new_aggregator"),
    ("{m}:Misspelt", "parameter 'server_learnin_rate' is not a configuration key .*did you mean 'server_learning_rate'"),
    ("{m}:Picky", r"Picky\(trim_ratio=0.2\) refused its configuration: trim_ratio must be at most 0.1"),
])
def test_a_broken_strategy_plugin_is_refused_at_startup_in_one_line(plugin_module: str, target: str, match: str) -> None:
    cfg = config_from_dict({**OFF, "aggregation_method": "custom", "custom_strategy": target.format(m=plugin_module)})
    with pytest.raises(ConfigError, match=match.format(m=plugin_module)) as err:
        check_components(cfg, DRIVER_FEATURES)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=match.format(m=plugin_module)):  # the coordinator refuses it the same way
        Coordinator(cfg, torch.zeros(2), spec_of({"w": torch.zeros(2)}), driver_features=DRIVER_FEATURES)


def test_a_broken_selection_plugin_is_refused_at_startup(plugin_module: str) -> None:
    def refused(target: str) -> str:
        cfg = config_from_dict({**OFF, "selection": "custom", "custom_selection": f"{plugin_module}:{target}"})
        with pytest.raises(ConfigError) as err:
            check_components(cfg, DRIVER_FEATURES)
        return str(err.value)

    assert "Misspelt is not a subclass of fl_server.selection.policies.Selector" in refused("Misspelt")
    assert "has no attribute 'Nope'" in refused("Nope")
    assert "Nameless sets no class attribute 'name'" in refused("Nameless")


def test_plugins_are_held_to_the_rules_of_the_builtin_strategies() -> None:
    """The example keeps individual updates: refused with secure aggregation and client-level DP, by name."""
    cfg = config_from_dict({**OFF, **PLUGINS, "secure_aggregation": True})
    with pytest.raises(ConfigError, match=f"custom_strategy '{STRATEGY}' needs individual updates .* secure aggregation "
                                          f"lets the server see only the sum"):
        check_components(cfg, DRIVER_FEATURES)
    cfg = config_from_dict({**PLUGINS, "selection": "uniform", "custom_selection": None, "secure_aggregation": False,
                            "differential_privacy": True, "dp_mode": "client", "num_clients": 1000})
    with pytest.raises(ConfigError, match="needs individual updates, which client-level DP-FedAvg does not release"):
        check_strategy_features(cfg, MedianNormClipping, DRIVER_FEATURES)
    # a driver that does not pass client reports cannot run a policy that reads them (the REST server passes them)
    with pytest.raises(ConfigError, match="selection 'custom' draws on what each client reports"):
        check_components(config_from_dict({**OFF, **PLUGINS}), ())


# --------------------------------------------------------------------------- entry points


def test_an_installed_package_registers_plugins_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``pip install`` of a package declaring the entry points leaves on sys.path: a dist-info folder."""
    dist = tmp_path / "fl_hub_example_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fl-hub-example-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fl_hub.strategies]\nmedian_norm = {STRATEGY}\n\n"
                                           f"[fl_hub.selection]\nsqrt_size = {SELECTION}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config_from_dict({**OFF, "aggregation_method": "custom", "custom_strategy": "median_norm",
                            "selection": "custom", "custom_selection": "sqrt_size"})
    assert isinstance(build_strategy(cfg), MedianNormClipping)
    assert isinstance(build_selection(cfg, model_bytes=0), SqrtSizeSelection)
    with pytest.raises(ConfigError, match="did you mean 'median_norm'.*registered: median_norm"):
        config_from_dict({**OFF, "aggregation_method": "custom", "custom_strategy": "median_nrom"})


# --------------------------------------------------------------------------- the drivers

SIM = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 8, "client_selection_ratio": 0.5,
       "num_rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "max_train_samples": 800,
       "max_test_samples": 200, "seed": 3, "workers": 0, "compression": False, **OFF}


def test_a_plugin_that_is_the_builtin_runs_the_simulation_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "same_plugins.py").write_text(textwrap.dedent("""
        from fl_server.selection import WeightedSelector
        from fl_server.strategies import FedAvgM

        class MyFedAvgM(FedAvgM):
            name = "my_fedavgm"

        class MyWeighted(WeightedSelector):
            name = "my_weighted"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    builtin = {**SIM, "aggregation_method": "fedavgm", "selection": "weighted", "data_distribution": "dirichlet"}
    plugin = {**builtin, "aggregation_method": "custom", "custom_strategy": "same_plugins:MyFedAvgM",
              "selection": "custom", "custom_selection": "same_plugins:MyWeighted"}
    with Simulation(builtin, progress=False) as a:
        ha = a.train()
    with Simulation(plugin, progress=False) as b:
        hb = b.train()
        assert type(b.coordinator.strategy).__name__ == "MyFedAvgM"
    assert torch.equal(a.coordinator.global_vector, b.coordinator.global_vector)
    assert [(r.test_accuracy, r.train_loss, r.clients) for r in ha] == [(r.test_accuracy, r.train_loss, r.clients) for r in hb]
    assert a.coordinator.participation.rows == b.coordinator.participation.rows


def test_the_example_plugins_run_in_the_simulation(tmp_path: Path) -> None:
    cfg = {**SIM, **PLUGINS, "data_distribution": "dirichlet", "non_iid_alpha": 0.5}
    with Simulation(cfg, tmp_path / "run", progress=False) as sim:
        history = sim.train()
        summary = sim.save_results()
        sizes = np.asarray([len(p) for p in sim.partitions], dtype=np.float64)
        first = {int(cid): p for r, cid, _sel, _arr, p in sim.coordinator.participation.rows if r == 1}
    assert [r.round for r in history] == [1, 2] and all(r.test_accuracy is not None for r in history)
    assert summary["selection"]["policy"] == "sqrt_size" and summary["selection"]["weight"] == "sqrt(num_samples)"
    pi = inclusion_probabilities(np.sqrt(sizes), 4)  # what the policy promises for each selected client
    assert len(first) == 4 and all(p == pytest.approx(pi[cid], rel=1e-12) for cid, p in first.items())


def test_a_selection_plugin_draws_the_asynchronous_jobs() -> None:
    cfg = config_from_dict({**OFF, "num_clients": 3, "client_selection_ratio": 0.34, "training_mode": "async",
                            "selection": "custom", "custom_selection": SELECTION, "async_concurrency": 1})
    coord = AsyncCoordinator(cfg, torch.zeros(2), spec_of({"w": torch.zeros(2)}))
    assert isinstance(coord.selector, SqrtSizeSelection)
    (task,) = coord.dispatch([ClientInfo(0, num_samples=1), ClientInfo(1, num_samples=4), ClientInfo(2, num_samples=25)])
    # one slot, weights 1, 2, 5: pi = 1/8, 2/8, 5/8
    assert coord.jobs[0].probability == pytest.approx({0: 1 / 8, 1: 2 / 8, 2: 5 / 8}[task.client_id], rel=1e-12)
