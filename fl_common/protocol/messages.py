"""What a round sends to a client and what the client sends back.

These are the same objects in simulation and deployment: the REST driver serialises them with
``to_json``/``from_json`` (the update vector travels separately, as a binary payload).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

PROTOCOL_VERSION = 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (run seed, round, client id, purpose...).

    Every random choice in a run is derived this way instead of drawn from a shared stateful
    generator, so a run resumed from a checkpoint, a client trained in another process and a
    client daemon on another machine all make exactly the same choices.
    """
    ints: list[int] = []
    for p in parts:
        if isinstance(p, (int, np.integer)):
            ints.append(int(p) & 0xFFFFFFFF)
            ints.append((int(p) >> 32) & 0xFFFFFFFF)
        else:
            digest = hashlib.sha256(str(p).encode("utf-8")).digest()
            ints.extend(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0]) >> 1


@dataclass(frozen=True)
class TrainInstructions:
    """The round configuration a selected client trains with (the strategy may adjust it per client)."""

    round: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0
    # Sample-level DP-SGD (all off by default): Poisson rate q and step count are planned by the
    # server from the client's record count (fl_common.privacy.client_dp.sample_level_schedule),
    # so the steps taken and the steps accounted are the same number.
    dp_sample_level: bool = False
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 0.0
    dp_sample_rate: float = 0.0
    dp_steps: int = 0
    # Client-level DP-FedAvg: clip the whole update to L2 <= update_clip (0: no clipping), add
    # N(0, update_noise_std^2) per coordinate (distributed noise), report the clipped-or-not bit.
    update_clip: float = 0.0
    update_noise_std: float = 0.0
    report_clip_bit: bool = False
    # q-FedAvg: report F_k(w^t), the loss of the *global* model on the client's training data
    # before local training, as metrics["pre_train_loss"] (computed only when asked: one extra
    # forward pass over the data, and a statistic of private data that DP runs must not release).
    report_pre_train_loss: bool = False
    # SCAFFOLD: train with the corrected gradient g - c_i + c and report the variate delta
    # (ClientUpdate.control_delta). The variates are model-sized, so they never travel in these
    # JSON instructions: the server variate c goes alongside the global vector, c_i stays with the client.
    scaffold: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainInstructions:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class ClientUpdate:
    """A client's contribution to one round: the model delta (local - global), as a flat vector."""

    client_id: int | str
    round: int
    delta: torch.Tensor
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    wire_bytes: int = 0
    #: SCAFFOLD only: c_i+ - c_i, the change of the client's control variate (flat, model-sized)
    control_delta: torch.Tensor | None = None
