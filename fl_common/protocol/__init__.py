"""Messages exchanged by server and client, as plain dataclasses both drivers share."""

from fl_common.protocol.messages import ClientUpdate, TrainInstructions, derive_seed

__all__ = ["ClientUpdate", "TrainInstructions", "derive_seed"]
