"""The CUDA kernels of lightning_hw.ops (conv2d, linear_relu) against torch on
the GPU: forward and every gradient over the CPU suite's geometry grid in
float32 (TF32 off), float16, bfloat16 and float64, gradcheck, opcheck,
determinism, layouts, device checks. Skipped without a CUDA GPU."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lightning_hw
import lightning_hw.ops as ops
from test_ops_conv2d import GEOMETRIES, make_layout

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
]

conv2d_backward = torch.ops.lightning_hw.conv2d_backward.default
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["f32", "f16", "bf16", "f64"]
# Error allowed of each element of a result, as a fraction of its own scale (the sum of the
# absolute values of the products it adds up, see scales_of): sums accumulate in float32, so the
# error is about the dtype's rounding of the result (bfloat16: 2^-8, float16: 2^-11), with a
# margin of 4 or more.
RELATIVE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2**-6}


@pytest.fixture(autouse=True)
def exact_float32_reference():
    """torch's float32 convolutions and GEMMs without TF32, as the kernels compute."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_extension_has_cuda_kernels():
    assert lightning_hw.has_cuda_kernels()


def scales_of(fn, leaves, grad):
    """The scale of each element of fn(*leaves) and of its gradients for `grad`: the same
    computation in float64 on the absolute values (a linear fn: sums of absolute products), which
    bounds what rounding can do to that element however much its terms cancel. Returns (output
    scale, gradient scales in the order of leaves)."""
    magnitudes = [t.detach().double().abs().requires_grad_() for t in leaves]
    out = fn(*magnitudes)
    return out.detach(), torch.autograd.grad(out, magnitudes, grad.double().abs())


def assert_close(actual, expected, scale):
    """`expected` is computed in float64 from the same (rounded) inputs; each element may be off
    by RELATIVE[dtype] of its own `scale` (scales_of)."""
    assert actual.dtype != torch.float64 or expected.dtype == torch.float64
    assert actual.shape == expected.shape == scale.shape
    error = (actual.double() - expected.double()).abs()
    allowed = RELATIVE[actual.dtype] * scale + torch.finfo(actual.dtype).tiny
    if not bool((error <= allowed).all()):
        worst = int((error - allowed).flatten().argmax())
        raise AssertionError(
            f"{int((error > allowed).sum())} of {error.numel()} elements off by more than {RELATIVE[actual.dtype]} of "
            f"their scale; worst at flat index {worst}: {actual.flatten()[worst].item()} vs "
            f"{expected.flatten()[worst].item()}, scale {scale.flatten()[worst].item()}"
        )


def on_cuda(tensor):
    """The same values with the same strides and storage offset, on the GPU."""
    storage = torch.zeros(tensor.untyped_storage().nbytes() // tensor.element_size(), dtype=tensor.dtype, device=DEVICE)
    out = storage.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
    out.copy_(tensor)
    return out


def compare_conv(input_shape, weight_shape, *, bias=True, stride=1, padding=0, dilation=1, groups=1,
                 dtype=torch.float32, layout="contiguous", grad_layout="contiguous"):
    """Forward and (input, weight, bias) gradients of ours in `dtype` against
    torch in float64 from the same values."""
    x0 = torch.randn(input_shape).to(dtype)
    w0 = torch.randn(weight_shape).to(dtype)
    unbatched = len(input_shape) == 3
    x = make_layout(x0.unsqueeze(0), layout).squeeze(0) if unbatched else make_layout(x0, layout)
    w = make_layout(w0, "contiguous" if layout == "sliced" else layout)
    leaves = [on_cuda(x).requires_grad_(), on_cuda(w).requires_grad_()]
    if bias:
        leaves.append(torch.randn(weight_shape[0], device=DEVICE).to(dtype).requires_grad_())
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]

    def reference(x, w, b=None):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    out = ops.conv2d(*leaves[:2], leaves[2] if bias else None, stride, padding, dilation, groups)
    ref = reference(*ref_leaves)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == leaves[0].device
    assert out.is_contiguous()

    if grad_layout == "expanded":
        grad = torch.randn(ref.shape[:-2] + (1, 1), device=DEVICE).to(dtype).expand(ref.shape)
    elif grad_layout == "channels_last" and not unbatched:
        grad = torch.randn(ref.shape, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    else:
        grad = torch.randn(ref.shape, device=DEVICE).to(dtype)
    out_scale, grad_scales = scales_of(reference, leaves, grad)
    assert_close(out, ref, out_scale)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for ours, theirs, leaf, scale in zip(grads, ref_grads, leaves, grad_scales):
        assert ours.shape == leaf.shape and ours.dtype == dtype
        assert ours.is_contiguous()
        assert_close(ours, theirs, scale)


# Shapes that reach every tile configuration, several reduce chunks, many
# weight-gradient splits, and the one-output-per-thread fallback.
KERNEL_PATHS = [
    pytest.param((2, 1, 32, 32), (8, 1, 4, 4), 1, 0, 1, 1, id="fruit-first-layer"),
    pytest.param((4, 3, 32, 32), (32, 3, 3, 3), 1, 1, 1, 1, id="cifar-first-layer"),
    pytest.param((2, 64, 12, 12), (96, 64, 3, 3), 1, 1, 1, 1, id="wide-several-reduce-chunks"),
    pytest.param((2, 40, 9, 9), (80, 40, 3, 3), 2, 1, 1, 1, id="wide-strided"),
    pytest.param((3, 8, 40, 40), (16, 8, 5, 5), 1, 2, 1, 1, id="many-pixels-wgrad-splits"),
    pytest.param((2, 32, 17, 19), (32, 1, 3, 3), 1, 1, 1, 32, id="depthwise"),
    pytest.param((1, 2, 150, 150), (3, 2, 3, 3), 1, 0, 60, 1, id="tile-too-big-fallback"),
    pytest.param((1, 3, 40, 37), (5, 3, 7, 7), 3, 5, 2, 1, id="stride3-dilated-large-kernel"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("input_shape, weight_shape, stride, padding, dilation, groups", GEOMETRIES + KERNEL_PATHS)
def test_conv2d_matches_torch(input_shape, weight_shape, stride, padding, dilation, groups, dtype):
    torch.manual_seed(1)
    compare_conv(input_shape, weight_shape, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, dtype=dtype)


_PER_OUTPUT_CHECK = """
import sys
sys.path.insert(0, {tests!r})
import torch
from test_ops_cuda import compare_conv, KERNEL_PATHS
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(2)
for case in KERNEL_PATHS[:5]:
    xs, ws, stride, padding, dilation, groups = case.values
    for dtype in (torch.float32, torch.float16):
        compare_conv(xs, ws, stride=stride, padding=padding, dilation=dilation, groups=groups, dtype=dtype)
print("ok")
"""


def test_conv2d_per_output_kernels_in_float32():
    """The one-output-per-thread kernels (float64's path, forced by environment)."""
    env = dict(os.environ, LIGHTNING_HW_CUDA_CONV="per_output")
    code = _PER_OUTPUT_CHECK.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_conv2d_layouts(layout, grad_layout, dtype):
    torch.manual_seed(3)
    compare_conv((2, 6, 9, 11), (12, 3, 3, 3), padding=1, groups=2, layout=layout, grad_layout=grad_layout, dtype=dtype)


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv2d_batch_sizes(batch, bias):
    torch.manual_seed(4)
    compare_conv((batch, 3, 8, 8), (4, 3, 3, 3), bias=bias, padding=1)


def test_conv2d_batch_zero_gives_zero_parameter_grads():
    x = torch.randn(0, 3, 8, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    out = ops.conv2d(x, w, b, padding=1)
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("padding", [0, "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_conv2d_unbatched(padding, dtype):
    torch.manual_seed(5)
    compare_conv((3, 7, 6), (5, 3, 3, 3), padding=padding, dtype=dtype)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True]])
def test_conv2d_backward_computes_only_the_masked_gradients(mask):
    torch.manual_seed(6)
    x, w = torch.randn(2, 4, 6, 6, device=DEVICE), torch.randn(6, 4, 3, 3, device=DEVICE)
    grad = torch.randn(2, 6, 3, 3, device=DEVICE)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, torch.zeros(6, device=DEVICE)))
    expected = torch.autograd.grad(F.conv2d(x64, w64, b64, stride=2, padding=1), (x64, w64, b64), grad.double())
    _, scales = scales_of(lambda *a: F.conv2d(*a, stride=2, padding=1), (x64, w64, b64), grad)
    grads = conv2d_backward(grad, x, w, [2, 2], [1, 1], [1, 1], 1, False, mask)
    for needed, ours, theirs, scale in zip(mask, grads, expected, scales):
        if needed:
            assert_close(ours, theirs, scale)
        else:
            assert ours.shape == (0,)


SMALL_GEOMETRIES = [case for case in GEOMETRIES if torch.Size(case.values[0]).numel() <= 1500]


@pytest.mark.parametrize("input_shape, weight_shape, stride, padding, dilation, groups", SMALL_GEOMETRIES)
def test_conv2d_gradcheck_float64(input_shape, weight_shape, stride, padding, dilation, groups):
    torch.manual_seed(7)
    leaves = [
        torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
        for shape in (input_shape, weight_shape, weight_shape[:1])
    ]
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.conv2d(x, w, b, stride, padding, dilation, groups), leaves
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_conv2d_opcheck(dtype):
    torch.manual_seed(8)
    x = torch.randn(2, 4, 8, 6, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 2, 2, 3, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(6, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_hw.conv2d.default, (x, w, b, [2, 1], [0, 1], [1, 2], 2, False))
    grad = torch.randn(2, 6, 4, 4, device=DEVICE, dtype=dtype)
    args = (grad, x.detach(), w.detach(), [2, 1], [0, 1], [1, 2], 2, False, [True, True, True])
    torch.library.opcheck(conv2d_backward, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "input_shape, weight_shape", [((8, 3, 32, 32), (32, 3, 3, 3)), ((4, 64, 16, 16), (128, 64, 3, 3))]
)
def test_conv2d_weight_grad_is_bitwise_deterministic(input_shape, weight_shape, dtype):
    torch.manual_seed(9)
    x = torch.randn(input_shape, device=DEVICE, dtype=dtype)
    w = torch.randn(weight_shape, device=DEVICE, dtype=dtype)
    grad = torch.randn(input_shape[0], weight_shape[0], *input_shape[2:], device=DEVICE, dtype=dtype)
    args = (grad, x, w, [1, 1], [1, 1], [1, 1], 1, False, [True, True, True])
    saved = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = conv2d_backward(*args)
        for _ in range(3):
            for a, b in zip(first, conv2d_backward(*args)):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(saved)


def test_conv2d_device_mismatch_errors():
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="expected input and weight on the same device"):
        ops.conv2d(x, w)
    with pytest.raises(RuntimeError, match="expected input and weight on the same device"):
        ops.conv2d(x.cpu(), w.to(DEVICE))
    with pytest.raises(RuntimeError, match="expected bias on"):
        ops.conv2d(x, w.to(DEVICE), torch.randn(4))
    with pytest.raises(RuntimeError, match="expected grad_output on"):
        conv2d_backward(torch.randn(1, 4, 6, 6), x, w.to(DEVICE), [1, 1], [0, 0], [1, 1], 1, False, [True] * 3)


def test_conv2d_rejects_integer_dtype():
    x = torch.ones(1, 3, 8, 8, device=DEVICE, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="the CUDA kernel supports dtypes"):
        ops.conv2d(x, torch.ones(4, 3, 3, 3, device=DEVICE, dtype=torch.int32))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_first_is_current():
    torch.manual_seed(10)
    device = torch.device("cuda", 1)
    x = torch.randn(2, 3, 10, 10, device=device, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, device=device, requires_grad=True)
    lin_w = torch.randn(5, 8 * 10 * 10, device=device, requires_grad=True)
    with torch.cuda.device(0):
        out = ops.linear_relu(ops.conv2d(x, w, padding=1).flatten(1), lin_w)
        out.sum().backward()
    def network(x, w, lin_w):
        return F.linear(F.conv2d(x, w, padding=1).flatten(1), lin_w)

    ref_x, ref_w, ref_lw = (t.detach().double().requires_grad_() for t in (x, w, lin_w))
    ref = torch.relu(network(ref_x, ref_w, ref_lw))
    ref.sum().backward()
    out_scale, scales = scales_of(network, (x, w, lin_w), torch.ones_like(ref))
    assert out.device == device and x.grad.device == device
    assert_close(out, ref, out_scale)
    for ours, theirs, scale in zip((x.grad, w.grad, lin_w.grad), (ref_x.grad, ref_w.grad, ref_lw.grad), scales):
        assert_close(ours, theirs, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_autocast_computes_in_the_autocast_dtype(dtype):
    torch.manual_seed(11)
    x = torch.randn(2, 3, 12, 12, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, device=DEVICE, requires_grad=True)
    lin_w = torch.randn(4, 8 * 12 * 12, device=DEVICE, requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        hidden = ops.conv2d(x, w, padding=1)
        out = ops.linear_relu(hidden.flatten(1), lin_w)
    assert hidden.dtype == dtype and out.dtype == dtype
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref_x, ref_w = (t.detach().to(dtype).double() for t in (x, w))
    ref_hidden = F.conv2d(ref_x, ref_w, padding=1)
    assert_close(hidden, ref_hidden, F.conv2d(ref_x.abs(), ref_w.abs(), padding=1))


# ---- linear_relu ----


def compare_linear_relu(input_shape, in_features, out_features, *, bias=True, dtype=torch.float32, transposed=False):
    x = torch.randn(input_shape, device=DEVICE).to(dtype)
    w = torch.randn(out_features, in_features, device=DEVICE).to(dtype)
    if transposed:  # column-major weight
        w = w.t().contiguous().t()
    leaves = [x.requires_grad_(), w.requires_grad_()]
    if bias:
        leaves.append(torch.randn(out_features, device=DEVICE).to(dtype).requires_grad_())
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    out = ops.linear_relu(*leaves[:2], leaves[2] if bias else None)
    pre = F.linear(*ref_leaves[:2], ref_leaves[2] if bias else None)
    ref = torch.relu(pre)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    grad = torch.randn(ref.shape, device=DEVICE).to(dtype)
    # The pre-activation's scales bound the ReLU's output and masked gradients too.
    out_scale, grad_scales = scales_of(F.linear, leaves, grad)
    assert_close(out, ref, out_scale)
    # The backward takes its ReLU mask from our output; where rounding puts a
    # pre-activation near 0 on the other side, the reference uses the same mask.
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(pre * (out.detach() > 0).double(), ref_leaves, grad.double())
    for ours, theirs, leaf, scale in zip(grads, ref_grads, leaves, grad_scales):
        assert ours.shape == leaf.shape and ours.dtype == dtype
        assert_close(ours, theirs, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "input_shape, in_features, out_features",
    [((5, 7), 7, 4), ((0, 6), 6, 3), ((7,), 7, 5), ((2, 3, 11), 11, 6), ((64, 128), 128, 29), ((257, 300), 300, 70)],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_relu_matches_torch(input_shape, in_features, out_features, bias, dtype):
    torch.manual_seed(12)
    compare_linear_relu(input_shape, in_features, out_features, bias=bias, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_linear_relu_strided_operands(dtype):
    torch.manual_seed(13)
    compare_linear_relu((33, 40), 40, 24, transposed=True, dtype=dtype)
    x = torch.randn(40, 33, device=DEVICE, dtype=dtype).t().requires_grad_()  # column-major input
    w = torch.randn(24, 80, device=DEVICE, dtype=dtype)[:, ::2].requires_grad_()  # strided rows
    out = ops.linear_relu(x, w)
    ref = torch.relu(F.linear(x.double(), w.double()))
    assert_close(out, ref, F.linear(x.double().abs(), w.double().abs()))


def test_linear_relu_zero_in_features():
    b = torch.randn(5, device=DEVICE)
    out = ops.linear_relu(torch.randn(3, 0, device=DEVICE), torch.randn(5, 0, device=DEVICE), b)
    assert torch.equal(out, torch.relu(b).expand(3, 5))


def test_linear_relu_gradcheck():
    torch.manual_seed(14)
    x = torch.randn(6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear_relu, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_linear_relu_opcheck(dtype):
    torch.manual_seed(15)
    x = torch.randn(9, 12, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(7, 12, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(7, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_hw.linear_relu.default, (x, w, b))
    out = ops.linear_relu(x, w, b).detach()
    args = (torch.randn_like(out), out, x.detach(), w.detach(), [True, True, True])
    torch.library.opcheck(torch.ops.lightning_hw.linear_relu_backward.default, args)


def test_linear_relu_bias_grad_is_bitwise_deterministic():
    torch.manual_seed(16)
    x = torch.randn(4096, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(96, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(96, device=DEVICE, requires_grad=True)
    grad = torch.randn(4096, 96, device=DEVICE)
    first = torch.autograd.grad(ops.linear_relu(x, w, b), [b], grad)[0]
    for _ in range(3):
        assert torch.equal(torch.autograd.grad(ops.linear_relu(x, w, b), [b], grad)[0], first)


def test_linear_relu_device_mismatch_errors():
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="expected input and weight on the same device"):
        ops.linear_relu(x, torch.randn(5, 4))
    with pytest.raises(RuntimeError, match="expected bias on"):
        ops.linear_relu(x, torch.randn(5, 4, device=DEVICE), torch.randn(5))
