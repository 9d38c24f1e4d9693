"""fl_server/rest/memory.py: a round's heap trim runs after the close, on its own thread, never twice at once."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fl_server.rest.memory import ReleaseAfterRound
from fl_server.store import RoundRecord

RECORD = RoundRecord(round=1, test_accuracy=None, test_loss=None, train_loss=0.5, clients=3, seconds=1.0, bytes=10)


class Trims:
    """Counts trims; ``gate`` holds each one until the test lets it go."""

    def __init__(self) -> None:
        self.count = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        self.threads: list[str] = []

    def __call__(self) -> bool:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.gate.wait(10)
        self.count += 1
        return True


def _close(observer: ReleaseAfterRound) -> None:
    observer.round_closed(RECORD, reason="quorum", selected=3, arrived=3, close_seconds=0.01)


def test_the_trim_runs_after_the_close_on_its_own_thread_one_at_a_time() -> None:
    trims = Trims()
    observer = ReleaseAfterRound(delay=0.0, release=trims)
    _close(observer)  # returns without trimming: the close does not wait for it
    assert trims.started.wait(10)
    assert trims.threads == ["fl-malloc-trim"]
    trims.gate.set()
    _close(observer)  # the first one is running or done: a new one is due
    observer.round_aborted(2, arrived=0)


def test_closes_while_a_trim_is_due_share_it_and_the_end_of_the_run_trims_at_once() -> None:
    trims = Trims()
    trims.gate.set()
    observer = ReleaseAfterRound(delay=3600.0, release=trims)
    _close(observer)
    _close(observer)
    observer.round_aborted(3, arrived=1)
    assert trims.count == 0  # one trim due, an hour from now
    run: Any = None  # the end of the run reads nothing of it
    observer.run_finished(run)
    assert trims.count == 1 and trims.threads == [threading.current_thread().name]  # at once, the due one cancelled


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="trim delay"):
        ReleaseAfterRound(delay=-1.0)
