"""The CPU routes of conv2d and linear_relu (csrc/cpu/route_choice.h) in the tests: their names,
the dtypes they run, which routes can run a shape, forcing one (LIGHTNING_HW_ROUTE) and which ran.

This is the one place a route or a CPU dtype is added for the tests: the route tests and the
kernels' correctness grids parametrize over these lists, and test_route_choice.py checks that
they name every route the extension has.
"""

from __future__ import annotations

import collections
import contextlib
import os

import pytest
import torch

from lightning_hw import ops

CPU_DTYPES = (torch.float32, torch.float64)
# bfloat16 and float16: our float32 kernels on float32 copies, torch's own kernels where torch
# accumulates the dtype in float32, and (bfloat16) our AMX tiles; tests/test_ops_reduced_precision.py.
REDUCED_DTYPES = (torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}

# Every route of each op that runs every dtype ("aten": torch's convolution; "blas": torch's GEMM,
# with our bias, ReLU and mask passes around it), and our own kernels among them, which the
# correctness grids run; then the routes of bfloat16 alone: "amx", our kernels on AMX tiles (or
# their scalar model: the amx-emulated kernel variant), both ops; "bf16dot", linear_relu's GEMMs
# on AVX512-BF16 dot products.
CONV_ROUTES = ("direct", "planar", "depthwise", "aten")
LINEAR_ROUTES = ("streamed", "tiles", "blas")
OUR_CONV_ROUTES = ("direct", "planar", "depthwise")
OUR_LINEAR_ROUTES = ("streamed", "tiles")
TORCH_ROUTES = ("aten", "blas")  # torch's own kernels: kept on near-ties in the timing
BF16_ROUTES = ("amx",)
BF16_LINEAR_ROUTES = BF16_ROUTES + ("bf16dot",)

# The parts of each op that choose a route: a forward with input, weight and bias gradients asks
# every one of them.
CONV_PARTS = ("conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad")
LINEAR_PARTS = ("linear_relu_forward", "linear_relu_backward_iw")

_ops = torch.ops.lightning_hw


class RoutesRan:
    """The routes chosen (and run) by the ops since this object was made: {(part, route): calls}."""

    def __init__(self) -> None:
        self._before = self._now()

    @staticmethod
    def _now() -> collections.Counter:
        return collections.Counter({tuple(line.split("\t")[:2]): int(line.split("\t")[2]) for line in _ops.routes_run()})

    def calls(self) -> collections.Counter:
        return self._now() - self._before

    def assert_only(self, route: str, parts) -> None:
        """Every routed call ran `route`, and each of `parts` ran it at least once."""
        calls = self.calls()
        assert {r for _, r in calls} <= {route}, f"forced {route}, ran {dict(calls)}"
        assert set(parts) <= {part for part, _ in calls}, f"forced {route}: parts that ran it {dict(calls)}"


@contextlib.contextmanager
def forced_route(route: str):
    """Run the block with `route` forced (LIGHTNING_HW_ROUTE; a route that cannot run a part's
    shape is an error) or, for "rule", with timing off (the built-in rule picks among ours).
    Yields a RoutesRan of the block."""
    names = ("LIGHTNING_HW_ROUTE", "LIGHTNING_HW_AUTOTUNE")
    saved = {name: os.environ.get(name) for name in names}
    if route == "rule":
        os.environ.pop("LIGHTNING_HW_ROUTE", None)
        os.environ["LIGHTNING_HW_AUTOTUNE"] = "0"
    else:
        os.environ["LIGHTNING_HW_ROUTE"] = route
    try:
        yield RoutesRan()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _why_not(lines) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for line in lines:
        part, route, why = line.split("\t")
        table.setdefault(part, {})[route] = why
    return table


def conv2d_route_table(input_shape, weight_shape, dtype, stride=1, padding=0, dilation=1, groups=1):
    """{part: {route: why it cannot run the shape, "" where it can}} of conv2d on CPU."""
    def meta(shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    arguments = ops._conv2d_arguments(stride, padding, dilation, groups)
    return _why_not(_ops.conv2d_cpu_routes(meta(input_shape), meta(weight_shape), *arguments))


def linear_relu_route_table(input_shape, out_features, dtype):
    """{part: {route: why it cannot run the shape, "" where it can}} of linear_relu on CPU."""
    weight = torch.empty(out_features, input_shape[-1], dtype=dtype, device="meta")
    return _why_not(_ops.linear_relu_cpu_routes(torch.empty(input_shape, dtype=dtype, device="meta"), weight))


def runnable(table, routes) -> tuple[str, ...]:
    """The routes among `routes` that run every part of a route table."""
    return tuple(route for route in routes if all(why[route] == "" for why in table.values()))


def conv2d_runnable(input_shape, weight_shape, stride, padding, dilation, groups, dtype, routes=OUR_CONV_ROUTES):
    return runnable(conv2d_route_table(input_shape, weight_shape, dtype, stride, padding, dilation, groups), routes)


def linear_relu_runnable(input_shape, out_features, dtype, routes=OUR_LINEAR_ROUTES):
    return runnable(linear_relu_route_table(input_shape, out_features, dtype), routes)


def with_routes(cases, runnable_routes, routes, dtypes=CPU_DTYPES, every_route=True):
    """Each case (a pytest.param or a tuple of arguments) once per dtype and per route of `routes`
    that runs every part of it (runnable_routes(*arguments, dtype)), as pytest.params of
    (*arguments, dtype, route): the grid runs each of those routes, forced, where it applies.
    With every_route, a route that no case runs is an error (the grid would not test it)."""
    params, covered = [], set()
    for case in cases:
        values, marks, name = (case.values, case.marks, case.id) if hasattr(case, "values") else (tuple(case), (), None)
        for dtype in dtypes:
            for route in runnable_routes(*values, dtype, routes):
                covered.add(route)
                label = "-".join(filter(None, [name, DTYPE_IDS[dtype], route])) if name else None
                params.append(pytest.param(*values, dtype, route, marks=marks, id=label))
    missing = set(routes) - covered
    if every_route and missing:
        raise AssertionError(f"no case of the grid runs route(s) {sorted(missing)}")
    return params


def on_one_and_two_threads(call):
    """call()'s results with torch on one thread, then on two (whatever the machine's cores)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(call())
        return results
    finally:
        torch.set_num_threads(threads)
