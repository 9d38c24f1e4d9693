"""A daemon's shard from the decoded-data cache: equal to the whole-split path, and the cache kept honest.

Small idx files written here (the helpers of test_data_datasets.py), plus one check on the real Fashion-MNIST.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_common.data import client_partition, load_dataset
from fl_common.data.assignment import client_shard, training_subset
from fl_common.data.datasets import load_raw_images, warm_decoded_cache
from fl_common.data.decoded_cache import ENV_DATA_CACHE_DIR, decoded_idx
from fl_common.data.idx import read_idx
from fl_common.protocol.rest import DataAssignment
from tests.common.test_data_datasets import DEBIAN_FASHION, write_split


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "decoded"
    monkeypatch.setenv(ENV_DATA_CACHE_DIR, str(folder))
    return folder


def whole_split_shard(a: DataAssignment, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The daemon's shard as it was built before: the whole split normalised, then subset twice."""
    train = training_subset(load_dataset(a.dataset, "train", data_dir=data_dir, seed=a.seed), a.seed, a.max_train_samples)
    idx = client_partition(train.y.numpy(), a.num_clients, a.partition_index, a.method, seed=a.seed, alpha=a.alpha,
                           samples_per_client=a.samples_per_client, shards_per_client=a.shards_per_client)
    shard = train.subset(idx)
    return shard.x, shard.y


def assignment(dataset: str = "mnist", *, index: int = 2, method: str = "iid", samples: int | None = None,
               max_train: int | None = None) -> DataAssignment:
    return DataAssignment(dataset=dataset, partition_index=index, num_clients=5, method=method, alpha=0.5, seed=11,
                          samples_per_client=samples, shards_per_client=2, max_train_samples=max_train)


@pytest.mark.parametrize(("method", "samples", "max_train"), [("iid", None, None), ("dirichlet", None, 300),
                                                              ("shards", None, None), ("iid", 40, 250)])
def test_the_shard_equals_the_whole_split_path(tmp_path: Path, cache_dir: Path, method: str, samples: int | None,
                                               max_train: int | None) -> None:
    write_split(tmp_path / "data", "train", 500, gz=True)
    a = assignment(method=method, samples=samples, max_train=max_train)
    shard = client_shard(a, tmp_path / "data")
    x, y = whole_split_shard(a, tmp_path / "data")
    assert shard.x.dtype == torch.float32 and torch.equal(shard.x, x) and torch.equal(shard.y, y)
    assert shard.name == "mnist" and shard.num_classes == 10
    assert len(list(cache_dir.glob("*.npy"))) == 2  # images and labels, decoded once


def test_the_real_fashion_mnist_shard_equals_the_whole_split_path(cache_dir: Path) -> None:
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    a = DataAssignment(dataset="fashion_mnist", partition_index=3, num_clients=10, method="iid", alpha=0.5, seed=7,
                       samples_per_client=600, shards_per_client=2, max_train_samples=None)
    shard = client_shard(a)
    x, y = whole_split_shard(a, None)
    assert len(shard) == 600 and torch.equal(shard.x, x) and torch.equal(shard.y, y)


def test_a_cache_entry_is_mapped_and_a_damaged_one_is_decoded_again(tmp_path: Path, cache_dir: Path) -> None:
    images, _ = write_split(tmp_path, "train", 30, gz=True)
    source = tmp_path / "train-images-idx3-ubyte.gz"
    first = decoded_idx(source, expect_ndim=3)
    assert isinstance(first, np.memmap) and np.array_equal(first, images) and not first.flags.writeable
    (entry,) = cache_dir.glob("train-images-idx3-ubyte-*.npy")
    assert np.array_equal(decoded_idx(source, expect_ndim=3), images)  # the same entry, mapped again
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    assert np.array_equal(decoded_idx(source, expect_ndim=3), images)
    assert np.array_equal(np.load(entry), images)  # rewritten whole


def test_a_replaced_source_file_gets_its_own_entry(tmp_path: Path, cache_dir: Path) -> None:
    write_split(tmp_path, "train", 20, gz=False, seed=1)
    source = tmp_path / "train-images-idx3-ubyte"
    decoded_idx(source)
    newer, _ = write_split(tmp_path, "train", 25, gz=False, seed=2)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1_000_000_000))
    assert np.array_equal(decoded_idx(source), newer)
    assert len(list(cache_dir.glob("train-images-idx3-ubyte-*.npy"))) == 2


def test_the_cache_off_or_unwritable_parses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, _ = write_split(tmp_path, "train", 10, gz=True)
    source = tmp_path / "train-images-idx3-ubyte.gz"
    monkeypatch.setenv(ENV_DATA_CACHE_DIR, "off")
    assert np.array_equal(decoded_idx(source), images) and not isinstance(decoded_idx(source), np.memmap)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(ENV_DATA_CACHE_DIR, str(blocked / "decoded"))
    assert np.array_equal(decoded_idx(source), read_idx(source))
    elsewhere = tmp_path / "elsewhere"
    assert not isinstance(decoded_idx(source, cache_dir=elsewhere, use_cache=False), np.memmap)
    assert not elsewhere.exists(), "use_cache=False writes no entry, whatever cache_dir says"


def test_raw_images_are_only_for_idx_datasets_found_on_disk(tmp_path: Path, cache_dir: Path) -> None:
    assert load_raw_images("synthetic", "train") is None and load_raw_images("cifar10", "train", tmp_path) is None
    assert load_raw_images("mnist", "train", tmp_path) is None  # nothing there: load_dataset names the fix
    assert warm_decoded_cache("mnist", "train", tmp_path) is False
    write_split(tmp_path, "train", 12, gz=True)
    assert warm_decoded_cache("mnist", "train", tmp_path) is True
    raw = load_raw_images("mnist", "train", tmp_path)
    assert raw is not None and len(raw) == 12
    with pytest.raises(IndexError, match="must lie in"):
        raw.rows(np.array([0, 12]))


def test_a_synthetic_shard_takes_the_whole_split_path() -> None:
    a = assignment("synthetic", method="iid")
    shard = client_shard(a)
    x, y = whole_split_shard(a, None)
    assert torch.equal(shard.x, x) and torch.equal(shard.y, y)
