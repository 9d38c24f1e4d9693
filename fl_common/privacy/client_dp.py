"""The DP pieces a federated client runs, and the arithmetic both sides must agree on.

Two granularities, one module:

* **Sample-level** (each client runs DP-SGD on its own records): :func:`sample_level_schedule`
  fixes the Poisson rate q_k = batch / n_k and the number of local steps, :func:`dp_sgd_train`
  runs exactly those steps (Poisson batches, per-sample clipping to C, N(0, (σC)²) on the sum,
  division by the expected batch q·n). The server calls the same :func:`sample_level_schedule`
  to plan and account, so the steps the client takes and the steps the accountant composes are
  one number, not two computations that could drift apart.
* **Client-level** (DP-FedAvg, McMahan et al. 2018): the client clips its whole update to C
  (:func:`clip_update`) and, with distributed noise, adds its share N(0, (zC)²/m)
  (:func:`distributed_noise_std`); the server adds the rest (central noise) to the sum.

Calibration for sample-level DP needs the *worst* client, not one (q, steps) pair:
:func:`calibrate_worst_case` returns σ such that every listed (q, steps) phase stays within ε.

Nothing here imports the server; all of it is transport-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .accountant import make_accountant
from .calibration import calibrate_noise_multiplier
from .dpsgd import dp_sgd_gradients, poisson_batches
from .losses import per_example_cross_entropy
from .mechanisms import clip_l2
from .validation import check_clip_norm, check_noise_multiplier, check_num_records

__all__ = [
    "DP_MODES",
    "SAMPLING_NOTES",
    "sample_level_schedule",
    "DPTrainStats",
    "dp_sgd_train",
    "clip_update",
    "distributed_noise_std",
    "adaptive_count_noise_std",
    "worst_case_epsilon",
    "calibrate_worst_case",
]

DP_MODES = ("sample", "client")

#: What summary.json says about sampling, per mode (the analysis assumes Poisson sampling).
SAMPLING_NOTES = {
    "sample": (
        "records: Poisson sampling with q_k = batch_size / n_k in every local DP-SGD step, as the "
        "subsampled-Gaussian accountant assumes; clients: fixed-size uniform selection, no amplification "
        "by client selection is claimed (each client is accounted over the rounds it actually took part in)"
    ),
    "client": (
        "clients: Poisson sampling, each of the num_clients clients in a round independently with q = "
        "clients_per_round / num_clients (an offline client drawn does not take part), the mechanism the RDP/PRV "
        "analysis of the subsampled Gaussian assumes; the mean divides by the expected count, and every round "
        "is released whatever the draw (empty included)"
    ),
}


# --------------------------------------------------------------------------- sample level
def sample_level_schedule(num_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(q, steps) of one round of local DP-SGD on a client with ``num_samples`` records.

    q = batch_size / n (capped at 1: a client smaller than a batch uses every record every
    step, with no amplification), and ``epochs`` expected passes of round(1 / q) steps each
    (at least one), as Opacus' Poisson data loader does.
    """
    n = check_num_records(num_samples, "num_samples")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1; got {batch_size!r}, {epochs!r}")
    q = min(1.0, batch_size / n)
    per_epoch = max(1, round(n / batch_size)) if q < 1.0 else 1
    return q, int(epochs) * int(per_epoch)


@dataclass(frozen=True)
class DPTrainStats:
    """What local DP-SGD did. ``fraction_clipped`` is NOT private: log it locally, never send it."""

    steps: int
    sample_rate: float
    records_used: int
    fraction_clipped: float


def dp_sgd_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    after_gradients: Callable[[], None] | None = None,
) -> DPTrainStats:
    """``steps`` DP-SGD steps on (x, y): exactly the mechanism the accountant composes.

    Each step draws a Poisson batch (every record independently with probability q; empty
    batches are kept), writes ``(Σ clip_C(g_i) + N(0, (σC)²)) / (q·n)`` into ``.grad`` and steps
    the optimizer. ``after_gradients`` may change ``.grad`` from data-independent quantities only
    (the FedProx term μ(w − w_global) is one): anything after the noise is post-processing.
    ``generator`` drives both the sampling and the noise; it must live on the model's device.
    """
    sigma = check_noise_multiplier(noise_multiplier)
    if sigma <= 0.0:
        raise ValueError("sample-level DP-SGD needs dp_noise_multiplier > 0 (0 means no privacy)")
    clip = check_clip_norm(max_grad_norm)
    n = int(y.shape[0])
    expected = sample_rate * n
    used = 0
    clipped = 0.0
    for idx in poisson_batches(n, sample_rate, generator, num_batches=steps):
        idx = idx.to(x.device)
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        optimizer.zero_grad(set_to_none=True)
        stats = dp_sgd_gradients(model, per_example_cross_entropy, xb, yb, clip, sigma, generator, expected)
        if after_gradients is not None:
            after_gradients()
        optimizer.step()
        used += stats.batch_size
        clipped += stats.fraction_clipped * stats.batch_size
    return DPTrainStats(steps=int(steps), sample_rate=float(sample_rate), records_used=used,
                        fraction_clipped=clipped / used if used else 0.0)


# --------------------------------------------------------------------------- client level
def clip_update(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """The whole update clipped to L2 ≤ C (float64-checked, see :func:`clip_l2`), and its norm.

    The norm is not private: only the bit ``norm <= C`` may leave the client, and only for
    adaptive clipping, where the server noises the count of those bits.
    """
    return clip_l2(delta, clip_norm)


def distributed_noise_std(noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """Per-coordinate std each of ``num_clients`` adds so that the sum carries N(0, (zC)²)."""
    z = check_noise_multiplier(noise_multiplier)
    c = check_clip_norm(clip_norm, "clip_norm")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1; got {num_clients!r}")
    return z * c / math.sqrt(num_clients)


def adaptive_count_noise_std(noise_multiplier: float, expected_clients: int, max_inflation: float = 1.1) -> float:
    """σ_b for the noised count of unclipped bits (Andrew et al. 2021).

    Andrew et al. suggest σ_b = m / 20. Paying for the count raises the update's own noise
    multiplier from z to z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (see ``adaptive_clip_noise_multiplier``),
    which needs 2σ_b > z; we take the larger of m / 20 and the σ_b that keeps z_Δ ≤
    ``max_inflation`` · z, so small cohorts with large z still get a usable split.
    """
    z = check_noise_multiplier(noise_multiplier)
    if z <= 0:
        raise ValueError("adaptive clipping needs a noise multiplier > 0")
    if not max_inflation > 1.0:
        raise ValueError(f"max_inflation must be > 1; got {max_inflation!r}")
    needed = z / (2.0 * math.sqrt(1.0 - max_inflation**-2))
    return max(expected_clients / 20.0, needed)


# --------------------------------------------------------------------------- calibration
Phase = tuple[float, int]  # (sample_rate, steps)


def worst_case_epsilon(noise_multiplier: float, phases: Iterable[Phase], delta: float, accountant: str = "rdp") -> float:
    """max over phases of ε(σ, q, steps): the ε of the worst-off client."""
    return max((make_accountant(accountant, [(noise_multiplier, q, s)]).epsilon(delta) for q, s in phases), default=0.0)


def _pareto(phases: Iterable[Phase]) -> list[Phase]:
    """Drops phases dominated by another with q' ≥ q and steps' ≥ steps (ε is monotone in both)."""
    unique = sorted({(float(q), int(s)) for q, s in phases}, key=lambda p: (-p[0], -p[1]))
    front: list[Phase] = []
    best_steps = -1
    for q, s in unique:
        if s > best_steps:
            front.append((q, s))
            best_steps = s
    return front


def calibrate_worst_case(
    target_epsilon: float,
    delta: float,
    phases: Sequence[Phase],
    accountant: str = "rdp",
    tolerance: float = 0.01,
    shortlist: int = 3,
) -> tuple[float, Phase]:
    """σ such that every phase's ε ≤ target, and the binding one's ≥ (1 − tolerance)·target.

    Returns (σ, the binding phase). ε(σ, q, steps) is monotone in σ, q and steps, so dominated
    phases are dropped first, and raising σ for one phase keeps every other within the target.
    Under RDP (cheap) every remaining phase is checked: σ is calibrated for the phase worst at
    σ = 1 and raised for any phase still above the target. Another accountant (PRV, ~0.1–0.3 s
    per ε) checks only the ``shortlist`` phases worst under RDP at that σ; the per-client budget
    enforcement, not the calibration, is what guarantees the budget of every client.
    """
    front = _pareto(phases)
    if not front:
        raise ValueError("no (sample_rate, steps) phases to calibrate for")

    def eps(kind: str, sigma: float, phase: Phase) -> float:
        return make_accountant(kind, [(sigma, phase[0], phase[1])]).epsilon(delta)

    def calibrate(phase: Phase, kind: str) -> float:
        return calibrate_noise_multiplier(target_epsilon, delta, phase[0], phase[1], kind, tolerance)

    def settle(candidates: list[Phase], kind: str) -> tuple[float, Phase]:
        binding = candidates[0]
        sigma = calibrate(binding, kind)
        for phase in candidates[1:]:
            if eps(kind, sigma, phase) > target_epsilon:
                binding, sigma = phase, calibrate(phase, kind)
        return sigma, binding

    sigma, binding = settle(sorted(front, key=lambda p: -eps("rdp", 1.0, p)), "rdp")
    if accountant.lower() == "rdp":
        return sigma, binding
    return settle(sorted(front, key=lambda p: -eps("rdp", sigma, p))[:shortlist], accountant)
