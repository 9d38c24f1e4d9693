"""Per-client held-out splits, personalized fine-tuning and the local-only baseline (simulation).

Issue 4 asks that the federated, fine-tuned and local-only accuracies can be compared *per
client*. Comparing them needs data that none of the three models trained on, drawn from each
client's own distribution, so ``client_test_fraction`` splits every client's partition into a
train part (the only data the federation, the fine-tuning and the local-only model ever see)
and a held-out part (used only for evaluation). The split is seeded by (seed, client) alone,
so a client can recompute its own split from its partition, and a resumed run gets the same one.

Three models are then evaluated on each client's held-out part:

* **federated**: the final global model, unchanged;
* **fine-tuned** (``finetune_epochs``): the final global model after that many local epochs on
  the client's train part (the seed's "personalized fine-tuning");
* **local-only** (``local_only_epochs``): a model trained only on the client's train part, from
  the same initial weights the federation started from, with no communication at all.

Fine-tuning and local-only training use the client's own optimiser settings (``optimizer``,
``momentum``, ``weight_decay``, ``batch_size``; fine-tuning at the learning rate of the last
round, local-only training at the base ``learning_rate``) and plain local steps: no FedProx
term, no SCAFFOLD correction, no differential privacy (neither model leaves its client; the
accuracies written here are the simulator's measurements). Every client trains seeded by
(seed, purpose, client), on the simulation's worker pool, with compression off (the models are
evaluated, not uploaded).

Everything here is transport-free: the functions take tensors, index arrays and a config.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_common.config import ConfigError, FLConfig
from fl_common.protocol import TrainInstructions, derive_seed
from fl_common.training import EvalResult, LocalTrainer, learning_rate_at
from fl_server.simulation.executor import ClientExecutor, InProcessExecutor, ProcessPoolExecutor
from fl_server.store.run_dir import atomic_write_bytes

__all__ = [
    "PERSONALIZATION_CSV",
    "PersonalizationResult",
    "check_federated_config",
    "client_executor",
    "distribution",
    "gain_distribution",
    "heldout_measure",
    "personalize",
    "split_client_data",
    "split_partitions",
    "train_each_client",
    "write_personalization_csv",
]

PERSONALIZATION_CSV = "personalization.csv"


# ----------------------------------------------------------------------------------- the split
def split_client_data(indices: np.ndarray, fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """One client's (train part, held-out part), both sorted, disjoint, together all of ``indices``.

    The held-out part has round(fraction x n) samples, clamped to [1, n - 1] so that every client
    keeps something to train on and something to be evaluated on. The permutation comes from
    ``derive_seed(seed, "client-test-split", client)``: it depends on this client alone, so a
    client daemon could recompute it from its own partition. ``fraction = 0`` returns the
    partition unchanged and an empty held-out part.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1)")
    if fraction == 0.0:
        return idx, np.zeros(0, dtype=np.int64)
    n = idx.size
    if n < 2:
        raise ConfigError(f"config key 'client_test_fraction' has value {fraction:g}: client {client} holds {n} sample(s), "
                          f"too few to split into a training and a held-out part (each needs at least one)")
    held = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(derive_seed(seed, "client-test-split", client)).permutation(n)
    return np.sort(idx[perm[held:]]), np.sort(idx[perm[:held]])


def split_partitions(partitions: Sequence[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every client's (train parts, held-out parts); at ``fraction = 0`` the partitions themselves (same arrays)."""
    if fraction == 0.0:
        return list(partitions), [np.zeros(0, dtype=np.int64) for _ in partitions]
    pairs = [split_client_data(p, fraction, seed, cid) for cid, p in enumerate(partitions)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def heldout_measure(cfg: FLConfig) -> str:
    """On which data per-client accuracy is measured in this run, in words, for every file that reports it."""
    if cfg.client_test_fraction == 0.0:
        return "each client's training data"
    return (f"each client's held-out part (client_test_fraction {cfg.client_test_fraction:g} of its data, seeded by "
            f"(seed, client), never trained on)")


def check_federated_config(cfg: FLConfig) -> None:
    """Rules that only the federated driver has (the local-only run may train without a held-out part)."""
    if cfg.local_only_epochs > 0 and cfg.client_test_fraction == 0.0:
        raise ConfigError(f"config key 'local_only_epochs' has value {cfg.local_only_epochs} but client_test_fraction is 0: "
                          f"in a federated run the local-only models are compared on each client's held-out part; set "
                          f"client_test_fraction (e.g. 0.2), or run the baseline alone with simulate --local-only")
    if cfg.local_only_test_samples is not None:
        raise ConfigError(f"config key 'local_only_test_samples' has value {cfg.local_only_test_samples} but a federated run "
                          f"evaluates its local-only models on the held-out parts only; it applies to simulate --local-only; "
                          f"remove 'local_only_test_samples'")


# --------------------------------------------------------------------------------- training
def client_executor(cfg: FLConfig, input_shape: tuple[int, int, int], num_classes: int, x: torch.Tensor, y: torch.Tensor,
                    partitions: Sequence[np.ndarray], numel: int) -> ClientExecutor:
    """A worker pool for training every client once (one single-threaded worker per core by default).

    Compression is switched off for it: the pool's workers would otherwise run their updates
    through the wire codec, and a fine-tuned or local-only model is evaluated, never uploaded.
    Unlike a round's pool it is capped by the number of clients, not by clients per round.
    """
    quiet = dataclasses.replace(cfg, compression=False)
    if cfg.workers >= 0:
        n = cfg.workers
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // cfg.threads_per_worker)
    n = min(n, len(partitions))
    if n <= 1:
        return InProcessExecutor(quiet, input_shape, num_classes, x, y, partitions)
    return ProcessPoolExecutor(quiet, input_shape, num_classes, x, y, partitions, numel, workers=n,
                               threads_per_worker=cfg.threads_per_worker)


def _instructions(cfg: FLConfig, purpose: str, client: int, epochs: int, learning_rate: float) -> TrainInstructions:
    return TrainInstructions(round=0, epochs=epochs, batch_size=cfg.batch_size, learning_rate=learning_rate,
                             optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             seed=derive_seed(cfg.seed, purpose, client))


def finetune_learning_rate(cfg: FLConfig, completed_rounds: int) -> float:
    """The learning rate of the last round trained: where the client's schedule had arrived."""
    return learning_rate_at(max(completed_rounds, 1), cfg.learning_rate, cfg.lr_schedule, decay=cfg.lr_decay,
                            step_size=cfg.lr_step_size, total_rounds=cfg.num_rounds)


def train_each_client(executor: ClientExecutor, start: torch.Tensor, cfg: FLConfig, purpose: str, epochs: int,
                      learning_rate: float, sizes: Sequence[int]) -> Iterator[tuple[int, torch.Tensor, dict[str, float]]]:
    """Train every client from ``start`` for ``epochs`` epochs; yield (client, its model vector, metrics).

    Clients are planned largest first, which is the order the pool schedules them in, so results
    come back roughly in the order they finish and few finished models wait in memory."""
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    plan = {cid: _instructions(cfg, purpose, cid, epochs, learning_rate) for cid in order}
    start = start.detach().to(torch.float32).cpu()
    for update in executor.run_round(start, plan):
        yield int(update.client_id), start + update.delta, dict(update.metrics)


# ------------------------------------------------------------------------------- summaries
def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Mean, median, mean of the worst 10 % (Li et al. 2020's fairness number), min, max, std over clients."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"clients": 0}
    k = max(1, math.ceil(0.1 * len(vals)))
    mean = sum(vals) / len(vals)
    mid = len(vals) // 2
    median = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return {"clients": len(vals), "mean": mean, "median": median, "worst_10pct": sum(vals[:k]) / k, "min": vals[0],
            "max": vals[-1], "std": math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))}


def gain_distribution(after: Sequence[float], before: Sequence[float]) -> dict[str, Any]:
    """The per-client differences after - before: their distribution and how many clients gained or lost."""
    gains = [a - b for a, b in zip(after, before, strict=False)]
    out = distribution(gains)
    out.update(clients_improved=sum(g > 0 for g in gains), clients_worse=sum(g < 0 for g in gains))
    return out


# ------------------------------------------------------------------------------------ result
@dataclass
class PersonalizationResult:
    """Per-client rows (client, samples, accuracies and losses of each model on the held-out part) and their summary."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    columns: list[str] = field(default_factory=list)

    def by_client(self) -> dict[int, dict[str, Any]]:
        """The seed's ``evaluate_client_models()`` shape: client -> results, with ``accuracy`` the
        personalized model's (fine-tuned when fine-tuning ran, the federated model's otherwise)."""
        out = {}
        for r in self.rows:
            headline = r.get("finetuned_accuracy", r.get("federated_accuracy"))
            out[int(r["client"])] = {**r, "accuracy": headline}
        return out


def personalize(cfg: FLConfig, *, global_vector: torch.Tensor, initial_vector: torch.Tensor, completed_rounds: int,
                evaluator: LocalTrainer, x: torch.Tensor, y: torch.Tensor, train_parts: Sequence[np.ndarray],
                heldout_parts: Sequence[np.ndarray], make_executor: Callable[[], ClientExecutor],
                progress: Callable[[str, int], None] | None = None) -> PersonalizationResult:
    """Evaluate the federated model, and (as configured) the fine-tuned and local-only models, on
    every client's held-out part. ``make_executor`` builds the pool (see :func:`client_executor`)
    and is called only when something trains; the pool is closed before this returns."""
    if cfg.client_test_fraction == 0.0:
        raise ConfigError("per-client personalization results need a held-out part: set client_test_fraction (e.g. 0.2)")
    clients = len(train_parts)
    held = [_take(x, y, part) for part in heldout_parts]
    rows: list[dict[str, Any]] = [{"client": cid, "train_samples": len(train_parts[cid]),
                                   "heldout_samples": len(heldout_parts[cid])} for cid in range(clients)]

    def evaluate(vector: torch.Tensor, cid: int) -> EvalResult:
        return evaluator.evaluate(vector, held[cid][0], held[cid][1], cfg.eval_batch_size)

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    for cid in range(clients):
        r = evaluate(global_vector, cid)
        rows[cid].update(federated_accuracy=r.accuracy, federated_loss=r.loss)
    seconds["federated_evaluation"] = time.perf_counter() - t
    sizes = [len(p) for p in train_parts]
    runs = [("finetuned", "finetune", cfg.finetune_epochs, global_vector, finetune_learning_rate(cfg, completed_rounds)),
            ("local_only", "local-only", cfg.local_only_epochs, initial_vector, cfg.learning_rate)]
    runs = [run for run in runs if run[2] > 0]
    if runs:
        executor = make_executor()
        try:
            for name, purpose, epochs, start, lr in runs:
                t = time.perf_counter()
                for cid, vector, metrics in train_each_client(executor, start, cfg, purpose, epochs, lr, sizes):
                    r = evaluate(vector, cid)
                    rows[cid].update({f"{name}_accuracy": r.accuracy, f"{name}_loss": r.loss,
                                      f"{name}_train_loss": metrics.get("train_loss")})
                    if progress is not None:
                        progress(name, cid)
                seconds[name] = time.perf_counter() - t
        finally:
            executor.close()
    names = ["federated"] + [run[0] for run in runs]
    for row in rows:
        if "finetuned_accuracy" in row:
            row["gain_finetuned_vs_federated"] = row["finetuned_accuracy"] - row["federated_accuracy"]
        if "local_only_accuracy" in row:
            row["gain_federated_vs_local_only"] = row["federated_accuracy"] - row["local_only_accuracy"]
            if "finetuned_accuracy" in row:
                row["gain_finetuned_vs_local_only"] = row["finetuned_accuracy"] - row["local_only_accuracy"]
    columns = list(rows[0]) if rows else []
    summary: dict[str, Any] = {
        "measure": f"accuracy on {heldout_measure(cfg)}",
        "clients": clients,
        "heldout_samples": distribution([r["heldout_samples"] for r in rows]),
        "finetune_epochs": cfg.finetune_epochs,
        "local_only_epochs": cfg.local_only_epochs,
        "training": ("fine-tuning from the final global model at the last round's learning rate, local-only training from "
                     "the initial model at learning_rate; the client's optimizer, momentum, weight_decay and batch_size; "
                     "no FedProx term, no SCAFFOLD correction, no differential privacy (these models stay on their clients)"),
    }
    for name in names:
        summary[name] = distribution([r[f"{name}_accuracy"] for r in rows])
    for after, before in (("finetuned", "federated"), ("federated", "local_only"), ("finetuned", "local_only")):
        if after in names and before in names:
            summary[f"gain_{after}_vs_{before}"] = gain_distribution([r[f"{after}_accuracy"] for r in rows],
                                                                     [r[f"{before}_accuracy"] for r in rows])
    summary["seconds"] = seconds
    return PersonalizationResult(rows=rows, summary=summary, columns=columns)


def _take(x: torch.Tensor, y: torch.Tensor, part: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.from_numpy(np.asarray(part, dtype=np.int64))
    return x.index_select(0, ix), y.index_select(0, ix)


def write_personalization_csv(path: os.PathLike[str] | str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                              measure: str) -> None:
    """``personalization.csv``: one row per client, every accuracy on the same held-out part, and a
    ``measure`` column saying which (as client_accuracy.csv does)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*columns, "measure"], lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: ("" if row.get(k) is None else row.get(k)) for k in columns}, "measure": measure})
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))
