"""Datasets as in-memory tensors and the ways to split them among federated clients.

Kept free of any transport or driver code: the server, the client daemon and the in-process
simulation all derive the same client shards from the same (labels, seed, method) inputs.

The ``partition`` function is deliberately not re-exported here: the name would shadow the
``fl_common.data.partition`` submodule. Import it as ``from fl_common.data.partition import partition``.
"""

from fl_common.data.datasets import (
    DATASETS,
    ArrayDataset,
    DatasetUnavailable,
    load_dataset,
)
from fl_common.data.partition import (
    PARTITION_METHODS,
    client_partition,
    label_histograms,
)

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetUnavailable",
    "load_dataset",
    "PARTITION_METHODS",
    "client_partition",
    "label_histograms",
]
