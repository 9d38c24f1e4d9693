"""An example selection plug-in: clients drawn with probability proportional to sqrt(records).

Why: ``uniform`` gives a client with 10 records the same chance as one with 10 000, so the
large clients' data is rarely seen; ``weighted`` (proportional to n_k) almost always picks the
same few large clients. The square root sits between the two: a client with 100 times the data
is 10 times as likely to take part.

A policy that subclasses :class:`~fl_server.selection.ProportionalSelector` states only its
weights; the base class turns them into inclusion probabilities pi_k = min(1, c sqrt(n_k)) with
sum pi_k = k, draws exactly k clients with exactly those probabilities (randomised systematic
sampling, seeded by the run seed and the round), and records pi_k in participation_rounds.csv.

Run it::

    python -m fl_server simulate --set selection=custom \\
        --set custom_selection=examples.plugins.sqrt_size_selection:SqrtSizeSelection ...
"""

from __future__ import annotations

import numpy as np

from fl_server.selection import ClientInfo, ProportionalSelector


class SqrtSizeSelection(ProportionalSelector):
    name = "sqrt_size"

    def __init__(self, seed: int) -> None:
        """``seed`` is the config key of the same name, like every constructor parameter."""
        super().__init__(seed)

    def weights(self, round_number: int, pool: list[ClientInfo]) -> np.ndarray:
        missing = [c.client_id for c in pool if c.num_samples is None]
        if missing:
            raise ValueError(f"selection '{self.name}' needs every client's num_samples; client {missing[0]!r} reported none")
        return np.sqrt(np.asarray([float(c.num_samples or 0) for c in pool]))

    def describe(self) -> dict[str, object]:
        return {"policy": self.name, "weight": "sqrt(num_samples)"}
