"""Erasing one client's stored data: the admin's ``DELETE /api/v1/clients/<id>`` (``admin clients remove ID``).

What is erased (fl_server/compliance.py ``ERASURE_SCOPE`` says it in the record's words):

* its rows in the SQLite store: registration (name, partition, capability, profile, verifying key), the
  session-token hash and wrapped keys, accepted-update metadata, participation, replay nonces, jobs and
  its own audit events; rows it shares with other clients (a round's selection, instructions, inclusion
  probabilities, secure-aggregation roster) keep their shape with the id replaced by a random placeholder;
* its update payload files (and any stray file under ``updates/`` named after it);
* every exact mention of its id or name in the run folder: CSV cells, JSON values, the checkpoint,
  and the coordinator's in-memory participation log (else the next checkpoint would write it back);
  the report and compliance record are written again when the run has finished. A client erased
  while a round it sent an update to is open is swept again after that round closes
  (:class:`ErasureSweeper`), since the round still counts it.

What is not, and cannot be: its contribution to every global model aggregated before the erasure.

The request itself is recorded in the audit log as a ``client_erased`` event carrying a random
receipt (``er-`` + 12 hex digits) and the counts, but neither the id nor the name: the receipt is
handed back to the admin (for the data subject) and links to nothing else that is stored. After
erasing, the whole state folder (raw bytes, the database's files included) and every SQLite table
are searched for the id; what is still found is listed under ``remaining`` in the answer (and
logged), never silently ignored. (The name is replaced where it is a whole value; searched as a
substring, a short name would match unrelated bytes.)
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_server.compliance import ERASURE_EVENT, ERASURE_LIMIT, ERASURE_SCOPE, erasure_detail
from fl_server.rest.driver import CoordinatorView, DriverContext
from fl_server.rest.gateway import ApiError
from fl_server.rest.observer import FinishedRun, ServiceObserver
from fl_server.store import HistoryRecord
from fl_server.store.scrub import contains_exact, replace_csv_cells, replace_exact

log = logging.getLogger("fl_server.rest.erasure")

@dataclass(frozen=True)
class ErasureResult:
    receipt: str
    rows: int
    files: int
    rewritten: tuple[str, ...]
    remaining: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"erased": True, "receipt": self.receipt, "rows": self.rows, "files": self.files,
                "rewritten": list(self.rewritten), "remaining": list(self.remaining), "what": ERASURE_SCOPE,
                "kept": ERASURE_LIMIT}


def _scrub_run_folder(ctx: DriverContext, targets: set[str], placeholder: str) -> list[str]:
    """Replace exact mentions in the run folder's CSV and JSON files and in the checkpoint; names of files rewritten."""
    run_dir = ctx.run_dir
    rewritten: list[str] = []
    for path in sorted(p for p in run_dir.path.rglob("*") if p.is_file()):
        name = path.relative_to(run_dir.path).as_posix()
        if path.suffix == ".csv":
            text = path.read_text(encoding="utf-8")
            new = replace_csv_cells(text, targets, placeholder)
            if new != text:
                run_dir.write_text(name, new)
                rewritten.append(name)
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if contains_exact(data, targets):
                run_dir.write_text(name, json.dumps(replace_exact(data, targets, placeholder), indent=2))
                rewritten.append(name)
        elif path == run_dir.checkpoint_path:
            state = run_dir.load_checkpoint()
            if contains_exact(state, targets):
                run_dir.save_checkpoint({k: v for k, v in replace_exact(state, targets, placeholder).items() if k != "format"})
                rewritten.append(name)
    return rewritten


def _leftovers(state_dir: Path, db: Path, targets: set[str]) -> list[str]:
    """Files under ``state_dir`` (names or raw bytes, the database's own files included: its freed space is zeroed)
    and SQLite tables whose rows still mention a target."""
    found: list[str] = []
    needles = [t.encode("utf-8") for t in targets]
    for path in sorted(p for p in state_dir.rglob("*") if p.is_file()):
        if any(t in path.name for t in targets) or any(n in path.read_bytes() for n in needles):
            found.append(path.relative_to(state_dir).as_posix())
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in con.execute(f"SELECT * FROM {table}"):  # table names come from sqlite_master
                if any(isinstance(v, (str, bytes)) and any((t in v) if isinstance(v, str) else (t.encode() in v)
                                                           for t in targets) for v in row):
                    found.append(f"server.db:{table}")
                    break
    finally:
        con.close()
    return found


class ErasureSweeper(ServiceObserver):
    """Keeps erased clients out of durable state for the rest of the process's life.

    A client erased while a round it sent an update to is open still counts in that round (its
    contribution cannot be taken out), so closing the round writes its id again: into the checkpoint
    (the coordinator's participation log and, under DP, its privacy ledger), ``participation_rounds.csv``
    and the round's participant rows. After every round close or abort (observers are called once those
    files are written, under the same lock) the sweeper replaces the id again with the same placeholder;
    at the end of the run it writes the report again if anything changed. A restarted server loads the
    swept checkpoint and store, so it never holds the id again."""

    def __init__(self, ctx: DriverContext, coordinator: CoordinatorView) -> None:
        self.ctx = ctx
        self.coordinator = coordinator
        #: client id -> (the id and name to replace, the placeholder)
        self.erased: dict[str, tuple[frozenset[str], str]] = {}

    def add(self, client_id: str, targets: frozenset[str], placeholder: str) -> None:
        self.erased[client_id] = (targets, placeholder)

    def sweep(self) -> tuple[int, list[str]]:
        """Replace every erased client again in the store, the in-memory participation log and the run
        folder; returns (rows deleted, run files rewritten)."""
        rows, rewritten = 0, []
        for client_id, (targets, placeholder) in self.erased.items():
            deleted, _ = self.ctx.store.erase_client(client_id, placeholder)
            rows += deleted
            log_ = self.coordinator.participation
            if contains_exact(log_.state_dict(), targets):
                log_.load_state_dict(replace_exact(log_.state_dict(), targets, placeholder))
            rewritten += [f for f in _scrub_run_folder(self.ctx, set(targets), placeholder) if f not in rewritten]
        return rows, rewritten

    def round_closed(self, record: HistoryRecord, *, reason: str, selected: int, arrived: int,
                     close_seconds: float) -> None:
        self.sweep()

    def round_aborted(self, round_number: int, arrived: int) -> None:
        self.sweep()

    def run_finished(self, run: FinishedRun) -> None:
        if self.sweep()[1]:
            from fl_server.rest.run_report import write_rest_report

            write_rest_report(run)


def _sweeper(ctx: DriverContext, coordinator: CoordinatorView) -> ErasureSweeper:
    for observer in ctx.observers:
        if isinstance(observer, ErasureSweeper):
            return observer
    sweeper = ErasureSweeper(ctx, coordinator)
    ctx.observers.add(sweeper)
    return sweeper


def erase_client(ctx: DriverContext, coordinator: CoordinatorView, state_dir: Path, client_id: str) -> ErasureResult:
    """Erase ``client_id`` (see the module docstring); the caller holds the service lock and has told the
    driver the client left. Raises ApiError 404 for an unknown client."""
    row = ctx.store.client(client_id) if isinstance(client_id, str) and len(client_id) <= 64 else None
    if row is None:
        raise ApiError(404, "unknown_client", f"no client {client_id!r} is registered")
    targets = frozenset({client_id} | ({row.name} if row.name else set()))
    receipt = f"er-{secrets.token_hex(6)}"
    placeholder = f"erased-{secrets.token_hex(6)}"  # not the receipt: nothing stored links the two
    deleted, paths = ctx.store.erase_client(client_id)  # its own rows and the paths of its payload files
    files = 0
    for path in [*map(Path, paths), *(p for p in ctx.updates_dir.rglob("*") if p.is_file() and client_id in p.name)]:
        try:
            path.unlink()
            files += 1
        except FileNotFoundError:
            pass
    sweeper = _sweeper(ctx, coordinator)
    sweeper.add(client_id, targets, placeholder)
    swept, rewritten = sweeper.sweep()  # the rows shared with other clients, the run folder, the participation log
    rows = deleted + swept
    ctx.store.security_event(ERASURE_EVENT, None, erasure_detail(receipt, rows, files, len(rewritten)))
    if (ctx.run_dir.path / "report.md").is_file():  # the run has finished: its report and compliance record again
        from fl_server.rest.run_report import write_rest_report

        write_rest_report(ctx)
    remaining = _leftovers(state_dir, state_dir / "server.db", {client_id})  # a short name may be a substring of anything
    if remaining:
        log.error("erasure %s: the client is still mentioned in %s", receipt, ", ".join(remaining))
    log.warning("erasure %s: a client was erased by an admin: %d row(s), %d file(s), %d run file(s) rewritten", receipt,
                rows, files, len(rewritten))
    return ErasureResult(receipt, rows, files, tuple(rewritten), tuple(remaining))


__all__ = ["ErasureResult", "ErasureSweeper", "erase_client"]
