"""An exponential moving average of the global model, kept by the server (config key ``server_model_ema``).

Why: under DP-SGD every global model carries the noise of its round; averaging the models the
server has already produced cancels part of that noise at no privacy cost (De et al. 2022,
"Unlocking High-Accuracy Differentially Private Image Classification through Scale", report +1-2
points from parameter averaging). It is post-processing of what the aggregate already released:
the average is computed from global models only, never from a client's update, so the privacy
accountant has nothing to add.

Clients keep training from the raw global model; the average is what is evaluated and what the run
releases as its final model (``Coordinator.released_vector``). It is part of the checkpoint, so a
resumed run continues the same average.

Warm-up: the t-th update uses ``min(decay, (t - 1) / t)``, so the average is the plain mean of the
rounds so far until t reaches the horizon 1 / (1 - decay), and an exponential average from then
on. A plain EMA started at round 1 would keep 0.9^9 = 39 % of the first, worst model after 10 rounds
at decay 0.9; no zero start, so no bias correction either.
"""

from __future__ import annotations

from typing import Any

import torch

#: the largest decay the schema accepts (a horizon of ~1,000 rounds)
MAX_DECAY = 0.999


class ServerModelEMA:
    """``ema <- d_t * ema + (1 - d_t) * w_t`` after round t, d_t = min(decay, (t - 1) / t), in float64."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= MAX_DECAY:
            raise ValueError(f"server_model_ema decay must be in (0, {MAX_DECAY}], got {decay!r}")
        self.decay = float(decay)
        self._average: torch.Tensor | None = None
        self.updates = 0

    def update(self, vector: torch.Tensor) -> None:
        """Fold in the global model of one more round (the first one starts the average)."""
        if vector.dim() != 1:
            raise ValueError(f"expected a flat model vector, got shape {tuple(vector.shape)}")
        new = vector.detach().to(torch.float64)
        if self._average is None:
            self._average = new.clone()
        else:
            if new.numel() != self._average.numel():
                raise ValueError(f"model vector has {new.numel()} values, the average {self._average.numel()}")
            t = self.updates + 1
            decay = min(self.decay, (t - 1) / t)
            self._average.mul_(decay).add_(new, alpha=1.0 - decay)
        self.updates += 1

    @property
    def started(self) -> bool:
        return self._average is not None

    def value(self) -> torch.Tensor:
        """The averaged model (float32, a copy); raises before the first update."""
        if self._average is None:
            raise RuntimeError("the model average has no round yet")
        return self._average.to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "average": None if self._average is None else self._average.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore an average; one kept with another decay is refused (it would silently mix two averages)."""
        if float(state["decay"]) != self.decay:
            raise ValueError(f"the checkpoint's model average used server_model_ema={state['decay']}, this run "
                             f"{self.decay}: keep the setting to resume, or start a new run")
        average = state["average"]
        self._average = None if average is None else average.to(torch.float64).clone()
        self.updates = int(state["updates"])
