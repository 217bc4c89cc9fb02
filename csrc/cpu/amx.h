// bfloat16 GEMM-shaped work on AMX tiles: linear_relu's three GEMMs and
// conv2d's forward, input gradient and weight gradient as direct convolutions
// on tiles (the "amx" route of both ops, for bfloat16 operands). Sums are
// float32 over the whole reduction, rounded once to bfloat16.
//
// The tile instructions come from the CPU in the "amx" kernel variant
// (tile_kernels.h: chosen where the CPU has AMX-BF16 and the kernel grants the
// tile data permission, arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA),
// asked once), or from a scalar model of them (amx_tiles_emulated.h) in the
// "amx-emulated" variant, which runs the same kernel source on any CPU
// (LIGHTNING_HW_CPU_ISA=amx-emulated, for the tests). Other variants have no
// amx route.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "conv2d_geometry.h"

namespace lightning_hw {
namespace cpu {
namespace amx {

enum class TileSource { kNone, kHardware, kEmulated };

// Where this process's tile instructions come from: its kernel variant's.
TileSource tile_source();

// Why this process has no amx route ("" where it has one).
std::string tiles_refusal();

// What the "amx" variant needs that this CPU (or its kernel) does not give:
// amx_tile, amx_bf16, the tile data permission. Asks for the permission.
std::vector<std::string> hardware_missing();

// The "amx" route can run conv2d of this shape: one group (the tiles reduce
// over 32 input channels at a time; grouped and depthwise convolutions keep
// their own routes).
bool conv_can_run(const Conv2dShape& s);

// Runs a named misuse of the tile model (amx_tiles_emulated.h) that the
// hardware would fault on, so that its check raises: for the tests.
void emulation_fault(const std::string& case_name);

// linear_relu's GEMMs on contiguous bfloat16 matrices: x (rows, in), w (out,
// in), grad_pre (rows, out: grad_output masked by the ReLU).
void linear_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out);
void linear_input_grad(const at::Tensor& grad_pre, const at::Tensor& w, at::Tensor& grad_input);
void linear_weight_grad(const at::Tensor& grad_pre, const at::Tensor& x, at::Tensor& grad_weight);

// conv2d on bfloat16 tensors of any strides (4-D; outputs contiguous).
void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4);
void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4);
// The weight gradient sums input pixels against grad_output over whole steps of
// 32 pixels, some of which lie past a row's end, where grad_output is zero: an
// infinite or NaN input pixel there would turn 0 * inf into NaN. With such
// input it returns false and computes nothing (the caller's float32 kernels
// then give torch's result).
bool conv_weight_grad(const at::Tensor& grad4, const at::Tensor& input4, const Conv2dShape& s, at::Tensor& grad_weight);

}  // namespace amx
}  // namespace cpu
}  // namespace lightning_hw
