"""Differential privacy for the federated runs: accounting, calibration, mechanisms, DP-SGD.

Why one package: every ε this project prints must come from here, from an accountant that is
tested against closed forms and reference values; the trainer and the coordinator only call
these functions and never re-derive privacy arithmetic themselves.

* :mod:`.rdp` — RDP of the Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019) and the
  RDP → (ε, δ) conversion of Balle et al. 2020 (the one Opacus uses).
* :mod:`.accountant` — ``Accountant`` protocol, ``RDPAccountant``, ``PRVAccountant`` (Opacus'
  PRV, tighter), ``make_accountant("rdp" | "pld" | "prv")``.
* :mod:`.calibration` — σ for a target (ε, δ) by bisection.
* :mod:`.ledger` — ``PrivacyLedger``: budget, per-round history, refusal, JSON persistence.
* :mod:`.mechanisms` — L2 clipping, Gaussian/Laplace noise, adaptive clipping.
* :mod:`.histograms` — a client's label histogram under pure ε-DP (Laplace), for client selection.
* :mod:`.dpsgd` — sample-level DP-SGD: per-sample norms and clipped sums from layer hooks (:mod:`.ghost`,
  Linear/Conv2d/GroupNorm/LayerNorm) with torch.func per-sample gradients as the general fallback.
* :mod:`.losses` — ``per_example_cross_entropy``, the loss DP-SGD differentiates per example.
* :mod:`.client_dp` — what a client runs (DP-SGD rounds, update clipping, distributed noise) and the
  arithmetic client and server share (the per-round schedule, worst-case calibration).
* :mod:`.validation` — parameter checks with messages that name what is wrong.

The per-sample gradient benchmark lives in ``benchmarks/bench_per_sample.py``, outside the package.

Transport-free: nothing here imports flask, requests, ``fl_server`` or ``fl_client``.
"""

from .accountant import ACCOUNTANT_KINDS, Accountant, HistoryEntry, PRVAccountant, RDPAccountant, make_accountant
from .calibration import calibrate_noise_multiplier
from .dpsgd import (
    DPIncompatibleModelError,
    DPSGDStepStats,
    check_dp_compatible,
    convert_batchnorm_to_groupnorm,
    dp_sgd_gradients,
    per_sample_gradients,
    poisson_batches,
)
from .ghost import GhostUnsupportedError
from .histograms import private_label_histogram
from .ledger import PrivacyLedger, RoundRecord
from .losses import per_example_cross_entropy
from .mechanisms import (
    AdaptiveClipState,
    adaptive_clip_noise_multiplier,
    add_gaussian_noise,
    clip_l2,
    gaussian_noise,
    laplace_histogram,
    laplace_noise,
    secure_generator,
)
from .rdp import DEFAULT_ORDERS, compose_rdp, compute_rdp, rdp_subsampled_gaussian, rdp_to_epsilon, rdp_to_epsilon_classic
from .validation import validate_dp_params

__all__ = [
    "ACCOUNTANT_KINDS",
    "GhostUnsupportedError",
    "Accountant",
    "HistoryEntry",
    "PRVAccountant",
    "RDPAccountant",
    "make_accountant",
    "calibrate_noise_multiplier",
    "DPIncompatibleModelError",
    "DPSGDStepStats",
    "check_dp_compatible",
    "convert_batchnorm_to_groupnorm",
    "dp_sgd_gradients",
    "per_sample_gradients",
    "poisson_batches",
    "private_label_histogram",
    "PrivacyLedger",
    "RoundRecord",
    "per_example_cross_entropy",
    "AdaptiveClipState",
    "adaptive_clip_noise_multiplier",
    "add_gaussian_noise",
    "clip_l2",
    "gaussian_noise",
    "laplace_histogram",
    "laplace_noise",
    "secure_generator",
    "DEFAULT_ORDERS",
    "compose_rdp",
    "compute_rdp",
    "rdp_subsampled_gaussian",
    "rdp_to_epsilon",
    "rdp_to_epsilon_classic",
    "validate_dp_params",
]
