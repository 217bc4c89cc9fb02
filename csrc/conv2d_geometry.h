// Shape arithmetic and argument checks of conv2d, written once and used by the
// CPU and CUDA kernels and (through conv2d_output_size) by the Python fake kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace lightning_hw {

// Sizes are SymInts so that the fake kernel can run on symbolic shapes; the
// kernels read them back as plain integers with Conv2dShape.
struct Conv2dGeometry {
  bool batched = true;
  c10::SymInt batch, in_channels, in_h, in_w;
  c10::SymInt out_channels, kernel_h, kernel_w;
  c10::SymInt out_h, out_w;
  int64_t stride_h = 1, stride_w = 1;
  c10::SymInt pad_top, pad_bottom, pad_left, pad_right;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t groups = 1;

  // Output size as the op returns it: (N, Cout, Hout, Wout) or (Cout, Hout, Wout).
  std::vector<c10::SymInt> output_size() const {
    if (batched) return {batch, out_channels, out_h, out_w};
    return {out_channels, out_h, out_w};
  }
};

// Plain-integer view of a geometry, what the kernels loop over.
struct Conv2dShape {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, groups;
  int64_t in_channels_per_group() const { return in_channels / groups; }
  int64_t out_channels_per_group() const { return out_channels / groups; }
};


// Padding (before, after) of one spatial dimension: `padding` on both sides, or with pad_same
// torch's 'same' padding: the dilated kernel's reach (`span`: (kernel - 1) * dilation) split in
// two, the odd pixel after (bottom/right). conv2d_geometry and conv2d_padding both use it.
inline std::pair<c10::SymInt, c10::SymInt> side_padding(
    const c10::SymInt& span, int64_t padding, bool pad_same) {
  if (!pad_same) return {padding, padding};
  c10::SymInt before = span / 2;
  return {before, span - before};
}

// Validates the arguments exactly as torch.nn.functional.conv2d does and
// computes the output size. `padding` is (pad_h, pad_w); with pad_same the
// padding is derived as torch does for padding='same' (the odd extra pixel goes
// to the bottom/right).
inline Conv2dGeometry conv2d_geometry(
    c10::SymIntArrayRef input_size,
    c10::SymIntArrayRef weight_size,
    std::optional<c10::SymIntArrayRef> bias_size,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  using detail::format_sizes;
  using detail::sym_true;
  TORCH_CHECK(
      input_size.size() == 3 || input_size.size() == 4,
      "conv2d: expected 3D (unbatched) or 4D (batched) input, but got input of size: ",
      format_sizes(input_size));
  TORCH_CHECK(
      weight_size.size() == 4,
      "conv2d: expected weight to be 4D (out_channels, in_channels/groups, kH, kW), but got weight of size ",
      format_sizes(weight_size));
  TORCH_CHECK(stride.size() == 2, "conv2d: stride must have 2 elements, got ", stride.size());
  TORCH_CHECK(padding.size() == 2, "conv2d: padding must have 2 elements, got ", padding.size());
  TORCH_CHECK(dilation.size() == 2, "conv2d: dilation must have 2 elements, got ", dilation.size());
  TORCH_CHECK(
      stride[0] > 0 && stride[1] > 0,
      "conv2d: non-positive stride is not supported, got stride=", stride);
  TORCH_CHECK(
      padding[0] >= 0 && padding[1] >= 0,
      "conv2d: negative padding is not supported, got padding=", padding);
  TORCH_CHECK(
      dilation[0] > 0 && dilation[1] > 0,
      "conv2d: dilation should be greater than zero, got dilation=", dilation);
  TORCH_CHECK(groups > 0, "conv2d: non-positive groups is not supported, got groups=", groups);
  TORCH_CHECK(
      !pad_same || (stride[0] == 1 && stride[1] == 1),
      "conv2d: padding='same' is not supported for strided convolutions");

  Conv2dGeometry g;
  g.batched = input_size.size() == 4;
  const size_t offset = g.batched ? 1 : 0;
  g.batch = g.batched ? input_size[0] : c10::SymInt(1);
  g.in_channels = input_size[offset];
  g.in_h = input_size[offset + 1];
  g.in_w = input_size[offset + 2];
  g.out_channels = weight_size[0];
  g.kernel_h = weight_size[2];
  g.kernel_w = weight_size[3];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.groups = groups;

  TORCH_CHECK(
      sym_true(g.out_channels >= groups) && sym_true(g.out_channels % groups == 0),
      "conv2d: given groups=", groups, ", expected weight to be divisible by ", groups,
      " at dimension 0, but got weight of size ", format_sizes(weight_size), " instead");
  TORCH_CHECK(
      sym_true(weight_size[1] * groups == g.in_channels),
      "conv2d: given groups=", groups, ", weight of size ", format_sizes(weight_size),
      ", expected input", format_sizes(input_size), " to have ", weight_size[1] * groups,
      " channels, but got ", g.in_channels, " channels instead");
  TORCH_CHECK(
      sym_true(g.kernel_h > 0) && sym_true(g.kernel_w > 0) && sym_true(weight_size[1] > 0),
      "conv2d: weight of size ", format_sizes(weight_size), " has a zero-sized dimension");
  if (bias_size.has_value()) {
    TORCH_CHECK(
        bias_size->size() == 1 && sym_true((*bias_size)[0] == g.out_channels),
        "conv2d: given weight of size ", format_sizes(weight_size),
        ", expected bias to be 1-dimensional with ", g.out_channels,
        " elements, but got bias of size ", format_sizes(*bias_size), " instead");
  }
  // As torch: an empty batch gives an empty output, but an image without rows
  // or columns is refused, even where the padding alone would hold the kernel.
  TORCH_CHECK(
      sym_true(g.batch == 0) || (sym_true(g.in_h > 0) && sym_true(g.in_w > 0)),
      "conv2d: expected input with non-zero height and width (only the batch may be empty), "
      "but got input of size: ", format_sizes(input_size));

  detail::CheckedSizes checked;
  // Rows and columns the dilated kernel reaches past its first tap.
  const c10::SymInt span_h = checked.multiply(g.kernel_h - 1, g.dilation_h);
  const c10::SymInt span_w = checked.multiply(g.kernel_w - 1, g.dilation_w);
  std::tie(g.pad_top, g.pad_bottom) = side_padding(span_h, padding[0], pad_same);
  std::tie(g.pad_left, g.pad_right) = side_padding(span_w, padding[1], pad_same);
  const c10::SymInt padded_h = checked.add(checked.add(g.in_h, g.pad_top), g.pad_bottom);
  const c10::SymInt padded_w = checked.add(checked.add(g.in_w, g.pad_left), g.pad_right);
  const c10::SymInt extent_h = checked.add(span_h, 1);
  const c10::SymInt extent_w = checked.add(span_w, 1);
  TORCH_CHECK(
      !checked.overflow,
      "conv2d: the padded input or the dilated kernel size overflows int64, given input of size ",
      format_sizes(input_size), ", weight of size ", format_sizes(weight_size), ", padding=",
      pad_same ? std::string("'same'") : c10::str(padding), " and dilation=", dilation);
  TORCH_CHECK(
      sym_true(padded_h >= extent_h) && sym_true(padded_w >= extent_w),
      "conv2d: calculated padded input size per channel: (", padded_h, " x ", padded_w,
      "). Kernel size: (", extent_h, " x ", extent_w,
      "). Kernel size can't be greater than actual input size");
  g.out_h = (padded_h - extent_h) / g.stride_h + 1;
  g.out_w = (padded_w - extent_w) / g.stride_w + 1;
  return g;
}

// The zero padding conv2d applies, (top, bottom, left, right), from the kernel's size, the
// dilation and the padding argument alone (it does not depend on the input): what the op's
// ONNX translation writes as Conv's pads (lightning_hw/onnx_ops.py, via conv2d_padding).
inline std::vector<int64_t> conv2d_padding(
    c10::IntArrayRef kernel_size, c10::IntArrayRef padding, c10::IntArrayRef dilation, bool pad_same) {
  TORCH_CHECK(
      kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0,
      "conv2d_padding: kernel_size must be 2 positive sizes, got ", kernel_size);
  TORCH_CHECK(
      padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
      "conv2d_padding: padding must be 2 non-negative sizes, got ", padding);
  TORCH_CHECK(
      dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0,
      "conv2d_padding: dilation must be 2 positive sizes, got ", dilation);
  detail::CheckedSizes checked;
  const c10::SymInt span_h = checked.multiply(kernel_size[0] - 1, dilation[0]);
  const c10::SymInt span_w = checked.multiply(kernel_size[1] - 1, dilation[1]);
  TORCH_CHECK(
      !checked.overflow, "conv2d_padding: the dilated kernel size overflows int64, given kernel_size=",
      kernel_size, " and dilation=", dilation);
  const auto [top, bottom] = side_padding(span_h, padding[0], pad_same);
  const auto [left, right] = side_padding(span_w, padding[1], pad_same);
  return {top.expect_int(), bottom.expect_int(), left.expect_int(), right.expect_int()};
}

inline Conv2dShape concrete_shape(const Conv2dGeometry& g) {
  return Conv2dShape{
      g.batch.expect_int(),    g.in_channels.expect_int(), g.in_h.expect_int(),
      g.in_w.expect_int(),     g.out_channels.expect_int(), g.kernel_h.expect_int(),
      g.kernel_w.expect_int(), g.out_h.expect_int(),        g.out_w.expect_int(),
      g.stride_h,              g.stride_w,                  g.pad_top.expect_int(),
      g.pad_left.expect_int(), g.dilation_h,                g.dilation_w,
      g.groups};
}

inline Conv2dShape conv2d_shape_of(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  std::optional<c10::SymIntArrayRef> bias_size;
  if (bias.has_value()) bias_size = bias->sym_sizes();
  return concrete_shape(conv2d_geometry(
      input.sym_sizes(), weight.sym_sizes(), bias_size, stride, padding, dilation, groups,
      pad_same));
}

// Output size as the op returns it, from a concrete shape.
inline std::vector<int64_t> conv2d_output_sizes(const Conv2dShape& s, bool batched) {
  if (batched) return {s.batch, s.out_channels, s.out_h, s.out_w};
  return {s.out_channels, s.out_h, s.out_w};
}

// What every backend's conv2d does first: the argument checks, the shape and
// the contiguous output, with 4-D views of input and output (unbatched input
// becomes a batch of one). With allocate_out false, out and out4 are left for
// the caller to allocate_conv2d_output (the CPU does only for its own routes).
struct Conv2dForwardSetup {
  Conv2dShape shape;
  at::Tensor out, input4, out4;
};

inline void allocate_conv2d_output(Conv2dForwardSetup& setup, const at::Tensor& input) {
  const bool batched = input.dim() == 4;
  setup.out = at::empty(conv2d_output_sizes(setup.shape, batched), input.options());
  setup.out4 = batched ? setup.out : setup.out.unsqueeze(0);
}

inline Conv2dForwardSetup conv2d_forward_setup(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups,
    bool pad_same,
    c10::ArrayRef<at::ScalarType> supported,
    const char* backend,
    bool allocate_out = true) {
  check_operands("conv2d", input, weight, bias, supported, backend);
  Conv2dForwardSetup setup;
  setup.shape = conv2d_shape_of(input, weight, bias, stride, padding, dilation, groups, pad_same);
  setup.input4 = input.dim() == 4 ? input : input.unsqueeze(0);
  if (allocate_out) allocate_conv2d_output(setup, input);
  return setup;
}

// What every backend's conv2d_backward does first: the argument checks, the
// shape, and the gradients output_mask asks for, allocated contiguous (the
// others are empty {0} tensors), with 4-D views of grad_output, input and the
// input gradient (unbatched becomes a batch of one). With an empty batch the
// parameter gradients are already final (zero) and the input gradient is empty.
struct Conv2dBackwardSetup {
  Conv2dShape shape;
  at::Tensor grad_input, grad_weight, grad_bias;
  at::Tensor grad4, input4, grad_input4;
};

inline Conv2dBackwardSetup conv2d_backward_setup(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups,
    bool pad_same,
    std::array<bool, 3> output_mask,
    c10::ArrayRef<at::ScalarType> supported,
    const char* backend) {
  check_operands("conv2d_backward", input, weight, std::nullopt, supported, backend);
  Conv2dBackwardSetup setup;
  setup.shape = conv2d_shape_of(input, weight, std::nullopt, stride, padding, dilation, groups, pad_same);
  const bool batched = input.dim() == 4;
  check_grad_output("conv2d_backward", grad_output, input, conv2d_output_sizes(setup.shape, batched));
  const auto options = grad_output.options();
  const auto allocate = [&](bool needed, c10::IntArrayRef size) {
    return needed ? at::empty(size, options) : at::empty({0}, options);
  };
  setup.grad_input = allocate(output_mask[0], input.sizes());
  setup.grad_weight = allocate(output_mask[1], weight.sizes());
  setup.grad_bias = allocate(output_mask[2], {setup.shape.out_channels});
  if (setup.shape.batch == 0) {
    setup.grad_weight.zero_();
    setup.grad_bias.zero_();
  }
  setup.grad4 = batched ? grad_output : grad_output.unsqueeze(0);
  setup.input4 = batched ? input : input.unsqueeze(0);
  setup.grad_input4 = batched ? setup.grad_input : setup.grad_input.unsqueeze(0);
  return setup;
}

}  // namespace lightning_hw
