"""lightning_hw.ops.linear_relu against torch.relu(F.linear(...)): forward and every gradient.

The grids (marked kernel_grid) run every route (tests/routes.py) forced on every shape it can
run, and check that it ran; shapes that end in partial tiles of this process's kernel variant
come from tests/tiles.py. The other tests run the built-in rule (timing is off in the tests)."""

import pytest
import torch
import torch.nn.functional as F

import tiles
from lightning_hw import ops
from routes import (
    CPU_DTYPES,
    DTYPE_IDS,
    LINEAR_PARTS,
    LINEAR_ROUTES,
    forced_route,
    linear_relu_runnable,
    on_one_and_two_threads,
    with_routes,
)

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


def check_on_route(route, x, w, b, dtype):
    """check_against_torch, x and w needing gradients, with `route` forced: it must have run the
    forward and the backward."""
    with forced_route(route) as ran:
        check_against_torch(x, w, b, dtype)
    ran.assert_only(route, LINEAR_PARTS)


def linear_runnable(input_shape, in_features, out_features, dtype, routes):
    return linear_relu_runnable(input_shape, out_features, dtype, routes)


# (input shape, in_features, out_features)
_SHAPES = [
    ((5, 7), 7, 4),
    ((1, 13), 13, 9),
    ((0, 6), 6, 3),
    ((7,), 7, 5),
    ((2, 3, 11), 11, 6),
    ((64, 128), 128, 29),
    ((33, 200), 200, 70),
    # The fruit head (ragged last column block, many row tiles), two whole output blocks, a
    # one-vector block.
    ((256, 841), 841, 29),
    ((50, 96), 96, 64),
    ((13, 40), 40, 40),
    ((600, 40), 40, 70),  # wide with more rows than outputs
    ((80, 8200), 8200, 70),  # weight block past L2: no tiles forward
    # Wide (the streamed GEMMs' shapes): fewer rows than a tile, ragged last column block, two
    # blocks of rows of which the last is one vector, reductions of several chunks both ways, a
    # last column block of one whole vector, whole blocks only, one row.
    ((5, 100), 100, 65),
    ((9, 33), 33, 65),
    ((40, 1100), 1100, 90),
    ((20, 48), 48, 1030),
    ((64, 96), 96, 200),
    ((1, 17), 17, 200),
    ((3, 4, 33), 33, 100),
]


SHAPES = [
    pytest.param(shape, fin, fout, id="x".join(map(str, shape)) + f"-to-{fout}") for shape, fin, fout in _SHAPES
]


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, in_features, out_features, dtype, route", with_routes(SHAPES, linear_runnable, LINEAR_ROUTES)
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_torch(input_shape, in_features, out_features, dtype, route, with_bias):
    x = torch.randn(input_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(out_features, in_features, dtype=dtype, requires_grad=True)
    b = torch.randn(out_features, dtype=dtype, requires_grad=True) if with_bias else None
    check_on_route(route, x, w, b, dtype)


@pytest.mark.kernel_grid
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows, in_features, out_features, route", tiles.linear_relu_cases())
def test_partial_tiles_of_this_kernel_variant(rows, in_features, out_features, route, dtype):
    torch.manual_seed(16)
    x = torch.randn(rows, in_features, dtype=dtype, requires_grad=True)
    w = (torch.randn(out_features, in_features, dtype=dtype) / in_features**0.5).requires_grad_()
    b = torch.randn(out_features, dtype=dtype, requires_grad=True)
    check_on_route(route, x, w, b, dtype)


def test_blas_backward_of_a_very_wide_layer():
    # More rows than outputs and a packed output block past half of L2 (over
    # 4096 outputs): BLAS backward, the weight gradient in a recycled buffer.
    # Integer operands keep the 16.8 million pre-activations exact: with
    # rounding, a few near 0 would take the other side of the ReLU than torch's.
    x = torch.randint(-2, 3, (4100, 8)).float().requires_grad_()
    w = torch.randint(-2, 3, (4097, 8)).float().requires_grad_()
    b = torch.randint(-2, 3, (4097,)).float().requires_grad_()
    check_on_route("blas", x, w, b, torch.float32)


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, in_features, out_features, dtype, route", with_routes([pytest.param((9, 20), 20, 6, id="9x20-to-6")], linear_runnable, ("tiles", "blas"))
)
def test_non_contiguous_operands(input_shape, in_features, out_features, dtype, route):
    x = torch.randn(20, 9, dtype=dtype).t().requires_grad_()  # (9, 20), transposed view
    w = torch.randn(20, 12, dtype=dtype)[:, ::2].t().requires_grad_()  # strided (6, 20)
    b = torch.randn(12, dtype=dtype)[::2].requires_grad_()
    check_on_route(route, x, w, b, dtype)


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, in_features, out_features, dtype, route",
    with_routes(
        [pytest.param((40, 5), 5, 8, id="narrow"), pytest.param((40, 5), 5, 80, id="wide")], linear_runnable,
        LINEAR_ROUTES, dtypes=[torch.float64],
    ),
)
def test_exact_zero_pre_activation_gets_zero_gradient(input_shape, in_features, out_features, dtype, route):
    # Integer-valued operands make some pre-activations exactly 0: torch's ReLU
    # passes no gradient there, and neither may ours.
    x = torch.randint(-2, 3, input_shape).to(dtype).requires_grad_()
    w = torch.randint(-2, 3, (out_features, in_features)).to(dtype).requires_grad_()
    b = torch.randint(-1, 2, (out_features,)).to(dtype).requires_grad_()
    pre = F.linear(x, w, b)
    assert (pre == 0).any()
    check_on_route(route, x, w, b, dtype)


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


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "route, rows, in_features, out_features",
    [("tiles", 300, 841, 29), ("tiles", 300, 700, 120), ("streamed", 40, 1100, 90), ("streamed", 30, 700, 1030)],
)
def test_results_are_thread_count_independent(route, rows, in_features, out_features):
    """Tiles and streamed GEMMs: each output is summed by one thread in a fixed order."""
    x = torch.randn(rows, in_features)
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features)
    backward = torch.ops.lightning_hw.linear_relu_backward

    def run():
        out = ops.linear_relu(x, w, b)
        return (out,) + tuple(backward(grad, out, x, w, [True, True, True]))

    grad = torch.randn(rows, out_features)
    with forced_route(route) as ran:
        single, double = on_one_and_two_threads(run)
    ran.assert_only(route, LINEAR_PARTS)
    for a, b in zip(single, double):
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


def test_autocast_cpu_runs_in_float32():
    x = torch.randn(8, 6)
    w = torch.randn(5, 6)
    b = torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.linear_relu(x.bfloat16(), w, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x.bfloat16().float(), w, b))


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda: (torch.randn(3, 5), torch.randn(4, 6), None), "cannot be multiplied"),
        (lambda: (torch.randn(3, 5), torch.randn(5), None), "weight to be 2D"),
        (lambda: (torch.tensor(1.0), torch.randn(4, 1), None), "at least 1 dimension"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(3)), "bias of size"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5).double(), None), "should be the same"),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(4).double()), "bias type"),
        (lambda: (torch.randn(3, 5).half(), torch.randn(4, 5).half(), None), "supports dtypes"),
        (lambda: (torch.ones(3, 5, dtype=torch.int32), torch.ones(4, 5, dtype=torch.int32), None), "supports dtypes"),
    ],
)
def test_bad_arguments_raise_clear_errors(make_args, message):
    args = make_args()
    with pytest.raises(RuntimeError, match=message):
        ops.linear_relu(*args)
