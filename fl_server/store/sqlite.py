"""The REST server's durable state in one SQLite file.

What lives here: registered clients (session tokens stored only as keyed hashes, per-client
session keys wrapped with a server key, the profile each reports for client selection, the
Ed25519 verifying key secure aggregation checks its messages against), rounds and their
participants (with each selected client's inclusion probability and, for a secure attempt, its
public SecAgg parameters), the metadata of every accepted update (the payload itself is a file
next to the database), the replay-nonce cache and the security audit log. A secure round's masked
inputs are never stored (their rows keep only the hash, the idempotency key and the clear DP
metrics, with an empty path), so a secure attempt cannot outlive the process. Asynchronous runs
have no rounds: their accepted updates live in ``async_updates`` (keyed by job, with the
idempotency key that answers a retry) and the fate of every job in ``async_jobs`` (a mirror of
the coordinator's job records, for per-client tables).
WAL mode with ``synchronous=FULL``: a committed row survives ``kill -9`` and power loss, which
is what lets the server answer 202 only after an update is durable.

One connection guarded by a lock: the server is one process with a few threads and SQLite
serialises writers anyway; this keeps every multi-statement change atomic and simple.

What every authenticated request writes is kept cheap at scale (benchmarks/results/rest_scale/): its replay
nonce is committed before the request goes on, but concurrent requests share one commit (group commit,
fl_server/store/group_commit.py); its client's ``last_seen`` is exact in memory and written at most once
per :data:`LAST_SEEN_RESOLUTION` s (fl_server/store/last_seen.py); liveness reads an index on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_server.store.group_commit import GroupCommit
from fl_server.store.last_seen import LastSeenCache
from fl_server.store.scrub import contains_exact, replace_exact

#: ``last_seen`` is written at most once per this many seconds per client (fl_server/store/last_seen.py)
LAST_SEEN_RESOLUTION = 5.0
#: expired replay nonces are deleted at most once per this many seconds (an expired row counts as absent anyway)
NONCE_PRUNE_EVERY = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    token_hash TEXT NOT NULL,
    token_expires REAL NOT NULL,
    wrapped_keys BLOB NOT NULL,
    partition_index INTEGER,
    num_samples INTEGER,
    capability TEXT NOT NULL DEFAULT '{}',
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    rounds_participated INTEGER NOT NULL DEFAULT 0,
    last_metrics TEXT NOT NULL DEFAULT '{}',
    profile TEXT,
    secagg_verify_key TEXT
);
CREATE INDEX IF NOT EXISTS clients_token ON clients(token_hash);
CREATE INDEX IF NOT EXISTS clients_last_seen ON clients(last_seen);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    selected TEXT NOT NULL,
    instructions TEXT NOT NULL,
    target INTEGER NOT NULL,
    started_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    reason TEXT,
    privacy TEXT,
    probabilities TEXT,
    secagg TEXT,
    download_bytes INTEGER NOT NULL DEFAULT 0,
    timeline TEXT
);
CREATE TABLE IF NOT EXISTS participants (
    round_id INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (round_id, client_id)
);
CREATE TABLE IF NOT EXISTS updates (
    round_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    PRIMARY KEY (round_id, client_id)
);
CREATE TABLE IF NOT EXISTS nonces (
    client_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (client_id, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces(expires_at);
CREATE TABLE IF NOT EXISTS security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    client_id TEXT,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS enrollments (
    enrollment_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    client_name TEXT,
    max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS async_updates (
    job INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    staleness INTEGER NOT NULL,
    status TEXT NOT NULL,
    UNIQUE (client_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS async_jobs (
    job INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL
);
"""

#: async_jobs.status (the coordinator's JobRecord.status) -> the participants-table status it counts as
_ASYNC_JOB_PARTICIPATION = {"training": "selected", "accepted": "submitted", "refused": "dropped", "cancelled": "dropped"}


@dataclass
class ClientRow:
    client_id: str
    name: str | None
    token_hash: str
    token_expires: float
    wrapped_keys: bytes
    partition_index: int | None
    num_samples: int | None
    capability: dict[str, float]
    registered_at: float
    last_seen: float
    rounds_participated: int
    last_metrics: dict[str, float]
    #: what the client reported at POST /api/v1/profile (num_samples, capability, label_histogram,
    #: reported_at); None until it has, and again after it registers anew
    profile: dict[str, Any] | None = None
    #: the client's long-term Ed25519 verifying key (urlsafe base64 of 32 bytes), sent at registration:
    #: secure aggregation checks every protocol message of the client against it (fl_common/secagg/auth.py)
    secagg_verify_key: str | None = None
    #: when an admin revoked the client (it can no longer authenticate or re-register by name), else None
    revoked_at: float | None = None


@dataclass
class RoundRow:
    """One attempt at a round. An aborted attempt (quorum missed) is followed by a new attempt
    with the same round number and model version, so attempts, not round numbers, key the rows."""

    round_id: int
    round: int
    state: str
    selected: list[str]
    instructions: dict[str, dict[str, Any]]
    target: int
    started_at: float
    deadline: float
    closed_at: float | None
    reason: str | None
    #: the round's DP parameters (``RoundPlan.privacy``): needed to reopen the round after a restart
    privacy: dict[str, Any] | None = None
    #: each selected client's inclusion probability (``RoundPlan.probabilities``), for participation records
    probabilities: dict[str, float] | None = None
    #: the attempt's public secure-aggregation parameters (``RoundPlan.secagg``); an open attempt that has
    #: them cannot be resumed after a restart (the protocol state is in memory only) and is aborted
    secagg: dict[str, Any] | None = None
    #: bytes of model downloads served while the attempt was open (a restart keeps counting from here)
    download_bytes: int = 0


@dataclass
class UpdateRow:
    round_id: int
    round: int
    client_id: str
    idempotency_key: str
    path: str
    sha256: str
    num_samples: int
    metrics: dict[str, float]
    nbytes: int
    accepted_at: float


@dataclass
class AsyncUpdateRow:
    """An update accepted in an asynchronous run: one per job (a job ends in at most one update)."""

    job: int
    version: int  # the model version the job trained on (the upload path's number)
    client_id: str
    idempotency_key: str
    path: str
    sha256: str
    num_samples: int
    metrics: dict[str, float]
    nbytes: int
    accepted_at: float
    staleness: int
    status: str  # "applied" or "buffered" when accepted


class ServerStore:
    def __init__(self, path: str | Path, *, last_seen_resolution: float = LAST_SEEN_RESOLUTION) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The database holds wrapped client keys and token hashes: readable by the server's user only.
        # SQLite gives its -wal and -shm files the database file's mode, so creating it 0600 covers all three.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._seen = LastSeenCache(last_seen_resolution)
        self._nonces: GroupCommit[tuple[str, str, float], bool] = GroupCommit(self._record_nonces)
        self._nonces_pruned_at = float("-inf")
        #: a round's downloads come together: their byte counts share commits (group_commit.py)
        self._download_bytes: GroupCommit[tuple[int, int], None] = GroupCommit(self._record_download_bytes)
        #: the open attempt's raw row and its parse (current_open_round)
        self._open_raw: tuple | None = None
        self._open_row: RoundRow | None = None

    def _migrate(self) -> None:
        """Bring a database written by an older version up to this schema (additive changes only)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(rounds)").fetchall()}
        if "privacy" not in columns:
            self._db.execute("ALTER TABLE rounds ADD COLUMN privacy TEXT")
        if "probabilities" not in columns:
            self._db.execute("ALTER TABLE rounds ADD COLUMN probabilities TEXT")
        if "secagg" not in columns:
            self._db.execute("ALTER TABLE rounds ADD COLUMN secagg TEXT")
        if "download_bytes" not in columns:
            self._db.execute("ALTER TABLE rounds ADD COLUMN download_bytes INTEGER NOT NULL DEFAULT 0")
        if "timeline" not in columns:
            self._db.execute("ALTER TABLE rounds ADD COLUMN timeline TEXT")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(clients)").fetchall()}
        if "profile" not in columns:
            self._db.execute("ALTER TABLE clients ADD COLUMN profile TEXT")
        if "secagg_verify_key" not in columns:
            self._db.execute("ALTER TABLE clients ADD COLUMN secagg_verify_key TEXT")
        if "enrolled_by" not in columns:
            self._db.execute("ALTER TABLE clients ADD COLUMN enrolled_by TEXT")
        if "revoked_at" not in columns:
            self._db.execute("ALTER TABLE clients ADD COLUMN revoked_at REAL")

    def close(self) -> None:
        """Write the sightings not yet stored (a clean stop keeps every ``last_seen`` exact), then close."""
        with self._lock:
            pending = self._seen.pending()
            if pending:
                with self._tx() as db:
                    db.executemany("UPDATE clients SET last_seen=MAX(last_seen, ?) WHERE client_id=?",
                                   [(t, c) for c, t in pending.items()])
            self._db.close()

    # ------------------------------------------------------------------ transactions
    def _tx(self) -> _Tx:
        return _Tx(self)

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # ------------------------------------------------------------------ clients
    def add_client(self, row: ClientRow, enrolled_by: str | None = None) -> None:
        """A new client, with the credential that enrolled it (see :meth:`set_enrolled_by`), in one transaction."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO clients(client_id, name, token_hash, token_expires, wrapped_keys, partition_index, num_samples,"
                " capability, registered_at, last_seen, secagg_verify_key, enrolled_by) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                (row.client_id, row.name, row.token_hash, row.token_expires, row.wrapped_keys, row.partition_index,
                 row.num_samples, json.dumps(row.capability), row.registered_at, row.last_seen, row.secagg_verify_key,
                 enrolled_by),
            )
        self._seen.stored(row.client_id, row.last_seen)

    def replace_client_credentials(self, client_id: str, token_hash: str, token_expires: float, wrapped_keys: bytes,
                                   capability: dict[str, float], num_samples: int | None, now: float,
                                   secagg_verify_key: str | None = None) -> None:
        """A client registering again starts afresh: new keys, and no profile until it reports one again
        (what it reported before may not hold for the state it comes back with)."""
        with self._tx() as db:
            db.execute("UPDATE clients SET token_hash=?, token_expires=?, wrapped_keys=?, capability=?, num_samples=?, last_seen=?,"
                       " profile=NULL, secagg_verify_key=? WHERE client_id=?",
                       (token_hash, token_expires, wrapped_keys, json.dumps(capability), num_samples, now, secagg_verify_key,
                        client_id))
        self._seen.stored(client_id, now)

    def set_profile(self, client_id: str, profile: dict[str, Any], num_samples: int, capability: dict[str, float]) -> None:
        """Store a client's (validated) profile; ``num_samples`` and ``capability`` are also kept in
        their own columns, which the admin client table shows."""
        with self._tx() as db:
            db.execute("UPDATE clients SET profile=?, num_samples=?, capability=? WHERE client_id=?",
                       (json.dumps(profile), num_samples, json.dumps(capability), client_id))

    def update_token(self, client_id: str, token_hash: str, token_expires: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE clients SET token_hash=?, token_expires=? WHERE client_id=?", (token_hash, token_expires, client_id))

    def touch_client(self, client_id: str, now: float) -> None:
        """The client was heard from at ``now``: exact in memory, written when the stored value is
        :data:`LAST_SEEN_RESOLUTION` s behind (readers of this store see the exact value either way)."""
        if self._seen.seen(client_id, now):
            with self._tx() as db:
                db.execute("UPDATE clients SET last_seen=MAX(last_seen, ?) WHERE client_id=?", (now, client_id))
            self._seen.stored(client_id, now)

    def _client(self, row: tuple | None) -> ClientRow | None:
        if row is None:
            return None
        seen = self._seen.newest(row[0])
        return ClientRow(row[0], row[1], row[2], row[3], bytes(row[4]), row[5], row[6], json.loads(row[7]), row[8],
                         row[9] if seen is None else max(row[9], seen), row[10], json.loads(row[11]),
                         None if row[12] is None else json.loads(row[12]), row[13], row[14])

    _CLIENT_COLS = ("client_id, name, token_hash, token_expires, wrapped_keys, partition_index, num_samples, capability,"
                    " registered_at, last_seen, rounds_participated, last_metrics, profile, secagg_verify_key, revoked_at")

    def client(self, client_id: str) -> ClientRow | None:
        return self._client(self._one(f"SELECT {self._CLIENT_COLS} FROM clients WHERE client_id=?", (client_id,)))

    def client_by_name(self, name: str) -> ClientRow | None:
        return self._client(self._one(f"SELECT {self._CLIENT_COLS} FROM clients WHERE name=?", (name,)))

    def client_by_token_hash(self, token_hash: str) -> ClientRow | None:
        return self._client(self._one(f"SELECT {self._CLIENT_COLS} FROM clients WHERE token_hash=?", (token_hash,)))

    def clients(self) -> list[ClientRow]:
        return [c for c in (self._client(r) for r in self._all(f"SELECT {self._CLIENT_COLS} FROM clients ORDER BY registered_at"))
                if c is not None]

    def live_client_ids(self, since: float) -> list[str]:
        """Clients heard from at ``since`` or later, not revoked, by id. The stored ``last_seen`` lags the newest
        sighting by less than the resolution, so the index is read from ``since - resolution`` and the rows
        are then judged by their newest sighting: exact, and O(live clients), not O(registered)."""
        rows = self._all("SELECT client_id, last_seen FROM clients WHERE last_seen >= ? AND revoked_at IS NULL"
                         " ORDER BY client_id", (since - self._seen.resolution,))
        newest = self._seen.snapshot()
        return [cid for cid, stored in rows if max(stored, newest.get(cid, stored)) >= since]

    def client_ids(self) -> list[str]:
        return [r[0] for r in self._all("SELECT client_id FROM clients ORDER BY registered_at")]

    def secagg_verify_key(self, client_id: str) -> str | None:
        """The Ed25519 verifying key a client registered (urlsafe base64), or None."""
        row = self._one("SELECT secagg_verify_key FROM clients WHERE client_id=?", (client_id,))
        return None if row is None else row[0]

    def secagg_capable_ids(self) -> set[str]:
        """Clients that registered a verifying key: the only ones a secure round can include."""
        return {r[0] for r in self._all("SELECT client_id FROM clients WHERE secagg_verify_key IS NOT NULL")}

    def count_profiles(self) -> int:
        row = self._one("SELECT COUNT(*) FROM clients WHERE profile IS NOT NULL")
        return int(row[0]) if row else 0

    def profiles(self) -> dict[str, dict[str, Any]]:
        """client_id -> profile of every client that has reported one (the selection's candidates)."""
        return {r[0]: json.loads(r[1]) for r in self._all("SELECT client_id, profile FROM clients WHERE profile IS NOT NULL")}

    def count_clients(self) -> int:
        row = self._one("SELECT COUNT(*) FROM clients")
        return int(row[0]) if row else 0

    def used_partitions(self) -> set[int]:
        return {int(r[0]) for r in self._all("SELECT partition_index FROM clients WHERE partition_index IS NOT NULL")}

    # ------------------------------------------------------------------ enrollment and administration
    def set_enrolled_by(self, client_id: str, enrollment: str) -> None:
        """Which credential registered the client: ``shared`` or an enrollment id (limits per credential)."""
        with self._tx() as db:
            db.execute("UPDATE clients SET enrolled_by=? WHERE client_id=?", (enrollment, client_id))

    def count_enrolled_by(self, enrollment: str) -> int:
        row = self._one("SELECT COUNT(*) FROM clients WHERE enrolled_by=?", (enrollment,))
        return int(row[0]) if row else 0

    def add_enrollment(self, enrollment_id: str, token_hash: str, client_name: str | None, max_uses: int, now: float,
                       expires_at: float | None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO enrollments(enrollment_id, token_hash, client_name, max_uses, created_at, expires_at)"
                       " VALUES(?,?,?,?,?,?)", (enrollment_id, token_hash, client_name, max_uses, now, expires_at))

    def enrollment_by_hash(self, token_hash: str) -> dict[str, Any] | None:
        row = self._one("SELECT enrollment_id, client_name, max_uses, uses, created_at, expires_at, revoked_at FROM enrollments"
                        " WHERE token_hash=?", (token_hash,))
        return None if row is None else self._enrollment(row)

    @staticmethod
    def _enrollment(r: tuple) -> dict[str, Any]:
        return {"enrollment_id": r[0], "client_name": r[1], "max_uses": int(r[2]), "uses": int(r[3]), "created_at": r[4],
                "expires_at": r[5], "revoked_at": r[6]}

    def use_enrollment(self, enrollment_id: str, now: float) -> bool:
        """Spend one use of an enrollment credential, atomically; False when it has none left (or is dead)."""
        with self._tx() as db:
            cur = db.execute("UPDATE enrollments SET uses = uses + 1 WHERE enrollment_id=? AND uses < max_uses AND revoked_at IS"
                             " NULL AND (expires_at IS NULL OR expires_at > ?)", (enrollment_id, now))
            return cur.rowcount == 1

    def enrollments(self) -> list[dict[str, Any]]:
        return [self._enrollment(r) for r in self._all("SELECT enrollment_id, client_name, max_uses, uses, created_at,"
                                                        " expires_at, revoked_at FROM enrollments ORDER BY created_at")]

    def revoke_enrollment(self, enrollment_id: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE enrollments SET revoked_at=? WHERE enrollment_id=? AND revoked_at IS NULL",
                             (now, enrollment_id))
            return cur.rowcount == 1

    def revoke_client(self, client_id: str, now: float) -> bool:
        """The client can no longer authenticate (its token and keys stay, unusable), nor re-register by name."""
        with self._tx() as db:
            cur = db.execute("UPDATE clients SET revoked_at=?, token_expires=0 WHERE client_id=? AND revoked_at IS NULL",
                             (now, client_id))
            return cur.rowcount == 1

    def client_revoked_at(self, client_id: str) -> float | None:
        row = self._one("SELECT revoked_at FROM clients WHERE client_id=?", (client_id,))
        return None if row is None else row[0]

    def erase_client(self, client_id: str, placeholder: str | None = None) -> tuple[int, list[str]]:
        """Delete every row that names the client (its record, updates, participation, nonces, jobs and audit
        events) and return (rows deleted, payload files the caller must delete). With ``placeholder``, the rows
        it shares with other clients (a round's selection, instructions, inclusion probabilities and secure-
        aggregation roster) keep their shape with the id replaced by it. What cannot be erased is its
        contribution to models already aggregated."""
        tables = ("updates", "async_updates", "async_jobs", "participants", "nonces", "security_events")
        shared = ("selected", "instructions", "probabilities", "secagg")
        with self._lock:  # deleted and rewritten cells are zeroed in the file, not left in free space
            self._db.execute("PRAGMA secure_delete=ON")
        with self._tx() as db:
            paths = [r[0] for r in db.execute("SELECT path FROM updates WHERE client_id=? AND path != ''", (client_id,))]
            paths += [r[0] for r in db.execute("SELECT path FROM async_updates WHERE client_id=?", (client_id,))]
            deleted = sum(db.execute(f"DELETE FROM {t} WHERE client_id=?", (client_id,)).rowcount for t in tables)
            deleted += db.execute("DELETE FROM clients WHERE client_id=?", (client_id,)).rowcount
            self._seen.forget(client_id)
            if placeholder is not None:
                like = f"%{client_id}%"
                rows = db.execute(f"SELECT round_id, {', '.join(shared)} FROM rounds WHERE "
                                  + " OR ".join(f"{c} LIKE ?" for c in shared), (like,) * len(shared)).fetchall()
                for round_id, *columns in rows:
                    values = [None if v is None else json.loads(v) for v in columns]
                    if any(contains_exact(v, {client_id}) for v in values):
                        db.execute(f"UPDATE rounds SET {', '.join(f'{c}=?' for c in shared)} WHERE round_id=?",
                                   (*[None if v is None else json.dumps(replace_exact(v, {client_id}, placeholder))
                                      for v in values], round_id))
        with self._lock:  # and the old pages leave the write-ahead log now, not at some later checkpoint
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("PRAGMA secure_delete=OFF")
        return deleted, paths

    # ------------------------------------------------------------------ rounds
    def open_round(self, row: RoundRow) -> int:
        """Insert a new attempt (``row.round_id`` is ignored) and return its round_id."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO rounds(round, state, selected, instructions, target, started_at, deadline, privacy,"
                             " probabilities, secagg) VALUES(?,?,?,?,?,?,?,?,?,?)",
                             (row.round, "open", json.dumps(row.selected), json.dumps(row.instructions), row.target,
                              row.started_at, row.deadline, None if row.privacy is None else json.dumps(row.privacy),
                              None if row.probabilities is None else json.dumps(row.probabilities),
                              None if row.secagg is None else json.dumps(row.secagg)))
            assert cur.lastrowid is not None  # an INSERT into a rowid table
            round_id = int(cur.lastrowid)
            db.executemany("INSERT INTO participants(round_id, client_id, status) VALUES(?,?,'selected')",
                           [(round_id, c) for c in row.selected])
        row.round_id = round_id
        return round_id

    def _round(self, row: tuple | None) -> RoundRow | None:
        if row is None:
            return None
        return RoundRow(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5], row[6], row[7], row[8], row[9],
                        None if row[10] is None else json.loads(row[10]), None if row[11] is None else json.loads(row[11]),
                        None if row[12] is None else json.loads(row[12]), int(row[13] or 0))

    _ROUND_COLS = ("round_id, round, state, selected, instructions, target, started_at, deadline, closed_at, reason, privacy,"
                   " probabilities, secagg, download_bytes")

    def add_download_bytes(self, round_id: int, nbytes: int) -> None:
        """Durably add a download's bytes to an attempt's count; returns once committed. Downloads that arrive
        together share one commit (one fsync), so ten clients fetching a round's model do not queue behind ten."""
        self._download_bytes.submit((round_id, nbytes))

    def _record_download_bytes(self, batch: Sequence[tuple[int, int]]) -> list[None]:
        with self._tx() as db:
            db.executemany("UPDATE rounds SET download_bytes = COALESCE(download_bytes, 0) + ? WHERE round_id=?",
                           [(n, rid) for rid, n in batch])
        return [None] * len(batch)

    def current_open_round(self) -> RoundRow | None:
        """The open attempt, or None. Every poll, tick and upload reads it, and its JSON columns grow with the clients
        of the round: parsing them costs 1.2 ms at 100 selected clients and 14 ms at 1,000, reading them raw 0.03 and
        0.1 ms. So the raw row is read every time and parsed only when it differs from the last one: whoever wrote
        it, nothing stale is ever returned. Callers get their own row object; its dicts and lists are shared, read
        them only."""
        with self._lock:
            raw = self._one(f"SELECT {self._ROUND_COLS} FROM rounds WHERE state='open' ORDER BY round_id DESC LIMIT 1")
            if raw != self._open_raw:
                self._open_row, self._open_raw = self._round(raw), raw
            row = self._open_row
        return None if row is None else dataclasses.replace(row)

    def round_attempt(self, round_id: int) -> RoundRow | None:
        """One attempt by its id (open, closed or aborted)."""
        return self._round(self._one(f"SELECT {self._ROUND_COLS} FROM rounds WHERE round_id=?", (round_id,)))

    def finish_round(self, round_id: int, state: str, reason: str, now: float, arrived: list[str],
                     timeline: dict[str, Any] | None = None) -> None:
        """Close (or abort) a round attempt: participants who did not arrive are recorded as dropped. ``timeline``
        (fl_server/rest/round_timeline.py) is stored with the row in the same transaction."""
        with self._tx() as db:
            db.execute("UPDATE rounds SET state=?, closed_at=?, reason=?, timeline=? WHERE round_id=?",
                       (state, now, reason, None if timeline is None else json.dumps(timeline), round_id))
            db.execute("UPDATE participants SET status='dropped' WHERE round_id=? AND status='selected'", (round_id,))
            if state == "closed":
                db.executemany("UPDATE clients SET rounds_participated = rounds_participated + 1 WHERE client_id=?",
                               [(c,) for c in arrived])

    def round_timeline(self, round_id: int) -> dict[str, Any] | None:
        """The timeline stored when the attempt ended (None: still open, or ended without one)."""
        row = self._one("SELECT timeline FROM rounds WHERE round_id=?", (round_id,))
        return None if row is None or row[0] is None else dict(json.loads(row[0]))

    def round_rows(self, limit: int = 1000) -> list[RoundRow]:
        rows = self._all(f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round_id DESC LIMIT ?", (limit,))
        return [r for r in (self._round(x) for x in rows) if r is not None]

    def participation(self) -> dict[str, dict[str, int]]:
        """Per client: selections by outcome (selected = still open, submitted, dropped), over round
        attempts and asynchronous jobs alike."""
        out: dict[str, dict[str, int]] = {}
        for client_id, status, n in self._all("SELECT client_id, status, COUNT(*) FROM participants GROUP BY client_id, status"):
            out.setdefault(client_id, {})[status] = int(n)
        for client_id, status, n in self._all("SELECT client_id, status, COUNT(*) FROM async_jobs GROUP BY client_id, status"):
            mine = out.setdefault(client_id, {})
            key = _ASYNC_JOB_PARTICIPATION.get(status, "dropped")
            mine[key] = mine.get(key, 0) + int(n)
        return out

    def participant_status(self, round_id: int, client_id: str) -> str | None:
        """selected / submitted / dropped for one client of one attempt, None if it was not selected."""
        row = self._one("SELECT status FROM participants WHERE round_id=? AND client_id=?", (round_id, client_id))
        return None if row is None else str(row[0])

    def round_participants(self, round_id: int) -> dict[str, str]:
        return dict(self._all("SELECT client_id, status FROM participants WHERE round_id=?", (round_id,)))

    # ------------------------------------------------------------------ updates
    def add_update(self, row: UpdateRow) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO updates(round_id, round, client_id, idempotency_key, path, sha256, num_samples, metrics, nbytes,"
                       " accepted_at) VALUES(?,?,?,?,?,?,?,?,?,?)",
                       (row.round_id, row.round, row.client_id, row.idempotency_key, row.path, row.sha256, row.num_samples,
                        json.dumps(row.metrics), row.nbytes, row.accepted_at))
            db.execute("UPDATE participants SET status='submitted' WHERE round_id=? AND client_id=?", (row.round_id, row.client_id))
            db.execute("UPDATE clients SET last_metrics=? WHERE client_id=?", (json.dumps(row.metrics), row.client_id))

    _UPDATE_COLS = "round_id, round, client_id, idempotency_key, path, sha256, num_samples, metrics, nbytes, accepted_at"

    @staticmethod
    def _update(r: tuple) -> UpdateRow:
        return UpdateRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9])

    def update(self, round_id: int, client_id: str) -> UpdateRow | None:
        row = self._one(f"SELECT {self._UPDATE_COLS} FROM updates WHERE round_id=? AND client_id=?", (round_id, client_id))
        return None if row is None else self._update(row)

    def accepted_update(self, round_number: int, client_id: str) -> UpdateRow | None:
        """The update a client got accepted for round ``round_number`` in its open or closed attempt
        (an aborted attempt's updates do not count: the client trains for the next attempt anew)."""
        cols = ", ".join(f"u.{c.strip()}" for c in self._UPDATE_COLS.split(","))
        row = self._one(f"SELECT {cols} FROM updates u JOIN rounds r ON r.round_id = u.round_id"
                        " WHERE u.round=? AND u.client_id=? AND r.state IN ('open', 'closed')", (round_number, client_id))
        return None if row is None else self._update(row)

    def updates_for_round(self, round_id: int) -> list[UpdateRow]:
        rows = self._all(f"SELECT {self._UPDATE_COLS} FROM updates WHERE round_id=? ORDER BY accepted_at, client_id", (round_id,))
        return [self._update(r) for r in rows]

    def count_updates(self) -> int:
        row = self._one("SELECT (SELECT COUNT(*) FROM updates) + (SELECT COUNT(*) FROM async_updates)")
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ asynchronous runs
    _ASYNC_COLS = ("job, version, client_id, idempotency_key, path, sha256, num_samples, metrics, nbytes, accepted_at, staleness,"
                   " status")

    @staticmethod
    def _async_update(r: tuple | None) -> AsyncUpdateRow | None:
        if r is None:
            return None
        return AsyncUpdateRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9], r[10], r[11])

    def add_async_update(self, row: AsyncUpdateRow) -> None:
        """Record an accepted asynchronous update; the client's participation count and last metrics move with it."""
        with self._tx() as db:
            db.execute(f"INSERT INTO async_updates({self._ASYNC_COLS}) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                       (row.job, row.version, row.client_id, row.idempotency_key, row.path, row.sha256, row.num_samples,
                        json.dumps(row.metrics), row.nbytes, row.accepted_at, row.staleness, row.status))
            db.execute("UPDATE clients SET last_metrics=?, rounds_participated = rounds_participated + 1 WHERE client_id=?",
                       (json.dumps(row.metrics), row.client_id))

    def async_update_by_key(self, client_id: str, idempotency_key: str) -> AsyncUpdateRow | None:
        return self._async_update(self._one(f"SELECT {self._ASYNC_COLS} FROM async_updates WHERE client_id=? AND idempotency_key=?",
                                            (client_id, idempotency_key)))

    def async_update_for_job(self, job: int) -> AsyncUpdateRow | None:
        return self._async_update(self._one(f"SELECT {self._ASYNC_COLS} FROM async_updates WHERE job=?", (job,)))

    def async_update_metrics(self) -> list[dict[str, float]]:
        """The metrics of every accepted asynchronous update (the report lists the names clients sent)."""
        return [json.loads(r[0]) for r in self._all("SELECT metrics FROM async_updates ORDER BY job")]

    def upsert_async_jobs(self, jobs: list[tuple[int, str, int, str]], *, replace_all: bool = False) -> None:
        """Mirror (job, client_id, version, status) rows of the coordinator's job records; ``replace_all``
        first forgets every row (a restart re-mirrors the restored coordinator)."""
        with self._tx() as db:
            if replace_all:
                db.execute("DELETE FROM async_jobs")
            db.executemany("INSERT INTO async_jobs(job, client_id, version, status) VALUES(?,?,?,?) ON CONFLICT(job) DO UPDATE"
                           " SET client_id=excluded.client_id, version=excluded.version, status=excluded.status", jobs)

    # ------------------------------------------------------------------ replay nonces
    def seen_or_add(self, client_id: str, nonce: str, expires_at: float) -> bool:
        """The NonceCache interface of fl_common.crypto: True if (client, nonce) was already used.

        The nonce is durable when this returns False (a replay is refused after ``kill -9`` too); concurrent
        callers share one transaction (:class:`GroupCommit`), in which their nonces are checked one by one in
        arrival order, so two concurrent uses of one nonce still see each other."""
        return self._nonces.submit((client_id, nonce, expires_at))

    def _record_nonces(self, batch: Sequence[tuple[str, str, float]]) -> list[bool]:
        """One transaction for a batch of nonces: for each, whether it was live already. A row whose
        ``expires_at`` has passed counts as absent (it is taken over), as if it had been deleted."""
        now = time.time()
        seen: list[bool] = []
        with self._tx() as db:
            if now - self._nonces_pruned_at >= NONCE_PRUNE_EVERY:
                db.execute("DELETE FROM nonces WHERE expires_at < ?", (now,))
                self._nonces_pruned_at = now
            for client_id, nonce, expires_at in batch:
                cur = db.execute("INSERT INTO nonces(client_id, nonce, expires_at) VALUES(?,?,?) ON CONFLICT(client_id, nonce)"
                                 " DO UPDATE SET expires_at=excluded.expires_at WHERE nonces.expires_at < ?",
                                 (client_id, nonce, expires_at, now))
                seen.append(cur.rowcount == 0)
        return seen

    # ------------------------------------------------------------------ audit and counters
    def security_event(self, kind: str, client_id: str | None, detail: str, now: float | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO security_events(at, kind, client_id, detail) VALUES(?,?,?,?)",
                       (time.time() if now is None else now, kind, client_id, detail[:500]))

    def security_events(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._all("SELECT id, at, kind, client_id, detail FROM security_events ORDER BY id DESC LIMIT ?", (limit,))
        return [{"id": r[0], "at": r[1], "kind": r[2], "client_id": r[3], "detail": r[4]} for r in rows]

    def add_rejections(self, counts: dict[str, int]) -> None:
        """Add several refusal counts in one transaction (the refusal recorder's flush)."""
        with self._tx() as db:
            db.executemany("INSERT INTO rejections(reason, count) VALUES(?, ?) ON CONFLICT(reason) DO UPDATE SET count = count"
                           " + excluded.count", list(counts.items()))

    def prune_security_events(self, *, older_than: float, keep_newest: int) -> int:
        """The audit log's retention: drop events older than ``older_than`` and all but the newest
        ``keep_newest``; returns how many were removed."""
        with self._tx() as db:
            removed = db.execute("DELETE FROM security_events WHERE at < ?", (older_than,)).rowcount
            removed += db.execute("DELETE FROM security_events WHERE id NOT IN (SELECT id FROM security_events ORDER BY id"
                                  " DESC LIMIT ?)", (keep_newest,)).rowcount
        return int(removed)

    def rejections(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._all("SELECT reason, count FROM rejections ORDER BY reason")}


class _Tx:
    """``with store._tx() as db:`` - one atomic transaction under the store's lock."""

    def __init__(self, store: ServerStore) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        self.store._db.execute("BEGIN IMMEDIATE")
        return self.store._db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()

