"""fl_client.pending: a finished update round-trips through the state dir, and is matched to its attempt only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fl_client.pending import (
    DEADLINE_GRACE,
    DEFAULT_HOLD,
    PENDING_FILE,
    PendingFileError,
    PendingUpload,
)
from fl_common.protocol.rest import (
    ROUND_NOT_SELECTED,
    ROUND_SELECTED,
    ROUND_SUBMITTED,
    ROUND_WAITING,
    RoundStatus,
)
from fl_common.tensors import wire

NOW = 1_700_000_000.0


def selected(round_number: int = 3, deadline: float | None = NOW + 60.0, job: int | None = None,
             state: str = ROUND_SELECTED) -> dict:
    """A poll reply as the server serializes it (RoundStatus.to_json)."""
    return RoundStatus(state, round_number, round_number - 1, 0.5, deadline, {"round": round_number}, job=job).to_json()


def packed() -> bytes:
    return wire.encode_update(torch.linspace(-1, 1, 257), "int8", "zstd", meta={"num_samples": 40, "metrics": {}})


def test_round_trip_through_the_state_dir(tmp_path: Path) -> None:
    p = PendingUpload.for_status(selected(), "3-abc", packed(), now=NOW, error_feedback=b"\x01" * 33, control=b"ctrl",
                                 summary={"train_loss": 0.25})
    p.save(tmp_path)
    path = tmp_path / PENDING_FILE
    assert path.stat().st_mode & 0o077 == 0, "it holds a training residue: owner only"
    back = PendingUpload.load(tmp_path)
    assert back == p
    vector, meta = wire.decode_update(back.data, 257)
    assert meta["num_samples"] == 40 and vector.shape == (257,)
    PendingUpload.discard(tmp_path)
    assert PendingUpload.load(tmp_path) is None
    PendingUpload.discard(tmp_path)  # idempotent


def test_optional_sections_stay_absent(tmp_path: Path) -> None:
    p = PendingUpload.for_status(selected(job=7), "v3-j7-x", b"payload", now=NOW)
    p.save(tmp_path)
    back = PendingUpload.load(tmp_path)
    assert back is not None and back.error_feedback is None and back.control is None and back.job == 7


def test_it_gives_up_after_the_deadline_and_a_grace(tmp_path: Path) -> None:
    p = PendingUpload.for_status(selected(deadline=NOW + 60.0), "k", b"x", now=NOW)
    assert p.give_up_at == NOW + 60.0 + DEADLINE_GRACE
    assert not p.expired(NOW + 60.0 + DEADLINE_GRACE) and p.expired(NOW + 60.0 + DEADLINE_GRACE + 0.1)
    late = PendingUpload.for_status(selected(deadline=NOW - 5.0), "k", b"x", now=NOW)  # a clock behind the server's
    assert late.give_up_at == NOW + DEADLINE_GRACE
    told = selected(deadline=NOW + 500.0)  # the two clocks disagree: the server's count of seconds wins
    told["deadline_in_s"] = 60.0
    assert PendingUpload.for_status(told, "k", b"x", now=NOW).give_up_at == NOW + 60.0 + DEADLINE_GRACE
    unknown = PendingUpload.for_status(selected(deadline=None), "k", b"x", now=NOW)
    assert unknown.give_up_at == NOW + DEFAULT_HOLD and unknown.server_deadline is None


def test_it_matches_only_the_attempt_it_was_trained_for() -> None:
    p = PendingUpload.for_status(selected(), "k", b"x", now=NOW)
    assert p.is_for(selected())
    assert p.is_for(selected(state=ROUND_SUBMITTED)), "the server holds it: a resend is answered as a duplicate"
    assert not p.is_for(selected(deadline=NOW + 90.0)), "a new attempt of the same round (new deadline)"
    assert not p.is_for(selected(round_number=4))
    assert not p.is_for(selected(job=2))
    assert not p.is_for(selected(state=ROUND_NOT_SELECTED))
    assert not p.is_for(RoundStatus(ROUND_WAITING, None, 3, 0.5).to_json())
    secure = selected()
    secure["secagg"] = {"attempt": 9}
    assert not p.is_for(secure)
    job = PendingUpload.for_status(selected(job=5), "k", b"x", now=NOW)
    assert job.is_for(selected(job=5)) and not job.is_for(selected(job=6)) and not job.is_for(selected())


@pytest.mark.parametrize("damage", ["magic", "truncate", "trailing", "flip", "header"])
def test_a_damaged_file_is_refused_with_its_path(tmp_path: Path, damage: str) -> None:
    PendingUpload.for_status(selected(), "k", packed(), now=NOW, control=b"c" * 10).save(tmp_path)
    path = tmp_path / PENDING_FILE
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[0:2] = b"XX"
    elif damage == "truncate":
        del raw[-5:]
    elif damage == "trailing":
        raw += b"!"
    elif damage == "flip":
        raw[-20] ^= 0xFF  # inside the update: its checksum no longer matches
    else:
        raw[30] = ord("{")  # inside the JSON header
    path.write_bytes(bytes(raw))
    os.chmod(path, 0o600)
    with pytest.raises(PendingFileError, match=PENDING_FILE):
        PendingUpload.load(tmp_path)
