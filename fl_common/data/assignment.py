"""The training data a federation is configured with, derived identically on every side.

The REST server hands each client a :class:`~fl_common.protocol.rest.DataAssignment` (dataset,
partition index, method, seed...) instead of data. The client daemon rebuilds its own shard from
it, and the server — which never holds a client's records — needs only the *sizes* of the
shards, to plan and account sample-level DP-SGD. Both go through these two functions so that
the sizes the server accounts are the sizes the clients train on.
"""

from __future__ import annotations

import numpy as np

from fl_common.data.datasets import ArrayDataset
from fl_common.data.partition import partition


def training_subset(train: ArrayDataset, seed: int, max_train_samples: int | None) -> ArrayDataset:
    """The seeded subset of ``max_train_samples`` training records (all of them when None or larger)."""
    if max_train_samples is None or max_train_samples >= len(train):
        return train
    from fl_common.protocol import derive_seed  # protocol imports nothing from data: no cycle

    rng = np.random.default_rng(derive_seed(seed, "train-subset"))
    return train.subset(np.sort(rng.choice(len(train), size=max_train_samples, replace=False)))


def partition_sizes(labels: np.ndarray, num_clients: int, method: str, *, seed: int, alpha: float,
                    samples_per_client: int | None, shards_per_client: int) -> list[int]:
    """Number of records of every client's shard, in partition-index order."""
    parts = partition(labels, num_clients, method, seed=seed, alpha=alpha, samples_per_client=samples_per_client,
                      shards_per_client=shards_per_client)
    return [len(p) for p in parts]


__all__ = ["training_subset", "partition_sizes"]
