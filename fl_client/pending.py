"""A finished update the server has not acknowledged yet, kept until it counts or can no longer count.

Local training is the expensive part of a round; a server that restarts for a few seconds must not
throw it away. So once an update is packed, the daemon keeps it - in memory and in its state directory
(0600, written atomically) - with everything needed to send it again exactly as the first time:

- the **idempotency key** of the first try: the server counts an update once per key, so a retry of an
  upload that did arrive (its answer lost) is answered "duplicate" (202) instead of being counted twice;
- the **attempt it was trained for** (round, asynchronous job, and the deadline the server gave: a new
  attempt of the same round gets a new deadline), so it is never sent into another attempt, whose
  instructions (seed, DP parameters) may differ;
- when to give up (the round's deadline on this machine's wall clock, plus a grace: the server closes
  the round at its own tick, and a server that was down closes it when it is back). The poll reply's
  ``deadline`` is the server's wall clock; a ``deadline_in_s`` (seconds left, as secure rounds send it)
  is preferred when the reply has one, since it does not depend on the two clocks agreeing;
- what changes on this client only once the server holds the update: the codec's error-feedback
  residual after packing it and SCAFFOLD's next control variate.

A daemon killed while holding one resumes it after a restart (``load``), as long as its deadline has
not passed and the server still expects it.

File format (one file, ``pending_update.bin``): the magic line, an 8-byte big-endian header length, a
JSON header (fields and section lengths), then the sections (the wire-packed update, the residual, the
control variate) back to back.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_client.trusted_keys import write_private
from fl_common.protocol.rest import ROUND_SELECTED, ROUND_SUBMITTED

PENDING_FILE = "pending_update.bin"
MAGIC = b"FL-PENDING-UPDATE 1\n"
#: seconds past the round's deadline a daemon keeps trying (the server closes a round at its next tick,
#: and one that was down at the deadline closes it when it is back); a 409 ends the wait sooner
DEADLINE_GRACE = 15.0
#: how long an update is kept when the server gave no deadline
DEFAULT_HOLD = 600.0
_SECTIONS = ("data", "error_feedback", "control")


class PendingFileError(ValueError):
    """The pending-update file cannot be read (truncated, edited, or from another version)."""


@dataclass
class PendingUpload:
    round: int
    job: int | None  # asynchronous mode: the job; None in synchronous rounds
    key: str  # Idempotency-Key of the first try, reused by every retry
    server_deadline: float | None  # the deadline exactly as the server sent it: identifies the attempt
    give_up_at: float  # this machine's wall clock (time.time())
    data: bytes  # the wire-packed update
    error_feedback: bytes | None = None  # residual after packing this update (biased codecs)
    control: bytes | None = None  # SCAFFOLD's c_i once this update counts (torch.save bytes)
    summary: dict[str, Any] = field(default_factory=dict)  # for the log line once accepted (train loss, ...)

    @classmethod
    def for_status(cls, status: dict[str, Any], key: str, data: bytes, *, now: float | None = None,
                   **extra: Any) -> PendingUpload:
        """A new pending upload for the attempt of the poll reply ``status`` that selected this client."""
        now = time.time() if now is None else now
        deadline = _number(status.get("deadline"))
        remaining = _number(status.get("deadline_in_s"))  # the server's own count: immune to a skewed clock here
        if remaining is not None:
            give_up_at = now + max(0.0, remaining) + DEADLINE_GRACE
        elif deadline is not None:
            give_up_at = max(now, deadline) + DEADLINE_GRACE
        else:
            give_up_at = now + DEFAULT_HOLD
        job = status.get("job")
        return cls(int(status["round"]), None if job is None else int(job), key, deadline, give_up_at, data, **extra)

    @property
    def what(self) -> str:
        return f"round {self.round}" if self.job is None else f"job {self.job} (model version {self.round})"

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.give_up_at

    def is_for(self, status: dict[str, Any]) -> bool:
        """Does the poll reply ``status`` say the server still takes (or already holds) this update? The same
        round, job and attempt (deadline), with this client selected or its update already arrived."""
        if status.get("round") is None or int(status["round"]) != self.round:
            return False
        job = status.get("job")
        if (None if job is None else int(job)) != self.job or status.get("secagg") is not None:
            return False
        if status.get("state") not in (ROUND_SELECTED, ROUND_SUBMITTED):
            return False
        deadline = _number(status.get("deadline"))
        if self.server_deadline is None or deadline is None:
            return self.server_deadline is None and deadline is None
        return math.isclose(deadline, self.server_deadline, rel_tol=0.0, abs_tol=1e-3)

    # ------------------------------------------------------------------ the state directory
    def save(self, state_dir: Path) -> None:
        sections = {"data": self.data, "error_feedback": self.error_feedback, "control": self.control}
        header = {"round": self.round, "job": self.job, "key": self.key, "server_deadline": self.server_deadline,
                  "give_up_at": self.give_up_at, "summary": self.summary,
                  "lengths": {k: (None if v is None else len(v)) for k, v in sections.items()},
                  "sha256": hashlib.sha256(self.data).hexdigest()}
        head = json.dumps(header, allow_nan=False).encode("utf-8")
        body = b"".join(v for v in sections.values() if v is not None)
        write_private(state_dir / PENDING_FILE, MAGIC + struct.pack(">Q", len(head)) + head + body)

    @classmethod
    def load(cls, state_dir: Path) -> PendingUpload | None:
        """The pending upload kept in ``state_dir``, None when there is none; PendingFileError when unreadable."""
        path = state_dir / PENDING_FILE
        if not path.is_file():
            return None
        raw = path.read_bytes()
        try:
            if not raw.startswith(MAGIC):
                raise ValueError("not a pending-update file")
            (n,) = struct.unpack_from(">Q", raw, len(MAGIC))
            start = len(MAGIC) + 8
            header = json.loads(raw[start:start + n].decode("utf-8"))
            pos = start + n
            parts: dict[str, bytes | None] = {}
            for name in _SECTIONS:
                length = header["lengths"][name]
                if length is None:
                    parts[name] = None
                    continue
                if not isinstance(length, int) or length < 0 or pos + length > len(raw):
                    raise ValueError(f"section {name} is truncated")
                parts[name], pos = raw[pos:pos + length], pos + length
            if pos != len(raw):
                raise ValueError("trailing bytes")
            data = parts["data"]
            if data is None or hashlib.sha256(data).hexdigest() != header["sha256"]:
                raise ValueError("the update does not match its checksum")
            job = header["job"]
            return cls(int(header["round"]), None if job is None else int(job), str(header["key"]),
                       _number(header["server_deadline"]), float(header["give_up_at"]), data, parts["error_feedback"],
                       parts["control"], dict(header.get("summary") or {}))
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
            raise PendingFileError(f"{path} cannot be read ({exc})") from None

    @staticmethod
    def discard(state_dir: Path) -> None:
        (state_dir / PENDING_FILE).unlink(missing_ok=True)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


__all__ = ["DEADLINE_GRACE", "DEFAULT_HOLD", "PENDING_FILE", "PendingFileError", "PendingUpload"]
