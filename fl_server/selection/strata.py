"""Grouping clients into strata for stratified selection.

Two groupings, chosen with ``stratify_by``:

* ``label``: k-means (k-means++ start, Lloyd iterations) over each client's label
  *distribution* (its histogram divided by its total), so clients with similar label skew share
  a stratum whatever their size. Histograms may be Laplace-noised; negative noisy counts are
  clamped to 0 and an all-zero histogram counts as uniform.
* ``size``: equal-count groups of clients ordered by ``num_samples`` (quantile bins), so small,
  medium and large clients are each represented.

The grouping is seeded by the run seed only (not the round), so the strata stay the same from
round to round as long as the available clients and their reports do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl_common.protocol import derive_seed
from fl_server.selection.info import ClientInfo

__all__ = ["STRATIFY_BY", "assign_strata", "kmeans"]

STRATIFY_BY = ("label", "size")


def kmeans(points: np.ndarray, k: int, seed: int, max_iter: int = 100) -> np.ndarray:
    """Cluster labels in 0..k'-1 (k' <= k: clusters left empty are dropped and renumbered)."""
    x = np.asarray(points, dtype=np.float64)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: next centre with probability proportional to squared distance
        d2 = np.min(_sq_distances(x, np.asarray(centres)), axis=1)
        if d2.sum() <= 0:
            break  # fewer distinct points than clusters
        centres.append(x[rng.choice(n, p=d2 / d2.sum())])
    c = np.asarray(centres)
    labels = np.full(n, -1)
    for _ in range(max_iter):
        new = np.argmin(_sq_distances(x, c), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        c = np.asarray([x[labels == j].mean(axis=0) if np.any(labels == j) else c[j] for j in range(len(c))])
    _, renumbered = np.unique(labels, return_inverse=True)
    return renumbered


def _sq_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[n, k] squared distances, in O(n k) memory (not the O(n k d) of broadcasting)."""
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def _label_features(clients: Sequence[ClientInfo]) -> np.ndarray:
    missing = [c.client_id for c in clients if c.label_histogram is None]
    if missing:
        raise ValueError(f"selection 'stratified' with stratify_by 'label' needs every client's label histogram; "
                         f"client {missing[0]!r} reported none")
    widths = {len(c.label_histogram or ()) for c in clients}
    if len(widths) != 1:
        raise ValueError(f"clients reported label histograms of different lengths {sorted(widths)}")
    h = np.clip(np.asarray([c.label_histogram for c in clients], dtype=np.float64), 0.0, None)
    totals = h.sum(axis=1, keepdims=True)
    return np.where(totals > 0, h / np.where(totals > 0, totals, 1.0), 1.0 / h.shape[1])


def _size_groups(clients: Sequence[ClientInfo], k: int) -> np.ndarray:
    missing = [c.client_id for c in clients if c.num_samples is None]
    if missing:
        raise ValueError(f"selection 'stratified' with stratify_by 'size' needs every client's num_samples; "
                         f"client {missing[0]!r} reported none")
    sizes = np.asarray([c.num_samples for c in clients], dtype=np.float64)
    order = np.argsort(sizes, kind="stable")  # clients arrive sorted by id, so ties break by id
    groups = np.empty(len(clients), dtype=np.int64)
    for g, chunk in enumerate(np.array_split(order, max(1, min(k, len(clients))))):
        groups[chunk] = g
    return groups


def assign_strata(clients: Sequence[ClientInfo], by: str, num_strata: int, seed: int) -> np.ndarray:
    """Stratum index of each client (same order as ``clients``)."""
    if by == "label":
        return kmeans(_label_features(clients), num_strata, derive_seed(seed, "strata"))
    if by == "size":
        return _size_groups(clients, num_strata)
    raise ValueError(f"unknown stratify_by {by!r}: allowed {', '.join(STRATIFY_BY)}")
