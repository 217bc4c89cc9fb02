"""Report 000's two-layer net: input -> Linear+ReLU(hidden) -> Linear(classes),
softmax cross-entropy with an L2 penalty on both weight matrices."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_hw.models.base import ImageClassifier
from lightning_hw.nn import LinearReLU


class TwoLayerNet(ImageClassifier):
    """Fully connected two-layer classifier on flattened images.

    Loss: cross-entropy + `reg * (||W1||^2 + ||W2||^2)` (biases not penalised),
    as in the report. The report's SGD with the learning rate multiplied by
    `lr_decay` after each epoch is `optimizer: torch.optim.SGD` (its `lr`) with
    `lr_scheduler: torch.optim.lr_scheduler.ExponentialLR` (`gamma` = lr_decay);
    see configs/cifar10_twolayer*.yaml.

    Args:
        hidden_size: width of the hidden Linear+ReLU layer.
        reg: L2 regularisation strength.
        init_std: weights drawn from N(0, init_std^2) and biases zero, as in the
            report; None keeps torch.nn.Linear's default initialisation.
        **kwargs: ImageClassifier's arguments (num_classes, input_shape, optimizer, ...).
    """

    def __init__(self, hidden_size: int = 100, reg: float = 0.0, init_std: float | None = 1e-4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if reg < 0:
            raise ValueError(f"reg must be non-negative, got {reg}")
        self.reg = reg
        input_size = math.prod(self.input_shape)
        self.hidden = LinearReLU(input_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, self.num_classes)
        if init_std is not None:
            for layer in (self.hidden, self.classifier):
                nn.init.normal_(layer.weight, std=init_std)
                nn.init.zeros_(layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(images.flatten(1)))

    def regularization(self) -> torch.Tensor | None:
        if self.reg == 0:
            return None
        return self.reg * (self.hidden.weight.square().sum() + self.classifier.weight.square().sum())

    def first_layer_weights(self) -> torch.Tensor:
        """W1's rows as images: the report's class 'templates'."""
        return self.hidden.weight.detach().cpu().reshape(-1, *self.input_shape)
