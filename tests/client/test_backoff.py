"""fl_client.backoff: delays grow, are capped and jittered; an outage is logged once, its end once."""

from __future__ import annotations

import logging
import random

import pytest

from fl_client.backoff import Backoff, ServerWait


def test_delays_double_up_to_the_cap_and_stay_in_the_upper_half() -> None:
    b = Backoff(1.0, 8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    for d, c in zip(delays, ceilings, strict=False):
        assert c / 2 <= d <= c
    b.reset()
    assert b.next_delay() <= 1.0


def test_jitter_spreads_clients_that_failed_together() -> None:
    firsts = {round(Backoff(2.0, 30.0, rng=random.Random(seed)).next_delay(), 6) for seed in range(20)}
    assert len(firsts) == 20


def test_a_huge_failure_count_does_not_overflow() -> None:
    b = Backoff(0.5, 30.0)
    b.failures = 10_000
    assert 15.0 <= b.next_delay() <= 30.0


@pytest.mark.parametrize("base,cap", [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_bad_parameters_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(base, cap)


class FakeTime:
    """A clock that moves only when slept on: the waits are computed, never slept."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    logger = logging.getLogger("test.backoff")
    wait = ServerWait("poll", t.sleep, logger, base=1.0, cap=4.0, clock=t.clock, rng=random.Random(0))
    with caplog.at_level(logging.INFO, logger="test.backoff"):
        for _ in range(6):
            assert wait.failed(ConnectionError("refused"))
        assert wait.down
        wait.succeeded()
        wait.succeeded()  # nothing to report twice
    messages = [r.getMessage() for r in caplog.records]
    assert sum("server unreachable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1
    assert f"after {sum(t.slept):.0f} s" in messages[-1]
    assert len(t.slept) == 6 and max(t.slept) <= 4.0
    assert not wait.down and wait.outages == 1 and wait.backoff.failures == 0


def test_no_wait_goes_past_the_deadline() -> None:
    t = FakeTime()
    wait = ServerWait("upload", t.sleep, logging.getLogger("test.backoff"), base=1.0, cap=30.0, clock=t.clock)
    until = t.now + 10.0
    tries = 0
    while wait.failed(ConnectionError("refused"), until=until):
        tries += 1
        assert t.now <= until
    assert t.now == pytest.approx(until)
    assert tries >= 4  # 1, 2, 4, then what is left of the 10 s


def test_a_second_outage_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    wait = ServerWait("poll", t.sleep, logging.getLogger("test.backoff"), clock=t.clock)
    with caplog.at_level(logging.WARNING, logger="test.backoff"):
        wait.failed(OSError("down"))
        wait.succeeded()
        wait.failed(OSError("down again"))
    assert [r.getMessage().count("server unreachable") for r in caplog.records] == [1, 1]
    assert wait.outages == 2
