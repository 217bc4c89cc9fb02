"""Python front of the custom operators: argument normalisation, autograd and
fake kernels. Shapes and argument checks come from C++ (csrc/*_geometry.h),
so the fake kernels and every backend agree.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from lightning_hw import _C  # noqa: F401  (loads the library and its registrations, once)
from lightning_hw.allocation import keep_freed_memory

keep_freed_memory()  # before any timing of routes: see lightning_hw/allocation.py

__all__ = ["conv2d", "linear_relu", "has_cuda_kernels"]

_ops = torch.ops.lightning_hw

IntPair = Union[int, Sequence[int]]


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return bool(_ops.has_cuda_kernels())


def _pair(value: IntPair, name: str) -> list[int]:
    if isinstance(value, torch.SymInt) or (isinstance(value, int) and not isinstance(value, bool)):
        return [value, value]
    if isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2):
        items = list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items * 2 if len(items) == 1 else items
    raise ValueError(f"conv2d: {name} must be an int or a pair of ints, got {value!r}")


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution with the semantics of `torch.nn.functional.conv2d`.

    A direct convolution (no im2col buffer); input (N, C, H, W) or (C, H, W);
    padding an int, a pair, 'valid' or 'same'.
    """
    return _ops.conv2d.default(input, weight, bias, *_conv2d_arguments(stride, padding, dilation, groups))


def _conv2d_arguments(stride: IntPair, padding: Union[IntPair, str], dilation: IntPair, groups: int) -> tuple:
    """(stride, padding, dilation, groups, pad_same) as the conv2d ops take them."""
    pad_same = False
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"conv2d: invalid padding string {padding!r}, expected 'valid' or 'same'")
        pad_same = padding == "same"
        padding = 0
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"conv2d: groups must be an int, got {groups!r}")
    return _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), groups, pad_same


def linear_relu(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`relu(linear(input, weight, bias))` in one fused op, forward and backward."""
    return _ops.linear_relu.default(input, weight, bias)


# ---- fake kernels: output metadata only, shapes from the C++ formulas ----


def _size_or_none(tensor: Optional[torch.Tensor]):
    return None if tensor is None else tensor.shape


@torch.library.register_fake("lightning_hw::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, pad_same):
    size = _ops.conv2d_output_size(
        input.shape, weight.shape, _size_or_none(bias), stride, padding, dilation, groups, pad_same
    )
    return input.new_empty(size)


def _masked_like(tensor: torch.Tensor, size, needed: bool) -> torch.Tensor:
    # A gradient the mask leaves out comes back as an empty tensor.
    return tensor.new_empty(size if needed else (0,))


@torch.library.register_fake("lightning_hw::conv2d_backward")
def _conv2d_backward_fake(
    grad_output, input, weight, stride, padding, dilation, groups, pad_same, output_mask
):
    return (
        _masked_like(grad_output, input.shape, output_mask[0]),
        _masked_like(grad_output, weight.shape, output_mask[1]),
        _masked_like(grad_output, weight.shape[:1], output_mask[2]),
    )


@torch.library.register_fake("lightning_hw::linear_relu")
def _linear_relu_fake(input, weight, bias):
    return input.new_empty(_ops.linear_relu_output_size(input.shape, weight.shape, _size_or_none(bias)))


@torch.library.register_fake("lightning_hw::linear_relu_backward")
def _linear_relu_backward_fake(grad_output, output, input, weight, output_mask):
    return (
        _masked_like(grad_output, input.shape, output_mask[0]),
        _masked_like(grad_output, weight.shape, output_mask[1]),
        _masked_like(grad_output, weight.shape[:1], output_mask[2]),
    )


# ---- autograd ----


def _call_backward_op(op, *args):
    """A backward op called from a backward formula. In a plain backward (grad
    mode off) the op's autograd kernel would only pass the call on, through
    Python: it is skipped, saving microseconds per layer and step. Under
    create_graph it runs, and refuses double backward."""
    if torch.is_grad_enabled():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _conv2d_setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, pad_same = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups, pad_same)
    ctx.has_bias = bias is not None


def _conv2d_backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = _call_backward_op(_ops.conv2d_backward.default, grad_output, input, weight, *ctx.conv_args, mask)
    return tuple(g if needed else None for g, needed in zip(grads, mask)) + (None,) * 5


def _linear_relu_setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.save_for_backward(input, weight, output)
    ctx.has_bias = bias is not None


def _linear_relu_backward(ctx, grad_output):
    input, weight, output = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = _call_backward_op(_ops.linear_relu_backward.default, grad_output, output, input, weight, mask)
    return tuple(g if needed else None for g, needed in zip(grads, mask))


def _refuse_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"lightning_hw.{op_name} does not support double backward (gradients of gradients); "
            "use torch.nn.functional ops where higher-order gradients are needed"
        )

    return backward


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd("lightning_hw::conv2d", _conv2d_backward, setup_context=_conv2d_setup_context)
torch.library.register_autograd(
    "lightning_hw::linear_relu", _linear_relu_backward, setup_context=_linear_relu_setup_context
)
torch.library.register_autograd(
    "lightning_hw::conv2d_backward", _refuse_double_backward("conv2d"), setup_context=_no_context
)
torch.library.register_autograd(
    "lightning_hw::linear_relu_backward", _refuse_double_backward("linear_relu"), setup_context=_no_context
)

# Mixed precision (torch.autocast, CPU and CUDA): C++ kernels in csrc/autocast.cpp
# cast the operands to the autocast dtype read at call time.
