"""The simulation's clients mask their inputs where they train (fl_server/simulation/executor.py: the masking
job travels with the training task) instead of serially in the driver: the rounds must come out the same bit for
bit as when the driver masks. The released sum is exact (masks cancel, the rounding is seeded per client), so the
two runs' models are compared with torch.equal although their keys and masks differ."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fl_server.simulation.executor import LateMaskingJobs, WorkerMasked, mask_trained, with_mask
from fl_server.simulation.secagg import MAX_ATTEMPTS, SecAggSimulation
from tests.server.test_secagg_simulation import _cfg, _coordinator, _updates


def _worker_train(coord, plan):
    """What a client worker does with its task (InProcessExecutor and the pool's workers run these functions)."""

    def train(cids, jobs):
        for update in _updates(coord, plan, cids):
            job = jobs.get(update.client_id)
            yield with_mask(update, None if job is None else mask_trained(job, update))

    return train


@pytest.mark.parametrize("over", [{}, {"aggregation_method": "scaffold"},
                                  {"num_clients": 40, "client_selection_ratio": 0.2, "differential_privacy": True,
                                   "dp_mode": "client", "dp_noise": "central", "dp_accountant": "rdp", "dp_delta": 1e-5,
                                   "dp_noise_multiplier": 1.0, "clip_grad_norm": 0.5, "dp_epsilon": 10.0}])
def test_masking_in_the_workers_gives_the_drivers_result_bit_for_bit(over) -> None:
    cfg = _cfg(**over)
    in_driver, in_workers = SecAggSimulation(cfg), SecAggSimulation(cfg)
    a, b = _coordinator(cfg, in_driver), _coordinator(cfg, in_workers)
    for _ in range(2):
        plan_a = a.plan_round(list(range(cfg.num_clients)))
        plan_b = b.plan_round(list(range(cfg.num_clients)))
        assert plan_a.selected == plan_b.selected
        ra, sa = in_driver.secure_round(a, plan_a, lambda cids, p=plan_a: _updates(a, p, cids))
        seen: list[WorkerMasked] = []

        def counted(cids, jobs, p=plan_b, seen=seen):
            for u in _worker_train(b, p)(cids, jobs):
                assert isinstance(u, WorkerMasked) and u.masked_payload is not None
                # the worker keeps the plain delta (the driver never reads it) and digests the payload for the client
                assert u.delta.numel() == 0 and u.payload_sha256 == hashlib.sha256(u.masked_payload).digest()
                seen.append(u)
                yield u

        rb, sb = in_workers.secure_round(b, plan_b, counted, workers_mask=True)
        assert ra is not None and rb is not None and sa == sb == set(plan_a.selected)
        assert len(seen) == len(plan_b.selected)  # every input was masked by its "worker"
        assert torch.equal(a.global_vector, b.global_vector)
        assert ra.train_loss == rb.train_loss
    assert in_workers.rounds[-1].clipped == in_driver.rounds[-1].clipped


@pytest.mark.slow
def test_pool_workers_mask_and_the_run_matches_the_in_process_one(small_config: dict) -> None:
    """Through the real process pool: the masking job travels with the task (forked workers) and the model is the
    in-process run's, bit for bit."""
    from fl_server.simulation import Simulation

    cfg = {**small_config, "model_type": "mlp", "hidden_size": 32, "num_rounds": 1, "max_train_samples": 600,
           "max_test_samples": 100, "secure_aggregation": True, "num_clients": 4, "client_selection_ratio": 1.0}
    models = []
    for workers in (0, 2):
        with Simulation({**cfg, "workers": workers}, progress=False) as sim:
            sim.train()
            assert sim.secagg is not None and sim.secagg.summary()["rounds_completed"] == 1
            models.append(sim.coordinator.global_vector.clone())
    assert torch.equal(models[0], models[1])


def _pool_like_train(coord, plan, order: list[str]):
    """What the process pool does with LateMaskingJobs: hand out every client's training, run the driver's key phases
    (resolve) while the workers train, then mask each trained update with the job that followed its task."""

    def train(cids, jobs):
        assert isinstance(jobs, LateMaskingJobs)
        order.append(f"train handed out at {coord.secagg.server.phase.value}")
        updates = list(_updates(coord, plan, cids))  # "the workers train"
        jobs.resolve()
        order.append(f"jobs resolved at {coord.secagg.server.phase.value}")
        for update in updates:
            yield with_mask(update, mask_trained(jobs[update.client_id], update))

    return train


def test_training_is_handed_out_before_the_key_phases_and_the_sum_is_the_same() -> None:
    """Without dropouts before the masked input, the workers train while the driver runs phases 0 and 1; the released
    model equals the one of a round whose keys were shared before the training started, bit for bit."""
    cfg = _cfg()
    early, first = SecAggSimulation(cfg), SecAggSimulation(cfg)
    a, b = _coordinator(cfg, early), _coordinator(cfg, first)
    plan_a = a.plan_round(list(range(cfg.num_clients)))
    plan_b = b.plan_round(list(range(cfg.num_clients)))
    order: list[str] = []
    ra, sa = early.secure_round(a, plan_a, _pool_like_train(a, plan_a, order), workers_mask=True)
    rb, sb = first.secure_round(b, plan_b, lambda cids, p=plan_b: _updates(b, p, cids))
    assert order == ["train handed out at advertise_keys", "jobs resolved at masked_input"]
    assert ra is not None and rb is not None and sa == sb == set(plan_a.selected)
    assert torch.equal(a.global_vector, b.global_vector)


def test_with_dropouts_before_training_the_keys_are_shared_first() -> None:
    """A client that drops before its masked input never trains: with such dropouts the phases run before the
    training is handed out, which gets plain jobs for the survivors only."""
    cfg = _cfg(secagg_dropout_rate=0.2, secagg_dropout_phase="share_keys")
    sim = SecAggSimulation(cfg)
    coord = _coordinator(cfg, sim)
    for _ in range(MAX_ATTEMPTS):
        plan = coord.plan_round(list(range(cfg.num_clients)))
        asked: list[tuple[list, str]] = []

        def train(cids, jobs, p=plan, asked=asked):
            asked.append((list(cids), type(jobs).__name__))
            return _worker_train(coord, p)(cids, jobs)

        record, summed = sim.secure_round(coord, plan, train, workers_mask=True)
        if record is not None:
            break
    assert record is not None and asked and asked[0][1] == "dict"
    assert set(asked[0][0]) == summed  # only the clients still in after phase 1 trained, and all are in the sum


def test_late_jobs_resolve_once_and_keep_a_failure() -> None:
    calls: list[int] = []

    def produce():
        calls.append(1)
        return {"a": "job-a"}

    jobs = LateMaskingJobs(produce)
    assert calls == []  # nothing runs until asked
    assert jobs.get("a") == "job-a" and jobs.get("b") is None and len(jobs) == 1
    jobs.resolve()
    assert calls == [1]

    def broken():
        raise RuntimeError("phase 1 failed")

    failed = LateMaskingJobs(broken)
    assert failed.get("a") is None and isinstance(failed.failure, RuntimeError)  # the workers send unmasked
