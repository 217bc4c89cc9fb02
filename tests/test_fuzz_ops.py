"""Property tests (hypothesis) of lightning_hw.ops.conv2d and linear_relu on CPU.

Valid cases: random shapes, strides, paddings (int, pair, 'same', 'valid'),
dilations, groups (a quarter of the convolutions depthwise), dtypes and memory
layouts (permuted storage such as channels_last, strided views with offsets,
zero-stride expanded tensors, batch 0, unbatched input); the forward and every
gradient (input, weight, bias) must equal torch's, on each CPU route that can
run the case, forced (tests/routes.py; the routes run are counted in the
summary).

Invalid cases: one argument of a valid case broken. Torch must reject it too,
and ours must raise a RuntimeError or ValueError whose message says what is
wrong with that argument. Arguments that torch accepts but our contract refuses (dtypes other
than float32/float64 on CPU, forms that only broadcast) are a third kind:
ours must refuse them clearly.

Profiles (tests/conftest.py): `ci` by default, `fuzz` for long runs:
    HYPOTHESIS_PROFILE=fuzz python -m pytest tests/test_fuzz_ops.py
The number of cases each test ran is printed at the end (tests/conftest.py).
"""

import dataclasses
import math
import re
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, strategies as st

import lightning_hw.ops as ops
from bounds import assert_within_bound, bound
from routes import (
    BF16_LINEAR_ROUTES,
    BF16_ROUTES,
    LINEAR_ROUTES,
    OUR_CONV_ROUTES,
    REDUCED_DTYPES,
    conv2d_runnable,
    forced_route,
    linear_relu_runnable,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def count(fuzz_cases, op: str, kind: str) -> None:
    fuzz_cases[op, kind] += 1
    event(f"{op}: {kind}")


# ---- memory layouts: a view of the wanted shape over a leaf "base" tensor ----


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor of a given shape sits in memory: the base is stored with its
    dimensions in `order`, then sliced with `steps`/`offsets` and expanded
    (stride 0) along `expanded` dimensions. Gradients flow back to the base."""

    order: tuple
    steps: tuple
    offsets: tuple
    expanded: tuple

    def base_shape(self, shape):
        shape = [1 if e else s for s, e in zip(shape, self.expanded)]
        logical = [o + (s - 1) * st_ + 1 if s > 0 else o for s, st_, o in zip(shape, self.steps, self.offsets)]
        return [logical[d] for d in self.order]

    def view(self, base, shape):
        inverse = [self.order.index(d) for d in range(len(self.order))]
        logical = base.permute(inverse)
        sliced_shape = [1 if e else s for s, e in zip(shape, self.expanded)]
        index = tuple(slice(o, o + (s - 1) * st_ + 1, st_) if s > 0 else slice(o, o) for s, st_, o in zip(sliced_shape, self.steps, self.offsets))
        return logical[index].expand(shape)


@st.composite
def layouts(draw, ndim: int):
    identity = tuple(range(ndim))
    orders = [st.just(identity), st.permutations(identity).map(tuple)]
    if ndim == 4:
        orders.insert(1, st.just((0, 2, 3, 1)))  # channels_last
    order = draw(st.one_of(orders))
    fixed = st.just((1,) * ndim)
    steps = draw(st.one_of(fixed, st.tuples(*[st.sampled_from([1, 2, 3])] * ndim)))
    offsets = draw(st.one_of(st.just((0,) * ndim), st.tuples(*[st.integers(0, 1)] * ndim)))
    expanded = draw(st.one_of(st.just((False,) * ndim), st.tuples(*[st.booleans()] * ndim)))
    return Layout(order, steps, offsets, expanded)


@dataclasses.dataclass
class Operands:
    """Memory layouts of a case's tensors, which leaves need gradients, and the
    seed of their values."""

    input_layout: Layout
    weight_layout: Layout
    bias_layout: Layout
    grad_layout: Layout  # of the output gradient
    needs_grad: tuple  # input, weight, bias
    seed: int


@st.composite
def operands(draw, input_ndim: int, weight_ndim: int):
    return Operands(
        input_layout=draw(layouts(input_ndim)),
        weight_layout=draw(layouts(weight_ndim)),
        bias_layout=draw(layouts(1)),
        grad_layout=draw(layouts(input_ndim)),
        needs_grad=draw(st.tuples(st.booleans(), st.booleans(), st.booleans())),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def random_tensor(shape, dtype, layout: Layout, generator, requires_grad=False):
    """(leaf, view): a leaf of layout.base_shape and its view of `shape`."""
    base = torch.randn(layout.base_shape(shape), dtype=dtype, generator=generator)
    base.requires_grad_(requires_grad)
    return base, layout.view(base, shape)


def tolerances(expected):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = 1e-4 if expected.dtype == torch.float32 else 1e-10
    return dict(rtol=tol, atol=tol * scale)


def assert_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **tolerances(expected))


def assert_refused(call, pattern: str):
    """Ours raises RuntimeError/ValueError with a message matching `pattern`."""
    with pytest.raises((RuntimeError, ValueError)) as info:
        call()
    assert re.search(pattern, str(info.value), re.IGNORECASE), (pattern, str(info.value))


def assert_torch_refuses(call):
    with pytest.raises(Exception):
        call()


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
# Valid on torch's CPU conv2d/linear or not, never on our CPU kernels.
UNSUPPORTED_DTYPES = st.sampled_from([torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64])


def int_or_pair(values):
    """An argument as int, (a, b), [a, b] or (a,), as F.conv2d takes it."""
    return st.one_of(
        values,
        st.tuples(values, values),
        st.lists(values, min_size=2, max_size=2),
        st.tuples(values),
    )


def pair(value):
    if isinstance(value, int):
        return (value, value)
    return tuple(value) * 2 if len(value) == 1 else tuple(value)


# ---- conv2d ----


@dataclasses.dataclass
class ConvGeometry:
    dtype: torch.dtype
    batch: Optional[int]  # None: unbatched (C, H, W) input
    in_channels: int
    out_channels: int
    kernel: tuple
    groups: int
    stride: object
    padding: object
    dilation: object
    height: int
    width: int
    bias: bool

    @property
    def input_shape(self):
        chw = (self.in_channels, self.height, self.width)
        return chw if self.batch is None else (self.batch, *chw)

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def padded_size(self):
        """(height, width) of the zero-padded input."""
        dilation = pair(self.dilation)
        if self.padding == "same":
            return tuple(s + (k - 1) * d for s, k, d in zip((self.height, self.width), self.kernel, dilation))
        padding = (0, 0) if self.padding == "valid" else pair(self.padding)
        return tuple(s + 2 * p for s, p in zip((self.height, self.width), padding))

    def extent(self):
        """(height, width) the dilated kernel spans."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, pair(self.dilation)))

    def longest_sum(self):
        """At least the terms of any output or gradient element's sum: an output's (input
        channels x taps), an input gradient's (output channels x taps), a weight gradient's
        (output pixels, at most the padded input's pixels, x images)."""
        taps = self.kernel[0] * self.kernel[1]
        pixels = self.padded_size()[0] * self.padded_size()[1] * (self.batch or 1)
        return max(self.in_channels // self.groups * taps, self.out_channels // self.groups * taps, pixels)


@st.composite
def conv_geometries(draw):
    if draw(st.integers(0, 3)) == 0:
        # Depthwise (in_channels == out_channels == groups): up to 40 channels, one to three
        # vectors of them with ragged tails.
        groups, in_per_group, out_per_group = draw(st.integers(1, 40)), 1, 1
    else:
        groups = draw(st.integers(1, 3))
        in_per_group = draw(st.integers(1, 4))
        # Up to 40 outputs per group: one and two 64-byte vectors, ragged tail blocks.
        out_per_group = draw(st.one_of(st.integers(1, 4), st.integers(5, 40)))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = draw(int_or_pair(st.integers(1, 3)))
    padding_form = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if padding_form == "same":
        padding, stride = "same", draw(st.sampled_from([1, (1, 1), [1]]))
    else:
        padding = {"int": st.integers(0, 3), "pair": int_or_pair(st.integers(0, 3)), "valid": st.just("valid")}[padding_form]
        padding = draw(padding)
        stride = draw(int_or_pair(st.integers(1, 3)))
    geometry = ConvGeometry(
        dtype=draw(DTYPES),
        batch=draw(st.sampled_from([None, 0, 1, 2, 3])),
        in_channels=groups * in_per_group,
        out_channels=groups * out_per_group,
        kernel=kernel,
        groups=groups,
        stride=stride,
        padding=padding,
        dilation=dilation,
        height=1,
        width=1,
        bias=draw(st.booleans()),
    )
    # The smallest input the dilated kernel fits in, plus up to 6 more rows/columns.
    padded = geometry.padded_size()
    extent = geometry.extent()
    geometry.height = max(1, 1 + extent[0] - padded[0]) + draw(st.integers(0, 6))
    geometry.width = max(1, 1 + extent[1] - padded[1]) + draw(st.integers(0, 6))
    return geometry


@dataclasses.dataclass
class ConvCase:
    geometry: ConvGeometry
    operands: Operands


@st.composite
def conv_cases(draw):
    geometry = draw(conv_geometries())
    return ConvCase(geometry, draw(operands(len(geometry.input_shape), 4)))


def compare_with_torch(ours, reference, shapes, dtype, o: Operands, reduction: int,
                       adjust_grad=lambda grad, x, w, b: grad):  # fmt: skip
    """ours(x, w, b) against reference(x, w, b) on views of the operands' layouts
    over leaf tensors of the given (input, weight, bias or None) shapes: the
    forward, then the gradient of every leaf that needs one. adjust_grad(grad,
    x, w, b) may edit the output gradient. bfloat16 and float16 results are held
    to tests/bounds.py's bound against torch in float64 on the same values,
    `reduction` the longest sum of any result."""
    gen = torch.Generator().manual_seed(o.seed)
    layouts = (o.input_layout, o.weight_layout, o.bias_layout)
    leaves = [
        None if shape is None else random_tensor(shape, dtype, layout, gen, needs)[0]
        for shape, layout, needs in zip(shapes, layouts, o.needs_grad)
    ]
    reduced = dtype in REDUCED_DTYPES

    def views(tensors):
        return [None if t is None else layout.view(t, shape) for t, layout, shape in zip(tensors, layouts, shapes)]

    def reference_of(tensors):
        # Torch's reference on copies with the standard strides: its slow conv2d
        # backward fails on some strided weights ("slow_conv2d: grad_weight must be
        # contiguous", e.g. padding='same' with an even kernel and a permuted weight),
        # and its forward is wrong on a weight whose size-1 channel dimension has a
        # stride of 1 (channels-last strides that `contiguous()` keeps: torch 2.14.1,
        # 1 input channel, stride (1, 2), one output column).
        return reference(*[None if t is None else t.clone(memory_format=torch.contiguous_format)
                           for t in views(tensors)])  # fmt: skip

    def float64_leaves(absolute: bool):
        return [None if t is None else (t.detach().double().abs() if absolute else t.detach().double())
                .requires_grad_(t.requires_grad) for t in leaves]  # fmt: skip

    ours_leaves = clones(*leaves)
    torch_leaves = float64_leaves(False) if reduced else clones(*leaves)
    out = ours(*views(ours_leaves))
    ref = reference_of(torch_leaves)
    if reduced:
        magnitude_leaves = float64_leaves(True)
        magnitude = reference_of(magnitude_leaves)
        # torch's own bfloat16 route may add the bias after rounding its GEMM (tests/bounds.py): the
        # bias spread over the output, as the op itself spreads it (zero input and weight).
        x, w, b = (None if t is None else t.detach().contiguous() for t in views(magnitude_leaves))
        extra = None if b is None else reference(torch.zeros_like(x), torch.zeros_like(w), b)
        assert_within_bound(out, ref.detach(), magnitude.detach(), reduction, dtype, extra, "output")
    else:
        assert_close(out, ref)
    wanted = [i for i, leaf in enumerate(leaves) if leaf is not None and leaf.requires_grad]
    if not wanted:
        return
    grad = adjust_grad(random_tensor(tuple(ref.shape), dtype, o.grad_layout, gen)[1], *views(leaves))
    grads = torch.autograd.grad(out, [ours_leaves[i] for i in wanted], grad)
    ref_grads = torch.autograd.grad(ref, [torch_leaves[i] for i in wanted], grad.to(ref.dtype))
    if not reduced:
        for a, b in zip(grads, ref_grads):
            assert_close(a, b)
        return
    magnitude_grads = torch.autograd.grad(magnitude, [magnitude_leaves[i] for i in wanted], grad.double().abs())
    for i, a, e, m in zip(wanted, grads, ref_grads, magnitude_grads):
        # An expanded leaf's gradient sums our rounded gradients over the expanded elements
        # (autograd, in the dtype): one more rounding per term, relative to their magnitude.
        extra = m if any(layouts[i].expanded) else None
        assert_within_bound(a, e, m, reduction, dtype, extra, what=("input", "weight", "bias")[i] + " gradient")


def on_each_route(fuzz_cases, op: str, routes, compare) -> None:
    """compare() with each of `routes` forced in turn; each may run only itself."""
    assert routes, "no route can run the case"
    for route in routes:
        count(fuzz_cases, op, f"route {route}")
        with forced_route(route) as ran:
            compare()
        assert {r for _, r in ran.calls()} <= {route}


@pytest.mark.kernel_grid
@pytest.mark.amx_grid
@given(case=conv_cases())
def test_conv2d_matches_torch(fuzz_cases, case: ConvCase):
    count(fuzz_cases, "conv2d", "valid")
    g = case.geometry
    shapes = (g.input_shape, g.weight_shape, (g.out_channels,) if g.bias else None)
    routes = conv2d_runnable(g.input_shape, g.weight_shape, g.stride, g.padding, g.dilation, g.groups, g.dtype,
                             OUR_CONV_ROUTES + BF16_ROUTES)  # fmt: skip
    on_each_route(fuzz_cases, "conv2d", routes, lambda: compare_with_torch(
        lambda x, w, b: ops.conv2d(x, w, b, **g.kwargs()),
        lambda x, w, b: F.conv2d(x, w, b, **g.kwargs()),
        shapes, g.dtype, case.operands, g.longest_sum(),
    ))  # fmt: skip


def clones(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def random_shape(draw, ndim, high=4):
    return tuple(draw(st.lists(st.integers(0, high), min_size=ndim, max_size=ndim)))


def with_element(draw, value_pair, index_value):
    """value_pair (a pair) with one element replaced."""
    values = list(pair(value_pair))
    values[draw(st.integers(0, 1))] = index_value
    return tuple(values)


# Each mutation breaks one argument of a valid geometry: it returns the call's
# (input, weight, bias, kwargs), the pattern our message must match, and
# whether torch rejects it too (False: a form our contract alone refuses).
def mutate_conv(draw, g: ConvGeometry, kind: str):
    shapes = dict(input=g.input_shape, weight=g.weight_shape, bias=(g.out_channels,) if g.bias else None)
    dtypes = dict(input=g.dtype, weight=g.dtype, bias=g.dtype)
    kwargs = g.kwargs()
    torch_refuses = True
    if kind == "input rank":
        shapes["input"] = random_shape(draw, draw(st.sampled_from([0, 1, 2, 5])))
        pattern = r"expected 3D \(unbatched\) or 4D \(batched\) input, but got input of size"
    elif kind == "weight rank":
        shapes["weight"] = random_shape(draw, draw(st.sampled_from([0, 1, 2, 3, 5])))
        pattern = r"expected weight to be 4D \(out_channels, in_channels/groups, kH, kW\)"
    elif kind == "channel mismatch":
        channels = draw(st.integers(1, 12).filter(lambda c: c != g.in_channels))
        shapes["input"] = g.input_shape[:-3] + (channels,) + g.input_shape[-2:]
        pattern = r"expected input\[[0-9, ]+\] to have \d+ channels, but got \d+ channels"
    elif kind == "groups not dividing out_channels":
        groups = draw(st.integers(2, 4))
        out_channels = groups * draw(st.integers(1, 3)) + draw(st.integers(1, groups - 1))
        shapes["weight"] = (out_channels, g.in_channels // g.groups, *g.kernel)
        shapes["input"] = g.input_shape[:-3] + (groups * shapes["weight"][1],) + g.input_shape[-2:]
        shapes["bias"] = (out_channels,) if g.bias else None
        kwargs["groups"] = groups
        pattern = r"given groups=\d+, expected weight to be divisible by \d+ at dimension 0"
    elif kind == "groups non-positive":
        kwargs["groups"] = draw(st.sampled_from([0, -1, -3]))
        pattern = "non-positive groups is not supported"
    elif kind in ("stride", "dilation"):
        value = draw(st.integers(-3, 0))
        kwargs[kind] = with_element(draw, 1, value)
        # Torch checks a zero dilation only past its empty-batch path; ours always.
        torch_refuses = not (kind == "dilation" and value == 0 and g.batch == 0)
        pattern = "non-positive stride is not supported" if kind == "stride" else "dilation should be greater than zero"
    elif kind == "negative padding":
        kwargs["padding"] = with_element(draw, 1, draw(st.integers(-3, -1)))
        pattern = "negative padding is not supported"
    elif kind == "kernel larger than padded input":
        dim = draw(st.integers(0, 1))
        size = (g.height, g.width)[dim]
        # The largest input the dilated kernel does not fit in, padding included.
        short = g.extent()[dim] - (g.padded_size()[dim] - size) - 1
        if g.padding != "same" and short >= 1:
            sizes = [g.height, g.width]
            sizes[dim] = draw(st.integers(1, short))
            shapes["input"] = g.input_shape[:-2] + tuple(sizes)
        else:  # 'same' always fits, and so may a wide padding: a longer kernel, unpadded
            kwargs.update(padding=0, dilation=1, stride=1)
            kernel = list(g.kernel)
            kernel[dim] = size + draw(st.integers(1, 3))
            shapes["weight"] = (g.out_channels, g.in_channels // g.groups, *kernel)
        pattern = "kernel size can't be greater than actual input size"
    elif kind == "'same' with stride > 1":
        kwargs["padding"] = "same"
        kwargs["stride"] = with_element(draw, 1, draw(st.integers(2, 3)))
        pattern = "padding='same' is not supported for strided convolutions"
    elif kind == "padding string":
        kwargs["padding"] = draw(st.sampled_from(["SAME", "full", "", "valid ", "causal"]))
        pattern = "invalid padding string"
    elif kind == "argument form":
        name = draw(st.sampled_from(["stride", "padding", "dilation", "groups"]))
        if name == "groups":
            kwargs[name] = draw(st.sampled_from([1.0, True, None, (1,), "1"]))
        else:
            kwargs[name] = draw(st.sampled_from([(1, 1, 1), (), 1.5, None, True, "1", [1.0, 1.0]]))
        # A string padding is read as a padding mode ('same', 'valid'), and refused as such.
        string_padding = name == "padding" and isinstance(kwargs[name], str)
        pattern = "invalid padding string" if string_padding else rf"{name} must be an int"
    elif kind in ("weight dtype", "bias dtype"):
        name = kind.split()[0]
        if name == "bias":
            shapes["bias"] = (g.out_channels,)
        dtypes[name] = torch.float64 if g.dtype == torch.float32 else torch.float32
        # Torch skips its type checks on an empty batch, and its string-padding
        # path skips the bias's on some shapes (a 1x1 kernel over a 1x1 image):
        # ours refuses them all.
        torch_refuses = g.batch != 0 and (name == "weight" or g.padding not in ("same", "valid"))
        pattern = rf"input type \(\w+\) and {name} type \(\w+\) should be the same"
    elif kind == "bias shape":
        shapes["bias"] = draw(
            st.one_of(
                st.tuples(st.integers(0, 50).filter(lambda n: n != g.out_channels)),
                st.just(()),
                st.just((1, g.out_channels)),
                st.just((g.out_channels, 1)),
            )
        )
        pattern = r"expected bias to be 1-dimensional with \d+ elements"
    elif kind == "zero-size kernel":
        kernel = list(g.kernel)
        kernel[draw(st.integers(0, 1))] = 0
        shapes["weight"] = (g.out_channels, g.in_channels // g.groups, *kernel)
        if g.batch == 0:  # torch's empty-batch path never looks at the kernel
            shapes["input"] = (1, *g.input_shape[1:])
        pattern = r"weight of size \[[0-9, ]+\] has a zero-sized dimension"
    elif kind == "zero out_channels":
        shapes["weight"] = (0, *g.weight_shape[1:])
        shapes["bias"] = (0,) if g.bias else None
        # With groups, the size check of groups sees the empty weight first.
        pattern = r"weight of size \[0, [0-9, ]+\] (has a zero-sized dimension|instead)"
    elif kind == "empty image":
        sizes = [g.height, g.width]
        sizes[draw(st.integers(0, 1))] = 0
        batch = () if g.batch is None else (draw(st.integers(1, 3)),)
        shapes["input"] = (*batch, g.in_channels, *sizes)
        kwargs["padding"] = tuple(e for e in g.extent())  # enough padding for the kernel
        kwargs["stride"] = 1
        pattern = r"expected input with non-zero height and width"
    elif kind == "unsupported dtype":
        dtype = draw(UNSUPPORTED_DTYPES)
        dtypes = dict(input=dtype, weight=dtype, bias=dtype)
        torch_refuses = False
        pattern = r"kernel supports dtypes .*, but got input of type"
    else:
        raise AssertionError(kind)
    return shapes, dtypes, kwargs, pattern, torch_refuses


CONV_MUTATIONS = [
    "input rank",
    "weight rank",
    "channel mismatch",
    "groups not dividing out_channels",
    "groups non-positive",
    "stride",
    "dilation",
    "negative padding",
    "kernel larger than padded input",
    "'same' with stride > 1",
    "padding string",
    "argument form",
    "weight dtype",
    "bias dtype",
    "bias shape",
    "zero-size kernel",
    "zero out_channels",
    "empty image",
    "unsupported dtype",
]


def make_tensor(shape, dtype, generator):
    if shape is None:
        return None
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 3, shape, generator=generator).to(dtype)


@given(geometry=conv_geometries(), kind=st.sampled_from(CONV_MUTATIONS), data=st.data())
def test_conv2d_rejects_what_torch_rejects(fuzz_cases, geometry, kind, data):
    shapes, dtypes, kwargs, pattern, torch_refuses = mutate_conv(data.draw, geometry, kind)
    count(fuzz_cases, "conv2d", "invalid" if torch_refuses else "refused")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    x, w, b = (make_tensor(shapes[n], dtypes[n], gen) for n in ("input", "weight", "bias"))
    if torch_refuses:
        assert_torch_refuses(lambda: F.conv2d(x, w, b, **kwargs))
    assert_refused(lambda: ops.conv2d(x, w, b, **kwargs), pattern)


# ---- linear_relu ----


@dataclasses.dataclass
class LinearCase:
    dtype: torch.dtype
    leading: tuple  # input (*leading, in_features)
    in_features: int
    out_features: int
    bias: bool
    operands: Operands

    @property
    def input_shape(self):
        return (*self.leading, self.in_features)


@st.composite
def linear_cases(draw):
    leading = draw(
        st.one_of(
            st.lists(st.integers(0, 4), max_size=3).map(tuple),  # () is a 1-D input
            st.tuples(st.integers(5, 100)),  # rows enough for the tile kernels
        )
    )
    # Shapes for every route of the CPU kernel: tiles (a weight block within
    # L2: up to 4096 reduced features), streamed GEMMs (> 64 outputs), BLAS
    # (any); ragged column blocks; empty sizes.
    in_features = draw(st.one_of(st.just(0), st.integers(1, 40), st.integers(41, 300), st.integers(4097, 4200)))
    out_features = draw(st.one_of(st.just(0), st.integers(1, 20), st.integers(21, 64), st.integers(65, 140)))
    return LinearCase(
        dtype=draw(DTYPES),
        leading=leading,
        in_features=in_features,
        out_features=out_features,
        bias=draw(st.booleans()),
        operands=draw(operands(len(leading) + 1, 2)),
    )


def unambiguous_grad(grad, x, w, b):
    """grad with zeros where the pre-activation is too close to 0 for the ReLU
    mask to be decided: rounding may put it on either side in ours and in torch
    alike. The bound is the worst-case rounding error of the dot product."""
    x64, w64 = x.detach().double(), w.detach().double()
    b64 = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().double()
    pre = F.linear(x64, w64, b64)
    magnitude = F.linear(x64.abs(), w64.abs(), b64.abs())
    if x.dtype in REDUCED_DTYPES:  # our float32 sums rounded once, or torch's bias after its GEMM
        ambiguous = pre.abs() <= bound(pre, magnitude, x.shape[-1] + 1, x.dtype, b64)
    else:
        eps = torch.finfo(x.dtype).eps
        ambiguous = pre.abs() <= 2 * (x.shape[-1] + 1) * eps * magnitude
    if not ambiguous.any():
        return grad
    return grad.masked_fill(ambiguous, 0)


@pytest.mark.kernel_grid
@pytest.mark.amx_grid
@given(case=linear_cases())
def test_linear_relu_matches_torch(fuzz_cases, case: LinearCase):
    count(fuzz_cases, "linear_relu", "valid")
    shapes = (case.input_shape, (case.out_features, case.in_features), (case.out_features,) if case.bias else None)
    routes = linear_relu_runnable(case.input_shape, case.out_features, case.dtype, LINEAR_ROUTES + BF16_LINEAR_ROUTES)
    on_each_route(fuzz_cases, "linear_relu", routes, lambda: compare_with_torch(
        ops.linear_relu, lambda x, w, b: torch.relu(F.linear(x, w, b)), shapes, case.dtype, case.operands,
        max(case.in_features, case.out_features, math.prod(case.leading)), adjust_grad=unambiguous_grad,
    ))  # fmt: skip


def mutate_linear(draw, case: LinearCase, kind: str):
    shapes = dict(input=case.input_shape, weight=(case.out_features, case.in_features), bias=(case.out_features,) if case.bias else None)
    dtypes = dict(input=case.dtype, weight=case.dtype, bias=case.dtype)
    torch_refuses = True
    if kind == "0-dim input":
        shapes["input"] = ()
        pattern = "expected input with at least 1 dimension"
    elif kind == "weight rank":
        shapes["weight"] = random_shape(draw, draw(st.sampled_from([0, 3, 4])))
        pattern = r"expected weight to be 2D \(out_features, in_features\)"
    elif kind == "feature mismatch":
        features = draw(st.integers(0, 50).filter(lambda n: n != case.in_features))
        shapes["input"] = (*case.leading, features)
        pattern = "input and weight shapes cannot be multiplied"
    elif kind == "bias shape":
        # Shapes that do not broadcast against the output either.
        shapes["bias"] = draw(
            st.one_of(
                st.tuples(st.integers(2, 50).filter(lambda n: n != case.out_features)),
                st.just((3, case.out_features + 2)),
            )
        )
        pattern = r"expected bias of size \[\d+\]"
    elif kind in ("weight dtype", "bias dtype"):
        name = kind.split()[0]
        if name == "bias":
            shapes["bias"] = (case.out_features,)
        dtypes[name] = torch.float64 if case.dtype == torch.float32 else torch.float32
        pattern = rf"input type \(\w+\) and {name} type \(\w+\) should be the same"
    elif kind == "unsupported dtype":
        dtype = draw(UNSUPPORTED_DTYPES)
        dtypes = dict(input=dtype, weight=dtype, bias=dtype)
        torch_refuses = False
        pattern = r"kernel supports dtypes .*, but got input of type"
    elif kind == "1-dim weight":  # torch's F.linear takes it; our contract wants (out, in)
        shapes["weight"] = (case.in_features,)
        shapes["bias"] = None
        torch_refuses = False
        pattern = r"expected weight to be 2D \(out_features, in_features\)"
    elif kind == "broadcast bias":  # torch broadcasts a 0-dim, (1,) or (1, out) bias; ours wants (out,)
        options = [(), (1, case.out_features)] + ([(1,)] if case.out_features != 1 else [])
        shapes["bias"] = draw(st.sampled_from(options))
        torch_refuses = False
        pattern = r"expected bias of size \[\d+\]"
    else:
        raise AssertionError(kind)
    return shapes, dtypes, pattern, torch_refuses


LINEAR_MUTATIONS = [
    "0-dim input",
    "weight rank",
    "feature mismatch",
    "bias shape",
    "weight dtype",
    "bias dtype",
    "unsupported dtype",
    "1-dim weight",
    "broadcast bias",
]


@given(case=linear_cases(), kind=st.sampled_from(LINEAR_MUTATIONS), data=st.data())
def test_linear_relu_rejects_what_torch_rejects(fuzz_cases, case, kind, data):
    shapes, dtypes, pattern, torch_refuses = mutate_linear(data.draw, case, kind)
    count(fuzz_cases, "linear_relu", "invalid" if torch_refuses else "refused")
    gen = torch.Generator().manual_seed(case.operands.seed)
    x, w, b = (make_tensor(shapes[n], dtypes[n], gen) for n in ("input", "weight", "bias"))
    if torch_refuses:
        assert_torch_refuses(lambda: torch.relu(F.linear(x, w, b)))
    assert_refused(lambda: ops.linear_relu(x, w, b), pattern)


# ---- the backward ops called directly, with a wrong grad_output or output ----


@given(geometry=conv_geometries(), data=st.data())
def test_conv2d_backward_rejects_a_wrong_grad_output(fuzz_cases, geometry, data):
    count(fuzz_cases, "conv2d_backward", "refused")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    g = geometry
    x = make_tensor(g.input_shape, g.dtype, gen)
    w = make_tensor(g.weight_shape, g.dtype, gen)
    out_shape = F.conv2d(x, w, **g.kwargs()).shape
    grad_shape, grad_dtype = data.draw(wrong_shape_or_dtype(tuple(out_shape), g.dtype))
    grad = make_tensor(grad_shape, grad_dtype, gen)
    padding = (0, 0) if isinstance(g.padding, str) else list(pair(g.padding))
    assert_refused(
        lambda: torch.ops.lightning_hw.conv2d_backward(
            grad, x, w, list(pair(g.stride)), padding, list(pair(g.dilation)), g.groups, g.padding == "same",
            [True, True, True],
        ),
        r"grad_output type \(\w+\) and input type|expected grad_output of size",
    )


@st.composite
def wrong_shape_or_dtype(draw, shape, dtype):
    if draw(st.booleans()):
        other = torch.float64 if dtype == torch.float32 else torch.float32
        return shape, other
    wrong = draw(
        st.one_of(
            st.lists(st.integers(0, 5), max_size=5).map(tuple),
            st.just(shape[:-1] + (shape[-1] + 1,)) if shape else st.just((1,)),
        ).filter(lambda s: s != shape)
    )
    return wrong, dtype


@given(case=linear_cases(), which=st.sampled_from(["grad_output", "output"]), data=st.data())
def test_linear_relu_backward_rejects_a_wrong_grad_output_or_output(fuzz_cases, case, which, data):
    count(fuzz_cases, "linear_relu_backward", "refused")
    gen = torch.Generator().manual_seed(case.operands.seed)
    x = make_tensor(case.input_shape, case.dtype, gen)
    w = make_tensor((case.out_features, case.in_features), case.dtype, gen)
    out_shape = (*case.leading, case.out_features)
    tensors = dict(grad_output=make_tensor(out_shape, case.dtype, gen), output=make_tensor(out_shape, case.dtype, gen))
    tensors[which] = make_tensor(*data.draw(wrong_shape_or_dtype(out_shape, case.dtype)), gen)
    assert_refused(
        lambda: torch.ops.lightning_hw.linear_relu_backward(
            tensors["grad_output"], tensors["output"], x, w, [True, True, True]
        ),
        BACKWARD_REFUSALS[which],
    )


# What the refusal of a wrong grad_output or output (the forward result) says.
BACKWARD_REFUSALS = {
    "grad_output": r"grad_output type \(\w+\) and input type|expected grad_output of size",
    "output": r"expected output of size \[[0-9, ]*\] and type \w+ \(the forward result\)",
}


# ---- regressions of what the fuzzers found ----


def test_conv2d_on_a_weight_with_channels_last_strides_matches_float64():
    # Found as a failure of torch's own reference: torch 2.14.1's CPU conv2d is wrong on this
    # weight (1 input channel whose stride is 1, stride (1, 2), one output column); ours is not.
    x = torch.randn(2, 1, 5, 4)
    w = torch.randn(1, 2, 3, 1).permute(0, 3, 1, 2)  # strides (6, 1, 3, 1)
    w.requires_grad_()
    w64 = w.detach().double().clone(memory_format=torch.contiguous_format).requires_grad_()
    expected = F.conv2d(x.double(), w64, stride=(1, 2))
    out = ops.conv2d(x, w, stride=(1, 2))
    assert_close(out, expected.detach().float())
    grad = torch.randn_like(out)
    (grad_w,) = torch.autograd.grad(out, [w], grad)
    (expected_grad_w,) = torch.autograd.grad(expected, [w64], grad.double())
    assert_close(grad_w, expected_grad_w.float())


@pytest.mark.parametrize("input_shape", [(2, 3, 0, 5), (2, 3, 4, 0), (3, 0, 5)])
def test_conv2d_refuses_an_empty_image_even_when_padded(input_shape):
    # Was: an output of bias values (torch refuses, only the batch may be empty).
    x = torch.randn(input_shape)
    w = torch.randn(4, 3, 1, 1)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, padding=1)
    assert_refused(lambda: ops.conv2d(x, w, padding=1), r"non-zero height and width.*input of size")


def test_conv2d_empty_batch_with_an_empty_image_has_torch_shape():
    x = torch.randn(0, 3, 0, 5)
    w = torch.randn(4, 3, 1, 1)
    assert ops.conv2d(x, w, padding=1).shape == F.conv2d(x, w, padding=1).shape


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "rows, out_features",
    [(5, 100), (70, 100), (200, 100), (3, 10), (0, 100)],
    ids=["streamed", "tiles-wide", "tiles-many-rows", "tiles-narrow", "no-rows"],
)
def test_linear_relu_without_input_features_is_relu_of_bias(rows, out_features):
    # Was: a reshape error on every route, then NaN/garbage from the streamed
    # GEMMs, whose partial sums an empty reduction left unwritten.
    x = torch.randn(rows, 0, requires_grad=True)
    w = torch.randn(out_features, 0, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True)
    leaves = [x, w, b]
    ref_leaves = clones(*leaves)
    out = ops.linear_relu(*leaves)
    ref = torch.relu(F.linear(*ref_leaves))
    assert_close(out, ref)
    grad = torch.randn_like(ref)
    for ours, theirs in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, ref_leaves, grad)):
        assert_close(ours, theirs)


@pytest.mark.kernel_grid
def test_linear_relu_without_outputs_has_empty_gradients():
    # Was: a reshape error in the backward (grad_output of shape (..., 0)).
    x = torch.randn(2, 3, 7, requires_grad=True)
    w = torch.randn(0, 7, requires_grad=True)
    out = ops.linear_relu(x, w)
    assert out.shape == (2, 3, 0)
    gx, gw = torch.autograd.grad(out, [x, w], torch.randn(2, 3, 0))
    assert_close(gx, torch.zeros_like(x))
    assert gw.shape == w.shape
