"""Group commit: callers that arrive while one transaction is being made durable share the next one.

Why: with ``synchronous=FULL`` every SQLite commit waits for an fsync (milliseconds on a real disk), and
the server records a replay nonce for every signed request. One commit per request caps the whole server
at a few hundred requests per second, all of them queued behind each other's fsync. Here the first
caller becomes the *leader*: it takes every item queued so far and writes them in one transaction;
callers that arrive meanwhile queue up and the next leader (one of them) writes theirs. Nobody returns
before the transaction holding its item has committed, so durability is exactly that of one commit
per item; the fsyncs are shared. With one caller at a time it is one transaction per item, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``submit(item)`` returns ``write(batch)``'s result for ``item`` once the batch holding it is written.

    ``write`` receives the items in arrival order and must return one result per item, in order; it runs
    in one caller's thread, outside this object's lock, and never twice at once. If it raises, every
    caller of that batch gets the exception (nothing of the batch may be taken as written)."""

    def __init__(self, write: Callable[[Sequence[T]], Sequence[R]]) -> None:
        self._write = write
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Slot[T, R]] = []
        self._writing = False
        #: batches and items written (monitoring, tests)
        self.batches = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Items waiting for the next batch (tests, monitoring)."""
        with self._cond:
            return len(self._queue)

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._cond:
            self._queue.append(slot)
            while not slot.done and self._writing:
                self._cond.wait()
            if slot.done:
                return self._answer(slot)
            batch, self._queue = self._queue, []  # this caller leads: its own slot is in the batch
            self._writing = True
        results: Sequence[R] = ()
        error: BaseException | None = None
        try:
            results = self._write([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"group commit: {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # handed to every caller of the batch, re-raised in each
            error = exc
        with self._cond:
            for i, s in enumerate(batch):
                s.done = True
                if error is None:
                    s.result = results[i]
                else:
                    s.error = error
            self._writing = False
            self.batches += 1
            self.items += len(batch)
            self._cond.notify_all()
        return self._answer(slot)

    @staticmethod
    def _answer(slot: _Slot[T, R]) -> R:
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set with done when no error
