"""Durable state of a run: its output folder (history, summary, checkpoints)."""

from fl_server.store.run_dir import RunDirectory, RoundRecord, HISTORY_COLUMNS

__all__ = ["RunDirectory", "RoundRecord", "HISTORY_COLUMNS"]
