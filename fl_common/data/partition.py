"""Splitting a labelled dataset among federated clients: IID, Dirichlet label skew, and shards.

Every split is a pure function of (labels, num_clients, method, its parameters, seed), drawn from
its own ``np.random.default_rng(seed)`` and never from global RNG state. That is what lets a
client daemon recompute its own shard with :func:`client_partition` and get exactly the indices
the server's (or the simulator's) :func:`partition` assigned to it, with no index list sent over
the wire.

All methods build one ``owner`` array (sample -> client, -1 for unused) and group it once, which
keeps 60k samples among 1000 clients in the low milliseconds.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

__all__ = ["PARTITION_METHODS", "partition", "client_partition", "label_histograms"]

PARTITION_METHODS = ("iid", "dirichlet", "shards")

# Label-wise Dirichlet draws tried before falling back to the deterministic repair. The original
# recipe retries without bound; a bound keeps runtime predictable when many clients share few
# samples and a draw that meets the floor for all of them is improbable.
_DIRICHLET_DRAWS = 20


# --------------------------------------------------------------------------------------------- #
# validation


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative class ids, got minimum {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _check_args(
    n: int,
    num_clients: int,
    method: str,
    seed: int,
    alpha: float,
    samples_per_client: int | None,
    shards_per_client: int,
    min_samples_per_client: int,
) -> None:
    if method not in PARTITION_METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(PARTITION_METHODS)}")
    if not _is_int(num_clients) or not 1 <= num_clients <= n:
        raise ValueError(f"num_clients={num_clients!r} must be an integer in [1, {n}] (the number of samples)")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r} must be a finite number > 0 (small = more label skew)")
    if samples_per_client is not None:
        if not _is_int(samples_per_client) or samples_per_client < 1:
            raise ValueError(f"samples_per_client={samples_per_client!r} must be None or an integer >= 1")
        if num_clients * samples_per_client > n:
            raise ValueError(
                f"samples_per_client={samples_per_client} for num_clients={num_clients} needs "
                f"{num_clients * samples_per_client} samples but only {n} exist (shards are disjoint)"
            )
    if not _is_int(shards_per_client) or shards_per_client < 1:
        raise ValueError(f"shards_per_client={shards_per_client!r} must be an integer >= 1")
    if method == "shards":
        pool = n if samples_per_client is None else samples_per_client
        per = num_clients * shards_per_client if samples_per_client is None else shards_per_client
        if per > pool:
            raise ValueError(
                f"shards_per_client={shards_per_client} is too many: every shard needs at least one sample "
                f"({per} shards from {pool} samples)"
            )
    if not _is_int(min_samples_per_client) or min_samples_per_client < 0:
        raise ValueError(f"min_samples_per_client={min_samples_per_client!r} must be an integer >= 0")
    if method == "dirichlet" and samples_per_client is None and num_clients * min_samples_per_client > n:
        raise ValueError(
            f"min_samples_per_client={min_samples_per_client} for num_clients={num_clients} needs "
            f"{num_clients * min_samples_per_client} samples but only {n} exist"
        )


# --------------------------------------------------------------------------------------------- #
# helpers


def _even_sizes(total: int, parts: int) -> np.ndarray:
    """Sizes of ``parts`` pieces of ``total`` differing by at most one (the first ones larger)."""
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def _group(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    # A stable argsort over owner lists each client's samples in increasing index order, so the
    # parts come out sorted without a per-client sort; unused samples (-1) sort first and drop.
    order = np.argsort(owner, kind="stable").astype(np.int64, copy=False)
    counts = np.bincount(owner[owner >= 0], minlength=num_clients)
    order = order[owner.size - int(counts.sum()):]
    return np.split(order, np.cumsum(counts)[:-1])


def _class_pools(y: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Each present class's indices in random order (one permutation + one stable sort, not C scans)."""
    perm = rng.permutation(y.size)
    grouped = perm[np.argsort(y[perm], kind="stable")]
    counts = np.bincount(y)
    return [pool for pool in np.split(grouped, np.cumsum(counts)[:-1]) if pool.size]


# --------------------------------------------------------------------------------------------- #
# methods: each returns owner[sample] in [-1, num_clients)


def _iid(y: np.ndarray, k: int, rng: np.random.Generator, spc: int | None) -> np.ndarray:
    perm = rng.permutation(y.size)
    if spc is None:
        sizes = _even_sizes(y.size, k)
    else:
        perm, sizes = perm[: k * spc], np.full(k, spc, dtype=np.int64)
    owner = np.full(y.size, -1, dtype=np.int64)
    owner[perm] = np.repeat(np.arange(k), sizes)
    return owner


def _shards(y: np.ndarray, k: int, rng: np.random.Generator, spc: int | None, per_client: int) -> np.ndarray:
    """McMahan et al. 2017: sort by label, cut into k*s shards, deal s random shards to each client.

    With ``samples_per_client`` the sorting and cutting happen on a uniformly drawn pool of
    k*spc samples, and shard sizes are chosen so that each client's s shards sum to exactly spc.
    """
    n_shards = k * per_client
    pool = rng.permutation(y.size)  # random order inside each label once sorted stably
    if spc is not None:
        pool = pool[: k * spc]
    pool = pool[np.argsort(y[pool], kind="stable")]
    shard_of_slot = rng.permutation(n_shards)  # slot k*s+j (client k's j-th shard) -> shard id
    if spc is None:
        shard_sizes = _even_sizes(pool.size, n_shards)
    else:
        shard_sizes = np.empty(n_shards, dtype=np.int64)
        shard_sizes[shard_of_slot] = np.tile(_even_sizes(spc, per_client), k)
    owner_of_shard = np.empty(n_shards, dtype=np.int64)
    owner_of_shard[shard_of_slot] = np.arange(n_shards) // per_client
    owner = np.full(y.size, -1, dtype=np.int64)
    owner[pool] = np.repeat(owner_of_shard, shard_sizes)
    return owner


def _dirichlet_draw(pools: list[np.ndarray], n: int, k: int, alpha: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    owner = np.empty(n, dtype=np.int64)
    sizes = np.zeros(k, dtype=np.int64)
    concentration = np.full(k, alpha)
    for pool in pools:
        p = rng.dirichlet(concentration)
        # Yurochkin et al.'s balancing step: clients already above the mean size get no more.
        masked = p * (sizes < n / k)
        if masked.sum() > 0:
            p = masked / masked.sum()
        cuts = (np.cumsum(p) * pool.size).astype(np.int64)[:-1]
        # Position j of this class goes to the client whose [cut_{i-1}, cut_i) range holds j.
        own = np.searchsorted(cuts, np.arange(pool.size), side="right")
        owner[pool] = own
        sizes += np.bincount(own, minlength=k)
    return owner, sizes


def _repair_min_size(owner: np.ndarray, sizes: np.ndarray, floor: int, rng: np.random.Generator) -> None:
    """Top up clients below ``floor`` with random samples taken from whichever client is largest.

    Taking from the largest client changes the label skew least while still guaranteeing the
    floor (possible because num_clients * floor <= N was checked). Deterministic given ``rng``.
    """
    for client in np.flatnonzero(sizes < floor):
        while sizes[client] < floor:
            donor = int(np.argmax(sizes))
            take = int(min(floor - sizes[client], sizes[donor] - floor))
            moved = rng.choice(np.flatnonzero(owner == donor), size=take, replace=False)
            owner[moved] = client
            sizes[donor] -= take
            sizes[client] += take


def _dirichlet_all(y: np.ndarray, k: int, rng: np.random.Generator, alpha: float, floor: int) -> np.ndarray:
    """Label-wise Dirichlet (Hsu et al. 2019; Yurochkin et al. 2019 code): every sample used.

    For each class its indices are split among clients with proportions ~ Dir(alpha). The whole
    draw is redone (up to ``_DIRICHLET_DRAWS`` times, as in the original recipe) until every client
    has ``floor`` samples; if none succeeds, the last draw is repaired by :func:`_repair_min_size`.
    """
    pools = _class_pools(y, rng)
    owner, sizes = _dirichlet_draw(pools, y.size, k, alpha, rng)
    draws = 1
    while sizes.min() < floor and draws < _DIRICHLET_DRAWS:
        owner, sizes = _dirichlet_draw(pools, y.size, k, alpha, rng)
        draws += 1
    if sizes.min() < floor:
        _repair_min_size(owner, sizes, floor, rng)
    return owner


def _dirichlet_fixed(y: np.ndarray, k: int, rng: np.random.Generator, alpha: float, spc: int) -> np.ndarray:
    """Exactly ``spc`` samples per client, label mix per client ~ Dir(alpha * C * p).

    Per-client form of the same skew (Hsu et al. 2019), since label-wise splitting cannot hit an
    exact size: p is the global class frequency, and C*p is all ones for balanced classes, which
    makes a client's label mix match the label-wise recipe's at the same alpha. Samples come
    without replacement; when a class runs dry the rest is redrawn from the client's mix over the
    classes left. Clients are served in random order so none is systematically left with scraps.
    """
    pools = _class_pools(y, rng)
    avail = np.array([pool.size for pool in pools], dtype=np.int64)
    taken = np.zeros_like(avail)
    concentration = alpha * avail.size * avail / y.size
    owner = np.full(y.size, -1, dtype=np.int64)
    for client in rng.permutation(k):
        q = rng.dirichlet(concentration)
        need = spc
        while need:
            w = q * (avail > 0)
            w = w / w.sum() if w.sum() > 0 else (avail > 0) / np.count_nonzero(avail)
            got = np.minimum(rng.multinomial(need, w), avail)
            for c in np.flatnonzero(got):
                owner[pools[c][taken[c]: taken[c] + got[c]]] = client
            taken += got
            avail -= got
            need -= int(got.sum())
    return owner


# --------------------------------------------------------------------------------------------- #
# public API


def partition(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    samples_per_client: int | None = None,
    shards_per_client: int = 2,
    min_samples_per_client: int = 10,
) -> list[np.ndarray]:
    """Split sample indices among ``num_clients``; returns one sorted int64 index array per client.

    Parts are always disjoint. With ``samples_per_client=None`` they also cover every sample;
    otherwise each client gets exactly that many, drawn as each method describes (iid and shards
    draw a uniform pool first; dirichlet samples each client's label mix, see ``_dirichlet_fixed``).
    ``alpha`` is used by dirichlet only, ``shards_per_client`` by shards only, and
    ``min_samples_per_client`` by dirichlet without ``samples_per_client`` (the only case that can
    leave a client nearly empty).
    """
    y = _check_labels(labels)
    _check_args(y.size, num_clients, method, seed, alpha, samples_per_client, shards_per_client,
                min_samples_per_client)
    rng = np.random.default_rng(seed)
    if method == "iid":
        owner = _iid(y, num_clients, rng, samples_per_client)
    elif method == "shards":
        owner = _shards(y, num_clients, rng, samples_per_client, shards_per_client)
    elif samples_per_client is None:
        owner = _dirichlet_all(y, num_clients, rng, float(alpha), min_samples_per_client)
    else:
        owner = _dirichlet_fixed(y, num_clients, rng, float(alpha), samples_per_client)
    return _group(owner, num_clients)


# A simulation asks for each of its clients in turn: remember the last few whole partitions.
_RECENT: OrderedDict[tuple[object, ...], list[np.ndarray]] = OrderedDict()
_RECENT_MAX = 4
_RECENT_LOCK = threading.Lock()


def client_partition(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    index: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    samples_per_client: int | None = None,
    shards_per_client: int = 2,
    min_samples_per_client: int = 10,
) -> np.ndarray:
    """One client's indices, identical to ``partition(...)[index]`` with the same arguments.

    A client needs only the shared labels, the run's seed and its own index to find its data.
    The whole partition is computed (clients depend on each other through disjointness) and
    the last few are memoised, so calling this for every client costs about one ``partition``.
    """
    y = _check_labels(labels)
    if not _is_int(num_clients) or not _is_int(index) or not 0 <= index < num_clients:
        raise ValueError(f"index={index!r} must be an integer in [0, num_clients={num_clients!r})")
    key = (
        hashlib.blake2b(y.tobytes(), digest_size=16).digest(), y.size, num_clients, method, seed,
        float(alpha) if isinstance(alpha, (int, float, np.number)) else alpha,
        samples_per_client, shards_per_client, min_samples_per_client,
    )
    with _RECENT_LOCK:
        parts = _RECENT.get(key)
        if parts is not None:
            _RECENT.move_to_end(key)
    if parts is None:
        parts = partition(y, num_clients, method, seed=seed, alpha=alpha, samples_per_client=samples_per_client,
                          shards_per_client=shards_per_client, min_samples_per_client=min_samples_per_client)
        with _RECENT_LOCK:
            _RECENT[key] = parts
            while len(_RECENT) > _RECENT_MAX:
                _RECENT.popitem(last=False)
    mine: np.ndarray = parts[index].copy()
    return mine  # a copy: the caller may modify it without touching the memo


def label_histograms(labels: np.ndarray | Sequence[int], parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[K, C] int64 count of each class in each client's part: for logging and skew measurements."""
    y = _check_labels(labels)
    if not _is_int(num_classes) or num_classes < 1 or int(y.max()) >= num_classes:
        raise ValueError(f"num_classes={num_classes!r} must be an integer > the largest label {int(y.max())}")
    lengths = np.array([len(part) for part in parts], dtype=np.int64)
    if lengths.sum() == 0:
        return np.zeros((len(parts), num_classes), dtype=np.int64)
    idx = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])
    owners = np.repeat(np.arange(len(parts), dtype=np.int64), lengths)
    flat = owners * num_classes + y[idx]
    return np.bincount(flat, minlength=len(parts) * num_classes).reshape(len(parts), num_classes).astype(np.int64)
