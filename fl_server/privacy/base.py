"""The interface both DP granularities implement, the round they plan, and the budget stop.

Why an abstract class (in the manner of Opacus' ``IAccountant``): the coordinator drives
either granularity through the same calls at the same points of a round, so it never asks
which one it holds. What both share (the budget, δ, the checkpoint format, the common part of
the summary) lives here once; what differs (who is charged when, where the noise is added)
lives in :mod:`.sample_level` and :mod:`.client_level`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from fl_common.config import ConfigError
from fl_common.privacy.client_dp import SAMPLING_NOTES
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_server.strategies.base import Aggregator

from .aggregator import DPFedAvgAggregator
from .settings import DPSettings

__all__ = ["BudgetExhausted", "ClientId", "DPRound", "ServerDP", "STATE_VERSION", "calibrate_or_refuse", "check_delta"]

log = logging.getLogger("fl_server.privacy")

ClientId = int | str
T = TypeVar("T")

#: version of :meth:`ServerDP.state_dict`'s format (one format for both granularities)
STATE_VERSION = 1


class BudgetExhausted(RuntimeError):
    """The next round would cross the privacy budget: the run ends here, with this message."""


# --------------------------------------------------------------------------- the open round
@dataclass
class DPRound:
    """What the DP side fixed when a round was planned (per-round privacy parameters)."""

    round: int
    selected: list[ClientId]
    available: int
    clip_norm: float
    #: client level: sampling rate of this round and the multiplier of the update's own noise
    sample_rate: float = 0.0
    update_noise_multiplier: float = 0.0
    #: sample level: planned (q_k, steps_k) per selected client, and who has been charged
    plans: dict[ClientId, tuple[float, int]] = field(default_factory=dict)
    charged: set[ClientId] = field(default_factory=set)
    aggregator: DPFedAvgAggregator | None = None

    def to_json(self) -> dict[str, Any]:
        """What a driver persists with the open round (``RoundPlan.privacy``) to restore it after a restart."""
        return {"round": self.round, "selected": list(self.selected), "available": self.available, "clip_norm": self.clip_norm,
                "sample_rate": self.sample_rate, "update_noise_multiplier": self.update_noise_multiplier,
                "plans": [[cid, q, steps] for cid, (q, steps) in self.plans.items()]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DPRound:
        return cls(round=int(data["round"]), selected=list(data["selected"]), available=int(data["available"]),
                   clip_norm=float(data["clip_norm"]), sample_rate=float(data["sample_rate"]),
                   update_noise_multiplier=float(data["update_noise_multiplier"]),
                   plans={cid: (float(q), int(steps)) for cid, q, steps in data["plans"]})


# --------------------------------------------------------------------------- set-up checks both use
def check_delta(delta: float, count: int, what: str) -> None:
    """δ must be below 1/n for the n units DP protects (records or clients)."""
    if not delta < 1.0 / count:
        raise ConfigError(f"config key 'dp_delta' has value {delta:g}: it must be below 1/{count} = {1.0 / count:.3g} "
                          f"for {count} {what} (a delta >= 1/n allows publishing a random record in the clear)")


def calibrate_or_refuse(calibrate: Callable[[], T], epsilon: float, delta: float) -> T:
    """Runs a calibration; a budget no noise can meet becomes a :class:`ConfigError` naming it."""
    try:
        return calibrate()
    except ValueError as exc:
        raise ConfigError(f"cannot calibrate the noise for dp_epsilon={epsilon:g}, dp_delta={delta:g}: {exc}") from None


# --------------------------------------------------------------------------- the interface
class ServerDP(ABC):
    """The server's side of one DP granularity, called by the coordinator at four points of a round.

    1. construction: σ calibrated (or given), the expected final ε computed;
    2. :meth:`eligible` before a round: the budget is checked *before* anything is spent,
       :class:`BudgetExhausted` ends the run with a message instead of crossing it;
    3. :meth:`begin_round` / :meth:`configure` / :meth:`new_aggregator` / :meth:`receive`: the
       per-client instructions and the checks on what comes back;
    4. :meth:`end_round`: the spending recorded, ε after the round returned.
    """

    #: "sample" or "client": what summaries and checkpoints call this granularity
    mode: ClassVar[str]

    def __init__(self, settings: DPSettings, client_sizes: Mapping[ClientId, int] | None = None, *,
                 seeded_noise: bool = False) -> None:
        self.settings = settings
        self.accountant = settings.accountant
        self.epsilon_budget = settings.epsilon
        self.delta = settings.delta
        self.seeded_noise = seeded_noise
        self.clip_norm = settings.clip_norm
        self.client_sizes: dict[ClientId, int] = {}
        self.noise_multiplier = 0.0
        self.expected_epsilon = 0.0
        #: rounds per client (sample level) or per run (client level) the noise is calibrated for
        self.planned_rounds = settings.num_rounds
        self.stop_reason: str | None = None
        self.round_epsilons: dict[int, float] = {}
        for cid, n in (client_sizes or {}).items():
            self.register_client(cid, n)

    def register_client(self, cid: ClientId, num_samples: int) -> None:
        """Records a client's number of records (sample level needs it to plan q_k and steps_k).

        The REST driver calls this when a client reports its sample count; counts are treated
        as public, as Opacus treats ``len(dataset)``.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"client {cid} reports {num_samples!r} samples; expected an integer >= 1")
        self.client_sizes[cid] = int(num_samples)

    # ------------------------------------------------------------------ the round
    def poisson_sampling_rate(self) -> float | None:
        """The rate at which this granularity's accountant assumes clients are Poisson-sampled, or None
        when the selection policy draws the round (sample level: each client accounts its own records,
        so who is selected does not enter its epsilon). With a rate the coordinator samples the round
        itself, runs it whatever the draw gave (empty included) and ignores min_clients for it."""
        return None

    @abstractmethod
    def eligible(self, round_number: int, available: Sequence[ClientId], k: int | None = None) -> list[ClientId]:
        """The clients that may be selected for this round of ``k``; raises :class:`BudgetExhausted`."""

    @abstractmethod
    def begin_round(self, round_number: int, selected: Sequence[ClientId], available: int) -> DPRound:
        """Fixes the round's privacy parameters (persisted with the round as ``DPRound.to_json()``)."""

    @abstractmethod
    def configure(self, instr: TrainInstructions, cid: ClientId, ctx: DPRound) -> TrainInstructions:
        """The client's DP instructions for this round."""

    @abstractmethod
    def new_aggregator(self, ctx: DPRound, numel: int, strategy_aggregator: Aggregator) -> Aggregator:
        """The aggregator of this round: the strategy's own, or one that adds the server's noise."""

    @abstractmethod
    def receive(self, update: ClientUpdate, ctx: DPRound) -> None:
        """Checks a selected client's update against the round's DP plan (and charges it where that is the release).

        Called after the coordinator has checked round and selection, before aggregation.
        """

    def charge_release(self, cid: ClientId, ctx: DPRound) -> bool:
        """Charges ``cid`` for ``ctx``'s round because the server has seen its output (once per round);
        True when that added a charge. Only a granularity that releases per update charges here (sample
        level); client level releases the noised aggregate and charges the round when it closes."""
        return False

    @abstractmethod
    def end_round(self, ctx: DPRound) -> float:
        """Records the round's spending; returns ε after the round."""

    @abstractmethod
    def epsilon_spent(self) -> float:
        """The run's ε so far."""

    # ------------------------------------------------------------------ reporting
    @abstractmethod
    def describe(self) -> str:
        """One log line: the mechanism, σ and where it came from, the expected final ε."""

    def summary(self) -> dict[str, Any]:
        """The privacy block of summary.json (and of /status); each granularity adds its own keys."""
        return {
            "differential_privacy": True,
            "mode": self.mode,
            "epsilon_spent": self.epsilon_spent(),
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "noise_multiplier_source": "dp_noise_multiplier" if self.settings.noise_multiplier is not None else "calibrated",
            "expected_final_epsilon": self.expected_epsilon,
            "clip_norm": self.clip_norm,
            "sampling": SAMPLING_NOTES[self.mode],
            "noise_randomness": ("seeded from the run seed (simulation: reproducible, not for deployment)" if self.seeded_noise
                                 else "OS CSPRNG"),
            "stop_reason": self.stop_reason,
        }

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able), one format for both granularities: the keys the other one uses hold
        neutral values here and are filled in by the subclass that owns them."""
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "accountant": self.accountant,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "count_noise_std": 0.0,
            "ledger": None,
            "client_records": [],
            "noise_calibration": "uniform",
            "sigma_by_size": [],
            "round_epsilons": [[r, e] for r, e in sorted(self.round_epsilons.items())],
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuses a checkpoint of another granularity, budget or accountant; restores what both share."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported privacy state version {state.get('version')!r}")
        for key, mine in (("mode", self.mode), ("accountant", self.accountant), ("epsilon_budget", self.epsilon_budget),
                          ("delta", self.delta)):
            if state[key] != mine:
                raise ValueError(f"the checkpoint's privacy {key} is {state[key]!r}, the configuration's {mine!r}")
        self.clip_norm = float(state["clip_norm"])
        self.round_epsilons = {int(r): float(e) for r, e in state["round_epsilons"]}
        self.stop_reason = state.get("stop_reason")
