// Helpers for argument checks shared by every op and backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <sstream>
#include <string>

namespace lightning_hw {
namespace detail {

inline std::string format_sizes(c10::SymIntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "]";
  return out.str();
}

// Shape checks run on symbolic sizes in the fake kernel; guarding specialises
// the compiled graph on the outcome, as torch's own meta functions do.
inline bool sym_true(const c10::SymBool& condition) {
  return condition.guard_bool(__FILE__, __LINE__);
}

// Size arithmetic that records int64 overflow instead of wrapping around (an
// overflowed result reads 0), so that absurd padding or dilation is refused.
// Symbolic operands pass unchecked: they stand for real tensors' sizes, which
// the kernels check again as plain integers.
struct CheckedSizes {
  bool overflow = false;

  c10::SymInt add(const c10::SymInt& a, const c10::SymInt& b) {
    const auto x = a.maybe_as_int(), y = b.maybe_as_int();
    if (!x.has_value() || !y.has_value()) return a + b;
    int64_t sum = 0;
    const bool overflowed = __builtin_add_overflow(*x, *y, &sum);
    return record(overflowed, sum);
  }

  c10::SymInt multiply(const c10::SymInt& a, const c10::SymInt& b) {
    const auto x = a.maybe_as_int(), y = b.maybe_as_int();
    if (!x.has_value() || !y.has_value()) return a * b;
    int64_t product = 0;
    const bool overflowed = __builtin_mul_overflow(*x, *y, &product);
    return record(overflowed, product);
  }

 private:
  c10::SymInt record(bool overflowed, int64_t result) {
    overflow = overflow || overflowed;
    return overflowed ? 0 : result;
  }
};

}  // namespace detail

// Device and dtype agreement of (input, weight, bias), and the backend's dtypes.
inline void check_operands(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    c10::ArrayRef<at::ScalarType> supported,
    const char* backend) {
  TORCH_CHECK(
      input.device() == weight.device(), op,
      ": expected input and weight on the same device, but got input on ", input.device(),
      " and weight on ", weight.device());
  TORCH_CHECK(
      input.scalar_type() == weight.scalar_type(), op, ": input type (", input.scalar_type(),
      ") and weight type (", weight.scalar_type(), ") should be the same");
  if (bias.has_value()) {
    TORCH_CHECK(
        bias->device() == input.device(), op, ": expected bias on ", input.device(),
        " like input, but got bias on ", bias->device());
    TORCH_CHECK(
        bias->scalar_type() == input.scalar_type(), op, ": input type (", input.scalar_type(),
        ") and bias type (", bias->scalar_type(), ") should be the same");
  }
  bool supported_dtype = false;
  for (auto t : supported) supported_dtype = supported_dtype || t == input.scalar_type();
  TORCH_CHECK(
      supported_dtype, op, ": the ", backend, " kernel supports dtypes ", supported,
      ", but got input of type ", input.scalar_type());
}

// grad_output of a backward op: same device and dtype as the forward input, and
// the size the forward produced.
inline void check_grad_output(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input, c10::IntArrayRef expected) {
  TORCH_CHECK(
      grad_output.device() == input.device(), op, ": expected grad_output on ", input.device(),
      " like input, but got ", grad_output.device());
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(), op, ": grad_output type (",
      grad_output.scalar_type(), ") and input type (", input.scalar_type(), ") should be the same");
  TORCH_CHECK(
      grad_output.sizes() == expected, op, ": expected grad_output of size ", expected,
      " (the forward output size), but got ", grad_output.sizes());
}

}  // namespace lightning_hw
