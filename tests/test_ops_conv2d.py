"""lightning_hw.ops.conv2d (CPU kernels) against torch.nn.functional.conv2d:
forward and every gradient over a grid of geometries, layouts and dtypes, plus
gradcheck, opcheck, torch.compile, argument errors and determinism.

The grids (marked kernel_grid) run each of our routes (tests/routes.py) forced
on every geometry it can run, and check that it ran; each route, torch's
included, has a list of geometries of its own, and shapes that end in partial
tiles of this process's kernel variant (tests/tiles.py). The other tests run
the built-in rule (timing is off in the tests, tests/conftest.py); the timed
choice is tested in test_route_choice.py."""

import re

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
import torch.nn.functional as F

import lightning_hw.ops as ops

import tiles
from routes import (
    CONV_PARTS,
    CONV_ROUTES,
    CPU_DTYPES,
    DTYPE_IDS,
    OUR_CONV_ROUTES,
    conv2d_runnable,
    forced_route,
    on_one_and_two_threads,
    with_routes,
)

conv2d_backward = torch.ops.lightning_hw.conv2d_backward.default


def tolerances(dtype, reference):
    """float64: tight. float32: relative 1e-4, absolute scaled by the magnitude
    of the reference (sums of many products lose absolute precision)."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return dict(rtol=1e-4, atol=1e-4 * scale)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **tolerances(expected.dtype, expected))


def make_layout(tensor, layout):
    """The same values as `tensor`, in the requested memory layout."""
    if layout == "contiguous":
        return tensor.contiguous()
    if layout == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other element of a larger tensor, nonzero offset
        big = torch.zeros(
            tensor.shape[0], tensor.shape[1] * 2 + 1, tensor.shape[2], tensor.shape[3] * 2,
            dtype=tensor.dtype,
        )
        view = big[:, 1::2, :, ::2]
        view.copy_(tensor)
        return view
    if layout == "transposed":  # H and W swapped in memory
        return tensor.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


def compare_with_torch(
    input_shape,
    weight_shape,
    *,
    bias=True,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    dtype=torch.float32,
    layout="contiguous",
    grad_layout="contiguous",
):
    """Forward and gradients (input, weight, bias) of ours against torch."""
    x0 = torch.randn(input_shape, dtype=dtype)
    w0 = torch.randn(weight_shape, dtype=dtype)
    b0 = torch.randn(weight_shape[0], dtype=dtype) if bias else None
    unbatched = len(input_shape) == 3
    if unbatched:
        x = make_layout(x0.unsqueeze(0), layout).squeeze(0)
    else:
        x = make_layout(x0, layout)
    w = make_layout(w0, layout if layout != "sliced" else "contiguous")
    leaves = [x.requires_grad_(), w.requires_grad_()]
    if bias:
        leaves.append(b0.requires_grad_())
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]

    out = ops.conv2d(x, w, b0, stride, padding, dilation, groups)
    ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, stride, padding, dilation, groups)
    assert out.shape == ref.shape
    assert out.is_contiguous()
    assert_close(out, ref)

    if grad_layout == "expanded":  # zero strides, as the gradient of a sum().
        grad = torch.randn(ref.shape[:-2] + (1, 1), dtype=dtype).expand(ref.shape)
    elif grad_layout == "channels_last" and not unbatched:
        grad = torch.randn(ref.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        grad = torch.randn(ref.shape, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    for ours, theirs, leaf in zip(grads, ref_grads, leaves):
        assert ours.shape == leaf.shape
        assert ours.is_contiguous()
        assert_close(ours, theirs)


def compare_on_route(route, input_shape, weight_shape, **kwargs):
    """compare_with_torch with `route` forced; it must have run every part (forward, input,
    weight and bias gradients) of a non-empty batch."""
    with forced_route(route) as ran:
        compare_with_torch(input_shape, weight_shape, **kwargs)
    ran.assert_only(route, CONV_PARTS if input_shape[0] > 0 else ())


# (input shape, weight shape, stride, padding, dilation, groups)
GEOMETRIES = [
    pytest.param((2, 3, 9, 8), (5, 3, 3, 3), 1, 0, 1, 1, id="basic"),
    pytest.param((2, 3, 10, 10), (40, 3, 3, 3), 1, 1, 1, 1, id="pad1-cout40"),
    pytest.param((3, 4, 10, 11), (6, 2, 3, 2), (2, 3), (1, 2), (2, 1), 2, id="stride-pad-dil-pairs-groups"),
    pytest.param((2, 6, 7, 7), (6, 1, 3, 3), 1, "same", 1, 6, id="depthwise-same"),
    pytest.param((2, 8, 9, 9), (16, 1, 3, 3), 2, 1, 1, 8, id="depthwise-multiplier-stride2"),
    pytest.param((2, 5, 7, 8), (7, 5, 4, 2), 1, "same", 2, 1, id="same-even-kernel-dilated"),
    pytest.param((2, 4, 6, 7), (4, 4, 2, 2), 1, "same", 1, 1, id="same-even-kernel"),
    pytest.param((2, 5, 8, 9), (6, 5, 3, 3), 1, "valid", 1, 1, id="valid"),
    pytest.param((1, 1, 12, 12), (8, 1, 4, 4), 1, 0, 1, 1, id="cin1-fruit-like"),
    pytest.param((2, 40, 6, 5), (70, 40, 1, 1), 2, 3, 1, 1, id="1x1-padding-larger-than-kernel"),
    pytest.param((2, 16, 9, 9), (33, 16, 3, 3), 1, 1, 1, 1, id="cout33-tail-block"),
    pytest.param((2, 20, 7, 6), (24, 20, 3, 3), (2, 1), (0, 2), (1, 2), 1, id="cin20-strided"),
    pytest.param((2, 12, 5, 21), (36, 4, 2, 5), (1, 3), 2, (2, 1), 3, id="groups3-wide"),
    pytest.param((1, 3, 4, 4), (2, 3, 4, 4), 1, 0, 1, 1, id="kernel-equals-input"),
    pytest.param((2, 2, 1, 1), (3, 2, 3, 3), 1, 1, 1, 1, id="1x1-input-padded"),
    # Planar weight gradient reading grad_output rows in place (whole vectors wide).
    pytest.param((2, 3, 10, 32), (32, 3, 3, 3), 1, 1, 1, 1, id="cifar-like-rows-in-place"),
    pytest.param((2, 4, 9, 16), (6, 2, 3, 3), 1, (1, 2), (1, 2), 2, id="planar-groups-dilated-in-place"),
    # Rows in several chunks per image, parts crossing image boundaries.
    pytest.param((2, 1, 80, 200), (8, 1, 4, 4), 1, 0, 1, 1, id="cin1-tall-chunks"),
    # Planar tiles of several rows, the last overlapping its predecessor.
    pytest.param((8, 3, 11, 20), (4, 3, 3, 3), 1, 1, 1, 1, id="planar-multi-row-overlap"),
]


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    with_routes(GEOMETRIES, conv2d_runnable, OUR_CONV_ROUTES),
)
def test_matches_torch_geometries(input_shape, weight_shape, stride, padding, dilation, groups, dtype, route):
    torch.manual_seed(0)
    compare_on_route(
        route, input_shape, weight_shape, stride=stride, padding=padding, dilation=dilation, groups=groups, dtype=dtype
    )


# Geometries each route must run, forward and every gradient: our depthwise, planar
# (stride 1, few channels or a short reduction) and direct kernels (every other shape,
# and the planar ones), and torch's own convolution (every shape its symmetric padding
# can express). (input shape, weight shape, stride, padding, dilation, groups)
ROUTE_GEOMETRIES = {
    "direct": [
        pytest.param((2, 20, 9, 8), (40, 20, 3, 3), 1, 1, 1, 1, id="many-channels"),
        pytest.param((2, 3, 12, 12), (8, 3, 3, 3), 1, 1, 1, 1, id="few-channels"),
        pytest.param((2, 6, 8, 8), (10, 6, 4, 4), 1, "same", 1, 1, id="same-even-kernel"),
        pytest.param((2, 16, 11, 9), (32, 8, 1, 1), 2, 0, 1, 2, id="pointwise-strided-grouped"),
        pytest.param((2, 12, 5, 21), (36, 4, 2, 5), (1, 3), 2, (2, 1), 3, id="groups3-dilated-wide"),
    ],
    "planar": [
        pytest.param((2, 3, 12, 12), (8, 3, 3, 3), 1, 1, 1, 1, id="few-channels"),
        pytest.param((2, 4, 8, 8), (6, 4, 2, 2), 1, "same", 1, 1, id="same-even-kernel"),
        pytest.param((2, 4, 9, 16), (6, 2, 3, 3), 1, (1, 2), (1, 2), 2, id="groups-dilated-rows-in-place"),
        pytest.param((1, 1, 12, 12), (8, 1, 4, 4), 1, 0, 1, 1, id="one-input-channel"),
        pytest.param((2, 2, 1, 1), (3, 2, 3, 3), 1, 1, 1, 1, id="1x1-input-padded"),
    ],
    "depthwise": [
        pytest.param((2, 24, 9, 9), (24, 1, 3, 3), 2, 1, 1, 24, id="strided"),
        pytest.param((2, 18, 8, 7), (18, 1, 4, 2), 1, "same", 1, 18, id="same-even-kernel"),
        pytest.param((1, 40, 13, 12), (40, 1, 3, 3), (2, 1), (1, 2), (2, 1), 40, id="stride-pad-dil-pairs"),
    ],
    "aten": [
        pytest.param((2, 20, 9, 8), (40, 20, 3, 3), 1, 1, 1, 1, id="many-channels"),
        pytest.param((2, 3, 12, 12), (8, 3, 3, 3), 1, 1, 1, 1, id="few-channels"),
        pytest.param((2, 24, 9, 9), (24, 1, 3, 3), 2, 1, 1, 24, id="depthwise"),
        pytest.param((2, 16, 11, 9), (32, 8, 1, 1), 2, 0, 1, 2, id="pointwise-strided-grouped"),
        pytest.param((2, 5, 7, 8), (7, 5, 3, 3), 1, "same", 2, 1, id="same-odd-extent"),
    ],
}
assert set(ROUTE_GEOMETRIES) == set(CONV_ROUTES)


@pytest.mark.kernel_grid
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "route, input_shape, weight_shape, stride, padding, dilation, groups",
    [pytest.param(route, *case.values, id=f"{route}-{case.id}") for route, cases in ROUTE_GEOMETRIES.items()
     for case in cases],
)  # fmt: skip
def test_every_route_matches_torch(route, input_shape, weight_shape, stride, padding, dilation, groups, dtype):
    torch.manual_seed(1)
    compare_on_route(
        route, input_shape, weight_shape, stride=stride, padding=padding, dilation=dilation, groups=groups, dtype=dtype
    )


@pytest.mark.kernel_grid
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("input_shape, weight_shape, stride, padding, dilation, groups, route", tiles.conv2d_cases())
def test_partial_tiles_of_this_kernel_variant(input_shape, weight_shape, stride, padding, dilation, groups, route, dtype):
    torch.manual_seed(15)
    compare_on_route(
        route, input_shape, weight_shape, stride=stride, padding=padding, dilation=dilation, groups=groups, dtype=dtype
    )


# A route forced where it cannot run the part's shape: an error naming the route, the part,
# why, and the routes that can. (route, input shape, weight shape, kwargs, the part that
# refuses, what the message says)
REFUSED_ROUTES = [
    ("planar", (2, 20, 9, 8), (40, 20, 3, 3), dict(stride=2), "conv2d_forward", r"this convolution \(stride 2x2\) has 40 output channels per group"),
    ("planar", (2, 20, 9, 8), (8, 20, 3, 3), dict(padding=1), "conv2d_input_grad", r"the input gradient .* has 20 output channels per group and 72 multiply-adds"),
    ("depthwise", (2, 4, 6, 6), (4, 2, 3, 3), dict(groups=2), "conv2d_forward", r"in_channels == out_channels == groups; here in_channels 4, out_channels 4, groups 2"),
    ("direct", (2, 8, 6, 6), (8, 1, 3, 3), dict(groups=8), "conv2d_forward", r"a depthwise convolution .* runs the depthwise route"),
    ("aten", (2, 4, 8, 8), (6, 4, 4, 4), dict(padding="same"), "conv2d_forward", r"padding='same' with a kernel extent of 4x4 pads one side more"),
]  # fmt: skip


@pytest.mark.parametrize("route, input_shape, weight_shape, kwargs, part, reason", REFUSED_ROUTES)
def test_forcing_a_route_that_cannot_run_the_shape_is_an_error(route, input_shape, weight_shape, kwargs, part, reason):
    x = torch.randn(input_shape, requires_grad=True)
    w = torch.randn(weight_shape, requires_grad=True)
    with forced_route(route) as ran, pytest.raises(RuntimeError) as error:
        ops.conv2d(x, w, **kwargs).sum().backward()
    message = str(error.value)
    assert message.startswith(f"LIGHTNING_HW_ROUTE={route}: route '{route}' cannot run {part} of shape Float ")
    assert re.search(reason, message), message
    assert re.search(r"\(the routes that can: [a-z, ]+\)$", message), message
    # Parts before the refusing one ran the forced route; nothing ran another.
    assert {r for _, r in ran.calls()} <= {route}


# Depthwise convolutions (in_channels == out_channels == groups) take their own
# CPU path: channel vectors with tails (1, 3, 17, 33, 40 channels), strides,
# dilation, 'same', odd and tiny images, several row blocks per image.
# (input shape, kernel size, stride, padding, dilation)
DEPTHWISE = [
    pytest.param((2, 17, 7, 9), 3, 1, 1, 1, id="k3-c17-7x9"),
    pytest.param((3, 40, 9, 7), 3, 2, 1, 1, id="k3-stride2-c40"),
    pytest.param((1, 3, 8, 8), 5, 1, 2, 1, id="k5-c3-batch1"),
    pytest.param((4, 33, 11, 10), 5, 2, 2, 1, id="k5-stride2-c33"),
    pytest.param((2, 1, 9, 9), 3, 2, 0, 1, id="c1-stride2-valid"),
    pytest.param((2, 16, 10, 11), 3, 1, "same", 2, id="same-dilated"),
    pytest.param((2, 18, 8, 7), (4, 2), 1, "same", 1, id="same-even-kernel"),
    pytest.param((2, 40, 13, 12), 3, (2, 1), (1, 2), (2, 1), id="stride-pad-dil-pairs"),
    pytest.param((1, 24, 3, 3), 5, 1, 2, 1, id="kernel-larger-than-image"),
    pytest.param((2, 20, 5, 6), 3, 2, 3, 1, id="padding-beyond-kernel"),
    pytest.param((2, 9, 1, 1), 3, 1, 1, 1, id="1x1-image"),
    pytest.param((1, 16, 20, 3), (2, 4), (1, 3), (0, 2), (3, 1), id="narrow-rect-kernel"),
    pytest.param((2, 20, 50, 40), 3, 1, 1, 1, id="several-row-blocks"),
    pytest.param((2, 17, 61, 45), 3, 2, 1, 1, id="several-row-blocks-stride2"),
]


def _depthwise_weight_shape(channels, kernel):
    kernel_h, kernel_w = (kernel, kernel) if isinstance(kernel, int) else kernel
    return (channels, 1, kernel_h, kernel_w)


@pytest.mark.kernel_grid
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("input_shape, kernel, stride, padding, dilation", DEPTHWISE)
def test_depthwise_matches_torch(input_shape, kernel, stride, padding, dilation, dtype):
    torch.manual_seed(11)
    channels = input_shape[1]
    compare_on_route(
        "depthwise", input_shape, _depthwise_weight_shape(channels, kernel), stride=stride, padding=padding,
        dilation=dilation, groups=channels, dtype=dtype,
    )


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, "same", 2), ((2, 1), (0, 2), (1, 2))]
)
def test_depthwise_gradcheck(stride, padding, dilation):
    torch.manual_seed(12)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with forced_route("depthwise") as ran:
        assert torch.autograd.gradcheck(lambda *a: ops.conv2d(*a, stride, padding, dilation, 3), (x, w, b))
    ran.assert_only("depthwise", CONV_PARTS)


@pytest.mark.parametrize("mask", [[False, False, True], [False, True, False], [True, True, True]])
def test_depthwise_bias_grad_same_with_or_without_weight_grad(mask):
    torch.manual_seed(13)
    x = torch.randn(3, 20, 9, 9)
    w = torch.randn(20, 1, 3, 3)
    grad = torch.randn(3, 20, 5, 5)
    args = (x, w, [2, 2], [1, 1], [1, 1], 20, False)
    full = conv2d_backward(grad, *args, [True, True, True])
    partial = conv2d_backward(grad, *args, mask)
    for needed, ours, reference in zip(mask, partial, full):
        if needed:
            assert torch.equal(ours, reference)


@pytest.mark.parametrize(
    "input_shape, kernel, stride",
    [((4, 40, 13, 11), 3, 2), ((6, 24, 9, 9), 5, 1), ((2, 3, 30, 20), 3, 1), ((64, 48, 6, 6), 3, 1)],
)
def test_depthwise_weight_grad_is_bitwise_identical_with_one_or_two_threads(input_shape, kernel, stride):
    torch.manual_seed(14)
    channels = input_shape[1]
    x = torch.randn(input_shape)
    w = torch.randn(channels, 1, kernel, kernel)
    padding = kernel // 2
    grad = torch.randn(ops.conv2d(x, w, None, stride, padding, 1, channels).shape)
    args = (grad, x, w, [stride] * 2, [padding] * 2, [1, 1], channels, False, [True, True, True])
    with forced_route("depthwise") as ran:
        results = on_one_and_two_threads(lambda: conv2d_backward(*args))
    ran.assert_only("depthwise", CONV_PARTS[1:])
    for one, two in zip(*results):
        assert torch.equal(one, two)


# (input shape, weight shape, stride, padding, dilation, groups)
LAYOUT_GEOMETRIES = [
    pytest.param((2, 4, 7, 9), (6, 4, 3, 3), 1, 1, 1, 1, id="few-channels"),
    pytest.param((2, 4, 7, 9), (4, 2, 3, 3), 1, 1, 1, 2, id="few-channels-per-group"),
    pytest.param((2, 32, 6, 6), (48, 32, 3, 3), 1, 0, 1, 1, id="many-channels"),
    pytest.param((2, 20, 7, 9), (20, 1, 3, 3), 1, 1, 1, 20, id="depthwise"),
]


@pytest.mark.kernel_grid
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "expanded"])
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    with_routes(LAYOUT_GEOMETRIES, conv2d_runnable, OUR_CONV_ROUTES, dtypes=[torch.float32]),
)
def test_matches_torch_layouts(input_shape, weight_shape, stride, padding, dilation, groups, dtype, route, layout,
                               grad_layout):  # fmt: skip
    torch.manual_seed(1)
    compare_on_route(
        route, input_shape, weight_shape, stride=stride, padding=padding, dilation=dilation, groups=groups,
        dtype=dtype, layout=layout, grad_layout=grad_layout,
    )


@pytest.mark.kernel_grid
@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    with_routes([pytest.param((1, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, id="3-to-4")], conv2d_runnable,
                ("direct", "planar")),
)  # fmt: skip
def test_batch_sizes_and_bias(input_shape, weight_shape, stride, padding, dilation, groups, dtype, route, batch, bias):
    torch.manual_seed(2)
    compare_on_route(
        route, (batch, *input_shape[1:]), weight_shape, bias=bias, stride=stride, padding=padding, dilation=dilation,
        groups=groups, dtype=dtype,
    )


@pytest.mark.parametrize("padding", [0, "same"])
@pytest.mark.parametrize("weight_shape", [(5, 3, 3, 3), (6, 1, 3, 3)])
def test_unbatched_input(weight_shape, padding):
    torch.manual_seed(3)
    groups = 3 if weight_shape[1] == 1 else 1
    compare_with_torch((3, 7, 6), weight_shape, padding=padding, groups=groups)
    out = ops.conv2d(torch.randn(3, 7, 6), torch.randn(weight_shape), groups=groups, padding=padding)
    assert out.dim() == 3


def test_batch_zero_gives_empty_output_and_zero_parameter_grads():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = ops.conv2d(x, w, b, padding=1)
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_only_weight_grad_when_input_needs_none():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 9, 9)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    b = torch.randn(5)  # no grad either
    out = ops.conv2d(x, w, b, stride=2, padding=1)
    grad = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, [w], grad)
    w_ref = w.detach().clone().requires_grad_()
    (gw_ref,) = torch.autograd.grad(F.conv2d(x, w_ref, b, stride=2, padding=1), [w_ref], grad)
    assert_close(gw, gw_ref)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True]])
def test_backward_output_mask(mask):
    torch.manual_seed(5)
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(6, 4, 3, 3)
    grad = torch.randn(2, 6, 6, 6)
    full = conv2d_backward(grad, x, w, [1, 1], [1, 1], [1, 1], 1, False, [True, True, True])
    partial = conv2d_backward(grad, x, w, [1, 1], [1, 1], [1, 1], 1, False, mask)
    for needed, ours, reference in zip(mask, partial, full):
        if needed:
            assert torch.equal(ours, reference)
        else:
            assert ours.shape == (0,)


def test_backward_rejects_wrong_grad_output_shape():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="expected grad_output of size"):
        conv2d_backward(torch.randn(2, 6, 5, 6), x, w, [1, 1], [1, 1], [1, 1], 1, False, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_output type"):
        conv2d_backward(
            torch.randn(2, 6, 6, 6, dtype=torch.float64), x, w, [1, 1], [1, 1], [1, 1], 1, False,
            [True, True, True],
        )


@pytest.mark.parametrize(
    "bias, stride, padding, dilation, groups",
    [
        (True, 1, 0, 1, 1),
        (False, 1, 1, 1, 1),
        (True, 2, 1, 1, 1),
        (True, 1, "same", 2, 1),
        (True, (2, 1), (1, 0), (1, 2), 2),
        (False, 1, "same", 1, 4),
    ],
)
def test_gradcheck(bias, stride, padding, dilation, groups):
    torch.manual_seed(6)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def fn(*args):
        return ops.conv2d(args[0], args[1], args[2] if bias else None, stride, padding, dilation, groups)

    assert torch.autograd.gradcheck(fn, inputs)


OPCHECK_ARGS = [
    # (input shape, weight shape, bias, stride, padding, dilation, groups, pad_same)
    ((2, 3, 7, 7), (4, 3, 3, 3), True, [1, 1], [1, 1], [1, 1], 1, False),
    ((2, 4, 8, 6), (6, 2, 2, 3), False, [2, 1], [0, 1], [1, 2], 2, False),
    ((3, 6, 6), (5, 3, 4, 4), True, [1, 1], [0, 0], [1, 1], 1, True),
    ((2, 20, 5, 5), (24, 20, 3, 3), True, [1, 1], [1, 1], [1, 1], 1, False),
]


@pytest.mark.parametrize("input_shape, weight_shape, bias, stride, padding, dilation, groups, pad_same", OPCHECK_ARGS)
def test_opcheck_conv2d(input_shape, weight_shape, bias, stride, padding, dilation, groups, pad_same):
    torch.manual_seed(7)
    x = torch.randn(input_shape, requires_grad=True)
    w = torch.randn(weight_shape, requires_grad=True)
    b = torch.randn(weight_shape[0], requires_grad=True) if bias else None
    args = (x, w, b, stride, padding, dilation, groups, pad_same)
    torch.library.opcheck(torch.ops.lightning_hw.conv2d.default, args)


def test_opcheck_conv2d_channels_last():
    x = torch.randn(2, 3, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.lightning_hw.conv2d.default, (x, w, None, [1, 1], [1, 1], [1, 1], 1, False))


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False]])
def test_opcheck_conv2d_backward(mask):
    torch.manual_seed(8)
    x = torch.randn(2, 4, 7, 7)
    w = torch.randn(6, 2, 3, 3)
    grad = torch.randn(2, 6, 4, 7)
    args = (grad, x, w, [2, 1], [1, 1], [1, 1], 2, False, mask)
    torch.library.opcheck(conv2d_backward, args)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = torch.nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 0.3)

    def forward(self, x):
        x = torch.relu(ops.conv2d(x, self.w1, self.b1, padding=1))
        x = ops.conv2d(x, self.w2, None, stride=2, padding="valid", groups=2)
        return x.square().mean()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    torch.manual_seed(9)
    torch._dynamo.reset()
    model = TinyNet()
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    eager_loss = model(x)
    eager_grads = torch.autograd.grad(eager_loss, [x, *model.parameters()])
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    assert_close(loss, eager_loss)
    for ours, reference in zip(grads, eager_grads):
        assert_close(ours, reference)


def test_double_backward_is_refused():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = ops.conv2d(x, w)
    (gx,) = torch.autograd.grad(out.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


ERROR_CASES = [
    # (id, input shape, weight shape, bias shape, kwargs, exception, match)
    ("input-2d", (3, 8), (4, 3, 3, 3), None, {}, RuntimeError, r"expected 3D \(unbatched\) or 4D \(batched\) input"),
    ("input-5d", (1, 1, 3, 8, 8), (4, 3, 3, 3), None, {}, RuntimeError, r"expected 3D \(unbatched\) or 4D \(batched\) input"),
    ("weight-3d", (1, 3, 8, 8), (4, 3, 3), None, {}, RuntimeError, "expected weight to be 4D"),
    ("channel-mismatch", (1, 4, 8, 8), (4, 3, 3, 3), None, {}, RuntimeError, "to have 3 channels, but got 4 channels"),
    ("groups-not-dividing-out", (1, 4, 8, 8), (3, 2, 3, 3), None, {"groups": 2}, RuntimeError, "expected weight to be divisible by 2"),
    ("groups-not-dividing-in", (1, 5, 8, 8), (4, 2, 3, 3), None, {"groups": 2}, RuntimeError, "channels"),
    ("groups-zero", (1, 3, 8, 8), (4, 3, 3, 3), None, {"groups": 0}, RuntimeError, "non-positive groups"),
    ("groups-negative", (1, 3, 8, 8), (4, 3, 3, 3), None, {"groups": -1}, RuntimeError, "non-positive groups"),
    ("negative-padding", (1, 3, 8, 8), (4, 3, 3, 3), None, {"padding": -1}, RuntimeError, "negative padding"),
    ("stride-zero", (1, 3, 8, 8), (4, 3, 3, 3), None, {"stride": 0}, RuntimeError, "non-positive stride"),
    ("dilation-zero", (1, 3, 8, 8), (4, 3, 3, 3), None, {"dilation": 0}, RuntimeError, "dilation should be greater than zero"),
    ("same-strided", (1, 3, 8, 8), (4, 3, 3, 3), None, {"padding": "same", "stride": 2}, RuntimeError, "padding='same' is not supported for strided"),
    ("bad-padding-string", (1, 3, 8, 8), (4, 3, 3, 3), None, {"padding": "full"}, ValueError, "invalid padding string"),
    ("kernel-too-large", (1, 3, 4, 4), (4, 3, 5, 5), None, {}, RuntimeError, "Kernel size can't be greater than actual input size"),
    ("bias-wrong-size", (1, 3, 8, 8), (4, 3, 3, 3), (5,), {}, RuntimeError, "expected bias to be 1-dimensional with 4 elements"),
]


@pytest.mark.parametrize(
    "input_shape, weight_shape, bias_shape, kwargs, exception, match",
    [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES],
)
def test_argument_errors(input_shape, weight_shape, bias_shape, kwargs, exception, match):
    x = torch.randn(input_shape)
    w = torch.randn(weight_shape)
    b = torch.randn(bias_shape) if bias_shape else None
    with pytest.raises(Exception):  # torch rejects the same arguments
        F.conv2d(x, w, b, **kwargs)
    with pytest.raises(exception, match=match):
        ops.conv2d(x, w, b, **kwargs)


def test_mismatched_dtypes():
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w)
    with pytest.raises(RuntimeError, match=r"input type \(Float\) and weight type \(Double\) should be the same"):
        ops.conv2d(x, w)
    with pytest.raises(RuntimeError, match="bias type"):
        ops.conv2d(x, w.float(), torch.randn(4, dtype=torch.float64))


def test_unsupported_dtype():
    x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="supports dtypes"):
        ops.conv2d(x, torch.randn(4, 3, 3, 3, dtype=torch.bfloat16))


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    with_routes(
        [pytest.param((4, 3, 16, 16), (8, 3, 3, 3), 1, 1, 1, 1, id="few-channels"),
         pytest.param((2, 32, 10, 10), (64, 32, 3, 3), 1, 1, 1, 1, id="many-channels"),
         pytest.param((3, 1, 12, 12), (8, 1, 4, 4), 1, 1, 1, 1, id="one-input-channel")],
        conv2d_runnable, ("direct", "planar"), dtypes=[torch.float32],
    ),
)  # fmt: skip
def test_weight_grad_is_deterministic_and_thread_count_independent(
    input_shape, weight_shape, stride, padding, dilation, groups, dtype, route
):
    torch.manual_seed(10)
    x = torch.randn(input_shape)
    w = torch.randn(weight_shape)
    out_shape = ops.conv2d(x, w, padding=1).shape
    grad = torch.randn(out_shape)
    args = (grad, x, w, [1, 1], [1, 1], [1, 1], 1, False, [True, True, True])
    with forced_route(route) as ran:
        first = conv2d_backward(*args)
        single, double = on_one_and_two_threads(lambda: conv2d_backward(*args))
    ran.assert_only(route, CONV_PARTS[1:])
    for a, b, c in zip(first, single, double):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
