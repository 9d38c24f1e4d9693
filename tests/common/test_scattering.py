"""The scattering front end (fl_common/models/scattering.py) and the models on it: the same numbers as
kymatio, nothing but the head in the state_dict, and DP-SGD's per-sample gradients on them."""

from __future__ import annotations

import pytest
import torch

from fl_common.models import count_parameters, create_model
from fl_common.models.scattering import ScatterCNN, Scattering2D, ScatterLinear, scattering_channels


def test_scattering_matches_kymatio() -> None:
    """Reference values computed once with kymatio 0.3.0 (``ScatteringTorch2D``, same inputs): per-channel
    sums of orders 0, 1 (j1 = 0 and 1) and 2, on Fashion-MNIST's shape and on CIFAR's with J = 3."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 28, 28, generator=gen)
    x3 = torch.rand(1, 3, 32, 32, generator=gen)
    out = Scattering2D((28, 28), scales=2, angles=8)(x)
    assert out.shape == (2, 81, 7, 7)
    idx = [0, 1, 8, 16, 17, 40, 80]
    expected = torch.tensor([[24.230846, 2.942681, 3.099532, 1.426003, 0.311871, 0.243138, 0.407536],
                             [24.062143, 2.811409, 3.022209, 1.700986, 0.289661, 0.180408, 0.398895]])
    torch.testing.assert_close(out[:, idx].sum(dim=(-1, -2)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, idx, 3, 2], torch.tensor([0.515557, 0.048599, 0.102699, 0.016959, 0.003663,
                                                                0.004988, 0.01291]), rtol=1e-4, atol=1e-5)
    out3 = Scattering2D((32, 32), scales=3, angles=8)(x3)
    assert out3.shape == (1, 3 * scattering_channels(3, 8), 4, 4) == (1, 651, 4, 4)
    torch.testing.assert_close(out3[0, [0, 25, 216, 217, 434, 650]].sum(dim=(-1, -2)),
                               torch.tensor([8.01123, 0.105654, 0.055069, 7.844105, 7.971661, 0.06061]),
                               rtol=1e-5, atol=1e-5)


def test_scatter_models_train_only_their_head() -> None:
    linear = create_model("scatter_linear", (1, 28, 28), 10, seed=0)
    assert count_parameters(linear) == 81 * 7 * 7 * 10 + 10 == 39_700
    assert list(linear.state_dict()) == ["classifier.1.weight", "classifier.1.bias"]  # no filters travel
    cnn = create_model("scatter_cnn", (1, 28, 28), 10, hidden_size=16, seed=0)
    assert set(cnn.state_dict()) == {name for name, _ in cnn.named_parameters()}
    assert count_parameters(cnn) == (81 * 9 * 16 + 16) + (16 * 9 * 16 + 16) + (16 * 3 * 3 * 10 + 10)
    for model, shape in ((linear, (1, 28, 28)), (cnn, (1, 28, 28)),
                         (create_model("scatter_linear", (3, 32, 32), 10), (3, 32, 32))):
        assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_scattering_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="at least 4x4"):
        Scattering2D((3, 28), scales=2)
    with pytest.raises(ValueError, match="expects"):
        Scattering2D((28, 28))(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="groups"):
        ScatterLinear((1, 28, 28), groups=10)
    with pytest.raises(ValueError, match="hidden_size"):
        ScatterCNN((1, 28, 28), hidden_size=0)


# DP-SGD's per-sample gradients on both models: tests/common/test_models.py (the DP family's test)


def test_scatter_models_from_config() -> None:
    from fl_common.config import config_from_dict
    from fl_common.models import model_from_config

    cfg = config_from_dict({"model_type": "scatter_linear", "differential_privacy": False, "secure_aggregation": False})
    assert count_parameters(model_from_config(cfg, (1, 28, 28), 10)) == 39_700
