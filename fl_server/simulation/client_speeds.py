"""Simulated client hardware: how long each client takes, and what it reports about itself.

Real federations mix fast and slow devices; without that, asynchronous training has no
staleness and capability-based selection has nothing to choose on. Each client gets, once per
run and seeded by the run seed:

* seconds per training sample: ``client_seconds_per_sample`` for all (``constant``), or that
  median times lognormal(0, ``client_speed_sigma``) (``lognormal``);
* seconds per model transfer: ``network_delay``, spread by the same lognormal when it is on.

A job of E local epochs on n samples then takes E * n * seconds_per_sample + 2 * transfer
(download, upload) on the simulation's virtual clock. The same numbers become the
``compute_speed`` (samples/s) and ``bandwidth`` (model bytes / transfer seconds) that the client
reports in its :class:`~fl_server.selection.ClientInfo`, as a deployed client would measure them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fl_common.config import FLConfig
from fl_common.protocol import derive_seed
from fl_server.selection import ClientInfo, private_label_histogram

__all__ = ["ClientSpeeds", "client_speeds", "simulated_client_infos"]


@dataclass(frozen=True)
class ClientSpeeds:
    seconds_per_sample: np.ndarray  # [clients]
    transfer_seconds: np.ndarray  # [clients], each way

    def job_seconds(self, client: int, num_samples: int, epochs: int) -> float:
        return float(epochs * num_samples * self.seconds_per_sample[client] + 2.0 * self.transfer_seconds[client])


def client_speeds(cfg: FLConfig, num_clients: int) -> ClientSpeeds:
    rng = np.random.default_rng(derive_seed(cfg.seed, "client-speeds"))
    z_compute, z_network = rng.standard_normal(num_clients), rng.standard_normal(num_clients)
    sigma = cfg.client_speed_sigma if cfg.client_speed_distribution == "lognormal" else 0.0
    return ClientSpeeds(seconds_per_sample=cfg.client_seconds_per_sample * np.exp(sigma * z_compute),
                        transfer_seconds=cfg.network_delay * np.exp(sigma * z_network))


def simulated_client_infos(cfg: FLConfig, partitions: Sequence[np.ndarray], histograms: np.ndarray, speeds: ClientSpeeds,
                           model_bytes: int) -> dict[int, ClientInfo]:
    """What each simulated client would report. Label histograms are Laplace-noised (seeded per
    client) when ``label_histogram_epsilon`` is set, as a deployed client noises them."""
    infos = {}
    for cid, part in enumerate(partitions):
        hist: tuple[float, ...] = tuple(float(v) for v in histograms[cid])
        if cfg.label_histogram_epsilon is not None:
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, cid, "label-histogram"))
            hist = private_label_histogram(histograms[cid], cfg.label_histogram_epsilon, gen)
        transfer = float(speeds.transfer_seconds[cid])
        infos[cid] = ClientInfo(cid, num_samples=len(part), label_histogram=hist,
                                compute_speed=1.0 / float(speeds.seconds_per_sample[cid]),
                                bandwidth=model_bytes / transfer if transfer > 0 else None)
    return infos
