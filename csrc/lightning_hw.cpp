// The one TORCH_LIBRARY of the project: every schema, plus the backend-free
// shape ops that the Python fake kernels call. Kernels live in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

#include "conv2d_geometry.h"
#include "cpu/amx.h"
#include "cpu/route_choice.h"
#include "cpu/tile_kernels.h"
#include "linear_relu_geometry.h"

// `import lightning_hw._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace lightning_hw {
namespace {

std::vector<c10::SymInt> conv2d_output_size_op(
    c10::SymIntArrayRef input_size,
    c10::SymIntArrayRef weight_size,
    at::OptionalSymIntArrayRef bias_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  std::optional<c10::SymIntArrayRef> bias;
  if (bias_size.has_value()) bias = *bias_size;
  return conv2d_geometry(
             input_size, weight_size, bias, stride, padding, dilation, groups, pad_same)
      .output_size();
}

std::vector<c10::SymInt> linear_relu_output_size_op(
    c10::SymIntArrayRef input_size,
    c10::SymIntArrayRef weight_size,
    at::OptionalSymIntArrayRef bias_size) {
  std::optional<c10::SymIntArrayRef> bias;
  if (bias_size.has_value()) bias = *bias_size;
  return linear_relu_output_size(input_size, weight_size, bias);
}

bool has_cuda_kernels_op() {
#ifdef LIGHTNING_HW_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace lightning_hw

TORCH_LIBRARY(lightning_hw, m) {
  // conv2d: `padding` is (pad_h, pad_w); pad_same=True asks for padding='same'
  // (derived from the kernel size, possibly asymmetric, as torch does).
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool pad_same) -> Tensor");
  // Gradients w.r.t. (input, weight, bias); an entry whose output_mask is False
  // is not computed and comes back as an empty tensor.
  m.def(
      "conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool pad_same, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "conv2d_output_size(SymInt[] input_size, SymInt[] weight_size, SymInt[]? bias_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool pad_same) -> SymInt[]",
      &lightning_hw::conv2d_output_size_op);
  // The padding conv2d applies, (top, bottom, left, right): for the ONNX translation.
  m.def(
      "conv2d_padding(int[2] kernel_size, int[2] padding, int[2] dilation, bool pad_same) -> int[]",
      &lightning_hw::conv2d_padding);

  m.def("linear_relu(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // `output` is the forward result: its sign is the ReLU mask.
  m.def(
      "linear_relu_backward(Tensor grad_output, Tensor output, Tensor input, Tensor weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_relu_output_size(SymInt[] input_size, SymInt[] weight_size, SymInt[]? bias_size) "
      "-> SymInt[]",
      &lightning_hw::linear_relu_output_size_op);

  m.def("has_cuda_kernels() -> bool", &lightning_hw::has_cuda_kernels_op);
  // The CPU routes chosen in this process by timing (cpu/route_choice.h), as
  // "op<TAB>shape<TAB>route" lines, and forgetting them (the file stays).
  m.def("route_choices() -> str[]", &lightning_hw::cpu::route_choices);
  m.def("clear_route_choices() -> ()", &lightning_hw::cpu::clear_route_choices);
  // Which CPU route ran how often in this process ("op<TAB>route<TAB>calls"), and
  // which routes can run each part of an op on a shape ("op<TAB>route<TAB>why
  // not", empty where it can): what LIGHTNING_HW_ROUTE may force there.
  m.def("routes_run() -> str[]", &lightning_hw::cpu::routes_run);
  m.def(
      "conv2d_cpu_routes(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool pad_same) -> str[]",
      &lightning_hw::cpu::conv2d_routes);
  m.def("linear_relu_cpu_routes(Tensor input, Tensor weight) -> str[]", &lightning_hw::cpu::linear_relu_routes);
  // The CPU kernels' instruction-set variants ("name<TAB>missing features") and
  // the chosen one's tile sizes ("key=values"): cpu/tile_kernels.h.
  m.def("cpu_isa_variants() -> str[]", &lightning_hw::cpu::cpu_isa_variants);
  m.def("cpu_kernel_tiles() -> str[]", &lightning_hw::cpu::cpu_kernel_tiles);
  // A named misuse of the AMX tile model that the hardware faults on, to see its
  // check raise (cpu/amx.h): for the tests.
  m.def("_amx_emulation_fault(str case_name) -> ()", &lightning_hw::cpu::amx::emulation_fault);
}
