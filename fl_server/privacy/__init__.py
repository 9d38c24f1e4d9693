"""Server-side differential privacy: calibration up front, central noise, the ledger, the budget.

The coordinator owns one :class:`ServerDP` when ``differential_privacy`` is on
(:func:`make_server_dp` picks the granularity from ``dp_mode``) and calls it at four points of
a round; it never sees HTTP or processes, so the simulation and the REST server get the same
guarantee from the same code:

1. construction — σ is calibrated from (dp_epsilon, dp_delta, num_rounds) as Opacus'
   ``make_private_with_epsilon`` does, unless ``dp_noise_multiplier`` overrides it; the
   expected final ε is computed and logged;
2. :meth:`ServerDP.eligible` before a round — the budget is checked *before* anything is
   spent: :class:`BudgetExhausted` ends the run with a message instead of crossing it;
3. :meth:`ServerDP.begin_round` / :meth:`~ServerDP.configure` / :meth:`~ServerDP.receive` —
   per-client instructions (σ, C, q, steps) and the checks on what comes back;
4. :meth:`ServerDP.end_round` — the spending is recorded, ε after the round returned.

Two granularities, one class each:

* :class:`SampleLevelDP` (``dp_mode: sample``, the default) — record-level DP-SGD on every
  client, each client accounted on its own (:mod:`.sample_level`);
* :class:`ClientLevelDP` (``dp_mode: client``) — DP-FedAvg, noise on the sum of clipped
  updates (:mod:`.client_level`, :class:`DPFedAvgAggregator`).

Both read a :class:`DPSettings` (the DP fields of the configuration, built at the edge), not
the whole configuration, and share one checkpoint format (:meth:`ServerDP.state_dict`).

Randomness: a deployment server draws its noise from the OS CSPRNG; the simulation passes
``seeded_noise=True`` so that runs (and resumed runs) are reproducible, and says so in the
summary.
"""

from .aggregator import DPFedAvgAggregator
from .base import STATE_VERSION, BudgetExhausted, ClientId, DPRound, ServerDP
from .client_level import ADAPTIVE_CLIP_LEARNING_RATE, ClientLevelDP
from .factory import make_server_dp
from .sample_level import SampleLevelDP
from .settings import DPSettings

__all__ = [
    "ADAPTIVE_CLIP_LEARNING_RATE",
    "STATE_VERSION",
    "BudgetExhausted",
    "ClientId",
    "ClientLevelDP",
    "DPFedAvgAggregator",
    "DPRound",
    "DPSettings",
    "SampleLevelDP",
    "ServerDP",
    "make_server_dp",
]
