"""Shared fixtures: small, seeded configurations that train real models in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: A configuration small enough for tests: real CNN on a real subset of Fashion-MNIST.
SMALL = {
    "dataset": "fashion_mnist",
    "model_type": "cnn",
    "num_clients": 10,
    "client_selection_ratio": 0.5,
    "num_rounds": 3,
    "local_epochs": 1,
    "batch_size": 32,
    "learning_rate": 0.05,
    "momentum": 0.9,
    "max_train_samples": 2000,
    "max_test_samples": 1000,
    "evaluation_frequency": 1,
    "differential_privacy": False,
    "secure_aggregation": False,
    "compression": False,
    "seed": 7,
}


@pytest.fixture
def small_config() -> dict:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")
    return dict(SMALL)
