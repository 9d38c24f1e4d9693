"""The differential-privacy settings the server's DP classes read, and nothing else of the config.

Why a frozen dataclass and not the whole :class:`~fl_common.config.FLConfig`: the DP classes
need 18 of its ~100 fields; naming them here says exactly what a privacy guarantee depends on,
lets a test build one without a full run configuration, and keeps the classes from reaching
for unrelated keys. :meth:`DPSettings.from_config` is the one place that maps config keys to
these fields (the edge); the configuration has validated every value by then.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_common.config import FLConfig

__all__ = ["DPSettings"]


@dataclass(frozen=True)
class DPSettings:
    """What both DP granularities are run with (config key in brackets)."""

    #: "sample" (DP-SGD on every client) or "client" (DP-FedAvg) [dp_mode]
    mode: str
    #: "rdp", "prv" or "pld" [dp_accountant]
    accountant: str
    #: the run's (ε, δ) budget [dp_epsilon, dp_delta]
    epsilon: float
    delta: float
    #: L2 clip: per sample (sample level) or per update, initial when adaptive (client level) [clip_grad_norm]
    clip_norm: float
    #: σ (sample level) or z (client level) given instead of calibrated [dp_noise_multiplier]
    noise_multiplier: float | None
    num_rounds: int
    num_clients: int
    #: clients selected per round (client_selection_ratio x num_clients, at least one)
    clients_per_round: int
    #: the run ends when fewer clients than this can still take part (sample level) [min_clients]
    min_clients: int
    #: derives the seeded noise of the simulation [seed]
    seed: int
    #: sample level: each round's local DP-SGD schedule (q_k = batch / n_k) [batch_size, local_epochs]
    batch_size: int
    local_epochs: int
    #: sample level: rounds per client σ is calibrated for (None: the expected participation) [dp_client_rounds]
    client_rounds: int | None
    #: sample level: "per_client" or "uniform" [dp_noise_calibration]
    noise_calibration: str
    #: "central" (client level: the server adds the noise; sample level: each client's DP-SGD holds on its own) or
    #: "distributed" (each selected client adds a share; only the masked sum carries the whole noise) [dp_noise]
    noise: str
    #: sample level with distributed noise: the Poisson rate every client samples its records at [dp_sample_rate]
    sample_rate: float | None
    #: client level: clip norm follows a quantile of the update norms, and its target [dp_adaptive_clipping,
    #: dp_target_quantile]
    adaptive_clipping: bool
    target_quantile: float

    @classmethod
    def from_config(cls, cfg: FLConfig) -> DPSettings:
        return cls(
            mode=cfg.dp_mode, accountant=cfg.dp_accountant, epsilon=float(cfg.dp_epsilon), delta=float(cfg.dp_delta),
            clip_norm=float(cfg.clip_grad_norm),
            noise_multiplier=None if cfg.dp_noise_multiplier is None else float(cfg.dp_noise_multiplier),
            num_rounds=cfg.num_rounds, num_clients=cfg.num_clients, clients_per_round=cfg.clients_per_round,
            min_clients=cfg.min_clients, seed=cfg.seed, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
            client_rounds=cfg.dp_client_rounds, noise_calibration=cfg.dp_noise_calibration, noise=cfg.dp_noise,
            sample_rate=None if cfg.dp_sample_rate is None else float(cfg.dp_sample_rate),
            adaptive_clipping=cfg.dp_adaptive_clipping, target_quantile=float(cfg.dp_target_quantile),
        )
