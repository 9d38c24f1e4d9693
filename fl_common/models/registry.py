"""One entry point that turns a config into a model, so both drivers build identical models."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from fl_common.models.cnn import McMahanCNN
from fl_common.models.dp_cnn import TemperedSigmoidCNN
from fl_common.models.mlp import MLP
from fl_common.models.scattering import ScatterCNN, ScatterLinear
from fl_common.plugins import load_object

if TYPE_CHECKING:
    from fl_common.config import FLConfig


#: The DP-suited family (fl_common/models/dp_cnn.py): model_type -> (activation, GroupNorm after each convolution).
#: ``tanh_cnn`` is Papernot et al. 2021's tempered-sigmoid model, ``relu_cnn`` their ReLU control.
DP_CNN_VARIANTS: dict[str, tuple[Literal["tanh", "relu"], bool]] = {
    "tanh_cnn": ("tanh", False),
    "tanh_cnn_gn": ("tanh", True),
    "relu_cnn": ("relu", False),
}
#: Handcrafted-feature models (fl_common/models/scattering.py, Tramer and Boneh 2021): a fixed wavelet
#: scattering transform, then a linear layer (``scatter_linear``) or a small tanh CNN (``scatter_cnn``,
#: ``hidden_size`` channels) is the only part trained.
SCATTER_MODELS = ("scatter_linear", "scatter_cnn")
#: Every model_type create_model builds (fl_common/config/schema.py keeps the same list; a test checks).
MODEL_TYPES = ("cnn", "mlp", *DP_CNN_VARIANTS, *SCATTER_MODELS, "resnet", "custom")


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    """The factory a custom model names, found by the loader every plug-in point shares (its
    PluginError is a ValueError)."""
    factory = load_object(spec, what="custom model", kind="factory")
    if not callable(factory):
        module_name, _, attr = spec.partition(":")
        raise ValueError(f"custom model '{spec}': '{attr}' is not a callable in '{module_name}'")
    return cast("Callable[..., nn.Module]", factory)  # what it returns is checked where it is called


def create_model(model_type: str, input_shape: tuple[int, int, int], num_classes: int, *,
                 hidden_size: int = 256, resnet_norm: str = "group", custom_model: str | None = None,
                 seed: int | None = None) -> nn.Module:
    """Build a model; with ``seed`` its initial weights are reproducible (the global model at round 0)."""
    if seed is not None:
        torch.manual_seed(seed)
    if model_type == "cnn":
        model: nn.Module = McMahanCNN(input_shape, num_classes)
    elif model_type == "mlp":
        model = MLP(input_shape, num_classes, hidden_size)
    elif model_type in DP_CNN_VARIANTS:
        activation, group_norm = DP_CNN_VARIANTS[model_type]
        model = TemperedSigmoidCNN(input_shape, num_classes, hidden_size=hidden_size, activation=activation,
                                   group_norm=group_norm)
    elif model_type == "scatter_linear":
        model = ScatterLinear(input_shape, num_classes)
    elif model_type == "scatter_cnn":
        model = ScatterCNN(input_shape, num_classes, hidden_size=hidden_size)
    elif model_type == "resnet":
        from fl_common.models.resnet import (
            small_image_resnet18,  # torchvision is only needed here
        )

        model = small_image_resnet18(input_shape, num_classes, resnet_norm)
    elif model_type == "custom":
        if not custom_model:
            raise ValueError("model_type 'custom' needs custom_model='package.module:factory'")
        model = _load_factory(custom_model)(input_shape=input_shape, num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ValueError(f"custom model factory '{custom_model}' returned {type(model).__name__}, not a torch.nn.Module")
    else:
        raise ValueError(f"unknown model_type {model_type!r}: allowed {', '.join(MODEL_TYPES)}")
    return model


def model_from_config(cfg: FLConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if num_classes != cfg.num_classes:
        raise ValueError(f"config num_classes={cfg.num_classes} but dataset '{cfg.dataset}' has {num_classes} classes")
    return create_model(cfg.model_type, input_shape, num_classes, hidden_size=cfg.hidden_size,
                        resnet_norm=cfg.resnet_norm, custom_model=cfg.custom_model, seed=cfg.seed)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
