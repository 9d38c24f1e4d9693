"""The selection policies. Each states, for a round, every candidate's inclusion probability and
draws exactly that many clients with exactly those probabilities (see ``sampling``).

==============  ===============================================================================
policy          inclusion probability pi_k of client k among the N candidates, k slots
==============  ===============================================================================
``uniform``     k / N
``weighted``    proportional to n_k (records), capped at 1
``stratified``  k / N, but each stratum g of N_g clients gets k * N_g / N slots (rounded up or
                down at random so that the expectation is exact): fewer unlucky rounds where one
                kind of client is missing
``capability``  proportional to 1 / T_k, T_k = local_epochs * n_k / compute_speed_k
                + 2 * model_bytes / bandwidth_k: clients that finish a round sooner come more often
``adaptive``    the seed's rule p_k = (n_k / sum n) * (1 / staleness_k) * capability_k, with
                capability_k = 1 / T_k as above and staleness_k = round - last_round_k (>= 1):
                the rounds since the client's update was last accepted, plus one - 1 for a
                client that took part last round, the round number for one that never did.
                ``selection_staleness_power`` gamma generalises 1 / staleness to staleness^-gamma.
==============  ===============================================================================

Note the seed's 1 / staleness favours clients that took part *recently* (a rich-get-richer
loop: a client left out early falls further behind every round); the fairness summary
(participation counts, Jain's index) shows it, and gamma < 0 turns it into a preference for
clients that have waited.

Every draw uses a generator seeded from (run seed, round[, draw]) and candidates sorted by id,
so a selection depends only on the seed, the round and the candidates' reports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fl_common.protocol import derive_seed
from fl_server.selection.info import ClientId, ClientInfo
from fl_server.selection.sampling import inclusion_probabilities, systematic_sample
from fl_server.selection.strata import assign_strata

__all__ = [
    "poisson_sample",
    "AdaptiveSelector",
    "CapabilitySelector",
    "ProportionalSelector",
    "Selection",
    "Selector",
    "StratifiedSelector",
    "UniformSelector",
    "WeightedSelector",
    "expected_round_seconds",
]


@dataclass(frozen=True)
class Selection:
    """The clients drawn and every candidate's inclusion probability (for fairness records and
    for unbiased estimators that weight by 1 / pi)."""

    selected: list[ClientId]
    probabilities: dict[ClientId, float]


def _sorted(clients: Sequence[ClientInfo | ClientId]) -> list[ClientInfo]:
    infos = [c if isinstance(c, ClientInfo) else ClientInfo(c) for c in clients]
    ids = [c.client_id for c in infos]
    if len(set(ids)) != len(ids):
        raise ValueError("a client is listed twice among the candidates")
    as_str = any(isinstance(i, str) for i in ids)
    return sorted(infos, key=(lambda c: str(c.client_id)) if as_str else (lambda c: c.client_id))


def poisson_sample(clients: Sequence[ClientId], rate: float, rng: np.random.Generator) -> Selection:
    """Each client independently with probability ``rate`` (Poisson sampling): the draw that
    client-level DP's accountant assumes. The count varies (binomial) and may be 0; callers run the
    round whatever it is. Clients are visited in sorted order so a seeded draw is reproducible."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"a Poisson sampling rate must lie in (0, 1], not {rate!r}")
    pool = [c.client_id for c in _sorted(clients)]
    hits = rng.random(len(pool)) < rate
    return Selection([cid for cid, hit in zip(pool, hits.tolist(), strict=True) if hit], dict.fromkeys(pool, float(rate)))


class Selector(ABC):
    """A selection policy. A plug-in (``selection: custom``) subclasses this, or
    :class:`ProportionalSelector` and states only the weights; its constructor takes ``seed`` and
    keyword parameters named after config keys (and ``model_bytes``), see fl_server/selection/factory.py."""

    name: ClassVar[str]
    #: how :meth:`sample_pool` draws, for the ``selection`` block of summary.json
    scheme: ClassVar[str] = "defined by the policy"

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def rng(self, round_number: int, draw: int | None = None) -> np.random.Generator:
        parts: tuple[int | str, ...] = (self.seed, round_number, "selection") + (() if draw is None else (draw,))
        return np.random.default_rng(derive_seed(*parts))

    def draw(self, round_number: int, clients: Sequence[ClientInfo | ClientId], k: int, *,
             draw: int | None = None) -> Selection:
        """Select ``k`` of ``clients`` for ``round_number``. ``draw`` separates several draws in one
        round (the asynchronous coordinator draws every time a slot frees)."""
        if k <= 0:
            raise ValueError(f"cannot select {k} clients")
        pool = _sorted(clients)
        if not pool:
            raise ValueError("no clients available to select")
        return self.sample_pool(round_number, pool, k, self.rng(round_number, draw))

    def select(self, round_number: int, clients: Sequence[ClientInfo | ClientId], k: int, *,
               draw: int | None = None) -> list[ClientId]:
        return self.draw(round_number, clients, k, draw=draw).selected

    def probabilities(self, round_number: int, clients: Sequence[ClientInfo | ClientId], k: int) -> dict[ClientId, float]:
        """Each candidate's inclusion probability in this round (no randomness used)."""
        pool = _sorted(clients)
        return dict(zip([c.client_id for c in pool], self.pool_probabilities(round_number, pool, k).tolist(), strict=False))

    @abstractmethod
    def sample_pool(self, round_number: int, pool: list[ClientInfo], k: int, rng: np.random.Generator) -> Selection:
        """Draw ``k`` of ``pool`` (non-empty, sorted by id) with ``rng`` (seeded by seed, round and draw),
        with exactly the probabilities :meth:`pool_probabilities` states."""

    @abstractmethod
    def pool_probabilities(self, round_number: int, pool: list[ClientInfo], k: int) -> np.ndarray:
        """Each member of ``pool``'s inclusion probability P(drawn among the k), in pool order."""

    def describe(self) -> dict[str, object]:
        return {"policy": self.name}


class UniformSelector(Selector):
    """k of N uniformly without replacement (numpy's ``choice``, as before this package existed,
    so earlier runs keep selecting exactly the same clients)."""

    name = "uniform"
    scheme = "numpy Generator.choice without replacement"

    def pool_probabilities(self, round_number: int, pool: list[ClientInfo], k: int) -> np.ndarray:
        return np.full(len(pool), min(1.0, k / len(pool)))

    def sample_pool(self, round_number: int, pool: list[ClientInfo], k: int, rng: np.random.Generator) -> Selection:
        probs = dict(zip([c.client_id for c in pool], self.pool_probabilities(round_number, pool, k).tolist(), strict=False))
        if len(pool) <= k:
            return Selection([c.client_id for c in pool], probs)
        chosen = rng.choice(len(pool), size=k, replace=False)
        return Selection([pool[i].client_id for i in sorted(chosen.tolist())], probs)


class ProportionalSelector(Selector):
    """pi_k proportional to a weight (capped at 1), drawn by randomised systematic sampling."""

    scheme = "randomised systematic PPS sampling (pi_k = min(1, c w_k))"

    @abstractmethod
    def weights(self, round_number: int, pool: list[ClientInfo]) -> np.ndarray: ...

    def pool_probabilities(self, round_number: int, pool: list[ClientInfo], k: int) -> np.ndarray:
        w = self.weights(round_number, pool)
        if not np.any(w > 0):
            raise ValueError(f"selection '{self.name}': no available client has a positive weight")
        return inclusion_probabilities(w, k)

    def sample_pool(self, round_number: int, pool: list[ClientInfo], k: int, rng: np.random.Generator) -> Selection:
        pi = self.pool_probabilities(round_number, pool, k)
        idx = systematic_sample(pi, rng)
        return Selection([pool[i].client_id for i in idx.tolist()], dict(zip([c.client_id for c in pool], pi.tolist(), strict=False)))


def _need(pool: list[ClientInfo], attr: str, policy: str) -> np.ndarray:
    missing = [c.client_id for c in pool if getattr(c, attr) is None]
    if missing:
        raise ValueError(f"selection '{policy}' needs every client's {attr}; client {missing[0]!r} reported none")
    return np.asarray([float(getattr(c, attr)) for c in pool], dtype=np.float64)


def expected_round_seconds(pool: list[ClientInfo], local_epochs: int, model_bytes: int, policy: str) -> np.ndarray:
    """T_k: local training time plus model download and upload at the client's reported speeds
    (an unreported bandwidth adds no transfer time)."""
    n = _need(pool, "num_samples", policy)
    speed = _need(pool, "compute_speed", policy)
    transfer = np.asarray([2.0 * model_bytes / c.bandwidth if c.bandwidth else 0.0 for c in pool])
    return local_epochs * n / speed + transfer


class WeightedSelector(ProportionalSelector):
    name = "weighted"

    def weights(self, round_number: int, pool: list[ClientInfo]) -> np.ndarray:
        return _need(pool, "num_samples", self.name)


class CapabilitySelector(ProportionalSelector):
    name = "capability"

    def __init__(self, seed: int, *, local_epochs: int = 1, model_bytes: int = 0) -> None:
        super().__init__(seed)
        self.local_epochs = int(local_epochs)
        self.model_bytes = int(model_bytes)

    def capability(self, pool: list[ClientInfo]) -> np.ndarray:
        t = expected_round_seconds(pool, self.local_epochs, self.model_bytes, self.name)
        return np.where(t > 0, 1.0 / np.where(t > 0, t, 1.0), 0.0)

    def weights(self, round_number: int, pool: list[ClientInfo]) -> np.ndarray:
        return self.capability(pool)

    def describe(self) -> dict[str, object]:
        return {"policy": self.name, "capability": "1 / (local_epochs * n_k / compute_speed_k + 2 * model_bytes / bandwidth_k)",
                "model_bytes": self.model_bytes}


class AdaptiveSelector(CapabilitySelector):
    name = "adaptive"

    def __init__(self, seed: int, *, local_epochs: int = 1, model_bytes: int = 0,
                 selection_staleness_power: float = 1.0) -> None:
        super().__init__(seed, local_epochs=local_epochs, model_bytes=model_bytes)
        self.staleness_power = float(selection_staleness_power)

    def staleness(self, round_number: int, pool: list[ClientInfo]) -> np.ndarray:
        last = np.asarray([c.last_round or 0 for c in pool], dtype=np.float64)
        return np.maximum(1.0, round_number - last)

    def weights(self, round_number: int, pool: list[ClientInfo]) -> np.ndarray:
        n = _need(pool, "num_samples", self.name)
        share = n / n.sum() if n.sum() > 0 else n
        return share * self.staleness(round_number, pool) ** (-self.staleness_power) * self.capability(pool)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "policy": self.name, "staleness_power": self.staleness_power,
                "rule": "p_k = (n_k / sum n) * staleness_k^-power * capability_k, staleness_k = round - last_round_k (>= 1)"}


class StratifiedSelector(Selector):
    name = "stratified"
    scheme = "proportional allocation over strata, randomised rounding by systematic sampling, uniform within"

    def __init__(self, seed: int, *, stratify_by: str = "label", num_strata: int = 4) -> None:
        super().__init__(seed)
        self.stratify_by = stratify_by
        self.num_strata = int(num_strata)

    def strata(self, pool: list[ClientInfo]) -> np.ndarray:
        return assign_strata(pool, self.stratify_by, self.num_strata, self.seed)

    def allocation(self, pool: list[ClientInfo], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(stratum of each client, expected slots of each stratum = k * N_g / N)."""
        groups = self.strata(pool)
        sizes = np.bincount(groups).astype(np.float64)
        return groups, min(k, len(pool)) * sizes / len(pool)

    def pool_probabilities(self, round_number: int, pool: list[ClientInfo], k: int) -> np.ndarray:
        return np.full(len(pool), min(1.0, k / len(pool)))

    def sample_pool(self, round_number: int, pool: list[ClientInfo], k: int, rng: np.random.Generator) -> Selection:
        groups, expected = self.allocation(pool, k)
        base = np.floor(expected + 1e-9)
        frac = np.clip(expected - base, 0.0, 1.0)
        slots = base.astype(np.int64)  # the fractional parts sum to an integer: k minus the floors
        slots[systematic_sample(frac, rng)] += 1
        chosen: list[int] = []
        for g, s in enumerate(slots.tolist()):
            members = np.flatnonzero(groups == g)
            if s:
                chosen.extend(members[rng.choice(len(members), size=s, replace=False)].tolist())
        probs = dict(zip([c.client_id for c in pool], self.pool_probabilities(round_number, pool, k).tolist(), strict=False))
        return Selection([pool[i].client_id for i in sorted(chosen)], probs)

    def describe(self) -> dict[str, object]:
        return {"policy": self.name, "stratify_by": self.stratify_by, "num_strata": self.num_strata}
