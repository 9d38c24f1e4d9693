"""Asynchronous training: staleness functions and the FedAsync / FedBuff server rules against
hand-computed values, the coordinator's job protocol and exact resume, and the event-driven
simulation (staleness comes from client speeds, accuracy improves, runs resume bit for bit, the
CLI runs it)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fl_common.config import ConfigError, config_from_dict
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_common.training import EvalResult
from fl_server.__main__ import main
from fl_server.asynchronous import (
    ASYNC_HISTORY_COLUMNS,
    AsyncCoordinator,
    StalenessFunction,
    staleness_weight,
)
from fl_server.simulation import AsyncSimulation, Simulation
from fl_server.strategies import UpdateRejected

OFF = {"differential_privacy": False, "secure_aggregation": False}
X0 = torch.tensor([1.0, 2.0])


def _coord(client_sizes: dict[int, int] | None = None, **cfg) -> AsyncCoordinator:
    config = config_from_dict({"num_clients": 6, "client_selection_ratio": 0.5, "num_rounds": 100,
                               "training_mode": "async", **OFF, **cfg})
    return AsyncCoordinator(config, X0.clone(), spec_of({"w": torch.zeros(2)}),
                            evaluator=lambda v: EvalResult(float(v.sum()), 0.5, 10), client_sizes=client_sizes)


def _send(coord: AsyncCoordinator, task, delta: list[float], now: float = 0.0):
    return coord.submit(ClientUpdate(task.client_id, task.version, torch.tensor(delta), num_samples=10,
                                     metrics={"train_loss": 1.0}), now=now)


# --------------------------------------------------------------------------- staleness functions
def test_schema_names_the_functions_and_algorithms_that_exist() -> None:
    from fl_common.config.schema import ASYNC_ALGORITHMS
    from fl_common.config.schema import STALENESS_FUNCTIONS as SCHEMA_FUNCTIONS
    from fl_server.asynchronous import STALENESS_FUNCTIONS

    assert SCHEMA_FUNCTIONS == STALENESS_FUNCTIONS and ASYNC_ALGORITHMS == ("fedasync", "fedbuff")


def test_staleness_functions_by_hand() -> None:
    assert [staleness_weight("constant", s) for s in (0, 3, 100)] == [1.0, 1.0, 1.0]
    assert staleness_weight("polynomial", 0, a=0.5) == 1.0
    assert staleness_weight("polynomial", 3, a=0.5) == pytest.approx(0.5)  # (3 + 1)^-0.5
    assert staleness_weight("polynomial", 1, a=2.0) == pytest.approx(0.25)  # (1 + 1)^-2
    hinge = StalenessFunction("hinge", a=10.0, b=4.0)
    assert [hinge(s) for s in (0, 4)] == [1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / 11) and hinge(6) == pytest.approx(1 / 21)  # 1 / (10 (s - 4) + 1)
    with pytest.raises(ValueError, match="unknown staleness function"):
        StalenessFunction("linear")


# --------------------------------------------------------------------------- FedAsync
@pytest.mark.parametrize("function, a, b, s1, s2", [
    ("constant", 0.5, 4.0, 1.0, 1.0),
    ("polynomial", 0.5, 4.0, 2 ** -0.5, 3 ** -0.5),
    ("hinge", 10.0, 1.0, 1.0, 1 / 11),
])
def test_fedasync_mixes_each_update_by_hand(function: str, a: float, b: float, s1: float, s2: float) -> None:
    extra = {"staleness_a": a} if function != "constant" else {}
    extra.update({"staleness_b": b} if function == "hinge" else {})
    coord = _coord(async_algorithm="fedasync", async_alpha=0.5, staleness_function=function, async_concurrency=3, **extra)
    t0, t1, t2 = coord.dispatch([0, 1, 2])
    assert (t0.version, t1.version, t2.version) == (0, 0, 0)
    # x1 = (1 - 0.5) x0 + 0.5 (x0 + d0) with staleness 0
    out = _send(coord, t0, [2.0, 0.0])
    assert (out.staleness, out.status, out.version) == (0, "applied", 1)
    x1 = torch.tensor([2.0, 2.0])
    assert torch.allclose(coord.global_vector, x1)
    # t1 trained on x0 and arrives one update late: alpha_1 = 0.5 s(1), mixed with x0 + d1 = [1, 6]
    a1 = 0.5 * s1
    out = _send(coord, t1, [0.0, 4.0])
    assert out.staleness == 1 and out.weight == pytest.approx(a1)
    x2 = (1 - a1) * x1 + a1 * torch.tensor([1.0, 6.0])
    assert torch.allclose(coord.global_vector, x2)
    # t2: staleness 2, mixed with x0 + d2 = [-1, 2]
    a2 = 0.5 * s2
    out = _send(coord, t2, [-2.0, 0.0])
    assert out.staleness == 2 and out.weight == pytest.approx(a2)
    assert torch.allclose(coord.global_vector, (1 - a2) * x2 + a2 * torch.tensor([-1.0, 2.0]))
    assert coord.version == 3 and [r.clients for r in coord.history] == [1, 1, 1]


# --------------------------------------------------------------------------- FedBuff
def test_fedbuff_applies_exactly_every_k_updates() -> None:
    coord = _coord(async_algorithm="fedbuff", fedbuff_k=3, async_concurrency=4)
    tasks = {t.job: t for t in coord.dispatch(range(6))}
    previous = coord.global_vector.clone()
    for i in range(1, 13):
        task = tasks.pop(min(tasks))  # first dispatched, first back
        out = _send(coord, task, [float(i), 0.0])
        assert coord.version == i // 3, f"after {i} updates"
        assert out.status == ("applied" if i % 3 == 0 else "buffered")
        assert torch.equal(coord.global_vector, previous) != (i % 3 == 0)
        previous = coord.global_vector.clone()
        tasks.update({t.job: t for t in coord.dispatch(range(6))})
    assert [r.clients for r in coord.history] == [3, 3, 3, 3]


def test_fedbuff_step_by_hand() -> None:
    coord = _coord(async_algorithm="fedbuff", fedbuff_k=2, async_concurrency=3, server_learning_rate=0.5)
    t0, t1, t2 = coord.dispatch([0, 1, 2])
    _send(coord, t0, [2.0, 0.0])
    assert torch.equal(coord.global_vector, X0)
    _send(coord, t1, [0.0, 4.0])  # x1 = x0 + 0.5 * (d0 + d1) / 2, both fresh
    x1 = X0 + 0.5 * torch.tensor([2.0, 4.0]) / 2
    assert torch.allclose(coord.global_vector, x1)
    (t3,) = coord.dispatch([3])
    _send(coord, t2, [4.0, 4.0])  # trained on x0, one server update late: weight (1 + 1)^-0.5
    out = _send(coord, t3, [2.0, 0.0])  # fresh
    w = 2 ** -0.5
    assert out.record is not None and out.record.staleness_mean == 0.5 and out.record.staleness_max == 1
    assert torch.allclose(coord.global_vector, x1 + 0.5 * (w * torch.tensor([4.0, 4.0]) + torch.tensor([2.0, 0.0])) / 2)


# --------------------------------------------------------------------------- the job protocol
def test_jobs_versions_concurrency_and_refusals() -> None:
    coord = _coord(async_algorithm="fedasync", async_concurrency=2, async_max_staleness=0)
    tasks = coord.dispatch([0, 1, 2, 3])
    assert len(tasks) == 2 and coord.free_slots == 0 and coord.dispatch([0, 1, 2, 3]) == []
    assert coord.task_for(tasks[0].client_id) == tasks[0] and tasks[0].instructions.round == 0
    idle = next(c for c in range(4) if coord.task_for(c) is None)
    with pytest.raises(UpdateRejected) as e:
        _send(coord, tasks[0].__class__(99, idle, 0, tasks[0].instructions), [0.0, 0.0])
    assert e.value.reason == "not_dispatched"
    with pytest.raises(UpdateRejected) as e:
        coord.submit(ClientUpdate(tasks[0].client_id, 5, torch.zeros(2), num_samples=1))
    assert e.value.reason == "wrong_version"
    with pytest.raises(UpdateRejected) as e:  # a malformed upload keeps the job: the client may send again
        coord.submit(ClientUpdate(tasks[0].client_id, 0, torch.tensor([float("nan"), 0.0]), num_samples=1))
    assert e.value.reason == "not_finite" and coord.task_for(tasks[0].client_id) is not None
    _send(coord, tasks[0], [1.0, 1.0], now=3.0)
    with pytest.raises(UpdateRejected) as e:  # trained on version 0, the server is at 1: staleness 1 > 0
        _send(coord, tasks[1], [1.0, 1.0], now=4.0)
    assert e.value.reason == "too_stale" and coord.version == 1 and coord.free_slots == 2
    statuses = [(j.status, j.staleness, j.finished_at) for j in coord.jobs]
    assert statuses == [("accepted", 0, 3.0), ("refused", 1, 4.0)]
    assert [r[3] for r in coord.participation.rows] == [1, 0]
    (t,) = coord.dispatch([tasks[1].client_id])
    assert t.version == 1 and coord.model(1) is coord.global_vector
    coord.cancel(t.client_id, now=5.0)
    assert coord.jobs[-1].status == "cancelled" and coord.free_slots == 2


def test_model_versions_are_kept_while_clients_train_on_them() -> None:
    coord = _coord(async_algorithm="fedasync", async_concurrency=3)
    t0, *_ = coord.dispatch([0, 1, 2])
    _send(coord, t0, [1.0, 1.0])
    assert torch.equal(coord.model(0), X0)  # t1 and t2 still train on version 0
    with pytest.raises(KeyError, match="no longer held"):
        coord.model(7)


def test_run_ends_after_num_rounds_server_updates() -> None:
    coord = _coord(async_algorithm="fedasync", async_concurrency=2, num_rounds=1)
    t0, t1 = coord.dispatch([0, 1])
    _send(coord, t0, [1.0, 1.0])
    assert coord.finished and coord.free_slots == 0 and coord.dispatch([2]) == []
    with pytest.raises(UpdateRejected) as e:
        _send(coord, t1, [1.0, 1.0])
    assert e.value.reason == "finished"
    assert coord.history[-1].test_accuracy == 0.5  # the last server update is always evaluated


def _drive(coord: AsyncCoordinator, steps: int) -> None:
    """A deterministic stand-in for a driver: fill slots, the oldest job reports back."""
    for _ in range(steps):
        coord.dispatch(range(6))
        task = min(coord.leases.values(), key=lambda t: t.job)
        _send(coord, task, [0.01 * (task.job + 1), -0.02 * task.job])


@pytest.mark.parametrize("algorithm", ["fedasync", "fedbuff"])
def test_state_dict_resumes_exactly(algorithm: str) -> None:
    extra = {"fedbuff_k": 3} if algorithm == "fedbuff" else {}
    sizes = {i: 10 * (i + 1) for i in range(6)}
    a = _coord(sizes, async_algorithm=algorithm, async_concurrency=3, selection="weighted", **extra)
    _drive(a, 7)
    b = _coord(sizes, async_algorithm=algorithm, async_concurrency=3, selection="weighted", **extra)
    b.load_state_dict(a.state_dict())
    _drive(a, 9)
    _drive(b, 9)
    assert torch.equal(a.global_vector, b.global_vector) and a.version == b.version
    assert a.jobs_csv() == b.jobs_csv()
    assert [r.to_row() | {"seconds": 0} for r in a.history] == [r.to_row() | {"seconds": 0} for r in b.history]


def test_fedprox_client_side_carries_mu_in_async_mode() -> None:
    coord = _coord(aggregation_method="fedprox", proximal_mu=0.1)
    (task, *_) = coord.dispatch([0, 1, 2])
    assert task.instructions.proximal_mu == pytest.approx(0.1)


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides, fragment", [
    ({"async_algorithm": "fedasync"}, "'async_algorithm' has value 'fedasync' but training_mode is 'sync'"),
    ({"training_mode": "async", "differential_privacy": True}, "differential_privacy"),
    ({"training_mode": "async", "aggregation_method": "scaffold"}, "allowed fedavg, fedprox"),
    ({"training_mode": "async", "async_algorithm": "fedasync", "fedbuff_k": 4}, "applies every update"),
    ({"training_mode": "async", "async_algorithm": "fedasync", "server_learning_rate": 0.5}, "steps with async_alpha"),
    ({"training_mode": "async", "async_alpha": 0.3}, "its step is server_learning_rate"),
    ({"training_mode": "async", "staleness_function": "constant", "staleness_a": 2.0}, "is 'constant'"),
    ({"training_mode": "async", "staleness_b": 2.0}, "has no b"),
    ({"training_mode": "async", "async_concurrency": 50, "num_clients": 10}, "at most num_clients=10"),
    ({"training_mode": "later"}, "'training_mode' has value 'later'"),
    ({"training_mode": "async", "async_alpha": 0.0, "async_algorithm": "fedasync"}, "'async_alpha' has value 0.0"),
])
def test_impossible_async_settings_are_refused(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict({**OFF, **overrides})


def test_each_driver_refuses_the_other_mode() -> None:
    cfg = {**SYNTH, "num_rounds": 1}
    with pytest.raises(ConfigError, match="use fl_server.simulation.AsyncSimulation"):
        Simulation(cfg, progress=False)
    with pytest.raises(ConfigError, match="AsyncSimulation runs async"):
        AsyncSimulation({**cfg, "training_mode": "sync"}, progress=False)


# --------------------------------------------------------------------------- the simulation
SYNTH = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 8, "client_selection_ratio": 0.5,
         "num_rounds": 16, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "max_train_samples": 1200,
         "max_test_samples": 300, "compression": False, "seed": 5, "workers": 0, "training_mode": "async", **OFF}


def _staleness_by_client(sim: AsyncSimulation) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for j in sim.coordinator.jobs:
        if j.status == "accepted":
            out.setdefault(int(j.client_id), []).append(int(j.staleness))
    return out


def test_staleness_comes_from_heterogeneous_client_speeds() -> None:
    base = {**SYNTH, "async_algorithm": "fedasync", "num_rounds": 24, "samples_per_client": 100, "evaluation_frequency": 24}
    with AsyncSimulation(base, progress=False) as even:
        even.train()
        even_max = even.summary()["staleness"]["max"]
    # equal clients finish together: each sees at most the other concurrency - 1 arrivals
    assert even_max <= even.coordinator.concurrency - 1
    with AsyncSimulation({**base, "client_speed_distribution": "lognormal", "client_speed_sigma": 1.0},
                         progress=False) as mixed:
        mixed.train()
        summary = mixed.summary()
    staleness = summary["staleness"]
    assert staleness["max"] > mixed.coordinator.concurrency - 1 and len(staleness["histogram"]) >= 4
    by_client = _staleness_by_client(mixed)
    speed = mixed.speeds.seconds_per_sample
    ranked = sorted(by_client, key=lambda c: speed[c])
    fast, slow = ranked[: len(ranked) // 2], ranked[len(ranked) // 2:]
    mean = lambda cs: sum(sum(by_client[c]) for c in cs) / sum(len(by_client[c]) for c in cs)
    assert mean(slow) > mean(fast), "slow clients deliver staler updates"
    # and fast clients come back more often
    count = lambda cs: sum(len(by_client[c]) for c in cs)
    assert count(fast) > count(slow)
    assert summary["virtual_seconds"] > 0 and summary["client_speeds"]["distribution"] == "lognormal"


def test_async_simulation_learns_on_the_synthetic_task() -> None:
    cfg = {**SYNTH, "async_algorithm": "fedasync", "num_rounds": 24, "evaluation_frequency": 8,
           "client_speed_distribution": "lognormal"}
    with AsyncSimulation(cfg, progress=False) as sim:
        before = sim.evaluate().accuracy
        history = sim.train()
    accs = [r.test_accuracy for r in history if r.test_accuracy is not None]
    assert len(history) == 24 and len(accs) == 3
    assert accs[-1] > before + 0.25 and accs[-1] > 0.45, f"chance is 0.1: {before} -> {accs}"


def _rows(path: Path, name: str) -> list[dict[str, str]]:
    with open(path / name, newline="") as f:
        return list(csv.DictReader(f))


def test_async_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    cfg = {**SYNTH, "async_algorithm": "fedbuff", "fedbuff_k": 3, "num_rounds": 8, "evaluation_frequency": 2,
           "client_speed_distribution": "lognormal", "selection": "adaptive"}
    with AsyncSimulation(cfg, tmp_path / "full", progress=False) as full:
        full.train()
        full.save_results()
    with AsyncSimulation(cfg, tmp_path / "part", progress=False) as first:
        first.train(rounds=3)
    with AsyncSimulation(cfg, tmp_path / "part", resume=True, progress=False) as second:
        assert second.coordinator.version == 3 and second.coordinator.leases
        second.train()
        second.save_results()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(_rows(tmp_path / "full", "history.csv")) == strip(_rows(tmp_path / "part", "history.csv"))
    for name in ("updates.csv", "participation_rounds.csv"):
        assert (tmp_path / "full" / name).read_text() == (tmp_path / "part" / name).read_text(), name
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_runs_async_mode_and_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "async.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in
                                {**SYNTH, "num_rounds": 3, "fedbuff_k": 2, "evaluation_frequency": 3,
                                 "client_speed_distribution": "lognormal"}.items()) + "\n")
    out = tmp_path / "run"
    assert main(["--log-level", "WARNING", "simulate", "--config", str(config), "--output", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["final_accuracy"] is not None
    rows = _rows(out, "history.csv")
    assert list(rows[0]) == list(ASYNC_HISTORY_COLUMNS) and [r["round"] for r in rows] == ["1", "2", "3"]
    assert all(r["clients"] == "2" for r in rows)
    jobs = _rows(out, "updates.csv")
    assert sum(j["status"] == "accepted" for j in jobs) == 6 and {j["applied_in"] for j in jobs} >= {"1", "2", "3"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_mode"] == "async" and summary["server_updates"] == 3
    assert summary["staleness"]["accepted"] == 6 and summary["asynchronous"]["algorithm"] == "fedbuff"
    assert summary["participation"]["clients"] == 8
    for name in ("participation_rounds.csv", "checkpoint.pt", "model.pt", "config.yaml"):
        assert (out / name).is_file(), name
