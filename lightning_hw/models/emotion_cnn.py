"""Report 001's VGG-style CNN for 48x48 grayscale faces (FER2013, 7 emotions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_hw.models.base import ImageClassifier
from lightning_hw.nn import Conv2d


class EmotionCNN(ImageClassifier):
    """Blocks of 3x3 convolution -> batch norm -> ReLU -> 2x2 max-pool -> dropout,
    then Linear(fc_size) -> batch norm -> ReLU -> dropout -> Linear(classes).

    The defaults are the report's network (convolutions of 256, 512, 512, 256
    and 512 channels, a 256-wide fully connected layer); smaller `channels` and
    `fc_size` give the CPU-sized variant (configs/fer2013_cnn_small.yaml).
    Batch norm sits between the linear layer and its ReLU, so that layer is a
    plain Linear, not the fused Linear+ReLU.

    Args:
        channels: output channels of each convolution block.
        fc_size: width of the fully connected hidden layer.
        conv_dropout: dropout after each convolution block.
        fc_dropout: dropout after the fully connected hidden layer.
        **kwargs: ImageClassifier's arguments (num_classes, input_shape, optimizer, ...).
    """

    def __init__(
        self,
        channels: Sequence[int] = (256, 512, 512, 256, 512),
        fc_size: int = 256,
        conv_dropout: float = 0.25,
        fc_dropout: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(self.input_shape) != 3:
            raise ValueError(f"EmotionCNN needs images (C, H, W), got input_shape {self.input_shape}")
        if not channels:
            raise ValueError("channels must list at least one convolution block")
        in_channels, height, width = self.input_shape
        if min(height, width) < 2 ** len(channels):
            raise ValueError(
                f"{len(channels)} blocks halve the image {len(channels)} times: "
                f"input_shape {self.input_shape} is too small"
            )
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout(conv_dropout),
            ]
            in_channels = out_channels
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * height * width, fc_size, bias=False),
            nn.BatchNorm1d(fc_size),
            nn.ReLU(inplace=True),
            nn.Dropout(fc_dropout),
            nn.Linear(fc_size, self.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def first_layer_weights(self) -> torch.Tensor:
        return self.features[0].weight.detach().cpu()
