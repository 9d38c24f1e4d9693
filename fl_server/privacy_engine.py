"""Server-side differential privacy: calibration up front, central noise, the ledger, the budget.

The coordinator owns one :class:`PrivacyEngine` when ``differential_privacy`` is on and calls
it at four points of a round; the engine never sees HTTP or processes, so the simulation and
the REST server get the same guarantee from the same code:

1. construction — σ is calibrated from (dp_epsilon, dp_delta, num_rounds) as Opacus'
   ``make_private_with_epsilon`` does, unless ``dp_noise_multiplier`` overrides it; the
   expected final ε is computed and logged;
2. :meth:`PrivacyEngine.eligible` before a round — the budget is checked *before* anything is
   spent: :class:`BudgetExhausted` ends the run with a message instead of crossing it;
3. :meth:`PrivacyEngine.begin_round` / :meth:`~PrivacyEngine.configure` /
   :meth:`~PrivacyEngine.receive` — per-client instructions (σ, C, q, steps) and the checks on
   what comes back;
4. :meth:`PrivacyEngine.end_round` — the spending is recorded, ε after the round returned.

Two modes (``dp_mode``):

* ``"sample"`` — record-level DP-SGD on every client (the default; see the config schema for
  why). Each client is accounted on its own, over the rounds it took part in, with q_k =
  batch / n_k and the local steps it actually took; the run's ε is the maximum over clients.
  σ is calibrated for a client's *planned participation* (``dp_client_rounds``; default the
  expected ceil(num_rounds × clients_per_round / num_clients)): per client by default
  (``dp_noise_calibration: per_client``: σ_k for the client's own (q_k, steps_k), so every
  client spends the budget — a client's guarantee depends only on the mechanism run on its
  own records, and n_k is treated as public, so a large shard may take less noise than a
  small one at the same ε), or one σ for everyone, set by the worst client (``uniform``, or
  when ``dp_noise_multiplier`` is given). σ_k depends only on n_k and is cached per shard
  size (and checkpointed, so a resumed run uses the same noise). Enforcement is per client: a client
  whose next round would cross the budget is no longer selected, and the run ends when fewer
  than ``min_clients`` can still take part. A client is charged when its update reaches the
  server (its DP-SGD output is the release), whether or not the round later closes.
* ``"client"`` — DP-FedAvg (McMahan et al. 2018). Every update is clipped to C on the client
  (and again here when the noise is central: clipping is idempotent, so an honest client
  loses nothing and a faulty one cannot exceed the sensitivity); the server adds
  N(0, (zC)²) to the *sum* of clipped updates and divides by the number of *selected*
  clients m, fixed when the round is planned: an unweighted mean with a fixed denominator,
  so one client moves the output by at most C / m whatever the sample counts clients report
  (weighting by n_k would make the sensitivity n_max / Σn · C and trust a client-reported
  number). With ``dp_noise: distributed`` each client adds N(0, (zC)²/m) itself and the
  server tops up the share of clients that dropped out. q = selected / available, one step
  per round; the round is charged when it closes (central DP: only the noised aggregate is
  released).

Randomness: a deployment server draws its noise from the OS CSPRNG; the simulation passes
``seeded_noise=True`` so that runs (and resumed runs) are reproducible, and says so in the
summary.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from fl_common.config import ConfigError, FLConfig
from fl_common.privacy import (
    PrivacyLedger,
    adaptive_clip_noise_multiplier,
    calibrate_noise_multiplier,
    gaussian_noise,
    make_accountant,
    secure_generator,
)
from fl_common.privacy.client_dp import (
    SAMPLING_NOTES,
    adaptive_count_noise_std,
    calibrate_worst_case,
    clip_update,
    sample_level_schedule,
    worst_case_epsilon,
)
from fl_common.protocol import ClientUpdate, TrainInstructions, derive_seed
from fl_server.strategies.base import AggregateResult, Aggregator, UpdateRejected, check_update

log = logging.getLogger("fl_server.privacy")

ClientId = int | str

ENGINE_STATE_VERSION = 1
#: Andrew et al. 2021's geometric step for adaptive clipping.
ADAPTIVE_CLIP_LEARNING_RATE = 0.2


class BudgetExhausted(RuntimeError):
    """The next round would cross the privacy budget: the run ends here, with this message."""


# --------------------------------------------------------------------------- the open round
@dataclass
class DPRound:
    """What the engine fixed when a round was planned (per-round privacy parameters)."""

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
    aggregator: "DPFedAvgAggregator | None" = None

    def to_json(self) -> dict[str, Any]:
        """What a driver persists with the open round (``RoundPlan.privacy``) to restore it after a restart."""
        return {"round": self.round, "selected": list(self.selected), "available": self.available, "clip_norm": self.clip_norm,
                "sample_rate": self.sample_rate, "update_noise_multiplier": self.update_noise_multiplier,
                "plans": [[cid, q, steps] for cid, (q, steps) in self.plans.items()]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DPRound":
        return cls(round=int(data["round"]), selected=list(data["selected"]), available=int(data["available"]),
                   clip_norm=float(data["clip_norm"]), sample_rate=float(data["sample_rate"]),
                   update_noise_multiplier=float(data["update_noise_multiplier"]),
                   plans={cid: (float(q), int(steps)) for cid, q, steps in data["plans"]})


class DPFedAvgAggregator(Aggregator):
    """Sum of clipped updates + N(0, σ_sum²), divided by the fixed denominator m (client-level DP).

    ``noise_std`` is the std the *server* adds per coordinate when all m clients arrive (zC
    for central noise, 0 for distributed noise); with distributed noise each missing client's
    share (zC)²/m is added here so the sum always carries (zC)².
    """

    def __init__(self, numel: int, clip_norm: float, full_noise_std: float, denominator: int, *, distributed: bool,
                 clip_on_server: bool, generator: torch.Generator, collect_bits: bool) -> None:
        self._sum = torch.zeros(numel, dtype=torch.float64)
        self._count = 0
        self.clip_norm = clip_norm
        self.full_noise_std = full_noise_std
        self.denominator = denominator
        self.distributed = distributed
        self.clip_on_server = clip_on_server
        self.generator = generator
        self.collect_bits = collect_bits
        self.bits: list[float] = []
        self.server_noise_std: float | None = None

    def add(self, update: ClientUpdate) -> None:
        check_update(update, self._sum.numel())
        delta = update.delta
        if self.collect_bits:
            bit = update.metrics.get("dp_unclipped")
            if bit not in (0.0, 1.0):
                raise UpdateRejected("dp_mismatch", f"update from client {update.client_id} lacks its clipping bit "
                                     f"(metrics['dp_unclipped'] must be 0 or 1 under adaptive clipping)")
            self.bits.append(float(bit))
        if self.clip_on_server:
            delta, _ = clip_update(delta, self.clip_norm)
        self._sum.add_(delta.to(torch.float64))
        self._count += 1

    @property
    def num_updates(self) -> int:
        return self._count

    def noise_std_to_add(self) -> float:
        """Std of the noise this aggregator adds to the sum, given who arrived."""
        if not self.distributed:
            return self.full_noise_std
        missing = max(0, self.denominator - self._count)
        return self.full_noise_std * math.sqrt(missing / self.denominator)

    def result(self) -> AggregateResult:
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        std = self.noise_std_to_add()
        self.server_noise_std = std
        noisy = self._sum + gaussian_noise(self._sum.shape, std, self.generator, dtype=torch.float64)
        return AggregateResult(delta=(noisy / self.denominator).to(torch.float32), total_weight=float(self._count),
                               num_updates=self._count, train_loss=None)


# --------------------------------------------------------------------------- the engine
class PrivacyEngine:
    def __init__(self, cfg: FLConfig, client_sizes: Mapping[ClientId, int] | None = None, *,
                 seeded_noise: bool = False, planned_sizes: Sequence[int] | None = None) -> None:
        """``client_sizes`` registers known clients (the simulation knows them all up front);
        ``planned_sizes`` are the record counts σ is calibrated for when clients are not known yet
        (the REST server: the shard sizes of the configured partition, clients register later
        with :meth:`register_client`). Sample level needs one of the two."""
        if not cfg.differential_privacy:
            raise ValueError("PrivacyEngine needs differential_privacy: true")
        self.cfg = cfg
        self.mode = cfg.dp_mode
        self.accountant = cfg.dp_accountant
        self.epsilon_budget = float(cfg.dp_epsilon)
        self.delta = float(cfg.dp_delta)
        self.seeded_noise = seeded_noise
        self.clip_norm = float(cfg.clip_grad_norm)
        self.client_sizes: dict[ClientId, int] = {}
        self._eps_cache: dict[tuple, float] = {}
        # sample level, per-client calibration: shard size -> (σ, ε it spends over the planned rounds)
        self.calibration = "uniform"
        self.sigma_by_size: dict[int, tuple[float, float]] = {}
        self.noise_multiplier = 0.0
        self.expected_epsilon = 0.0
        self.stop_reason: str | None = None
        # sample level: client -> [(round, σ, q, steps)]
        self.client_records: dict[ClientId, list[tuple[int, float, float, int]]] = {}
        # client level
        self.ledger: PrivacyLedger | None = None
        self.count_noise_std = 0.0
        self.round_epsilons: dict[int, float] = {}

        for cid, n in (client_sizes or {}).items():
            self.register_client(cid, n)
        if self.mode == "sample":
            sizes = list(self.client_sizes.values()) if self.client_sizes else [int(n) for n in planned_sizes or ()]
            if not sizes or min(sizes) < 1:
                raise ConfigError("sample-level differential privacy needs every client's number of records "
                                  "(the coordinator must be given client_sizes or planned_sizes)")
            self._check_delta(sum(sizes), "training records")
            self.planned_rounds = cfg.dp_client_rounds or math.ceil(cfg.num_rounds * cfg.clients_per_round / cfg.num_clients)
            self.calibration = "uniform" if cfg.dp_noise_multiplier is not None else cfg.dp_noise_calibration
            if self.calibration == "uniform":
                phases = [self._phase(n, self.planned_rounds) for n in sorted(set(sizes))]
                self._calibrate_sample(phases)
            else:  # the extremes up front (what is logged); the rest when a client is first selected
                for n in {min(sizes), max(sizes)}:
                    self._sigma_for_size(n)
        elif self.mode == "client":
            self._check_delta(cfg.num_clients, "clients")
            self.planned_rounds = cfg.num_rounds
            q = cfg.clients_per_round / cfg.num_clients
            self.ledger = PrivacyLedger(self.epsilon_budget, self.delta, self.accountant, num_records=cfg.num_clients)
            if cfg.dp_noise_multiplier is not None:
                self.noise_multiplier = float(cfg.dp_noise_multiplier)
            else:
                self.noise_multiplier = self._calibrate(lambda: calibrate_noise_multiplier(
                    self.epsilon_budget, self.delta, q, cfg.num_rounds, self.accountant))
            self.expected_epsilon = make_accountant(self.accountant, [(self.noise_multiplier, q, cfg.num_rounds)]).epsilon(self.delta)
            if cfg.dp_adaptive_clipping:
                self.count_noise_std = adaptive_count_noise_std(self.noise_multiplier, cfg.clients_per_round)
            self.rounds_within_budget = self._rounds_within_budget(q)
        else:
            raise ConfigError(f"config key 'dp_mode' has value {self.mode!r}: allowed 'sample', 'client'")

    # ------------------------------------------------------------------ set-up helpers
    def _check_delta(self, count: int, what: str) -> None:
        if not self.delta < 1.0 / count:
            raise ConfigError(f"config key 'dp_delta' has value {self.delta:g}: it must be below 1/{count} = {1.0 / count:.3g} "
                              f"for {count} {what} (a delta >= 1/n allows publishing a random record in the clear)")

    def _calibrate(self, fn: Any) -> Any:
        try:
            return fn()
        except ValueError as exc:
            raise ConfigError(f"cannot calibrate the noise for dp_epsilon={self.epsilon_budget:g}, dp_delta={self.delta:g}: "
                              f"{exc}") from None

    def _rounds_within_budget(self, q: float) -> int:
        """Client level: how many rounds at (z, q) fit the budget (bisection, ε is monotone in rounds)."""
        lo, hi = 0, self.cfg.num_rounds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if make_accountant(self.accountant, [(self.noise_multiplier, q, mid)]).epsilon(self.delta) <= self.epsilon_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _phase(self, num_samples: int, rounds: int) -> tuple[float, int]:
        q, steps = sample_level_schedule(num_samples, self.cfg.batch_size, self.cfg.local_epochs)
        return q, steps * rounds

    def _calibrate_sample(self, phases: list[tuple[float, int]]) -> None:
        cfg = self.cfg
        if cfg.dp_noise_multiplier is not None:
            self.noise_multiplier = float(cfg.dp_noise_multiplier)
            self.binding_phase = max(phases, key=lambda p: make_accountant("rdp", [(self.noise_multiplier, *p)]).epsilon(self.delta))
        else:
            self.noise_multiplier, self.binding_phase = self._calibrate(
                lambda: calibrate_worst_case(self.epsilon_budget, self.delta, phases, self.accountant))
        self.expected_epsilon = worst_case_epsilon(self.noise_multiplier, [self.binding_phase], self.delta, self.accountant)

    def _sigma_for_size(self, num_samples: int) -> float:
        """σ of a client with ``num_samples`` records (per-client calibration: cached per size)."""
        if self.calibration == "uniform":
            return self.noise_multiplier
        known = self.sigma_by_size.get(num_samples)
        if known is None:
            q, steps = self._phase(num_samples, self.planned_rounds)
            sigma = self._calibrate(lambda: calibrate_noise_multiplier(self.epsilon_budget, self.delta, q, steps, self.accountant))
            known = (sigma, self._epsilon_of(((sigma, q, steps),)))
            self.sigma_by_size[num_samples] = known
            log.debug("sample-level DP: sigma %.4f for %d records (q=%.4g, %d steps planned)", sigma, num_samples, q, steps)
        self.noise_multiplier = max(self.noise_multiplier, known[0])
        self.expected_epsilon = max(self.expected_epsilon, known[1])
        return known[0]

    def client_noise_multiplier(self, cid: ClientId) -> float:
        """The σ this client's DP-SGD runs with."""
        return self._sigma_for_size(self.client_sizes[cid])

    def register_client(self, cid: ClientId, num_samples: int) -> None:
        """Records a client's number of records (sample level needs it to plan q_k and steps_k).

        The REST driver calls this when a client reports its sample count; counts are treated
        as public, as Opacus treats ``len(dataset)``.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"client {cid} reports {num_samples!r} samples; expected an integer >= 1")
        self.client_sizes[cid] = int(num_samples)

    # ------------------------------------------------------------------ accounting
    def _epsilon_of(self, history: tuple[tuple[float, float, int], ...]) -> float:
        """ε of a (merged) history, cached: many clients share the same (σ, q, steps)."""
        if not history:
            return 0.0
        eps = self._eps_cache.get(history)
        if eps is None:
            eps = make_accountant(self.accountant, history).epsilon(self.delta)
            self._eps_cache[history] = eps
        return eps

    @staticmethod
    def _merged(records: Sequence[tuple[int, float, float, int]], extra: tuple[float, float, int] | None = None
                ) -> tuple[tuple[float, float, int], ...]:
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
        """The run's ε: the ledger's (client level) or the maximum over clients (sample level)."""
        if self.mode == "client":
            assert self.ledger is not None
            return self.ledger.epsilon_spent()
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
        """The clients that may be selected for this round of ``k``; raises :class:`BudgetExhausted`."""
        cfg = self.cfg
        done = round_number - 1
        if self.stop_reason is not None:
            raise BudgetExhausted(self.stop_reason)
        if self.mode == "client":
            assert self.ledger is not None
            q = min(cfg.clients_per_round if k is None else k, len(available)) / len(available)
            if self.ledger.would_exceed(self.noise_multiplier, q, 1):
                after = self.ledger.epsilon_if(self.noise_multiplier, q, 1)
                self._stop(f"privacy budget reached: round {round_number} would take epsilon from "
                           f"{self.ledger.epsilon_spent():.4g} to {after:.4g} > dp_epsilon={self.epsilon_budget:g} "
                           f"(delta={self.delta:g}, {self.accountant} accountant); the run ends after {done} rounds")
            return list(available)
        # The run ends when too few of ALL known clients can go on; fewer among the ones reachable
        # right now (REST: clients come and go) only means this round waits for others.
        fits = {cid for cid in self.client_sizes if self._client_fits(cid)}
        if len(fits) < cfg.min_clients:
            self._stop(f"privacy budget reached: only {len(fits)} of {len(self.client_sizes)} clients can take part in round "
                       f"{round_number} without exceeding dp_epsilon={self.epsilon_budget:g} (delta={self.delta:g}, "
                       f"{self.accountant} accountant), fewer than min_clients={cfg.min_clients}; "
                       f"the run ends after {done} rounds")
        return [cid for cid in available if cid in fits]

    def _stop(self, message: str) -> None:
        self.stop_reason = message
        raise BudgetExhausted(message)

    def _generator(self, *purpose: int | str) -> torch.Generator:
        if self.seeded_noise:
            return torch.Generator().manual_seed(derive_seed(self.cfg.seed, *purpose))
        return secure_generator()

    def begin_round(self, round_number: int, selected: Sequence[ClientId], available: int) -> DPRound:
        ctx = DPRound(round=round_number, selected=list(selected), available=int(available), clip_norm=self.clip_norm)
        if self.mode == "client":
            ctx.sample_rate = len(selected) / available
            z = self.noise_multiplier
            ctx.update_noise_multiplier = (adaptive_clip_noise_multiplier(z, self.count_noise_std)
                                           if self.cfg.dp_adaptive_clipping else z)
        else:
            for cid in selected:
                ctx.plans[cid] = self._phase(self.client_sizes[cid], 1)
        return ctx

    def configure(self, instr: TrainInstructions, cid: ClientId, ctx: DPRound) -> TrainInstructions:
        """The client's DP instructions for this round."""
        if self.mode == "sample":
            q, steps = ctx.plans[cid]
            return replace(instr, dp_sample_level=True, dp_noise_multiplier=self.client_noise_multiplier(cid), dp_clip=ctx.clip_norm,
                           dp_sample_rate=q, dp_steps=steps)
        noise = 0.0
        if self.cfg.dp_noise == "distributed":
            noise = ctx.update_noise_multiplier * ctx.clip_norm / math.sqrt(len(ctx.selected))
        return replace(instr, update_clip=ctx.clip_norm, update_noise_std=noise, report_clip_bit=self.cfg.dp_adaptive_clipping)

    def new_aggregator(self, ctx: DPRound, numel: int, strategy_aggregator: Aggregator) -> Aggregator:
        """Client level: the DP-FedAvg aggregator; sample level: the strategy's own (DP is local)."""
        if self.mode == "sample":
            return strategy_aggregator
        distributed = self.cfg.dp_noise == "distributed"
        ctx.aggregator = DPFedAvgAggregator(
            numel, ctx.clip_norm, ctx.update_noise_multiplier * ctx.clip_norm, len(ctx.selected), distributed=distributed,
            clip_on_server=not distributed, generator=self._generator(ctx.round, "dp-central-noise"),
            collect_bits=self.cfg.dp_adaptive_clipping)
        return ctx.aggregator

    def receive(self, update: ClientUpdate, ctx: DPRound) -> None:
        """Checks a selected client's update against its DP plan (and charges it, sample level).

        Called after the coordinator has checked round and selection, before aggregation.
        """
        if self.mode == "client":
            return
        cid = update.client_id
        q, steps = ctx.plans[cid]
        if cid not in ctx.charged:  # its DP-SGD output has reached the server: that is the release
            self.client_records.setdefault(cid, []).append((ctx.round, self.client_noise_multiplier(cid), q, steps))
            ctx.charged.add(cid)
        got_q, got_steps = update.metrics.get("dp_sample_rate"), update.metrics.get("dp_steps")
        if got_q is None or got_steps is None or abs(float(got_q) - q) > 1e-12 or int(got_steps) != steps:
            raise UpdateRejected("dp_mismatch", f"update from client {cid} reports DP-SGD with q={got_q}, steps={got_steps}; "
                                 f"it was instructed q={q}, steps={steps}")

    def end_round(self, ctx: DPRound) -> float:
        """Records the round's spending (client level) and adapts C; returns ε after the round."""
        if self.mode == "client":
            assert self.ledger is not None and ctx.aggregator is not None
            self.ledger.record_round(ctx.round, self.noise_multiplier, ctx.sample_rate, 1)
            if self.cfg.dp_adaptive_clipping:
                self._adapt_clip(ctx)
        eps = self.epsilon_spent()
        self.round_epsilons[ctx.round] = eps
        return eps

    def _adapt_clip(self, ctx: DPRound) -> None:
        """C ← C·exp(−η(b̄ − γ)) from the noised fraction of unclipped updates (Andrew et al. 2021)."""
        assert ctx.aggregator is not None
        m = len(ctx.selected)
        centred = sum(b - 0.5 for b in ctx.aggregator.bits)
        noise = float(gaussian_noise((), self.count_noise_std, self._generator(ctx.round, "dp-count-noise"), dtype=torch.float64))
        fraction = (centred + noise) / m + 0.5
        self.clip_norm = self.clip_norm * math.exp(-ADAPTIVE_CLIP_LEARNING_RATE * (fraction - self.cfg.dp_target_quantile))

    # ------------------------------------------------------------------ reporting
    def describe(self) -> str:
        cfg = self.cfg
        if self.mode == "client":
            how = "dp_noise_multiplier (given)" if cfg.dp_noise_multiplier is not None else "calibrated"
            extra = f", adaptive clipping to quantile {cfg.dp_target_quantile:g}" if cfg.dp_adaptive_clipping else ""
            short = ("" if self.rounds_within_budget >= cfg.num_rounds else
                     f"; the budget allows only {self.rounds_within_budget} of the {cfg.num_rounds} rounds")
            return (f"client-level DP-FedAvg ({cfg.dp_noise} noise{extra}): noise multiplier z={self.noise_multiplier:.4f} "
                    f"({how}), clip C={self.clip_norm:g}, q={cfg.clients_per_round}/{cfg.num_clients}, {cfg.num_rounds} rounds "
                    f"-> expected final epsilon {self.expected_epsilon:.4f} of dp_epsilon={self.epsilon_budget:g} at "
                    f"delta={self.delta:g} ({self.accountant}){short}")
        if self.calibration == "per_client":
            sizes = sorted(self.sigma_by_size)
            small, large = self.sigma_by_size[sizes[0]][0], self.sigma_by_size[sizes[-1]][0]
            return (f"sample-level DP-SGD: noise multiplier calibrated per client for its own (q, steps) over "
                    f"{self.planned_rounds} planned rounds, sigma={small:.4f} for the smallest shard ({sizes[0]} records) ... "
                    f"{large:.4f} for the largest ({sizes[-1]}), per-sample clip C={self.clip_norm:g} -> expected final "
                    f"epsilon {self.expected_epsilon:.4f} per client of dp_epsilon={self.epsilon_budget:g} at "
                    f"delta={self.delta:g} ({self.accountant}); clients are no longer selected once their next round would "
                    f"exceed the budget")
        q, steps = self.binding_phase
        how = "dp_noise_multiplier (given)" if cfg.dp_noise_multiplier is not None else "calibrated"
        return (f"sample-level DP-SGD: noise multiplier sigma={self.noise_multiplier:.4f} ({how}, one for all clients), per-sample clip "
                f"C={self.clip_norm:g}; worst client q={q:.4g}, {steps} steps over {self.planned_rounds} planned rounds -> "
                f"expected final epsilon {self.expected_epsilon:.4f} of dp_epsilon={self.epsilon_budget:g} at "
                f"delta={self.delta:g} ({self.accountant}); clients are no longer selected once their next round would "
                f"exceed the budget")

    def summary(self) -> dict[str, Any]:
        """The privacy block of summary.json (and of /status)."""
        cfg = self.cfg
        out: dict[str, Any] = {
            "differential_privacy": True,
            "mode": self.mode,
            "epsilon_spent": self.epsilon_spent(),
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "noise_multiplier_source": "dp_noise_multiplier" if cfg.dp_noise_multiplier is not None else "calibrated",
            "expected_final_epsilon": self.expected_epsilon,
            "clip_norm": self.clip_norm,
            "sampling": SAMPLING_NOTES[self.mode],
            "noise_randomness": ("seeded from the run seed (simulation: reproducible, not for deployment)" if self.seeded_noise
                                 else "OS CSPRNG"),
            "stop_reason": self.stop_reason,
        }
        if self.mode == "client":
            out.update({
                "noise": cfg.dp_noise,
                "aggregation": "unweighted sum of clipped updates + N(0,(zC)^2), divided by the number of selected clients",
                "clip_norm_initial": float(cfg.clip_grad_norm),
                "adaptive_clipping": cfg.dp_adaptive_clipping,
                "rounds_accounted": len(self.ledger.records) if self.ledger else 0,
                "rounds_within_budget": self.rounds_within_budget,
            })
            if cfg.dp_adaptive_clipping:
                out["count_noise_std"] = self.count_noise_std
                out["target_quantile"] = cfg.dp_target_quantile
        else:
            eps = self.client_epsilons()
            values = sorted(eps.values())
            took_part = [cid for cid, recs in self.client_records.items() if recs]
            rounds = [len(self.client_records.get(cid, [])) for cid in self.client_sizes]
            if self.calibration == "per_client":
                calibrated_for: dict[str, Any] = {"each_client": True, "rounds": self.planned_rounds}
            else:
                q, steps = self.binding_phase
                calibrated_for = {"sample_rate": q, "steps": steps}
            out.update({
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
        """Plain data (JSON-able): the ledger, σ, C and the per-client records."""
        return {
            "version": ENGINE_STATE_VERSION,
            "mode": self.mode,
            "accountant": self.accountant,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "count_noise_std": self.count_noise_std,
            "ledger": self.ledger.to_dict() if self.ledger is not None else None,
            "client_records": [[cid, [list(r) for r in recs]] for cid, recs in self.client_records.items()],
            "noise_calibration": self.calibration,
            "sigma_by_size": [[n, sigma, eps] for n, (sigma, eps) in sorted(self.sigma_by_size.items())],
            "round_epsilons": [[r, e] for r, e in sorted(self.round_epsilons.items())],
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != ENGINE_STATE_VERSION:
            raise ValueError(f"unsupported privacy state version {state.get('version')!r}")
        for key, mine in (("mode", self.mode), ("accountant", self.accountant), ("epsilon_budget", self.epsilon_budget),
                          ("delta", self.delta)):
            if state[key] != mine:
                raise ValueError(f"the checkpoint's privacy {key} is {state[key]!r}, the configuration's {mine!r}")
        # The stored σ wins over a fresh calibration: the rounds already run used it. A checkpoint
        # from before per-client calibration ran one σ for everyone: keep doing so.
        stored_calibration = state.get("noise_calibration", "uniform") if self.mode == "sample" else self.calibration
        if stored_calibration == "uniform" and float(state["noise_multiplier"]) != self.noise_multiplier:
            log.info("resuming with the checkpoint's noise multiplier %.6g (a fresh calibration gave %.6g)",
                     float(state["noise_multiplier"]), self.noise_multiplier)
        self.calibration = stored_calibration
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sigma_by_size.update({int(n): (float(sigma), float(eps)) for n, sigma, eps in state.get("sigma_by_size", [])})
        if self.calibration == "per_client":
            self.noise_multiplier = max(sigma for sigma, _ in self.sigma_by_size.values())
        self.clip_norm = float(state["clip_norm"])
        self.count_noise_std = float(state["count_noise_std"])
        self.ledger = PrivacyLedger.from_dict(state["ledger"]) if state["ledger"] is not None else None
        self.client_records = {cid: [(int(r), float(s), float(q), int(n)) for r, s, q, n in recs]
                               for cid, recs in state["client_records"]}
        self.round_epsilons = {int(r): float(e) for r, e in state["round_epsilons"]}
        self.stop_reason = state.get("stop_reason")
        if self.mode == "client":  # what the stored σ promises for this configuration's num_rounds
            q = self.cfg.clients_per_round / self.cfg.num_clients
            self.expected_epsilon = make_accountant(self.accountant, [(self.noise_multiplier, q, self.cfg.num_rounds)]).epsilon(self.delta)
            self.rounds_within_budget = self._rounds_within_budget(q)
        elif self.calibration == "per_client":
            self.expected_epsilon = max((eps for _, eps in self.sigma_by_size.values()), default=0.0)
        else:
            if not hasattr(self, "binding_phase"):  # constructed per client, resumed from a uniform checkpoint
                phases = [self._phase(n, self.planned_rounds) for n in sorted(set(self.client_sizes.values()))]
                self.binding_phase = max(phases, key=lambda p: make_accountant("rdp", [(self.noise_multiplier, *p)]).epsilon(self.delta))
            self.expected_epsilon = worst_case_epsilon(self.noise_multiplier, [self.binding_phase], self.delta, self.accountant)
