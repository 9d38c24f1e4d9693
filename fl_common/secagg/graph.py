"""SecAgg+ communication graph (Bell et al. 2020): who masks with, and holds shares for, whom.

Each client masks only with its k neighbours and Shamir-shares its secrets only among them, so
per-client cost is O(k) = O(log n) instead of O(n). We use a Harary-style circulant graph:
place the clients on a ring in a pseudo-random order derived from a public seed, and connect each
to the k/2 nearest on either side. Every client then has exactly k neighbours (k even), the
relation is symmetric by construction, and the graph is k-connected.

Why a hash-sorted order and not ``numpy.random.permutation``: server and clients must compute
the identical graph on different machines and numpy versions; SHA-256 is stable everywhere.
The seed must not be choosable by the server after it sees the client set (it could grind
seeds to surround a target with colluders): derive it from public round data fixed in advance,
e.g. SHA-256(round id || sorted public keys of the selected clients).

``choose_graph_params`` picks the smallest even k (and the per-neighbourhood Shamir threshold
t, with t > k/2) for which a union bound on failure stays below ``failure_prob``, assuming each
client independently drops with probability ``dropout_rate`` and is corrupted (colludes with
the server) with probability ``corrupt_rate``:

* correctness: some client has fewer than t surviving neighbours: n * P[Bin(k, 1-dropout) < t]
* privacy (shares), against a server that lies about who dropped (the active adversary of
  Bonawitz et al. 2017): each client's secrets have h = k + 1 holders; the server gets both of
  some client's secrets only if c >= 2t - h of its neighbours collude (client.py derives the
  bound 2t > h + c):                                               n * P[Bin(k, corrupt) >= 2t - k - 1]
  (this dominates the honest-but-curious term n * P[Bin(k, corrupt) >= t], since 2t - k - 1 < t)
* privacy (connectivity): the honest survivors split apart, which in a ring lattice needs k/2
  consecutive bad (dropped or corrupted) clients somewhere: n * (dropout + corrupt)^(k/2)

If no k < n-1 meets the target, the complete graph is used (classic SecAgg) and the achieved
bound is reported in ``GraphParams.failure_bound`` (check ``meets_target``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["GraphParams", "choose_graph_params", "build_graph", "failure_bound"]

_DOMAIN = b"fl-hub/v1/secagg/graph-order|"


@dataclass(frozen=True)
class GraphParams:
    num_clients: int
    degree: int
    threshold: int
    complete: bool
    failure_bound: float
    failure_prob: float

    @property
    def meets_target(self) -> bool:
        return self.failure_bound <= self.failure_prob


_MAX_SPARSE_DEGREE = 1024  # beyond this a sparse graph saves little; fall back to complete


def _binom_pmf(k: int, p: float) -> list[float]:
    """P[Bin(k, p) = i] for i = 0..k, computed in log space so large k cannot overflow."""
    if p <= 0.0:
        return [1.0] + [0.0] * k
    if p >= 1.0:
        return [0.0] * k + [1.0]
    lp, lq, lk = math.log(p), math.log1p(-p), math.lgamma(k + 1)
    return [math.exp(lk - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * lp + (k - i) * lq) for i in range(k + 1)]


def _bounds_by_threshold(n: int, k: int, dropout_rate: float, corrupt_rate: float, complete: bool) -> list[float]:
    """failure bound for every threshold t = 0..k (index t), in O(k)."""
    survive, corrupt = _binom_pmf(k, 1.0 - dropout_rate), _binom_pmf(k, corrupt_rate)
    below = [0.0] * (k + 2)  # below[t] = P[survivors < t]
    for i in range(k + 1):
        below[i + 1] = below[i] + survive[i]
    at_least = [0.0] * (k + 2)  # at_least[c] = P[corrupted >= c], summed from the tail for precision
    for i in range(k, -1, -1):
        at_least[i] = at_least[i + 1] + corrupt[i]
    connectivity = 0.0 if complete else n * (dropout_rate + corrupt_rate) ** (k // 2)
    # active adversary: c >= 2t - (k + 1) colluding neighbours of a client can collect both of its secrets
    return [min(1.0, n * below[t] + n * at_least[min(k + 1, max(0, 2 * t - k - 1))] + connectivity) for t in range(k + 1)]


def failure_bound(n: int, k: int, t: int, dropout_rate: float, corrupt_rate: float, complete: bool = False) -> float:
    """Union bound on P[any failure] for degree k, threshold t (see the module docstring)."""
    if not 0 <= t <= k:
        raise ValueError("threshold must be in [0, degree]")
    return _bounds_by_threshold(n, k, dropout_rate, corrupt_rate, complete)[t]


def _best_threshold(n: int, k: int, dropout_rate: float, corrupt_rate: float, complete: bool) -> tuple[int, float]:
    """The t > k/2 with the smallest bound (t > k/2 so that honest neighbours' answers can never
    hand a malicious server t shares of both a client's self seed and its mask key; each colluding
    neighbour costs one more, see the privacy term above)."""
    bounds = _bounds_by_threshold(n, k, dropout_rate, corrupt_rate, complete)
    t = min(range(k // 2 + 1, k + 1), key=lambda i: (bounds[i], i))
    return t, bounds[t]


def choose_graph_params(
    num_clients: int,
    *,
    dropout_rate: float = 0.1,
    corrupt_rate: float = 0.1,
    failure_prob: float = 1e-6,
) -> GraphParams:
    """Smallest even degree (and its best threshold) meeting ``failure_prob``; else the complete graph."""
    if num_clients < 3:
        raise ValueError("secure aggregation needs at least 3 clients")
    if not (0.0 <= dropout_rate < 1.0 and 0.0 <= corrupt_rate < 1.0 and dropout_rate + corrupt_rate < 1.0):
        raise ValueError("rates must be in [0, 1) and sum to less than 1")
    if not 0.0 < failure_prob < 1.0:
        raise ValueError("failure_prob must be in (0, 1)")
    n = num_clients
    for k in range(2, min(n - 1, _MAX_SPARSE_DEGREE + 1), 2):
        t, bound = _best_threshold(n, k, dropout_rate, corrupt_rate, complete=False)
        if bound <= failure_prob:
            return GraphParams(n, k, t, False, bound, failure_prob)
    t, bound = _best_threshold(n, n - 1, dropout_rate, corrupt_rate, complete=True)
    return GraphParams(n, n - 1, t, True, bound, failure_prob)


def build_graph(client_ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Neighbour sets ``{id: frozenset(neighbour ids)}``, identical for everyone given the same inputs.

    ``degree >= n-1`` gives the complete graph. Otherwise ``degree`` must be even and every
    client gets exactly ``degree`` neighbours.
    """
    ids = list(client_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("client ids must be distinct")
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 16:
        raise ValueError("seed must be at least 16 bytes")
    if degree < 1:
        raise ValueError("degree must be >= 1")
    if degree >= n - 1:
        everyone = frozenset(ids)
        return {i: everyone - {i} for i in ids}
    if degree % 2:
        raise ValueError("degree must be even (or >= n-1 for the complete graph)")

    def position_key(client_id: int) -> bytes:
        return hashlib.sha256(_DOMAIN + bytes(seed) + int(client_id).to_bytes(8, "big")).digest()

    ring = sorted(ids, key=position_key)
    half = degree // 2
    return {
        ring[p]: frozenset(ring[(p + d) % n] for d in range(-half, half + 1) if d != 0)
        for p in range(n)
    }
