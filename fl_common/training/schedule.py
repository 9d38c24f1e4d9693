"""Client learning rate as a function of the round (the server sends it with each round)."""

from __future__ import annotations

import math


def learning_rate_at(round_number: int, base_lr: float, schedule: str, *, decay: float = 0.99,
                     step_size: int = 10, total_rounds: int = 100) -> float:
    """Learning rate for ``round_number`` (1-based).

    Decaying the client step size across rounds is what makes FedAvg converge under non-IID
    data (Li et al. 2020, "On the Convergence of FedAvg on Non-IID Data"), so it is a
    first-class setting rather than something each client improvises.
    """
    r = max(round_number - 1, 0)
    if schedule == "constant":
        return base_lr
    if schedule == "exponential":
        return base_lr * decay**r
    if schedule == "step":
        return base_lr * decay ** (r // step_size)
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(r, total_rounds) / max(total_rounds, 1)))
    raise ValueError(f"unknown lr_schedule {schedule!r}: allowed constant, step, exponential, cosine")
