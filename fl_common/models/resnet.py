"""torchvision's ResNet-18 adapted to small images (28x28, 32x32).

The ImageNet stem (7x7 stride-2 convolution plus max pooling) would shrink a 32x32 image to 8x8
before the first block, so it is replaced by a 3x3 stride-1 convolution without pooling, as is
standard for CIFAR. GroupNorm is the default: BatchNorm's running statistics are averaged across
clients with different label mixes (harmful under non-IID data, Hsieh et al. 2020) and its
per-batch statistics mix samples, which breaks per-sample DP-SGD.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import resnet18


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels), num_channels=channels)


def small_image_resnet18(input_shape: tuple[int, int, int], num_classes: int, norm: str = "group") -> nn.Module:
    if norm not in ("group", "batch"):
        raise ValueError(f"resnet norm must be 'group' or 'batch', got {norm!r}")
    norm_layer = _group_norm if norm == "group" else partial(nn.BatchNorm2d)
    model: nn.Module = resnet18(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
