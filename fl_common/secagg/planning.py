"""Choosing one round's SecAgg parameters: graph degree, threshold, field size and layout.

Kept apart from the state machines so that a server (or a test) states *what* it wants — the
clip, the precision, how many clients, which extra values ride along — and gets parameters
that are both decodable (the field holds the sum of every selected client's largest values)
and safe (the threshold is a strict majority of each client's share holders).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fl_common.secagg.auth import ED25519
from fl_common.secagg.encoding import LOSS_BOUND
from fl_common.secagg.field import MAX_MODULUS_BITS, FieldOverflowError, required_modulus_bits
from fl_common.secagg.graph import choose_graph_params, failure_bound
from fl_common.secagg.messages import SecAggParams, Segment

__all__ = ["choose_degree_and_threshold", "plan_params", "plan_report", "PlanReport", "NOISE_SIGMAS", "CORRUPT_RATE",
           "FAILURE_TARGET"]

#: the fraction of clients assumed to collude with the server when the planner sizes the graph and threshold
CORRUPT_RATE = 0.1
#: the failure probability (a round that aborts, or a client whose input a lying server could rebuild) aimed for
FAILURE_TARGET = 1e-6

#: distributed DP noise is allowed this many standard deviations beyond the clip per coordinate;
#: a value further out (probability 1.5e-23 each) makes the client refuse to encode, never wrap
NOISE_SIGMAS = 10.0


def choose_degree_and_threshold(n: int, *, degree: int | None = None, threshold_fraction: float | None = None,
                                dropout_rate: float = 0.1, corrupt_rate: float = CORRUPT_RATE,
                                failure_prob: float = FAILURE_TARGET) -> tuple[int, int]:
    """(degree k, threshold t) for n clients.

    ``degree`` None: the smallest SecAgg+ degree meeting ``failure_prob`` for the given dropout and
    corruption rates (``graph.choose_graph_params``), the complete graph when none does. Each
    client's secrets have h = k + 1 holders (its neighbours and itself); t is clamped to
    [floor((h+1)/2) + 1, k]: large enough that a server lying about who dropped cannot collect both
    shares of anyone even with one colluding holder (the active-adversary bound 2t > h + c with
    c = 1, see client.py; where that exceeds k, as for n = 3, a strict majority, c = 0) and at most
    k (a dropped client's key must be rebuildable from its neighbours alone).
    ``threshold_fraction`` sets t = ceil(fraction x h) within the same clamp.
    """
    if n < 3:
        raise ValueError("secure aggregation needs at least 3 clients per round")
    graph_t = None
    if degree is None:
        gp = choose_graph_params(n, dropout_rate=dropout_rate, corrupt_rate=corrupt_rate, failure_prob=failure_prob)
        k, graph_t = gp.degree, gp.threshold
    else:
        k = min(int(degree), n - 1)
        if k < 2:
            raise ValueError("the neighbour graph needs degree >= 2")
        if k < n - 1 and k % 2:
            k += 1  # the SecAgg+ ring lattice needs an even degree
            k = min(k, n - 1)
    holders = k + 1
    t_max = k
    t_min = min((holders + 1) // 2 + 1, t_max)  # 2t > h + 1: one colluding holder withstood ...
    t_min = max(t_min, holders // 2 + 1)  # ... and never below a strict majority
    if threshold_fraction is not None:
        t = math.ceil(threshold_fraction * holders - 1e-9)
    else:
        t = graph_t if graph_t is not None else t_min
    return k, max(t_min, min(t_max, t))


def plan_params(*, round_number: int, client_ids: Sequence[str], vector_length: int, clip: float, scale_bits: int,
                l2_clip: bool = True, noise_std: float = 0.0, control_length: int = 0, weighted: bool = False,
                weight_bound: int = 1, with_loss: bool = False, with_unclipped: bool = False,
                degree: int | None = None, threshold_fraction: float | None = None, dropout_rate: float = 0.1,
                auth: str = ED25519, session: bytes | None = None) -> SecAggParams:
    """Parameters for one round.

    ``clip``: the L2 bound of the update (and of SCAFFOLD's variate delta), which is also its per
    coordinate bound. ``l2_clip=False``: the client does not clip (its update was clipped before
    distributed DP noise of std ``noise_std`` was added); the per-coordinate bound is then
    clip + NOISE_SIGMAS x noise_std. The modulus is the smallest that holds the sum of all
    ``len(client_ids)`` selected clients (survivors are fewer, never more).
    """
    n = len(client_ids)
    k, t = choose_degree_and_threshold(n, degree=degree, threshold_fraction=threshold_fraction, dropout_rate=dropout_rate)
    bound = clip + (NOISE_SIGMAS * noise_std if noise_std > 0 else 0.0)
    segments = [Segment("delta", vector_length, bound, scale_bits, clip if l2_clip else None)]
    if control_length:
        segments.append(Segment("control", control_length, clip, scale_bits, clip))
    if weighted or weight_bound > 1:
        segments.append(Segment("weight", 1, float(weight_bound), 0))
    segments.append(Segment("count", 1, 1.0, 0))
    segments.append(Segment("clipped", 1, 1.0, 0))
    if with_unclipped:
        segments.append(Segment("unclipped", 1, 1.0, 0))
    bits = max(required_modulus_bits(s.bound, s.scale_bits, n) for s in segments)
    if with_loss:
        bits = max(bits, required_modulus_bits(LOSS_BOUND, 0, n))
        loss_scale = max(s for s in range(scale_bits + 1) if required_modulus_bits(LOSS_BOUND, s, n) <= bits)
        segments.append(Segment("loss", 1, LOSS_BOUND, loss_scale))
    if bits > MAX_MODULUS_BITS:
        raise FieldOverflowError(f"the sum needs {bits} bits (> {MAX_MODULUS_BITS}); lower the scale bits or the clip")
    return SecAggParams(session=session if session is not None else secrets.token_bytes(24), round=int(round_number),
                        client_ids=tuple(str(c) for c in client_ids), threshold=t, degree=k, modulus_bits=bits,
                        segments=tuple(segments), weight_bound=int(weight_bound), weighted=weighted, auth=auth)


@dataclass(frozen=True)
class PlanReport:
    """What one round's parameters withstand: said in the log, ``/status`` and the run report, since for small
    rounds no threshold meets the target (n = 10 with 10 % dropouts and 10 % colluders: about 0.6 at best)."""

    failure_bound: float
    failure_target: float
    dropout_rate: float
    corrupt_rate: float
    tolerated_corrupt: int

    @property
    def meets_target(self) -> bool:
        return self.failure_bound <= self.failure_target

    def to_json(self) -> dict[str, Any]:
        return {"failure_bound": self.failure_bound, "failure_target": self.failure_target,
                "meets_target": self.meets_target, "design_dropout_rate": self.dropout_rate,
                "design_corrupt_rate": self.corrupt_rate, "tolerated_corrupt": self.tolerated_corrupt}


def plan_report(params: SecAggParams, *, dropout_rate: float, corrupt_rate: float = CORRUPT_RATE,
                failure_target: float = FAILURE_TARGET) -> PlanReport:
    """The union bound of ``graph.failure_bound`` (correctness, active-adversary privacy, connectivity) for the
    parameters actually used, and the colluding holders per client they withstand (2t > h + c)."""
    k = min(params.degree, params.n - 1)
    bound = failure_bound(params.n, k, params.threshold, dropout_rate, corrupt_rate, complete=k >= params.n - 1)
    return PlanReport(bound, failure_target, dropout_rate, corrupt_rate, params.tolerated_corrupt())
