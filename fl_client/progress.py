"""A progress bar over a client's local training: batches of each epoch, on stderr, only on a terminal.

The training loop is ``fl_common.training.LocalTrainer.train``, shared with the simulation, and
has no progress callback. Rather than thread one through the shared code, the bar counts the
model's forward passes in training mode (a forward pre-hook, removed afterwards): one per batch,
one per DP-SGD step. Evaluation runs in eval mode and is not counted.

``enabled=None`` means "when stderr is a terminal" (tqdm's own ``disable=None``): a daemon under
systemd, Docker or a pipe writes no bar, only its log lines.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from tqdm import tqdm

from fl_common.protocol import TrainInstructions


def planned_batches(instr: TrainInstructions, num_samples: int) -> tuple[int | None, int | None]:
    """(total forward passes, passes per epoch) the trainer will make; None where it is not known ahead."""
    if instr.dp_sample_level:
        return (int(instr.dp_steps) or None), None
    per_epoch = max(1, math.ceil(num_samples / instr.batch_size))
    return instr.epochs * per_epoch, per_epoch


def _columns(file: Any) -> int:
    try:
        return os.get_terminal_size(file.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


@contextmanager
def training_progress(model: nn.Module, instr: TrainInstructions, num_samples: int, *, round_number: int,
                      enabled: bool | None = None, file: Any = None) -> Iterator[tqdm]:
    total, per_epoch = planned_batches(instr, num_samples)
    desc = f"round {round_number}"
    out = file or sys.stderr
    # A terminal that reports a 0x0 size (a fresh pty, `docker run -t` before its resize) makes tqdm
    # hide the bar (row 0 is "below" a 0-row screen): assume 80x24 there, follow resizes elsewhere.
    sized = _columns(out) > 0
    bar = tqdm(total=total, desc=desc, unit="batch", file=out, leave=True, dynamic_ncols=sized,
               ncols=None if sized else 80, nrows=None if sized else 24,
               disable=None if enabled is None else not enabled)
    handle = None
    if not bar.disable:
        seen = 0

        def count(module: nn.Module, _inputs: Any) -> None:
            nonlocal seen
            if not module.training:
                return
            seen += 1
            if per_epoch:
                epoch = min(instr.epochs, (seen - 1) // per_epoch + 1)
                bar.set_description(f"{desc} epoch {epoch}/{instr.epochs}", refresh=False)
            bar.update(1)

        handle = model.register_forward_pre_hook(count)
    try:
        yield bar
    finally:
        if handle is not None:
            handle.remove()
        bar.close()


__all__ = ["planned_batches", "training_progress"]
