// Fused Linear+ReLU on CPU. The GEMMs are torch's BLAS (at::mm); the fusion is
// ours: bias and ReLU in one pass over the GEMM output, and in the backward the
// ReLU mask and the bias gradient in one pass over grad_output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "linear_relu_geometry.h"

namespace lightning_hw {
namespace {

constexpr at::ScalarType kCpuDtypes[] = {at::kFloat, at::kDouble};

// Rows per parallel task: enough work to amortise scheduling, small enough to
// keep both cores busy on the reports' batch sizes.
constexpr int64_t kRowGrain = 16;

std::vector<int64_t> output_sizes(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end() - 1);
  sizes.push_back(out_features);
  return sizes;
}

template <typename scalar_t>
void bias_relu_inplace(scalar_t* out, const scalar_t* bias, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = out + r * cols;
      if (bias != nullptr) {
        for (int64_t c = 0; c < cols; ++c) row[c] = std::max(row[c] + bias[c], scalar_t(0));
      } else {
        for (int64_t c = 0; c < cols; ++c) row[c] = std::max(row[c], scalar_t(0));
      }
    }
  });
}

at::Tensor linear_relu_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_relu_operands(input, weight, bias, kCpuDtypes, "CPU");
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  const at::Tensor input_2d = input.reshape({-1, in_features});
  at::Tensor out = at::mm(input_2d, weight.t());
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_cpu", [&] {
    bias_relu_inplace<scalar_t>(
        out.data_ptr<scalar_t>(), bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
        out.size(0), out_features);
  });
  return out.view(output_sizes(input, out_features));
}

// grad_pre = grad_output * (output > 0), written in place of a fresh buffer, and
// the bias gradient as its column sums. Columns are split between threads so
// each sum is owned by one thread and summed in a fixed order (deterministic).
template <typename scalar_t>
void relu_mask_and_bias_grad(
    const scalar_t* grad_output,
    const scalar_t* output,
    scalar_t* grad_pre,
    scalar_t* grad_bias,
    int64_t rows,
    int64_t cols) {
  constexpr int64_t kColumnBlock = 64;
  const int64_t column_blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, column_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * kColumnBlock;
    const int64_t c1 = std::min(cols, end * kColumnBlock);
    if (grad_bias != nullptr) std::fill(grad_bias + c0, grad_bias + c1, scalar_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* g = grad_output + r * cols;
      const scalar_t* o = output + r * cols;
      scalar_t* p = grad_pre + r * cols;
      for (int64_t c = c0; c < c1; ++c) p[c] = o[c] > scalar_t(0) ? g[c] : scalar_t(0);
      if (grad_bias != nullptr) {
        for (int64_t c = c0; c < c1; ++c) grad_bias[c] += p[c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& output,
    const at::Tensor& input,
    const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  check_linear_relu_operands(input, weight, std::nullopt, kCpuDtypes, "CPU");
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  const auto expected = output_sizes(input, out_features);
  check_grad_output("linear_relu_backward", grad_output, input, expected);
  TORCH_CHECK(
      output.sizes() == at::IntArrayRef(expected) && output.scalar_type() == input.scalar_type(),
      "linear_relu_backward: expected output of size ", at::IntArrayRef(expected), " and type ",
      input.scalar_type(), " (the forward result), but got ", output.sizes(), " and ",
      output.scalar_type());

  const at::Tensor grad_2d = grad_output.reshape({-1, out_features}).contiguous();
  const at::Tensor out_2d = output.reshape({-1, out_features}).contiguous();
  const int64_t rows = grad_2d.size(0);
  at::Tensor grad_pre = at::empty_like(grad_2d);
  at::Tensor grad_bias =
      output_mask[2] ? at::empty({out_features}, grad_2d.options()) : at::empty({0}, grad_2d.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_backward_cpu", [&] {
    relu_mask_and_bias_grad<scalar_t>(
        grad_2d.const_data_ptr<scalar_t>(), out_2d.const_data_ptr<scalar_t>(),
        grad_pre.data_ptr<scalar_t>(), output_mask[2] ? grad_bias.data_ptr<scalar_t>() : nullptr,
        rows, out_features);
  });

  at::Tensor grad_input = output_mask[0]
      ? at::mm(grad_pre, weight).view(input.sizes())
      : at::empty({0}, grad_2d.options());
  at::Tensor grad_weight = output_mask[1]
      ? at::mm(grad_pre.t(), input.reshape({-1, in_features}))
      : at::empty({0}, grad_2d.options());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace lightning_hw

TORCH_LIBRARY_IMPL(lightning_hw, CPU, m) {
  m.impl("linear_relu", &lightning_hw::linear_relu_cpu);
  m.impl("linear_relu_backward", &lightning_hw::linear_relu_backward_cpu);
}
