"""Sample-level DP: record-level DP-SGD on every client, planned and accounted by the server.

Each client is accounted on its own, over the rounds it took part in, with q_k = batch / n_k
and the local steps it actually took; the run's ε is the maximum over clients. σ is calibrated
for a client's *planned participation* (``dp_client_rounds``; default the expected
ceil(num_rounds × clients_per_round / num_clients)): per client by default
(``dp_noise_calibration: per_client``: σ_k for the client's own (q_k, steps_k), so every client
spends the budget — a client's guarantee depends only on the mechanism run on its own records,
and n_k is treated as public, so a large shard may take less noise than a small one at the same
ε), or one σ for everyone, set by the worst client (``uniform``, or when ``dp_noise_multiplier``
is given). σ_k depends only on n_k and is cached per shard size (and checkpointed, so a resumed
run uses the same noise). Enforcement is per client: a client whose next round would cross the
budget is no longer selected, and the run ends when fewer than ``min_clients`` can still take
part. A client is charged when its update reaches the server (its DP-SGD output is the
release), whether or not the round later closes.

Distributed noise (``dp_noise: distributed``, secure aggregation by masking required): a round is one
DP-SGD step per selected client, every client Poisson-sampling its records at the same rate q
(``dp_sample_rate``), and each adds only a share N(0, (σ C)² / t) of the noise, t = ``min_clients``.
The server sees nothing but the masked sum of at least t such steps (the secure round aborts below
min_clients before unmasking), which carries noise of std ≥ σ C on the sum of the clipped gradients:
one record's gradient (norm ≤ C) moves it by at most C, so each participation is charged as a
Poisson-subsampled Gaussian of multiplier σ at rate q to the record's own client, exactly as one
step of local DP-SGD with the whole noise would be. One rate for all means one σ for all. What it
assumes beyond local DP-SGD: the masking holds (an honest-but-curious server) and the selected
clients add their shares (a client that colludes with the server can reveal its own share: t
honest clients per sum are what the guarantee needs). Why bother: the sum of m clients' steps now
carries σ C of noise instead of sqrt(m) σ C, which at epsilon 1 is worth ~4 points of accuracy on
the reference experiment (benchmarks/results/privacy_search/README.md).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from fl_common.config import ConfigError
from fl_common.privacy import calibrate_noise_multiplier, make_accountant
from fl_common.privacy.client_dp import calibrate_worst_case, sample_level_schedule, worst_case_epsilon
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_server.strategies.base import Aggregator, UpdateRejected

from .base import BudgetExhausted, ClientId, DPRound, ServerDP, calibrate_or_refuse, check_delta
from .settings import DPSettings

__all__ = ["SampleLevelDP"]

log = logging.getLogger("fl_server.privacy")

#: one participation of a client: (round, σ, q, steps)
ParticipationRecord = tuple[int, float, float, int]
#: a composed history: ((σ, q, steps), ...), runs of equal (σ, q) merged
History = tuple[tuple[float, float, int], ...]


class SampleLevelDP(ServerDP):
    """Per-client accounting of local DP-SGD; the strategy's aggregator is used as it is (the noise is local)."""

    mode: ClassVar[str] = "sample"
    #: the Poisson rate of the one step per round under distributed noise when dp_sample_rate is not given
    DEFAULT_DISTRIBUTED_SAMPLE_RATE: ClassVar[float] = 0.5

    def __init__(self, settings: DPSettings, client_sizes: Mapping[ClientId, int] | None = None, *,
                 seeded_noise: bool = False, planned_sizes: Sequence[int] | None = None) -> None:
        """``client_sizes`` registers known clients (the simulation knows them all up front);
        ``planned_sizes`` are the record counts σ is calibrated for when clients are not known yet
        (the REST server: the shard sizes of the configured partition, clients register later
        with :meth:`register_client`). One of the two is needed."""
        super().__init__(settings, client_sizes, seeded_noise=seeded_noise)
        #: distributed noise: the shared Poisson rate, and how many shares every released sum holds at least
        self.distributed = settings.noise == "distributed"
        self.sample_rate = float(settings.sample_rate or self.DEFAULT_DISTRIBUTED_SAMPLE_RATE)
        self.noise_shares = max(1, int(settings.min_clients))
        self._eps_cache: dict[History, float] = {}
        #: shard size -> (σ, ε it spends over the planned rounds); per-client calibration fills it lazily
        self.sigma_by_size: dict[int, tuple[float, float]] = {}
        #: client -> its participations, in order
        self.client_records: dict[ClientId, list[ParticipationRecord]] = {}
        #: uniform calibration: the (q, steps) of the worst-off client, which σ was calibrated for
        self.binding_phase: tuple[float, int] | None = None
        #: a given dp_noise_multiplier: how many planned rounds the worst-off client fits (None when calibrated)
        self.rounds_within_budget: int | None = None
        sizes = list(self.client_sizes.values()) if self.client_sizes else [int(n) for n in planned_sizes or ()]
        if not sizes or min(sizes) < 1:
            raise ConfigError("sample-level differential privacy needs every client's number of records "
                              "(the coordinator must be given client_sizes or planned_sizes)")
        check_delta(self.delta, sum(sizes), "training records")
        self.planned_rounds = settings.client_rounds or math.ceil(
            settings.num_rounds * settings.clients_per_round / settings.num_clients)
        # distributed noise: every client runs the same (q, 1 step) per round, so one σ fits all of them
        self.calibration = ("uniform" if settings.noise_multiplier is not None or self.distributed
                            else settings.noise_calibration)
        if self.distributed:
            log.info("sample-level DP with distributed noise: every round is one DP-SGD step per selected client at "
                     "q=%g; local_epochs and batch_size do not apply", self.sample_rate)
        if self.distributed and self.noise_shares < 2:
            log.warning("sample-level DP with distributed noise and min_clients=1: every client adds the whole noise "
                        "(shares of 1/min_clients), which is local DP-SGD with one step per round; raise min_clients to "
                        "the fewest updates a round may close with")
        if self.calibration == "uniform":
            phases = [self._phase(n, self.planned_rounds) for n in sorted(set(sizes))]
            self._calibrate_uniform(phases)
        else:  # the extremes up front (what is logged); the rest when a client is first selected
            for n in {min(sizes), max(sizes)}:
                self._sigma_for_size(n)

    # ------------------------------------------------------------------ calibration
    def _phase(self, num_samples: int, rounds: int) -> tuple[float, int]:
        if self.distributed:  # one step per round at the shared rate
            return self.sample_rate, rounds
        q, steps = sample_level_schedule(num_samples, self.settings.batch_size, self.settings.local_epochs)
        return q, steps * rounds

    def _worst_phase(self, phases: Sequence[tuple[float, int]]) -> tuple[float, int]:
        """The phase with the largest ε at this σ, ranked with the RDP accountant (cheap; the order is what matters)."""
        return max(phases, key=lambda p: make_accountant("rdp", [(self.noise_multiplier, *p)]).epsilon(self.delta))

    def _calibrate_uniform(self, phases: list[tuple[float, int]]) -> None:
        if self.settings.noise_multiplier is not None:
            self.noise_multiplier = float(self.settings.noise_multiplier)
            self.binding_phase = self._worst_phase(phases)
            self._warn_if_short()
        else:
            self.noise_multiplier, self.binding_phase = calibrate_or_refuse(
                lambda: calibrate_worst_case(self.epsilon_budget, self.delta, phases, self.accountant),
                self.epsilon_budget, self.delta)
        self.expected_epsilon = worst_case_epsilon(self.noise_multiplier, [self.binding_phase], self.delta, self.accountant)

    def participations_within_budget(self) -> int:
        """How many of its planned rounds the worst-off client fits in the budget at the given σ
        (bisection over rounds; ε grows with them)."""
        assert self.binding_phase is not None
        q, steps = self.binding_phase
        per_round = max(1, steps // max(1, self.planned_rounds))
        lo, hi = 0, self.planned_rounds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if make_accountant(self.accountant, [(self.noise_multiplier, q, per_round * mid)]).epsilon(self.delta) \
                    <= self.epsilon_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _warn_if_short(self) -> None:
        """A fixed dp_noise_multiplier that cannot last the planned rounds is said at start-up, not found
        out when the run stops early (client-level DP already says so)."""
        fit = self.participations_within_budget()
        self.rounds_within_budget = fit
        if fit < self.planned_rounds:
            log.warning("sample-level DP: with dp_noise_multiplier=%g the worst-off client fits only %d of its %d planned "
                        "rounds in dp_epsilon=%g (delta=%g); the run stops early: raise dp_noise_multiplier or dp_epsilon, "
                        "or leave dp_noise_multiplier unset to calibrate it", self.noise_multiplier, fit, self.planned_rounds,
                        self.epsilon_budget, self.delta)

    def _sigma_for_size(self, num_samples: int) -> float:
        """σ of a client with ``num_samples`` records (per-client calibration: cached per size)."""
        if self.calibration == "uniform":
            return self.noise_multiplier
        known = self.sigma_by_size.get(num_samples)
        if known is None:
            q, steps = self._phase(num_samples, self.planned_rounds)
            sigma = calibrate_or_refuse(
                lambda: calibrate_noise_multiplier(self.epsilon_budget, self.delta, q, steps, self.accountant),
                self.epsilon_budget, self.delta)
            known = (sigma, self._epsilon_of(((sigma, q, steps),)))
            self.sigma_by_size[num_samples] = known
            log.debug("sample-level DP: sigma %.4f for %d records (q=%.4g, %d steps planned)", sigma, num_samples, q, steps)
        self.noise_multiplier = max(self.noise_multiplier, known[0])
        self.expected_epsilon = max(self.expected_epsilon, known[1])
        return known[0]

    def client_noise_multiplier(self, cid: ClientId) -> float:
        """The σ this client's DP-SGD runs with."""
        return self._sigma_for_size(self.client_sizes[cid])

    # ------------------------------------------------------------------ accounting
    def _epsilon_of(self, history: History) -> float:
        """ε of a (merged) history, cached: many clients share the same (σ, q, steps)."""
        if not history:
            return 0.0
        eps = self._eps_cache.get(history)
        if eps is None:
            eps = make_accountant(self.accountant, history).epsilon(self.delta)
            self._eps_cache[history] = eps
        return eps

    @staticmethod
    def _merged(records: Sequence[ParticipationRecord], extra: tuple[float, float, int] | None = None) -> History:
        out: list[tuple[float, float, int]] = []
        items = [(s, q, n) for _, s, q, n in records] + ([extra] if extra else [])
        for sigma, q, n in items:
            if out and out[-1][:2] == (sigma, q):
                out[-1] = (sigma, q, out[-1][2] + n)
            else:
                out.append((sigma, q, n))
        return tuple(out)

    def client_epsilon(self, cid: ClientId) -> float:
        return self._epsilon_of(self._merged(self.client_records.get(cid, [])))

    def client_epsilons(self) -> dict[ClientId, float]:
        """ε of every known client (0 for clients that never took part)."""
        return {cid: self.client_epsilon(cid) for cid in self.client_sizes} | {
            cid: self.client_epsilon(cid) for cid in self.client_records}

    def epsilon_spent(self) -> float:
        """The maximum over clients."""
        return max(self.client_epsilons().values(), default=0.0)

    def _client_fits(self, cid: ClientId) -> bool:
        n = self.client_sizes.get(cid)
        if n is None:
            return False
        records = self.client_records.get(cid, [])
        if not records and self.calibration == "per_client":
            return True  # σ_k is calibrated for planned_rounds >= 1 rounds of this client: the first always fits
        q, steps = self._phase(n, 1)
        history = self._merged(records, (self._sigma_for_size(n), q, steps))
        return self._epsilon_of(history) <= self.epsilon_budget

    # ------------------------------------------------------------------ the round
    def eligible(self, round_number: int, available: Sequence[ClientId], k: int | None = None) -> list[ClientId]:
        if self.stop_reason is not None:
            raise BudgetExhausted(self.stop_reason)
        # The run ends when too few of ALL known clients can go on; fewer among the ones reachable
        # right now (REST: clients come and go) only means this round waits for others.
        fits = {cid for cid in self.client_sizes if self._client_fits(cid)}
        if len(fits) < self.settings.min_clients:
            self.stop_reason = (f"privacy budget reached: only {len(fits)} of {len(self.client_sizes)} clients can take part "
                                f"in round {round_number} without exceeding dp_epsilon={self.epsilon_budget:g} "
                                f"(delta={self.delta:g}, {self.accountant} accountant), fewer than "
                                f"min_clients={self.settings.min_clients}; the run ends after {round_number - 1} rounds")
            raise BudgetExhausted(self.stop_reason)
        return [cid for cid in available if cid in fits]

    def begin_round(self, round_number: int, selected: Sequence[ClientId], available: int) -> DPRound:
        ctx = DPRound(round=round_number, selected=list(selected), available=int(available), clip_norm=self.clip_norm)
        for cid in selected:
            ctx.plans[cid] = self._phase(self.client_sizes[cid], 1)
        return ctx

    def configure(self, instr: TrainInstructions, cid: ClientId, ctx: DPRound) -> TrainInstructions:
        q, steps = ctx.plans[cid]
        return replace(instr, dp_sample_level=True, dp_noise_multiplier=self.client_noise_share(cid), dp_clip=ctx.clip_norm,
                       dp_sample_rate=q, dp_steps=steps)

    def client_noise_share(self, cid: ClientId) -> float:
        """The multiplier of the noise this client adds itself: all of σ, or its 1/t share of the variance when the
        noise is distributed (the accountant charges σ either way: see the module docstring)."""
        sigma = self.client_noise_multiplier(cid)
        return sigma / math.sqrt(self.noise_shares) if self.distributed else sigma

    def new_aggregator(self, ctx: DPRound, numel: int, strategy_aggregator: Aggregator) -> Aggregator:
        """The strategy's own: the noise was added on the clients, step by step."""
        return strategy_aggregator

    def receive(self, update: ClientUpdate, ctx: DPRound) -> None:
        """Charges the client (once per round) and checks it ran the (q, steps) it was told."""
        cid = update.client_id
        q, steps = ctx.plans[cid]
        self.charge_release(cid, ctx)  # its DP-SGD output has reached the server: that is the release
        got_q, got_steps = update.metrics.get("dp_sample_rate"), update.metrics.get("dp_steps")
        if got_q is None or got_steps is None or abs(float(got_q) - q) > 1e-12 or int(got_steps) != steps:
            raise UpdateRejected("dp_mismatch", f"update from client {cid} reports DP-SGD with q={got_q}, steps={got_steps}; "
                                 f"it was instructed q={q}, steps={steps}")

    def charge_release(self, cid: ClientId, ctx: DPRound) -> bool:
        """Charges ``cid`` for its planned (q, steps) of ``ctx``'s round, once; False when it was not in the plan."""
        if cid not in ctx.plans or cid in ctx.charged:
            return False
        q, steps = ctx.plans[cid]
        self.client_records.setdefault(cid, []).append((ctx.round, self.client_noise_multiplier(cid), q, steps))
        ctx.charged.add(cid)
        return True

    def end_round(self, ctx: DPRound) -> float:
        """The clients were charged as their updates arrived; returns ε after the round."""
        eps = self.epsilon_spent()
        self.round_epsilons[ctx.round] = eps
        return eps

    # ------------------------------------------------------------------ reporting
    def describe(self) -> str:
        if self.calibration == "per_client":
            sizes = sorted(self.sigma_by_size)
            small, large = self.sigma_by_size[sizes[0]][0], self.sigma_by_size[sizes[-1]][0]
            return (f"sample-level DP-SGD: noise multiplier calibrated per client for its own (q, steps) over "
                    f"{self.planned_rounds} planned rounds, sigma={small:.4f} for the smallest shard ({sizes[0]} records) ... "
                    f"{large:.4f} for the largest ({sizes[-1]}), per-sample clip C={self.clip_norm:g} -> expected final "
                    f"epsilon {self.expected_epsilon:.4f} per client of dp_epsilon={self.epsilon_budget:g} at "
                    f"delta={self.delta:g} ({self.accountant}); clients are no longer selected once their next round would "
                    f"exceed the budget")
        assert self.binding_phase is not None
        q, steps = self.binding_phase
        how = "dp_noise_multiplier (given)" if self.settings.noise_multiplier is not None else "calibrated"
        if self.distributed:
            return (f"sample-level DP-SGD with distributed noise: one step per round per client on a Poisson sample at "
                    f"q={q:.4g}, per-sample clip C={self.clip_norm:g}; each client adds noise of multiplier "
                    f"{self.noise_multiplier / math.sqrt(self.noise_shares):.4f} (its share of sigma="
                    f"{self.noise_multiplier:.4f}, {how}, over the at least min_clients={self.noise_shares} masked updates "
                    f"of a sum) -> expected final epsilon {self.expected_epsilon:.4f} per client over {self.planned_rounds} "
                    f"planned rounds of dp_epsilon={self.epsilon_budget:g} at delta={self.delta:g} ({self.accountant}); "
                    f"it holds while the masking does and the clients add their shares")
        short = ("" if self.rounds_within_budget is None or self.rounds_within_budget >= self.planned_rounds else
                 f"; the budget allows the worst-off client only {self.rounds_within_budget} of its {self.planned_rounds} "
                 f"planned rounds")
        return (f"sample-level DP-SGD: noise multiplier sigma={self.noise_multiplier:.4f} ({how}, one for all clients), "
                f"per-sample clip C={self.clip_norm:g}; worst client q={q:.4g}, {steps} steps over {self.planned_rounds} planned rounds -> "
                f"expected final epsilon {self.expected_epsilon:.4f} of dp_epsilon={self.epsilon_budget:g} at "
                f"delta={self.delta:g} ({self.accountant}); clients are no longer selected once their next round would "
                f"exceed the budget{short}")

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        eps = self.client_epsilons()
        values = sorted(eps.values())
        took_part = [cid for cid, recs in self.client_records.items() if recs]
        rounds = [len(self.client_records.get(cid, [])) for cid in self.client_sizes]
        if self.calibration == "per_client":
            calibrated_for: dict[str, Any] = {"each_client": True, "rounds": self.planned_rounds}
        else:
            assert self.binding_phase is not None
            q, steps = self.binding_phase
            calibrated_for = {"sample_rate": q, "steps": steps}
        out.update({
            "noise": "distributed" if self.distributed else "local",
            "noise_shares": self.noise_shares if self.distributed else 1,
            "noise_calibration": self.calibration,
            "noise_multiplier_by_size": [[n, sigma] for n, (sigma, _) in sorted(self.sigma_by_size.items())],
            "planned_rounds_per_client": self.planned_rounds,
            "calibrated_for": calibrated_for,
            "per_client_epsilon": {
                "max": values[-1] if values else 0.0,
                "median": statistics.median(values) if values else 0.0,
                "mean": statistics.fmean(values) if values else 0.0,
                "min": values[0] if values else 0.0,
                "clients": len(values),
                "clients_participated": len(took_part),
            },
            "rounds_per_client": {"min": min(rounds, default=0), "max": max(rounds, default=0),
                                  "mean": statistics.fmean(rounds) if rounds else 0.0},
        })
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            client_records=[[cid, [list(r) for r in recs]] for cid, recs in self.client_records.items()],
            noise_calibration=self.calibration,
            sigma_by_size=[[n, sigma, eps] for n, (sigma, eps) in sorted(self.sigma_by_size.items())],
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The stored σ wins over a fresh calibration: the rounds already run used it. A checkpoint from
        before per-client calibration (no ``noise_calibration``) ran one σ for everyone: keep doing so."""
        super().load_state_dict(state)
        stored_calibration = state.get("noise_calibration", "uniform")
        if stored_calibration == "uniform" and float(state["noise_multiplier"]) != self.noise_multiplier:
            log.info("resuming with the checkpoint's noise multiplier %.6g (a fresh calibration gave %.6g)",
                     float(state["noise_multiplier"]), self.noise_multiplier)
        self.calibration = stored_calibration
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sigma_by_size.update({int(n): (float(sigma), float(eps)) for n, sigma, eps in state.get("sigma_by_size", [])})
        if self.calibration == "per_client":
            self.noise_multiplier = max(sigma for sigma, _ in self.sigma_by_size.values())
        self.client_records = {cid: [(int(r), float(s), float(q), int(n)) for r, s, q, n in recs]
                               for cid, recs in state["client_records"]}
        if self.calibration == "per_client":
            self.expected_epsilon = max((eps for _, eps in self.sigma_by_size.values()), default=0.0)
        else:
            if self.binding_phase is None:  # constructed per client, resumed from a uniform checkpoint
                phases = [self._phase(n, self.planned_rounds) for n in sorted(set(self.client_sizes.values()))]
                self.binding_phase = self._worst_phase(phases)
            self.expected_epsilon = worst_case_epsilon(self.noise_multiplier, [self.binding_phase], self.delta, self.accountant)
