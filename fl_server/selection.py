"""Client selection policies.

Selection draws from a generator seeded by (run seed, round), not from a stateful one, so a
resumed run selects exactly the clients the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fl_common.protocol import derive_seed


class UniformSelector:
    name = "uniform"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def select(self, round_number: int, available: Sequence[int | str], k: int) -> list[int | str]:
        if k <= 0:
            raise ValueError(f"cannot select {k} clients")
        pool = sorted(available, key=str) if any(isinstance(a, str) for a in available) else sorted(available)
        if len(pool) <= k:
            return list(pool)
        rng = np.random.default_rng(derive_seed(self.seed, round_number, "selection"))
        chosen = rng.choice(len(pool), size=k, replace=False)
        return [pool[i] for i in sorted(chosen.tolist())]


def make_selector(name: str, seed: int) -> UniformSelector:
    if name == "uniform":
        return UniformSelector(seed)
    raise ValueError(f"unknown selection policy {name!r}: allowed uniform")
