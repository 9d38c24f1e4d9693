"""The training data a federation is configured with, derived identically on every side.

The REST server hands each client a :class:`~fl_common.protocol.rest.DataAssignment` (dataset,
partition index, method, seed...) instead of data. The client daemon rebuilds its own shard from
it, and the server — which never holds a client's records — needs only the *sizes* of the
shards, to plan and account sample-level DP-SGD. Both go through these two functions so that
the sizes the server accounts are the sizes the clients train on.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from fl_common.data.datasets import ArrayDataset, load_dataset, load_raw_images
from fl_common.data.partition import client_partition, partition

if TYPE_CHECKING:
    from fl_common.protocol.rest import DataAssignment


def training_subset_indices(num_records: int, seed: int, max_train_samples: int | None) -> np.ndarray | None:
    """The sorted indices of the seeded subset of ``max_train_samples`` records; None for all of them."""
    if max_train_samples is None or max_train_samples >= num_records:
        return None
    from fl_common.protocol import derive_seed  # protocol imports nothing from data: no cycle

    rng = np.random.default_rng(derive_seed(seed, "train-subset"))
    return np.sort(rng.choice(num_records, size=max_train_samples, replace=False))


def training_subset(train: ArrayDataset, seed: int, max_train_samples: int | None) -> ArrayDataset:
    """The seeded subset of ``max_train_samples`` training records (all of them when None or larger)."""
    chosen = training_subset_indices(len(train), seed, max_train_samples)
    return train if chosen is None else train.subset(chosen)


def client_shard(assignment: DataAssignment, data_dir: str | os.PathLike[str] | None = None) -> ArrayDataset:
    """The training records of one client's partition, as a daemon rebuilds them from its assignment.

    Equal, tensor for tensor, to ``client_partition`` over ``training_subset(load_dataset(...))`` followed by
    ``subset``; for an idx dataset on disk (Fashion-MNIST, MNIST) it gets there without the whole split in
    float32: the stored pixels are mapped from the decoded-data cache (fl_common/data/decoded_cache.py), the
    partition is computed on the labels, and only the client's rows are normalised. That is what lets a
    daemon start in a few tens of milliseconds of data work and a few MB of memory (benchmarks/results/
    fast_rounds/startup.md)."""
    a = assignment
    raw = load_raw_images(a.dataset, "train", data_dir)
    if raw is None:  # cifar10, synthetic, a download: the whole split, as before
        train = training_subset(load_dataset(a.dataset, "train", data_dir=data_dir, seed=a.seed), a.seed,
                                a.max_train_samples)
        idx = client_partition(train.y.numpy(), a.num_clients, a.partition_index, a.method, seed=a.seed,
                               alpha=a.alpha, samples_per_client=a.samples_per_client,
                               shards_per_client=a.shards_per_client)
        return train.subset(idx)
    chosen = training_subset_indices(len(raw), a.seed, a.max_train_samples)
    labels = raw.labels.numpy() if chosen is None else raw.labels.numpy()[chosen]
    idx = client_partition(labels, a.num_clients, a.partition_index, a.method, seed=a.seed, alpha=a.alpha,
                           samples_per_client=a.samples_per_client, shards_per_client=a.shards_per_client)
    return raw.rows(idx if chosen is None else chosen[idx])


def partition_sizes(labels: np.ndarray, num_clients: int, method: str, *, seed: int, alpha: float,
                    samples_per_client: int | None, shards_per_client: int) -> list[int]:
    """Number of records of every client's shard, in partition-index order."""
    parts = partition(labels, num_clients, method, seed=seed, alpha=alpha, samples_per_client=samples_per_client,
                      shards_per_client=shards_per_client)
    return [len(p) for p in parts]


__all__ = ["training_subset", "training_subset_indices", "client_shard", "partition_sizes"]
