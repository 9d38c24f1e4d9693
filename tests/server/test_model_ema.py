"""The server's moving average of the global model (server_model_ema): the average of a known sequence,
what the coordinator evaluates and releases, what clients train from, and checkpoint / resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_common.config import ConfigError, config_from_dict
from fl_common.protocol import ClientUpdate
from fl_common.tensors import flatten, spec_of
from fl_common.training import EvalResult
from fl_server.coordinator import Coordinator
from fl_server.simulation import Simulation
from fl_server.strategies.model_ema import ServerModelEMA

OFF = {"differential_privacy": False, "secure_aggregation": False}
#: the update every round's single client sends: the global model after round t is the sum of the first t
DELTAS = [torch.tensor([4.0, 0.0, -2.0, 1.0]), torch.tensor([0.0, 8.0, 2.0, 1.0]),
          torch.tensor([-4.0, 0.0, 6.0, 1.0]), torch.tensor([2.0, -8.0, 0.0, 1.0])]


def expected_average(decay: float, models: list[torch.Tensor]) -> torch.Tensor:
    """The average written out: the mean of the first 1 / (1 - decay) models, then decay * average + (1 - decay) * model."""
    horizon = round(1 / (1 - decay))
    average = torch.stack([m.double() for m in models[:horizon]]).mean(0)
    for m in models[horizon:]:
        average = decay * average + (1 - decay) * m.double()
    return average.float()


def coordinator(seen: list[torch.Tensor], **cfg: object) -> Coordinator:
    config = config_from_dict({"num_clients": 4, "client_selection_ratio": 0.25, "num_rounds": 4,
                               "evaluation_frequency": 1, **OFF, **cfg})
    return Coordinator(config, torch.zeros(4), spec_of({"w": torch.zeros(4)}),
                       evaluator=lambda v: seen.append(v.clone()) or EvalResult(float(v.sum()), 0.5, 10))


def run_round(coord: Coordinator, delta: torch.Tensor) -> None:
    plan = coord.plan_round(list(range(4)))
    coord.submit(ClientUpdate(plan.selected[0], plan.round, delta, 5))
    coord.close_round()


def test_average_of_a_known_sequence() -> None:
    ema = ServerModelEMA(0.5)
    with pytest.raises(RuntimeError, match="no round yet"):
        ema.value()
    models = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), torch.tensor([5.0, -2.0]), torch.tensor([0.5, 4.0])]
    for m in models:
        ema.update(m)
    # the mean of the first two (horizon 1 / (1 - 0.5) = 2): (2, 2); then 0.5 * average + 0.5 * model:
    # (3.5, 0), then (2, 2)
    assert torch.equal(ema.value(), torch.tensor([2.0, 2.0]))
    assert ema.updates == 4
    slow = ServerModelEMA(0.9)  # horizon 10: the plain mean of the first rounds
    for m in models:
        slow.update(m)
    assert torch.allclose(slow.value(), torch.stack(models).mean(0))
    with pytest.raises(ValueError, match="decay"):
        ServerModelEMA(1.0)
    with pytest.raises(ValueError, match="values"):
        ema.update(torch.zeros(3))


def test_coordinator_evaluates_and_releases_the_average_while_clients_train_from_the_raw_model() -> None:
    seen: list[torch.Tensor] = []
    coord = coordinator(seen, server_model_ema=0.75)
    models = []
    for delta in DELTAS:
        run_round(coord, delta)
        models.append(coord.global_vector.clone())
    assert torch.equal(models[-1], sum(DELTAS)), "the global model (what clients train from) is the raw FedAvg model"
    for t in range(len(DELTAS)):
        assert torch.allclose(seen[t], expected_average(0.75, models[:t + 1])), f"round {t + 1} evaluated the average"
    assert torch.allclose(coord.released_vector, expected_average(0.75, models))
    assert coord.history[-1].test_loss == pytest.approx(float(expected_average(0.75, models).sum()))
    assert not torch.allclose(coord.released_vector, coord.global_vector)


def test_off_by_default_releases_the_global_model() -> None:
    seen: list[torch.Tensor] = []
    coord = coordinator(seen)
    run_round(coord, DELTAS[0])
    run_round(coord, DELTAS[1])
    assert coord.model_ema is None
    assert torch.equal(coord.released_vector, coord.global_vector) and torch.equal(seen[-1], DELTAS[0] + DELTAS[1])


def test_checkpoint_and_resume_continue_the_same_average() -> None:
    uninterrupted = coordinator([], server_model_ema=0.6)
    for delta in DELTAS:
        run_round(uninterrupted, delta)
    first = coordinator([], server_model_ema=0.6)
    run_round(first, DELTAS[0])
    run_round(first, DELTAS[1])
    state = first.state_dict()
    resumed = coordinator([], server_model_ema=0.6)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.released_vector, first.released_vector)
    run_round(resumed, DELTAS[2])
    run_round(resumed, DELTAS[3])
    assert torch.equal(resumed.released_vector, uninterrupted.released_vector)
    assert resumed.model_ema is not None and resumed.model_ema.updates == 4
    other_decay = coordinator([], server_model_ema=0.9)
    with pytest.raises(ValueError, match="server_model_ema=0.6"):
        other_decay.load_state_dict(state)


def test_a_checkpoint_without_an_average_starts_it_at_its_global_model() -> None:
    plain = coordinator([])
    run_round(plain, DELTAS[0])
    resumed = coordinator([], server_model_ema=0.5)
    resumed.load_state_dict(plain.state_dict())
    assert torch.equal(resumed.released_vector, DELTAS[0])
    run_round(resumed, DELTAS[1])  # the mean of the two global models
    assert torch.equal(resumed.released_vector, DELTAS[0] + 0.5 * DELTAS[1])


@pytest.mark.parametrize(("settings", "message"), [
    ({"server_model_ema": 1.0}, "server_model_ema"),
    ({"server_model_ema": -0.1}, "server_model_ema"),
    ({"server_model_ema": 0.9, "training_mode": "async"}, "training_mode is 'async'"),
])
def test_config_refuses_what_cannot_run(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**OFF, **settings})


def test_the_simulation_saves_the_released_average_as_its_model(small_config: dict, tmp_path: Path) -> None:
    """model.pt is what the run released (the average), not the raw model the clients train from."""
    cfg = {**small_config, **OFF, "model_type": "mlp", "hidden_size": 16, "num_rounds": 3, "workers": 0,
           "server_model_ema": 0.5}
    with Simulation(cfg, tmp_path / "run", progress=False) as sim:
        sim.train()
        sim.save_results()
        released, raw = sim.coordinator.released_vector.clone(), sim.coordinator.global_vector.clone()
    saved = flatten(torch.load(tmp_path / "run" / "model.pt", weights_only=True))
    assert not torch.equal(released, raw), "three rounds of a 0.5 average must differ from the last model"
    assert torch.equal(saved, released)
