// conv2d's depthwise kernels on CPU: the "depthwise" route of each part, for
// convolutions with in_channels == out_channels == groups, whatever the
// stride, padding or dilation. How it works: conv2d_depthwise.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "conv2d_geometry.h"

namespace lightning_hw {
namespace cpu {
namespace depthwise {

// Tensors are 4-D of any strides; the results (out4, grad_input4, grad_weight,
// grad_bias) contiguous, of dtype scalar_t (float or double).
template <typename scalar_t>
void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4);
template <typename scalar_t>
void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4);
// grad_weight and grad_bias, each where not null.
template <typename scalar_t>
void conv_weight_grad(
    const at::Tensor& input4, const at::Tensor& grad4, const Conv2dShape& s, at::Tensor* grad_weight,
    at::Tensor* grad_bias);

}  // namespace depthwise
}  // namespace cpu
}  // namespace lightning_hw
