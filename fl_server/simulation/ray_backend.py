"""The Ray backend: each round's clients train as Ray tasks on a Ray cluster (``backend: ray``).

For users who outgrow one machine: the same driver, coordinator and client code as the process
pool (:class:`~fl_server.simulation.executor.ClientWorker` trains and encodes a client on either),
the same seeds, the same plan order of the results and so the same float64 running sum: a run's
history is the process backend's, whichever node trained which client.

* The training set is put in the object store once (read-only numpy arrays, shared zero-copy by
  the workers of a node); a task carries only its client's indices, instructions and, under
  SCAFFOLD, its variate c_i. Each round's global model (and SCAFFOLD's c) is put once per round.
* Each Ray worker process builds its ClientWorker (model, trainer, codec) once and reuses it.
* Client state that persists between rounds (SCAFFOLD variates, error-feedback residuals, the DP
  accountants) is held by the driver, in its run folder and checkpoint, exactly as with the
  process pool; tasks receive what they need as arguments. No node but the driver's reads or
  writes it, so nothing needs a shared filesystem, and ``--resume`` works as for the process pool.
* Resources per client task: ``ray_num_cpus`` (also the task's torch threads) and ``ray_num_gpus``.

Ray is optional (``pip install '.[ray]'``): it is imported only when this backend is chosen, and
the config refuses ``backend: ray`` with the install command when it is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fl_common.config import ConfigError, FLConfig, config_from_dict
from fl_common.protocol import ClientUpdate, TrainInstructions
from fl_common.secagg.precompute import MaskingJob
from fl_common.training import EvalResult
from fl_server.simulation.executor import ClientWorker, MaskingJobs, TaskResult, update_from_result

log = logging.getLogger("fl_server.simulation")

__all__ = ["RayExecutor"]

#: one ClientWorker per Ray worker process and configuration (a worker process runs many tasks)
_WORKERS: dict[str, ClientWorker] = {}


def _worker(cfg_json: str, input_shape: tuple[int, int, int], num_classes: int) -> ClientWorker:
    import json

    key = f"{cfg_json}|{input_shape}|{num_classes}"
    worker = _WORKERS.get(key)
    if worker is None:
        cfg = config_from_dict(json.loads(cfg_json), check=False)
        torch.set_num_threads(max(1, int(cfg.ray_num_cpus)))  # as the pool's single-threaded workers, by default
        worker = ClientWorker(cfg, input_shape, num_classes)
        _WORKERS.clear()  # a worker process serves one run at a time
        _WORKERS[key] = worker
    return worker


def _client_data(x: np.ndarray, y: np.ndarray, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's records copied out of the read-only object-store arrays (fancy indexing copies)."""
    return torch.from_numpy(x[indices]), torch.from_numpy(y[indices])


def train_task(cfg_json: str, input_shape: tuple[int, int, int], num_classes: int, x: np.ndarray, y: np.ndarray,
               global_vector: np.ndarray, server_control: np.ndarray | None, cid: int, indices: np.ndarray,
               instr_json: str, client_control: torch.Tensor | None, masking: MaskingJob | None = None) -> TaskResult:
    """One client's local training in a Ray worker (Ray resolves the object-store arguments); with ``masking``
    (secure aggregation) it masks the trained input there too."""
    worker = _worker(cfg_json, input_shape, num_classes)
    cx, cy = _client_data(x, y, indices)
    control = None if server_control is None else torch.from_numpy(server_control.copy())
    return worker.train(torch.from_numpy(global_vector.copy()), cid, cx, cy, TrainInstructions.from_json(instr_json),
                        control, client_control, masking)


def evaluate_task(cfg_json: str, input_shape: tuple[int, int, int], num_classes: int, x: np.ndarray, y: np.ndarray,
                  global_vector: np.ndarray, indices: np.ndarray, batch_size: int) -> EvalResult:
    worker = _worker(cfg_json, input_shape, num_classes)
    cx, cy = _client_data(x, y, indices)
    return worker.evaluate(torch.from_numpy(global_vector.copy()), cx, cy, batch_size)


class RayExecutor:
    """A :class:`~fl_server.simulation.executor.ClientExecutor` whose clients are Ray tasks."""

    def __init__(self, cfg: FLConfig, input_shape: tuple[int, int, int], num_classes: int,
                 x: torch.Tensor, y: torch.Tensor, partitions: Sequence[np.ndarray]) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("backend 'ray' needs Ray: pip install 'ray>=2.9' (or pip install '.[ray]' in this project), "
                              "or set backend: process") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # address None: a private one-node Ray for this run; "auto" or host:port: an existing cluster
            ray.init(address=cfg.ray_address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False, **({} if cfg.ray_address else {"num_cpus": os.cpu_count()}))
        self.cfg = cfg
        self._cfg_json = _json(cfg.to_dict())
        self._shape, self._classes = input_shape, num_classes
        self._x = ray.put(x.numpy())  # the dataset in the object store, once
        self._y = ray.put(y.numpy())
        self.partitions = [np.asarray(p, dtype=np.int64) for p in partitions]
        options = {"num_cpus": cfg.ray_num_cpus, "num_gpus": cfg.ray_num_gpus, "max_retries": 0}
        self._train = ray.remote(train_task).options(**options)
        self._evaluate = ray.remote(evaluate_task).options(**options)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info("Ray backend: %d node(s), %s CPUs, %s GPUs; %s CPU(s) and %s GPU(s) per client", len(nodes),
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0), cfg.ray_num_cpus,
                 cfg.ray_num_gpus)

    def run_round(self, global_vector: torch.Tensor, instructions: dict[int, TrainInstructions], *,
                  server_control: torch.Tensor | None = None,
                  client_controls: dict[int, torch.Tensor] | None = None,
                  masking: MaskingJobs | None = None) -> Iterator[ClientUpdate]:
        ray = self._ray
        g = ray.put(global_vector.detach().to(torch.float32).numpy())  # once per round, not per task
        c = None if server_control is None else ray.put(server_control.detach().to(torch.float32).numpy())
        if server_control is not None and (client_controls is None or set(client_controls) < set(instructions)):
            raise ValueError("SCAFFOLD round without every client's control variate")
        refs = {}
        for cid in sorted(instructions, key=lambda k: -len(self.partitions[k])):  # longest first, as the pool
            own = None if client_controls is None else client_controls[cid]
            refs[cid] = self._train.remote(self._cfg_json, self._shape, self._classes, self._x, self._y, g, c, cid,
                                           self.partitions[cid], instructions[cid].to_json(), own,
                                           None if masking is None else masking.get(cid))
        for cid in instructions:  # plan order, whatever order the tasks finish in
            yield update_from_result(cid, instructions[cid], ray.get(refs[cid]))

    def evaluate(self, global_vector: torch.Tensor, parts: dict[int, np.ndarray],
                 batch_size: int) -> Iterator[tuple[int, EvalResult]]:
        ray = self._ray
        g = ray.put(global_vector.detach().to(torch.float32).numpy())
        refs = {cid: self._evaluate.remote(self._cfg_json, self._shape, self._classes, self._x, self._y, g,
                                           np.asarray(idx, dtype=np.int64), batch_size) for cid, idx in parts.items()}
        for cid in parts:
            yield cid, ray.get(refs[cid])

    def close(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False


def _json(mapping: dict[str, Any]) -> str:
    import json

    return json.dumps(mapping, sort_keys=True)
