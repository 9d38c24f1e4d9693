"""Staleness functions: how much an update trained on an old model still counts.

Xie, Koyejo & Gupta 2019, "Asynchronous Federated Optimization" (FedAsync), section 5.2, with
staleness t - tau (server updates since the model the client trained on was current):

* constant:   s(t - tau) = 1
* polynomial: s_a(t - tau) = (t - tau + 1)^(-a)
* hinge:      s_{a,b}(t - tau) = 1 if t - tau <= b, else 1 / (a (t - tau - b) + 1)

All three equal 1 for a fresh update (staleness 0) and never increase with staleness. FedBuff
(Nguyen et al. 2022) scales each buffered delta by 1 / sqrt(1 + staleness), which is the
polynomial function with a = 0.5, the default here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["STALENESS_FUNCTIONS", "StalenessFunction", "staleness_weight"]

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")


def staleness_weight(kind: str, staleness: int, a: float = 0.5, b: float = 4.0) -> float:
    """s(staleness) for one of :data:`STALENESS_FUNCTIONS`."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1.0) ** (-a))
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}: allowed {', '.join(STALENESS_FUNCTIONS)}")


@dataclass(frozen=True)
class StalenessFunction:
    kind: str = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        staleness_weight(self.kind, 0, self.a, self.b)  # refuses an unknown kind now, not at the first update

    def __call__(self, staleness: int) -> float:
        return staleness_weight(self.kind, staleness, self.a, self.b)

    def describe(self) -> str:
        return {"constant": "s = 1", "polynomial": f"s = (staleness + 1)^-{self.a:g}",
                "hinge": f"s = 1 if staleness <= {self.b:g} else 1 / ({self.a:g} (staleness - {self.b:g}) + 1)"}[self.kind]
