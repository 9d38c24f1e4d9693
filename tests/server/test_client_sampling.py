"""Client-level DP samples its rounds the way its accountant assumes: Poisson sampling at
q = clients_per_round / num_clients, a fixed denominator, and every round released whatever the draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_common.config import config_from_dict
from fl_common.privacy import make_accountant
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_server.coordinator import Coordinator
from fl_server.selection import poisson_sample

DELTA = 1e-5


def _coordinator(numel: int = 4000, **cfg: object) -> Coordinator:
    config = config_from_dict({"num_clients": 40, "client_selection_ratio": 0.25, "num_rounds": 50, "differential_privacy": True,
                               "secure_aggregation": False, "dp_mode": "client", "dp_accountant": "rdp", "dp_delta": DELTA,
                               "dp_noise_multiplier": 1.5, "dp_epsilon": 10.0, "clip_grad_norm": 1.0, **cfg})
    return Coordinator(config, torch.zeros(numel), spec_of({"w": torch.zeros(numel)}), privacy_seeded_noise=True)


def test_poisson_sample_includes_each_client_independently_at_the_rate() -> None:
    n, q, draws = 30, 0.3, 4000
    rng = np.random.default_rng(7)
    hits = np.zeros((draws, n), dtype=bool)
    for d in range(draws):
        sel = poisson_sample(list(range(n)), q, rng)
        assert set(sel.probabilities.values()) == {q} and sorted(sel.probabilities) == list(range(n))
        hits[d, sel.selected] = True
    sd = math.sqrt(q * (1 - q) / draws)
    assert np.all(np.abs(hits.mean(axis=0) - q) < 5 * sd)  # every client at rate q
    counts = hits.sum(axis=1)
    assert counts.var() == pytest.approx(n * q * (1 - q), rel=0.15)  # binomial spread, not a fixed m
    pair = (hits[:, 0] & hits[:, 1]).mean()  # independence: P(both) = q^2
    assert abs(pair - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / draws)
    with pytest.raises(ValueError, match="rate"):
        poisson_sample([1, 2], 0.0, rng)


def test_the_ledger_accounts_the_rate_of_the_draw_not_of_who_was_online() -> None:
    coord = _coordinator()
    privacy = coord.privacy
    assert privacy is not None and privacy.poisson_sampling_rate() == pytest.approx(10 / 40)
    sizes = []
    for online in (list(range(40)), list(range(12)), list(range(40))):  # a round with few clients online
        plan = coord.plan_round(online, k=25)  # over-selection asks for more: ignored under Poisson sampling
        assert set(plan.selected) <= set(online)
        assert set(plan.probabilities.values()) == {0.25}
        sizes.append(len(plan.selected))
        for cid in plan.selected:
            coord.submit(ClientUpdate(cid, plan.round, torch.zeros(coord.spec.numel), 10, {}))
        coord.close_round()
    assert [r.sample_rate for r in privacy.ledger.records] == [0.25, 0.25, 0.25]
    expected = make_accountant("rdp", [(1.5, 0.25, 3)]).epsilon(DELTA)
    assert privacy.epsilon_spent() == pytest.approx(expected, rel=1e-12)
    assert sizes[1] <= 12


def test_the_mean_has_a_fixed_denominator_and_an_empty_draw_still_releases_its_noise() -> None:
    coord = _coordinator(num_clients=50, client_selection_ratio=0.04)  # m = 2 expected of 50
    z, clip, m, numel = 1.5, 1.0, 2, coord.spec.numel
    seen_empty = seen_full = False
    for _ in range(40):
        before = coord.global_vector.clone()
        plan = coord.plan_round(list(range(50)))
        delta = torch.zeros(numel)
        delta[0] = 0.5  # every arriving client moves coordinate 0 by 0.5 (within the clip)
        for cid in plan.selected:
            coord.submit(ClientUpdate(cid, plan.round, delta.clone(), 10, {}))
        record = coord.close_round()  # no min_clients refusal: the round is released whatever was drawn
        step = (coord.global_vector - before).double()
        assert record.clients == len(plan.selected)
        # noise N(0, (zC)^2) on the sum, divided by the expected m, never by the realised count
        assert float(step[1:].std()) == pytest.approx(z * clip / m, rel=5 / math.sqrt(2 * numel))
        seen_empty |= not plan.selected
        seen_full |= len(plan.selected) >= 2
        if seen_empty and seen_full:
            break
    assert seen_empty and seen_full, "40 seeded rounds at q = 0.04 of 50 clients include an empty draw"
