// bfloat16 GEMMs of linear_relu on AVX512-BF16 dot products (VDPBF16PS: pairs
// of bf16 products summed into float32 lanes): the "bf16dot" route, for CPUs
// with AVX512-BF16 and no AMX tiles (AMD Zen 4 and later, Intel Cooper Lake),
// where torch's oneDNN kernels reach only a third to a half of the
// instruction's peak on the small layers of the reports. Sums are float32
// over the whole reduction, rounded once to bfloat16; each output element is
// summed by one thread in a fixed order, so results do not depend on the
// thread count.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace lightning_hw {
namespace cpu {
namespace bf16dot {

// Why this process has no bf16dot route ("" where it has one): the CPU lacks
// AVX512-BF16 (or AVX512-BW), or LIGHTNING_HW_CPU_ISA chose kernels without
// AVX-512 (or the tile model, amx-emulated).
std::string refusal();

// linear_relu's GEMMs on contiguous bfloat16 matrices, as amx.h's: x (rows,
// in), w (out, in), grad_pre (rows, out: grad_output masked by the ReLU);
// outputs contiguous.
void linear_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out);
void linear_input_grad(const at::Tensor& grad_pre, const at::Tensor& w, at::Tensor& grad_input);
void linear_weight_grad(const at::Tensor& grad_pre, const at::Tensor& x, at::Tensor& grad_weight);

}  // namespace bf16dot
}  // namespace cpu
}  // namespace lightning_hw
