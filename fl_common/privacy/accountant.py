"""Privacy accountants behind one small interface.

Why two: the RDP accountant (:mod:`.rdp`, our own code) is fast, dependency-free and the
number most papers quote; the PRV accountant (Gopi, Lee & Wutschitz 2021, "Numerical
Composition of Differential Privacy", via Opacus) composes the privacy-loss distribution
numerically and gives a tighter ε for the same run (e.g. 1.84 instead of 2.10 for σ = 1,
q = 0.01, 1000 steps, δ = 1e-5). Callers pick one by name with :func:`make_accountant`.

Why the history is the state: an accountant is a list ``[(noise_multiplier, sample_rate,
steps), ...]`` of Poisson-subsampled Gaussian phases; ε is a pure function of it. So a run
can be persisted, replayed and audited from the history alone.

Library choice for the tight accountant: Opacus' PRV accountant (``opacus>=1.5``). Google's
``dp-accounting`` PLD accountant was the other candidate, but ``dp-accounting 0.6.0`` pins
``attrs<24`` and would downgrade the ``attrs`` other installed packages use; ``opacus``
installs without touching torch or anything else. Opacus is imported lazily, so the RDP
accountant works without it.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Iterable
from typing import Protocol, cast, runtime_checkable

import numpy as np

from .rdp import DEFAULT_ORDERS, compute_rdp, rdp_to_epsilon
from .validation import check_noise_multiplier, check_sample_rate, check_steps

__all__ = [
    "HistoryEntry",
    "Accountant",
    "RDPAccountant",
    "PRVAccountant",
    "make_accountant",
    "ACCOUNTANT_KINDS",
    "MAX_PRV_GRID_POINTS",
    "prv_grid_points",
]

log = logging.getLogger("fl_common.privacy.accountant")

#: (noise_multiplier σ, sample_rate q, steps)
HistoryEntry = tuple[float, float, int]


@runtime_checkable
class Accountant(Protocol):
    """What the trainer, the calibration and the ledger need from an accountant."""

    mechanism: str

    @property
    def history(self) -> list[HistoryEntry]:
        """The composed phases, consecutive identical (σ, q) merged."""
        ...

    def compose(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Adds ``steps`` Poisson-subsampled Gaussian steps with these parameters."""
        ...

    def epsilon(self, delta: float) -> float:
        """An upper bound on ε at this δ for everything composed so far (0 if nothing)."""
        ...

    def copy(self) -> Accountant:
        """An independent accountant with the same history (for what-if questions)."""
        ...


class _HistoryAccountant:
    """Shared history handling: validation at the boundary, merging of repeated phases."""

    mechanism = "base"

    def __init__(self, history: Iterable[HistoryEntry] = ()) -> None:
        self._history: list[HistoryEntry] = []
        for noise_multiplier, sample_rate, steps in history:
            self.compose(noise_multiplier, sample_rate, steps)

    @property
    def history(self) -> list[HistoryEntry]:
        return list(self._history)

    def compose(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_steps(steps)
        if n == 0:
            return
        if self._history and self._history[-1][:2] == (sigma, q):
            last = self._history.pop()
            self._history.append((sigma, q, last[2] + n))
        else:
            self._history.append((sigma, q, n))
        self._on_compose(sigma, q, n)

    def _on_compose(self, sigma: float, q: float, steps: int) -> None:
        """Hook for incremental state (the RDP vector)."""

    def copy(self) -> _HistoryAccountant:
        return copy.deepcopy(self)

    def __len__(self) -> int:
        return len(self._history)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(history={self._history!r})"


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in the open interval (0, 1); got {delta!r}")
    return float(delta)


class RDPAccountant(_HistoryAccountant):
    """RDP accountant (MTZ 2019 subsampled-Gaussian RDP, Balle et al. 2020 Thm 21 conversion).

    The RDP vector is kept incrementally, so composing a round and asking for ε is O(#orders).
    """

    mechanism = "rdp"

    def __init__(self, history: Iterable[HistoryEntry] = (), orders: Iterable[float] = DEFAULT_ORDERS) -> None:
        self.orders: tuple[float, ...] = tuple(float(a) for a in orders)
        if not self.orders or min(self.orders) <= 1.0:
            raise ValueError(f"orders must be a non-empty list of values > 1; got {self.orders!r}")
        self._rdp = np.zeros(len(self.orders))
        super().__init__(history)

    def _on_compose(self, sigma: float, q: float, steps: int) -> None:
        self._rdp = self._rdp + compute_rdp(sigma, q, steps, self.orders)

    @property
    def rdp(self) -> np.ndarray:
        """The composed RDP at each of :attr:`orders`."""
        out: np.ndarray = self._rdp.copy()
        return out

    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        """(ε, optimal order α); α is NaN when nothing has been composed."""
        delta = _check_delta(delta)
        if not self._history:
            return 0.0, float("nan")
        return rdp_to_epsilon(self.orders, [float(v) for v in self._rdp], delta)

    def epsilon(self, delta: float) -> float:
        return self.get_privacy_spent(delta)[0]


class PRVAccountant(_HistoryAccountant):
    """Privacy-random-variable accountant (Gopi et al. 2021) through Opacus.

    ``epsilon`` returns Opacus' ``eps_upper``: the ε computed at δ − δ_error plus the
    discretisation error ``eps_error``, a guaranteed upper bound, not an estimate.

    Because that bound carries an additive ``eps_error`` (0.01 by default), for very small ε
    the RDP bound can be lower; both are valid upper bounds, so with ``use_rdp_if_tighter``
    (default) the smaller one is returned. If Opacus' numerics fail for an extreme history,
    the RDP bound is returned with a warning rather than crashing a training run.
    """

    mechanism = "prv"

    def __init__(
        self,
        history: Iterable[HistoryEntry] = (),
        eps_error: float = 0.01,
        delta_error: float | None = None,
        use_rdp_if_tighter: bool = True,
    ) -> None:
        if not (eps_error > 0 and math.isfinite(eps_error)):
            raise ValueError(f"eps_error must be a finite number > 0; got {eps_error!r}")
        self.eps_error = float(eps_error)
        self.delta_error = delta_error
        self.use_rdp_if_tighter = use_rdp_if_tighter
        super().__init__(history)

    def epsilon(self, delta: float) -> float:
        delta = _check_delta(delta)
        if not self._history:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in self._history):
            return math.inf
        rdp_eps = RDPAccountant(self._history).epsilon(delta)
        if self.use_rdp_if_tighter and rdp_eps <= self.eps_error:
            # The PRV bound carries + eps_error, so it cannot beat an RDP bound this small (unless by a
            # rounding hair, and then this is the looser of two valid bounds). Skipping it matters: for a huge
            # noise multiplier Opacus' domain sizing evaluates fractional-order RDP series that take ~10 s.
            return rdp_eps
        try:
            prv_eps = self._prv_epsilon(delta)
        except (RuntimeError, ValueError, ArithmeticError) as exc:
            warnings.warn(f"PRV accounting failed ({exc}); reporting the RDP bound instead", RuntimeWarning, stacklevel=2)
            log.warning("PRV accounting failed (%s); reporting the RDP bound instead", exc)
            return rdp_eps
        return min(prv_eps, rdp_eps) if self.use_rdp_if_tighter else prv_eps

    def _prv_epsilon(self, delta: float) -> float:
        try:
            from opacus.accountants import PRVAccountant as _OpacusPRV
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the PRV accountant needs the 'opacus' package (pip install 'opacus>=1.5'); "
                "use make_accountant('rdp') to account without it"
            ) from exc
        inner = _OpacusPRV()
        inner.history = [(sigma, q, steps) for sigma, q, steps in self._history]
        delta_error = self.delta_error if self.delta_error is not None else delta / 1000.0
        points = prv_grid_points(self._history, self.eps_error, delta_error)
        if points > MAX_PRV_GRID_POINTS:
            # Opacus would allocate arrays of this many float64s (2.6 TiB for sigma = 0.001) and take minutes:
            # refuse the numerics, and the caller reports the RDP bound, which is also a valid upper bound.
            raise ArithmeticError(f"the PRV grid would need {points:.3g} points (limit {MAX_PRV_GRID_POINTS:.0e}): "
                                  f"noise multiplier too small or too many steps for numerical composition")
        with warnings.catch_warnings():
            # q = 1 makes Opacus evaluate log(0) inside an np.where branch it then discards,
            # and its domain-size heuristic warns about RDP orders; neither affects the result.
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            eps = float(inner.get_epsilon(delta, eps_error=self.eps_error, delta_error=delta_error))
        if math.isnan(eps):
            raise ArithmeticError("PRV accountant returned NaN")
        return max(0.0, eps)


#: largest discretisation grid the PRV accountant builds (float64 points per array): about 32 MB, a few
#: seconds; beyond it the RDP bound is reported instead (with a warning saying why)
MAX_PRV_GRID_POINTS = 4_000_000


def prv_grid_points(history: Iterable[HistoryEntry], eps_error: float, delta_error: float) -> float:
    """The number of points of Opacus' PRV grid for this history, computed the way Opacus sizes it
    (a safe domain [-L, L] from RDP, a mesh of eps_error / sqrt(steps log(12 / delta_error) / 2)),
    without building it."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    entries = list(history)
    prvs = [PoissonSubsampledGaussianPRV(sample_rate=q, noise_multiplier=sigma) for sigma, q, _ in entries]
    steps = [int(n) for _, _, n in entries]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        domain = compute_safe_domain_size(prvs=prvs, max_self_compositions=steps, eps_error=eps_error,
                                          delta_error=delta_error)
    mesh = eps_error / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2.0 * float(domain) / mesh


ACCOUNTANT_KINDS: dict[str, type[_HistoryAccountant]] = {
    "rdp": RDPAccountant,
    "prv": PRVAccountant,
    # "pld" is accepted as an alias: the PRV accountant numerically composes the privacy-loss
    # distribution, i.e. it is a PLD-style accountant (Opacus' implementation of Gopi et al.).
    "pld": PRVAccountant,
}


def make_accountant(kind: str = "rdp", history: Iterable[HistoryEntry] = (), **kwargs: object) -> Accountant:
    """``make_accountant("rdp" | "pld" | "prv", history=[(σ, q, steps), ...])``."""
    try:
        cls = ACCOUNTANT_KINDS[kind.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANT_KINDS)}; got {kind!r}") from None
    return cast("Accountant", cls(history, **kwargs))  # kwargs: each kind's own options (e.g. eps_error)
