"""The security audit log, read from a server's state directory: ``python -m fl_server audit --state-dir D``.

The server records security events in its SQLite store (``security_events``): registrations,
session-token renewals and every refusal - missing, unknown or expired tokens, bad or replayed
signatures, refused updates (with the reason), wrong enrollment or admin tokens. Admins read them
over HTTP at ``GET /api/v1/audit`` (admin token) or, on the server's machine, with this command,
whose only guard is the file system: whoever can read the state directory can read its secrets too.

The database is opened read-only (falling back to a plain connection where SQLite cannot open a
WAL database read-only), so the command is safe to run next to a live server.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any


class AuditError(Exception):
    """The state directory holds no readable server store."""


def _connect(db: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        con.execute("SELECT 1 FROM security_events LIMIT 1")
        return con
    except sqlite3.Error:
        return sqlite3.connect(db)


def read_events(state_dir: Path, *, limit: int = 200, kind: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` events (optionally of one kind), oldest first."""
    db = Path(state_dir) / "server.db"
    if not db.is_file():
        raise AuditError(f"no server store at {db} (is --state-dir the server's state directory?)")
    try:
        con = _connect(db)
        try:
            sql = "SELECT id, at, kind, client_id, detail FROM security_events"
            args: tuple[Any, ...] = ()
            if kind:
                sql += " WHERE kind = ?"
                args = (kind,)
            rows = con.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit log in {db}: {exc}") from None
    return [{"id": r[0], "at": r[1], "kind": r[2], "client_id": r[3], "detail": r[4]} for r in reversed(rows)]


def format_event(event: dict[str, Any], as_json: bool = False) -> str:
    at = datetime.datetime.fromtimestamp(event["at"], tz=datetime.timezone.utc).isoformat(timespec="milliseconds")
    if as_json:
        return json.dumps({**event, "time": at}, ensure_ascii=False)
    return f"{at}  {event['kind']:<28} {event['client_id'] or '-':<20} {event['detail']}"


__all__ = ["AuditError", "format_event", "read_events"]
