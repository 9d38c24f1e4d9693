"""A run's output folder.

Layout::

    DIR/config.yaml            the fully resolved configuration
    DIR/history.csv            one row per round (see HISTORY_COLUMNS)
    DIR/summary.json           resolved config, final/best accuracy, wall time
    DIR/checkpoint.pt          everything needed to resume (written atomically every round)
    DIR/model.pt               the final global model's state_dict
    DIR/label_histograms.csv   per-client label counts (clients x classes)

Every file is replaced atomically (write to a temporary file, fsync, rename), so a run killed at
any moment leaves the previous complete version, never a torn one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

#: ``epsilon`` is the privacy spent after the round (the run's, i.e. the maximum over clients for
#: sample-level DP), from the coordinator's privacy ledger; empty when differential privacy is off.
HISTORY_COLUMNS = ("round", "test_accuracy", "test_loss", "train_loss", "clients", "seconds", "bytes", "epsilon")
CHECKPOINT_FORMAT = 1


class HistoryRecord(Protocol):
    """One row of a run's history: a synchronous round (:class:`RoundRecord`) or an asynchronous
    server update (``fl_server.asynchronous.AsyncRecord``). What reports, metrics and /status read."""

    round: int
    test_accuracy: float | None
    test_loss: float | None
    clients: int
    seconds: float
    bytes: int

    def to_row(self) -> dict[str, Any]: ...


@dataclass
class RoundRecord:
    round: int
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float | None
    clients: int
    seconds: float
    bytes: int
    epsilon: float | None = None

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        return {k: ("" if v is None else v) for k, v in row.items()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RoundRecord:
        def opt(v: Any) -> float | None:
            return None if v in ("", None) else float(v)

        return cls(int(row["round"]), opt(row["test_accuracy"]), opt(row["test_loss"]), opt(row["train_loss"]),
                   int(row["clients"]), float(row["seconds"]), int(row["bytes"]), opt(row.get("epsilon")))


def accuracy_summary(records: Sequence[HistoryRecord]) -> dict[str, Any]:
    """Final and best test accuracy of a history (rounds without an evaluation are skipped)."""
    evaluated = [r for r in records if r.test_accuracy is not None]
    best = max(evaluated, key=lambda r: r.test_accuracy or 0.0) if evaluated else None
    return {
        "final_accuracy": evaluated[-1].test_accuracy if evaluated else None,
        "final_loss": evaluated[-1].test_loss if evaluated else None,
        "best_accuracy": best.test_accuracy if best else None,
        "best_round": best.round if best else None,
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RunDirectory:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # paths
    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # writers
    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.path / name, text.encode("utf-8"))

    def write_history(self, records: list[RoundRecord]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(HISTORY_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow(r.to_row())
        self.write_text("history.csv", buf.getvalue())

    def read_history(self) -> list[RoundRecord]:
        with open(self.path / "history.csv", newline="", encoding="utf-8") as f:
            return [RoundRecord.from_row(row) for row in csv.DictReader(f)]

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")

    def write_label_histograms(self, histograms: np.ndarray) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["client"] + [f"class_{c}" for c in range(histograms.shape[1])] + ["total"])
        for k, row in enumerate(histograms.tolist()):
            w.writerow([k, *row, sum(row)])
        self.write_text("label_histograms.csv", buf.getvalue())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any]:
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint_path} has checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        return state

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        atomic_write_bytes(self.path / "model.pt", buf.getvalue())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = ["HistoryRecord", "RunDirectory", "RoundRecord", "HISTORY_COLUMNS", "accuracy_summary", "atomic_write_bytes"]
