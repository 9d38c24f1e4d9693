"""The seed's local-only baseline: every client trains alone, with no communication at all.

``python -m fl_server simulate --local-only --set local_only_epochs=5 [--set client_test_fraction=0.2]``

Each client trains one model on its own data (its train part when ``client_test_fraction`` > 0,
all of its data otherwise) for ``local_only_epochs`` epochs, from the same initial weights a
federated run of this configuration starts from, with the client's optimiser settings (see
personalization.py: base ``learning_rate``, no DP; the model never leaves the client). Clients
are trained on the simulation's worker pool; each finished model is evaluated in this process
while the pool trains the others.

What is reported (summary.json, mode ``local_only``):

* ``client_accuracy``: per-client accuracy of each client's own model on its held-out part
  (mean, median, worst 10 %, min, max, std) when there is one; without a held-out part it
  falls back to the global test set, and ``measure`` says so;
* ``test_set_accuracy``: the same statistics for each client's model on the *global* test set;
  its mean is ``final_accuracy`` (and the single row of history.csv), the number comparable
  with a federated run's test-set accuracy (one model for everyone) - it is the accuracy a
  randomly chosen client's model would have on the whole population. Evaluating 100 CNNs on
  10,000 test images costs more than training them for 5 epochs (measured on Fashion-MNIST, 100
  clients, 2 shared cores: the two training workers used 145 CPU s each, the evaluating process
  about 800), so ``local_only_test_samples: N`` evaluates each client on its own seeded random
  N test samples instead: the mean over clients stays unbiased (standard error about
  sqrt(0.25 / (N x clients)), 0.16 points at N = 1000 and 100 clients), a single client's
  number is noisier (about 1.5 points at N = 1000), which widens worst-10 % a little;
* client_accuracy.csv (headline per-client accuracy, with its measure) and personalization.csv
  (every per-client number). No model.pt: there is no single model.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fl_common.config import ConfigError, FLConfig, dump_config
from fl_common.data import label_histograms
from fl_common.models import count_parameters, model_from_config
from fl_common.protocol import derive_seed
from fl_common.training import LocalTrainer
from fl_server.simulation.base import client_partitions, load_training_data
from fl_server.simulation.executor import resolve_device
from fl_server.simulation.personalization import (
    PERSONALIZATION_CSV,
    client_executor,
    distribution,
    heldout_measure,
    split_partitions,
    train_each_client,
    write_personalization_csv,
)
from fl_server.store import RoundRecord, RunDirectory, accuracy_summary

log = logging.getLogger("fl_server.simulation")

__all__ = ["LocalOnlyBaseline"]

TEST_SET_MEASURE = "each client's local-only model on the global test set"


class LocalOnlyBaseline:
    """Train every client alone and measure each client's model (see the module docstring)."""

    def __init__(self, cfg: FLConfig, output_dir: str | Path | None = None, *, progress: bool | None = None) -> None:
        t0 = time.perf_counter()
        if cfg.differential_privacy:
            raise ConfigError("the local-only baseline trains without differential privacy (no model leaves its client): set "
                              "differential_privacy: false for --local-only (it is the non-private reference)")
        if cfg.local_only_epochs < 1:
            raise ConfigError("--local-only trains each client for local_only_epochs epochs, which is 0: set it, e.g. "
                              "--set local_only_epochs=5")
        if cfg.finetune_epochs > 0:
            raise ConfigError(f"config key 'finetune_epochs' has value {cfg.finetune_epochs} but --local-only trains no "
                              f"federated model to fine-tune; remove 'finetune_epochs'")
        if cfg.training_mode != "sync":
            raise ConfigError("--local-only has no rounds to run asynchronously: remove training_mode (or set it to sync)")
        self.cfg = cfg
        self.progress = progress
        self.train_set, self.test_set = load_training_data(cfg)
        self.partitions, self.heldout = split_partitions(client_partitions(cfg, self.train_set), cfg.client_test_fraction,
                                                         cfg.seed)
        self.histograms = label_histograms(self.train_set.y.numpy(), self.partitions, self.train_set.num_classes)
        model = model_from_config(cfg, self.train_set.input_shape, self.train_set.num_classes)
        self.num_parameters = count_parameters(model)
        self.evaluator = LocalTrainer(model, device=resolve_device(cfg))
        self.initial_vector = self.evaluator.vector()  # the same initial weights a federated run starts from
        self.rows: list[dict[str, Any]] = []
        self.history: list[RoundRecord] = []
        self.run_dir = RunDirectory(output_dir) if output_dir is not None else None
        self.startup_seconds = time.perf_counter() - t0
        self.wall_seconds = 0.0

    @property
    def has_heldout(self) -> bool:
        return self.cfg.client_test_fraction > 0

    def train(self) -> list[dict[str, Any]]:
        """Train and evaluate every client; return one row per client (in client order)."""
        cfg = self.cfg
        start = time.perf_counter()
        x, y = self.train_set.x, self.train_set.y
        rows: dict[int, dict[str, Any]] = {}
        bar = tqdm(total=cfg.num_clients, desc="local-only clients", unit="client", file=sys.stderr,
                   disable=(None if self.progress is None else not self.progress), dynamic_ncols=True)
        executor = client_executor(cfg, self.train_set.input_shape, self.train_set.num_classes, x, y, self.partitions,
                                   self.evaluator.spec.numel)
        try:
            sizes = [len(p) for p in self.partitions]
            for cid, vector, metrics in train_each_client(executor, self.initial_vector, cfg, "local-only",
                                                          cfg.local_only_epochs, cfg.learning_rate, sizes):
                row: dict[str, Any] = {"client": cid, "train_samples": sizes[cid], "heldout_samples": len(self.heldout[cid])}
                if self.has_heldout:
                    ix = torch.from_numpy(np.asarray(self.heldout[cid], dtype=np.int64))
                    r = self.evaluator.evaluate(vector, x.index_select(0, ix), y.index_select(0, ix), cfg.eval_batch_size)
                    row.update(local_only_accuracy=r.accuracy, local_only_loss=r.loss)
                tx, ty = self.client_test_set(cid)
                t = self.evaluator.evaluate(vector, tx, ty, cfg.eval_batch_size)
                row.update(local_only_test_accuracy=t.accuracy, local_only_test_loss=t.loss,
                           local_only_train_loss=metrics.get("train_loss"))
                rows[cid] = row
                bar.update(1)
        finally:
            executor.close()
            bar.close()
        self.rows = [rows[c] for c in range(cfg.num_clients)]
        self.wall_seconds = time.perf_counter() - start
        mean = lambda k: float(np.mean([r[k] for r in self.rows]))
        # one row, so that the files (and benchmarks/run_grid.py) read like any run's: "test accuracy" is
        # the mean over clients of each client's model on the global test set
        self.history = [RoundRecord(1, mean("local_only_test_accuracy"), mean("local_only_test_loss"),
                                    mean("local_only_train_loss"), cfg.num_clients, self.wall_seconds, 0)]
        return self.rows

    def client_test_set(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The test samples this client's model is evaluated on: all, or its own seeded random subset."""
        m, n = self.cfg.local_only_test_samples, len(self.test_set)
        if m is None or m >= n:
            return self.test_set.x, self.test_set.y
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "local-only-test", client))
        ix = torch.from_numpy(np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64))
        return self.test_set.x.index_select(0, ix), self.test_set.y.index_select(0, ix)

    @property
    def test_set_measure(self) -> str:
        m = self.cfg.local_only_test_samples
        if m is None or m >= len(self.test_set):
            return TEST_SET_MEASURE
        return (f"{TEST_SET_MEASURE}, estimated on {m} of its {len(self.test_set)} samples drawn at random for each client "
                f"(seeded by (seed, client); local_only_test_samples)")

    def client_accuracy_summary(self) -> dict[str, Any]:
        """The per-client headline: held-out accuracy when there is a held-out part, else test-set accuracy."""
        key = "local_only_accuracy" if self.has_heldout else "local_only_test_accuracy"
        measure = (f"each client's local-only model on {heldout_measure(self.cfg)}" if self.has_heldout else self.test_set_measure)
        return {"measure": measure, **distribution([r[key] for r in self.rows])}

    def summary(self) -> dict[str, Any]:
        if not self.rows:
            raise RuntimeError("train() first")
        return {
            "mode": "local_only",
            "rounds_completed": 1,
            **accuracy_summary(self.history),
            "final_accuracy_measure": f"mean over clients of the accuracy of {self.test_set_measure}",
            "client_accuracy": self.client_accuracy_summary(),
            "test_set_accuracy": {"measure": self.test_set_measure,
                                  **distribution([r["local_only_test_accuracy"] for r in self.rows])},
            "local_only_epochs": self.cfg.local_only_epochs,
            "training": ("each client alone from the initial model, local_only_epochs epochs over its "
                         + ("train part" if self.has_heldout else "whole partition")
                         + " at learning_rate with its optimizer, momentum, weight_decay and batch_size; no communication, "
                         "no differential privacy"),
            "wall_seconds": self.wall_seconds,
            "startup_seconds": self.startup_seconds,
            "model_parameters": self.num_parameters,
            "train_samples": int(sum(len(p) for p in self.partitions)),
            "heldout_samples": int(sum(len(p) for p in self.heldout)),
            "test_samples": len(self.test_set),
            "client_samples": {"min": int(min(map(len, self.partitions))), "max": int(max(map(len, self.partitions))),
                               "mean": float(np.mean([len(p) for p in self.partitions]))},
            "total_bytes": 0,
            "encryption": "not applicable (local-only: nothing is sent)",
            "codec": "none (local-only: nothing is sent)",
            "config": self.cfg.to_dict(),
        }

    def save_results(self) -> dict[str, Any]:
        summary = self.summary()
        log.info("local-only: %d clients, held-out accuracy %s, test-set accuracy mean %.4f (worst 10 %% %.4f), %.1f s",
                 self.cfg.num_clients,
                 (f"mean {summary['client_accuracy']['mean']:.4f} (worst 10 % {summary['client_accuracy']['worst_10pct']:.4f})"
                  if self.has_heldout else "n/a (client_test_fraction 0)"),
                 summary["test_set_accuracy"]["mean"], summary["test_set_accuracy"]["worst_10pct"], self.wall_seconds)
        if self.run_dir is not None:
            from fl_server.reports import write_client_tables, write_report_logged  # lazily: keeps matplotlib out of startup

            self.run_dir.create()
            dump_config(self.cfg, self.run_dir.path / "config.yaml")
            self.run_dir.write_label_histograms(self.histograms)
            self.run_dir.write_history(self.history)
            key = "local_only_accuracy" if self.has_heldout else "local_only_test_accuracy"
            measure = summary["client_accuracy"]["measure"]
            write_client_tables(self.run_dir.path, accuracy=[{"client": r["client"], "accuracy": r[key], "measure": measure}
                                                             for r in self.rows])
            columns = list(self.rows[0])
            write_personalization_csv(self.run_dir.path / PERSONALIZATION_CSV, self.rows, columns,
                                      (f"local_only_accuracy/loss on {heldout_measure(self.cfg)}; " if self.has_heldout else "")
                                      + f"local_only_test_accuracy/loss: {self.test_set_measure}")
            self.run_dir.write_json("summary.json", summary)
            write_report_logged(self.run_dir.path)
        return summary

