// Shape arithmetic and argument checks of linear_relu, shared by the CPU and
// CUDA kernels and (through linear_relu_output_size) by the Python fake kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/accumulate.h>

#include <optional>
#include <vector>

#include "checks.h"

namespace lightning_hw {

// input (*, in_features), weight (out_features, in_features), bias (out_features,)
// -> output (*, out_features).
inline std::vector<c10::SymInt> linear_relu_output_size(
    c10::SymIntArrayRef input_size,
    c10::SymIntArrayRef weight_size,
    std::optional<c10::SymIntArrayRef> bias_size) {
  using detail::format_sizes;
  using detail::sym_true;
  TORCH_CHECK(
      !input_size.empty(), "linear_relu: expected input with at least 1 dimension, got a 0-dim input");
  TORCH_CHECK(
      weight_size.size() == 2,
      "linear_relu: expected weight to be 2D (out_features, in_features), but got weight of size ",
      format_sizes(weight_size));
  TORCH_CHECK(
      sym_true(input_size.back() == weight_size[1]),
      "linear_relu: input and weight shapes cannot be multiplied: input of size ",
      format_sizes(input_size), " has ", input_size.back(),
      " features but weight of size ", format_sizes(weight_size), " expects ", weight_size[1]);
  if (bias_size.has_value()) {
    TORCH_CHECK(
        bias_size->size() == 1 && sym_true((*bias_size)[0] == weight_size[0]),
        "linear_relu: expected bias of size [", weight_size[0], "], but got bias of size ",
        format_sizes(*bias_size));
  }
  std::vector<c10::SymInt> out(input_size.begin(), input_size.end() - 1);
  out.push_back(weight_size[0]);
  return out;
}

inline void check_linear_relu_operands(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    c10::ArrayRef<at::ScalarType> supported,
    const char* backend) {
  std::optional<c10::SymIntArrayRef> bias_size;
  if (bias.has_value()) bias_size = bias->sym_sizes();
  linear_relu_output_size(input.sym_sizes(), weight.sym_sizes(), bias_size);
  check_operands("linear_relu", input, weight, bias, supported, backend);
}

// A (*, features) tensor as a (rows, features) matrix. The rows are the
// product of the leading sizes: reshape's -1 is ambiguous when features is 0.
inline at::Tensor as_rows(const at::Tensor& tensor, int64_t features) {
  const auto sizes = tensor.sizes();
  return tensor.reshape({c10::multiply_integers(sizes.begin(), sizes.end() - 1), features});
}

// Output size of the op for a concrete input.
inline std::vector<int64_t> linear_relu_output_sizes(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end() - 1);
  sizes.push_back(out_features);
  return sizes;
}

// Checks of linear_relu_backward: the operands as in the forward, grad_output
// and output (the forward result) of the forward output's size, type and device.
inline void check_linear_relu_backward_operands(
    const at::Tensor& grad_output,
    const at::Tensor& output,
    const at::Tensor& input,
    const at::Tensor& weight,
    c10::ArrayRef<at::ScalarType> supported,
    const char* backend) {
  check_linear_relu_operands(input, weight, std::nullopt, supported, backend);
  const auto expected = linear_relu_output_sizes(input, weight.size(0));
  check_grad_output("linear_relu_backward", grad_output, input, expected);
  TORCH_CHECK(
      output.sizes() == c10::IntArrayRef(expected) && output.scalar_type() == input.scalar_type(),
      "linear_relu_backward: expected output of size ", c10::IntArrayRef(expected), " and type ",
      input.scalar_type(), " (the forward result), but got ", output.sizes(), " and ",
      output.scalar_type());
  TORCH_CHECK(
      output.device() == input.device(), "linear_relu_backward: expected output on ", input.device(),
      " like input, but got ", output.device());
}

}  // namespace lightning_hw
