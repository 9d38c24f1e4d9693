"""The in-process driver: the real coordinator and the real client trainer, wired in one process
(with a pool of worker processes for parallel clients).

The Python API mirrors the seed's ``FederatedTrainer`` example under our names::

    from fl_server.simulation import Simulation
    sim = Simulation({"num_clients": 20, "num_rounds": 5, "differential_privacy": False,
                      "secure_aggregation": False}, output_dir="runs/demo")
    history = sim.train()                 # all remaining rounds (resumable)
    result = sim.evaluate()               # the global model on the test set
    per_client = sim.evaluate_clients()   # the global model on each client's held-out (or training) data
    personal = sim.evaluate_client_models()  # with client_test_fraction: federated / fine-tuned / local-only per client
    sim.save_results()                    # history.csv, summary.json, model.pt, ...
    sim.close()
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import psutil
import torch
from tqdm import tqdm

from fl_common.config import ConfigError, FLConfig, config_from_dict, dump_config, load_config
from fl_common.data import ArrayDataset, label_histograms, load_dataset
from fl_common.data.partition import partition
from fl_common.models import count_parameters, model_from_config
from fl_common.privacy import DPIncompatibleModelError, check_dp_compatible
from fl_common.protocol import derive_seed
from fl_common.tensors import flatten, spec_of, unflatten
from fl_common.tensors.codecs import make_codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.training import EvalResult, LocalTrainer, updated_client_control
from fl_server.coordinator import Coordinator
from fl_server.privacy import BudgetExhausted
from fl_server.secagg.simulation import SIMULATION_FEATURES, SecAggSimulation
from fl_server.selection import selection_summary
from fl_server.simulation.attacks import attack_summary, make_attack
from fl_server.simulation.client_speeds import client_speeds, simulated_client_infos
from fl_server.simulation.client_state import ClientVariates
from fl_server.simulation.executor import (
    ClientExecutor,
    InProcessExecutor,
    ProcessPoolExecutor,
    WorkerFailed,
    default_workers,
    encode_for_wire,
    release_free_memory,
)
from fl_server.simulation.personalization import (
    PERSONALIZATION_CSV,
    PersonalizationResult,
    check_federated_config,
    client_executor,
    distribution,
    heldout_measure,
    personalize,
    split_partitions,
    write_personalization_csv,
)
from fl_server.store import RoundRecord, RunDirectory, accuracy_summary

log = logging.getLogger("fl_server.simulation")

#: Keys that may differ between a run and its resumption (they change how, not what, is computed;
#: finetune_epochs and local_only_epochs only change what is measured after the last round).
RESUMABLE_CHANGES = {"num_rounds", "workers", "threads_per_worker", "device", "eval_batch_size", "evaluation_frequency",
                     "finetune_epochs", "local_only_epochs"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FLConfig)}


def changed_config_keys(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose value differs between a stored run and the current config. A key the stored run
    does not have (added to the schema after it was checkpointed) counts as its default, so new
    keys left at their defaults never stop an older run from resuming."""
    return sorted(k for k in current if k not in RESUMABLE_CHANGES and stored.get(k, _DEFAULTS.get(k)) != current[k])


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
    if cfg.num_clients > len(train):
        raise ConfigError(f"config key 'num_clients' has value {cfg.num_clients}: more clients than the {len(train)} training samples")
    return partition(train.y.numpy(), cfg.num_clients, cfg.partition_method, seed=cfg.seed, alpha=cfg.non_iid_alpha,
                     samples_per_client=cfg.samples_per_client, shards_per_client=cfg.shards_per_client)


class Simulation:
    #: training_mode values this driver runs (AsyncSimulation runs "async")
    training_modes: tuple[str, ...] = ("sync",)

    def __init__(self, config: FLConfig | Mapping[str, Any] | str | Path, output_dir: str | Path | None = None, *,
                 resume: bool = False, progress: bool | None = None) -> None:
        t0 = time.perf_counter()
        if isinstance(config, FLConfig):
            cfg = config
        elif isinstance(config, (str, Path)):
            cfg = load_config(config)
        else:
            cfg = config_from_dict(config)
        if cfg.training_mode not in self.training_modes:
            raise ConfigError(f"config key 'training_mode' is {cfg.training_mode!r}: {type(self).__name__} runs "
                              f"{', '.join(self.training_modes)} training; use fl_server.simulation.AsyncSimulation "
                              f"(python -m fl_server simulate picks the driver from training_mode)")
        self.run_dir = RunDirectory(output_dir) if output_dir is not None else None
        if self.run_dir is not None and self.run_dir.has_checkpoint() and not resume:
            raise ConfigError(f"output folder '{self.run_dir.path}' already holds a run: pass --resume to continue it, "
                              f"or choose another --output")
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
        self.evaluator_trainer = LocalTrainer(model, device="cpu" if cfg.device == "cpu" else _resolve_device(cfg))
        self.spec = self.evaluator_trainer.spec
        # what each simulated client reports to the selection policy (records, labels, speeds)
        self.speeds = client_speeds(cfg, cfg.num_clients)
        self.client_infos = simulated_client_infos(cfg, self.partitions, self.histograms, self.speeds, 4 * self.spec.numel)
        # secure aggregation: every simulated client runs the SecAgg client (fl_server/secagg/simulation.py)
        self._secagg = SecAggSimulation(cfg) if cfg.secure_aggregation else None
        self.coordinator = self._new_coordinator()
        # SCAFFOLD: every simulated client's control variate c_i (see client_state.py for why in files)
        self._variates = ClientVariates(self.spec.numel, self.run_dir.path / "client_state" if self.run_dir else None)
        self._attack = make_attack(cfg)
        self.wall_seconds_before = 0.0
        if resume and self.run_dir is not None and self.run_dir.has_checkpoint():
            self._restore()
        self._executor: ClientExecutor | None = None
        self._codec = make_codec(cfg.codec) if cfg.compression else None
        self._error_feedback: dict[Any, ErrorFeedback] = {}
        self.startup_seconds = time.perf_counter() - t0
        self.ready_seconds: float | None = None  # process start -> first round (imports, data, workers)
        #: why training ended before num_rounds other than the privacy budget (a diverged round)
        self.diverged: str | None = None
        if self.run_dir is not None:
            self.run_dir.create()
            dump_config(self.cfg, self.run_dir.path / "config.yaml")
            self.run_dir.write_label_histograms(self.histograms)

    # ------------------------------------------------------------------ internals
    def _new_coordinator(self) -> Coordinator:
        """The coordinator this driver runs (AsyncSimulation overrides it with the asynchronous one)."""
        return Coordinator(self.cfg, self.evaluator_trainer.vector(), self.spec, evaluator=self._evaluate_vector,
                           client_sizes={cid: len(p) for cid, p in enumerate(self.partitions)},
                           privacy_seeded_noise=True,
                           driver_features=("control_variates", "attacks", "client_infos", *SIMULATION_FEATURES),
                           secagg_verifiers=self._secagg.verifier if self._secagg is not None else None)

    def _restore(self) -> None:
        assert self.run_dir is not None
        state = self.run_dir.load_checkpoint()
        stored = state["config"]
        current = self.cfg.to_dict()
        changed = changed_config_keys(stored, current)
        if changed:
            raise ConfigError(f"cannot resume '{self.run_dir.path}': these keys differ from the stored run: {', '.join(changed)}")
        self.coordinator.load_state_dict(state["coordinator"])
        self._variates.load_state_dict(state.get("client_state"))
        self._variates.prune()  # files of a round interrupted before its checkpoint
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        log.info("resumed %s after round %d", self.run_dir.path, self.coordinator.completed_rounds)

    def _evaluate_vector(self, vector: torch.Tensor) -> EvalResult:
        result = self.evaluator_trainer.evaluate(vector, self.test_set.x, self.test_set.y, self.cfg.eval_batch_size)
        release_free_memory()  # evaluation's large activations are not needed until the next evaluation
        return result

    def _executor_for_run(self) -> ClientExecutor:
        if self._executor is None:
            n = default_workers(self.cfg)
            if n <= 1:
                self._executor = InProcessExecutor(self.cfg, self.train_set.input_shape, self.train_set.num_classes,
                                                   self.train_set.x, self.train_set.y, self.partitions)
            else:
                self._executor = ProcessPoolExecutor(self.cfg, self.train_set.input_shape, self.train_set.num_classes,
                                                     self.train_set.x, self.train_set.y, self.partitions, self.spec.numel,
                                                     workers=n, threads_per_worker=self.cfg.threads_per_worker)
        return self._executor

    def _checkpoint(self, wall_seconds: float) -> None:
        """Write the round's checkpoint and history before the next round starts.

        (Writing them in a background thread while the next round trained was measured slower
        on 2 cores - 1.03x against 0.95x of the plain loop - so the write stays synchronous.)"""
        if self.run_dir is None:
            return
        self.run_dir.save_checkpoint({"config": self.cfg.to_dict(), "coordinator": self.coordinator.state_dict(),
                                      "client_state": self._variates.state_dict(), "wall_seconds": wall_seconds})
        self._variates.prune()  # only now that the checkpoint naming the new versions is durable
        self.run_dir.write_history(self.coordinator.history)

    # ------------------------------------------------------------------ public API
    @property
    def history(self) -> list[RoundRecord]:
        return self.coordinator.history

    def run_round(self) -> RoundRecord:
        if self._secagg is not None:  # the same round, with masked updates only (and no codec: see secagg/simulation.py)
            return self._secagg.run_round(self)
        coord = self.coordinator
        plan = coord.plan_round(list(range(self.cfg.num_clients)), infos=self.client_infos)
        model_bytes = 4 * self.spec.numel
        executor = self._executor_for_run()
        server_control = coord.server_control
        client_controls = None
        if server_control is not None:  # SCAFFOLD: c goes with the model, each client brings its c_i
            client_controls = {cid: self._variates.get(cid) for cid in plan.instructions}
        for update in executor.run_round(coord.global_vector, plan.instructions, server_control=server_control,
                                         client_controls=client_controls):
            if update.control_delta is not None:
                assert client_controls is not None
                self._variates.put(update.client_id, updated_client_control(client_controls[update.client_id],
                                                                            update.control_delta), plan.round)
            if self._attack is not None and self._attack.apply(update):
                update.wire_bytes = 0  # a worker may have encoded the honest delta: encode the noise instead
            self._through_codec(update, plan.round)
            if update.control_delta is not None:  # c down, the variate delta up, both uncompressed float32
                update.wire_bytes += 4 * update.control_delta.numel()
                coord.add_bytes(model_bytes)
            coord.submit(update)
            coord.add_bytes(model_bytes)
        return coord.close_round()

    def _through_codec(self, update: Any, round_number: int) -> None:
        """With ``compression`` on, send the update through the same codec and wire format as the
        client daemon and aggregate what the server would decode: the run then sees the codec's
        real information loss and counts its real bytes. (Error-feedback residuals of biased
        codecs live in memory here and are not checkpointed: a resumed top-k run restarts them at zero.)"""
        if self._codec is None:
            update.wire_bytes = 4 * update.delta.numel()
            return
        if update.wire_bytes:
            return  # a worker process already encoded it (unbiased codecs)
        ef = None
        if self._codec.biased:
            ef = self._error_feedback.setdefault(update.client_id, ErrorFeedback(self.spec))
        packed = encode_for_wire(update.delta, self._codec, self.cfg, round_number, update.client_id, update.num_samples, ef)
        update.delta = packed.decoded
        update.wire_bytes = len(packed.data)

    def train(self, rounds: int | None = None) -> list[RoundRecord]:
        """Run the remaining rounds (or ``rounds`` more), checkpointing after each."""
        coord = self.coordinator
        target = self.cfg.num_rounds if rounds is None else min(self.cfg.num_rounds, coord.completed_rounds + rounds)
        start = time.perf_counter()
        if coord.completed_rounds < target:
            self._executor_for_run()  # start workers now, so round times measure rounds only
            if self.ready_seconds is None:
                self.ready_seconds = time.time() - psutil.Process().create_time()
        bar = tqdm(total=self.cfg.num_rounds, initial=coord.completed_rounds, desc="rounds", unit="round",
                   disable=(None if self.progress is None else not self.progress), file=sys.stderr, dynamic_ncols=True)
        try:
            while coord.completed_rounds < target and not coord.finished:
                try:
                    record = self.run_round()
                except BudgetExhausted as exc:  # the coordinator has logged it; the run ends here
                    bar.write(f"stopped: {exc}")
                    self._evaluate_final_model(start)
                    break
                except (FloatingPointError, WorkerFailed) as exc:
                    # the exception's own message (a worker's traceback also quotes the raising source line)
                    lines = [line.strip() for line in str(exc).splitlines()
                             if "diverged" in line or "not finite" in line or "no longer finite" in line]
                    detail = lines[-1].removeprefix("FloatingPointError: ") if lines else None
                    if detail is None:
                        raise
                    # A diverged round (for example under heavy client-level DP noise) is a result, not a crash:
                    # the run ends with what it had, and says why. The round is re-run identically on --resume.
                    coord.abort_round()
                    self.diverged = f"training diverged in round {coord.completed_rounds + 1}: {detail}"
                    log.warning("%s; the run ends after %d rounds", self.diverged, coord.completed_rounds)
                    bar.write(f"stopped: {self.diverged}")
                    self._evaluate_final_model(start)
                    break
                self._checkpoint(self.wall_seconds_before + time.perf_counter() - start)
                if record.test_accuracy is not None:
                    bar.set_postfix(acc=f"{record.test_accuracy:.4f}", loss=f"{record.test_loss:.3f}")
                    log.info("round %d: test accuracy %.4f, test loss %.4f, train loss %.4f, %.1f s%s",
                             record.round, record.test_accuracy, record.test_loss, record.train_loss or float("nan"), record.seconds,
                             "" if record.epsilon is None else f", epsilon {record.epsilon:.4f}")
                bar.update(1)
        finally:
            bar.close()
        self.wall_seconds_before += time.perf_counter() - start
        return coord.history

    def _evaluate_final_model(self, start: float) -> None:
        """A run that ends early keeps its last model: its accuracy is the run's final one (checkpointed)."""
        record = self.coordinator.evaluate_final_model()
        if record is not None:
            log.info("final model (round %d): test accuracy %.4f, test loss %.4f", record.round, record.test_accuracy,
                     record.test_loss)
            self._checkpoint(self.wall_seconds_before + time.perf_counter() - start)

    def evaluate(self) -> EvalResult:
        return self._evaluate_vector(self.coordinator.global_vector)

    def evaluate_clients(self) -> list[dict[str, float]]:
        """The global model's loss and accuracy on each client's held-out part when client_test_fraction > 0,
        otherwise on each client's training data (what ``client_accuracy_summary``'s "measure" says)."""
        out = []
        vec = self.coordinator.global_vector
        self.evaluator_trainer.load_vector(vec)
        for cid, idx in enumerate(self.heldout if self.cfg.client_test_fraction > 0 else self.partitions):
            ix = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            r = self.evaluator_trainer.evaluate(None, self.train_set.x.index_select(0, ix), self.train_set.y.index_select(0, ix),
                                                self.cfg.eval_batch_size)
            out.append({"client": cid, "num_samples": r.num_samples, "accuracy": r.accuracy, "loss": r.loss})
        return out

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
                self.cfg, global_vector=self.coordinator.global_vector, initial_vector=initial, completed_rounds=done,
                evaluator=self.evaluator_trainer, x=train.x, y=train.y, train_parts=self.partitions, heldout_parts=self.heldout,
                make_executor=lambda: client_executor(self.cfg, train.input_shape, train.num_classes, train.x, train.y,
                                                      self.partitions, self.spec.numel))
            log.info("personalization: %s", ", ".join(f"{k} mean {result.summary[k]['mean']:.4f}"
                                                      for k in ("federated", "finetuned", "local_only") if k in result.summary))
            self._personalization = (done, result)
        return self._personalization[1]

    def summary(self) -> dict[str, Any]:
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
            "codec": self._secagg.codec_name() if self._secagg is not None else
            (self._codec.name if self._codec else "none") + (f" + {self.cfg.wire_compression}" if self._codec else ""),
            "secure_aggregation": self._secagg.summary() if self._secagg is not None else {"enabled": False},
            "stop_reason": self.coordinator.stop_reason or self.diverged,
            "privacy": self.coordinator.privacy_status(),
            "selection": selection_summary(self.cfg, self.coordinator.selector),
            "participation": self.coordinator.participation.summary(range(self.cfg.num_clients)),
            **({"attack": attack_summary(self.cfg, ((r, c) for r, c, _, arrived, _ in self.coordinator.participation.rows
                                                    if arrived))} if self.cfg.attack != "none" else {}),
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
            "config": self.cfg.to_dict(),
        }

    def save_results(self) -> dict[str, Any]:
        summary = self.summary()
        per_client = self.evaluate_clients()
        summary["client_accuracy"] = self.client_accuracy_summary(per_client)
        personal = None
        if self.cfg.finetune_epochs > 0 or self.cfg.local_only_epochs > 0:
            personal = self.personalization()
            summary["personalization"] = personal.summary
        privacy = summary["privacy"]
        if privacy.get("differential_privacy"):
            extra = ""
            if privacy["mode"] == "sample":
                dist = privacy["per_client_epsilon"]
                extra = f"; per client: max {dist['max']:.4f}, median {dist['median']:.4f} over {dist['clients']} clients"
            log.info("privacy: epsilon %.4f of %g spent at delta %g (%s, %s-level, noise multiplier %.4f)%s",
                     privacy["epsilon_spent"], privacy["epsilon_budget"], privacy["delta"], privacy["accountant"],
                     privacy["mode"], privacy["noise_multiplier"], extra)
        if self.run_dir is not None:
            self.run_dir.write_history(self.coordinator.history)
            # per round (who was selected with what probability, who arrived), and per client for the report
            self.run_dir.write_text("participation_rounds.csv", self.coordinator.participation.to_csv())
            from fl_server.reports import write_client_tables

            log_ = self.coordinator.participation
            write_client_tables(self.run_dir.path, participation=[
                {"client": cid, "selected": log_.selected_counts.get(cid, 0), "participated": log_.arrived_counts.get(cid, 0),
                 "dropped": log_.selected_counts.get(cid, 0) - log_.arrived_counts.get(cid, 0)}
                for cid in range(self.cfg.num_clients)], accuracy=[
                {"client": r["client"], "accuracy": r["accuracy"],
                 "measure": ("final global model on the client's training data (simulation)" if self.cfg.client_test_fraction == 0
                             else f"final global model on {heldout_measure(self.cfg)} (simulation)")} for r in per_client])
            if personal is not None:
                write_personalization_csv(self.run_dir.path / PERSONALIZATION_CSV, personal.rows, personal.columns,
                                          personal.summary["measure"])
            self.run_dir.write_json("summary.json", summary)
            self.run_dir.save_model(unflatten(self.coordinator.global_vector, self.spec))
            from fl_server.reports import write_report_logged  # lazily: keeps matplotlib out of startup

            write_report_logged(self.run_dir.path)  # logs the report path; a failure only warns
        return summary

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _resolve_device(cfg: FLConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


__all__ = ["Simulation", "load_training_data", "client_partitions", "flatten", "spec_of"]
