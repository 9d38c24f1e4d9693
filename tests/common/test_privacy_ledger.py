"""PrivacyLedger: refusal at the budget boundary, JSON round trip, recomputation."""

from __future__ import annotations

import json

import pytest

from fl_common.privacy import PrivacyLedger, make_accountant

SIGMA, RATE, STEPS = 1.0, 0.01, 100  # one round = 100 DP-SGD steps
BUDGET, DELTA = 2.0, 1e-5


def _rounds_that_fit() -> int:
    """Independent count: the largest k with ε(k rounds) ≤ budget."""
    k = 0
    while make_accountant("rdp", [(SIGMA, RATE, STEPS * (k + 1))]).epsilon(DELTA) <= BUDGET:
        k += 1
    return k


def test_would_exceed_refuses_exactly_the_round_that_crosses() -> None:
    k = _rounds_that_fit()
    assert k == 8  # ε(800 steps) = 1.93 ≤ 2.0 < ε(900 steps) = 2.02
    ledger = PrivacyLedger(BUDGET, DELTA)
    for r in range(1, k + 1):
        assert not ledger.would_exceed(SIGMA, RATE, STEPS), f"round {r} fits and must be allowed"
        ledger.record_round(r, SIGMA, RATE, STEPS)
    assert ledger.epsilon_spent() <= BUDGET
    assert ledger.would_exceed(SIGMA, RATE, STEPS), f"round {k + 1} crosses the budget and must be refused"
    assert ledger.epsilon_if(SIGMA, RATE, STEPS) > BUDGET
    # A cheaper round (more noise) can still fit after the refusal.
    assert not ledger.would_exceed(10.0, RATE, 1)
    assert not ledger.exhausted


def test_records_hold_cumulative_epsilon_and_overspend_is_recorded() -> None:
    ledger = PrivacyLedger(0.5, DELTA)
    first = ledger.record_round(1, SIGMA, RATE, STEPS)
    second = ledger.record_round(2, SIGMA, RATE, STEPS)
    assert 0 < first.epsilon < second.epsilon == ledger.epsilon_spent()
    assert second.epsilon == pytest.approx(make_accountant("rdp", [(SIGMA, RATE, 2 * STEPS)]).epsilon(DELTA), rel=1e-12)
    assert ledger.exhausted and ledger.epsilon_remaining() == 0.0
    with pytest.raises(ValueError, match="round must increase"):
        ledger.record_round(2, SIGMA, RATE, STEPS)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_json_round_trip(kind: str) -> None:
    if kind == "pld":
        pytest.importorskip("opacus")
    ledger = PrivacyLedger(8.0, 1e-6, accountant=kind, num_records=60_000)
    ledger.record_round(1, 1.1, 0.004, 250)
    ledger.record_round(2, 0.9, 0.004, 250)
    ledger.record_round(5, 1.3, 0.01, 80)
    restored = PrivacyLedger.from_json(ledger.to_json())
    assert restored.records == ledger.records
    assert restored.epsilon_spent() == ledger.epsilon_spent()
    assert (restored.epsilon_budget, restored.delta, restored.accountant_kind, restored.num_records) == (8.0, 1e-6, kind, 60_000)
    assert restored.would_exceed(1.0, 0.004, 250) == ledger.would_exceed(1.0, 0.004, 250)


def test_stored_epsilon_is_recomputed_not_trusted() -> None:
    ledger = PrivacyLedger(BUDGET, DELTA)
    ledger.record_round(1, SIGMA, RATE, STEPS)
    data = json.loads(ledger.to_json())
    data["rounds"][0]["epsilon"] = 0.0001  # a hand-edited (or stale) value
    restored = PrivacyLedger.from_dict(data)
    assert restored.records[0].epsilon == ledger.records[0].epsilon
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        PrivacyLedger.from_dict(data)


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="epsilon_budget"):
        PrivacyLedger(0.0, 1e-5)
    with pytest.raises(ValueError, match="num_records"):
        PrivacyLedger(1.0, 1e-3, num_records=1000)
