"""bfloat16 and float16 on CPU: both ops, forward and every gradient, by each route that
runs them (ours computing in float32 on float32 copies, or torch's own kernel in the
dtype), against a float64 reference computed from the same rounded inputs; CPU autocast
(`precision="bf16-mixed"`), opcheck, torch.compile and non-finite values.

The bound of each element grows with its own scale and the reduction length: one
rounding of the result to the dtype (two where torch adds the bias after rounding
its GEMM), plus float32 accumulation over the reduction, relative to the sum of the
magnitudes of the terms (the same op on |inputs|)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hw.ops as ops
from lightning_hw.nn import Conv2d, LinearReLU
from routes import forced_route

REDUCED = [torch.bfloat16, torch.float16]
REDUCED_IDS = ["bf16", "f16"]
# Unit roundoff of each dtype (half the distance between 1 and the next value).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLOAT32_ROUNDOFF = 2.0**-24

# torch's own route ("aten") runs a reduced dtype where torch runs it through oneDNN
# (float32 accumulation); elsewhere our kernels alone do (csrc/cpu/precision.h).
TORCH_ACCUMULATES_IN_FLOAT = {
    torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported(),
}


def skip_unless_route_runs(route, dtype):
    if route == "aten" and not TORCH_ACCUMULATES_IN_FLOAT[dtype]:
        pytest.skip(f"torch's {dtype} convolution on this CPU does not accumulate in float32: no aten route")


conv2d_backward = torch.ops.lightning_hw.conv2d_backward.default
linear_relu_backward = torch.ops.lightning_hw.linear_relu_backward.default


def assert_within_bound(actual, reference, magnitude, reduction, dtype, extra=None, what=""):
    """|actual - reference| <= 2u |reference| + u |extra| + 2 n 2^-24 magnitude, elementwise:
    u the dtype's unit roundoff, n the reduction length, `extra` a term rounded separately
    (the bias added after torch's GEMM is rounded)."""
    assert actual.dtype == dtype, (what, actual.dtype)
    assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
    u = UNIT_ROUNDOFF[dtype]
    bound = 2 * u * reference.abs() + 2 * reduction * FLOAT32_ROUNDOFF * magnitude
    if extra is not None:
        bound = bound + u * extra.abs()
    error = (actual.double() - reference).abs()
    worst = (error - bound).argmax() if error.numel() else None
    assert bool((error <= bound).all()), (
        f"{what}: error {error.flatten()[worst].item():.3g} over bound {bound.flatten()[worst].item():.3g} "
        f"(reference {reference.flatten()[worst].item():.4g})"
    )


def reduced_tensor(shape, dtype, scale=1.0):
    """Random values exactly representable in `dtype`, and their float64 copy."""
    values = (torch.randn(shape) * scale).to(dtype)
    return values, values.double()


# ---- conv2d ----

# (input shape, weight shape, stride, padding, dilation, groups) per route, chosen where the
# route runs the shape: planar for few output channels at stride 1, depthwise for depthwise
# convolutions, direct for any other, aten wherever symmetric padding expresses the geometry.
CONV_GEOMETRIES = {
    "direct": [
        ((2, 16, 9, 11), (32, 16, 3, 3), 1, 1, 1, 1),
        ((2, 6, 12, 10), (20, 3, 3, 3), 2, 1, 1, 2),
        ((1, 24, 8, 8), (40, 24, 1, 1), 1, 0, 1, 1),
    ],
    "planar": [
        ((3, 1, 16, 16), (8, 1, 4, 4), 1, 0, 1, 1),
        ((2, 3, 13, 15), (16, 3, 3, 3), 1, 1, 1, 1),
        ((2, 4, 10, 10), (6, 4, 2, 2), 1, "same", 2, 1),
    ],
    "depthwise": [
        ((2, 24, 11, 9), (24, 1, 3, 3), 1, 1, 1, 24),
        ((2, 40, 14, 14), (40, 1, 5, 5), 2, 2, 1, 40),
    ],
    "aten": [
        ((2, 16, 9, 11), (32, 16, 3, 3), 1, 1, 1, 1),
        ((3, 1, 16, 16), (8, 1, 4, 4), 1, 0, 1, 1),
        ((2, 24, 11, 9), (24, 1, 3, 3), 2, 1, 1, 24),
    ],
}
CONV_CASES = [(route, *geometry) for route, geometries in CONV_GEOMETRIES.items() for geometry in geometries]
CONV_CASES += [("rule", *geometry) for geometry in CONV_GEOMETRIES["direct"][:1] + CONV_GEOMETRIES["planar"][:1]]


def conv_reference(x, w, b, g, **conv_args):
    """Output and gradients (input, weight, bias) in float64 of float64 operands."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = F.conv2d(x, w, b, **conv_args)
    out.backward(g)
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
@pytest.mark.parametrize("route, input_shape, weight_shape, stride, padding, dilation, groups", CONV_CASES)
def test_conv2d_matches_float64_reference(route, input_shape, weight_shape, stride, padding, dilation, groups, dtype):
    skip_unless_route_runs(route, dtype)
    conv_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x, x64 = reduced_tensor(input_shape, dtype)
    w, w64 = reduced_tensor(weight_shape, dtype, scale=0.5)
    b, b64 = reduced_tensor(weight_shape[:1], dtype)
    with forced_route(route):
        out = ops.conv2d(x, w, b, **conv_args)
        g, g64 = reduced_tensor(out.shape, dtype)
        stride2, padding2, dilation2 = ([v, v] if isinstance(v, int) else v for v in (stride, padding, dilation))
        pad_same = padding == "same"
        grads = conv2d_backward(
            g, x, w, stride2, [0, 0] if pad_same else padding2, dilation2, groups, pad_same, [True, True, True]
        )
    reference = conv_reference(x64, w64, b64, g64, **conv_args)
    magnitude = conv_reference(x64.abs(), w64.abs(), b64.abs(), g64.abs(), **conv_args)
    taps = weight_shape[2] * weight_shape[3]
    reductions = (weight_shape[1] * taps, weight_shape[0] // groups * taps, out[0, 0].numel() * out.shape[0],
                  out[0, 0].numel() * out.shape[0])  # fmt: skip
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    bias_term = b64.view(1, -1, 1, 1).expand_as(reference[0])
    for name, actual, expected, size, n in zip(names, (out, *grads), reference, magnitude, reductions):
        extra = bias_term if name == "output" else None
        assert_within_bound(actual, expected, size, n, dtype, extra, f"{route} {name}")


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
@pytest.mark.parametrize("route", ["rule", "direct", "aten"])
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True]])
def test_conv2d_backward_output_masks(mask, route, dtype):
    skip_unless_route_runs(route, dtype)
    x, x64 = reduced_tensor((2, 8, 10, 10), dtype)
    w, w64 = reduced_tensor((16, 8, 3, 3), dtype)
    g, g64 = reduced_tensor((2, 16, 10, 10), dtype)
    with forced_route(route):
        grads = conv2d_backward(g, x, w, [1, 1], [1, 1], [1, 1], 1, False, mask)
    reference = conv_reference(x64, w64, torch.zeros(16, dtype=torch.float64), g64, padding=1)[1:]
    magnitude = conv_reference(x64.abs(), w64.abs(), torch.zeros(16, dtype=torch.float64), g64.abs(), padding=1)[1:]
    for needed, actual, expected, size in zip(mask, grads, reference, magnitude):
        if needed:
            assert_within_bound(actual, expected, size, 200, dtype, what=f"{route} {mask}")
        else:
            assert actual.numel() == 0 and actual.dtype == dtype


# ---- linear_relu ----

# (rows, in_features, out_features) per route: streamed for wide layers, tiles within half of
# L2 per packed block, blas for any.
LINEAR_SHAPES = {
    "streamed": [(24, 130, 96), (7, 33, 70)],
    "tiles": [(40, 70, 29), (100, 33, 150)],
    "blas": [(24, 130, 96), (40, 70, 29)],
    "rule": [(24, 130, 96), (40, 70, 29)],
}
LINEAR_CASES = [(route, *shape) for route, shapes in LINEAR_SHAPES.items() for shape in shapes]


def linear_relu_gradients(grad_pre, x, w):
    """(input, weight, bias) gradients in float64 from the masked grad_output."""
    return grad_pre @ w, grad_pre.t() @ x, grad_pre.sum(0)


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
@pytest.mark.parametrize("route, rows, in_features, out_features", LINEAR_CASES)
def test_linear_relu_matches_float64_reference(route, rows, in_features, out_features, dtype):
    x, x64 = reduced_tensor((rows, in_features), dtype)
    w, w64 = reduced_tensor((out_features, in_features), dtype, scale=0.3)
    b, b64 = reduced_tensor((out_features,), dtype)
    with forced_route(route):
        out = ops.linear_relu(x, w, b)
        g, g64 = reduced_tensor(out.shape, dtype)
        grads = linear_relu_backward(g, out, x, w, [True, True, True])
    u = UNIT_ROUNDOFF[dtype]
    pre = F.linear(x64, w64, b64)
    pre_magnitude = F.linear(x64.abs(), w64.abs(), b64.abs())
    assert_within_bound(out, torch.relu(pre), pre_magnitude, in_features, dtype, b64.expand_as(pre), f"{route} output")
    # The ReLU mask is our rounded output's sign, as torch's is its rounded linear's; it
    # agrees with the exact pre-activation's wherever that is clear of the rounding.
    mask = out.double() > 0
    clear = pre.abs() > 2 * u * pre_magnitude + u * b64.abs()
    assert bool((mask == (pre > 0))[clear].all()), f"{route}: ReLU mask differs from the exact one"
    grad_pre = g64 * mask
    reference = linear_relu_gradients(grad_pre, x64, w64)
    magnitude = linear_relu_gradients(grad_pre.abs(), x64.abs(), w64.abs())
    names = ("grad_input", "grad_weight", "grad_bias")
    for name, actual, expected, size, n in zip(names, grads, reference, magnitude, (out_features, rows, rows)):
        assert_within_bound(actual, expected, size, n, dtype, what=f"{route} {name}")


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
@pytest.mark.parametrize("route", ["streamed", "tiles", "blas"])
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [True, True, False]])
def test_linear_relu_backward_output_masks(mask, route, dtype):
    x, x64 = reduced_tensor((20, 48), dtype)
    w, w64 = reduced_tensor((100, 48), dtype, scale=0.3)
    out = torch.relu(torch.randn(20, 100)).to(dtype)
    g, g64 = reduced_tensor((20, 100), dtype)
    with forced_route(route):
        grads = linear_relu_backward(g, out, x, w, mask)
    grad_pre = g64 * (out.double() > 0)
    reference = linear_relu_gradients(grad_pre, x64, w64)
    magnitude = linear_relu_gradients(grad_pre.abs(), x64.abs(), w64.abs())
    for needed, actual, expected, size, n in zip(mask, grads, reference, magnitude, (100, 20, 20)):
        if needed:
            assert_within_bound(actual, expected, size, n, dtype, what=f"{route} {mask}")
        else:
            assert actual.numel() == 0 and actual.dtype == dtype


# ---- autocast ----


class SmallNet(nn.Module):
    """Both ops, as the reports' models use them; `layers` picks ours or torch.nn's."""

    def __init__(self, conv=Conv2d, hidden=LinearReLU):
        super().__init__()
        self.conv = conv(3, 16, 3, padding=1)
        self.hidden = hidden(16 * 8 * 8, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.hidden(torch.relu(self.conv(x)).flatten(1)))


class TorchLinearReLU(nn.Sequential):
    def __init__(self, in_features, out_features):
        super().__init__(nn.Linear(in_features, out_features), nn.ReLU())


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
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
        out64 = ops.conv2d(x.double().view(1, 1, 4, 10), w.double().view(1, 1, 6, 10)[..., :3, :3])
        assert out64.dtype == torch.float64
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


# ---- opcheck, compile, non-finite ----


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
def test_opcheck(dtype):
    x = torch.randn(2, 3, 9, 9, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_hw.conv2d.default, (x, w, b, [1, 1], [1, 1], [1, 1], 1, False))
    xl = torch.randn(5, 12, dtype=dtype, requires_grad=True)
    wl = torch.randn(7, 12, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_hw.linear_relu.default, (xl, wl, b[:1].expand(7).contiguous()))


def test_torch_compile_under_autocast_matches_eager():
    torch.manual_seed(5)
    model = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        traced = compiled(x)
    assert traced.dtype == eager.dtype
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
@pytest.mark.parametrize("route", ["direct", "aten"])
def test_conv2d_propagates_nan_and_inf_like_torch(route, dtype):
    skip_unless_route_runs(route, dtype)
    x = torch.randn(2, 4, 8, 8).to(dtype)
    x[0, 1, 3, 4] = float("nan")
    x[1, 2, 5, 5] = float("inf")
    w = torch.randn(8, 4, 3, 3).to(dtype)
    with forced_route(route):
        out = ops.conv2d(x, w, padding=1)
    expected = F.conv2d(x.double(), w.double(), padding=1)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())


@pytest.mark.parametrize("dtype", REDUCED, ids=REDUCED_IDS)
@pytest.mark.parametrize("route", ["streamed", "tiles", "blas"])
def test_linear_relu_propagates_nan_like_torch(route, dtype):
    x = torch.randn(20, 40).to(dtype)
    x[3, 7] = float("nan")
    w = torch.randn(80, 40).to(dtype)
    with forced_route(route):
        out = ops.linear_relu(x, w)
    expected = torch.relu(F.linear(x.double(), w.double()))
    assert torch.equal(out.isnan(), expected.isnan())
