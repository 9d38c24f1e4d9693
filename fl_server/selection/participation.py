"""Who was selected and who arrived, per round, so that fairness can be seen and staleness computed.

The coordinator records every closed round here; the log is part of its checkpoint (so a resumed
run writes the same ``participation.csv``) and it is where the ``adaptive`` policy's
``last_round`` comes from. Only selected clients get rows: a client absent from a round was not
selected in it.

Fairness numbers (``summary.json`` -> ``participation``) are over *all* clients of the
federation, so a client never selected counts as 0: min / median / max of the participation
counts and Jain's index J = (sum x)^2 / (N * sum x^2), which is 1 when every client took part
equally often and 1/N when one client took every slot.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fl_server.selection.info import ClientId

__all__ = ["PARTICIPATION_COLUMNS", "ParticipationLog", "count_summary", "jain_index"]

PARTICIPATION_COLUMNS = ("round", "client_id", "selected", "arrived", "probability")


def jain_index(counts: Iterable[float]) -> float | None:
    """Jain's fairness index of non-negative counts (None when there is nothing to measure)."""
    x = np.asarray(list(counts), dtype=np.float64)
    if x.size == 0 or not np.any(x > 0):
        return None
    return float(x.sum() ** 2 / (x.size * (x * x).sum()))


def count_summary(counts: Iterable[float]) -> dict[str, float | None]:
    x = np.asarray(list(counts), dtype=np.float64)
    if x.size == 0:
        return {"min": None, "median": None, "max": None, "mean": None}
    return {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max()), "mean": float(x.mean())}


class ParticipationLog:
    def __init__(self) -> None:
        #: (round, client, selected, arrived, inclusion probability or None)
        self.rows: list[tuple[int, ClientId, int, int, float | None]] = []
        self.selected_counts: dict[ClientId, int] = {}
        self.arrived_counts: dict[ClientId, int] = {}
        self.last_round: dict[ClientId, int] = {}

    def record_round(self, round_number: int, selected: Iterable[ClientId], arrived: Iterable[ClientId],
                     probabilities: Mapping[ClientId, float] | None = None) -> None:
        came = set(arrived)
        for cid in selected:
            got = cid in came
            p = None if probabilities is None or cid not in probabilities else float(probabilities[cid])
            self.rows.append((int(round_number), cid, 1, int(got), p))
            self.selected_counts[cid] = self.selected_counts.get(cid, 0) + 1
            if got:
                self.arrived_counts[cid] = self.arrived_counts.get(cid, 0) + 1
                self.last_round[cid] = max(self.last_round.get(cid, 0), int(round_number))

    # ------------------------------------------------------------------ reports
    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(PARTICIPATION_COLUMNS)
        for r, cid, sel, arr, p in self.rows:
            w.writerow([r, cid, sel, arr, "" if p is None else repr(p)])
        return buf.getvalue()

    def summary(self, clients: Iterable[ClientId]) -> dict[str, Any]:
        """Fairness over every client of the federation (never-selected clients count as 0)."""
        everyone = list(dict.fromkeys(list(clients) + list(self.selected_counts)))
        selected = [self.selected_counts.get(c, 0) for c in everyone]
        arrived = [self.arrived_counts.get(c, 0) for c in everyone]
        return {
            "clients": len(everyone),
            "never_selected": int(sum(1 for s in selected if s == 0)),
            "selected": count_summary(selected),
            "arrived": count_summary(arrived),
            "jain_index_selected": jain_index(selected),
            "jain_index_arrived": jain_index(arrived),
        }

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Rebuild from stored rows, replayed one by one; None (a checkpoint written before
        participation was recorded) starts an empty log."""
        self.rows, self.selected_counts, self.arrived_counts, self.last_round = [], {}, {}, {}
        for r, cid, _sel, arr, p in (state or {}).get("rows", []):
            self.record_round(int(r), [cid], [cid] if int(arr) else [], None if p is None else {cid: float(p)})
