"""SecAgg+ neighbour graph: symmetry, exact degree, determinism, parameter choice."""

from __future__ import annotations

import random
from collections import deque

import pytest

from fl_common.secagg import build_graph, choose_graph_params, failure_bound

SEED = b"public-round-seed-0001"


def _connected(graph: dict[int, frozenset[int]], removed: set[int]) -> bool:
    nodes = [u for u in graph if u not in removed]
    seen, queue = {nodes[0]}, deque([nodes[0]])
    while queue:
        for v in graph[queue.popleft()]:
            if v not in removed and v not in seen:
                seen.add(v)
                queue.append(v)
    return len(seen) == len(nodes)


@pytest.mark.parametrize("n, k", [(10, 4), (50, 8), (1000, 38), (101, 2)])
def test_symmetric_exact_degree_no_self_loops(n: int, k: int) -> None:
    g = build_graph(range(1, n + 1), k, SEED)
    assert set(g) == set(range(1, n + 1))
    for u, nbrs in g.items():
        assert len(nbrs) == k and u not in nbrs
        assert all(u in g[v] for v in nbrs)


def test_deterministic_from_seed_and_order_independent() -> None:
    ids = list(range(1, 201))
    g = build_graph(ids, 10, SEED)
    assert g == build_graph(list(reversed(ids)), 10, SEED)
    assert g != build_graph(ids, 10, b"another-public-seed-0002")


def test_complete_graph_when_degree_covers_everyone() -> None:
    g = build_graph([3, 5, 9, 11], 6, SEED)
    assert all(g[u] == {3, 5, 9, 11} - {u} for u in g)
    with pytest.raises(ValueError):
        build_graph(range(1, 20), 5, SEED)  # odd sparse degree
    with pytest.raises(ValueError):
        build_graph([1, 1, 2], 2, SEED)


def test_chosen_params_meet_stated_failure_probability() -> None:
    small = choose_graph_params(10)
    assert small.complete and small.degree == 9
    prev = 0
    for n in (100, 1000, 10_000, 100_000):
        p = choose_graph_params(n, dropout_rate=0.1, corrupt_rate=0.1, failure_prob=1e-6)
        assert not p.complete and p.meets_target and p.degree % 2 == 0
        assert p.threshold > p.degree / 2
        assert failure_bound(n, p.degree, p.threshold, 0.1, 0.1) == pytest.approx(p.failure_bound)
        # minimal: the next smaller even degree misses the target for every threshold
        k = p.degree - 2
        assert all(failure_bound(n, k, t, 0.1, 0.1) > 1e-6 for t in range(k // 2 + 1, k + 1))
        # grows like log n; against a lying server with 10 % colluders the constant is about 2.5x the
        # honest-but-curious one (2t > k + 1 + c, not t > c): 84 at n = 100, 106 at n = 10^4
        assert p.degree >= prev and p.degree <= 130
        prev = p.degree


def test_sparse_graph_survives_random_removals() -> None:
    n = 1000
    p = choose_graph_params(n)
    g = build_graph(range(1, n + 1), p.degree, SEED)
    rnd = random.Random(0)
    for _ in range(5):
        removed = set(rnd.sample(range(1, n + 1), n // 5))  # 20% dropped or corrupted
        assert _connected(g, removed)
        assert all(len(g[u] - removed) >= p.threshold for u in g if u not in removed)


def test_the_graph_seed_is_bound_to_every_advertised_key_and_the_round() -> None:
    """The server must not choose the neighbour graph after it has seen who advertised (it could grind seeds until a
    target is surrounded by colluders): the seed is a hash of the round's parameters and of every advertised key, so
    changing any one key, or the round, changes the graph that the clients (and the server) compute."""
    import hashlib

    from fl_common.secagg.messages import RosterEntry, RosterMessage

    n, k = 24, 6

    def key(i: int, kind: str) -> bytes:
        return hashlib.sha256(f"{kind}{i}".encode()).digest()

    entries = tuple(RosterEntry(i, key(i, "c"), key(i, "s"), b"sig", b"") for i in range(1, n + 1))
    roster = RosterMessage(entries)
    digest = hashlib.sha256(b"round 1 parameters").digest()
    seed = roster.graph_seed(digest)
    graph = build_graph(range(1, n + 1), k, seed)
    assert roster.graph_seed(digest) == seed  # deterministic: every client recomputes it
    assert roster.graph_seed(hashlib.sha256(b"round 2 parameters").digest()) != seed
    for i, kind in ((1, "c"), (n, "s"), (n // 2, "c")):
        changed = tuple(RosterEntry(e.index, key(i, "x") if (e.index == i and kind == "c") else e.c_pk,
                                    key(i, "y") if (e.index == i and kind == "s") else e.s_pk, e.signature, e.verify_key)
                        for e in entries)
        other = RosterMessage(changed).graph_seed(digest)
        assert other != seed
        assert build_graph(range(1, n + 1), k, other) != graph  # 24!/... ring orders: equal by chance ~ never
    # what is not a key does not move the graph: the signatures and verifying keys are bound by the roster digest
    resigned = RosterMessage(tuple(RosterEntry(e.index, e.c_pk, e.s_pk, b"other", b"") for e in entries))
    assert resigned.graph_seed(digest) == seed
