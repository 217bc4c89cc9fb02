"""Drop-in modules built on the custom ops.

`Conv2d` is a `torch.nn.Conv2d` and `LinearReLU` a `torch.nn.Linear` in every
respect but the kernels: same constructor, parameter names, shapes,
initialisation and state_dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from lightning_hw import ops

__all__ = ["Conv2d", "LinearReLU"]


class Conv2d(nn.Conv2d):
    """`torch.nn.Conv2d` computed by `lightning_hw.ops.conv2d` (a direct convolution)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if self.padding_mode != "zeros":
            # Non-zero padding modes pad explicitly, then convolve unpadded, as nn.Conv2d does.
            padded = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return ops.conv2d(padded, weight, bias, self.stride, _pair(0), self.dilation, self.groups)
        return ops.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class LinearReLU(nn.Linear):
    """`relu(linear(x))` in one fused op; a drop-in for
    `nn.Sequential(nn.Linear(in_features, out_features, bias), nn.ReLU())`.

    Parameters are those of `nn.Linear` (`weight`, `bias`); a state_dict saved
    from the Sequential form (`0.weight`, `0.bias`) loads too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._register_load_state_dict_pre_hook(_accept_sequential_keys)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear_relu(input, self.weight, self.bias)


def _accept_sequential_keys(state_dict, prefix, *args):
    for name in ("weight", "bias"):
        sequential_key = f"{prefix}0.{name}"
        if sequential_key in state_dict and f"{prefix}{name}" not in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(sequential_key)
