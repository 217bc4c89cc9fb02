"""Random augmentation of float image batches (N, C, H, W) with torch ops: crops, flips,
rotations and zooms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class TensorAugment:
    """Random augmentation of a float batch (N, C, H, W) with torch ops.

    Steps (each only when enabled): random crop after zero padding by
    `crop_padding` pixels, horizontal flip with probability 1/2, and a random
    affine warp combining a rotation in [-max_rotation_deg, max_rotation_deg]
    with a zoom factor drawn from `zoom_range`. Randomness comes from torch's
    global generator (seeded by Lightning's seed_everything and per worker).
    """

    def __init__(
        self,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        max_rotation_deg: float = 0.0,
        zoom_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.max_rotation_deg = float(max_rotation_deg)
        self.zoom_range = (float(zoom_range[0]), float(zoom_range[1]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.crop_padding > 0:
            images = random_crop_with_padding(images, self.crop_padding)
        if self.horizontal_flip:
            images = random_horizontal_flip(images)
        if self.max_rotation_deg > 0 or self.zoom_range != (1.0, 1.0):
            images = random_rotate_zoom(images, self.max_rotation_deg, self.zoom_range)
        return images


def random_crop_with_padding(images: torch.Tensor, padding: int, mode: str = "constant") -> torch.Tensor:
    """Pad each image (zeros; or F.pad's `mode`, e.g. "replicate": its own edge pixels) and cut a
    random window of the original size, i.e. shift it by up to `padding` pixels each way."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), mode=mode)
    top = torch.randint(0, 2 * padding + 1, (n,))
    left = torch.randint(0, 2 * padding + 1, (n,))
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]
    batch_index = torch.arange(n)[:, None, None, None]
    channel_index = torch.arange(c)[None, :, None, None]
    return padded[batch_index, channel_index, rows, cols]


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_rotate_zoom(
    images: torch.Tensor, max_rotation_deg: float, zoom_range: tuple[float, float]
) -> torch.Tensor:
    """Rotate and zoom each image about its centre by a random amount (bilinear, border padding)."""
    n = images.shape[0]
    angle = (torch.rand(n) * 2 - 1) * math.radians(max_rotation_deg)
    zoom = zoom_range[0] + torch.rand(n) * (zoom_range[1] - zoom_range[0])
    # affine_grid maps output coordinates to input ones, so zooming in by z samples a 1/z region.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zeros = torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

