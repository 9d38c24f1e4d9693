"""Secure aggregation behind the ``Aggregator`` interface: the strategy sees a sum, never an update.

When ``secure_aggregation`` is on, the coordinator wraps the round's aggregator (the strategy's,
or client-level DP's) in a :class:`SecureAggregator`. It owns the round's
:class:`~fl_common.secagg.server.SecAggServer`; ``add`` accepts only :class:`MaskedUpdate` (a
masked input, never a plain delta), and ``result`` unmasks the sum and hands it to the wrapped
aggregator as if it were the updates themselves:

* :class:`WeightedMeanAggregator` (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad): the
  clients mask (n_k / W) x delta_k and the integer n_k; the sum gives the weighted mean exactly
  as the plain aggregator would compute it, up to the fixed-point rounding.
* ``ScaffoldAggregator``: unweighted means of the update and of the variate delta (both masked).
* ``DPFedAvgAggregator`` (client-level DP): the unweighted sum of clipped (and, with distributed
  noise, already noised) updates; the DP aggregator then adds whatever noise it adds and divides
  by the fixed denominator, exactly as without secure aggregation. Adaptive clipping's bits are
  masked too: only their count is released.

Everything else (median, trimmed mean, Krum, q-FedAvg's per-client terms) needs individual
updates and is refused with the reason, before a round starts (by the strategy's flags:
fl_server.strategies.check_strategy_features).

Why the sum is fed back through the wrapped aggregator's own ``add`` rather than re-implementing
its arithmetic: the DP noise, the SCAFFOLD bookkeeping and the weighting stay in one place each.
A weighted mean is fed as one synthetic update carrying the mean with the total weight; the DP
sum as ``count`` updates of sum / count (each within the clip, so server-side clipping, which
is idempotent, leaves them unchanged up to fixed-point rounding).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_common.config import ConfigError, FLConfig
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_common.secagg import (
    MaskedInput,
    Phase,
    PreparedInput,
    SecAggParams,
    SecAggRejected,
    SecAggServer,
    Verifier,
)
from fl_common.secagg.encoding import CLEAR_METRICS as SECAGG_CLEAR_METRICS
from fl_common.secagg.planning import PlanReport, plan_params, plan_report
from fl_server.privacy import DPFedAvgAggregator
from fl_server.strategies.base import AggregateResult, Aggregator, UpdateRejected, WeightedMeanAggregator
from fl_server.strategies.scaffold import ScaffoldAggregator

log = logging.getLogger("fl_server.secagg")

ClientId = int | str
VerifierLookup = Callable[[ClientId], "Verifier | None"]

#: metrics a masked update may carry in the clear: the DP plan numbers the privacy engine checks (the server
#: computed them itself). Training loss and the DP clipping bit travel masked; anything else is dropped.
CLEAR_METRICS = SECAGG_CLEAR_METRICS
#: (n, degree, threshold) of round shapes whose missed failure target was already logged at WARNING
_WARNED_BOUNDS: set[tuple[int, int, int]] = set()
#: the phases a simulated client can drop out in (config key secagg_dropout_phase)
DROPOUT_PHASES = ("all", *tuple(p.value for p in (Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASK)))


@dataclass
class MaskedUpdate(ClientUpdate):
    """A client's masked input as the coordinator receives it: ``delta`` is empty (the server never
    holds the update), ``masked`` is what it sums, ``now`` the driver's clock for the deadlines."""

    masked: MaskedInput | None = None
    now: float = 0.0
    #: the payload checked and unpacked by the driver outside its lock (None: the state machine does it)
    prepared: PreparedInput | None = None

    @classmethod
    def wrap(cls, client_id: ClientId, round_number: int, masked: MaskedInput, *, metrics: Mapping[str, float] | None = None,
             now: float = 0.0, prepared: PreparedInput | None = None) -> MaskedUpdate:
        clear = {k: float(v) for k, v in (metrics or {}).items() if k in CLEAR_METRICS}
        # num_samples is not needed in the clear (the weight is masked); 1 keeps ClientUpdate's contract
        return cls(client_id=client_id, round=round_number, delta=torch.zeros(0), num_samples=1, metrics=clear,
                   wire_bytes=masked.wire_size(), masked=masked, now=now, prepared=prepared)


def secagg_mode(inner: Aggregator) -> str:
    """How this aggregator is fed from a sum: 'weighted', 'scaffold' or 'dp'; ConfigError otherwise."""
    if isinstance(inner, DPFedAvgAggregator):
        return "dp"
    if isinstance(inner, ScaffoldAggregator):
        return "scaffold"
    if isinstance(inner, WeightedMeanAggregator):
        return "weighted"
    raise ConfigError(f"secure aggregation cannot feed {type(inner).__name__}: this aggregation method needs each client's "
                      f"update (or a per-client term) on its own, but the server only ever sees their sum; use fedavg, "
                      f"fedprox, fedavgm, fedadam, fedyogi, fedadagrad or scaffold, or set secure_aggregation: false")


def design_dropout_rate(cfg: FLConfig) -> float:
    """The dropout rate the automatic SecAgg+ graph is sized for: at least 10 %, and at least the
    cumulative simulated rate over the phases it applies to."""
    phases = 4 if cfg.secagg_dropout_phase == "all" else 1
    simulated = 1.0 - (1.0 - cfg.secagg_dropout_rate) ** phases
    return min(0.8, max(0.1, simulated))


def weight_bound_for(selected: Sequence[ClientId], sizes: Mapping[ClientId, int | None]) -> int | None:
    """W = the largest record count among the selected clients (None if any is unknown)."""
    known = [sizes.get(cid) for cid in selected]
    if any(n is None or n < 1 for n in known):
        return None
    return int(max(known))  # type: ignore[type-var]


def distributed_sample_bounds(instr: TrainInstructions, weight_bound: int) -> dict[str, float]:
    """The field's range for one DP-SGD step whose noise is split among the clients (sample level, distributed).

    A client masks (n_k / W) x delta_k with delta_k = -lr (S_k + N_k) / (q n_k): S_k the sum of the Poisson batch's
    clipped gradients (each of norm <= C, at most n_k of them), N_k its noise share N(0, (sigma_share C)^2). So the
    masked vector is -lr (S_k + N_k) / (q W): every coordinate of the signal is within lr C / q, and the noise has
    the same std lr sigma_share C / (q W) on every client. Why the range is not an L2 clip: clipping one client's
    noisy step would make the sum something other than the clipped sum plus one Gaussian, which is what the
    accountant charges; a value beyond the range (10 standard deviations) makes the client refuse to encode."""
    if instr.dp_sample_rate <= 0:
        raise ConfigError("distributed sample-level DP: the round's instructions carry no sampling rate")
    scale = float(instr.learning_rate) / float(instr.dp_sample_rate)
    return {"clip": scale * float(instr.dp_clip),
            "noise_std": scale * float(instr.dp_noise_multiplier) * float(instr.dp_clip) / float(weight_bound)}


def plan_round_params(cfg: FLConfig, round_number: int, selected: Sequence[ClientId],
                      instructions: Mapping[ClientId, TrainInstructions], inner: Aggregator, numel: int, *,
                      weight_bound: int | None, session: bytes | None = None) -> SecAggParams:
    """The round's public SecAgg parameters, from the configuration and what the wrapped aggregator needs."""
    mode = secagg_mode(inner)
    ids = [str(c) for c in selected]
    common: dict[str, Any] = dict(round_number=round_number, client_ids=ids, vector_length=numel,
                                  scale_bits=cfg.secagg_scale_bits, degree=cfg.secagg_graph_degree,
                                  threshold_fraction=cfg.secagg_threshold, dropout_rate=design_dropout_rate(cfg),
                                  session=session)
    if len(selected) < 3:
        raise ConfigError(f"secure aggregation needs at least 3 clients per round, round {round_number} selected "
                          f"{len(selected)}: raise client_selection_ratio or num_clients")
    if mode == "dp":
        first = next(iter(instructions.values()))
        clip, noise = float(first.update_clip), float(first.update_noise_std)
        if clip <= 0:
            raise ConfigError("client-level DP under secure aggregation needs the clients to clip their updates")
        # central noise: clients clip (idempotent re-clip here); distributed: clipped before the noise, no re-clip
        return plan_params(**common, clip=clip, l2_clip=noise == 0.0, noise_std=noise,
                           with_unclipped=bool(first.report_clip_bit))
    if weight_bound is None:
        raise ConfigError("secure aggregation of a sample-weighted mean needs every selected client's number of records "
                          "(the public bound W of the masked weights); the driver must report them (client_sizes / "
                          "ClientInfo.num_samples)")
    with_loss = not cfg.differential_privacy  # under DP the clients do not report a training loss at all
    if cfg.differential_privacy and cfg.dp_mode == "sample" and cfg.dp_noise == "distributed":
        return plan_params(**common, **distributed_sample_bounds(next(iter(instructions.values())), weight_bound),
                           l2_clip=False, weighted=True, weight_bound=weight_bound, with_loss=False)
    if mode == "scaffold":
        return plan_params(**common, clip=cfg.secagg_clip_norm, control_length=numel, weighted=False,
                           weight_bound=weight_bound, with_loss=with_loss)
    return plan_params(**common, clip=cfg.secagg_clip_norm, weighted=True, weight_bound=weight_bound, with_loss=with_loss)


@dataclass
class SecAggRoundStats:
    """What a finished (or aborted) secure round reports to the run's summary."""

    round: int
    params: dict[str, Any]
    phase_bytes: dict[str, dict[str, float]]
    drops: dict[str, int]
    summed: int
    clipped: int
    aborted: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class SecureAggregator(Aggregator):
    """The round's aggregator under secure aggregation (see the module docstring)."""

    def __init__(self, inner: Aggregator, server: SecAggServer, numel: int, *, report: PlanReport | None = None) -> None:
        """``report``: what the planned parameters withstand (failure bound, colluders tolerated); computed for the
        default design rates when not given."""
        self.inner = inner
        self.mode = secagg_mode(inner)
        self.server = server
        self.params = server.params
        self.numel = numel
        self._index = {cid: i + 1 for i, cid in enumerate(self.params.client_ids)}
        self.clipped = 0
        self.report = report if report is not None else plan_report(self.params, dropout_rate=0.1)

    def index_of(self, client_id: ClientId) -> int:
        """The client's SecAgg index (1..n), which its messages carry."""
        try:
            return self._index[str(client_id)]
        except KeyError:
            raise UpdateRejected("not_selected", f"client {client_id} is not in this secure round") from None

    def add(self, update: ClientUpdate) -> None:
        if not isinstance(update, MaskedUpdate) or update.masked is None:
            raise UpdateRejected("not_masked", f"secure aggregation is on: the update of client {update.client_id} must be a "
                                 f"masked input, never a plain delta")
        if update.masked.sender != self.index_of(update.client_id):
            raise UpdateRejected("wrong_sender", f"client {update.client_id} sent a masked input signed as index "
                                 f"{update.masked.sender}")
        try:
            self.server.receive_masked_input(update.masked, update.now, update.prepared)
        except SecAggRejected as exc:
            raise UpdateRejected(exc.code, str(exc)) from None

    @property
    def num_updates(self) -> int:
        return self.server.num_inputs

    def result(self) -> AggregateResult:
        """Unmask (the unmask phase must be over) and let the wrapped aggregator finish the round."""
        res = self.server.result()  # raises SecAggAborted / RuntimeError when there is nothing to release
        sums = res.sums
        count = sums.count
        self.clipped = sums.clipped
        if sums.clipped:
            log.warning("round %d: secure aggregation clipped %d of %d updates to secagg_clip_norm (L2); raise it if "
                        "updates are routinely larger", self.params.round, sums.clipped, count)
        delta = torch.from_numpy(sums.delta)
        if self.mode == "dp":
            share = delta / count
            ones = sums.unclipped if sums.unclipped is not None else None
            for i in range(count):
                metrics = {} if ones is None else {"dp_unclipped": 1.0 if i < ones else 0.0}
                self.inner.add(ClientUpdate(client_id=f"secagg-sum-{i}", round=self.params.round, delta=share,
                                            num_samples=1, metrics=metrics))
            return self.inner.result()
        total_weight = round(sums.weight)
        if total_weight < count:
            raise RuntimeError(f"round {self.params.round}: the secure sum's weight {total_weight} is below its {count} "
                               f"inputs (each weighs at least 1)")
        w = self.params.weight_bound
        metrics: dict[str, float] = {}
        if sums.loss is not None:
            metrics["train_loss"] = w * sums.loss / total_weight
        if self.mode == "weighted":
            mean = delta * (w / total_weight)
            synthetic = ClientUpdate(client_id="secagg-sum", round=self.params.round, delta=mean, num_samples=total_weight,
                                     metrics=metrics)
        else:  # scaffold: unweighted means of both vectors
            assert sums.control is not None
            synthetic = ClientUpdate(client_id="secagg-sum", round=self.params.round, delta=delta / count,
                                     num_samples=total_weight, metrics=metrics,
                                     control_delta=torch.from_numpy(sums.control) / count)
        self.inner.add(synthetic)
        return dataclasses.replace(self.inner.result(), num_updates=count)

    def stats(self) -> SecAggRoundStats:
        s = self.server
        drops: dict[str, int] = {}
        for d in s.drops.values():
            drops[d.phase] = drops.get(d.phase, 0) + 1
        p = self.params
        return SecAggRoundStats(
            round=p.round,
            params={"clients": p.n, "threshold": p.threshold, "degree": min(p.degree, p.n - 1),
                    "complete_graph": p.degree >= p.n - 1, "modulus_bits": p.modulus_bits,
                    "bytes_per_value": p.modulus_bits / 8, "vector_length": p.vector_length,
                    "segments": [s.name for s in p.segments], **self.report.to_json()},
            phase_bytes=s.bytes_per_client(), drops=drops, summed=s.num_inputs if s.phase.value == "done" else 0,
            clipped=self.clipped, aborted=s.abort_reason, events=list(s.events))


def open_secure_round(cfg: FLConfig, round_number: int, selected: Sequence[ClientId],
                      instructions: Mapping[ClientId, TrainInstructions], inner: Aggregator, numel: int, *,
                      verifiers: VerifierLookup | None, sizes: Mapping[ClientId, int | None], now: float,
                      auth: str | None = None) -> SecureAggregator:
    """What the coordinator calls when it plans a round with secure aggregation on."""
    if verifiers is None:
        raise ConfigError("secure aggregation is on, but the driver registered no client keys (secagg_verifiers) with the "
                          "coordinator")
    params = plan_round_params(cfg, round_number, selected, instructions, inner, numel,
                               weight_bound=weight_bound_for(selected, sizes))
    registered: dict[int, Verifier] = {}
    for i, cid in enumerate(selected, start=1):
        v = verifiers(cid)
        if v is not None:
            registered[i] = v
    schemes = {v.scheme for v in registered.values()}
    if auth is None and len(schemes) == 1:
        auth = schemes.pop()
    if auth is not None and auth != params.auth:
        params = dataclasses.replace(params, auth=auth)
    timeouts = {Phase.ADVERTISE_KEYS: cfg.secagg_phase_timeout, Phase.SHARE_KEYS: cfg.secagg_phase_timeout,
                Phase.MASKED_INPUT: cfg.round_timeout, Phase.CONSISTENCY_CHECK: cfg.secagg_phase_timeout,
                Phase.UNMASK: cfg.secagg_phase_timeout}
    registered = {i: v for i, v in registered.items() if v.scheme == params.auth}
    server = SecAggServer(params, registered, now=now, timeouts=timeouts)
    report = plan_report(params, dropout_rate=design_dropout_rate(cfg))
    log.debug("round %d: secure aggregation over %d clients, threshold %d, degree %d, ring Z/2^%d", round_number,
              params.n, params.threshold, min(params.degree, params.n - 1), params.modulus_bits)
    shape = (params.n, min(params.degree, params.n - 1), params.threshold)
    if not report.meets_target:
        emit = log.warning if shape not in _WARNED_BOUNDS else log.debug
        emit("round %d: secure aggregation over %d clients (threshold %d, degree %d) has a failure bound of %.2g (abort, "
             "or a lying server with colluders rebuilding one input), above the target %.0e at %.0f %% dropouts and "
             "%.0f %% colluding clients: it withstands %d colluding share holder(s) per client; more clients per round "
             "lower the bound", round_number, params.n, params.threshold, min(params.degree, params.n - 1),
             report.failure_bound, report.failure_target, 100 * report.dropout_rate, 100 * report.corrupt_rate,
             report.tolerated_corrupt)
        _WARNED_BOUNDS.add(shape)  # once per process and round shape at WARNING (every round repeats it at DEBUG)
    return SecureAggregator(inner, server, numel, report=report)


def quantization_bound(params: SecAggParams, weights: Sequence[int]) -> float:
    """Largest per-coordinate difference between the secure weighted mean and the plain one, from
    rounding alone: each client's encoded value is within 2^-s of (n_k/W) x, so the mean is within
    n W 2^-s / sum(n_k) (unweighted rounds: 2^-s)."""
    s = params.segment("delta")
    assert s is not None
    unit = 2.0 ** -s.scale_bits
    if not params.weighted:
        return unit
    return len(weights) * params.weight_bound * unit / float(sum(weights))


__all__ = [
    "CLEAR_METRICS",
    "DROPOUT_PHASES",
    "MaskedUpdate",
    "SecAggRoundStats",
    "SecureAggregator",
    "open_secure_round",
    "plan_round_params",
    "quantization_bound",
    "secagg_mode",
    "weight_bound_for",
]
