// conv2d's planar kernels on CPU: the "planar" route of each part, for
// stride-1 convolutions (the input gradient is one whatever the stride). Which
// shapes the route takes is conv2d.cpp's rule. How it works: conv2d_planar.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "conv2d_geometry.h"

namespace lightning_hw {
namespace cpu {
namespace planar {

// Tensors are 4-D of any strides; the results (out4, grad_input4, grad_weight,
// grad_bias) contiguous, of dtype scalar_t (float or double).
template <typename scalar_t>
void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4);
template <typename scalar_t>
void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4);
// grad_weight and grad_bias, each where not null. False where the input holds
// infinite or NaN values and a weight gradient was asked for: the weight
// gradient is then not final (the caller computes it again by the direct
// kernels); grad_bias is final either way.
template <typename scalar_t>
bool conv_weight_grad(
    const at::Tensor& input4, const at::Tensor& grad4, const Conv2dShape& s, at::Tensor* grad_weight,
    at::Tensor* grad_bias);

}  // namespace planar
}  // namespace cpu
}  // namespace lightning_hw
