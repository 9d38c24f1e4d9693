"""Which torch device a trainer runs on, from the one spelling the config and the CLIs share.

``cpu``, ``cuda`` (the current GPU), ``cuda:N`` (GPU N) or ``auto`` (the GPU when there is one).
Asking for a GPU that is not there is refused with the reason, never quietly replaced by the CPU:
a run that was meant to be timed on a GPU must not report CPU numbers without saying so.
"""

from __future__ import annotations

import re

import torch

from fl_common.config import ConfigError

DEVICE_PATTERN = re.compile(r"cpu|auto|cuda(:\d{1,3})?")

__all__ = ["DEVICE_PATTERN", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means on this machine (ConfigError when it is not available)."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"device {name!r}: allowed 'cpu', 'cuda', 'cuda:N' (N a GPU index) or 'auto'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: no CUDA GPU is available to torch {torch.__version__} on this machine; "
                              f"use device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (indices from 0)")
    return device
