"""Builds the server's DP side from the run configuration: the one place that reads ``dp_mode``.

Why a factory at the edge: the coordinator holds a :class:`~.base.ServerDP` and
never asks which granularity it is; the configuration picks it here, once, and the classes
receive only :class:`~.settings.DPSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fl_common.config import ConfigError, FLConfig

from .base import ClientId, ServerDP
from .client_level import ClientLevelDP
from .sample_level import SampleLevelDP
from .settings import DPSettings

__all__ = ["make_server_dp"]


def make_server_dp(cfg: FLConfig, client_sizes: Mapping[ClientId, int] | None = None, *, seeded_noise: bool = False,
                   planned_sizes: Sequence[int] | None = None) -> ServerDP:
    """The DP side of a run with ``differential_privacy`` on.

    ``client_sizes`` registers known clients (the simulation knows them all up front);
    ``planned_sizes`` are the record counts sample-level σ is calibrated for when clients are
    not known yet (the REST server); client level needs neither. ``seeded_noise`` draws the
    server's noise from the run seed (simulation: reproducible) instead of the OS CSPRNG.
    """
    if not cfg.differential_privacy:
        raise ValueError("the server's differential privacy needs differential_privacy: true")
    settings = DPSettings.from_config(cfg)
    if settings.mode == SampleLevelDP.mode:
        return SampleLevelDP(settings, client_sizes, seeded_noise=seeded_noise, planned_sizes=planned_sizes)
    if settings.mode == ClientLevelDP.mode:
        return ClientLevelDP(settings, client_sizes, seeded_noise=seeded_noise)
    raise ConfigError(f"config key 'dp_mode' has value {settings.mode!r}: allowed {SampleLevelDP.mode!r}, "
                      f"{ClientLevelDP.mode!r}")
