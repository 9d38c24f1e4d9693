"""The run's privacy budget and what each round spent.

Why a ledger separate from the accountant: the coordinator needs to *refuse* a round before
it runs (``would_exceed``), to survive restarts (``to_json``/``from_json``) and to show per-
round spending. The state is the history of rounds; every ε is recomputed from it with the
named accountant, so a ledger file cannot carry a stale or hand-edited ε into a claim.

A round that ran is always recorded, even if it crossed the budget: a ledger that dropped
spending to stay "within budget" would under-report. ``exhausted`` then says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .accountant import Accountant, make_accountant
from .validation import check_delta, check_epsilon, check_noise_multiplier, check_sample_rate, check_steps

__all__ = ["RoundRecord", "PrivacyLedger", "LEDGER_FORMAT_VERSION"]

LEDGER_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RoundRecord:
    """One round's DP parameters and the cumulative ε after it (informational; recomputed)."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float


class PrivacyLedger:
    """Budget (ε_total, δ) plus the per-round history; ε comes from ``accountant``."""

    def __init__(
        self,
        epsilon_budget: float,
        delta: float,
        accountant: str = "rdp",
        num_records: int | None = None,
    ) -> None:
        self.epsilon_budget = check_epsilon(epsilon_budget, "epsilon_budget")
        self.delta = check_delta(delta, num_records)
        self.num_records = num_records
        self.accountant_kind = accountant
        self._accountant: Accountant = make_accountant(accountant)
        self._records: list[RoundRecord] = []

    # ----------------------------------------------------------------- queries
    @property
    def records(self) -> list[RoundRecord]:
        return list(self._records)

    def epsilon_spent(self) -> float:
        """ε of everything recorded so far, at the ledger's δ."""
        return self._accountant.epsilon(self.delta)

    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_budget - self.epsilon_spent())

    @property
    def exhausted(self) -> bool:
        """True once the recorded rounds have spent more than the budget."""
        return self.epsilon_spent() > self.epsilon_budget

    def epsilon_if(self, next_noise: float, next_rate: float, next_steps: int) -> float:
        """ε the run would have after one more round with these parameters."""
        trial = self._accountant.copy()
        trial.compose(next_noise, next_rate, next_steps)
        return trial.epsilon(self.delta)

    def would_exceed(self, next_noise: float, next_rate: float, next_steps: int) -> bool:
        """True iff running this round would take ε above the budget: the coordinator refuses it."""
        return self.epsilon_if(next_noise, next_rate, next_steps) > self.epsilon_budget

    # ---------------------------------------------------------------- updates
    def record_round(self, round: int, noise_multiplier: float, sample_rate: float, steps: int) -> RoundRecord:
        """Records a round that ran (never refuses: spending that happened must be counted)."""
        if isinstance(round, bool) or not isinstance(round, int):
            raise ValueError(f"round must be an integer; got {round!r}")
        if self._records and round <= self._records[-1].round:
            raise ValueError(f"round must increase; got {round} after {self._records[-1].round}")
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_steps(steps)
        self._accountant.compose(sigma, q, n)
        record = RoundRecord(round=round, noise_multiplier=sigma, sample_rate=q, steps=n, epsilon=self.epsilon_spent())
        self._records.append(record)
        return record

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": LEDGER_FORMAT_VERSION,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": self.accountant_kind,
            "num_records": self.num_records,
            "rounds": [asdict(r) for r in self._records],
        }

    def to_json(self) -> str:
        """JSON with exact float round-trip (Python's repr); ε values are for humans only."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        version = data.get("format_version")
        if version != LEDGER_FORMAT_VERSION:
            raise ValueError(f"unsupported ledger format_version {version!r}; expected {LEDGER_FORMAT_VERSION}")
        ledger = cls(
            epsilon_budget=data["epsilon_budget"],
            delta=data["delta"],
            accountant=data.get("accountant", "rdp"),
            num_records=data.get("num_records"),
        )
        for row in data["rounds"]:
            # The stored ε is ignored: it is recomputed from the history by record_round.
            ledger.record_round(int(row["round"]), float(row["noise_multiplier"]), float(row["sample_rate"]), int(row["steps"]))
        return ledger

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        spent = self.epsilon_spent()
        return (
            f"PrivacyLedger(epsilon {spent:.4g}/{self.epsilon_budget:g} at delta={self.delta:g}, "
            f"{len(self._records)} rounds, accountant={self.accountant_kind!r})"
        )
