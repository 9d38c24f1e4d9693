"""Model registry: the CNN is McMahan et al.'s, shapes come from the dataset, custom factories load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fl_common.models import count_parameters, create_model


def test_mcmahan_cnn_has_the_published_parameter_count() -> None:
    assert count_parameters(create_model("cnn", (1, 28, 28), 10)) == 1_663_370


@pytest.mark.parametrize(("kind", "shape"),
                         [("cnn", (3, 32, 32)), ("mlp", (1, 28, 28)), ("resnet", (3, 32, 32)), ("resnet", (1, 28, 28))])
def test_models_take_the_dataset_shape(kind: str, shape: tuple[int, int, int]) -> None:
    model = create_model(kind, shape, 7, hidden_size=64)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_resnet_uses_groupnorm_by_default_and_batchnorm_on_request() -> None:
    gn = create_model("resnet", (3, 32, 32), 10)
    bn = create_model("resnet", (3, 32, 32), 10, resnet_norm="batch")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())


def test_seeded_initialisation_is_reproducible() -> None:
    a = create_model("cnn", (1, 28, 28), 10, seed=3).state_dict()
    b = create_model("cnn", (1, 28, 28), 10, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_custom_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def tiny(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(input_shape[0]*input_shape[1]*input_shape[2], num_classes))\n"
        "def not_a_model(input_shape, num_classes):\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("custom", (1, 28, 28), 10, custom_model="my_models:tiny")
    assert count_parameters(model) == 784 * 10 + 10
    with pytest.raises(ValueError, match=r"not a torch\.nn\.Module"):
        create_model("custom", (1, 28, 28), 10, custom_model="my_models:not_a_model")
    with pytest.raises(ValueError, match="cannot be imported"):
        create_model("custom", (1, 28, 28), 10, custom_model="no_such_module_xyz:f")
    sys.modules.pop("my_models", None)


# --------------------------------------------------------------------------- the DP-suited family
def test_tempered_sigmoid_cnn_has_papernots_parameter_count() -> None:
    """Papernot et al. 2021's MNIST model (conv 16 8x8/2, conv 32 4x4/2, fc 32): 26,010 parameters."""
    assert count_parameters(create_model("tanh_cnn", (1, 28, 28), 10, hidden_size=32)) == 26_010
    # the hidden size is the fc width: 512 inputs after the convolutions on 28x28, so +513 per unit
    assert count_parameters(create_model("tanh_cnn", (1, 28, 28), 10, hidden_size=64)) == 26_010 + 32 * (512 + 1 + 10)
    # GroupNorm adds an affine (weight, bias) per channel: 2 x (16 + 32)
    assert count_parameters(create_model("tanh_cnn_gn", (1, 28, 28), 10, hidden_size=32)) == 26_010 + 96
    assert count_parameters(create_model("relu_cnn", (1, 28, 28), 10, hidden_size=32)) == 26_010


@pytest.mark.parametrize("kind", ["tanh_cnn", "tanh_cnn_gn", "relu_cnn"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_dp_family_takes_the_dataset_shape(kind: str, shape: tuple[int, int, int]) -> None:
    model = create_model(kind, shape, 7, hidden_size=16)
    assert model(torch.zeros(3, *shape)).shape == (3, 7)


def test_dp_family_activations_and_norms() -> None:
    from torch import nn

    tanh = create_model("tanh_cnn", (1, 28, 28), 10, hidden_size=32)
    relu = create_model("relu_cnn", (1, 28, 28), 10, hidden_size=32)
    gn = create_model("tanh_cnn_gn", (1, 28, 28), 10, hidden_size=32)
    assert sum(isinstance(m, nn.Tanh) for m in tanh.modules()) == 3 and not any(isinstance(m, nn.ReLU) for m in tanh.modules())
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 3 and not any(isinstance(m, nn.Tanh) for m in relu.modules())
    assert [m.num_channels for m in gn.modules() if isinstance(m, nn.GroupNorm)] == [16, 32]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())


def test_dp_family_refuses_what_it_cannot_build() -> None:
    from fl_common.models import TemperedSigmoidCNN

    with pytest.raises(ValueError, match="at least 16x16"):
        TemperedSigmoidCNN((1, 8, 8), 10)
    with pytest.raises(ValueError, match="hidden_size"):
        TemperedSigmoidCNN((1, 28, 28), 10, hidden_size=0)
    with pytest.raises(ValueError, match="activation"):
        TemperedSigmoidCNN((1, 28, 28), 10, activation="gelu")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "hidden"), [("tanh_cnn", 32), ("tanh_cnn_gn", 32), ("scatter_linear", 8), ("scatter_cnn", 8)])
def test_dp_sgd_per_sample_gradients_of_the_dp_family(kind: str, hidden: int) -> None:
    """DP-SGD runs on the family (the tempered-sigmoid CNNs, and the scattering models, whose fixed front end
    has no parameters) through the fast hook path, and its per-sample norms and clipped sum equal those of
    per-example backward passes (computed here one example at a time)."""
    from torch.nn import functional as F

    from fl_common.privacy import check_dp_compatible, dp_sgd_gradients
    from fl_common.privacy.client_dp import per_example_cross_entropy

    model = create_model(kind, (1, 28, 28), 10, hidden_size=hidden, seed=0)
    check_dp_compatible(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    clip = 0.5
    expected_norms, expected_sum = [], None
    for i in range(6):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        norm = float(g.norm())
        expected_norms.append(norm)
        clipped = g * min(1.0, clip / norm)
        expected_sum = clipped if expected_sum is None else expected_sum + clipped
    model.zero_grad(set_to_none=True)
    stats = dp_sgd_gradients(model, per_example_cross_entropy, x, y, clip, 0.0, None, 6.0)
    assert stats.method == "ghost"
    torch.testing.assert_close(stats.per_sample_norms.double(), torch.tensor(expected_norms, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    torch.testing.assert_close(got, expected_sum / 6.0, rtol=1e-3, atol=1e-6)
    assert stats.fraction_clipped == sum(n > clip for n in expected_norms) / 6


def test_dp_family_from_config() -> None:
    from fl_common.config import config_from_dict
    from fl_common.config.schema import MODEL_TYPES as SCHEMA_MODEL_TYPES
    from fl_common.models import MODEL_TYPES, model_from_config

    assert SCHEMA_MODEL_TYPES == MODEL_TYPES
    cfg = config_from_dict({"model_type": "tanh_cnn", "hidden_size": 32, "differential_privacy": False,
                            "secure_aggregation": False})
    assert count_parameters(model_from_config(cfg, (1, 28, 28), 10)) == 26_010
