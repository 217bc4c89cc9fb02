// Mixed precision: under torch.autocast both ops compute in the autocast dtype
// of the device, read at call time (CPU: bfloat16 or float16; CUDA: float16 or
// bfloat16), as torch's own convolution and linear do; the kernels accumulate
// in float32. Casting goes through autocast's own cache, so a weight (a leaf
// that requires grad) is cast once per autocast region, however many calls
// read it; float64 tensors and other devices' tensors are left as they are,
// as torch's autocast leaves them.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lightning_hw {
namespace {

template <c10::DeviceType device>
at::Tensor conv2d_autocast(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lightning_hw::conv2d", "")
                             .typed<at::Tensor(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool)>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op.call(
      at::autocast::cached_cast(dtype, input, device), at::autocast::cached_cast(dtype, weight, device),
      at::autocast::cached_cast(dtype, bias, device), stride, padding, dilation, groups, pad_same);
}

template <c10::DeviceType device>
at::Tensor linear_relu_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lightning_hw::linear_relu", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op.call(
      at::autocast::cached_cast(dtype, input, device), at::autocast::cached_cast(dtype, weight, device),
      at::autocast::cached_cast(dtype, bias, device));
}

}  // namespace
}  // namespace lightning_hw

TORCH_LIBRARY_IMPL(lightning_hw, AutocastCPU, m) {
  m.impl("conv2d", &lightning_hw::conv2d_autocast<c10::DeviceType::CPU>);
  m.impl("linear_relu", &lightning_hw::linear_relu_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(lightning_hw, AutocastCUDA, m) {
  m.impl("conv2d", &lightning_hw::conv2d_autocast<c10::DeviceType::CUDA>);
  m.impl("linear_relu", &lightning_hw::linear_relu_autocast<c10::DeviceType::CUDA>);
}
