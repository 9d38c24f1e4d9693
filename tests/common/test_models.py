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
