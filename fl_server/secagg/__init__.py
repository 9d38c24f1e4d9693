"""Secure aggregation on the server: the ``Aggregator`` adapter the coordinator wraps a round in.

The protocol itself (messages, client and server state machines) is transport free and lives in
``fl_common.secagg``; this package only connects it to the coordinator. The drivers play the
clients' side: ``fl_server.simulation.secagg`` in process, the REST driver over HTTP.
"""

from fl_server.secagg.aggregator import (
    CLEAR_METRICS,
    MaskedUpdate,
    SecAggRoundStats,
    SecureAggregator,
    open_secure_round,
    plan_round_params,
    quantization_bound,
    secagg_mode,
)

__all__ = [
    "CLEAR_METRICS",
    "MaskedUpdate",
    "SecAggRoundStats",
    "SecureAggregator",
    "open_secure_round",
    "plan_round_params",
    "quantization_bound",
    "secagg_mode",
]
