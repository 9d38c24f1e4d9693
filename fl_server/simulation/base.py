"""What the synchronous and the asynchronous simulation share: the configuration, the data and its
partitions, the simulated clients (sizes, label histograms, speeds, attackers), the worker pool
that trains them, the codec path of their updates, per-client evaluation, personalization, the run
folder and the common part of summary.json.

Why siblings over a base, not one driver subclassing the other: the two run different coordinators
(:class:`~fl_server.coordinator.Coordinator` closes rounds, :class:`~fl_server.asynchronous.AsyncCoordinator`
folds in updates as they arrive on a virtual clock), return different histories and checkpoint
different state. As siblings each keeps its own precise types (``SimulationBase[Coordinator]``,
``SimulationBase[AsyncCoordinator]``), and what they share is written once, here.

A driver's ``__init__`` calls ``super().__init__`` (everything above), then builds its coordinator,
restores it from :meth:`SimulationBase.checkpoint_to_resume` when asked to, and ends with
:meth:`SimulationBase.finish_setup` (start-up time, run folder).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from fl_common.config import (
    ConfigError,
    FLConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from fl_common.data import ArrayDataset, label_histograms, load_dataset
from fl_common.data.partition import partition
from fl_common.models import count_parameters, model_from_config
from fl_common.privacy import DPIncompatibleModelError, check_dp_compatible
from fl_common.protocol import ClientUpdate, derive_seed
from fl_common.tensors.codecs import make_codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.training import EvalResult, LocalTrainer
from fl_server.asynchronous import AsyncCoordinator, AsyncRecord
from fl_server.coordinator import Coordinator
from fl_server.selection import selection_summary
from fl_server.simulation import evaluation
from fl_server.simulation.attacks import attack_summary, make_attack
from fl_server.simulation.client_speeds import client_speeds, simulated_client_infos
from fl_server.simulation.client_state import ClientVariates
from fl_server.simulation.executor import (
    ClientExecutor,
    InProcessExecutor,
    ProcessPoolExecutor,
    default_workers,
    encode_for_wire,
    release_free_memory,
    resolve_device,
)
from fl_server.simulation.personalization import (
    PersonalizationResult,
    check_federated_config,
    client_executor,
    distribution,
    heldout_measure,
    personalize,
    split_partitions,
)
from fl_server.store import RoundRecord, RunDirectory, accuracy_summary

log = logging.getLogger("fl_server.simulation")

__all__ = ["RESUMABLE_CHANGES", "SimulationBase", "changed_config_keys", "client_partitions", "load_training_data",
           "resolve_config"]

#: Keys that may differ between a run and its resumption (they change how, not what, is computed;
#: finetune_epochs and local_only_epochs only change what is measured after the last round).
RESUMABLE_CHANGES = {"num_rounds", "workers", "threads_per_worker", "device", "eval_batch_size", "evaluation_frequency",
                     "finetune_epochs", "local_only_epochs", "client_evaluation", "backend", "ray_address", "ray_num_cpus",
                     "ray_num_gpus"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FLConfig)}

#: the coordinator a driver runs: every method of the base type-checks against both
CoordinatorT = TypeVar("CoordinatorT", Coordinator, AsyncCoordinator)
SimulationT = TypeVar("SimulationT", bound="SimulationBase[Any]")


def changed_config_keys(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose value differs between a stored run and the current config. A key the stored run
    does not have (added to the schema after it was checkpointed) counts as its default, so new
    keys left at their defaults never stop an older run from resuming."""
    return sorted(k for k in current if k not in RESUMABLE_CHANGES and stored.get(k, _DEFAULTS.get(k)) != current[k])


def resolve_config(config: FLConfig | Mapping[str, Any] | str | Path) -> FLConfig:
    """A config object as given, loaded from a YAML path, or validated from a mapping."""
    if isinstance(config, FLConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    return config_from_dict(config)


def load_training_data(cfg: FLConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test sets as configured, including the seeded train subset and test prefix."""
    train = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
    if train.num_classes != cfg.num_classes:
        raise ConfigError(f"config key 'num_classes' has value {cfg.num_classes}: dataset '{cfg.dataset}' has {train.num_classes} classes")
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        rng = np.random.default_rng(derive_seed(cfg.seed, "train-subset"))
        train = train.subset(np.sort(rng.choice(len(train), size=cfg.max_train_samples, replace=False)))
    if cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
        test = test.subset(np.arange(cfg.max_test_samples))
    return train, test


def client_partitions(cfg: FLConfig, train: ArrayDataset) -> list[np.ndarray]:
    """Each client's indices into ``train``, as ``partition_method`` splits them (seeded)."""
    if cfg.num_clients > len(train):
        raise ConfigError(f"config key 'num_clients' has value {cfg.num_clients}: more clients than the {len(train)} training samples")
    return partition(train.y.numpy(), cfg.num_clients, cfg.partition_method, seed=cfg.seed, alpha=cfg.non_iid_alpha,
                     samples_per_client=cfg.samples_per_client, shards_per_client=cfg.shards_per_client)


class SimulationBase(ABC, Generic[CoordinatorT]):
    """The shared part of the in-process drivers (see the module docstring for how a driver builds on it)."""

    #: training_mode values this driver runs
    training_modes: ClassVar[tuple[str, ...]]
    #: set by the driver's __init__ before it calls finish_setup
    coordinator: CoordinatorT

    def __init__(self, config: FLConfig | Mapping[str, Any] | str | Path, output_dir: str | Path | None = None, *,
                 resume: bool = False, progress: bool | None = None) -> None:
        self._started = time.perf_counter()
        cfg = resolve_config(config)
        if cfg.training_mode not in self.training_modes:
            raise ConfigError(f"config key 'training_mode' is {cfg.training_mode!r}: {type(self).__name__} runs "
                              f"{', '.join(self.training_modes)} training; use fl_server.simulation.AsyncSimulation "
                              f"(python -m fl_server simulate picks the driver from training_mode)")
        self.run_dir = RunDirectory(output_dir) if output_dir is not None else None
        if self.run_dir is not None and self.run_dir.has_checkpoint() and not resume:
            raise ConfigError(f"output folder '{self.run_dir.path}' already holds a run: pass --resume to continue it, "
                              f"or choose another --output")
        self._resume = resume
        self.cfg = cfg
        self.progress = progress
        self.train_set, self.test_set = load_training_data(cfg)
        check_federated_config(cfg)
        # client_test_fraction > 0: the federation trains on each client's train part only; the held-out
        # part is for per-client evaluation (at 0 the partitions are used unchanged: no held-out part)
        self.partitions, self.heldout = split_partitions(client_partitions(cfg, self.train_set), cfg.client_test_fraction,
                                                         cfg.seed)
        self._personalization: tuple[int, PersonalizationResult] | None = None
        self.histograms = label_histograms(self.train_set.y.numpy(), self.partitions, self.train_set.num_classes)
        model = model_from_config(cfg, self.train_set.input_shape, self.train_set.num_classes)
        if cfg.differential_privacy and cfg.dp_mode == "sample":
            try:
                check_dp_compatible(model)
            except DPIncompatibleModelError as exc:
                raise ConfigError(str(exc).replace("\n", " ")) from None
        self.num_parameters = count_parameters(model)
        self.evaluator_trainer = LocalTrainer(model, device="cpu" if cfg.device == "cpu" else resolve_device(cfg))
        self.spec = self.evaluator_trainer.spec
        # what each simulated client reports to the selection policy (records, labels, speeds)
        self.speeds = client_speeds(cfg, cfg.num_clients)
        self.client_infos = simulated_client_infos(cfg, self.partitions, self.histograms, self.speeds, 4 * self.spec.numel)
        #: the simulated model-poisoning attack of cfg.attack (attacks.py), or None
        self.attack = make_attack(cfg)
        self.wall_seconds_before = 0.0
        self._executor: ClientExecutor | None = None
        self._codec = make_codec(cfg.codec) if cfg.compression else None
        # biased codecs' error-feedback residuals, one model-sized vector per client that has sent an
        # update: in the run folder (read and written for the round's clients only) when there is one
        self._residuals = ClientVariates(self.spec.numel, self.run_dir.path / "client_state" / "error_feedback"
                                         if self.run_dir is not None else None)
        self._residual_writes = 0  # the residual files' version counter (a client may encode twice per model version)
        self.startup_seconds = 0.0  # measured by finish_setup
        self.ready_seconds: float | None = None  # process start -> first round (imports, data, workers)

    # ------------------------------------------------------------------ for the drivers
    def checkpoint_to_resume(self) -> dict[str, Any] | None:
        """The run folder's checkpoint when this simulation was asked to resume and there is one, else None."""
        if not self._resume or self.run_dir is None or not self.run_dir.has_checkpoint():
            return None
        return self.run_dir.load_checkpoint()

    def check_resumable(self, stored_config: Mapping[str, Any]) -> None:
        """Refuse to resume a run whose stored config differs in a key that changes what is computed."""
        changed = changed_config_keys(stored_config, self.cfg.to_dict())
        if changed:
            path = self.run_dir.path if self.run_dir is not None else None
            raise ConfigError(f"cannot resume '{path}': these keys differ from the stored run: {', '.join(changed)}")

    def finish_setup(self) -> None:
        """The last step of a driver's __init__ (after its coordinator and any restore): measures the
        start-up time and creates the run folder with the config and the clients' label histograms."""
        self.startup_seconds = time.perf_counter() - self._started
        if self.run_dir is not None:
            self.run_dir.create()
            dump_config(self.cfg, self.run_dir.path / "config.yaml")
            self.run_dir.write_label_histograms(self.histograms)

    def evaluate_vector(self, vector: torch.Tensor) -> EvalResult:
        """A model vector's loss and accuracy on the test set (the coordinators' evaluator).

        With a worker pool running, its workers score the test set between them (the coordinators
        evaluate between rounds, when the workers would idle); otherwise this process does. Both give
        the serial evaluation's numbers (simulation/evaluation.py)."""
        pool = self._executor
        if isinstance(pool, ProcessPoolExecutor) and pool.test is not None and pool.running:
            return pool.evaluate_test(vector, self.cfg.eval_batch_size)
        trainer = self.evaluator_trainer
        trainer.load_vector(vector.to(trainer.device, torch.float32))
        result = evaluation.evaluate(trainer.model, self.test_set.x, self.test_set.y, self.cfg.eval_batch_size, trainer.device)
        release_free_memory()  # evaluation's large activations are not needed until the next evaluation
        return result

    def executor(self) -> ClientExecutor:
        """The pool that trains the simulated clients (in process for one worker), started on first use."""
        if self._executor is None:
            n = default_workers(self.cfg)
            if self.cfg.backend == "ray":
                from fl_server.simulation.ray_backend import RayExecutor  # lazily: Ray is an optional extra

                self._executor = RayExecutor(self.cfg, self.train_set.input_shape, self.train_set.num_classes,
                                             self.train_set.x, self.train_set.y, self.partitions)
            elif n <= 1:
                self._executor = InProcessExecutor(self.cfg, self.train_set.input_shape, self.train_set.num_classes,
                                                   self.train_set.x, self.train_set.y, self.partitions)
            else:
                self._executor = ProcessPoolExecutor(self.cfg, self.train_set.input_shape, self.train_set.num_classes,
                                                     self.train_set.x, self.train_set.y, self.partitions, self.spec.numel,
                                                     workers=n, threads_per_worker=self.cfg.threads_per_worker,
                                                     test=(self.test_set.x, self.test_set.y))
        return self._executor

    def through_codec(self, update: ClientUpdate, round_number: int) -> None:
        """With ``compression`` on, send the update through the same codec and wire format as the
        client daemon and aggregate what the server would decode: the run then sees the codec's
        real information loss and counts its real bytes. Error-feedback residuals of biased codecs
        live in the run folder, versioned like SCAFFOLD's variates, so a resumed top-k run continues
        with them (:meth:`residual_state`)."""
        if self._codec is None:
            update.wire_bytes = 4 * update.delta.numel()
            return
        if update.wire_bytes:
            return  # a worker process already encoded it (unbiased codecs)
        ef = None
        if self._codec.biased:
            ef = ErrorFeedback(self.spec)
            stored = self._residuals.get(update.client_id)  # zeros before its first update: compensate adds nothing
            ef.remember(stored, torch.zeros_like(stored))
        packed = encode_for_wire(update.delta, self._codec, self.cfg, round_number, update.client_id, update.num_samples, ef)
        update.delta = packed.decoded
        update.wire_bytes = len(packed.data)
        if ef is not None and ef.residual is not None:
            self._residual_writes += 1
            self._residuals.put(update.client_id, ef.residual, self._residual_writes)

    def residual_state(self) -> dict[str, Any]:
        """The error-feedback residuals' part of a checkpoint (file versions, or tensors without a run folder)."""
        return {"store": self._residuals.state_dict(), "writes": self._residual_writes}

    def load_residual_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`residual_state` (None: a checkpoint from before residuals were kept: they start at zero)."""
        self._residuals.load_state_dict(None if state is None else state["store"])
        self._residual_writes = 0 if state is None else int(state["writes"])
        self._residuals.prune()

    def prune_residuals(self) -> None:
        """Delete residual files no checkpoint names (call after the checkpoint is durable)."""
        self._residuals.prune()

    # ------------------------------------------------------------------ public API
    @abstractmethod
    def train(self, rounds: int | None = None) -> Sequence[RoundRecord] | Sequence[AsyncRecord]:
        """Run the remaining rounds (server updates, asynchronously), or ``rounds`` more, checkpointing on the way."""

    @abstractmethod
    def save_results(self) -> dict[str, Any]:
        """Write the run folder's results (history, summary.json, model, report) and return the summary."""

    def evaluate(self) -> EvalResult:
        return self.evaluate_vector(self.coordinator.released_vector)

    def evaluate_clients(self) -> list[dict[str, float]]:
        """The global model's loss and accuracy on each client's held-out part when client_test_fraction > 0,
        otherwise on each client's training data (what ``client_accuracy_summary``'s "measure" says).

        Runs in the client workers (in parallel, results in client order), not serially in the driver:
        on the reference run it is a pass over all 60,000 training records."""
        parts = self.heldout if self.cfg.client_test_fraction > 0 else self.partitions
        results = self.executor().evaluate(self.coordinator.released_vector, dict(enumerate(parts)), self.cfg.eval_batch_size)
        return [{"client": cid, "num_samples": r.num_samples, "accuracy": r.accuracy, "loss": r.loss} for cid, r in results]

    def wants_client_evaluation(self) -> bool:
        """Whether save_results measures the final model per client (config key client_evaluation).

        auto measures it where it means something and is asked for: on held-out parts
        (client_test_fraction > 0), and for qfedavg, whose point is the worst clients' accuracy. On
        training data alone it is a full pass over the training set (18 s of the reference run's
        24 s end of run, serial) that most runs never read."""
        if self.cfg.client_evaluation != "auto":
            return self.cfg.client_evaluation == "on"
        return self.cfg.client_test_fraction > 0 or self.cfg.aggregation_method == "qfedavg"

    def client_accuracy_summary(self, per_client: list[dict[str, float]] | None = None) -> dict[str, Any]:
        """How evenly the final global model serves the clients: the fairness numbers q-FedAvg is judged
        by (Li et al. 2020 report the mean accuracy of the worst 10 % of clients, and the spread).
        Measured by the simulator on each client's held-out part when client_test_fraction > 0, else on
        each client's training data; "measure" says which."""
        accs = [r["accuracy"] for r in (per_client if per_client is not None else self.evaluate_clients())]
        return {"measure": f"global model on {heldout_measure(self.cfg)}", **distribution(accs)}

    def evaluate_client_models(self) -> dict[int, dict[str, Any]]:
        """The seed's ``evaluate_client_models()``: client -> its results on its held-out part.

        ``accuracy`` is the personalized model's (fine-tuned when ``finetune_epochs`` > 0, else the
        global model's); the row also holds ``federated_accuracy``, ``finetuned_accuracy`` and
        ``local_only_accuracy`` (as configured), their losses, the sample counts and the per-client
        gains. Needs ``client_test_fraction`` > 0. Computed once per trained state (save_results reuses it)."""
        return self.personalization().by_client()

    def personalization(self) -> PersonalizationResult:
        """Per-client federated / fine-tuned / local-only results and their summary (see personalization.py)."""
        if self.cfg.client_test_fraction == 0:
            raise ConfigError("per-client personalization results need a held-out part: set client_test_fraction (e.g. 0.2)")
        done = self.coordinator.completed_rounds
        if self._personalization is None or self._personalization[0] != done:
            self.close()  # the round pool is not needed now; the personalization pool trains every client
            train = self.train_set
            initial = LocalTrainer(model_from_config(self.cfg, train.input_shape, train.num_classes)).vector()
            result = personalize(
                self.cfg, global_vector=self.coordinator.released_vector, initial_vector=initial, completed_rounds=done,
                evaluator=self.evaluator_trainer, x=train.x, y=train.y, train_parts=self.partitions, heldout_parts=self.heldout,
                make_executor=lambda: client_executor(self.cfg, train.input_shape, train.num_classes, train.x, train.y,
                                                      self.partitions, self.spec.numel))
            log.info("personalization: %s", ", ".join(f"{k} mean {result.summary[k]['mean']:.4f}"
                                                      for k in ("federated", "finetuned", "local_only") if k in result.summary))
            self._personalization = (done, result)
        return self._personalization[1]

    def summary(self) -> dict[str, Any]:
        """summary.json's keys both drivers write (each driver sets or adds its own)."""
        hist = self.coordinator.history
        return {
            "mode": "federated",
            "rounds_completed": self.coordinator.completed_rounds,
            **accuracy_summary(hist),
            "wall_seconds": self.wall_seconds_before,
            "startup_seconds": self.startup_seconds,
            "ready_after_process_start_seconds": self.ready_seconds,
            "total_bytes": sum(r.bytes for r in hist),
            "model_parameters": self.num_parameters,
            "train_samples": len(self.train_set),
            "test_samples": len(self.test_set),
            "client_samples": {"min": int(min(map(len, self.partitions))), "max": int(max(map(len, self.partitions))),
                               "mean": float(np.mean([len(p) for p in self.partitions]))},
            "encryption": "not applicable in simulation (no transport)",
            "codec": (self._codec.name if self._codec else "none") + (f" + {self.cfg.wire_compression}" if self._codec else ""),
            "secure_aggregation": {"enabled": False},
            "stop_reason": self.coordinator.stop_reason,
            "privacy": self.coordinator.privacy_status(),
            "selection": selection_summary(self.cfg, self.coordinator.selector),
            "participation": self.coordinator.participation.summary(range(self.cfg.num_clients)),
            **({"attack": attack_summary(self.cfg, ((r, c) for r, c, _, arrived, _ in self.coordinator.participation.rows
                                                    if arrived))} if self.cfg.attack != "none" else {}),
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
            "config": self.cfg.to_dict(),
        }

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def __enter__(self: SimulationT) -> SimulationT:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

