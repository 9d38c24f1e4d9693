"""Simulated model-poisoning attacks, for measuring the robust aggregators (simulation only).

``attack: gaussian_noise`` makes a fixed subset of round(``attack_fraction`` x ``num_clients``)
clients, drawn once from the run seed, replace their model delta by N(0, ``attack_noise_std``^2)
noise whenever they are selected (the Gaussian attack of Blanchard et al. 2017 and Yin et al.
2018). They still report their honest sample count and metrics, and a SCAFFOLD
attacker's control-variate delta is left honest: the attack is on the model update only.

Attackers and their noise are derived from (seed, round, client), so a resumed run is attacked
exactly as the uninterrupted one. The REST server refuses ``attack`` (the coordinator only runs it
for a driver that declares the "attacks" feature): a deployment must never fake its own clients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from fl_common.config import FLConfig
from fl_common.protocol import ClientUpdate, derive_seed


def attacker_ids(cfg: FLConfig) -> frozenset[int]:
    """The clients that attack, fixed for the whole run by the seed."""
    if cfg.attack == "none":
        return frozenset()
    k = round(cfg.attack_fraction * cfg.num_clients)
    rng = np.random.default_rng(derive_seed(cfg.seed, "attackers"))
    return frozenset(int(i) for i in rng.choice(cfg.num_clients, size=k, replace=False))


class GaussianNoiseAttack:
    """Replaces an attacker's delta by seeded Gaussian noise of the same shape."""

    def __init__(self, cfg: FLConfig) -> None:
        self.seed = cfg.seed
        self.std = cfg.attack_noise_std
        self.attackers = attacker_ids(cfg)

    def apply(self, update: ClientUpdate) -> bool:
        """Poison ``update`` in place if its client is an attacker; True when it did."""
        if update.client_id not in self.attackers:
            return False
        gen = torch.Generator().manual_seed(derive_seed(self.seed, update.round, update.client_id, "attack"))
        update.delta = torch.randn(update.delta.shape, generator=gen, dtype=torch.float32) * self.std
        return True


def attack_summary(cfg: FLConfig, arrived_by_round: Iterable[tuple[int, int]]) -> dict[str, Any]:
    """summary.json's ``attack`` block: who attacked and how many attackers each round held.

    A robust rule is sized for the worst round, not the average share (Multi-Krum with f = 3 at 20 %
    attackers collapsed in the first round that drew 4), so the distribution over rounds is what a
    reader needs to judge a result. ``arrived_by_round`` is the (round, client) pairs whose update
    reached the aggregator (the participation log), so a resumed run counts the same as an uninterrupted one.
    """
    attackers = attacker_ids(cfg)
    per_round: Counter[int] = Counter()
    rounds: set[int] = set()
    for round_number, client in arrived_by_round:
        rounds.add(round_number)
        if client in attackers:
            per_round[round_number] += 1
    histogram = Counter(per_round.get(r, 0) for r in rounds)
    return {"kind": cfg.attack, "fraction": cfg.attack_fraction, "noise_std": cfg.attack_noise_std,
            "attackers": sorted(attackers),
            "rounds_by_attackers": {str(k): histogram[k] for k in sorted(histogram)},
            "max_attackers_in_a_round": max(histogram) if histogram else 0,
            "first_round_with_max": min((r for r in rounds if per_round.get(r, 0) == max(histogram)), default=None)}


def make_attack(cfg: FLConfig) -> GaussianNoiseAttack | None:
    if cfg.attack == "none":
        return None
    if cfg.attack == "gaussian_noise":
        return GaussianNoiseAttack(cfg)
    raise ValueError(f"unknown attack {cfg.attack!r}: allowed none, gaussian_noise")
