"""The round state machine, shared by the simulation and the REST server.

It knows nothing of HTTP, processes or clocks: a driver asks it to plan a round among the
clients it can reach, hands it the updates that arrive, and asks it to close the round. The
coordinator checks each update (selected? this round? not a duplicate? right shape, finite?),
folds it into the strategy's streaming aggregator, and on close applies the aggregate,
evaluates when due, records the round and checkpoints. Because every random choice is derived
from (seed, round, ...), a coordinator restored from a checkpoint continues exactly as the
uninterrupted one would have.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fl_common.config import ConfigError, FLConfig
from fl_common.protocol import ClientUpdate, TrainInstructions, derive_seed
from fl_common.secagg import Verifier
from fl_common.tensors import ParamSpec
from fl_common.training import EvalResult, learning_rate_at
from fl_server.he import CKKSAggregator, open_ckks_round
from fl_server.privacy import BudgetExhausted, DPRound, ServerDP, make_server_dp
from fl_server.secagg import SecureAggregator, open_secure_round
from fl_server.selection import ClientInfo, ParticipationLog, build_selection, client_infos_for, poisson_sample
from fl_server.store import RoundRecord
from fl_server.strategies import Aggregator, Strategy, UpdateRejected, build_strategy, check_strategy_features
from fl_server.strategies.model_ema import ServerModelEMA

log = logging.getLogger("fl_server.coordinator")

Evaluator = Callable[[torch.Tensor], EvalResult]


class NoEligibleClients(ValueError):
    """Too few of the clients reachable now may take part (privacy budgets); others may come later."""


@dataclass
class RoundPlan:
    round: int
    selected: list[int | str]
    instructions: dict[int | str, TrainInstructions]
    #: the round's DP parameters (``DPRound.to_json()``) when differential privacy is on; a driver
    #: that persists open rounds must persist this too, to restore the round after a restart
    privacy: dict[str, Any] | None = None
    #: each selected client's inclusion probability under the selection policy (participation_rounds.csv)
    probabilities: dict[int | str, float] | None = None
    #: the round's public secure-aggregation parameters (``SecAggParams.to_json()``) when it is on; every
    #: selected client needs them, and its index ``client_ids.index(str(cid)) + 1``
    secagg: dict[str, Any] | None = None


#: closed or aborted rounds whose DP plans stay known (an update refused just after its round closed)
RECENT_DP_ROUNDS = 2


@dataclass
class _OpenRound:
    plan: RoundPlan
    aggregator: Aggregator
    started: float
    arrived: set[int | str] = field(default_factory=set)
    bytes: int = 0
    dp: DPRound | None = None


class Coordinator:
    def __init__(self, cfg: FLConfig, global_vector: torch.Tensor, spec: ParamSpec,
                 evaluator: Evaluator | None = None, strategy: Strategy | None = None, *,
                 client_sizes: Mapping[int | str, int] | None = None, privacy_seeded_noise: bool = False,
                 planned_client_sizes: Sequence[int] | None = None,
                 driver_features: Collection[str] = (),
                 secagg_verifiers: Callable[[int | str], Verifier | None] | None = None) -> None:
        """``client_sizes`` (client -> number of records) is needed for sample-level DP, which plans
        and accounts each client's local DP-SGD steps; ``privacy_seeded_noise`` makes the server's DP
        noise reproducible from the run seed (simulation only; see fl_server/privacy/).
        ``driver_features`` says what the driver itself carries out (see
        :data:`fl_server.strategies.DRIVER_FEATURES`); a configuration that needs a feature the driver
        lacks, or that the strategy cannot be combined with, is refused here
        (:func:`fl_server.strategies.check_strategy_features`), never run half-way.
        ``secagg_verifiers`` (client id -> the signature key it registered, or None) is how secure
        aggregation checks who sent which key and message (fl_common/secagg/auth.py)."""
        if global_vector.numel() != spec.numel:
            raise ValueError("global vector does not match the model spec")
        self.cfg = cfg
        self.spec = spec
        self.global_vector = global_vector.detach().to(torch.float32).clone()
        self.strategy = strategy or build_strategy(cfg)
        check_strategy_features(cfg, self.strategy, driver_features)
        #: the server's moving average of the global model (server_model_ema > 0), else None
        self.model_ema = ServerModelEMA(cfg.server_model_ema) if cfg.server_model_ema > 0 else None
        self._secagg_verifiers = secagg_verifiers
        if cfg.training_mode != "sync":
            raise ConfigError(f"config key 'training_mode' is {cfg.training_mode!r}: this coordinator runs synchronous rounds; "
                              f"asynchronous training runs on fl_server.asynchronous.AsyncCoordinator (python -m fl_server "
                              f"simulate and python -m fl_server serve pick it)")
        self.selector = build_selection(cfg, model_bytes=4 * spec.numel)
        #: who was selected and who arrived in every closed round (participation_rounds.csv, fairness, staleness)
        self.participation = ParticipationLog()
        self._client_sizes = dict(client_sizes or {})
        self.evaluator = evaluator
        self.completed_rounds = 0
        self.history: list[RoundRecord] = []
        self._open: _OpenRound | None = None
        self._recent_dp: dict[int, DPRound] = {}
        self.privacy: ServerDP | None = None
        if cfg.differential_privacy:
            self.privacy = make_server_dp(cfg, client_sizes, seeded_noise=privacy_seeded_noise,
                                          planned_sizes=planned_client_sizes)
            log.info("%s", self.privacy.describe())

    # ------------------------------------------------------------------ planning
    @property
    def server_control(self) -> torch.Tensor | None:
        """SCAFFOLD's server variate c, which the driver sends to every selected client with the global
        model (None for other strategies); valid once a round is planned, fixed until it closes."""
        return self.strategy.server_control()

    @property
    def finished(self) -> bool:
        return self.completed_rounds >= self.cfg.num_rounds or self.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why the run ended before num_rounds (the privacy budget), or None."""
        return self.privacy.stop_reason if self.privacy is not None else None

    @property
    def released_vector(self) -> torch.Tensor:
        """The model the run evaluates and releases: the moving average of the global models when
        ``server_model_ema`` is on (post-processing, no privacy cost), else the global model itself.
        Clients always train from :attr:`global_vector`."""
        if self.model_ema is not None and self.model_ema.started:
            return self.model_ema.value()
        return self.global_vector

    @property
    def current_round(self) -> int | None:
        return self._open.plan.round if self._open else None

    def base_instructions(self, round_number: int) -> TrainInstructions:
        cfg = self.cfg
        lr = learning_rate_at(round_number, cfg.learning_rate, cfg.lr_schedule, decay=cfg.lr_decay,
                              step_size=cfg.lr_step_size, total_rounds=cfg.num_rounds)
        return TrainInstructions(round=round_number, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                 learning_rate=lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, proximal_mu=0.0)

    def plan_round(self, available: Sequence[int | str], k: int | None = None, *,
                   infos: Mapping[int | str, ClientInfo] | None = None, now: float = 0.0) -> RoundPlan:
        """Select ``k`` clients (default: clients_per_round) among ``available`` and open the round.

        The REST driver passes a larger ``k`` to over-select and absorb dropouts. ``infos`` (client
        id -> :class:`ClientInfo`) is what the selection policy may use; without it only ids are
        known (plus ``client_sizes``), which is all ``uniform`` needs. A ``last_round`` left None is
        filled from this coordinator's participation records. ``now`` (the driver's clock) starts the
        secure-aggregation phase deadlines."""
        if self._open is not None:
            raise RuntimeError(f"round {self._open.plan.round} is still open")
        if self.stop_reason is not None:
            raise BudgetExhausted(self.stop_reason)
        if self.finished:
            raise RuntimeError("the run has finished all its rounds")
        if not available:
            raise ValueError("no clients available to select")
        round_number = self.completed_rounds + 1
        reachable = len(available)
        if self.privacy is not None:
            try:  # the budget is checked before anything is spent
                available = self.privacy.eligible(round_number, available, k)
            except BudgetExhausted as exc:
                log.warning("%s", exc)
                raise
            if len(available) < max(1, self.cfg.min_clients):
                raise NoEligibleClients(f"only {len(available)} of the {reachable} available clients can take part in "
                                        f"round {round_number} within their privacy budgets (min_clients="
                                        f"{self.cfg.min_clients})")
        k = min(self.cfg.clients_per_round if k is None else k, len(available))
        poisson_rate = self.privacy.poisson_sampling_rate() if self.privacy is not None else None
        if poisson_rate is not None:  # client-level DP: the draw the accountant assumes (over-selection does not apply)
            drawn = poisson_sample(available, poisson_rate, self._poisson_rng(round_number))
        else:
            drawn = self.selector.draw(round_number, client_infos_for(available, infos, sizes=self._client_sizes,
                                                                      last_rounds=self.participation.last_round), k)
        selected = drawn.selected
        base = self.base_instructions(round_number)
        instructions = {
            cid: self.strategy.configure_client(
                TrainInstructions(**{**base.to_json(), "seed": derive_seed(self.cfg.seed, round_number, cid, "train")}), cid)
            for cid in selected
        }
        aggregator = self.strategy.new_aggregator(round_number, self.global_vector)
        dp: DPRound | None = None
        if self.privacy is not None:
            dp = self.privacy.begin_round(round_number, selected, reachable)
            instructions = {cid: self.privacy.configure(instr, cid, dp) for cid, instr in instructions.items()}
            aggregator = self.privacy.new_aggregator(dp, self.global_vector.numel(), aggregator)
        secagg: dict[str, Any] | None = None
        if self.cfg.secure_aggregation:  # the strategy's (or DP's) aggregator is fed the unmasked (or decrypted) sum only
            sizes = {cid: ((infos or {}).get(cid) or ClientInfo(cid)).num_samples or self._client_sizes.get(cid)
                     for cid in selected}
            if self.cfg.secure_aggregation_method == "ckks":
                ckks = open_ckks_round(self.cfg, round_number, selected, instructions, aggregator, self.global_vector.numel(),
                                       sizes=sizes, now=now)
                aggregator, secagg = ckks, {"method": "ckks", **ckks.params.to_json()}
            else:
                aggregator = open_secure_round(self.cfg, round_number, selected, instructions, aggregator,
                                               self.global_vector.numel(), verifiers=self._secagg_verifiers, sizes=sizes, now=now)
                secagg = aggregator.params.to_json()
        plan = RoundPlan(round_number, selected, instructions, privacy=dp.to_json() if dp is not None else None,
                         probabilities={cid: drawn.probabilities[cid] for cid in selected}, secagg=secagg)
        self._open = _OpenRound(plan, aggregator, time.perf_counter(), dp=dp)
        log.debug("round %d: selected %d clients", round_number, len(selected))
        return plan

    def _poisson_rng(self, round_number: int) -> np.random.Generator:
        """Seeded where the server's DP noise is (the simulation, reproducible), from the OS otherwise:
        under client-level DP the draw is part of the mechanism and must not be predictable."""
        if self.privacy is not None and self.privacy.seeded_noise:
            return np.random.default_rng(derive_seed(self.cfg.seed, round_number, "poisson-clients"))
        return np.random.default_rng(secrets.randbits(128))

    def restore_round(self, plan: RoundPlan, *, elapsed_s: float = 0.0, bytes_so_far: int = 0) -> None:
        """Reopen a round planned before a restart (its durable updates are then re-submitted).

        ``elapsed_s`` and ``bytes_so_far``: how long the round had been open and the traffic other than
        updates (model downloads) it had before the restart, so its history row counts the whole round."""
        if self._open is not None:
            raise RuntimeError(f"round {self._open.plan.round} is still open")
        if self.cfg.secure_aggregation:
            raise RuntimeError(f"round {plan.round} ran secure aggregation, whose state (received keys, shares, the masked "
                               f"sum) is not persisted: it cannot be restored; plan a new round")
        if plan.round != self.completed_rounds + 1:
            raise ValueError(f"cannot restore round {plan.round} after {self.completed_rounds} completed rounds")
        aggregator = self.strategy.new_aggregator(plan.round, self.global_vector)
        dp: DPRound | None = None
        if self.privacy is not None:
            if plan.privacy is None:
                raise ValueError(f"cannot restore round {plan.round} under differential privacy without its privacy "
                                 f"parameters (persist RoundPlan.privacy with the round)")
            dp = DPRound.from_json(plan.privacy)
            aggregator = self.privacy.new_aggregator(dp, self.global_vector.numel(), aggregator)
        self._open = _OpenRound(plan, aggregator, time.perf_counter() - max(0.0, elapsed_s), dp=dp, bytes=int(bytes_so_far))

    @property
    def secagg(self) -> SecureAggregator | None:
        """The open round's secure aggregation (its ``server`` state machine and ``params``), or None."""
        agg = self._open.aggregator if self._open is not None else None
        return agg if isinstance(agg, SecureAggregator) else None

    @property
    def ckks(self) -> CKKSAggregator | None:
        """The open round's CKKS aggregation (public key, ciphertext sum, decrypted sum), or None."""
        agg = self._open.aggregator if self._open is not None else None
        return agg if isinstance(agg, CKKSAggregator) else None

    @property
    def arrived(self) -> set[int | str]:
        return set(self._open.arrived) if self._open else set()

    # ------------------------------------------------------------------ updates
    def submit(self, update: ClientUpdate) -> None:
        """Accept one update into the open round, or raise :class:`UpdateRejected` with a reason."""
        op = self._open
        if op is None or update.round != op.plan.round:
            raise UpdateRejected("wrong_round", f"update for round {update.round} but the open round is "
                                 f"{op.plan.round if op else 'none'}")
        if update.client_id not in op.plan.instructions:
            raise UpdateRejected("not_selected", f"client {update.client_id} was not selected for round {op.plan.round}")
        if update.client_id in op.arrived:
            raise UpdateRejected("duplicate", f"client {update.client_id} already sent its update for round {op.plan.round}")
        if op.dp is not None:
            assert self.privacy is not None
            self.privacy.receive(update, op.dp)  # sample level: charges the client, checks its q and steps
        op.aggregator.add(update)
        op.arrived.add(update.client_id)
        op.bytes += int(update.wire_bytes)

    def add_bytes(self, n: int) -> None:
        """Count traffic that is not an update (model downloads) towards the round's bytes."""
        if self._open is not None:
            self._open.bytes += int(n)

    # ------------------------------------------------------------------ closing
    def evaluation_due(self, round_number: int) -> bool:
        return round_number % self.cfg.evaluation_frequency == 0 or round_number >= self.cfg.num_rounds

    def close_round(self) -> RoundRecord:
        op = self._open
        if op is None:
            raise RuntimeError("no round is open")
        poisson = self.privacy is not None and self.privacy.poisson_sampling_rate() is not None
        if op.aggregator.num_updates < self.cfg.min_clients and not poisson:
            raise RuntimeError(f"round {op.plan.round} has {op.aggregator.num_updates} updates, "
                               f"fewer than min_clients={self.cfg.min_clients}")
        aggregate = op.aggregator.result()
        updated = self.strategy.apply(self.global_vector, aggregate).to(torch.float32)
        if not bool(torch.isfinite(updated).all()):  # keep the last finite model: the round is not applied
            raise FloatingPointError(f"round {op.plan.round}: the global model is no longer finite; lower the learning rate")
        self.global_vector = updated
        if self.model_ema is not None:
            self.model_ema.update(updated)
        epsilon = self.privacy.end_round(op.dp) if self.privacy is not None and op.dp is not None else None
        test: EvalResult | None = None
        if self.evaluator is not None and self.evaluation_due(op.plan.round):
            test = self.evaluator(self.released_vector)
        record = RoundRecord(
            round=op.plan.round,
            test_accuracy=None if test is None else test.accuracy,
            test_loss=None if test is None else test.loss,
            train_loss=aggregate.train_loss,
            clients=aggregate.num_updates,
            seconds=time.perf_counter() - op.started,
            bytes=op.bytes,
            epsilon=epsilon,
        )
        self.history.append(record)
        self.participation.record_round(op.plan.round, op.plan.selected, op.arrived, op.plan.probabilities)
        self.completed_rounds = op.plan.round
        self._forget_open_round()
        return record

    def evaluate_final_model(self) -> RoundRecord | None:
        """Evaluates the model when a run ends early (privacy budget, divergence) after a round that
        ``evaluation_frequency`` skipped, so the run's last record carries its final model's accuracy."""
        if not self.history or self.evaluator is None or self.history[-1].test_accuracy is not None:
            return None
        test = self.evaluator(self.released_vector)
        self.history[-1] = replace(self.history[-1], test_accuracy=test.accuracy, test_loss=test.loss)
        return self.history[-1]

    def abort_round(self) -> None:
        self._forget_open_round()

    def _forget_open_round(self) -> None:
        """Ends the open round, keeping its DP plan a little while for :meth:`charge_refused_update`."""
        if self._open is not None and self._open.dp is not None:
            self._recent_dp[self._open.plan.round] = self._open.dp
            for old in sorted(self._recent_dp)[:-RECENT_DP_ROUNDS]:
                del self._recent_dp[old]
        self._open = None

    def charge_refused_update(self, client_id: int | str, round_number: int) -> bool:
        """Charges a client whose update the server decrypted and then refused (its round closed, or
        aborted, between the early check and the lock): the server has seen that DP-SGD output, so
        under sample-level DP it counts, whether or not it was aggregated. True when a charge was added.
        The charge is in the privacy state from now on and in the checkpoint written after the next round."""
        if self.privacy is None:
            return False
        if self._open is not None and self._open.plan.round == round_number:
            dp = self._open.dp
        else:
            dp = self._recent_dp.get(round_number)
        if dp is None:
            return False
        charged = self.privacy.charge_release(client_id, dp)
        if charged:
            log.info("client %s charged for round %d: its update was decrypted, then refused", client_id, round_number)
        return charged

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        if self._open is not None:
            raise RuntimeError("checkpoint between rounds only")
        return {
            "completed_rounds": self.completed_rounds,
            "global_vector": self.global_vector.clone(),
            "spec": self.spec.to_json(),
            "strategy": self.strategy.state_dict(),
            "history": [r.to_row() for r in self.history],
            "privacy": self.privacy.state_dict() if self.privacy is not None else None,
            "participation": self.participation.state_dict(),
            "model_ema": self.model_ema.state_dict() if self.model_ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        spec = ParamSpec.from_json(state["spec"])
        if spec != self.spec:
            raise ValueError("checkpoint was written for a different model")
        self.completed_rounds = int(state["completed_rounds"])
        self.global_vector = state["global_vector"].to(torch.float32).clone()
        self.strategy.load_state_dict(state["strategy"])
        self.history = [RoundRecord.from_row(r) for r in state["history"]]
        self.participation.load_state_dict(state.get("participation"))
        self._load_model_ema(state.get("model_ema"))
        stored = state.get("privacy")
        if self.privacy is not None:
            if stored is None:
                raise ValueError("the checkpoint has no privacy ledger but differential_privacy is on: its rounds were "
                                 "not accounted, so it cannot be continued privately")
            self.privacy.load_state_dict(stored)
        elif stored is not None:
            raise ValueError("the checkpoint holds a privacy ledger but differential_privacy is off")
        self._open = None

    def _load_model_ema(self, stored: dict[str, Any] | None) -> None:
        """A checkpoint without an average (written with server_model_ema 0, or before the key existed)
        starts the average at its global model, said in the log; one with an average and the key now 0
        drops it (the run goes on releasing the raw global model)."""
        if self.model_ema is None:
            if stored is not None:
                log.warning("the checkpoint holds a model average but server_model_ema is 0: it is dropped and the "
                            "raw global model is evaluated and released from now on")
            return
        if stored is None:
            self.model_ema = ServerModelEMA(self.model_ema.decay)
            if self.completed_rounds > 0:
                log.warning("the checkpoint has no model average: server_model_ema starts at its round-%d global model",
                            self.completed_rounds)
                self.model_ema.update(self.global_vector)
            return
        self.model_ema.load_state_dict(stored)

    def privacy_status(self) -> dict[str, Any]:
        """The privacy block of summary.json and of the REST server's /status."""
        if self.privacy is None:
            return {"differential_privacy": False}
        return self.privacy.summary()
