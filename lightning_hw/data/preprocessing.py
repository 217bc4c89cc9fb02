"""Preprocessing: how stored images become model input, in one place.

Every split's batches, `predict`'s image files and the graph `export` writes go through the same
`Normalization`: from images scaled to [0, 1], subtract the train split's mean, divide by its
std, flatten where the model takes vectors. `normalization_stats` computes those statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_hw.data.augmentation import TensorAugment

NORMALIZE_MODES = ("none", "mean_image", "per_channel")


class Normalization(nn.Module):
    """Images scaled to [0, 1], (N, C, H, W), to model input: minus `mean`, divided by `std`
    (each broadcast against one image (C, H, W); either may be None), then with `flatten`
    reshaped to (N, C * H * W).

    Training, validation, test and prediction batches go through it (`BatchPreprocessor`), and
    `python -m lightning_hw export` puts it into the ONNX graph in front of the model, so what
    `predict` does to an image and what an exported model does cannot drift apart.
    """

    def __init__(self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None, flatten: bool = False):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.flatten = flatten

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            images = images - self.mean
        if self.std is not None:
            images = images / self.std
        return images.flatten(1) if self.flatten else images


class BatchPreprocessor:
    """Turn stored uint8 images into model input: scale to [0, 1] (`pixel_scale`: 1 / the largest
    stored value), augment, then `normalization` (none: the scaled images as they are)."""

    def __init__(self, pixel_scale: float, normalization: Normalization | None = None) -> None:
        self.pixel_scale = pixel_scale
        self.normalization = normalization if normalization is not None else Normalization()

    @property
    def mean(self) -> torch.Tensor | None:
        return self.normalization.mean

    @property
    def std(self) -> torch.Tensor | None:
        return self.normalization.std

    def __call__(self, images: torch.Tensor, augment: TensorAugment | None) -> torch.Tensor:
        x = images.to(torch.float32) * self.pixel_scale
        if augment is not None:
            x = augment(x)
        return self.normalization(x).contiguous()


def normalization_shape(mode: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the mean (and std) that `normalization_stats` gives for images of `input_shape` (C, H, W)."""
    return tuple(input_shape) if mode == "mean_image" else (input_shape[0], 1, 1)


def normalization_stats(
    images: torch.Tensor, pixel_scale: float, mode: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mean (and std) of the scaled images of a split, for the given normalisation mode.

    "mean_image": the mean image (C, H, W), no std. "per_channel": mean and std
    per channel, shaped (C, 1, 1). Accumulates in float64 chunks so CIFAR-size
    splits need no full float copy.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mode == "none":
        return None, None
    n, c = images.shape[:2]
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    total_sq = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, n, 4096):
        chunk = images[start : start + 4096].to(torch.float64) * pixel_scale
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    if mode == "mean_image":
        return (total / n).to(torch.float32), None
    pixels_per_channel = n * images.shape[2] * images.shape[3]
    mean = total.reshape(c, -1).sum(1) / pixels_per_channel
    var = total_sq.reshape(c, -1).sum(1) / pixels_per_channel - mean * mean
    std = var.clamp_min(1e-12).sqrt()
    return mean.to(torch.float32).reshape(c, 1, 1), std.to(torch.float32).reshape(c, 1, 1)

