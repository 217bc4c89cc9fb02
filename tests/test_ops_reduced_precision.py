"""bfloat16 and float16 on CPU: both ops, forward and every gradient, on each route that runs
them (ours in float32 on float32 copies; torch's own kernels where torch accumulates the dtype in
float32; bfloat16 on AMX tiles, "amx", where the process has them, hardware or emulated, and
linear_relu's GEMMs on AVX512-BF16 dot products, "bf16dot", where the CPU has them), forced
and checked to have run, against a float64 reference computed from the same rounded inputs within
tests/bounds.py's bound; non-finite values as torch; the tile model's rounding and its faults;
CPU autocast (`precision="bf16-mixed"`), opcheck and torch.compile.

The grids are marked kernel_grid (run again under every kernel variant the CPU runs) and their amx
cases amx_grid: where the CPU has no AMX, tests/test_isa_variants.py runs those on the tiles'
scalar model (LIGHTNING_HW_CPU_ISA=amx-emulated)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hw.ops as ops
from bounds import UNIT_ROUNDOFF, assert_within_bound, bound, reduced_tensor
from lightning_hw.nn import Conv2d, LinearReLU
from routes import (
    BF16_ROUTES,
    CONV_PARTS,
    DTYPE_IDS,
    LINEAR_PARTS,
    OUR_CONV_ROUTES,
    OUR_LINEAR_ROUTES,
    REDUCED_DTYPES,
    conv2d_route_table,
    conv2d_runnable,
    forced_route,
    linear_relu_route_table,
    linear_relu_runnable,
    on_one_and_two_threads,
    with_routes,
)
from tiles import kernel_tiles

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

conv2d_backward = torch.ops.lightning_hw.conv2d_backward.default
linear_relu_backward = torch.ops.lightning_hw.linear_relu_backward.default

# Whether this process runs the amx route (the amx variant, or amx-emulated), and why not.
_AMX_WHY_NOT = conv2d_route_table((1, 32, 4, 4), (16, 32, 1, 1), torch.bfloat16)["conv2d_forward"]["amx"]
HAS_TILES = _AMX_WHY_NOT == ""
# Whether this process runs the bf16dot route (AVX512-BF16 and the AVX-512 kernels), and why not.
_BF16DOT_WHY_NOT = linear_relu_route_table((4, 8), 4, torch.bfloat16)["linear_relu_forward"]["bf16dot"]
HAS_BF16DOT = _BF16DOT_WHY_NOT == ""
needs_bf16dot = pytest.mark.skipif(not HAS_BF16DOT, reason=f"{_BF16DOT_WHY_NOT} (no emulation of it: a CPU without "
                                                           "AVX512-BF16 never runs it)")  # fmt: skip
REDUCED_CONV_ROUTES = OUR_CONV_ROUTES + ("aten",) + (BF16_ROUTES if HAS_TILES else ())
REDUCED_LINEAR_ROUTES = (
    OUR_LINEAR_ROUTES + ("blas",) + (BF16_ROUTES if HAS_TILES else ()) + (("bf16dot",) if HAS_BF16DOT else ())
)
OUR_REDUCED_CONV_ROUTES = tuple(route for route in REDUCED_CONV_ROUTES if route != "aten")
OUR_REDUCED_LINEAR_ROUTES = tuple(route for route in REDUCED_LINEAR_ROUTES if route != "blas")
needs_tiles = pytest.mark.skipif(
    not HAS_TILES, reason=f"{_AMX_WHY_NOT}; tests/test_isa_variants.py runs the amx_grid tests on amx-emulated"
)


def amx_marked(params):
    """The amx cases of with_routes' params, also marked amx_grid."""
    return [
        pytest.param(*p.values, marks=(*p.marks, pytest.mark.amx_grid), id=p.id) if p.values[-1] in BF16_ROUTES else p
        for p in params
    ]


def assert_ran(ran, route, parts):
    ran.assert_only(route, parts if route != "rule" else ())


# ---- conv2d ----

# (input shape, weight shape, stride, padding, dilation, groups): channels that end in partial
# 16- and 32-channel tile steps, output pixels that end in partial 32-pixel blocks, strides,
# dilations, asymmetric 'same' padding, 1x1, the reports' first layers (planar), depthwise and
# grouped convolutions; every route runs some of them.
CONV_GEOMETRIES = [
    ((2, 16, 9, 11), (32, 16, 3, 3), 1, 1, 1, 1),
    ((3, 17, 7, 13), (33, 17, 3, 2), 2, 1, 1, 1),
    ((1, 33, 10, 9), (17, 33, 5, 3), (2, 3), (2, 1), (1, 2), 1),
    ((2, 40, 6, 6), (16, 40, 1, 1), 1, 0, 1, 1),
    ((2, 20, 8, 8), (24, 20, 4, 4), 1, "same", 1, 1),
    ((3, 1, 16, 16), (8, 1, 4, 4), 1, 0, 1, 1),
    ((2, 3, 13, 15), (16, 3, 3, 3), 1, 1, 1, 1),
    ((2, 24, 11, 9), (24, 1, 3, 3), 1, 1, 1, 24),
    ((2, 40, 14, 14), (40, 1, 5, 5), 2, 2, 1, 40),
    ((2, 12, 9, 9), (18, 4, 3, 3), 1, 1, 1, 3),
]


def conv_call_args(stride, padding, dilation):
    """conv2d_backward's (stride, padding, dilation) for ops.conv2d's arguments ('same': zeros)."""
    pair = lambda value: [value, value] if isinstance(value, int) else list(value)  # noqa: E731
    return pair(stride), [0, 0] if padding == "same" else pair(padding), pair(dilation)


def conv_reference(x, w, b, g, **conv_args):
    """Output and gradients (input, weight, bias) in float64 of float64 operands."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = F.conv2d(x, w, b, **conv_args)
    out.backward(g)
    return out.detach(), x.grad, w.grad, b.grad


def run_conv_route(route, x, w, b, dtype, **conv_args):
    """ops.conv2d and every gradient by `route`, forced and checked to have run every part: the
    output, the gradients and the output gradient (in the dtype and in float64)."""
    with forced_route(route) as ran:
        out = ops.conv2d(x, w, b, **conv_args)
        g, g64 = reduced_tensor(out.shape, dtype)
        stride, padding, dilation = conv_call_args(conv_args["stride"], conv_args["padding"], conv_args["dilation"])
        grads = conv2d_backward(
            g, x, w, stride, padding, dilation, conv_args["groups"], conv_args["padding"] == "same", [True] * 3
        )
    assert_ran(ran, route, CONV_PARTS)
    return out, grads, g64


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    amx_marked(with_routes(CONV_GEOMETRIES, conv2d_runnable, REDUCED_CONV_ROUTES, dtypes=REDUCED_DTYPES)),
)
def test_conv2d_matches_float64_reference(input_shape, weight_shape, stride, padding, dilation, groups, dtype, route):
    conv_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x, x64 = reduced_tensor(input_shape, dtype)
    w, w64 = reduced_tensor(weight_shape, dtype, scale=0.5)
    b, b64 = reduced_tensor(weight_shape[:1], dtype)
    out, grads, g64 = run_conv_route(route, x, w, b, dtype, **conv_args)
    reference = conv_reference(x64, w64, b64, g64, **conv_args)
    magnitude = conv_reference(x64.abs(), w64.abs(), b64.abs(), g64.abs(), **conv_args)
    taps = weight_shape[2] * weight_shape[3]
    pixels = out[:, 0].numel()
    reductions = (weight_shape[1] * taps, weight_shape[0] // groups * taps, pixels, pixels)
    bias_term = b64.view(1, -1, 1, 1).expand_as(reference[0])
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    for name, actual, expected, size, n in zip(names, (out, *grads), reference, magnitude, reductions):
        assert_within_bound(actual, expected, size, n, dtype, bias_term if name == "output" else None, f"{route} {name}")


MASK_SHAPE = ((2, 32, 10, 10), (16, 32, 3, 3), 1, 1, 1, 1)


@pytest.mark.kernel_grid
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True]])
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    amx_marked(with_routes([MASK_SHAPE], conv2d_runnable, REDUCED_CONV_ROUTES, dtypes=REDUCED_DTYPES,
                           every_route=False)),  # fmt: skip
)
def test_conv2d_backward_output_masks(input_shape, weight_shape, stride, padding, dilation, groups, dtype, route, mask):
    x, x64 = reduced_tensor(input_shape, dtype)
    w, w64 = reduced_tensor(weight_shape, dtype)
    g, g64 = reduced_tensor((input_shape[0], weight_shape[0], *input_shape[2:]), dtype)
    with forced_route(route):
        grads = conv2d_backward(g, x, w, [1, 1], [1, 1], [1, 1], 1, False, mask)
    zero_bias = torch.zeros(weight_shape[0], dtype=torch.float64)
    reference = conv_reference(x64, w64, zero_bias, g64, padding=1)[1:]
    magnitude = conv_reference(x64.abs(), w64.abs(), zero_bias, g64.abs(), padding=1)[1:]
    for needed, actual, expected, size, n in zip(mask, grads, reference, magnitude, (16 * 9, 200, 200)):
        if needed:
            assert_within_bound(actual, expected, size, n, dtype, what=f"{route} {mask}")
        else:
            assert actual.numel() == 0 and actual.dtype == dtype


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    amx_marked(with_routes(CONV_GEOMETRIES[:4] + CONV_GEOMETRIES[5:8], conv2d_runnable, OUR_REDUCED_CONV_ROUTES,
                           dtypes=REDUCED_DTYPES)),  # fmt: skip
)
def test_conv2d_propagates_nan_and_inf_like_torch(input_shape, weight_shape, stride, padding, dilation, groups, dtype,
                                                  route):  # fmt: skip
    """NaN and infinity in the input reach the output and every gradient of our routes where
    torch's float64 convolution's reach (torch's own bfloat16 kernel, oneDNN's, spreads NaN over
    more of the weight gradient); the amx weight gradient, whose tiles would multiply them by the
    zeros past each row, hands such input to our float kernels."""
    conv_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x, x64 = reduced_tensor(input_shape, dtype)
    x[0, 0, 1, -1] = x64[0, 0, 1, -1] = float("inf")
    x[-1, -1, -1, 2] = x64[-1, -1, -1, 2] = float("nan")
    w, w64 = reduced_tensor(weight_shape, dtype, scale=0.5)
    b, b64 = reduced_tensor(weight_shape[:1], dtype)
    out, grads, g64 = run_conv_route(route, x, w, b, dtype, **conv_args)
    reference = conv_reference(x64, w64, b64, g64, **conv_args)
    for name, actual, expected in zip(("output", "grad_input", "grad_weight", "grad_bias"), (out, *grads), reference):
        assert torch.equal(actual.isnan(), expected.isnan()), f"{route} {name}: NaN places"
        assert torch.equal(actual.isinf(), expected.isinf()), f"{route} {name}: infinity places"


# ---- linear_relu ----

# (input shape, out_features): rows, features and outputs that end in partial 16- and 32-wide
# tile steps; wide layers for the streamed route.
LINEAR_SHAPES = [((24, 130), 96), ((7, 33), 70), ((40, 70), 29), ((100, 33), 150), ((33, 32), 17), ((2, 3, 64), 48)]


def linear_cases(routes=REDUCED_LINEAR_ROUTES):
    return amx_marked(with_routes(LINEAR_SHAPES, linear_relu_runnable, routes, dtypes=REDUCED_DTYPES))


def linear_relu_gradients(grad_pre, x, w):
    """(input, weight, bias) gradients in float64 from the masked grad_output."""
    return grad_pre @ w, grad_pre.t() @ x, grad_pre.sum(0)


@pytest.mark.kernel_grid
@pytest.mark.parametrize("input_shape, out_features, dtype, route", linear_cases())
def test_linear_relu_matches_float64_reference(input_shape, out_features, dtype, route):
    in_features = input_shape[-1]
    x, x64 = reduced_tensor(input_shape, dtype)
    w, w64 = reduced_tensor((out_features, in_features), dtype, scale=0.3)
    b, b64 = reduced_tensor((out_features,), dtype)
    with forced_route(route) as ran:
        out = ops.linear_relu(x, w, b)
        g, g64 = reduced_tensor(out.shape, dtype)
        grads = linear_relu_backward(g, out, x, w, [True, True, True])
    assert_ran(ran, route, LINEAR_PARTS)
    u = UNIT_ROUNDOFF[dtype]
    x64, g64, out2 = x64.reshape(-1, in_features), g64.reshape(-1, out_features), out.reshape(-1, out_features)
    pre = F.linear(x64, w64, b64)
    pre_magnitude = F.linear(x64.abs(), w64.abs(), b64.abs())
    assert_within_bound(out2, torch.relu(pre), pre_magnitude, in_features, dtype, b64.expand_as(pre), f"{route} output")
    # The ReLU mask is our rounded output's sign, as torch's is its rounded linear's; it agrees
    # with the exact pre-activation's wherever that is clear of the rounding.
    mask = out2.double() > 0
    clear = pre.abs() > bound(pre, pre_magnitude, in_features, dtype, b64.expand_as(pre))
    assert bool((mask == (pre > 0))[clear].all()), f"{route}: ReLU mask differs from the exact one"
    grad_pre = g64 * mask
    reference = linear_relu_gradients(grad_pre, x64, w64)
    magnitude = linear_relu_gradients(grad_pre.abs(), x64.abs(), w64.abs())
    rows = x64.shape[0]
    actual = (grads[0].reshape(-1, in_features), grads[1], grads[2])
    for name, a, expected, size, n in zip(("grad_input", "grad_weight", "grad_bias"), actual, reference, magnitude,
                                          (out_features, rows, rows)):  # fmt: skip
        assert_within_bound(a, expected, size, n, dtype, what=f"{route} {name}")


@pytest.mark.kernel_grid
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [True, True, False]])
@pytest.mark.parametrize(
    "input_shape, out_features, dtype, route",
    amx_marked(with_routes([((40, 96), 80)], linear_relu_runnable, REDUCED_LINEAR_ROUTES, dtypes=REDUCED_DTYPES)),
)
def test_linear_relu_backward_output_masks(input_shape, out_features, dtype, route, mask):
    x, x64 = reduced_tensor(input_shape, dtype)
    w, w64 = reduced_tensor((out_features, input_shape[1]), dtype, scale=0.3)
    out = torch.relu(torch.randn(input_shape[0], out_features)).to(dtype)
    g, g64 = reduced_tensor(out.shape, dtype)
    with forced_route(route):
        grads = linear_relu_backward(g, out, x, w, mask)
    grad_pre = g64 * (out.double() > 0)
    reference = linear_relu_gradients(grad_pre, x64, w64)
    magnitude = linear_relu_gradients(grad_pre.abs(), x64.abs(), w64.abs())
    for needed, actual, expected, size, n in zip(mask, grads, reference, magnitude, (out_features, 40, 40)):
        if needed:
            assert_within_bound(actual, expected, size, n, dtype, what=f"{route} {mask}")
        else:
            assert actual.numel() == 0 and actual.dtype == dtype


@pytest.mark.kernel_grid
@pytest.mark.parametrize("input_shape, out_features, dtype, route", linear_cases(OUR_REDUCED_LINEAR_ROUTES))
def test_linear_relu_propagates_nan_and_inf_like_torch(input_shape, out_features, dtype, route):
    x, x64 = reduced_tensor(input_shape, dtype)
    flat, flat64 = x.view(-1, input_shape[-1]), x64.view(-1, input_shape[-1])
    flat[1, 3] = flat64[1, 3] = float("nan")
    flat[-1, -1] = flat64[-1, -1] = float("inf")
    w, w64 = reduced_tensor((out_features, input_shape[-1]), dtype, scale=0.3)
    with forced_route(route):
        out = ops.linear_relu(x, w)
    expected = torch.relu(F.linear(x64, w64))
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())


# ---- the amx route: the tile model, determinism, hardware against model ----


# The routes that multiply bfloat16 in hardware (or in its model), each with why it cannot run here.
HARDWARE_BF16_ROUTES = [
    pytest.param("amx", marks=(needs_tiles, pytest.mark.amx_grid), id="amx"),
    pytest.param("bf16dot", marks=needs_bf16dot, id="bf16dot"),
]


@pytest.mark.parametrize("route", HARDWARE_BF16_ROUTES)
def test_bf16_instructions_read_denormal_inputs_as_zero_and_flush_denormal_sums(route):
    """TDPBF16PS and VDPBF16PS ignore MXCSR: a denormal bfloat16 input counts as zero, and a
    float32 sum that is denormal becomes zero; our float32 routes keep both (2^-130 is a bfloat16
    denormal)."""
    x = torch.zeros(32, 32, dtype=torch.bfloat16)
    w = torch.zeros(16, 32, dtype=torch.bfloat16)
    x[0, 0] = 2.0**-130  # a bfloat16 denormal
    w[0, 0] = 1.0
    x[1, 0] = w[1, 0] = 2.0**-65  # normal, their product a float32 denormal
    with forced_route(route):
        flushed = ops.linear_relu(x, w)
    with forced_route("tiles"):
        float32 = ops.linear_relu(x, w)
    assert flushed[0, 0].item() == 0.0 and flushed[1, 1].item() == 0.0
    assert float32[0, 0].item() == 2.0**-130 and float32[1, 1].item() == 2.0**-130


@needs_tiles
@pytest.mark.amx_grid
def test_amx_results_do_not_depend_on_the_thread_count():
    x = torch.randn(2, 33, 12, 12).bfloat16()
    w = torch.randn(40, 33, 3, 3).bfloat16()
    a = torch.randn(70, 96).bfloat16()
    m = torch.randn(50, 96).bfloat16()

    def run():
        with forced_route("amx"):
            out = ops.conv2d(x, w, padding=1)
            grads = conv2d_backward(torch.ones_like(out), x, w, [1, 1], [1, 1], [1, 1], 1, False, [True, True, True])
            lin = ops.linear_relu(a, m)
            lin_grads = linear_relu_backward(torch.ones_like(lin), lin, a, m, [True, True, True])
        return out, *grads, lin, *lin_grads

    one, two = on_one_and_two_threads(run)
    for x1, x2 in zip(one, two):
        assert torch.equal(x1, x2)


@needs_tiles
@pytest.mark.amx_grid
def test_amx_is_the_rule_for_wide_bf16_layers_in_a_training_step():
    torch.manual_seed(2)
    model = SmallNet(in_channels=32)
    x = torch.randn(4, 32, 8, 8)
    with forced_route("rule") as ran:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    calls = ran.calls()
    assert {route for (part, route) in calls if part.startswith(("conv2d", "linear_relu"))} == {"amx"}, dict(calls)


# bf16dot's register tiles: 1-12 rows (even runs of at most 12: 13 rows are 7 + 6), 1-32
# columns in one or two vectors, reductions of one index, odd (a last pair half zero) and even;
# forwards with at least as many rows as outputs (x read in place) and with fewer (out^T = w x^T,
# the tile stored transposed: the first five and the last).
BF16DOT_EDGES = [
    ((1, 1), 2), ((13, 3), 16), ((12, 2), 17), ((25, 65), 33), ((2, 31), 32),
    ((97, 64), 5), ((40, 7), 29), ((33, 3), 33), ((45, 9), 100),
]  # fmt: skip


@needs_bf16dot
@pytest.mark.parametrize("input_shape, out_features", BF16DOT_EDGES)
def test_bf16dot_tile_edges_match_float64_reference(input_shape, out_features):
    """Forward, input and weight gradients of each edge against float64 from the same bfloat16
    values (the input gradient's tiles span in_features, the weight gradient's out_features)."""
    dtype = torch.bfloat16
    rows, in_features = input_shape
    x, x64 = reduced_tensor(input_shape, dtype)
    w, w64 = reduced_tensor((out_features, in_features), dtype, scale=0.3)
    b, b64 = reduced_tensor((out_features,), dtype)
    with forced_route("bf16dot") as ran:
        out = ops.linear_relu(x, w, b)
        g, g64 = reduced_tensor(out.shape, dtype)
        grads = linear_relu_backward(g, out, x, w, [True, True, False])
    assert_ran(ran, "bf16dot", LINEAR_PARTS)
    pre = F.linear(x64, w64, b64)
    magnitude = F.linear(x64.abs(), w64.abs(), b64.abs())
    assert_within_bound(out, torch.relu(pre), magnitude, in_features, dtype, b64.expand_as(pre), "output")
    grad_pre = g64 * (out.double() > 0)
    reference = linear_relu_gradients(grad_pre, x64, w64)
    size = linear_relu_gradients(grad_pre.abs(), x64.abs(), w64.abs())
    for name, actual, expected, magnitude, n in zip(("grad_input", "grad_weight"), grads, reference, size,
                                                    (out_features, rows)):  # fmt: skip
        assert_within_bound(actual, expected, magnitude, n, dtype, what=name)


@needs_bf16dot
def test_bf16dot_results_do_not_depend_on_the_thread_count():
    a = torch.randn(70, 97).bfloat16()
    m = torch.randn(45, 97).bfloat16()
    c = torch.randn(45).bfloat16()

    def run():
        with forced_route("bf16dot"):
            lin = ops.linear_relu(a, m, c)
            return lin, *linear_relu_backward(torch.randn_like(lin, generator=torch.Generator().manual_seed(3)),
                                              lin, a, m, [True, True, True])  # fmt: skip

    one, two = on_one_and_two_threads(run)
    for x1, x2 in zip(one, two):
        assert torch.equal(x1, x2)


def test_bf16dot_route_runs_here_or_says_why_not():
    """bf16dot's grids run in this process where the CPU has AVX512-BF16; elsewhere the skip says why."""
    if not HAS_BF16DOT:
        pytest.skip(_BF16DOT_WHY_NOT)
    assert "bf16dot" in REDUCED_LINEAR_ROUTES and kernel_tiles()["isa"] in ("avx512", "amx")
    assert linear_relu_route_table((4, 8), 4, torch.float16)["linear_relu_forward"]["bf16dot"] == (
        "bf16dot runs bfloat16 layers; this one is Half"
    )


AGREEMENT_CASES = """
import torch, lightning_hw.ops as ops
torch.manual_seed(7)
x = torch.randn(2, 33, 9, 11).bfloat16(); w = torch.randn(40, 33, 3, 3).bfloat16(); b = torch.randn(40).bfloat16()
a = torch.randn(70, 100).bfloat16(); m = torch.randn(50, 100).bfloat16(); c = torch.randn(50).bfloat16()
out = ops.conv2d(x, w, b, stride=2, padding=1)
grads = torch.ops.lightning_hw.conv2d_backward(torch.ones_like(out), x, w, [2, 2], [1, 1], [1, 1], 1, False, [True] * 3)
lin = ops.linear_relu(a, m, c)
lin_grads = torch.ops.lightning_hw.linear_relu_backward(torch.ones_like(lin), lin, a, m, [True] * 3)
"""


@pytest.mark.skipif(kernel_tiles()["isa"] != "amx", reason="this process does not run the AMX hardware tiles")
def test_amx_hardware_agrees_with_the_tile_model(tmp_path):
    """The same cases on the tiles and on their scalar model (a subprocess), within the bound of
    each against float64: the two may differ in the order of float32 additions only."""
    path = tmp_path / "emulated.pt"
    code = AGREEMENT_CASES + f"torch.save([out, *grads, lin, *lin_grads], {str(path)!r})\n"
    env = {**os.environ, "LIGHTNING_HW_CPU_ISA": "amx-emulated", "LIGHTNING_HW_ROUTE": "amx"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    emulated = torch.load(path, weights_only=True)
    scope = {}
    with forced_route("amx"):
        exec(AGREEMENT_CASES, scope)  # noqa: S102  (the cases above, in this process)
    hardware = [scope["out"], *scope["grads"], scope["lin"], *scope["lin_grads"]]
    reductions = (33 * 9, 40 * 9, 2 * 5 * 6, 2 * 5 * 6, 100, 50, 70, 70)
    for h, e, n in zip(hardware, emulated, reductions):
        allowed = 2 * bound(h.double(), h.double().abs(), n, torch.bfloat16)
        assert bool(((h.double() - e.double()).abs() <= allowed + 2 * UNIT_ROUNDOFF[torch.bfloat16]).all())


@pytest.mark.parametrize(
    "case, message",
    [
        ("rows", "LDTILECFG tile 0 with 17 rows of 64 bytes (palette 1: at most 16 rows of 64 bytes"),
        ("bytes", "LDTILECFG tile 0 with 16 rows of 68 bytes (palette 1: at most 16 rows of 64 bytes"),
        ("half-empty", "rows and bytes per row must be both zero or both set"),
        ("unconfigured", "TILELOADD with no tile configuration loaded"),
        ("empty", "TILELOADD uses tile 5, which the configuration leaves empty"),
        ("released", "TDPBF16PS (dst) with no tile configuration loaded"),
        ("shapes", "TDPBF16PS shapes disagree: dst 16x64 bytes, src1 16x64, src2 8x64"),
        ("multiple of 4", "TDPBF16PS with bytes per row not a multiple of 4"),
    ],
)
def test_the_tile_model_refuses_what_the_hardware_faults_on(case, message):
    with pytest.raises(RuntimeError, match=rf"AMX emulation: .*{message.split('(')[0]}") as error:
        torch.ops.lightning_hw._amx_emulation_fault(case)
    assert message in str(error.value)


def test_amx_route_runs_here_or_on_the_tile_model():
    """The amx route's grid runs in this process where it has tiles; elsewhere this says where."""
    variants = dict(line.split("\t") for line in torch.ops.lightning_hw.cpu_isa_variants())
    assert "amx-emulated" in variants and variants["amx-emulated"] == ""
    if not HAS_TILES:
        pytest.skip(f"{_AMX_WHY_NOT}; tests/test_isa_variants.py runs the amx_grid tests on amx-emulated")
    assert kernel_tiles()["isa"] in ("amx", "amx-emulated")


# ---- autocast ----


class SmallNet(nn.Module):
    """Both ops, as the reports' models use them; ours, or torch.nn's (conv, hidden)."""

    def __init__(self, conv=Conv2d, hidden=LinearReLU, in_channels=3):
        super().__init__()
        self.conv = conv(in_channels, 16, 3, padding=1)
        self.hidden = hidden(16 * 8 * 8, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.hidden(torch.relu(self.conv(x)).flatten(1)))


class TorchLinearReLU(nn.Sequential):
    def __init__(self, in_features, out_features):
        super().__init__(nn.Linear(in_features, out_features), nn.ReLU())


@pytest.mark.parametrize("dtype", REDUCED_DTYPES, ids=DTYPE_IDS.get)
def test_autocast_runs_the_ops_in_its_dtype(dtype):
    torch.manual_seed(3)
    ours = SmallNet()
    twin = SmallNet(nn.Conv2d, TorchLinearReLU)
    ours.load_state_dict(twin.state_dict())
    x = torch.randn(6, 3, 8, 8)
    seen = []
    for module in (ours.conv, ours.hidden):
        module.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=dtype):
        out = ours(x)
        expected = twin(x)
    assert seen == [dtype, dtype]
    out.float().sum().backward()
    expected.float().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        # float32 master weights get float32 gradients, as under torch.nn.
        assert p.grad.dtype == torch.float32, name
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=16 * UNIT_ROUNDOFF[dtype] * scale, msg=name)
    torch.testing.assert_close(out, expected, rtol=0, atol=16 * UNIT_ROUNDOFF[dtype] * expected.abs().max().item())


def test_autocast_reads_its_dtype_at_call_time_and_leaves_float64_alone():
    x, w = torch.randn(4, 10), torch.randn(6, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear_relu(x, w).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert ops.linear_relu(x, w).dtype == torch.float16
        assert ops.conv2d(x.double().view(1, 1, 4, 10), w.double()[:3, :3].view(1, 1, 3, 3)).dtype == torch.float64
    assert ops.linear_relu(x, w).dtype == torch.float32


def test_bf16_mixed_training_step_runs_our_ops_in_bf16(tmp_path):
    torch.manual_seed(0)

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallNet()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Classifier()
    seen = []
    model.net.conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = model.net.conv.weight.detach().clone()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))
    trainer = pl.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model.net.conv.weight.dtype == torch.float32
    assert not torch.equal(model.net.conv.weight, before)


# ---- opcheck, compile ----


@pytest.mark.parametrize("dtype", REDUCED_DTYPES, ids=DTYPE_IDS.get)
def test_opcheck(dtype):
    x = torch.randn(2, 3, 9, 9, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_hw.conv2d.default, (x, w, b, [1, 1], [1, 1], [1, 1], 1, False))
    xl = torch.randn(5, 12, dtype=dtype, requires_grad=True)
    wl = torch.randn(7, 12, dtype=dtype, requires_grad=True)
    bl = torch.randn(7, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_hw.linear_relu.default, (xl, wl, bl))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_under_autocast_matches_eager(backend):
    torch.manual_seed(5)
    model = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        traced = compiled(x)
    assert traced.dtype == eager.dtype
    # Both run our ops on the same bfloat16 operands; inductor may fuse the casts and the
    # elementwise ops around them in float32 (one bfloat16 rounding less or more).
    tolerance = 0 if backend == "aot_eager" else 4 * UNIT_ROUNDOFF[torch.bfloat16] * eager.abs().max().item()
    torch.testing.assert_close(traced, eager, rtol=0, atol=tolerance)
