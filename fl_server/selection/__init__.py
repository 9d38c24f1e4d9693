"""Client selection: which clients take part in a round (or, asynchronously, get the next slot).

Transport free: a driver describes its candidates as :class:`ClientInfo` (records, label
histogram, reported speeds, last participation) and the coordinator asks the configured policy
(config key ``selection``) to draw. Draws are seeded by (run seed, round), not by a stateful
generator, so a resumed run selects exactly the clients the uninterrupted run would have.
See ``policies`` for each policy's inclusion probabilities and ``sampling`` for how k distinct
clients are drawn with exactly those probabilities.
"""

from __future__ import annotations

from typing import Any

from fl_server.selection.info import (
    ClientId,
    ClientInfo,
    client_infos_for,
    private_label_histogram,
)
from fl_server.selection.participation import (
    ParticipationLog,
    count_summary,
    jain_index,
)
from fl_server.selection.policies import (
    AdaptiveSelector,
    CapabilitySelector,
    Selection,
    Selector,
    StratifiedSelector,
    UniformSelector,
    WeightedSelector,
    expected_round_seconds,
)
from fl_server.selection.sampling import inclusion_probabilities, systematic_sample
from fl_server.selection.strata import STRATIFY_BY

SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (UniformSelector, WeightedSelector, StratifiedSelector,
                                                                   CapabilitySelector, AdaptiveSelector)}


def make_selector(cfg: Any, seed: int | None = None, *, model_bytes: int = 0) -> Selector:
    """The policy named by ``cfg.selection`` (an FLConfig), or by name with ``seed`` given.

    ``model_bytes`` (the model's size on the wire) enters the capability policies' transfer time.
    """
    if isinstance(cfg, str):
        name, opts = cfg, None
        if seed is None:
            raise ValueError("make_selector(name, seed): the seed is required")
    else:
        name, opts, seed = cfg.selection, cfg, cfg.seed if seed is None else seed
    if name not in SELECTORS:
        raise ValueError(f"unknown selection policy {name!r}: allowed {', '.join(SELECTORS)}")
    if name == "stratified" and opts is not None:
        return StratifiedSelector(seed, stratify_by=opts.stratify_by, num_strata=opts.num_strata)
    if name == "capability" and opts is not None:
        return CapabilitySelector(seed, local_epochs=opts.local_epochs, model_bytes=model_bytes)
    if name == "adaptive" and opts is not None:
        return AdaptiveSelector(seed, local_epochs=opts.local_epochs, model_bytes=model_bytes,
                                staleness_power=opts.selection_staleness_power)
    return SELECTORS[name](seed)


def selection_summary(cfg: Any, selector: Selector) -> dict[str, Any]:
    """The ``selection`` block of summary.json: the policy, how it draws, what clients disclosed."""
    out: dict[str, Any] = dict(selector.describe())
    out["probability"] = "inclusion probability: P(client is among the k drawn in a round), recorded in participation.csv"
    out["scheme"] = ("numpy Generator.choice without replacement" if selector.name == "uniform" else
                     "proportional allocation over strata, randomised rounding by systematic sampling, uniform within"
                     if selector.name == "stratified" else "randomised systematic PPS sampling (pi_k = min(1, c w_k))")
    if getattr(cfg, "label_histogram_epsilon", None) is not None:
        out["label_histograms"] = (f"Laplace noise, pure epsilon-DP with epsilon={cfg.label_histogram_epsilon:g} per client "
                                   f"(L1 sensitivity 1, add/remove one record), released once; not included in the privacy "
                                   f"block's epsilon, so by basic composition a client's total is that epsilon plus this one")
    return out


__all__ = [
    "SELECTORS",
    "STRATIFY_BY",
    "AdaptiveSelector",
    "CapabilitySelector",
    "ClientId",
    "ClientInfo",
    "ParticipationLog",
    "Selection",
    "Selector",
    "StratifiedSelector",
    "UniformSelector",
    "WeightedSelector",
    "client_infos_for",
    "count_summary",
    "expected_round_seconds",
    "inclusion_probabilities",
    "jain_index",
    "make_selector",
    "private_label_histogram",
    "selection_summary",
    "systematic_sample",
]
