"""Several clients trained at once with torch.func.vmap equal one-at-a-time LocalTrainer training (1e-5)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fl_common.models import create_model
from fl_common.protocol import TrainInstructions
from fl_common.training import LocalTrainer
from fl_common.training.batched import batchable, train_clients_batched


def _clients(count: int, n: int, shape: tuple[int, int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for _ in range(count)]


@pytest.mark.parametrize(("model_type", "momentum", "weight_decay"), [("mlp", 0.0, 0.0), ("mlp", 0.9, 1e-3), ("cnn", 0.5, 0.0)])
def test_batched_clients_equal_one_at_a_time(model_type: str, momentum: float, weight_decay: float) -> None:
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = create_model(model_type, shape, 10, hidden_size=32, seed=1)
    # mlp: 37 records = 2 batches of 16 + a short one of 5; the cnn (slower under vmap on a CPU): 2 clients, 20 records
    clients = _clients(3, 37, shape) if model_type == "mlp" else _clients(2, 20, shape)
    base = TrainInstructions(round=1, epochs=2, batch_size=16, learning_rate=0.05, momentum=momentum, weight_decay=weight_decay)
    instrs = [dataclasses.replace(base, seed=100 + c) for c in range(len(clients))]
    trainer = LocalTrainer(model)
    start = trainer.vector().clone()
    singles = [trainer.train(start, x, y, i, client_id=c) for c, ((x, y), i) in enumerate(zip(clients, instrs, strict=True))]
    trainer.load_vector(start)
    deltas, losses = train_clients_batched(trainer.model, clients, instrs)
    assert torch.equal(trainer.vector(), start)  # the model's own weights are left as they were
    for c, update in enumerate(singles):
        assert torch.allclose(deltas[c], update.delta, atol=1e-5, rtol=0), (c, (deltas[c] - update.delta).abs().max())
        assert float(losses[c]) == pytest.approx(update.metrics["train_loss"], abs=1e-5)
    assert not torch.allclose(deltas[0], deltas[1])  # different seeds, different data: different updates


def test_what_cannot_be_batched_is_refused_with_the_reason() -> None:
    model = create_model("mlp", (1, 28, 28), 10, hidden_size=16, seed=0)
    base = TrainInstructions(round=1, epochs=1, batch_size=8, learning_rate=0.1)
    assert batchable(model, [base, dataclasses.replace(base, seed=3)], [10, 10]) is None
    assert "different numbers" in (batchable(model, [base, base], [10, 11]) or "")
    assert "differential privacy" in (batchable(model, [dataclasses.replace(base, dp_sample_level=True)], [10]) or "")
    assert "beyond their seeds" in (batchable(model, [base, dataclasses.replace(base, learning_rate=0.2)], [10, 10]) or "")
    with pytest.raises(ValueError, match="FedProx"):
        train_clients_batched(model, _clients(1, 10, (1, 28, 28)), [dataclasses.replace(base, proximal_mu=0.1)])
