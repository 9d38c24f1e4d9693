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

from fl_common.secagg.auth import ED25519
from fl_common.secagg.encoding import LOSS_BOUND
from fl_common.secagg.field import MAX_MODULUS_BITS, FieldOverflowError, required_modulus_bits
from fl_common.secagg.graph import choose_graph_params
from fl_common.secagg.messages import SecAggParams, Segment

__all__ = ["choose_degree_and_threshold", "plan_params", "NOISE_SIGMAS"]

#: distributed DP noise is allowed this many standard deviations beyond the clip per coordinate;
#: a value further out (probability 1.5e-23 each) makes the client refuse to encode, never wrap
NOISE_SIGMAS = 10.0


def choose_degree_and_threshold(n: int, *, degree: int | None = None, threshold_fraction: float | None = None,
                                dropout_rate: float = 0.1, corrupt_rate: float = 0.1,
                                failure_prob: float = 1e-6) -> tuple[int, int]:
    """(degree k, threshold t) for n clients.

    ``degree`` None: the smallest SecAgg+ degree meeting ``failure_prob`` for the given dropout and
    corruption rates (``graph.choose_graph_params``), the complete graph when none does. Each
    client's secrets have k + 1 holders (its neighbours and itself); t is clamped to
    [floor((k+1)/2) + 1, k]: a strict majority (a server lying about who dropped cannot collect
    both shares of anyone from honest holders) and at most k (a dropped client's key must be
    rebuildable from its neighbours alone). ``threshold_fraction`` sets t = ceil(fraction x (k+1)).
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
    t_min, t_max = holders // 2 + 1, k
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
