"""Local training on a client (shared by the simulation workers and the client daemon)."""

from fl_common.training.device import resolve_device
from fl_common.training.local import EvalResult, LocalTrainer, make_optimizer
from fl_common.training.scaffold import (
    ControlVariates,
    control_delta,
    updated_client_control,
)
from fl_common.training.schedule import learning_rate_at

__all__ = ["ControlVariates", "EvalResult", "LocalTrainer", "control_delta", "learning_rate_at", "make_optimizer",
           "resolve_device", "updated_client_control"]
