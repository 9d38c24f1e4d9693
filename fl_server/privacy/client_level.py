"""Client-level DP: DP-FedAvg (McMahan et al. 2018), the server's side.

Every update is clipped to C on the client (and again here when the noise is central:
clipping is idempotent, so an honest client loses nothing and a faulty one cannot exceed the
sensitivity); the server adds N(0, (zC)²) to the *sum* of clipped updates and divides by the
*expected* number of clients per round m = clients_per_round: an unweighted mean with a fixed
denominator, so one client moves the output by at most C / m whatever the sample counts clients
report (weighting by n_k would make the sensitivity n_max / Σn · C and trust a client-reported
number). With ``dp_noise: distributed`` each client adds N(0, (zC)²/m) itself and the server tops
up the share of the m expected clients that did not arrive.

Sampling is what the accountant assumes. The accountants (PRV, RDP) bound the *Poisson*
subsampled Gaussian under add/remove-one-client adjacency, so this mode draws the round's
clients by Poisson sampling: each client of the population of ``num_clients`` is in the round
independently with probability q = clients_per_round / num_clients (one not online when drawn
simply does not take part, which only lowers its chance). A fixed-size draw of m without
replacement, what the selection policies do, is a different mechanism whose bound (Wang, Balle
and Kasiviswanathan 2019) holds for replace-one adjacency; accounting it as Poisson, as this
code did before, was not exact. The round count varies around m (binomial), the denominator
does not, and a round runs whatever the draw gave, even empty (then it releases noise only):
running it only when enough clients were drawn would make the release depend on who was drawn.
Over-selection does not apply here (it would raise q). One step per round; the round is charged
when it closes (central DP: only the noised aggregate is released). Adaptive clipping (Andrew
et al. 2021) moves C towards a quantile of the update norms from a noised count of unclipped
updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch

from fl_common.privacy import (
    PrivacyLedger,
    adaptive_clip_noise_multiplier,
    calibrate_noise_multiplier,
    gaussian_noise,
    make_accountant,
    secure_generator,
)
from fl_common.privacy.client_dp import adaptive_count_noise_std
from fl_common.protocol import ClientUpdate, TrainInstructions, derive_seed
from fl_server.strategies.base import Aggregator

from .aggregator import DPFedAvgAggregator
from .base import BudgetExhausted, ClientId, DPRound, ServerDP, calibrate_or_refuse, check_delta
from .settings import DPSettings

__all__ = ["ADAPTIVE_CLIP_LEARNING_RATE", "ClientLevelDP"]

log = logging.getLogger("fl_server.privacy")

#: Andrew et al. 2021's geometric step for adaptive clipping.
ADAPTIVE_CLIP_LEARNING_RATE = 0.2


class ClientLevelDP(ServerDP):
    """One ledger for the run: each closed round is one step of the Poisson-subsampled Gaussian at q = m / num_clients."""

    mode: ClassVar[str] = "client"

    def __init__(self, settings: DPSettings, client_sizes: Mapping[ClientId, int] | None = None, *,
                 seeded_noise: bool = False) -> None:
        super().__init__(settings, client_sizes, seeded_noise=seeded_noise)
        check_delta(self.delta, settings.num_clients, "clients")
        self.planned_rounds = settings.num_rounds
        q = self.sampling_rate
        self.ledger = PrivacyLedger(self.epsilon_budget, self.delta, self.accountant, num_records=settings.num_clients)
        if settings.noise_multiplier is not None:
            self.noise_multiplier = float(settings.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_or_refuse(lambda: calibrate_noise_multiplier(
                self.epsilon_budget, self.delta, q, settings.num_rounds, self.accountant), self.epsilon_budget, self.delta)
        self.expected_epsilon = make_accountant(self.accountant, [(self.noise_multiplier, q, settings.num_rounds)]
                                                ).epsilon(self.delta)
        #: std of the noise on the count of unclipped updates (adaptive clipping; 0 otherwise)
        self.count_noise_std = 0.0
        if settings.adaptive_clipping:
            self.count_noise_std = adaptive_count_noise_std(self.noise_multiplier, settings.clients_per_round)
        self.rounds_within_budget = self._rounds_within_budget(q)

    @property
    def sampling_rate(self) -> float:
        """q = clients_per_round / num_clients: each client's chance to be in a round (Poisson sampling)."""
        return self.settings.clients_per_round / self.settings.num_clients

    def poisson_sampling_rate(self) -> float | None:
        """Client-level DP draws its rounds by Poisson sampling at this rate (see the module docstring)."""
        return self.sampling_rate

    def _rounds_within_budget(self, q: float) -> int:
        """How many rounds at (z, q) fit the budget (bisection, ε is monotone in rounds)."""
        lo, hi = 0, self.settings.num_rounds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if make_accountant(self.accountant, [(self.noise_multiplier, q, mid)]).epsilon(self.delta) <= self.epsilon_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _generator(self, *purpose: int | str) -> torch.Generator:
        if self.seeded_noise:
            return torch.Generator().manual_seed(derive_seed(self.settings.seed, *purpose))
        return secure_generator()

    # ------------------------------------------------------------------ the round
    def eligible(self, round_number: int, available: Sequence[ClientId], k: int | None = None) -> list[ClientId]:
        if self.stop_reason is not None:
            raise BudgetExhausted(self.stop_reason)
        q = self.sampling_rate
        if self.ledger.would_exceed(self.noise_multiplier, q, 1):
            after = self.ledger.epsilon_if(self.noise_multiplier, q, 1)
            self.stop_reason = (f"privacy budget reached: round {round_number} would take epsilon from "
                                f"{self.ledger.epsilon_spent():.4g} to {after:.4g} > dp_epsilon={self.epsilon_budget:g} "
                                f"(delta={self.delta:g}, {self.accountant} accountant); the run ends after "
                                f"{round_number - 1} rounds")
            raise BudgetExhausted(self.stop_reason)
        return list(available)

    def begin_round(self, round_number: int, selected: Sequence[ClientId], available: int) -> DPRound:
        ctx = DPRound(round=round_number, selected=list(selected), available=int(available), clip_norm=self.clip_norm)
        ctx.sample_rate = self.sampling_rate
        z = self.noise_multiplier
        ctx.update_noise_multiplier = (adaptive_clip_noise_multiplier(z, self.count_noise_std)
                                       if self.settings.adaptive_clipping else z)
        return ctx

    def configure(self, instr: TrainInstructions, cid: ClientId, ctx: DPRound) -> TrainInstructions:
        noise = 0.0
        if self.settings.noise == "distributed":
            noise = ctx.update_noise_multiplier * ctx.clip_norm / math.sqrt(self.settings.clients_per_round)
        return replace(instr, update_clip=ctx.clip_norm, update_noise_std=noise, report_clip_bit=self.settings.adaptive_clipping)

    def new_aggregator(self, ctx: DPRound, numel: int, strategy_aggregator: Aggregator) -> Aggregator:
        """The DP-FedAvg aggregator (the strategy's own is not used: the mean must have a fixed denominator)."""
        distributed = self.settings.noise == "distributed"
        ctx.aggregator = DPFedAvgAggregator(
            numel, ctx.clip_norm, ctx.update_noise_multiplier * ctx.clip_norm, self.settings.clients_per_round,
            distributed=distributed,
            clip_on_server=not distributed, generator=self._generator(ctx.round, "dp-central-noise"),
            collect_bits=self.settings.adaptive_clipping)
        return ctx.aggregator

    def receive(self, update: ClientUpdate, ctx: DPRound) -> None:
        """Nothing to check or charge per update: only the noised aggregate is released, when the round closes."""

    def end_round(self, ctx: DPRound) -> float:
        """Records the round in the ledger and adapts C; returns ε after the round."""
        assert ctx.aggregator is not None
        self.ledger.record_round(ctx.round, self.noise_multiplier, ctx.sample_rate, 1)
        if self.settings.adaptive_clipping:
            self._adapt_clip(ctx)
        eps = self.epsilon_spent()
        self.round_epsilons[ctx.round] = eps
        return eps

    def _adapt_clip(self, ctx: DPRound) -> None:
        """C ← C·exp(−η(b̄ − γ)) from the noised fraction of unclipped updates (Andrew et al. 2021)."""
        assert ctx.aggregator is not None
        m = self.settings.clients_per_round
        centred = sum(b - 0.5 for b in ctx.aggregator.bits)
        noise = float(gaussian_noise((), self.count_noise_std, self._generator(ctx.round, "dp-count-noise"), dtype=torch.float64))
        fraction = (centred + noise) / m + 0.5
        self.clip_norm = self.clip_norm * math.exp(-ADAPTIVE_CLIP_LEARNING_RATE * (fraction - self.settings.target_quantile))

    def epsilon_spent(self) -> float:
        """The ledger's ε."""
        return self.ledger.epsilon_spent()

    # ------------------------------------------------------------------ reporting
    def describe(self) -> str:
        s = self.settings
        how = "dp_noise_multiplier (given)" if s.noise_multiplier is not None else "calibrated"
        extra = f", adaptive clipping to quantile {s.target_quantile:g}" if s.adaptive_clipping else ""
        short = ("" if self.rounds_within_budget >= s.num_rounds else
                 f"; the budget allows only {self.rounds_within_budget} of the {s.num_rounds} rounds")
        return (f"client-level DP-FedAvg ({s.noise} noise{extra}): noise multiplier z={self.noise_multiplier:.4f} "
                f"({how}), clip C={self.clip_norm:g}, Poisson client sampling q={s.clients_per_round}/{s.num_clients}, "
                f"{s.num_rounds} rounds "
                f"-> expected final epsilon {self.expected_epsilon:.4f} of dp_epsilon={self.epsilon_budget:g} at "
                f"delta={self.delta:g} ({self.accountant}){short}")

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        s = self.settings
        out.update({
            "noise": s.noise,
            "aggregation": "unweighted sum of clipped updates + N(0,(zC)^2), divided by the expected clients per round",
            "client_sampling": f"Poisson, q = {s.clients_per_round}/{s.num_clients} per client per round",
            "clip_norm_initial": s.clip_norm,
            "adaptive_clipping": s.adaptive_clipping,
            "rounds_accounted": len(self.ledger.records),
            "rounds_within_budget": self.rounds_within_budget,
        })
        if s.adaptive_clipping:
            out["count_noise_std"] = self.count_noise_std
            out["target_quantile"] = s.target_quantile
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(count_noise_std=self.count_noise_std, ledger=self.ledger.to_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The stored z wins over a fresh calibration (the rounds already run used it)."""
        super().load_state_dict(state)
        if float(state["noise_multiplier"]) != self.noise_multiplier:
            log.info("resuming with the checkpoint's noise multiplier %.6g (a fresh calibration gave %.6g)",
                     float(state["noise_multiplier"]), self.noise_multiplier)
        self.noise_multiplier = float(state["noise_multiplier"])
        self.count_noise_std = float(state["count_noise_std"])
        if state["ledger"] is None:
            raise ValueError("the checkpoint's client-level privacy state has no ledger: its rounds were not accounted")
        self.ledger = PrivacyLedger.from_dict(state["ledger"])
        # what the stored z promises for this configuration's num_rounds
        q = self.sampling_rate
        self.expected_epsilon = make_accountant(self.accountant, [(self.noise_multiplier, q, self.settings.num_rounds)]
                                                ).epsilon(self.delta)
        self.rounds_within_budget = self._rounds_within_budget(q)
