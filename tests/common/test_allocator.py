"""The allocator settings are applied once, can be switched off, and keep a training step's large
buffers in the heap instead of mapping and unmapping them every step (glibc's own accounting)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What glibc does with a 24 MiB block, the size of a CNN step's larger buffers: under the defaults
# (first use, threshold 128 KiB) it is mmap'd and unmapped on free, so the next step faults every page
# in again; with the settings it comes from the heap and stays there for the next step. Read from
# glibc's own accounting (mallinfo2), which, unlike page-fault counts, transparent huge pages and
# memory pressure do not change.
PROBE = """
import ctypes, sys, torch
from fl_common.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = torch.empty(6 << 20)
mapped = libc.mallinfo2().hblkhd - before
del block
print(applied, mapped, libc.mallinfo2().fordblks)
"""


def _probe(tuning: str) -> tuple[str, int, int]:
    env = {**os.environ, "FL_MALLOC_TUNING": tuning, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    applied, mapped, heap_free = out.stdout.split()
    return applied, int(mapped), int(heap_free)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_keeps_a_freed_step_sized_block_in_the_heap() -> None:
    block = 24 << 20
    applied, mapped, heap_free = _probe("0")
    assert applied == "False" and mapped >= block, "glibc's defaults mmap a 24 MiB block (and unmap it on free)"
    assert heap_free < block
    applied, mapped, heap_free = _probe("1")
    assert applied == "True" and mapped == 0, "tuned: the block comes from the heap"
    assert heap_free >= block, "tuned: the freed block stays in the heap for the next step"


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
