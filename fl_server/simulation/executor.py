"""Running the selected clients' local training, in-process or on a pool of worker processes.

Why processes: a client's step on a small CNN with batch 32 keeps one core busy but scales badly
across two intra-op threads, so two single-threaded workers training two clients at once finish
a round sooner than one process using both cores for one client at a time. Workers are spawned
(not forked: a forked child of a process that has used OpenMP can deadlock), receive the
training tensors once through shared memory, and read each round's global model from a shared
buffer, so per-task messages carry only a client id and its instructions.

Results are handed back in the plan's order whatever order workers finish in, so the aggregate
and therefore the whole run are identical for any number of workers.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import os
import queue
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.multiprocessing as mp

from fl_common.config import FLConfig
from fl_common.models import model_from_config
from fl_common.protocol import ClientUpdate, TrainInstructions, derive_seed
from fl_common.secagg import PlainInput, SecAggError, SecAggParams
from fl_common.secagg.field import FieldOverflowError
from fl_common.secagg.precompute import MaskingJob, mask_payload
from fl_common.tensors.codecs import Codec, make_codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.tensors.pipeline import PackedUpdate, pack_update
from fl_common.training import ControlVariates, EvalResult, LocalTrainer
from fl_common.training import resolve_device as resolve_torch_device
from fl_server.simulation import evaluation
from fl_server.strategies import STRATEGIES

log = logging.getLogger("fl_server.simulation")


#: secure aggregation: client id -> what masking its input takes, done where the client trains
MaskingJobs = Mapping[Any, MaskingJob]


class LateMaskingJobs(Mapping[Any, MaskingJob]):
    """Masking jobs that exist only once the round's keys are shared, handed to the executor before they do.

    Why: the key phases (key agreement, Shamir shares, signatures for every client) run in the driver, and the
    workers used to idle through them. With this mapping a pool dispatches the training first, then calls
    :meth:`resolve` (``produce`` runs the key phases while the workers train) and sends each job to the worker
    that took the client; the worker needs it only once its training is done. Any other reader (the in-process
    executor, Ray) resolves it on first access, which is the old order. A failure of ``produce`` is kept in
    :attr:`failure` (the mapping is then empty: the workers send their updates unmasked) so that the executor
    still collects every result; the caller re-raises it."""

    def __init__(self, produce: Callable[[], Mapping[Any, MaskingJob]]) -> None:
        self._produce: Callable[[], Mapping[Any, MaskingJob]] | None = produce
        self._jobs: dict[Any, MaskingJob] = {}
        self.failure: BaseException | None = None

    def resolve(self) -> None:
        """Run ``produce`` once (the first call; later calls return at once)."""
        produce, self._produce = self._produce, None
        if produce is None:
            return
        try:
            self._jobs = dict(produce())
        except Exception as exc:  # re-raised by the caller once the executor has collected its results
            self.failure = exc

    def __getitem__(self, cid: Any) -> MaskingJob:
        self.resolve()
        return self._jobs[cid]

    def __iter__(self) -> Iterator[Any]:
        self.resolve()
        return iter(self._jobs)

    def __len__(self) -> int:
        self.resolve()
        return len(self._jobs)


@dataclass(frozen=True)
class JobToFollow:
    """In a pool task instead of a masking job: the job comes on the worker's own job queue once the driver has
    it; the worker announces which client it took (so the driver knows where to send it) and trains meanwhile."""


class ClientExecutor(Protocol):
    def run_round(self, global_vector: torch.Tensor, instructions: dict[int, TrainInstructions], *,
                  server_control: torch.Tensor | None = None,
                  client_controls: dict[int, torch.Tensor] | None = None,
                  masking: MaskingJobs | None = None) -> Iterator[ClientUpdate]:
        """Train the planned clients; for SCAFFOLD, ``server_control`` is c (the same for all) and
        ``client_controls`` each client's c_i, which the driver keeps between rounds. ``masking`` (secure
        aggregation): the clients named there also mask their trained input where they trained, and their
        update comes back as a :class:`WorkerMasked` carrying the masked payload."""
        ...

    def evaluate(self, global_vector: torch.Tensor, parts: dict[int, np.ndarray],
                 batch_size: int) -> Iterator[tuple[int, EvalResult]]:
        """``global_vector``'s loss and accuracy on each client's records (indices into the training
        set), yielded in ``parts``' order: per-client evaluation runs where the clients train."""
        ...

    def close(self) -> None: ...


class WorkerFailed(RuntimeError):
    pass


def client_tensors(x: torch.Tensor, y: torch.Tensor, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    return x.index_select(0, idx), y.index_select(0, idx)


def plain_input_for(params: SecAggParams, update: ClientUpdate) -> PlainInput:
    """What a trained update contributes to a secure round's layout (its delta, weight, SCAFFOLD variate delta,
    loss and, when the layout has it, DP's clipping bit): one definition for the driver and the workers."""
    wants_bit = params.segment("unclipped") is not None
    return PlainInput(delta=update.delta, weight=int(update.num_samples), control=update.control_delta,
                      loss=update.metrics.get("train_loss"),
                      unclipped=bool(update.metrics.get("dp_unclipped")) if wants_bit else None)


@dataclass
class WorkerMasked(ClientUpdate):
    """A trained update whose masked input its worker computed (:func:`mask_payload`): the driver only signs
    ``masked_payload`` (``payload_sha256`` is its digest, which the client signs, computed where it was masked).
    ``mask_error`` says why there is none (a value its segment cannot hold): the client then drops out, as when
    the driver masks. ``delta`` is empty, as in a :class:`~fl_server.secagg.aggregator.MaskedUpdate`: the driver
    never reads a masked client's plain delta, and shipping it from a pool worker cost 6.6 MB of pickling and
    pipe traffic per cnn client (the SCAFFOLD variate delta, which the driver keeps, still comes back)."""

    masked_payload: bytes | None = None
    payload_sha256: bytes = b""
    clipped: bool = False
    mask_error: str | None = None


@dataclass(frozen=True, repr=False)
class MaskResult:
    """What a worker's masking gives back: the packed masked input and its SHA-256 (the client's, to be signed),
    whether clipping bound, or the error that made the client drop out (then ``payload`` is None)."""

    payload: bytes | None
    payload_sha256: bytes
    clipped: bool
    error: str | None

    def __repr__(self) -> str:
        size = None if self.payload is None else len(self.payload)
        return f"MaskResult(payload_bytes={size}, clipped={self.clipped}, error={self.error!r})"


def mask_trained(job: MaskingJob, update: ClientUpdate) -> MaskResult:
    """Mask a trained update where it was trained; a value the ring cannot hold is an error, not a crash. The
    payload's digest is computed here too: it is the client's work (it signs it), done in parallel in the workers."""
    try:
        payload, clipped = mask_payload(job, plain_input_for(job.params, update))
    except (FieldOverflowError, SecAggError, ValueError) as exc:
        return MaskResult(None, b"", False, f"{type(exc).__name__}: {exc}")
    return MaskResult(payload, hashlib.sha256(payload).digest(), clipped, None)


def with_mask(update: ClientUpdate, masked: MaskResult | None) -> ClientUpdate:
    """``update`` as the driver sees it: unchanged when its client was not masked where it trained, else a
    :class:`WorkerMasked` carrying the masked input (or the masking's error) and no plain delta."""
    if masked is None:
        return update
    return WorkerMasked(client_id=update.client_id, round=update.round, delta=torch.zeros(0), num_samples=update.num_samples,
                        metrics=update.metrics, wire_bytes=update.wire_bytes, control_delta=update.control_delta,
                        masked_payload=masked.payload, payload_sha256=masked.payload_sha256, clipped=masked.clipped,
                        mask_error=masked.error)


class InProcessExecutor:
    """Trains clients one after another in this process (workers=0; also the reference behaviour)."""

    def __init__(self, cfg: FLConfig, input_shape: tuple[int, int, int], num_classes: int,
                 x: torch.Tensor, y: torch.Tensor, partitions: Sequence[np.ndarray]) -> None:
        self.trainer = LocalTrainer(model_from_config(cfg, input_shape, num_classes), device=resolve_device(cfg), seeded_noise=True)
        self.x, self.y, self.partitions = x, y, partitions

    def run_round(self, global_vector: torch.Tensor, instructions: dict[int, TrainInstructions], *,
                  server_control: torch.Tensor | None = None,
                  client_controls: dict[int, torch.Tensor] | None = None,
                  masking: MaskingJobs | None = None) -> Iterator[ClientUpdate]:
        for cid, instr in instructions.items():
            cx, cy = client_tensors(self.x, self.y, self.partitions[cid])
            update = self.trainer.train(global_vector, cx, cy, instr, client_id=cid,
                                        control=_control_for(cid, server_control, client_controls))
            job = None if masking is None else masking.get(cid)
            yield with_mask(update, None if job is None else mask_trained(job, update))

    def evaluate(self, global_vector: torch.Tensor, parts: dict[int, np.ndarray],
                 batch_size: int) -> Iterator[tuple[int, EvalResult]]:
        self.trainer.load_vector(global_vector.to(self.trainer.device, torch.float32))
        for cid, idx in parts.items():
            cx, cy = client_tensors(self.x, self.y, idx)
            yield cid, evaluation.evaluate(self.trainer.model, cx, cy, batch_size, self.trainer.device)

    def close(self) -> None:
        return None


def _control_for(cid: int, server_control: torch.Tensor | None,
                 client_controls: dict[int, torch.Tensor] | None) -> ControlVariates | None:
    if server_control is None:
        return None
    if client_controls is None or cid not in client_controls:
        raise ValueError(f"SCAFFOLD round without client {cid}'s control variate")
    return ControlVariates(server=server_control, client=client_controls[cid])


def encode_for_wire(delta: torch.Tensor, codec: Codec, cfg: FLConfig, round_number: int, client_id: Any,
                    num_samples: int, error_feedback: ErrorFeedback | None = None) -> PackedUpdate:
    """The client's codec step, seeded by (seed, round, client) so every process encodes alike."""
    rng = torch.Generator().manual_seed(derive_seed(cfg.seed, round_number, client_id, "codec"))
    return pack_update(delta, codec, cfg.wire_compression, rng=rng, error_feedback=error_feedback,
                       meta={"num_samples": num_samples})


#: what a worker sends back for one trained client: delta, samples, metrics, wire bytes, variate delta, and
#: under secure aggregation its masked input (None when the driver masks; when it is there, the delta is empty)
TaskResult = tuple[torch.Tensor, int, dict[str, float], int, "torch.Tensor | None", "MaskResult | None"]


class ClientWorker:
    """What one worker holds and does, whatever runs it (a pool process, a Ray worker): one trainer,
    and the codec it encodes unbiased updates with. The process pool and the Ray backend both call
    this, so a client's update is computed by the same code, with the same seeds, on either."""

    def __init__(self, cfg: FLConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
        self.cfg = cfg
        self.trainer = LocalTrainer(model_from_config(cfg, input_shape, num_classes), device=resolve_device(cfg),
                                    seeded_noise=True)
        # Unbiased codecs are stateless, so the worker (the client's side) encodes in parallel; biased
        # ones need each client's error-feedback residual, which the driver keeps.
        codec = make_codec(cfg.codec) if cfg.compression else None
        self.codec = codec if codec is not None and not codec.biased else None

    def train(self, global_vector: torch.Tensor, cid: int, x: torch.Tensor, y: torch.Tensor, instr: TrainInstructions,
              server_control: torch.Tensor | None, client_control: torch.Tensor | None,
              masking: MaskingJob | Callable[[], MaskingJob | None] | None = None) -> TaskResult:
        """Train one client; ``masking``: its masking job, or what gives it (or None) once the training is done."""
        control = None if client_control is None else ControlVariates(server=server_control, client=client_control)
        update = self.trainer.train(global_vector, x, y, instr, client_id=cid, control=control)
        wire_bytes = 0
        if self.codec is not None:
            packed = encode_for_wire(update.delta, self.codec, self.cfg, instr.round, cid, update.num_samples)
            update.delta, wire_bytes = packed.decoded, len(packed.data)
        if masking is not None and not isinstance(masking, MaskingJob):
            masking = masking()
        if masking is None:
            return update.delta, update.num_samples, update.metrics, wire_bytes, update.control_delta, None
        # masked here: the plain delta stays here too (with_mask drops it; pickling it cost 6.6 MB per cnn client)
        masked = mask_trained(masking, update)
        return torch.zeros(0), update.num_samples, update.metrics, wire_bytes, update.control_delta, masked

    def evaluate(self, global_vector: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> EvalResult:
        self.trainer.load_vector(global_vector.to(self.trainer.device, torch.float32))
        return evaluation.evaluate(self.trainer.model, x, y, batch_size, self.trainer.device)

    def score_batches(self, global_vector: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      batch_size: int) -> list[evaluation.BatchScore]:
        """``global_vector``'s per-batch scores on ``x``, ``y`` (a slice of a set the driver splits between workers)."""
        self.trainer.load_vector(global_vector.to(self.trainer.device, torch.float32))
        return evaluation.score_batches(self.trainer.model, x, y, batch_size, self.trainer.device)


def update_from_result(cid: int, instr: TrainInstructions, result: TaskResult) -> ClientUpdate:
    """The driver's ClientUpdate from a worker's TaskResult (tensors copied out of shared or transport memory)."""
    delta, n, metrics, wire_bytes, control_delta, masked = result
    update = ClientUpdate(client_id=cid, round=instr.round, delta=delta.clone(), num_samples=n, metrics=metrics,
                          wire_bytes=wire_bytes, control_delta=None if control_delta is None else control_delta.clone())
    return with_mask(update, masked)


def release_free_memory() -> None:
    """Hand memory that glibc's allocator keeps after large frees back to the OS (Linux only).

    A client's minibatch activations and gradients are freed after each task but stay in the
    process's heap; with several workers that idle memory adds up. malloc_trim is cheap (~ms)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_device(cfg: FLConfig) -> str:
    """The torch device the simulation trains on: ``device``, with "auto" meaning CUDA when available
    (ConfigError for a GPU this machine does not have)."""
    return str(resolve_torch_device(cfg.device))


def _worker_main(worker_id: int, cfg_dict: dict[str, Any], input_shape: tuple[int, int, int], num_classes: int,
                 x: torch.Tensor, y: torch.Tensor, partitions: list[np.ndarray], global_buf: torch.Tensor,
                 tasks: Any, results: Any, threads: int, control_buf: torch.Tensor | None = None,
                 test: tuple[torch.Tensor, torch.Tensor] | None = None, jobs: Any = None) -> None:
    torch.set_num_threads(threads)
    try:
        from fl_common.config import config_from_dict

        worker = ClientWorker(config_from_dict(cfg_dict, check=False), input_shape, num_classes)
        results.put(("ready", worker_id, None))
    except BaseException:
        results.put(("error", worker_id, traceback.format_exc()))
        return
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the driver died (e.g. kill -9): do not linger as an orphan
                return
            continue
        if task is None:
            return
        if task[0] == "test":  # batches [begin, end) of the test set, scored with the model in the shared buffer
            _, index, begin, end, batch_size = task
            try:
                if test is None:
                    raise RuntimeError("this worker was started without the test set")
                results.put(("ok", index, worker.score_batches(global_buf, test[0][begin:end], test[1][begin:end], batch_size)))
            except BaseException:
                results.put(("error", index, traceback.format_exc()))
            continue
        if task[0] == "eval":  # per-client evaluation of the model in the shared buffer
            _, cid, indices, batch_size = task
            try:
                cx, cy = client_tensors(x, y, indices)
                results.put(("ok", cid, worker.evaluate(global_buf, cx, cy, batch_size)))
                del cx, cy
            except BaseException:
                results.put(("error", cid, traceback.format_exc()))
            continue
        _, cid, instr_json, client_control, masking = task
        try:
            instr = TrainInstructions.from_json(instr_json)
            cx, cy = client_tensors(x, y, partitions[cid])
            if isinstance(masking, JobToFollow):
                results.put(("took", cid, worker_id))
                masking = functools.partial(_job_for, jobs, cid, parent)
            results.put(("ok", cid, worker.train(global_buf, cid, cx, cy, instr, control_buf, client_control, masking)))
            del cx, cy
            release_free_memory()
        except BaseException:
            results.put(("error", cid, traceback.format_exc()))


def _job_for(jobs: Any, cid: int, parent: int) -> MaskingJob | None:
    """The masking job the driver sends this worker for ``cid`` (None: the client is not masked here)."""
    while True:
        try:
            who, job = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                raise WorkerFailed("the driver is gone") from None
            continue
        if who != cid:
            raise WorkerFailed(f"worker waiting for client {cid}'s masking job got client {who}'s")
        return job  # type: ignore[no-any-return]


class ProcessPoolExecutor:
    """A fixed pool of spawned workers, each training one client at a time."""

    def __init__(self, cfg: FLConfig, input_shape: tuple[int, int, int], num_classes: int,
                 x: torch.Tensor, y: torch.Tensor, partitions: Sequence[np.ndarray], numel: int,
                 workers: int, threads_per_worker: int = 1, start_timeout: float = 120.0,
                 test: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        # fork: workers share the parent's pages (torch's libraries, the dataset) copy-on-write and
        # start in milliseconds. It is safe here because a worker runs torch single-threaded (no
        # OpenMP pool to inherit in a broken state) and never touches CUDA; otherwise spawn.
        use_fork = (sys.platform == "linux" and threads_per_worker == 1 and resolve_device(cfg) == "cpu"
                    and "fork" in mp.get_all_start_methods())
        ctx = mp.get_context("fork" if use_fork else "spawn")
        self.start_method = ctx.get_start_method()
        if not use_fork:
            for t in (x, y, *(test or ())):
                t.share_memory_()
        #: the test set the workers hold (evaluate_test), or None
        self.test = test
        self.global_buf = torch.zeros(numel, dtype=torch.float32).share_memory_()
        # SCAFFOLD's server variate c is the same for every client of a round: one more shared buffer
        # (each client's own c_i travels with its task, and its variate delta comes back with the update).
        self.control_buf = (torch.zeros(numel, dtype=torch.float32).share_memory_()
                            if STRATEGIES[cfg.aggregation_method].needs_client_state else None)
        self.partitions = partitions
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        # one per worker: the masking jobs that follow their tasks (LateMaskingJobs)
        self.job_queues = [ctx.Queue() for _ in range(workers)]
        self.procs = [
            ctx.Process(target=_worker_main, name=f"fl-client-worker-{i}", daemon=True,
                        args=(i, cfg.to_dict(), input_shape, num_classes, x, y, list(partitions),
                              self.global_buf, self.tasks, self.results, threads_per_worker, self.control_buf, test,
                              self.job_queues[i]))
            for i in range(workers)
        ]
        if use_fork:
            # Keep the garbage collector out of inherited pages: without freeze, a worker's first
            # collection writes to every object header and copies ~100 MB of the parent's heap.
            gc.collect()
            gc.freeze()
        try:
            for p in self.procs:
                p.start()
        finally:
            if use_fork:
                gc.unfreeze()
        ready = 0
        while ready < workers:
            kind, who, payload = self._get(start_timeout)
            if kind == "error":
                self.close()
                raise WorkerFailed(f"client worker {who} failed to start:\n{payload}")
            ready += 1
        log.info("started %d client workers (%s, %d thread(s) each)", workers, self.start_method, threads_per_worker)

    @property
    def running(self) -> bool:
        """False once closed (after a worker's failure too): its queues may still hold a finished task's stale
        result, so nothing more may be asked of it."""
        return bool(self.procs)

    def _get(self, timeout: float) -> tuple[str, Any, Any]:
        if not self.running:
            raise WorkerFailed("the worker pool is closed (a worker failed, or the run ended)")
        waited = 0.0
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise WorkerFailed(f"client worker(s) {', '.join(dead)} died (killed by the OS, e.g. out of memory?)") from None
                if waited >= timeout:
                    self.close()
                    raise WorkerFailed(f"no client finished within {timeout:.0f} s") from None

    def run_round(self, global_vector: torch.Tensor, instructions: dict[int, TrainInstructions], *,
                  server_control: torch.Tensor | None = None,
                  client_controls: dict[int, torch.Tensor] | None = None,
                  masking: MaskingJobs | None = None) -> Iterator[ClientUpdate]:
        self.global_buf.copy_(global_vector)
        if server_control is not None:
            if self.control_buf is None:
                raise ValueError("this worker pool was started without a control-variate buffer")
            self.control_buf.copy_(server_control)
        # Longest clients first (LPT scheduling: records x epochs) shortens the round when client sizes differ.
        order = sorted(instructions, key=lambda c: -len(self.partitions[c]) * max(1, instructions[c].epochs))
        late = isinstance(masking, LateMaskingJobs)
        for cid in order:
            control = _control_for(cid, server_control, client_controls)
            job = JobToFollow() if late else None if masking is None else masking.get(cid)
            self.tasks.put(("train", cid, instructions[cid].to_json(), None if control is None else control.client, job))
        if isinstance(masking, LateMaskingJobs):
            masking.resolve()  # the driver's key phases, while the workers train
        pending: dict[int, ClientUpdate] = {}
        for cid in instructions:  # yield in plan order, buffering early finishers
            while cid not in pending:
                kind, who, payload = self._get(timeout=3600.0)
                if kind == "took":  # worker ``payload`` trains client ``who``: its masking job goes to that worker
                    assert masking is not None
                    self.job_queues[payload].put((who, masking.get(who)))
                    continue
                if kind == "error":
                    self.close()
                    raise WorkerFailed(f"training client {who} failed:\n{payload}")
                pending[who] = update_from_result(who, instructions[who], payload)
            yield pending.pop(cid)

    def evaluate(self, global_vector: torch.Tensor, parts: dict[int, np.ndarray],
                 batch_size: int) -> Iterator[tuple[int, EvalResult]]:
        self.global_buf.copy_(global_vector)
        for cid in sorted(parts, key=lambda c: -len(parts[c])):  # largest first, as for training
            self.tasks.put(("eval", cid, np.asarray(parts[cid], dtype=np.int64), batch_size))
        done: dict[int, EvalResult] = {}
        for cid in parts:
            while cid not in done:
                kind, who, payload = self._get(timeout=3600.0)
                if kind == "error":
                    self.close()
                    raise WorkerFailed(f"evaluating client {who} failed:\n{payload}")
                done[who] = payload
            yield cid, done.pop(cid)

    def evaluate_test(self, global_vector: torch.Tensor, batch_size: int) -> EvalResult:
        """``global_vector``'s loss and accuracy on the test set the pool was started with, its batches split
        between the workers (single-threaded each, as when they train; the driver and the workers would
        otherwise take turns idling). Equal to the serial evaluation: per-batch scores, summed in batch order.
        Call it between rounds (the workers must be idle: it shares the result queue with training)."""
        if self.test is None:
            raise ValueError("this worker pool was started without the test set")
        n = int(self.test[1].shape[0])
        # one task per batch: a worker that is slower (a busy core) takes fewer
        ranges = evaluation.batch_ranges(n, batch_size)
        self.global_buf.copy_(global_vector)
        for index, (begin, end) in enumerate(ranges):
            self.tasks.put(("test", index, begin, end, batch_size))
        scores: dict[int, list[evaluation.BatchScore]] = {}
        while len(scores) < len(ranges):
            kind, who, payload = self._get(timeout=3600.0)
            if kind == "error":
                self.close()
                raise WorkerFailed(f"evaluating test batch {who} failed:\n{payload}")
            scores[who] = payload
        return evaluation.combine((s for index in range(len(ranges)) for s in scores[index]), n)

    def close(self) -> None:
        for _ in self.procs:
            with contextlib.suppress(ValueError, OSError):
                self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self.procs = []


def default_workers(cfg: FLConfig) -> int:
    """workers=-1 means one single-threaded worker per core (capped by clients per round); on a GPU it means
    in-process: one process owns the device (several would each hold a CUDA context and contend for it)."""
    if cfg.workers >= 0:
        return min(cfg.workers, cfg.clients_per_round)
    if resolve_device(cfg) != "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, cores // cfg.threads_per_worker)
    return min(n, cfg.clients_per_round)
