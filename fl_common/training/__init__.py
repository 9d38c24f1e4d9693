"""Local training on a client (shared by the simulation workers and the client daemon)."""

from fl_common.training.local import EvalResult, LocalTrainer, make_optimizer
from fl_common.training.schedule import learning_rate_at

__all__ = ["EvalResult", "LocalTrainer", "make_optimizer", "learning_rate_at"]
