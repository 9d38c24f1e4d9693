"""What a selection policy may know about a client, and how that knowledge is gathered.

Both drivers fill in the same :class:`ClientInfo`: the simulation from its partitions and its
simulated client speeds, the REST server from the profile each client reports after loading its
data (``POST /api/v1/profile``) and from its own participation records. Policies never see anything else, so a policy behaves the
same in both drivers.

Privacy of what clients report: ``num_samples`` is treated as public (the privacy engine already
plans sample-level DP-SGD from it). A label histogram is a statistic of the private records, so
when differential privacy is on a client reports it through :func:`private_label_histogram`
(pure epsilon-DP Laplace counts, config key ``label_histogram_epsilon``), never exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from fl_common.privacy import private_label_histogram  # lives in fl_common: the client noises it

__all__ = ["ClientId", "ClientInfo", "client_infos_for", "private_label_histogram"]

ClientId = int | str


@dataclass(frozen=True)
class ClientInfo:
    """One client as the selection policies see it.

    * ``num_samples``: records the client trains on (None: not reported).
    * ``label_histogram``: count per class, possibly Laplace-noised (may then be fractional or
      negative); None: not reported.
    * ``compute_speed``: samples the client trains per second; ``bandwidth``: bytes per second of
      its link (None: not reported; an unknown bandwidth adds no transfer time).
    * ``last_round``: the last round (async: the server model version) in which an update of this
      client was accepted; 0 = never. None lets the coordinator fill it from its own records.
    """

    client_id: ClientId
    num_samples: int | None = None
    label_histogram: tuple[float, ...] | None = None
    compute_speed: float | None = None
    bandwidth: float | None = None
    last_round: int | None = None

    def __post_init__(self) -> None:
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or int(self.num_samples) < 0):
            raise ValueError(f"client {self.client_id}: num_samples must be >= 0, got {self.num_samples!r}")
        for name in ("compute_speed", "bandwidth"):
            value = getattr(self, name)
            if value is not None and not (float(value) > 0 and math.isfinite(float(value))):
                raise ValueError(f"client {self.client_id}: {name} must be a finite number > 0, got {value!r}")
        if self.label_histogram is not None:
            hist = tuple(float(v) for v in self.label_histogram)
            if not hist or not all(math.isfinite(v) for v in hist):
                raise ValueError(f"client {self.client_id}: label_histogram must be a non-empty list of finite counts")
            object.__setattr__(self, "label_histogram", hist)
        if self.last_round is not None and int(self.last_round) < 0:
            raise ValueError(f"client {self.client_id}: last_round must be >= 0, got {self.last_round!r}")

    def to_json(self) -> dict[str, object]:
        return {"client_id": self.client_id, "num_samples": self.num_samples,
                "label_histogram": list(self.label_histogram) if self.label_histogram is not None else None,
                "compute_speed": self.compute_speed, "bandwidth": self.bandwidth, "last_round": self.last_round}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ClientInfo:
        hist = data.get("label_histogram")
        return cls(client_id=data["client_id"], num_samples=data.get("num_samples"),  # type: ignore[arg-type]
                   label_histogram=tuple(hist) if hist is not None else None,  # type: ignore[arg-type]
                   compute_speed=data.get("compute_speed"), bandwidth=data.get("bandwidth"),  # type: ignore[arg-type]
                   last_round=data.get("last_round"))  # type: ignore[arg-type]


def client_infos_for(available: Sequence[ClientId], infos: Mapping[ClientId, ClientInfo] | None = None, *,
                     sizes: Mapping[ClientId, int] | None = None,
                     last_rounds: Mapping[ClientId, int] | None = None) -> list[ClientInfo]:
    """One :class:`ClientInfo` per available client, completed from what the coordinator knows.

    A driver that passes no infos (the REST server before selection is wired) gets bare infos,
    with ``num_samples`` from ``sizes`` where known; ``last_round`` left None is filled from
    ``last_rounds`` (0 = never took part). Order follows ``available``.
    """
    out = []
    for cid in available:
        info = (infos or {}).get(cid) or ClientInfo(cid)
        if info.client_id != cid:
            raise ValueError(f"client info for {info.client_id!r} was given under id {cid!r}")
        if info.num_samples is None and sizes is not None and cid in sizes:
            info = replace(info, num_samples=int(sizes[cid]))
        if info.last_round is None:
            info = replace(info, last_round=int((last_rounds or {}).get(cid, 0)))
        out.append(info)
    return out
