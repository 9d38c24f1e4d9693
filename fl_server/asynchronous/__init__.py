"""Asynchronous federated training (FedAsync, FedBuff), transport free.

:class:`AsyncCoordinator` is driven by the simulation (``fl_server.simulation.async_runner``,
with a virtual clock and heterogeneous client speeds) and by the REST server (fl_server.rest.async_driver), where
clients upload whenever they finish. Config: ``training_mode: async`` with ``async_algorithm``,
``async_alpha``, ``staleness_function`` / ``staleness_a`` / ``staleness_b``, ``fedbuff_k``,
``async_max_staleness`` and ``async_concurrency``.
"""

from fl_server.asynchronous.coordinator import (
           AsyncCoordinator,
           AsyncOutcome,
           AsyncTask,
           make_rule,
)
from fl_server.asynchronous.records import (
           ASYNC_HISTORY_COLUMNS,
           JOB_COLUMNS,
           AsyncRecord,
           JobRecord,
)
from fl_server.asynchronous.rules import AsyncRule, FedAsyncRule, FedBuffRule, RuleStep
from fl_server.asynchronous.staleness import (
           STALENESS_FUNCTIONS,
           StalenessFunction,
           staleness_weight,
)

__all__ = [
           "ASYNC_HISTORY_COLUMNS",
           "JOB_COLUMNS",
           "STALENESS_FUNCTIONS",
           "AsyncCoordinator",
           "AsyncOutcome",
           "AsyncRecord",
           "AsyncRule",
           "AsyncTask",
           "FedAsyncRule",
           "FedBuffRule",
           "JobRecord",
           "RuleStep",
           "StalenessFunction",
           "make_rule",
           "staleness_weight",
]
