"""Client partitions: determinism, coverage, per-client reproducibility, skew, sizes, argument checks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import fl_common.data.partition as part_mod
from fl_common.data.partition import PARTITION_METHODS, client_partition, label_histograms, partition

METHODS = list(PARTITION_METHODS)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # Deliberately imbalanced, so nothing relies on equal class sizes.
    rng = np.random.default_rng(123)
    return rng.choice(10, size=6000, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    hist = label_histograms(labels, parts, 10).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(ent.mean())


def assert_disjoint_sorted(parts: list[np.ndarray], n: int) -> np.ndarray:
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "each part sorted, no duplicates"
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "parts overlap"
    assert allidx.min() >= 0 and allidx.max() < n
    return allidx


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_in_seed(labels, method):
    a = partition(labels, 20, method, seed=7)
    b = partition(labels, 20, method, seed=7)
    c = partition(labels, 20, method, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_does_not_touch_global_rng(labels):
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    for method in METHODS:
        partition(labels, 10, method, seed=1)
    assert np.random.random() == before


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_covers_every_sample_exactly_once(labels, method, num_clients):
    parts = partition(labels, num_clients, method, seed=0, min_samples_per_client=5)
    assert len(parts) == num_clients
    allidx = assert_disjoint_sorted(parts, len(labels))
    assert len(allidx) == len(labels)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("extra", [{}, {"samples_per_client": 40}], ids=["full", "fixed-size"])
def test_client_partition_matches_partition(labels, method, extra):
    k = 12
    whole = partition(labels, k, method, seed=5, alpha=0.3, **extra)
    for i in range(k):
        part_mod._RECENT.clear()  # each client recomputes on its own, as a separate daemon would
        assert np.array_equal(client_partition(labels, k, i, method, seed=5, alpha=0.3, **extra), whole[i])
    # memoised path too, and the returned array is the caller's own copy
    mine = client_partition(labels, k, 3, method, seed=5, alpha=0.3, **extra)
    mine[:] = -1
    assert np.array_equal(client_partition(labels, k, 3, method, seed=5, alpha=0.3, **extra), whole[3])


def test_client_partition_index_checked(labels):
    with pytest.raises(ValueError, match=r"index=5 must be an integer in \[0, num_clients=5\)"):
        client_partition(labels, 5, 5, "iid", seed=0)


def test_dirichlet_small_alpha_is_more_skewed(labels):
    entropies = {a: mean_label_entropy(labels, partition(labels, 50, "dirichlet", seed=0, alpha=a))
                 for a in (0.05, 0.5, 100.0)}
    iid = mean_label_entropy(labels, partition(labels, 50, "iid", seed=0))
    assert entropies[0.05] < entropies[0.5] - 0.3 < entropies[100.0] - 0.6
    assert abs(entropies[100.0] - iid) < 0.1


def test_dirichlet_fixed_size_skew_tracks_alpha(labels):
    small = mean_label_entropy(labels, partition(labels, 50, "dirichlet", seed=0, alpha=0.05, samples_per_client=60))
    large = mean_label_entropy(labels, partition(labels, 50, "dirichlet", seed=0, alpha=100.0, samples_per_client=60))
    full = mean_label_entropy(labels, partition(labels, 50, "dirichlet", seed=0, alpha=0.5))
    fixed = mean_label_entropy(labels, partition(labels, 50, "dirichlet", seed=0, alpha=0.5, samples_per_client=60))
    assert small < large - 1.0
    assert abs(full - fixed) < 0.35, "same alpha, similar skew with or without samples_per_client"


def test_shards_give_few_labels(labels):
    parts = partition(labels, 100, "shards", seed=0, shards_per_client=2)
    labels_per_client = (label_histograms(labels, parts, 10) > 0).sum(axis=1)
    assert np.mean(labels_per_client <= 2) >= 0.8
    assert labels_per_client.max() <= 4  # a shard straddles at most one class boundary here
    balanced = np.repeat(np.arange(10), 600)  # McMahan's setting: shards never straddle
    hist = label_histograms(balanced, partition(balanced, 100, "shards", seed=0), 10)
    assert (hist > 0).sum(axis=1).max() <= 2 and set(hist.sum(axis=1)) == {60}


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_dirichlet_min_samples_respected(labels, alpha):
    parts = partition(labels, 200, "dirichlet", seed=0, alpha=alpha, min_samples_per_client=20)
    assert min(len(p) for p in parts) >= 20
    assert len(assert_disjoint_sorted(parts, len(labels))) == len(labels)


def test_dirichlet_repair_path(monkeypatch, labels):
    monkeypatch.setattr(part_mod, "_DIRICHLET_DRAWS", 1)  # force the repair after one failed draw
    parts = partition(labels, 300, "dirichlet", seed=0, alpha=0.05, min_samples_per_client=20)
    assert min(len(p) for p in parts) == 20
    assert len(assert_disjoint_sorted(parts, len(labels))) == len(labels)
    again = partition(labels, 300, "dirichlet", seed=0, alpha=0.05, min_samples_per_client=20)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_samples_per_client_exact_and_disjoint(labels, method):
    parts = partition(labels, 30, method, seed=0, samples_per_client=77, shards_per_client=3)
    assert [len(p) for p in parts] == [77] * 30
    assert_disjoint_sorted(parts, len(labels))
    everything = partition(labels, 60, method, seed=0, samples_per_client=100)  # uses all 6000
    assert len(assert_disjoint_sorted(everything, len(labels))) == len(labels)


def test_label_histograms(labels):
    parts = [np.array([0, 1, 2]), np.array([], dtype=np.int64), np.array([5])]
    hist = label_histograms(labels, parts, 10)
    assert hist.shape == (3, 10) and hist.dtype == np.int64
    assert hist.sum(axis=1).tolist() == [3, 0, 1]
    assert hist[2, labels[5]] == 1
    with pytest.raises(ValueError, match="num_classes=3"):
        label_histograms(labels, parts, 3)


def test_accepts_torch_labels(labels):
    a = partition(torch.from_numpy(labels), 10, "dirichlet", seed=2)  # type: ignore[arg-type]  # accepted at run time
    b = partition(labels.astype(np.int32), 10, "dirichlet", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "random"}, r"method='random' is unknown; choose one of iid, dirichlet, shards"),
        ({"num_clients": 0}, r"num_clients=0 must be an integer in \[1, 6000\]"),
        ({"num_clients": 6001}, r"num_clients=6001"),
        ({"num_clients": 2.5}, r"num_clients=2.5"),
        ({"alpha": 0.0}, r"alpha=0.0 must be a finite number > 0"),
        ({"alpha": -1}, r"alpha=-1"),
        ({"alpha": float("nan")}, r"alpha=nan"),
        ({"seed": -1}, r"seed=-1 must be a non-negative integer"),
        ({"samples_per_client": 0}, r"samples_per_client=0"),
        ({"samples_per_client": 601}, r"samples_per_client=601 for num_clients=10 needs 6010 samples but only 6000"),
        ({"method": "shards", "shards_per_client": 0}, r"shards_per_client=0"),
        ({"method": "shards", "num_clients": 4000, "shards_per_client": 2}, r"shards_per_client=2 is too many"),
        ({"method": "dirichlet", "min_samples_per_client": 601}, r"min_samples_per_client=601"),
    ],
)
def test_bad_arguments_refused(labels, kwargs, message):
    args = {"num_clients": 10, "method": "dirichlet", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        partition(labels, args.pop("num_clients"), args.pop("method"), **args)


@pytest.mark.parametrize("bad", [np.array([[0, 1]]), np.array([0.5, 1.0]), np.array([-1, 2]), np.array([], int)])
def test_bad_labels_refused(bad):
    with pytest.raises(ValueError, match="labels"):
        partition(bad, 1, "iid", seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_fast_on_60k_among_1000(method):
    y = np.random.default_rng(0).integers(0, 10, 60000)
    start = time.perf_counter()
    parts = partition(y, 1000, method, seed=0)
    elapsed = time.perf_counter() - start
    assert len(parts) == 1000 and sum(map(len, parts)) == 60000
    assert elapsed < 1.0, f"{method}: {elapsed:.3f} s"
