// conv2d's direct convolution on CPU (no im2col buffer): the "direct" route of
// each part, which runs every shape. How it works: conv2d_direct.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "conv2d_geometry.h"

namespace lightning_hw {
namespace cpu {
namespace direct {

// Tensors are 4-D of any strides; the results (out4, grad_input4, grad_weight,
// grad_bias) contiguous, of dtype scalar_t (float or double).
template <typename scalar_t>
void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4);
template <typename scalar_t>
void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4);
template <typename scalar_t>
void conv_weight_grad(const at::Tensor& input4, const at::Tensor& grad4, const Conv2dShape& s, at::Tensor& grad_weight);
template <typename scalar_t>
void conv_bias_grad(const at::Tensor& grad4, at::Tensor& grad_bias);

}  // namespace direct
}  // namespace cpu
}  // namespace lightning_hw
