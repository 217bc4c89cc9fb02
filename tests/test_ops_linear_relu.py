"""lightning_hw.ops.linear_relu against torch.relu(F.linear(...))."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_hw import ops
from routes import forced_route

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def assert_close(actual, expected, dtype):
    """Absolute tolerance scaled by the reference's magnitude: sums of hundreds
    of products lose absolute precision in float32, whatever their order."""
    tol = dict(TOLERANCES[dtype])
    if expected.numel():
        tol["atol"] *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, **tol)


def reference(x, w, b):
    return torch.relu(F.linear(x, w, b))


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]


def check_against_torch(x, w, b, dtype):
    ours_in = leaves(x, w, b)
    ref_in = leaves(x, w, b)
    out = ops.linear_relu(*ours_in)
    expected = reference(*ref_in)
    assert_close(out, expected, dtype)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for ours, ref in zip(ours_in, ref_in):
        if ref is not None and ref.requires_grad:
            assert_close(ours.grad, ref.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "input_shape,in_features,out_features",
    [
        ((5, 7), 7, 4),
        ((1, 13), 13, 9),
        ((0, 6), 6, 3),
        ((7,), 7, 5),
        ((2, 3, 11), 11, 6),
        ((64, 128), 128, 29),
        ((33, 200), 200, 70),
        # Tile kernels (up to 64 outputs): the fruit head (ragged last column
        # block, many row tiles), two whole output blocks, a one-vector block.
        ((256, 841), 841, 29),
        ((50, 96), 96, 64),
        ((13, 40), 40, 40),
        ((600, 40), 40, 70),  # wide with more rows than outputs: tiles both ways
        ((80, 8200), 8200, 70),  # weight block past L2: BLAS forward, tiles backward
        # Streamed GEMMs (wide, at most as many rows as outputs): fewer rows
        # than a tile, ragged last column block, two blocks of rows of which
        # the last is one vector, reductions of several chunks both ways, a
        # last column block of one whole vector, whole blocks only, one row.
        ((5, 100), 100, 65),
        ((9, 33), 33, 65),
        ((40, 1100), 1100, 90),
        ((20, 48), 48, 1030),
        ((64, 96), 96, 200),
        ((1, 17), 17, 200),
        ((3, 4, 33), 33, 100),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_torch(dtype, input_shape, in_features, out_features, with_bias):
    x = torch.randn(input_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(out_features, in_features, dtype=dtype, requires_grad=True)
    b = torch.randn(out_features, dtype=dtype, requires_grad=True) if with_bias else None
    check_against_torch(x, w, b, dtype)


def test_blas_backward_of_a_very_wide_layer():
    # More rows than outputs and a packed output block past half of L2 (over
    # 4096 outputs): BLAS backward, the weight gradient in a recycled buffer.
    # Integer operands keep the 16.8 million pre-activations exact: with
    # rounding, a few near 0 would take the other side of the ReLU than torch's.
    x = torch.randint(-2, 3, (4100, 8)).float().requires_grad_()
    w = torch.randint(-2, 3, (4097, 8)).float().requires_grad_()
    b = torch.randint(-2, 3, (4097,)).float().requires_grad_()
    check_against_torch(x, w, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_operands(dtype):
    x = torch.randn(20, 9, dtype=dtype).t().requires_grad_()  # (9, 20), transposed view
    w = torch.randn(20, 12, dtype=dtype)[:, ::2].t().requires_grad_()  # strided (6, 20)
    b = torch.randn(12, dtype=dtype)[::2].requires_grad_()
    check_against_torch(x, w, b, dtype)


def test_exact_zero_pre_activation_gets_zero_gradient():
    # Integer-valued operands make some pre-activations exactly 0: torch's ReLU
    # passes no gradient there, and neither may ours.
    x = torch.randint(-2, 3, (40, 5)).double().requires_grad_()
    w = torch.randint(-2, 3, (8, 5)).double().requires_grad_()
    b = torch.randint(-1, 2, (8,)).double().requires_grad_()
    pre = F.linear(x, w, b)
    assert (pre == 0).any()
    check_against_torch(x, w, b, torch.float64)


def test_only_needed_gradients_are_computed():
    x = torch.randn(6, 5)
    w = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4)
    out = ops.linear_relu(x, w, b)
    out.sum().backward()
    assert x.grad is None and b.grad is None
    expected_w = w.detach().clone().requires_grad_()
    reference(x, expected_w, b).sum().backward()
    torch.testing.assert_close(w.grad, expected_w.grad)


_ISA_CHECK = """
import itertools, torch, torch.nn.functional as F
from lightning_hw import ops
from routes import LINEAR_ROUTES, forced_route
torch.manual_seed(0)
shapes = [(30, 841, 29), (7, 40, 40), (5, 96, 64), (20, 100, 70), (40, 1100, 90), (3, 48, 1030), (90, 300, 80)]
for (rows, fin, fout), route in itertools.product(shapes, LINEAR_ROUTES):
  with forced_route(route):
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(rows, fin, dtype=dtype, requires_grad=True)
        w = (torch.randn(fout, fin, dtype=dtype) / fin**0.5).requires_grad_()
        b = torch.randn(fout, dtype=dtype, requires_grad=True)
        out, ref = ops.linear_relu(x, w, b), torch.relu(F.linear(x, w, b))
        g = torch.randn_like(ref)
        for a, r in zip((out,) + torch.autograd.grad(out, (x, w, b), g), (ref,) + torch.autograd.grad(ref, (x, w, b), g)):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_lesser_instruction_sets(isa):
    """The tile kernels' and streamed GEMMs' AVX2 and baseline variants (forced by environment), every route."""
    env = dict(os.environ, LIGHTNING_HW_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("rows,in_features,out_features", [(300, 841, 29), (40, 1100, 90), (300, 700, 120)])
@pytest.mark.parametrize("route", ["tiles", "streamed"])
def test_results_are_thread_count_independent(rows, in_features, out_features, route):
    """Tiles and streamed GEMMs: each output is summed by one thread in a fixed order."""
    x = torch.randn(rows, in_features)
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features)
    backward = torch.ops.lightning_hw.linear_relu_backward

    def run():
        out = ops.linear_relu(x, w, b)
        return (out,) + tuple(backward(grad, out, x, w, [True, True, True]))

    grad = torch.randn(rows, out_features)
    threads = torch.get_num_threads()
    with forced_route(route):
        first = run()
        try:
            torch.set_num_threads(1)
            single = run()
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert torch.equal(a, b)


def test_large_weight_gradients_are_recycled_and_independent():
    """Weight gradients of 4 MB and more come from buffers released by earlier
    ones (no heap re-growth and page faults every training step): a live
    gradient is never shared, a released one is reused."""
    x = torch.randn(16, 1100)
    w = torch.randn(1000, 1100) / 1100**0.5
    out = ops.linear_relu(x, w)
    backward = torch.ops.lightning_hw.linear_relu_backward
    grads = [torch.randn_like(out) for _ in range(3)]

    def weight_grad(grad):
        return backward(grad, out, x, w, [False, True, False])[1]

    def expected(grad):
        return (grad * (out > 0)).t() @ x

    first = weight_grad(grads[0])
    second = weight_grad(grads[1])
    assert first.data_ptr() != second.data_ptr()
    released = first.data_ptr()
    del first
    third = weight_grad(grads[2])
    assert third.data_ptr() == released
    assert_close(second, expected(grads[1]), torch.float32)
    assert_close(third, expected(grads[2]), torch.float32)


def test_gradcheck_float64():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear_relu, (x, w, b))
    assert torch.autograd.gradcheck(ops.linear_relu, (x[:, None], w, None))


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    x = torch.randn(8, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.lightning_hw.linear_relu.default, (x, w, b))
    torch.library.opcheck(torch.ops.lightning_hw.linear_relu.default, (x.detach()[None], w.detach(), b))
    out = ops.linear_relu(x, w, b).detach()
    torch.library.opcheck(
        torch.ops.lightning_hw.linear_relu_backward.default,
        (torch.randn_like(out), out, x.detach(), w.detach(), [True, True, with_bias]),
    )


def test_compile_matches_eager():
    x = torch.randn(16, 10, requires_grad=True)
    w = torch.randn(7, 10, requires_grad=True)
    b = torch.randn(7, requires_grad=True)

    def f(x, w, b):
        return ops.linear_relu(x, w, b).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_out = f(x, w, b)
    eager_grads = torch.autograd.grad(eager_out, (x, w, b))
    out = compiled(x, w, b)
    grads = torch.autograd.grad(out, (x, w, b))
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_double_backward_is_refused():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.linear_relu(x, w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda: (torch.randn(3, 5), torch.randn(4, 6), None), "cannot be multiplied"),
        (lambda: (torch.randn(3, 5), torch.randn(5), None), "weight to be 2D"),
        (lambda: (torch.tensor(1.0), torch.randn(4, 1), None), "at least 1 dimension"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(3)), "bias of size"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5).double(), None), "should be the same"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(4).double()), "bias type"),
        (lambda: (torch.randn(3, 5).to(torch.complex64), torch.randn(4, 5).to(torch.complex64), None), "supports dtypes"),
        (lambda: (torch.ones(3, 5, dtype=torch.int32), torch.ones(4, 5, dtype=torch.int32), None), "supports dtypes"),
    ],
)
def test_bad_arguments_raise_clear_errors(make_args, message):
    args = make_args()
    with pytest.raises(RuntimeError, match=message):
        ops.linear_relu(*args)
