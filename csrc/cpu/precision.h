// The dtypes of the CPU ops, and how the reduced-precision ones compute.
//
// bfloat16 and float16 accumulate in float32: our float32 kernels run on
// float32 copies of the operands and each result is rounded once, at the end.
// torch's own route of an op ("aten", "blas") runs its kernel in the op's dtype
// where torch runs that dtype through oneDNN (float32 accumulation; AVX512-BF16
// or AMX tiles where the CPU has them). Elsewhere torch's reduced-precision
// convolution rounds partial sums (its im2col/col2im path: errors of several
// units in the last place, measured), so "aten" is no candidate there and
// "blas" runs torch's float32 BLAS on float32 copies. Which route is faster is
// timed per shape, as for float32 (route_choice.h); the dtype is part of the
// shape's key.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/StringUtil.h>

#include <string>

namespace lightning_hw {
namespace cpu {

constexpr at::ScalarType kCpuDtypes[] = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};

inline bool reduced_precision(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf;
}

// The dtype our kernels compute an op of `dtype` in.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return reduced_precision(dtype) ? at::kFloat : dtype;
}

// Whether torch's own kernels for `dtype` accumulate in float32 (or are the
// dtype's own arithmetic): oneDNN's for bfloat16 and float16, where torch uses it.
inline bool torch_kernels_accumulate_in_float(at::ScalarType dtype) {
  const auto torch_says = [](const char* op_name) {
    const auto op = c10::Dispatcher::singleton().findSchema({op_name, ""});
    return op.has_value() && op->typed<bool()>().call();
  };
  static const bool bf16 = torch_says("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = torch_says("mkldnn::_is_mkldnn_fp16_supported");
  if (dtype == at::kBFloat16) return bf16;
  if (dtype == at::kHalf) return fp16;
  return true;
}

// Why torch's own convolution is no route for `dtype` on this CPU.
inline std::string torch_rounds_partial_sums(at::ScalarType dtype) {
  return c10::str(
      "torch runs ", dtype, " convolutions on this CPU without oneDNN, rounding partial sums to ", dtype,
      " (not float32 accumulation)");
}

// An operand in its compute dtype (the tensor itself where that is its own).
inline at::Tensor in_compute_dtype(const at::Tensor& tensor) {
  return tensor.to(compute_dtype(tensor.scalar_type()));
}

inline std::optional<at::Tensor> in_compute_dtype(const std::optional<at::Tensor>& tensor) {
  if (!tensor.has_value()) return std::nullopt;
  return in_compute_dtype(*tensor);
}

// A buffer in the compute dtype for a result that goes into `result`: `result`
// itself where the dtypes agree, else an empty float32 tensor of its size;
// store_result copies it back (rounding) where it is not `result`.
inline at::Tensor compute_buffer(const at::Tensor& result) {
  if (!reduced_precision(result.scalar_type())) return result;
  return at::empty(result.sizes(), result.options().dtype(at::kFloat));
}

inline void store_result(at::Tensor& result, const at::Tensor& buffer) {
  if (!buffer.is_same(result)) result.copy_(buffer);
}

}  // namespace cpu
}  // namespace lightning_hw
