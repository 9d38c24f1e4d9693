"""fl_client/heartbeat.py: the first beat waits ``first_after``; a training that ends sooner sends none."""

from __future__ import annotations

import pytest

from fl_client.api import ServerApi
from fl_client.heartbeat import TrainingHeartbeat


def test_a_heartbeat_stopped_before_its_first_beat_sends_nothing() -> None:
    made: list[ServerApi] = []

    def factory() -> ServerApi:  # the heartbeat's own session: made only for a first beat
        api = ServerApi("http://127.0.0.1:9", max_retries=0)
        made.append(api)
        return api

    beat = TrainingHeartbeat(factory, lambda: None, first_after=3600.0).start()
    assert beat.running
    beat.stop()
    assert beat.join(timeout=10)
    assert not beat.running and made == [] and beat.beats == 0


def test_a_negative_first_after_is_refused() -> None:
    with pytest.raises(ValueError, match="first_after"):
        TrainingHeartbeat(lambda: ServerApi("http://127.0.0.1:9"), lambda: None, first_after=-1.0)
