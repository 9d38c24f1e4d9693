"""Client selection: which clients take part in a round (or, asynchronously, get the next slot).

Transport free: a driver describes its candidates as :class:`ClientInfo` (records, label
histogram, reported speeds, last participation) and the coordinator asks the configured policy
(config key ``selection``; ``custom`` loads a plug-in, see ``factory``) to draw. Draws are
seeded by (run seed, round), not by a stateful generator, so a resumed run selects exactly the
clients the uninterrupted run would have.
See ``policies`` for each policy's inclusion probabilities and ``sampling`` for how k distinct
clients are drawn with exactly those probabilities.
"""

from __future__ import annotations

from typing import Any

from fl_server.selection.factory import SELECTORS, build_selection, selection_class
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
    ProportionalSelector,
    Selection,
    Selector,
    StratifiedSelector,
    UniformSelector,
    WeightedSelector,
    expected_round_seconds,
    poisson_sample,
)
from fl_server.selection.sampling import inclusion_probabilities, systematic_sample
from fl_server.selection.strata import STRATIFY_BY


def selection_summary(cfg: Any, selector: Selector) -> dict[str, Any]:
    """The ``selection`` block of summary.json: the policy, how it draws, what clients disclosed."""
    out: dict[str, Any] = dict(selector.describe())
    out["probability"] = "inclusion probability: P(client is among the k drawn in a round), recorded in participation.csv"
    out["scheme"] = selector.scheme
    if getattr(cfg, "label_histogram_epsilon", None) is not None:
        out["label_histograms"] = (f"Laplace noise, pure epsilon-DP with epsilon={cfg.label_histogram_epsilon:g} per client "
                                   f"(L1 sensitivity 1, add/remove one record), released once; not included in the privacy "
                                   f"block's epsilon, so by basic composition a client's total is that epsilon plus this one")
    return out


__all__ = [
    "poisson_sample",
    "SELECTORS",
    "STRATIFY_BY",
    "AdaptiveSelector",
    "CapabilitySelector",
    "ClientId",
    "ClientInfo",
    "ParticipationLog",
    "ProportionalSelector",
    "Selection",
    "Selector",
    "StratifiedSelector",
    "UniformSelector",
    "WeightedSelector",
    "build_selection",
    "client_infos_for",
    "count_summary",
    "expected_round_seconds",
    "inclusion_probabilities",
    "jain_index",
    "private_label_histogram",
    "selection_class",
    "selection_summary",
    "systematic_sample",
]
