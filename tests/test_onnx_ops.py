"""ONNX translations of the custom ops (lightning_hw/onnx_ops.py) for torch's torch.export-based
exporter: every geometry conv2d accepts and linear_relu on inputs of every rank, run in ONNX
Runtime (CPU) against torch.nn.functional for batch sizes 1 and 7; standard operators only,
onnx.checker passes, the batch is a dynamic axis; and the LightningModules' `to_onnx`."""

from __future__ import annotations

import importlib.util
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lightning_hw import ops, onnx_ops  # noqa: E402
from lightning_hw.models import EmotionCNN, FruitCNN, TwoLayerNet  # noqa: E402

BATCH_SIZES = (1, 7)
TOLERANCE = 1e-4

# name -> (in_channels, out_channels, kernel (kH, kW), conv2d's keyword arguments, image (H, W), bias, batched)
CONV_GEOMETRIES = {
    "plain": (3, 4, (3, 3), {}, (9, 11), True, True),
    "padding int": (3, 4, (3, 3), {"padding": 1}, (8, 8), True, True),
    "padding and stride pairs": (2, 5, (3, 5), {"padding": (2, 1), "stride": (2, 3)}, (11, 13), True, True),
    "dilation": (2, 3, (3, 3), {"dilation": (2, 3), "padding": (1, 2)}, (10, 12), True, True),
    "groups": (4, 6, (3, 3), {"groups": 2, "padding": 1}, (7, 9), True, True),
    "depthwise strided": (4, 4, (3, 3), {"groups": 4, "padding": 1, "stride": 2}, (9, 10), True, True),
    "same, odd kernel": (3, 4, (3, 3), {"padding": "same"}, (8, 7), True, True),
    "same, even kernel (asymmetric)": (3, 4, (4, 2), {"padding": "same"}, (9, 8), True, True),
    "same, dilated even kernel": (2, 3, (2, 4), {"padding": "same", "dilation": (3, 2)}, (10, 9), True, True),
    "same, grouped": (4, 2, (5, 4), {"padding": "same", "groups": 2}, (8, 8), True, True),
    "valid": (3, 4, (3, 3), {"padding": "valid"}, (7, 8), True, True),
    "no bias": (3, 4, (3, 3), {"padding": 1}, (6, 7), False, True),
    "1x1": (5, 3, (1, 1), {}, (4, 5), True, True),
    "unbatched": (3, 4, (3, 3), {"padding": "same"}, (6, 6), True, False),
    "unbatched, no bias, strided": (2, 4, (2, 3), {"stride": 2, "dilation": (1, 2)}, (9, 9), False, False),
}

# name -> (shape of the input without the batch (None: the input has no batch axis), bias)
LINEAR_RELU_INPUTS = {
    "vector (in,)": (None, True),
    "matrix (N, in)": ((), True),
    "matrix, no bias": ((), False),
    "3-D (N, T, in)": ((5,), True),
    "4-D (N, A, B, in), no bias": ((2, 3), False),
}
IN_FEATURES, OUT_FEATURES = 12, 6


def run_in_onnxruntime(model_proto, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [given.name for given in session.get_inputs()]
    assert len(names) == len(inputs)
    return session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})


def check_standard(model_proto) -> None:
    onnx.checker.check_model(model_proto, full_check=True)
    assert onnx_ops.nonstandard_operators(model_proto) == []
    assert not model_proto.functions


def batch_axis_names(model_proto) -> set[str]:
    """The symbolic sizes of the graph inputs' first axes."""
    return {given.type.tensor_type.shape.dim[0].dim_param for given in model_proto.graph.input}


class ConvBranches(nn.Module):
    """One lightning_hw conv2d per geometry, each on an input of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for in_channels, out_channels, kernel, arguments, _, bias, _ in CONV_GEOMETRIES.values():
            groups = arguments.get("groups", 1)
            self.weights.append(nn.Parameter(torch.randn(out_channels, in_channels // groups, *kernel)))
            self.biases.append(nn.Parameter(torch.randn(out_channels) if bias else torch.zeros(0)))

    def branches(self):
        for (_, _, _, arguments, _, bias, _), weight, bias_value in zip(
            CONV_GEOMETRIES.values(), self.weights, self.biases
        ):
            yield weight, (bias_value if bias else None), arguments

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(ops.conv2d(x, w, b, **arguments) for x, (w, b, arguments) in zip(images, self.branches()))

    def reference(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(F.conv2d(x, w, b, **arguments) for x, (w, b, arguments) in zip(images, self.branches()))


def conv_inputs(batch: int) -> list[torch.Tensor]:
    inputs = []
    for in_channels, _, _, _, (height, width), _, batched in CONV_GEOMETRIES.values():
        shape = (batch, in_channels, height, width) if batched else (in_channels, height, width)
        inputs.append(torch.randn(shape))
    return inputs


def export_branches(model: nn.Module, inputs_of, batched: list[bool]):
    """The checked ONNX model of a module of branches, one input each (the `batched` ones with a dynamic batch)."""
    batch = torch.export.Dim("batch")
    argument = next(iter(inspect.signature(model.forward).parameters))  # the *inputs parameter
    dynamic = {argument: tuple({0: batch} if has_batch else None for has_batch in batched)}
    program = torch.onnx.export(model, tuple(inputs_of(2)), dynamic_shapes=dynamic, verbose=False,
                                **onnx_ops.export_options())  # fmt: skip
    model_proto = program.model_proto
    check_standard(model_proto)
    assert batch_axis_names(model_proto) >= {"batch"}
    return model_proto


def assert_branches_match(model: nn.Module, model_proto, inputs_of, names) -> None:
    """Each branch's ONNX Runtime output equals the module's torch.nn.functional reference, batches of 1 and 7."""
    for size in BATCH_SIZES:
        inputs = inputs_of(size)
        with torch.no_grad():
            expected = model.reference(*inputs)
        for name, got, want in zip(names, run_in_onnxruntime(model_proto, inputs), expected):
            assert got.shape == tuple(want.shape), name
            np.testing.assert_allclose(got, want.numpy(), atol=TOLERANCE, rtol=0, err_msg=f"{name}, batch {size}")


@pytest.mark.parametrize("kernel, dilation", [((4, 3), (1, 2)), ((2, 5), (3, 1)), ((1, 6), (2, 2))])
def test_conv2d_padding_is_the_padding_conv2d_applies(kernel, dilation):
    """The op the translation takes its pads from: torch's 'same' padding (the odd pixel after), or the
    padding given on both sides."""
    x, weight = torch.randn(2, 3, 9, 10), torch.randn(4, 3, *kernel)
    top, bottom, left, right = torch.ops.lightning_hw.conv2d_padding(list(kernel), [0, 0], list(dilation), True)
    padded = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, dilation=dilation)
    torch.testing.assert_close(padded, F.conv2d(x, weight, padding="same", dilation=dilation))
    assert torch.ops.lightning_hw.conv2d_padding(list(kernel), [2, 1], list(dilation), False) == [2, 2, 1, 1]
    with pytest.raises(RuntimeError, match="conv2d_padding: dilation must be 2 positive sizes"):
        torch.ops.lightning_hw.conv2d_padding(list(kernel), [0, 0], [0, 1], True)


def test_conv2d_translates_every_geometry():
    model = ConvBranches().eval()
    model_proto = export_branches(model, conv_inputs, [geometry[-1] for geometry in CONV_GEOMETRIES.values()])
    assert {node.op_type for node in model_proto.graph.node} <= {"Conv", "Unsqueeze", "Squeeze", "Constant"}
    assert_branches_match(model, model_proto, conv_inputs, CONV_GEOMETRIES)


class LinearReLUBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(OUT_FEATURES, IN_FEATURES))
        self.bias = nn.Parameter(torch.randn(OUT_FEATURES))

    def branches(self):
        return [self.bias if bias else None for _, bias in LINEAR_RELU_INPUTS.values()]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(ops.linear_relu(x, self.weight, b) for x, b in zip(inputs, self.branches()))

    def reference(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.relu(F.linear(x, self.weight, b)) for x, b in zip(inputs, self.branches()))


def linear_inputs(batch: int) -> list[torch.Tensor]:
    return [
        torch.randn(IN_FEATURES) if middle is None else torch.randn(batch, *middle, IN_FEATURES)
        for middle, _ in LINEAR_RELU_INPUTS.values()
    ]


def test_linear_relu_translates_inputs_of_every_rank():
    model = LinearReLUBranches().eval()
    model_proto = export_branches(model, linear_inputs, [middle is not None for middle, _ in LINEAR_RELU_INPUTS.values()])
    operators = {node.op_type for node in model_proto.graph.node}
    assert {"Gemm", "MatMul", "Relu"} <= operators  # Gemm for (N, in), MatMul for the other ranks
    with torch.no_grad():
        for name, output in zip(LINEAR_RELU_INPUTS, model.reference(*linear_inputs(7))):
            assert (output > 0).any() and (output == 0).any(), name  # both sides of the ReLU are compared
    assert_branches_match(model, model_proto, linear_inputs, LINEAR_RELU_INPUTS)


def test_export_fails_without_the_translations():
    model = LinearReLUBranches().eval()  # what the table is for: no runtime knows lightning_hw's ops
    with pytest.raises(torch.onnx.errors.OnnxExporterError, match="lightning_hw"):
        torch.onnx.export(model, tuple(linear_inputs(2)), dynamo=True, verbose=False)


@pytest.mark.parametrize(
    "model",
    [
        lambda: FruitCNN(num_classes=3, input_shape=(1, 12, 12), kernel_size=3, padding="same", hidden_sizes=(16, 8)),
        lambda: TwoLayerNet(num_classes=4, input_shape=(27,), hidden_size=10, init_std=None),
        lambda: EmotionCNN(num_classes=5, input_shape=(1, 16, 16), channels=(4, 6), fc_size=8),
    ],
    ids=["FruitCNN", "TwoLayerNet", "EmotionCNN"],
)
def test_to_onnx_exports_our_models_in_eval_mode(model, tmp_path):
    model = model()
    for module in model.modules():  # batch norm with statistics of its own, so eval mode shows
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    model.train()
    path = tmp_path / "model.onnx"
    model.to_onnx(path, verbose=False)
    assert model.training  # the mode it had
    model_proto = onnx.load(path)
    check_standard(model_proto)
    assert batch_axis_names(model_proto) == {"batch"}
    model.eval()
    for size in BATCH_SIZES:
        images = torch.rand(size, *model.input_shape)
        (got,) = run_in_onnxruntime(model_proto, [images])
        with torch.no_grad():
            np.testing.assert_allclose(got, model(images).numpy(), atol=TOLERANCE, rtol=0)


def test_to_onnx_keeps_the_callers_options():
    model = FruitCNN(num_classes=2, input_shape=(1, 8, 8), kernel_size=3, hidden_sizes=(6,))
    seen = {}

    def relu_of_gemm(input, weight, bias=None):  # the caller's own translation wins over ours
        seen["called"] = True
        return onnx_ops.linear_relu_to_onnx(input, weight, bias)

    table = {torch.ops.lightning_hw.linear_relu.default: relu_of_gemm}
    program = model.to_onnx(None, (torch.rand(3, 1, 8, 8),), custom_translation_table=table, verbose=False)
    assert seen == {"called": True}
    assert batch_axis_names(program.model_proto) == {""}  # a sample given, no dynamic axis asked for: fixed
    with pytest.raises(ValueError, match="dynamo=True"):
        model.to_onnx(None, dynamo=False)


def test_missing_package_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"onnxscript.*pip install 'lightning_hw\[export\]'"):
        FruitCNN(num_classes=2, input_shape=(1, 8, 8), kernel_size=3, hidden_sizes=(6,)).to_onnx(None)
