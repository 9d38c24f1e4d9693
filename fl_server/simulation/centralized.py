"""The seed's centralized baseline: the same model trained on the pooled data.

To compare like with like, a centralized "round" processes as many samples as a federated round
does on average (clients per round x local epochs x mean client size), in minibatches of the
same size with the same optimizer and learning-rate schedule, drawn from a seeded permutation of
the pooled data that continues across rounds. It writes the same files as a federated run
(``clients`` is 1: one party trains), so the two curves can be overlaid directly.
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
from fl_common.models import count_parameters, model_from_config
from fl_common.protocol import TrainInstructions, derive_seed
from fl_common.tensors import unflatten
from fl_common.training import LocalTrainer, learning_rate_at
from fl_server.simulation.base import load_training_data
from fl_server.store import RoundRecord, RunDirectory, accuracy_summary

log = logging.getLogger("fl_server.simulation")


class CentralizedBaseline:
    def __init__(self, cfg: FLConfig, output_dir: str | Path | None = None, *, progress: bool | None = None) -> None:
        t0 = time.perf_counter()
        if cfg.differential_privacy:
            raise ConfigError("the centralized baseline trains without differential privacy: set differential_privacy: false "
                              "for --centralized (it is the non-private reference)")
        self.cfg = cfg
        self.progress = progress
        self.train_set, self.test_set = load_training_data(cfg)
        model = model_from_config(cfg, self.train_set.input_shape, self.train_set.num_classes)
        self.num_parameters = count_parameters(model)
        self.trainer = LocalTrainer(model)
        self.vector = self.trainer.vector()
        self.history: list[RoundRecord] = []
        self.run_dir = RunDirectory(output_dir) if output_dir is not None else None
        n = len(self.train_set)
        self.samples_per_round = max(cfg.batch_size, round(cfg.clients_per_round * cfg.local_epochs * n / cfg.num_clients))
        self._stream = np.zeros(0, dtype=np.int64)
        self._epoch = 0
        self.startup_seconds = time.perf_counter() - t0
        self.wall_seconds = 0.0

    def _next_indices(self, count: int) -> np.ndarray:
        n = len(self.train_set)
        while self._stream.size < count:
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "centralized", self._epoch))
            self._stream = np.concatenate([self._stream, rng.permutation(n)])
            self._epoch += 1
        out, self._stream = self._stream[:count], self._stream[count:]
        return out

    def train(self) -> list[RoundRecord]:
        cfg = self.cfg
        start = time.perf_counter()
        bar = tqdm(total=cfg.num_rounds, desc="centralized rounds", unit="round", file=sys.stderr,
                   disable=(None if self.progress is None else not self.progress), dynamic_ncols=True)
        for r in range(1, cfg.num_rounds + 1):
            t = time.perf_counter()
            idx = torch.from_numpy(self._next_indices(self.samples_per_round))
            lr = learning_rate_at(r, cfg.learning_rate, cfg.lr_schedule, decay=cfg.lr_decay, step_size=cfg.lr_step_size,
                                  total_rounds=cfg.num_rounds)
            instr = TrainInstructions(round=r, epochs=1, batch_size=cfg.batch_size, learning_rate=lr, optimizer=cfg.optimizer,
                                      momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=derive_seed(cfg.seed, r, "central"))
            update = self.trainer.train(self.vector, self.train_set.x.index_select(0, idx), self.train_set.y.index_select(0, idx), instr)
            self.vector = self.vector + update.delta
            test = None
            if r % cfg.evaluation_frequency == 0 or r == cfg.num_rounds:
                test = self.trainer.evaluate(self.vector, self.test_set.x, self.test_set.y, cfg.eval_batch_size)
                bar.set_postfix(acc=f"{test.accuracy:.4f}")
            self.history.append(RoundRecord(r, test and test.accuracy, test and test.loss, update.metrics["train_loss"], 1,
                                            time.perf_counter() - t, 0))
            bar.update(1)
        bar.close()
        self.wall_seconds = time.perf_counter() - start
        return self.history

    def save_results(self) -> dict[str, Any]:
        summary = {
            "mode": "centralized",
            "rounds_completed": len(self.history),
            "samples_per_round": self.samples_per_round,
            **accuracy_summary(self.history),
            "wall_seconds": self.wall_seconds,
            "startup_seconds": self.startup_seconds,
            "model_parameters": self.num_parameters,
            "train_samples": len(self.train_set),
            "test_samples": len(self.test_set),
            "config": self.cfg.to_dict(),
        }
        if self.run_dir is not None:
            self.run_dir.create()
            dump_config(self.cfg, self.run_dir.path / "config.yaml")
            self.run_dir.write_history(self.history)
            self.run_dir.write_json("summary.json", summary)
            self.run_dir.save_model(unflatten(self.vector, self.trainer.spec))
            from fl_server.reports import write_report_logged  # lazily: keeps matplotlib out of startup

            write_report_logged(self.run_dir.path)  # logs the report path; a failure only warns
        return summary
