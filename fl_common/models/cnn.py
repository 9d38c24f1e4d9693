"""The CNN of McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from
Decentralized Data"): two 5x5 convolutions (32, 64 channels, 'same' padding) each followed by
2x2 max pooling, a 512-unit fully connected layer and a linear classifier. On 1x28x28 inputs it
has exactly 1,663,370 parameters, the figure papers quote, which a test pins down."""

from __future__ import annotations

import torch
from torch import nn


class McMahanCNN(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
