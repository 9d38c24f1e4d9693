"""The allocator settings are applied once, can be switched off, and stop the page-fault churn
that a training step's allocate-free pattern causes under glibc's defaults (counted, not timed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Allocate and free the sizes a CNN step does (tens of MB), then count the minor page faults of
# 30 more cycles: each fault is a page the kernel had to map (and zero) again.
PROBE = """
import resource, sys, torch
from fl_common.allocator import keep_freed_memory
print(keep_freed_memory(), file=sys.stderr)
def cycle():
    a = torch.ones(5 << 20); b = torch.ones(3 << 20); c = torch.ones(1 << 20)
    del a
    d = torch.ones(6 << 20)
    del b, c, d
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tuning: str) -> tuple[int, str]:
    env = {**os.environ, "FL_MALLOC_TUNING": tuning, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip()), out.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_maps_far_fewer_pages_again_than_the_defaults() -> None:
    default, applied_default = _faults("0")
    tuned, applied_tuned = _faults("1")
    assert (applied_default, applied_tuned) == ("False", "True")
    assert tuned < 0.6 * default, (tuned, default)


def test_applied_once_and_the_switch_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    from fl_common import allocator

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setenv(allocator.ENV_SWITCH, "1")
    assert allocator.keep_freed_memory() is False, "the first answer stands for the process"
    monkeypatch.setattr(allocator, "_applied", None)
    expected = sys.platform.startswith("linux")
    assert allocator.keep_freed_memory() is expected
    assert allocator.keep_freed_memory() is expected
