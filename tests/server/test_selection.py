"""Client selection: each policy draws with exactly the inclusion probabilities it states,
stratified selection allocates proportionally, draws depend only on (seed, round), participation
is recorded and survives a resume, and impossible settings are refused with a message.

Statistical checks use a fixed seed and a tolerance derived from the binomial standard error:
over R rounds the empirical frequency of a client with inclusion probability pi has standard
error sqrt(pi (1 - pi) / R); with m clients checked at once the bound is z * se with z the
two-sided normal quantile at family-wise level 1e-3 (Bonferroni), so a correct sampler fails
with probability below 1e-3 for any seed - and this one is fixed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fl_common.config import ConfigError, config_from_dict
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_server.coordinator import Coordinator
from fl_server.selection import (
    SELECTORS,
    AdaptiveSelector,
    CapabilitySelector,
    ClientInfo,
    ParticipationLog,
    StratifiedSelector,
    UniformSelector,
    WeightedSelector,
    inclusion_probabilities,
    jain_index,
    private_label_histogram,
    systematic_sample,
)
from fl_server.selection.strata import assign_strata
from fl_server.simulation import Simulation

OFF = {"differential_privacy": False, "secure_aggregation": False}
FAMILY_ALPHA = 1e-3


def _z(m: int) -> float:
    return float(norm.ppf(1.0 - FAMILY_ALPHA / (2 * m)))


def _assert_frequencies(counts: np.ndarray, pi: np.ndarray, rounds: int) -> None:
    """|count/R - pi| <= z * sqrt(pi (1 - pi) / R) for every client with 0 < pi < 1; pi in {0, 1} exactly."""
    freq = counts / rounds
    sure = (pi <= 0) | (pi >= 1)
    assert np.array_equal(freq[sure], pi[sure]), "certain and impossible clients are drawn always / never"
    m = int((~sure).sum())
    se = np.sqrt(pi[~sure] * (1 - pi[~sure]) / rounds)
    excess = np.abs(freq[~sure] - pi[~sure]) / se
    assert excess.max() <= _z(m), f"worst deviation {excess.max():.2f} standard errors (bound {_z(m):.2f})"


def _draw_counts(selector, clients, k: int, rounds: int) -> np.ndarray:
    ids = [c.client_id for c in clients]
    counts = np.zeros(len(ids))
    for r in range(1, rounds + 1):
        chosen = selector.select(r, clients, k)
        assert len(chosen) == len(set(chosen)) == k
        for c in chosen:
            counts[ids.index(c)] += 1
    return counts


# --------------------------------------------------------------------------- the sampling scheme
def test_inclusion_probabilities_by_hand() -> None:
    assert inclusion_probabilities(np.array([1.0, 1, 2, 4]), 2) == pytest.approx([0.25, 0.25, 0.5, 1.0])
    # a client worth 1.54 slots is taken with certainty; the last slot is shared by the other three
    assert inclusion_probabilities(np.array([1.0, 1, 1, 10]), 2) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    # zero weight: never; fewer positive weights than slots: all of them, and fewer than k drawn
    assert inclusion_probabilities(np.array([0.0, 3, 1]), 1) == pytest.approx([0.0, 0.75, 0.25])
    assert inclusion_probabilities(np.array([0.0, 3, 0]), 2) == pytest.approx([0.0, 1.0, 0.0])


def test_systematic_sampling_hits_its_inclusion_probabilities() -> None:
    rng = np.random.default_rng(11)
    w = np.array([1.0, 2, 3, 5, 8, 13, 21, 0.5, 30, 0])
    pi = inclusion_probabilities(w, 4)
    assert pi.sum() == pytest.approx(4) and pi[8] == 1.0 and pi[9] == 0.0
    rounds = 4000
    counts = np.zeros(len(w))
    for _ in range(rounds):
        idx = systematic_sample(pi, rng)
        assert len(idx) == len(set(idx.tolist())) == 4
        counts[idx] += 1
    _assert_frequencies(counts, pi, rounds)


# --------------------------------------------------------------------------- each policy
def _population(n: int = 16) -> list[ClientInfo]:
    rng = np.random.default_rng(5)
    sizes = [int(s) for s in rng.integers(20, 400, n)]
    sizes[3] = 5000  # large enough to be taken with certainty by the record-weighted policies
    speeds = rng.lognormal(0.0, 1.0, n) * 1000
    return [ClientInfo(i, num_samples=sizes[i], compute_speed=float(speeds[i]), bandwidth=2e6 if i % 2 else None,
                       last_round=[0, 1, 2, 3][i % 4]) for i in range(n)]


@pytest.mark.parametrize("selector", [
    UniformSelector(4), WeightedSelector(4), CapabilitySelector(4, local_epochs=2, model_bytes=400_000),
    AdaptiveSelector(4, local_epochs=2, model_bytes=400_000), AdaptiveSelector(4, selection_staleness_power=-1.0),
], ids=["uniform", "weighted", "capability", "adaptive", "adaptive-favouring-waiting"])
def test_empirical_frequencies_match_stated_probabilities(selector) -> None:
    clients, k, rounds = _population(), 4, 3000
    round_number = 5  # adaptive: staleness = 5 - last_round; fixed here by drawing for the same round number
    pi = np.array(list(selector.probabilities(round_number, clients, k).values()))
    assert pi.sum() == pytest.approx(k)
    ids = [c.client_id for c in clients]
    counts = np.zeros(len(ids))
    for draw in range(rounds):
        chosen = selector.select(round_number, clients, k, draw=draw)
        assert len(set(chosen)) == k
        for c in chosen:
            counts[ids.index(c)] += 1
    _assert_frequencies(counts, pi, rounds)


def test_policies_state_the_documented_probabilities() -> None:
    clients = _population()
    n = np.array([c.num_samples for c in clients], dtype=float)
    t = 2 * n / np.array([c.compute_speed for c in clients]) + np.array(
        [2 * 400_000 / c.bandwidth if c.bandwidth else 0.0 for c in clients])
    staleness = np.maximum(1, 5 - np.array([c.last_round for c in clients]))
    for selector, weights in [
        (WeightedSelector(0), n),
        (CapabilitySelector(0, local_epochs=2, model_bytes=400_000), 1 / t),
        (AdaptiveSelector(0, local_epochs=2, model_bytes=400_000), (n / n.sum()) / staleness / t),
    ]:
        stated = np.array(list(selector.probabilities(5, clients, 4).values()))
        assert stated == pytest.approx(inclusion_probabilities(weights, 4)), selector.name
    assert np.array(list(UniformSelector(0).probabilities(5, clients, 4).values())) == pytest.approx(np.full(16, 0.25))


def test_adaptive_staleness_is_rounds_since_last_accepted_update_plus_one() -> None:
    sel = AdaptiveSelector(0)
    clients = [ClientInfo(i, num_samples=100, compute_speed=100.0, last_round=last) for i, last in enumerate([9, 5, 0])]
    assert sel.staleness(10, clients).tolist() == [1.0, 5.0, 10.0]
    p = sel.probabilities(10, clients, 1)
    assert [p[0], p[1], p[2]] == pytest.approx(np.array([1, 1 / 5, 1 / 10]) / (1 + 1 / 5 + 1 / 10))


def _label_clients() -> tuple[list[ClientInfo], np.ndarray]:
    """20 clients in three planted label groups of 10, 6 and 4 clients, with random sizes."""
    rng = np.random.default_rng(2)
    groups = np.array([0] * 10 + [1] * 6 + [2] * 4)
    clients = []
    for i, g in enumerate(groups):
        hist = rng.integers(0, 5, 10).astype(float)
        hist[g * 3] += rng.integers(80, 200)  # dominant label 0, 3 or 6
        clients.append(ClientInfo(i, num_samples=int(hist.sum()), label_histogram=tuple(hist)))
    return clients, groups


def test_stratified_selection_allocates_each_stratum_in_proportion() -> None:
    clients, planted = _label_clients()
    selector = StratifiedSelector(8, stratify_by="label", num_strata=3)
    strata = selector.strata(clients)
    # k-means recovers the planted groups (up to renumbering)
    assert len({(a, b) for a, b in zip(planted.tolist(), strata.tolist(), strict=False)}) == 3
    k, rounds = 5, 3000
    sizes = np.bincount(strata)
    expected = k * sizes / len(clients)  # 2.5, 1.5, 1.0 slots in some order
    per_stratum = np.zeros((rounds, 3))
    counts = np.zeros(len(clients))
    for r in range(1, rounds + 1):
        chosen = selector.select(r, clients, k)
        assert len(set(chosen)) == k
        for c in chosen:
            per_stratum[r - 1, strata[c]] += 1
            counts[c] += 1
    # every round: floor or ceil of the expected slots, never a stratum left out by chance
    assert np.all(per_stratum >= np.floor(expected)) and np.all(per_stratum <= np.ceil(expected))
    # the rounding is right on average: the extra slot of stratum g is Bernoulli(frac_g)
    frac = expected - np.floor(expected)
    extra = (per_stratum - np.floor(expected)).sum(axis=0)
    _assert_frequencies(extra, frac, rounds)
    # and every client is still drawn with probability k / N, as stated
    stated = np.array(list(selector.probabilities(1, clients, k).values()))
    assert stated == pytest.approx(np.full(20, k / 20))
    _assert_frequencies(counts, stated, rounds)


def test_stratify_by_size_groups_by_record_count() -> None:
    clients = [ClientInfo(i, num_samples=s) for i, s in enumerate([10, 500, 20, 400, 30, 600])]
    groups = assign_strata(clients, "size", 3, seed=0)
    assert groups.tolist() == [0, 2, 0, 1, 1, 2]


def test_selection_depends_only_on_seed_round_and_candidates() -> None:
    clients = _population()
    for name in SELECTORS:
        a = SELECTORS[name](3) if name != "stratified" else StratifiedSelector(3, stratify_by="size")
        b = SELECTORS[name](3) if name != "stratified" else StratifiedSelector(3, stratify_by="size")
        assert a.select(7, clients, 4) == b.select(7, list(reversed(clients)), 4), name  # candidate order is irrelevant
        draws = {tuple(a.select(r, clients, 4)) for r in range(1, 30)}
        assert len(draws) > 1, f"{name}: rounds must differ"
        other = SELECTORS[name](4) if name != "stratified" else StratifiedSelector(4, stratify_by="size")
        assert [other.select(r, clients, 4) for r in range(1, 6)] != [a.select(r, clients, 4) for r in range(1, 6)], name


def test_schema_names_the_policies_that_exist() -> None:
    from fl_common.config.schema import SELECTION_POLICIES
    from fl_server.selection import STRATIFY_BY

    assert (*SELECTORS, "custom") == SELECTION_POLICIES
    assert STRATIFY_BY == ("label", "size")


def test_uniform_draws_are_unchanged_from_the_original_selector() -> None:
    """Runs made before selection became a package must select exactly the same clients."""
    from fl_common.protocol import derive_seed

    pool = list(range(20))
    for r in (1, 2, 9):
        rng = np.random.default_rng(derive_seed(7, r, "selection"))
        expected = sorted(rng.choice(20, size=5, replace=False).tolist())
        assert UniformSelector(7).select(r, pool, 5) == expected


# --------------------------------------------------------------------------- missing reports, refusals
def test_policies_refuse_clients_that_reported_nothing() -> None:
    bare = [ClientInfo(i) for i in range(5)]
    with pytest.raises(ValueError, match="needs every client's num_samples; client 0"):
        WeightedSelector(0).select(1, bare, 2)
    with pytest.raises(ValueError, match="compute_speed"):
        CapabilitySelector(0).select(1, [ClientInfo(i, num_samples=5) for i in range(5)], 2)
    with pytest.raises(ValueError, match="label histogram"):
        StratifiedSelector(0, stratify_by="label").select(1, bare, 2)
    with pytest.raises(ValueError, match="compute_speed must be a finite number > 0"):
        ClientInfo(1, compute_speed=0.0)


@pytest.mark.parametrize("overrides, fragment", [
    ({"selection": "fastest"}, "'selection' has value 'fastest': allowed one of 'uniform', 'weighted'"),
    ({"num_strata": 3}, "'num_strata' has value 3 but selection is 'uniform', not 'stratified'"),
    ({"selection_staleness_power": 0.5}, "not 'adaptive'"),
    ({"label_histogram_epsilon": 1.0}, "no selection policy reads label histograms"),
    ({"selection": "stratified", "num_strata": 30, "num_clients": 20}, "at most num_clients=20"),
    ({"client_speed_sigma": 2.0}, "client_speed_distribution is 'constant'"),
])
def test_impossible_selection_settings_are_refused(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({**OFF, **overrides})


def test_privacy_and_selection_conflicts_are_refused() -> None:
    with pytest.raises(ConfigError, match="set label_histogram_epsilon"):
        config_from_dict({"secure_aggregation": False, "selection": "stratified"})
    with pytest.raises(ConfigError, match="use selection: uniform"):
        config_from_dict({"secure_aggregation": False, "dp_mode": "client", "num_clients": 1000, "dp_delta": 1e-6,
                          "selection": "weighted"})
    cfg = config_from_dict({"secure_aggregation": False, "selection": "stratified", "label_histogram_epsilon": 1.0})
    assert cfg.label_histogram_epsilon == 1.0


def test_label_histograms_are_laplace_noised_reproducibly() -> None:
    counts = np.array([100.0, 0, 40, 7])
    gen = lambda: torch.Generator().manual_seed(9)
    a, b = private_label_histogram(counts, 1.0, gen()), private_label_histogram(counts, 1.0, gen())
    assert a == b and len(a) == 4 and min(a) >= 0.0 and a != tuple(counts)
    # Laplace(1/eps): mean absolute noise 1/eps; over 4000 bins the mean is within 4 standard errors
    many = np.full(4000, 1000.0)
    noise = np.asarray(private_label_histogram(many, 0.5, gen())) - many
    assert abs(np.abs(noise).mean() - 2.0) < 4 * 2.0 / math.sqrt(4000)


# --------------------------------------------------------------------------- participation
def test_participation_log_and_fairness() -> None:
    log = ParticipationLog()
    log.record_round(1, [0, 1], [0], {0: 0.5, 1: 0.5})
    log.record_round(2, [0, 2], [0, 2])
    s = log.summary(range(4))
    assert s["never_selected"] == 1 and s["selected"]["max"] == 2 and s["arrived"]["min"] == 0
    assert s["jain_index_arrived"] == pytest.approx(jain_index([2, 0, 1, 0])) == pytest.approx(9 / (4 * 5))
    assert log.last_round == {0: 2, 2: 2}
    again = ParticipationLog()
    again.load_state_dict(log.state_dict())
    assert again.to_csv() == log.to_csv() and again.last_round == log.last_round
    rows = list(csv.DictReader(log.to_csv().splitlines()))
    assert rows[1] == {"round": "1", "client_id": "1", "selected": "1", "arrived": "0", "probability": "0.5"}
    assert jain_index([3, 3, 3]) == 1.0 and jain_index([6, 0, 0]) == pytest.approx(1 / 3)


def _coordinator(features: tuple[str, ...] = ("client_infos",), **cfg) -> Coordinator:
    config = config_from_dict({"num_clients": 12, "client_selection_ratio": 0.25, "num_rounds": 6, **OFF, **cfg})
    return Coordinator(config, torch.zeros(4), spec_of({"w": torch.zeros(4)}), driver_features=features)


def _close_with_all(coord: Coordinator, plan, missing: int | None = None) -> None:
    for cid in plan.selected:
        if cid != missing:
            coord.submit(ClientUpdate(cid, plan.round, torch.full((4,), 0.1), num_samples=10))
    coord.close_round()


def test_coordinator_uses_client_infos_records_participation_and_resumes_exactly() -> None:
    infos = {i: ClientInfo(i, num_samples=50 + 10 * i, compute_speed=100.0 + i) for i in range(12)}
    a = _coordinator(selection="adaptive")
    for _ in range(3):
        plan = a.plan_round(list(range(12)), infos=infos)
        assert set(plan.probabilities) == set(plan.selected)
        _close_with_all(a, plan, missing=plan.selected[-1])
    rows = a.participation.rows
    assert len(rows) == 9 and sum(r[3] for r in rows) == 6  # 3 rounds x 3 selected, one missing each round
    b = _coordinator(selection="adaptive")
    b.load_state_dict(a.state_dict())
    # the adaptive policy reads last_round from the restored records: the next draws agree
    for _ in range(2):
        pa, pb = a.plan_round(list(range(12)), infos=infos), b.plan_round(list(range(12)), infos=infos)
        assert pa.selected == pb.selected and pa.probabilities == pb.probabilities
        _close_with_all(a, pa)
        _close_with_all(b, pb)
    assert a.participation.to_csv() == b.participation.to_csv()


def test_rest_style_call_without_infos_still_selects_uniformly() -> None:
    coord = _coordinator(features=())
    plan = coord.plan_round(["alice", "bob", "carol", "dave", "erin"], k=2)
    assert len(plan.selected) == 2 and plan.probabilities == dict.fromkeys(plan.selected, 0.4)
    # a driver that passes no client reports is refused a policy that needs them, before any round
    with pytest.raises(ConfigError, match="selection 'weighted' draws on what each client reports"):
        _coordinator(features=(), selection="weighted")
    weighted = _coordinator(selection="weighted")
    with pytest.raises(ValueError, match="num_samples"):
        weighted.plan_round(["alice", "bob"], k=1)


def test_sync_coordinator_refuses_async_mode() -> None:
    with pytest.raises(ConfigError, match="AsyncCoordinator"):
        _coordinator(training_mode="async")


# --------------------------------------------------------------------------- in the real simulation
SYNTH = {"dataset": "synthetic", "model_type": "mlp", "hidden_size": 64, "num_clients": 10, "client_selection_ratio": 0.3,
         "num_rounds": 4, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "max_train_samples": 1500,
         "max_test_samples": 300, "compression": False, "seed": 4, "workers": 0, "data_distribution": "dirichlet", **OFF}


def test_simulation_writes_participation_and_fairness_and_resumes_it(tmp_path: Path) -> None:
    cfg = {**SYNTH, "selection": "adaptive", "client_speed_distribution": "lognormal", "client_evaluation": "on"}
    with Simulation(cfg, tmp_path / "full", progress=False) as full:
        full.train()
        summary = full.save_results()
    with Simulation(cfg, tmp_path / "part", progress=False) as first:
        first.train(rounds=2)
    with Simulation(cfg, tmp_path / "part", resume=True, progress=False) as second:
        second.train()
        second.save_results()
    text = (tmp_path / "full" / "participation_rounds.csv").read_text()
    assert text == (tmp_path / "part" / "participation_rounds.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 4 * 3 and {r["arrived"] for r in rows} == {"1"}
    assert all(0 < float(r["probability"]) <= 1 for r in rows)
    part = summary["participation"]
    assert part["clients"] == 10 and part["selected"]["max"] <= 4 and 0 < part["jain_index_selected"] <= 1
    assert summary["selection"]["policy"] == "adaptive"
    # the report's per-client table agrees with the per-round log, and the report plots it
    per_client = {r["client"]: r for r in csv.DictReader((tmp_path / "full" / "participation.csv").read_text().splitlines())}
    assert len(per_client) == 10
    for cid, r in per_client.items():
        assert int(r["selected"]) == sum(1 for row in rows if row["client_id"] == cid)
        assert int(r["participated"]) == int(r["selected"]) and r["dropped"] == "0"
    assert (tmp_path / "full" / "participation.png").is_file() and (tmp_path / "full" / "client_accuracy.csv").is_file()


def test_label_stratified_simulation_under_dp_uses_noised_histograms() -> None:
    cfg = {**SYNTH, "num_rounds": 1, "selection": "stratified", "num_strata": 3, "differential_privacy": True,
           "label_histogram_epsilon": 0.5, "dp_epsilon": 5.0, "dp_delta": 1e-4, "dp_accountant": "rdp"}
    with Simulation(cfg, progress=False) as sim:
        exact = sim.histograms
        reported = np.array([sim.client_infos[c].label_histogram for c in range(10)])
        assert not np.allclose(reported, exact) and reported.min() >= 0
        plan = sim.coordinator.plan_round(list(range(10)), infos=sim.client_infos)
        assert len(plan.selected) == 3
        assert "epsilon=0.5" in sim.summary()["selection"]["label_histograms"]
