"""The client's local training step, shared verbatim by the simulation and the client daemon.

One :class:`LocalTrainer` owns one model instance and reuses it for every client and round it
trains (loading the global weights in place), because building a model per client costs more
than a small client's whole epoch. Batches are cut from in-memory tensors by index, so the
training path never touches PIL or a DataLoader.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fl_common.allocator import keep_freed_memory
from fl_common.privacy import gaussian_noise, secure_generator
from fl_common.privacy.client_dp import clip_update, dp_sgd_train, sample_level_schedule
from fl_common.protocol import ClientUpdate, TrainInstructions, derive_seed
from fl_common.tensors import ParamSpec, flatten, spec_of
from fl_common.training.scaffold import (
    ControlVariates,
    check_scaffold_instructions,
    control_delta,
    parameter_mask,
    parameter_views,
)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_samples: int


def make_optimizer(params: list[nn.Parameter], instr: TrainInstructions) -> torch.optim.Optimizer:
    if instr.optimizer == "sgd":
        return torch.optim.SGD(params, lr=instr.learning_rate, momentum=instr.momentum, weight_decay=instr.weight_decay)
    if instr.optimizer == "adam":
        return torch.optim.Adam(params, lr=instr.learning_rate, weight_decay=instr.weight_decay)
    if instr.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=instr.learning_rate, weight_decay=instr.weight_decay)
    raise ValueError(f"unknown optimizer {instr.optimizer!r}: allowed sgd, adam, adagrad")


def _add_corrections(corrections: list[tuple[nn.Parameter, torch.Tensor]] | None) -> None:
    """SCAFFOLD: g <- g + (c - c_i) on every trainable parameter that received a gradient."""
    if corrections is None:
        return
    with torch.no_grad():
        for p, corr in corrections:
            if p.grad is not None:
                p.grad.add_(corr)


class LocalTrainer:
    """Trains one model on one client's data at a time and returns the update."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", *, seeded_noise: bool = False) -> None:
        """``seeded_noise``: draw DP randomness (Poisson batches, Gaussian noise) from ``instr.seed``.

        Only the simulation sets it, for reproducible runs. A deployed client keeps the default
        and draws from the OS CSPRNG: the server chose ``instr.seed``, and noise it could
        regenerate it could also subtract.
        """
        keep_freed_memory()  # training re-allocates the same buffers every step (fl_common/allocator.py)
        self.device = torch.device(device)
        self.seeded_noise = seeded_noise
        self.model = model.to(self.device)
        self._state = self.model.state_dict()  # tensors share storage with the model
        self.spec: ParamSpec = spec_of(self._state)
        self._param_mask: torch.Tensor | None = None  # SCAFFOLD: which coordinates are trainable parameters

    # ------------------------------------------------------------------ weights
    def load_vector(self, vector: torch.Tensor) -> None:
        """Copy a flat global vector into the model in place (no reallocation)."""
        if vector.numel() != self.spec.numel:
            raise ValueError(f"model expects {self.spec.numel} values, got {vector.numel()}")
        offset = 0
        with torch.no_grad():
            for entry, tensor in zip(self.spec.entries, self._state.values(), strict=True):
                chunk = vector[offset : offset + entry.numel].view(entry.shape)
                tensor.copy_(chunk.round() if not tensor.is_floating_point() else chunk)
                offset += entry.numel

    def vector(self) -> torch.Tensor:
        return flatten(self._state).cpu()

    # ------------------------------------------------------------------ training
    def train(self, global_vector: torch.Tensor, x: torch.Tensor, y: torch.Tensor, instr: TrainInstructions,
              client_id: int | str = 0, *, control: ControlVariates | None = None) -> ClientUpdate:
        """Local epochs of minibatch training from the global model; returns local - global.

        Shuffling uses a generator seeded by ``instr.seed`` (derived from run seed, round and
        client), so the same client in the same round trains identically in any process.
        FedProx's proximal term mu/2 ||w - w_global||^2 is applied through its gradient
        mu (w - w_global), added after backward: the same maths without growing the graph.

        Differential privacy, when the instructions ask for it (see ``fl_common.privacy.client_dp``):
        ``dp_sample_level`` replaces the epochs of shuffled batches by ``dp_steps`` DP-SGD steps on
        Poisson batches of rate ``dp_sample_rate``; ``update_clip`` clips the whole delta (client-level
        DP-FedAvg) and ``update_noise_std`` adds this client's share of the noise. Under DP the
        update's metrics carry only what the accounting needs (steps, q, the clipping bit when
        asked): training loss and accuracy are statistics of the private data and are not sent.

        q-FedAvg (``report_pre_train_loss``): before training, the loss of the global model on
        this client's data goes into ``metrics["pre_train_loss"]``; refused under DP, whose
        guarantee does not cover a loss released in the clear.

        SCAFFOLD (``scaffold``, with ``control`` = the server's c and this client's c_i): the
        correction c - c_i is added to every gradient (after the FedProx term; under DP-SGD after
        the noise, as post-processing of variates computed from earlier private outputs), and the
        update carries ``control_delta`` (see ``fl_common.training.scaffold``). The caller keeps
        c_i + control_delta for the client's next round.
        """
        start = time.perf_counter()
        n = int(y.shape[0])
        if n == 0:
            raise ValueError(f"client {client_id} has no training samples")
        private = instr.dp_sample_level or instr.update_clip > 0 or instr.update_noise_std > 0
        if instr.report_pre_train_loss and private:
            raise ValueError("q-FedAvg's pre-training loss is a statistic of the private data: it is not reported "
                             "under differential privacy")
        if instr.scaffold != (control is not None):
            raise ValueError("SCAFFOLD instructions need control variates, and control variates need SCAFFOLD "
                             f"instructions (scaffold={instr.scaffold}, control given: {control is not None})")
        if control is not None:
            check_scaffold_instructions(instr)
            control.check(self.spec.numel)
            if instr.update_clip > 0 or instr.update_noise_std > 0:
                raise ValueError("SCAFFOLD's variate delta is neither clipped nor noised: client-level DP does not cover it")
        global_vector = global_vector.to(self.device, torch.float32)
        self.load_vector(global_vector)
        pre_train_loss = None
        if instr.report_pre_train_loss:
            pre_train_loss = self.evaluate(None, x, y).loss  # F_k(w^t): the weights are loaded already
        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params] if instr.proximal_mu > 0 else None
        corrections = None
        if control is not None:
            corrections = parameter_views(model, self.spec, control.correction().to(self.device))
        optimizer = make_optimizer(params, instr)
        gen = torch.Generator().manual_seed(instr.seed)
        x = x.to(self.device)
        y = y.to(self.device)
        total_loss = 0.0
        total_correct = 0
        seen = 0
        steps = 0
        bs = instr.batch_size
        dp_q, dp_steps = 0.0, 0
        if instr.dp_sample_level:
            dp_q, dp_steps = sample_level_schedule(n, bs, instr.epochs)
            if instr.dp_sample_rate > 0:
                dp_q, dp_steps = float(instr.dp_sample_rate), int(instr.dp_steps)

            def proximal() -> None:  # data-independent given w: post-processing of the noised gradient
                if anchors is not None:
                    with torch.no_grad():
                        for p, a in zip(params, anchors, strict=True):
                            if p.grad is not None:
                                p.grad.add_(p - a, alpha=instr.proximal_mu)
                _add_corrections(corrections)

            dp_sgd_train(model, optimizer, x, y, sample_rate=dp_q, steps=dp_steps, max_grad_norm=instr.dp_clip,
                         noise_multiplier=instr.dp_noise_multiplier, generator=self._dp_generator(instr, "dp-sgd"),
                         after_gradients=proximal)
            steps = dp_steps
        for _ in range(0 if instr.dp_sample_level else instr.epochs):
            order = torch.randperm(n, generator=gen).to(self.device)
            for begin in range(0, n, bs):
                idx = order[begin : begin + bs]
                xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
                if anchors is not None:
                    with torch.no_grad():
                        for p, a in zip(params, anchors, strict=True):
                            if p.grad is not None:
                                p.grad.add_(p - a, alpha=instr.proximal_mu)
                _add_corrections(corrections)
                optimizer.step()
                steps += 1
                with torch.no_grad():
                    total_loss += float(loss) * idx.numel()
                    total_correct += int((logits.argmax(1) == yb).sum())
                    seen += idx.numel()
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"client {client_id}: training diverged (loss is not finite); lower the learning rate")
        local = self.vector()
        delta = local - global_vector.cpu()
        if private and not bool(torch.isfinite(delta).all()):  # clipping needs a finite vector
            raise FloatingPointError(f"client {client_id}: training diverged (the model is not finite); lower the learning rate")
        update_control = None
        if control is not None:  # from the unclipped, un-noised displacement: the steps actually taken
            if self._param_mask is None:
                self._param_mask = parameter_mask(model, self.spec)
            update_control = control_delta(control.server, global_vector.cpu(), local, steps, instr.learning_rate,
                                           mask=self._param_mask)
        metrics = {"steps": float(steps)}
        if pre_train_loss is not None:
            metrics["pre_train_loss"] = pre_train_loss
        if not private:
            metrics.update(train_loss=total_loss / max(seen, 1), train_accuracy=total_correct / max(seen, 1))
        if instr.dp_sample_level:
            metrics.update(dp_sample_rate=dp_q, dp_steps=float(dp_steps))
        if instr.update_clip > 0:
            delta, norm = clip_update(delta, instr.update_clip)
            if instr.report_clip_bit:
                metrics["dp_unclipped"] = float(norm <= instr.update_clip)
        if instr.update_noise_std > 0:
            noise_gen = self._dp_generator(instr, "dp-update-noise", cpu=True)
            delta = delta + gaussian_noise(delta.shape, instr.update_noise_std, noise_gen)
        if not private:
            # Under DP the wall-clock time would be a side channel on the realised Poisson batch sizes,
            # which no accountant covers: a private update says nothing beyond what DP accounts for.
            metrics["seconds"] = time.perf_counter() - start
        return ClientUpdate(client_id=client_id, round=instr.round, delta=delta, num_samples=n, metrics=metrics,
                            control_delta=update_control)

    def _dp_generator(self, instr: TrainInstructions, purpose: str, cpu: bool = False) -> torch.Generator:
        device = torch.device("cpu") if cpu else self.device
        if self.seeded_noise:
            return torch.Generator(device=device).manual_seed(derive_seed(instr.seed, purpose))
        return secure_generator(device)

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def evaluate(self, vector: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> EvalResult:
        """Loss and accuracy in large no-grad batches (evaluation is memory-bound, not compute-bound)."""
        if vector is not None:
            self.load_vector(vector.to(self.device, torch.float32))
        model = self.model
        model.eval()
        n = int(y.shape[0])
        loss_sum = 0.0
        correct = 0
        for begin in range(0, n, batch_size):
            xb = x[begin : begin + batch_size].to(self.device)
            yb = y[begin : begin + batch_size].to(self.device)
            logits = model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        return EvalResult(loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), num_samples=n)
