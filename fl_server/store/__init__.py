"""Durable state of a run: its output folder (history, summary, checkpoints)."""

from fl_server.store.run_dir import HISTORY_COLUMNS, HistoryRecord, RoundRecord, RunDirectory, accuracy_summary

__all__ = ["HistoryRecord", "RunDirectory", "RoundRecord", "HISTORY_COLUMNS", "accuracy_summary"]
