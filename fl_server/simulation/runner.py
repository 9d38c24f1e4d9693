"""The synchronous in-process driver: the real coordinator and the real client trainer, wired in one
process (with a pool of worker processes for parallel clients). What it shares with the asynchronous
driver (async_runner.py) lives in base.py; the clients' side of secure aggregation in secagg.py.

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

import logging
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, overload

import psutil
import torch
from tqdm import tqdm

from fl_common.config import FLConfig
from fl_common.protocol import ClientUpdate
from fl_common.tensors import unflatten
from fl_common.tensors.codecs import make_codec
from fl_common.training import updated_client_control
from fl_server.coordinator import Coordinator, RoundPlan
from fl_server.forked_plots import WarmRenderer
from fl_server.privacy import BudgetExhausted
from fl_server.simulation.base import SimulationBase
from fl_server.simulation.ckks import SIMULATION_FEATURES as CKKS_FEATURES
from fl_server.simulation.ckks import CKKSSimulation
from fl_server.simulation.client_state import ClientVariates
from fl_server.simulation.executor import MaskingJobs, WorkerFailed
from fl_server.simulation.personalization import PERSONALIZATION_CSV, heldout_measure, write_personalization_csv
from fl_server.simulation.secagg import SIMULATION_FEATURES, SecAggSimulation
from fl_server.store import RoundRecord

log = logging.getLogger("fl_server.simulation")

__all__ = ["WARM_REPORT_ROUNDS", "Simulation"]

#: this many rounds before the last one, the report's renderer is forked to import matplotlib on idle cycles
#: (fl_server/forked_plots.py, WarmRenderer): the import then is off the end of the run's critical path
WARM_REPORT_ROUNDS = 3


class Simulation(SimulationBase[Coordinator]):
    """The synchronous in-process driver: rounds of the real :class:`~fl_server.coordinator.Coordinator`
    (with secure aggregation, SCAFFOLD's client variates, attacks and the codec as configured)."""

    training_modes = ("sync",)

    def __init__(self, config: FLConfig | Mapping[str, Any] | str | Path, output_dir: str | Path | None = None, *,
                 resume: bool = False, progress: bool | None = None) -> None:
        super().__init__(config, output_dir, resume=resume, progress=progress)
        cfg = self.cfg
        # secure aggregation: every simulated client runs the SecAgg client (simulation/secagg.py)
        # (or, with secure_aggregation_method: ckks, encrypts under CKKS: simulation/ckks.py)
        ckks = cfg.secure_aggregation and cfg.secure_aggregation_method == "ckks"
        self.secagg: SecAggSimulation | CKKSSimulation | None = (
            (CKKSSimulation(cfg) if ckks else SecAggSimulation(cfg)) if cfg.secure_aggregation else None)
        self.coordinator = Coordinator(cfg, self.evaluator_trainer.vector(), self.spec, evaluator=self.evaluate_vector,
                                       client_sizes={cid: len(p) for cid, p in enumerate(self.partitions)},
                                       privacy_seeded_noise=True,
                                       driver_features=("control_variates", "attacks", "client_infos", *SIMULATION_FEATURES,
                                                        *CKKS_FEATURES),
                                       secagg_verifiers=self.secagg.verifier if isinstance(self.secagg, SecAggSimulation) else None)
        # SCAFFOLD: every simulated client's control variate c_i (see client_state.py for why in files)
        self._variates = ClientVariates(self.spec.numel, self.run_dir.path / "client_state" if self.run_dir else None)
        #: why training ended before num_rounds other than the privacy budget (a diverged round)
        self.diverged: str | None = None
        #: the report's renderer, forked near the end of the run (WARM_REPORT_ROUNDS); save_results uses it
        self._warm_report: WarmRenderer | None = None
        state = self.checkpoint_to_resume()
        if state is not None:
            self._restore(state)
        self.finish_setup()

    # ------------------------------------------------------------------ internals
    def _restore(self, state: dict[str, Any]) -> None:
        assert self.run_dir is not None
        self.check_resumable(state["config"])
        self.coordinator.load_state_dict(state["coordinator"])
        self._variates.load_state_dict(state.get("client_state"))
        self._variates.prune()  # files of a round interrupted before its checkpoint
        self.load_residual_state(state.get("error_feedback"))
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        log.info("resumed %s after round %d", self.run_dir.path, self.coordinator.completed_rounds)

    def _checkpoint(self, wall_seconds: float) -> None:
        """Write the round's checkpoint and history before the next round starts.

        (Writing them in a background thread while the next round trained was measured slower
        on 2 cores - 1.03x against 0.95x of the plain loop - so the write stays synchronous.)"""
        if self.run_dir is None:
            return
        self.run_dir.save_checkpoint({"config": self.cfg.to_dict(), "coordinator": self.coordinator.state_dict(),
                                      "client_state": self._variates.state_dict(), "error_feedback": self.residual_state(),
                                      "wall_seconds": wall_seconds})
        self._variates.prune()  # only now that the checkpoint naming the new versions is durable
        self.prune_residuals()
        self.run_dir.write_history(self.coordinator.history)

    # ------------------------------------------------------------------ public API
    @property
    def history(self) -> list[RoundRecord]:
        return self.coordinator.history

    def run_round(self) -> RoundRecord:
        if self.secagg is not None:  # the same round, with masked updates only (and no codec: see simulation/secagg.py)
            return self._run_secure_round(self.secagg)
        coord = self.coordinator
        plan = coord.plan_round(list(range(self.cfg.num_clients)), infos=self.client_infos)
        model_bytes = 4 * self.spec.numel
        executor = self.executor()
        server_control = coord.server_control
        client_controls = None
        if server_control is not None:  # SCAFFOLD: c goes with the model, each client brings its c_i
            client_controls = {cid: self._variates.get(cid) for cid in plan.instructions}
        for update in executor.run_round(self.downloaded(coord.global_vector), plan.instructions,
                                         server_control=self.downloaded(server_control),
                                         client_controls=client_controls):
            if update.control_delta is not None:
                assert client_controls is not None
                self._variates.put(update.client_id, updated_client_control(client_controls[update.client_id],
                                                                            update.control_delta), plan.round)
            if self.attack is not None and self.attack.apply(update):
                update.wire_bytes = 0  # a worker may have encoded the honest delta: encode the noise instead
            self.through_codec(update, plan.round)
            if update.control_delta is not None:  # c down, the variate delta up, both uncompressed float32
                update.wire_bytes += 4 * update.control_delta.numel()
                coord.add_bytes(model_bytes)
            coord.submit(update)
            coord.add_bytes(model_bytes)
        return coord.close_round()

    @overload
    def downloaded(self, vector: torch.Tensor) -> torch.Tensor: ...

    @overload
    def downloaded(self, vector: None) -> None: ...

    def downloaded(self, vector: torch.Tensor | None) -> torch.Tensor | None:
        """What a client receives of a server vector under ``download_codec`` (float16: rounded as the REST server's
        download is; the client trains from it and its delta is taken against it, the server keeps float32)."""
        if vector is None or self.cfg.download_codec == "float32":
            return vector
        codec = make_codec(self.cfg.download_wire_codec)
        return codec.decode(codec.encode(vector))

    def _run_secure_round(self, secagg: SecAggSimulation | CKKSSimulation) -> RoundRecord:
        """One round under secure aggregation: ``secagg`` runs the protocol (and plans the round again
        while it aborts); this trains the clients it asks for, as run_round does, without the codec."""
        coord = self.coordinator
        model_bytes = 4 * self.spec.numel
        pending: dict[Any, torch.Tensor] = {}  # SCAFFOLD: the new c_i of the attempt that trained last

        def train(plan: RoundPlan, cids: list[Any], masking: MaskingJobs | None = None) -> Iterator[ClientUpdate]:
            pending.clear()  # an attempt that trained and then aborted moves no variate on
            server_control = coord.server_control
            controls = {cid: self._variates.get(cid) for cid in cids} if server_control is not None else None
            instructions = {cid: plan.instructions[cid] for cid in cids}
            # the workers mask what they trained (simulation/secagg.py), unless an attack changes it here first
            for update in self.executor().run_round(self.downloaded(coord.global_vector), instructions,
                                                    server_control=self.downloaded(server_control), client_controls=controls,
                                                    masking=masking if self.attack is None else None):
                if update.control_delta is not None:
                    assert controls is not None
                    pending[update.client_id] = updated_client_control(controls[update.client_id], update.control_delta)
                    coord.add_bytes(model_bytes)  # the server's variate c goes down with the model
                if self.attack is not None:
                    self.attack.apply(update)
                coord.add_bytes(model_bytes)
                yield update

        record, plan, summed = secagg.run_round(coord, self.client_infos, train)
        for cid, variate in pending.items():  # only clients whose delta is in the sum move on
            if cid in summed:
                self._variates.put(cid, variate, plan.round)
        return record

    def train(self, rounds: int | None = None) -> list[RoundRecord]:
        """Run the remaining rounds (or ``rounds`` more), checkpointing after each."""
        coord = self.coordinator
        target = self.cfg.num_rounds if rounds is None else min(self.cfg.num_rounds, coord.completed_rounds + rounds)
        start = time.perf_counter()
        if coord.completed_rounds < target:
            self.executor()  # start workers now, so round times measure rounds only
            if self.ready_seconds is None:
                self.ready_seconds = time.time() - psutil.Process().create_time()
        bar = tqdm(total=self.cfg.num_rounds, initial=coord.completed_rounds, desc="rounds", unit="round",
                   disable=(None if self.progress is None else not self.progress), file=sys.stderr, dynamic_ncols=True)
        try:
            while coord.completed_rounds < target and not coord.finished:
                if coord.completed_rounds == self.cfg.num_rounds - WARM_REPORT_ROUNDS:
                    self._warm_up_report()
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

    def _warm_up_report(self) -> None:
        """Fork the report's renderer now (it imports matplotlib at nice 19 while the last rounds train)."""
        if self.run_dir is None or self._warm_report is not None:
            return
        from fl_server.forked_plots import start_warm_renderer
        from fl_server.reports import plot_jobs

        path = self.run_dir.path
        self._warm_report = start_warm_renderer(lambda: plot_jobs(path), path)

    def close(self) -> None:
        if self._warm_report is not None:  # a run that ends without its report lets the renderer go
            self._warm_report.cancel()
            self._warm_report = None
        super().close()

    def _evaluate_final_model(self, start: float) -> None:
        """A run that ends early keeps its last model: its accuracy is the run's final one (checkpointed)."""
        record = self.coordinator.evaluate_final_model()
        if record is not None:
            log.info("final model (round %d): test accuracy %.4f, test loss %.4f", record.round, record.test_accuracy,
                     record.test_loss)
            self._checkpoint(self.wall_seconds_before + time.perf_counter() - start)

    def summary(self) -> dict[str, Any]:
        summary = super().summary()  # (keys set here keep their place in summary.json)
        if self.secagg is not None:
            summary["codec"] = self.secagg.codec_name()
            summary["secure_aggregation"] = self.secagg.summary()
        summary["stop_reason"] = self.coordinator.stop_reason or self.diverged
        return summary

    def save_results(self) -> dict[str, Any]:
        """Write the run folder's results (history, tables, summary.json, model.pt, the report) and return the
        summary. Also stops the client workers (the report's plots are drawn meanwhile); a later train() or
        evaluate() starts them again."""
        summary = self.summary()
        per_client = self.evaluate_clients() if self.wants_client_evaluation() else None
        if per_client is not None:
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
                for cid in range(self.cfg.num_clients)], accuracy=None if per_client is None else [
                {"client": r["client"], "accuracy": r["accuracy"],
                 "measure": ("final global model on the client's training data (simulation)" if self.cfg.client_test_fraction == 0
                             else f"final global model on {heldout_measure(self.cfg)} (simulation)")} for r in per_client])
            if personal is not None:
                write_personalization_csv(self.run_dir.path / PERSONALIZATION_CSV, personal.rows, personal.columns,
                                          personal.summary["measure"])
            self.run_dir.write_json("summary.json", summary)
            # lazily: keeps the report (and matplotlib) out of start-up
            from fl_server.reports import finish_report_logged, start_report

            # The report's inputs are written: its plots are drawn in forked processes (fl_server/forked_plots.py)
            # while this process writes the model and stops the client workers, which are not needed any more (a
            # later train() or evaluate() starts them again). The end of the reference speed run was ~1.9 s, most
            # of it the plots drawn one after the other. finish waits for every plot before it writes the report.
            report = start_report(self.run_dir.path, parallel=True, warm=self._warm_report)
            self._warm_report = None
            self.run_dir.save_model(unflatten(self.coordinator.released_vector, self.spec))
            self.close()
            finish_report_logged(report)  # logs the report path; a failure only warns
        return summary
