"""Memory of lightning_hw.ops on CPU: resident memory stays flat over repeated
forward/backward calls (no leak, bounded workspaces and recycled buffers), and
sizes past 2^31 elements are handled (int64 shape arithmetic, checked on meta
tensors) or refused with a clear error before anything is allocated. No test
here allocates more than a few tens of MB."""

import gc
import os

import pytest
import torch
import torch.nn.functional as F

import lightning_hw.ops as ops
from routes import RoutesRan, forced_route

MB = 1 << 20


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def conv_step(input_shape, weight_shape, **kwargs):
    def make():
        x = torch.randn(input_shape, requires_grad=True)
        w = torch.randn(weight_shape, requires_grad=True)
        b = torch.randn(weight_shape[0], requires_grad=True)
        return lambda: ops.conv2d(x, w, b, **kwargs).square().sum().backward()

    return make


def linear_step(rows, in_features, out_features):
    def make():
        x = torch.randn(rows, in_features, requires_grad=True)
        w = torch.randn(out_features, in_features, requires_grad=True)
        b = torch.randn(out_features, requires_grad=True)

        def step():
            w.grad = None  # as zero_grad(set_to_none=True): the recycled buffer goes back
            ops.linear_relu(x, w, b).sum().backward()

        return step

    return make


# Each of our CPU routes of both ops, forced, forward and backward (name: (route, step)); the
# linear ones include weight gradients past the 4 MB of recycled_empty (cpu/workspace.h).
WORKLOADS = {
    "conv2d direct": ("direct", conv_step((8, 16, 24, 24), (32, 16, 3, 3), padding=1)),
    "conv2d planar": ("planar", conv_step((8, 3, 32, 32), (8, 3, 3, 3), padding="same")),
    "conv2d depthwise": ("depthwise", conv_step((8, 32, 24, 24), (32, 1, 3, 3), padding=1, groups=32)),
    "conv2d direct, strided groups": ("direct", conv_step((4, 12, 20, 20), (24, 4, 3, 3), stride=2, groups=3)),
    "linear_relu streamed, 4.5 MB weight gradient": ("streamed", linear_step(32, 1024, 1100)),
    "linear_relu tiles, 4.1 MB weight gradient": ("tiles", linear_step(200, 4096, 260)),
    "linear_relu tiles, narrow head": ("tiles", linear_step(256, 841, 29)),
}


def on_route(route, step):
    def forced():
        with forced_route(route):
            step()

    return forced


def growth_over(steps, iterations: int) -> int:
    gc.collect()
    before = resident_bytes()
    for _ in range(iterations):
        for step in steps:
            step()
    gc.collect()
    return resident_bytes() - before


@pytest.mark.kernel_grid
def test_repeated_forward_backward_keeps_resident_memory_flat():
    ran = RoutesRan()
    steps = [on_route(route, make()) for route, make in WORKLOADS.values()]
    # Warm-up: per-thread workspaces, the recycled buffers and the allocator's
    # heap reach their working size.
    growth_over(steps, 5)
    # Every iteration allocates ~40 MB of outputs, gradients and workspaces
    # (the smallest of the large ones 4 MB): a leak of any of them would add
    # up to far more than the bound, which is a few times the noise measured.
    iterations = 10
    growth = growth_over(steps, iterations)
    assert growth < 16 * MB, f"resident memory grew by {growth / MB:.1f} MB over {iterations} iterations"
    assert {route for _, route in ran.calls()} == {route for route, _ in WORKLOADS.values()}


def test_many_small_calls_keep_resident_memory_flat():
    # Small leaks per call (a tensor, a context object) show up over many calls.
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    v = torch.randn(5, 7, requires_grad=True)
    u = torch.randn(6, 7, requires_grad=True)

    def step():
        ops.conv2d(x, w, padding=1).sum().backward()
        ops.linear_relu(v, u).sum().backward()

    # One thread: thousands of tiny parallel regions cost ~100x more on a
    # loaded machine (the threads spin-wait for each other), and per-thread
    # workspaces are the large test's business.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        growth_over([step], 300)
        calls = 2000
        growth = growth_over([step], calls)
    finally:
        torch.set_num_threads(threads)
    # 3 MB over 2000 calls: 1.5 KB per call, about one leaked autograd context
    # with its saved tensors (the noise measured is under 1 MB).
    assert growth < 3 * MB, f"resident memory grew by {growth / MB:.1f} MB over {calls} calls"


# ---- sizes past 2^31 elements ----


def test_meta_tensors_past_2_31_elements_have_torch_shapes():
    # The shape functions (shared by every backend and the fake kernels) work
    # in int64: 2^32-element inputs and outputs, forward and backward.
    x = torch.empty(256, 64, 512, 512, device="meta", requires_grad=True)
    w = torch.empty(64, 64, 3, 3, device="meta", requires_grad=True)
    b = torch.empty(64, device="meta", requires_grad=True)
    assert x.numel() > 2**31
    out = ops.conv2d(x, w, b, padding=1)
    assert out.shape == F.conv2d(x, w, b, padding=1).shape and out.device.type == "meta"
    grads = torch.autograd.grad(out, [x, w, b], torch.empty_like(out))
    assert [g.shape for g in grads] == [x.shape, w.shape, b.shape]

    rows = torch.empty(2**20, 4096, device="meta", requires_grad=True)
    weight = torch.empty(8192, 4096, device="meta", requires_grad=True)
    out = ops.linear_relu(rows, weight)
    assert out.shape == (2**20, 8192) and out.numel() > 2**32
    grads = torch.autograd.grad(out, [rows, weight], torch.empty_like(out))
    assert [g.shape for g in grads] == [rows.shape, weight.shape]


def test_output_size_past_int32():
    size = torch.ops.lightning_hw.conv2d_output_size(
        [1, 1, 3 * 2**31, 5], [1, 1, 1, 1], None, [1, 1], [0, 0], [1, 1], 1, False
    )
    assert size == [1, 1, 3 * 2**31, 5]


# Padding/dilation whose padded input or kernel extent overflows int64 (they
# wrapped around: a wrong shape, or a crash in the kernels).
OVERFLOWING = [
    pytest.param(dict(padding=2**62), id="padding-2^62"),
    pytest.param(dict(padding=(0, 2**63 - 1)), id="padding-int64-max"),
    pytest.param(dict(dilation=2**62), id="dilation-2^62-kernel-5"),  # 4 * 2^62 wrapped to 0
    pytest.param(dict(dilation=2**62, padding="same"), id="dilation-2^62-same"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kwargs", OVERFLOWING)
def test_overflowing_geometry_is_refused(kwargs, device):
    x = torch.randn(2, 3, 5, 5, device=device)
    w = torch.randn(4, 3, 5, 5, device=device)
    with pytest.raises(RuntimeError, match="overflows int64"):
        ops.conv2d(x, w, **kwargs)


def test_padded_copy_too_large_to_index_is_refused_before_allocating():
    # A 5x5 output whose taps all fall in the padding but the centre one: torch
    # computes it; the CPU kernel would copy a (2^62 + 5)^2 padded input, whose
    # size overflowed int64 (a crash); now refused.
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"padding.*too large to index in int64"):
        ops.conv2d(x, w, padding=2**61, dilation=2**61)
    # Backward alike, through the op itself (torch's autograd needs a forward first).
    grad = torch.randn(2, 4, 5, 5)
    with pytest.raises(RuntimeError, match="too large to index in int64"):
        torch.ops.lightning_hw.conv2d_backward(grad, x, w, [1, 1], [2**61] * 2, [2**61] * 2, 1, False, [True] * 3)


def test_expanded_input_of_huge_logical_size_is_refused_before_allocating():
    # 2^62 logical elements in one float of storage; a stride as large keeps the
    # output at one pixel, but the kernel's padded copy could not be indexed.
    x = torch.zeros(1, 1, 1, 1).expand(1, 1, 2**31, 2**31)
    w = torch.randn(2, 1, 1, 1)
    with pytest.raises(RuntimeError, match="too large to index in int64"):
        ops.conv2d(x, w, stride=2**31)
