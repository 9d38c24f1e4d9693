"""When a plain synchronous round's steps happened, on the server clock: what a round's time went to.

A round's wall time is the slowest selected client's training plus protocol overhead (the push, the model
download, the upload, the server's close). To see which part of the overhead sits on the critical path, the
driver notes, for the open attempt: when it opened, when model downloads were served and uploads accepted (count,
first, last), and when each step of the close ended (aggregate applied, evaluated, checkpointed, closed). The
record is stored with the attempt's row when it closes (``rounds.timeline``); benchmarks/fast_rounds.py reads it
next to the daemons' own log lines (training start and end). Times and counts only: no client is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: the close's steps in the order the driver takes them
CLOSE_STEPS = ("aggregated", "evaluated", "checkpointed", "closed")
#: an upload's steps on the server before it is accepted (summed under the lock): request read, opened, written
UPLOAD_STEPS = ("received", "opened", "written")


@dataclass
class EventSpan:
    """How many times an event happened in an attempt and when the first and the last did (s after opening)."""

    count: int = 0
    first: float | None = None
    last: float | None = None

    def add(self, offset: float) -> None:
        self.count += 1
        self.first = offset if self.first is None else min(self.first, offset)
        self.last = offset if self.last is None else max(self.last, offset)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "first": _r(self.first), "last": _r(self.last)}


@dataclass
class RoundTimeline:
    """One attempt's timeline; see the module docstring. ``opened_at`` is the attempt's ``started_at``."""

    opened_at: float
    downloads: EventSpan = field(default_factory=EventSpan)
    uploads: EventSpan = field(default_factory=EventSpan)
    #: close step -> seconds after opening (CLOSE_STEPS)
    steps: dict[str, float] = field(default_factory=dict)
    #: seconds the close spent evaluating the model (0 when no evaluation was due)
    evaluation_s: float = 0.0
    #: the last accepted upload's steps on the server (UPLOAD_STEPS -> seconds after opening)
    last_upload: dict[str, float] = field(default_factory=dict)

    def download_served(self, now: float) -> None:
        self.downloads.add(now - self.opened_at)

    def upload_accepted(self, now: float, steps: dict[str, float] | None = None) -> None:
        """An upload was accepted at ``now``; ``steps``: when its request reached the driver, was opened
        (decrypted, decoded, checked) and written (fsynced) on the server clock (UPLOAD_STEPS)."""
        offset = now - self.opened_at
        if self.uploads.last is None or offset >= self.uploads.last:
            self.last_upload = {k: round(v - self.opened_at, 4) for k, v in (steps or {}).items() if k in UPLOAD_STEPS}
        self.uploads.add(offset)

    def step(self, name: str, now: float) -> None:
        if name not in CLOSE_STEPS:
            raise ValueError(f"unknown close step {name!r} (known: {', '.join(CLOSE_STEPS)})")
        self.steps[name] = now - self.opened_at

    def to_json(self) -> dict[str, Any]:
        return {"opened_at": self.opened_at, "downloads": self.downloads.to_json(), "uploads": self.uploads.to_json(),
                "last_upload": self.last_upload, "evaluation_s": _r(self.evaluation_s),
                **{k: _r(v) for k, v in self.steps.items()}}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


__all__ = ["CLOSE_STEPS", "UPLOAD_STEPS", "EventSpan", "RoundTimeline"]
