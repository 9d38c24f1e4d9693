"""What an asynchronous run records: one history row per server update, one row per client job.

``history.csv`` keeps the synchronous columns (so reports and plots read it unchanged; ``round``
is the server model version, i.e. the number of server updates so far) and adds:

* ``time``: the driver's clock when the update happened (virtual seconds in the simulation),
* ``staleness_mean``, ``staleness_max``: over the client updates folded into this server update.

``updates.csv`` has one row per job handed to a client: when it was dispatched and finished (driver
clock), the model version it trained on, its staleness on arrival, the weight s(staleness) it got
(FedAsync: alpha x s), what became of it (``accepted``, ``refused`` as too stale, ``cancelled``,
or ``training`` when the run ended first) and the server version that included it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields
from typing import Any

from fl_server.store import HISTORY_COLUMNS

__all__ = ["ASYNC_HISTORY_COLUMNS", "JOB_COLUMNS", "AsyncRecord", "JobRecord", "rows_to_csv"]

ASYNC_HISTORY_COLUMNS = (*tuple(HISTORY_COLUMNS), "time", "staleness_mean", "staleness_max")


def _opt_float(v: Any) -> float | None:
    return None if v in ("", None) else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v in ("", None) else int(v)


@dataclass
class AsyncRecord:
    round: int  # server model version after this update
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float | None
    clients: int  # client updates folded into this server update (FedAsync 1, FedBuff K)
    seconds: float  # wall seconds since the previous server update
    bytes: int
    epsilon: float | None = None
    time: float = 0.0
    staleness_mean: float = 0.0
    staleness_max: int = 0

    def to_row(self) -> dict[str, Any]:
        return {k: ("" if v is None else v) for k, v in asdict(self).items()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AsyncRecord:
        return cls(int(row["round"]), _opt_float(row["test_accuracy"]), _opt_float(row["test_loss"]),
                   _opt_float(row["train_loss"]), int(row["clients"]), float(row["seconds"]), int(row["bytes"]),
                   _opt_float(row.get("epsilon")), float(row.get("time") or 0.0), float(row.get("staleness_mean") or 0.0),
                   int(row.get("staleness_max") or 0))


@dataclass
class JobRecord:
    job: int
    client_id: int | str
    version: int  # the model version the client trains on
    dispatched_at: float
    probability: float | None = None  # the client's inclusion probability in the draw that picked it
    finished_at: float | None = None
    staleness: int | None = None
    weight: float | None = None
    status: str = "training"
    applied_in: int | None = None  # the server version whose update included this job

    def to_row(self) -> dict[str, Any]:
        return {k: ("" if v is None else v) for k, v in asdict(self).items()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JobRecord:
        return cls(int(row["job"]), row["client_id"], int(row["version"]), float(row["dispatched_at"]),
                   _opt_float(row.get("probability")), _opt_float(row.get("finished_at")), _opt_int(row.get("staleness")),
                   _opt_float(row.get("weight")), str(row.get("status") or "training"), _opt_int(row.get("applied_in")))


JOB_COLUMNS = tuple(f.name for f in fields(JobRecord))


def rows_to_csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue()
