"""Shapes that end in partial register tiles of the CPU kernel variant this process runs
(LIGHTNING_HW_CPU_ISA, csrc/cpu/tile_kernels.h), chosen from its tile sizes: each variant has its
own (12, 3 or 1 pixels per direct-convolution tile, 12, 6 or 2 per depthwise one, ...), so shapes
fixed by hand hit different edges on different machines. tests/test_isa_variants.py runs the tests
that use them under every variant the CPU runs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

# Lanes of a 64-byte vector, the unit of the kernels' channel blocks: channel counts of 16k + 1
# and 16k + 3 end in partial vectors in float32 and float64 alike.
FLOAT_LANES = 16


@functools.cache
def kernel_tiles() -> dict:
    """The variant's name ("isa") and tile sizes, e.g. {"isa": "avx2", "conv_pixels": (3,), ...}."""
    tiles = {}
    for line in torch.ops.lightning_hw.cpu_kernel_tiles():
        key, value = line.split("=")
        tiles[key] = value if key == "isa" else tuple(int(v) for v in value.split(","))
    return tiles


def _remainders(tile: int) -> list[int]:
    """Sizes of a last partial tile to test: one item, and one short of a whole tile."""
    return sorted({1 % tile, (tile - 1) % tile})


def _images_with_remainder(tile: int, remainder: int, low: int = 3) -> tuple[int, int, int]:
    """(images, height, width), images of at least low x low pixels, whose pixels fill two whole
    tiles or more and leave `remainder` for a last partial one; several images where that can."""
    for images in (3, 2, 1):
        for height in range(low, 40):
            for width in range(low, 40):
                total = images * height * width
                if total >= 2 * tile and total % tile == remainder:
                    return images, height, width
    raise AssertionError((tile, remainder))


def conv2d_cases() -> list:
    """pytest.params of (input shape, weight shape, stride, padding, dilation, groups, route): for
    each of our conv2d routes, shapes whose output pixels, rows, channels, weight-gradient
    positions and taps end in partial tiles of this variant."""
    t = kernel_tiles()
    isa = t["isa"]
    pixels, (wgrad_rows_one, wgrad_rows_two) = t["conv_pixels"][0], t["wgrad_rows"]
    cases = []

    def case(route, name, input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1):
        cases.append(pytest.param(input_shape, weight_shape, stride, padding, dilation, groups, route,
                                  id=f"{isa}-{route}-{name}"))  # fmt: skip

    # direct: output pixels (and the input gradient's, the same plane) ending one pixel into a tile
    # or one short of a whole one; 35 output channels (a block of two vectors, then one of a single
    # partial vector); 17 input channels (the input gradient's output block); weight-gradient
    # positions (input channels x taps) one past a whole tile, of one and of two vectors.
    for remainder in _remainders(pixels):
        n, h, w = _images_with_remainder(pixels, remainder)
        case("direct", f"pixels-mod-{remainder}", (n, 17, h + 2, w + 2), (35, 17, 3, 3))
    n, h, w = _images_with_remainder(pixels, 1 % pixels)
    case("direct", "1x1-positions-two-vectors", (n, wgrad_rows_two + 1, h, w),
         (2 * FLOAT_LANES + 3, wgrad_rows_two + 1, 1, 1))  # fmt: skip
    case("direct", "1x1-positions-one-vector", (n, wgrad_rows_one + 1, h, w), (5, wgrad_rows_one + 1, 1, 1))
    case("direct", "strided-dilated-groups", (2, 9, 11, 13), (33, 3, 2, 3), (2, 1), (1, 0), (1, 2), 3)

    # planar (stride 1, at most 64 multiply-adds per output both ways): output rows of one vector
    # and a few lanes, and of a single partial vector; channel blocks one past the widest tile;
    # weight-gradient tiles of channels and positions (input channels x taps, and the bias) one
    # past whole ones. Eight images keep each image's rows in one work unit at two threads.
    # 13 output rows end in a partial tile of 2, 3 or 4 rows (the planar tiles' heights).
    two, one = t["planar_channels"]
    case("planar", "two-vector-rows", (8, 3, 14, FLOAT_LANES + 4), (two + 1, 3, 2, 2), padding=(0, 1))
    case("planar", "one-vector-rows", (8, 2, 13, 7), (one + 1, 2, 3, 3), padding=1)
    wgrad_channels, positions = t["planar_wgrad_channels"][0], t["planar_wgrad_positions"][0]
    in_per_group = max(1, math.ceil(positions / 4))  # in_per_group x 4 taps + the bias: past a tile
    case("planar", "groups-dilated", (8, 2 * in_per_group, 9, 11), (2 * (wgrad_channels + 1), in_per_group, 2, 2),
         padding="same", dilation=2, groups=2)  # fmt: skip

    # depthwise: 17 channels (a partial channel vector); unit rows of 2 tiles + 1 pixel or 1
    # short; tiles of taps one past a whole one (taps + 1, a 1 x (taps + 1) kernel), strided.
    dw_pixels, dw_taps = t["dw_pixels"][0], t["dw_wgrad_taps"][0]
    for remainder in _remainders(dw_pixels):
        case("depthwise", f"row-mod-{remainder}", (2, 17, 5, 2 * dw_pixels + remainder), (17, 1, 3, 3),
             padding=1, groups=17)  # fmt: skip
    case("depthwise", "taps-past-a-tile", (2, 19, 6, dw_taps + 9), (19, 1, 1, dw_taps + 1), stride=(1, 2), groups=19)
    case("depthwise", "dilated-taps", (1, 33, 9, 2 * dw_pixels + 5), (33, 1, 2, dw_taps // 2 + 1), padding="same",
         dilation=(2, 1), groups=33)  # fmt: skip
    return cases


def linear_relu_cases() -> list:
    """pytest.params of (rows, in_features, out_features, route): for each of our linear_relu
    routes, shapes whose rows, output features and input features end in partial tiles."""
    t = kernel_tiles()
    isa = t["isa"]
    pixels, wgrad_rows = t["conv_pixels"][0], t["wgrad_rows"][1]
    gemm_rows = t["gemm_rows"][0]
    cases = []

    def case(route, name, rows, in_features, out_features):
        cases.append(pytest.param(rows, in_features, out_features, route, id=f"{isa}-{route}-{name}"))

    # tiles: rows one into a tile or one short, 35 and wgrad_rows + 1 output features (the
    # weight gradient's tiles of output features), 37 input features (a ragged last block).
    for remainder in _remainders(pixels):
        case("tiles", f"rows-mod-{remainder}", 2 * pixels + remainder, 37, 2 * FLOAT_LANES + 3)
    case("tiles", "few-rows-narrow", max(1, pixels - 1), 2 * FLOAT_LANES + 1, wgrad_rows + 1)
    # streamed: more than 64 outputs, one into a tile of weight rows or one short; rows of two
    # blocks of two vectors and one more; input features of a ragged block, or past a chunk.
    first = gemm_rows * math.ceil(65 / gemm_rows)
    for remainder in _remainders(gemm_rows):
        case("streamed", f"outputs-mod-{remainder}", 2 * FLOAT_LANES + 1, 37, first + remainder)
    case("streamed", "long-reduction", 5, 1030, first + 1)
    return cases
