"""Report 004's from-scratch CNN: Conv2d -> ReLU -> flatten -> Linear+ReLU stack -> Linear."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_hw.models.base import ImageClassifier
from lightning_hw.nn import Conv2d, LinearReLU


class FruitCNN(ImageClassifier):
    """One convolution, ReLU, then fully connected Linear+ReLU layers and a linear classifier.

    The defaults are the report's network for 32x32 grayscale fruit images:
    Conv2d(1 -> 8, 4x4, stride 1) -> ReLU -> flatten (8 * 29 * 29 = 6728) ->
    Linear+ReLU(841) -> Linear+ReLU(29) -> Linear(3). The same architecture,
    sized by these arguments, is the default model on the bundled digits.

    Args:
        conv_channels: output channels of the convolution.
        kernel_size: its square kernel size.
        stride: its stride.
        padding: its zero padding (an int or 'same').
        hidden_sizes: widths of the Linear+ReLU layers after the convolution.
        **kwargs: ImageClassifier's arguments (num_classes, input_shape, optimizer, ...).
    """

    def __init__(
        self,
        conv_channels: int = 8,
        kernel_size: int = 4,
        stride: int = 1,
        padding: int | str = 0,
        hidden_sizes: Sequence[int] = (841, 29),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(self.input_shape) != 3:
            raise ValueError(f"FruitCNN needs images (C, H, W), got input_shape {self.input_shape}")
        in_channels = self.input_shape[0]
        self.conv = Conv2d(in_channels, conv_channels, kernel_size, stride=stride, padding=padding)
        conv_features = self._conv_output_features()
        layers: list[nn.Module] = []
        width = conv_features
        for hidden in hidden_sizes:
            layers.append(LinearReLU(width, hidden))
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, self.num_classes)

    def _conv_output_features(self) -> int:
        # The op's own shape function on a meta tensor: no second output-size formula here.
        with torch.device("meta"):
            features = self.conv(torch.empty(1, *self.input_shape)).numel()
        if features == 0:
            raise ValueError(f"the convolution leaves no output for input_shape {self.input_shape}")
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images)).flatten(1)
        return self.classifier(self.hidden(features))

    def first_layer_weights(self) -> torch.Tensor:
        return self.conv.weight.detach().cpu()
