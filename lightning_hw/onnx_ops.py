"""ONNX translations of lightning_hw's custom operators, for torch's torch.export-based
ONNX exporter (`torch.onnx.export(..., dynamo=True)`, the default since torch 2.9).

No ONNX runtime knows `torch.ops.lightning_hw.conv2d` or `linear_relu`; the table below
maps each to standard ONNX operators (`Conv`; `Relu` of `Gemm`, or of `MatMul` + `Add`),
so a model built from `lightning_hw.nn` exports like one built from `torch.nn`:

    import torch
    from lightning_hw.onnx_ops import CUSTOM_TRANSLATION_TABLE

    program = torch.onnx.export(model.eval(), (images,), dynamo=True,
                                custom_translation_table=CUSTOM_TRANSLATION_TABLE,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save("model.onnx")

Our LightningModules' `to_onnx` and `python -m lightning_hw export` pass it for you.
The translations need `onnxscript` (and the exporter `onnx`): `pip install 'lightning_hw[export]'`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from lightning_hw import ops  # noqa: F401  (registers torch.ops.lightning_hw.*)

# The packages of the `export` extra: the ONNX format and checker, the graph builder of torch's
# exporter, and the runtime that checks an exported file.
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require_export_packages(*names: str) -> None:
    """Raise an ImportError naming the first of `names` (default: EXPORT_PACKAGES) that is not installed."""
    for name in names or EXPORT_PACKAGES:
        if importlib.util.find_spec(name) is None:
            raise ImportError(
                f"ONNX export needs a package that is not installed ({name}): "
                f"pip install 'lightning_hw[export]' (or pip install {name})"
            )


def _opset():
    # Imported when a graph is built: onnxscript is an optional dependency. Opset 18 is what
    # torch's own translations (torchlib) are written in; the exporter converts to its target opset.
    from onnxscript import opset18

    return opset18


def _rank(value: Any, op_name: str) -> int:
    shape = getattr(value, "shape", None)
    if shape is None:
        raise ValueError(f"lightning_hw.{op_name}: the exporter gave an input of unknown rank, which ONNX cannot express")
    return len(shape)


def conv2d_to_onnx(
    input,
    weight,
    bias=None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    pad_same: bool = False,
):
    """`torch.ops.lightning_hw.conv2d` as one ONNX `Conv` (with explicit pads, so that every runtime and
    ONNX's shape inference agree); unbatched (C, H, W) input gets a batch axis around it."""
    op = _opset()
    kernel_size = [weight.shape[2], weight.shape[3]]
    # The op's own padding rule (C++, shared with its kernels): 'same' may be asymmetric.
    top, bottom, left, right = torch.ops.lightning_hw.conv2d_padding(kernel_size, list(padding), list(dilation), pad_same)
    unbatched = _rank(input, "conv2d") == 3
    batch_axis = op.Constant(value_ints=[0])
    if unbatched:
        input = op.Unsqueeze(input, batch_axis)
    attributes = dict(
        kernel_shape=kernel_size,
        strides=list(stride),
        pads=[top, left, bottom, right],
        dilations=list(dilation),
        group=groups,
    )
    output = op.Conv(input, weight, **attributes) if bias is None else op.Conv(input, weight, bias, **attributes)
    return op.Squeeze(output, batch_axis) if unbatched else output


def linear_relu_to_onnx(input, weight, bias=None):
    """`torch.ops.lightning_hw.linear_relu` as `Relu(Gemm)` for (N, in_features) input, and as
    `Relu(MatMul + Add)` for input of any other rank, (in_features,) included."""
    op = _opset()
    if _rank(input, "linear_relu") == 2:
        product = op.Gemm(input, weight, transB=1) if bias is None else op.Gemm(input, weight, bias, transB=1)
    else:
        product = op.MatMul(input, op.Transpose(weight, perm=[1, 0]))
        if bias is not None:
            product = op.Add(product, bias)
    return op.Relu(product)


# What to pass as torch.onnx.export's custom_translation_table (add your own entries beside these).
CUSTOM_TRANSLATION_TABLE = {
    torch.ops.lightning_hw.conv2d.default: conv2d_to_onnx,
    torch.ops.lightning_hw.linear_relu.default: linear_relu_to_onnx,
}


# The domains of ONNX's standard operators ("" is ai.onnx's usual spelling).
STANDARD_DOMAINS = ("", "ai.onnx")


def nonstandard_operators(model_proto) -> list[str]:
    """The operators of an onnx.ModelProto's graph (subgraphs included) outside ONNX's standard set,
    as sorted 'domain::name'; empty when any ONNX runtime can run it."""
    found = set()

    def visit(graph) -> None:
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                found.add(f"{node.domain}::{node.op_type}")
            for attribute in node.attribute:
                for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    visit(subgraph)

    visit(model_proto.graph)
    return sorted(found)


def export_options(**kwargs: Any) -> dict[str, Any]:
    """torch.onnx.export's keyword arguments `kwargs` with the torch.export-based exporter
    (dynamo=True) and lightning_hw's translations in custom_translation_table (entries the
    caller gives win). Raises an ImportError naming a missing package of the `export` extra."""
    if kwargs.get("dynamo", True) is False:
        raise ValueError(
            "lightning_hw's ops translate for the torch.export-based exporter only: leave dynamo=True "
            "(the TorchScript exporter, dynamo=False, cannot export them)"
        )
    require_export_packages("onnx", "onnxscript")
    table = {**CUSTOM_TRANSLATION_TABLE, **(kwargs.get("custom_translation_table") or {})}
    return {**kwargs, "dynamo": True, "custom_translation_table": table}


def batch_dynamic_shapes(count: int = 1) -> tuple[dict[int, Any], ...]:
    """torch.onnx.export's dynamic_shapes for `count` positional tensor inputs whose first axis (the batch) is
    dynamic: the ONNX graph takes any batch size. Give example inputs with a batch of 2 or more (torch.export
    specialises a size of 1)."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in range(count))
