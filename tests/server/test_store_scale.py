"""What every authenticated request writes, kept cheap without weakening it (fl_server/store/sqlite.py):
replay nonces committed in shared transactions (group commit) and ``last_seen`` written at most once per
resolution while readers see the exact value. Real SQLite files; a second, independent connection reads
what is committed."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from fl_server.store.group_commit import GroupCommit
from fl_server.store.last_seen import LastSeenCache
from fl_server.store.sqlite import ClientRow, ServerStore


def _committed(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """What another process would read: a fresh connection sees committed rows only."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _add(store: ServerStore, client_id: str, seen_at: float) -> None:
    store.add_client(ClientRow(client_id, client_id, f"h-{client_id}", 1e12, b"k", None, None, {}, seen_at, seen_at, 0, {}))


def _wait_until(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        time.sleep(0.001)


# ---------------------------------------------------------------------------------------------- GroupCommit
def test_callers_arriving_during_a_write_share_the_next_one_and_each_gets_its_own_result() -> None:
    release = threading.Event()
    batches: list[list[int]] = []

    def write(items: object) -> list[int]:
        batch = list(items)  # type: ignore[call-overload]
        batches.append(batch)
        if len(batches) == 1:
            release.wait(30)  # the first write is slow: everyone else queues behind it
        return [x * 10 for x in batch]

    gc: GroupCommit[int, int] = GroupCommit(write)
    results: dict[int, int] = {}

    def call(x: int) -> None:
        results[x] = gc.submit(x)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    _wait_until(lambda: len(batches) == 1)
    others = [threading.Thread(target=call, args=(x,)) for x in range(1, 16)]
    for t in others:
        t.start()
    _wait_until(lambda: gc.queued == 15)
    release.set()
    for t in [first, *others]:
        t.join()
    assert results == {x: x * 10 for x in range(16)}
    assert batches[0] == [0] and sorted(batches[1]) == list(range(1, 16)) and len(batches) == 2
    assert (gc.batches, gc.items) == (2, 16)


def test_a_failed_write_fails_every_caller_of_its_batch_and_the_next_batch_is_written() -> None:
    fail = [True]

    def write(items: object) -> list[str]:
        if fail[0]:
            raise OSError("disk I/O error")
        return ["ok" for _ in items]  # type: ignore[attr-defined]

    gc: GroupCommit[int, str] = GroupCommit(write)
    with pytest.raises(OSError, match="disk I/O error"):
        gc.submit(1)
    fail[0] = False
    assert gc.submit(2) == "ok"


# ---------------------------------------------------------------------------------------------- LastSeenCache
def test_last_seen_cache_asks_for_a_write_once_per_resolution() -> None:
    cache = LastSeenCache(5.0)
    assert cache.seen("a", 100.0)  # nothing known to be stored: write
    cache.stored("a", 100.0)
    assert not cache.seen("a", 103.0) and cache.newest("a") == 103.0
    assert cache.pending() == {"a": 103.0}
    assert cache.seen("a", 105.0)  # five seconds behind
    cache.stored("a", 105.0)
    assert cache.pending() == {}
    assert not cache.seen("a", 90.0) and cache.newest("a") == 105.0  # an older sighting never moves it back
    cache.forget("a")
    assert cache.newest("a") is None and cache.snapshot() == {}


# ---------------------------------------------------------------------------------------------- the store
def test_a_nonce_is_committed_before_seen_or_add_returns_and_a_reuse_is_refused(tmp_path: Path) -> None:
    store = ServerStore(tmp_path / "server.db")
    try:
        far = time.time() + 600
        assert store.seen_or_add("c1", "n1", far) is False
        assert _committed(tmp_path / "server.db", "SELECT client_id, nonce FROM nonces") == [("c1", "n1")]
        assert store.seen_or_add("c1", "n1", far) is True
        assert store.seen_or_add("c2", "n1", far) is False  # per client
        assert store.seen_or_add("c1", "old", time.time() - 1) is False
        assert store.seen_or_add("c1", "old", far) is False  # an expired row counts as absent
        assert store.seen_or_add("c1", "old", far) is True
    finally:
        store.close()
    reopened = ServerStore(tmp_path / "server.db")
    try:
        assert reopened.seen_or_add("c1", "n1", far) is True
    finally:
        reopened.close()


def test_concurrent_uses_of_one_nonce_admit_exactly_one(tmp_path: Path) -> None:
    store = ServerStore(tmp_path / "server.db")
    try:
        far = time.time() + 600
        answers: list[bool] = []
        lock = threading.Lock()
        start = threading.Barrier(12)

        def use(nonce: str) -> None:
            start.wait()
            seen = store.seen_or_add("c1", nonce, far)
            with lock:
                answers.append(seen)

        threads = [threading.Thread(target=use, args=("same" if i % 2 else f"own-{i}",)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers.count(False) == 6 + 1  # six distinct nonces, and one of the six uses of "same"
        assert _committed(tmp_path / "server.db", "SELECT COUNT(*) FROM nonces")[0][0] == 7
    finally:
        store.close()


def test_last_seen_is_exact_for_readers_written_once_per_resolution_and_flushed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "server.db"
    store = ServerStore(path, last_seen_resolution=5.0)
    try:
        _add(store, "a", 100.0)
        _add(store, "b", 100.0)
        store.touch_client("a", 103.0)
        store.touch_client("b", 98.0)
        stored = dict(_committed(path, "SELECT client_id, last_seen FROM clients"))
        assert stored == {"a": 100.0, "b": 100.0}  # within the resolution: not written
        client = store.client("a")
        assert client is not None and client.last_seen == 103.0  # readers get the newest sighting
        assert store.live_client_ids(102.0) == ["a"]
        assert store.live_client_ids(100.0) == ["a", "b"]
        assert store.live_client_ids(103.5) == []
        store.touch_client("a", 105.0)
        assert dict(_committed(path, "SELECT client_id, last_seen FROM clients"))["a"] == 105.0
        store.touch_client("a", 107.0)
        assert store.revoke_client("b", 108.0)
        assert store.live_client_ids(0.0) == ["a"]
    finally:
        store.close()
    assert dict(_committed(path, "SELECT client_id, last_seen FROM clients"))["a"] == 107.0


def test_an_erased_client_leaves_no_sighting_in_memory(tmp_path: Path) -> None:
    store = ServerStore(tmp_path / "server.db")
    try:
        _add(store, "a", 100.0)
        store.touch_client("a", 101.0)
        store.erase_client("a")
        _add(store, "a", 50.0)  # the same id again: nothing of the erased client's sightings carries over
        client = store.client("a")
        assert client is not None and client.last_seen == 50.0
    finally:
        store.close()


def test_the_open_attempt_is_parsed_again_only_when_its_row_changed_and_every_change_is_seen(tmp_path: Path) -> None:
    from fl_server.store.sqlite import RoundRow

    store = ServerStore(tmp_path / "server.db")
    try:
        assert store.current_open_round() is None
        _add(store, "a", 1.0)
        selected = ["a", "b"]
        rid = store.open_round(RoundRow(0, 1, "open", selected, {c: {"epochs": 1} for c in selected}, 2, 0.0, 100.0, None,
                                        None, probabilities=dict.fromkeys(selected, 0.5)))
        first, second = store.current_open_round(), store.current_open_round()
        assert first is not None and second is not None and first is not second  # each caller its own row object
        assert (first.round_id, first.selected, first.download_bytes) == (rid, ["a", "b"], 0)
        store.add_download_bytes(rid, 1000)
        row = store.current_open_round()
        assert row is not None and row.download_bytes == 1000
        store.erase_client("a", placeholder="erased-1")
        row = store.current_open_round()
        assert row is not None and row.selected == ["erased-1", "b"] and set(row.instructions) == {"erased-1", "b"}
        store.finish_round(rid, "closed", "quorum", 5.0, ["b"])
        assert store.current_open_round() is None
    finally:
        store.close()
