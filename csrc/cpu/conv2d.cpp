// CPU entries of lightning_hw::conv2d and conv2d_backward: argument checks,
// the route of each part, and dispatch. Each part (forward, input gradient,
// weight gradient) runs the route timed fastest for its shape on this machine
// (route_choice.h): one of our kernel families, each in a file of its own (the
// direct convolution, no im2col buffer: conv2d_direct.cpp; its planar variant
// for few channels: conv2d_planar.cpp; depthwise convolutions:
// conv2d_depthwise.cpp; bfloat16 on AMX tiles: amx.cpp), or torch's own
// convolution where that is faster.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "conv2d_geometry.h"
#include "cpu/amx.h"
#include "cpu/conv2d_depthwise.h"
#include "cpu/conv2d_direct.h"
#include "cpu/conv2d_planar.h"
#include "cpu/precision.h"
#include "cpu/route_choice.h"
#include "cpu/tile_kernels.h"

namespace lightning_hw {
namespace {

using cpu::lanes;
using cpu::round_up;

// Longest reduction (channels x taps per output) sent to the planar path even
// with many output channels; see use_planar.
constexpr int64_t kPlanarMaxReduce = 64;

// Stride 1 and either few output channels per group (a vector of output
// channels would be mostly empty lanes) or a short reduction (reduce * taps
// multiply-adds per output, e.g. 27 for 3 input channels and a 3x3 kernel):
// then the channel-vector path is bound by its scalar stores into NCHW, one per
// output, and the planar path, which stores whole rows, is faster.
template <typename scalar_t>
bool use_planar(int64_t out_per_group, int64_t reduce_per_output, int64_t stride_h, int64_t stride_w) {
  return stride_h == 1 && stride_w == 1 &&
         (out_per_group * 2 <= lanes<scalar_t>() || reduce_per_output <= kPlanarMaxReduce);
}

template <typename scalar_t>
bool planar_forward(const Conv2dShape& s) {
  return use_planar<scalar_t>(
      s.out_channels_per_group(), s.in_channels_per_group() * s.kernel_h * s.kernel_w, s.stride_h,
      s.stride_w);
}

// Depthwise convolutions (channel multiplier 1: in_channels == out_channels
// == groups) take their own path, whatever the stride, padding or dilation.
bool is_depthwise(const Conv2dShape& s) {
  return s.groups == s.in_channels && s.out_channels == s.groups;
}

// out4 = conv2d(input4) by one of our routes: "depthwise", "planar" or "direct".
template <typename scalar_t>
void forward_route(
    const std::string& route,
    const at::Tensor& input4,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const Conv2dShape& s,
    at::Tensor& out4) {
  if (route == "depthwise") {
    cpu::depthwise::conv_forward<scalar_t>(input4, weight, bias, s, out4);
  } else if (route == "planar") {
    cpu::planar::conv_forward<scalar_t>(input4, weight, bias, s, out4);
  } else {
    cpu::direct::conv_forward<scalar_t>(input4, weight, bias, s, out4);
  }
}

// The kernels copy the zero-padded input (and, for the input gradient, the
// zero-stuffed grad_output, in + span rows) into NHWC buffers, channels
// padded to whole vectors. The geometry's own sizes fit in int64, but with
// absurd padding or dilation these buffers' sizes may not: refuse those.
// Anything smaller fits in memory or fails to allocate with a clear error.
void check_buffer_sizes(const Conv2dShape& s) {
  const auto rows = [](int64_t in, int64_t out, int64_t stride, int64_t kernel, int64_t dilation) {
    const uint64_t span = uint64_t(kernel - 1) * uint64_t(dilation);
    return std::max(uint64_t(out - 1) * uint64_t(stride) + span + 1, uint64_t(in) + span);
  };
  const uint64_t channels = std::max<uint64_t>(
      s.in_channels, s.groups * round_up(s.out_channels_per_group(), 2 * lanes<float>()));
  uint64_t bytes = sizeof(double);
  bool overflow = false;
  for (const uint64_t size : {uint64_t(s.batch), channels, rows(s.in_h, s.out_h, s.stride_h, s.kernel_h, s.dilation_h),
                              rows(s.in_w, s.out_w, s.stride_w, s.kernel_w, s.dilation_w)})
    overflow = overflow || __builtin_mul_overflow(bytes, size, &bytes);
  TORCH_CHECK(
      !overflow && bytes <= uint64_t(std::numeric_limits<int64_t>::max()),
      "conv2d: the CPU kernel's zero-padded copy of the input (batch ", s.batch, ", ", channels,
      " channels, padding (", s.pad_top, ", ", s.pad_left, "), dilation (", s.dilation_h, ", ", s.dilation_w,
      ")) is too large to index in int64");
}

// Which route runs each part of the op (cpu/route_choice.h), timed per shape on
// the machine: our depthwise, planar or direct kernels, or torch's own
// convolution ("aten": oneDNN, or its GEMM-based kernels), so that no shape runs
// slower here than under torch.nn. The built-in rule (timing off, deterministic
// algorithms, tiny problems) picks among ours only: their results are bitwise
// independent of the thread count.
enum class ConvPart { kForward, kInputGrad, kWeightGrad };

template <typename scalar_t>
std::string conv_rule_route(const Conv2dShape& s, ConvPart part) {
  if (is_depthwise(s)) return "depthwise";
  // The input gradient is a stride-1 convolution with in/out channels swapped;
  // the weight gradient follows the forward's layout choice.
  const bool planar = part == ConvPart::kInputGrad
                          ? use_planar<scalar_t>(
                                s.in_channels_per_group(), s.out_channels_per_group() * s.kernel_h * s.kernel_w, 1, 1)
                          : planar_forward<scalar_t>(s);
  return planar ? "planar" : "direct";
}

// Why the "amx" route (bfloat16 on AMX tiles, or their model) cannot run a
// convolution: empty where it can.
std::string amx_refusal(const Conv2dShape& s, at::ScalarType dtype) {
  if (dtype != at::kBFloat16) return c10::str("amx runs bfloat16 convolutions; this one is ", dtype);
  const std::string tiles = cpu::amx::tiles_refusal();
  if (!tiles.empty()) return tiles;
  if (!cpu::amx::conv_can_run(s)) return c10::str("amx runs convolutions of one group; this one has ", s.groups);
  return "";
}

// The built-in rule gives the amx route the convolutions with channels enough
// on both sides to fill the tiles' 32-channel steps and 16-channel columns.
bool amx_suits(const Conv2dShape& s) {
  return s.in_channels >= 16 && s.out_channels >= 16;
}

// at::convolution pads both sides alike: 'same' padding with an odd span
// (even kernel extent) is asymmetric, and stays with our kernels.
bool aten_can_run(const Conv2dShape& s, bool pad_same) {
  return !pad_same || (((s.kernel_h - 1) * s.dilation_h) % 2 == 0 && ((s.kernel_w - 1) * s.dilation_w) % 2 == 0);
}

// Why the planar kernels do not take a part: `convolution` says what its
// convolution is, with out_per_group outputs per group and reduce
// multiply-adds per output.
template <typename scalar_t>
std::string planar_refusal(const std::string& convolution, int64_t out_per_group, int64_t reduce) {
  return c10::str(
      "planar runs stride-1 convolutions with at most ", lanes<scalar_t>() / 2,
      " output channels per group or at most ", kPlanarMaxReduce, " multiply-adds per output; ", convolution, " has ",
      out_per_group, " output channels per group and ", reduce, " multiply-adds per output");
}

// `dtype` is the op's (our kernels compute in scalar_t, see cpu/precision.h).
template <typename scalar_t>
cpu::RouteQuery conv_route_query(const Conv2dShape& s, ConvPart part, bool pad_same, at::ScalarType dtype) {
  static constexpr const char* kOps[] = {"conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad"};
  cpu::RouteQuery query;
  query.op = kOps[static_cast<int>(part)];
  query.family = "conv2d";
  query.shape = c10::str(
      c10::toString(dtype), " ", s.batch, "x", s.in_channels, "x", s.in_h, "x",
      s.in_w, " out ", s.out_channels, "x", s.out_h, "x", s.out_w, " k", s.kernel_h, "x", s.kernel_w, " s",
      s.stride_h, "x", s.stride_w, " p", s.pad_top, "x", s.pad_left, " d", s.dilation_h, "x", s.dilation_w, " g",
      s.groups);
  const std::string ours = conv_rule_route<scalar_t>(s, part);  // our float kernels' rule
  query.candidates = {ours};
  // The direct kernels run every shape; they are timed against the planar
  // ones (whose rule is a threshold), not against depthwise (one useful lane
  // in a vector there).
  const int64_t taps = s.kernel_h * s.kernel_w;
  if (ours == "depthwise") {
    const std::string why = c10::str(
        "a depthwise convolution (in_channels == out_channels == groups == ", s.groups, ") runs the depthwise route");
    query.excluded = {{"direct", why}, {"planar", why}};
  } else {
    query.excluded.emplace_back(
        "depthwise", c10::str("depthwise runs convolutions with in_channels == out_channels == groups; here in_channels ",
                              s.in_channels, ", out_channels ", s.out_channels, ", groups ", s.groups));
    if (ours == "planar") {
      query.candidates.push_back("direct");
    } else if (part == ConvPart::kInputGrad) {
      query.excluded.emplace_back(
          "planar", planar_refusal<scalar_t>(
                        "the input gradient (a stride-1 convolution of grad_output)", s.in_channels_per_group(),
                        s.out_channels_per_group() * taps));
    } else {
      query.excluded.emplace_back(
          "planar", planar_refusal<scalar_t>(
                        c10::str("this convolution (stride ", s.stride_h, "x", s.stride_w, ")"),
                        s.out_channels_per_group(), s.in_channels_per_group() * taps));
    }
  }
  const std::string amx_refused = amx_refusal(s, dtype);
  query.offer("amx", amx_refused);
  if (!aten_can_run(s, pad_same)) {
    query.excluded.emplace_back(
        "aten", c10::str(
                    "torch's convolution pads both sides alike, and padding='same' with a kernel extent of ",
                    (s.kernel_h - 1) * s.dilation_h + 1, "x", (s.kernel_w - 1) * s.dilation_w + 1,
                    " pads one side more"));
  } else if (!cpu::torch_kernels_accumulate_in_float(dtype)) {
    query.excluded.emplace_back("aten", cpu::torch_rounds_partial_sums(dtype));
  } else {
    query.candidates.push_back("aten");
  }
  query.fallback = amx_refused.empty() && amx_suits(s) ? "amx" : ours;
  query.flops = 2.0 * double(s.batch) * double(s.out_channels) * double(s.out_h * s.out_w) *
                double(s.in_channels_per_group() * taps);
  return query;
}

std::vector<int64_t> conv_stride(const Conv2dShape& s) { return {s.stride_h, s.stride_w}; }
std::vector<int64_t> conv_padding(const Conv2dShape& s) { return {s.pad_top, s.pad_left}; }
std::vector<int64_t> conv_dilation(const Conv2dShape& s) { return {s.dilation_h, s.dilation_w}; }

at::Tensor conv2d_cpu(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  // The output is allocated where one of our routes writes it; torch's route
  // returns its own (see conv2d_backward_cpu on unused buffers).
  Conv2dForwardSetup setup = conv2d_forward_setup(
      input, weight, bias, stride, padding, dilation, groups, pad_same, cpu::kCpuDtypes, "CPU",
      /*allocate_out=*/false);
  const Conv2dShape& s = setup.shape;
  const std::vector<int64_t> out_sizes = conv2d_output_sizes(s, input.dim() == 4);
  const auto allocate_out = [&] {
    if (!setup.out.defined()) allocate_conv2d_output(setup, input);
  };
  if (c10::multiply_integers(out_sizes) == 0) {
    allocate_out();
    return setup.out;
  }
  check_buffer_sizes(s);
  at::Tensor aten_out;
  std::string route;
  AT_DISPATCH_FLOATING_TYPES(cpu::compute_dtype(input.scalar_type()), "lightning_hw::conv2d", [&] {
    const auto run = [&](const std::string& name) {
      if (name == "aten") {
        aten_out = at::convolution(
            setup.input4, weight, bias, conv_stride(s), conv_padding(s), conv_dilation(s), false, {0, 0}, groups);
      } else if (name == "amx") {
        allocate_out();
        cpu::amx::conv_forward(setup.input4, weight, bias, s, setup.out4);
      } else {
        allocate_out();
        at::Tensor out4 = cpu::compute_buffer(setup.out4);
        forward_route<scalar_t>(
            name, cpu::in_compute_dtype(setup.input4), cpu::in_compute_dtype(weight), cpu::in_compute_dtype(bias), s,
            out4);
        cpu::store_result(setup.out4, out4);
      }
    };
    route = cpu::choose_route(conv_route_query<scalar_t>(s, ConvPart::kForward, pad_same, input.scalar_type()), run);
    run(route);
  });
  // torch's result in our layout (contiguous: a copy only where it is not).
  return route == "aten" ? aten_out.contiguous().view(out_sizes) : setup.out;
}

// grad_input by one of our routes.
template <typename scalar_t>
void input_grad_route(
    const std::string& route, const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s,
    at::Tensor& grad_input4) {
  if (route == "depthwise") {
    cpu::depthwise::conv_input_grad<scalar_t>(grad4, weight, s, grad_input4);
  } else if (route == "planar") {
    cpu::planar::conv_input_grad<scalar_t>(grad4, weight, s, grad_input4);
  } else {
    cpu::direct::conv_input_grad<scalar_t>(grad4, weight, s, grad_input4);
  }
}

// grad_weight and grad_bias (each where not null) by one of our routes.
template <typename scalar_t>
void weight_grad_route(
    const std::string& route, const at::Tensor& input4, const at::Tensor& grad4, const Conv2dShape& s,
    at::Tensor* grad_weight, at::Tensor* grad_bias) {
  if (route == "depthwise") {
    cpu::depthwise::conv_weight_grad<scalar_t>(input4, grad4, s, grad_weight, grad_bias);
    return;
  }
  // The planar shapes (few channels): grad_output in NHWC would be mostly
  // padding lanes, and its copy would cost more than the arithmetic.
  if (route == "planar") {
    if (cpu::planar::conv_weight_grad<scalar_t>(input4, grad4, s, grad_weight, grad_bias)) return;
    grad_bias = nullptr;  // done; the weight gradient again, by the direct kernels
  }
  if (grad_weight != nullptr) cpu::direct::conv_weight_grad<scalar_t>(input4, grad4, s, *grad_weight);
  if (grad_bias != nullptr) cpu::direct::conv_bias_grad<scalar_t>(grad4, *grad_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same,
    std::array<bool, 3> output_mask) {
  // The gradients are allocated where one of our routes writes them (torch's
  // routes return their own): a large buffer allocated and left unused slowed
  // torch's own backward on memory-bound shapes by 10-20% (benchmarks/NOTES.md,
  // round 7). An empty batch gets its zero gradients from the setup.
  const bool empty_batch = input.dim() == 4 && input.size(0) == 0;
  Conv2dBackwardSetup setup = conv2d_backward_setup(
      grad_output, input, weight, stride, padding, dilation, groups, pad_same,
      empty_batch ? output_mask : std::array<bool, 3>{false, false, false}, cpu::kCpuDtypes, "CPU");
  const Conv2dShape& s = setup.shape;
  at::Tensor& grad_input = setup.grad_input;
  at::Tensor& grad_weight = setup.grad_weight;
  at::Tensor& grad_bias = setup.grad_bias;
  if (s.batch == 0) return {grad_input, grad_weight, grad_bias};
  check_buffer_sizes(s);
  const auto options = grad_output.options();
  bool input_grad_allocated = false, weight_grads_allocated = false;
  const auto allocate_input_grad = [&] {
    if (input_grad_allocated) return;
    grad_input = at::empty(input.sizes(), options);
    setup.grad_input4 = input.dim() == 4 ? grad_input : grad_input.unsqueeze(0);
    input_grad_allocated = true;
  };
  const auto allocate_weight_grads = [&] {
    if (weight_grads_allocated) return;
    if (output_mask[1]) grad_weight = at::empty(weight.sizes(), options);
    if (output_mask[2]) grad_bias = at::empty({s.out_channels}, options);
    weight_grads_allocated = true;
  };
  const at::Tensor& grad4 = setup.grad4;
  const at::Tensor& input4 = setup.input4;
  // torch's backward for the "aten" route, computing the gradients `mask` asks for.
  const auto aten_backward = [&](std::array<bool, 3> mask) {
    const std::vector<int64_t> bias_sizes{s.out_channels};
    return at::convolution_backward(
        grad4, input4, weight, mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, conv_stride(s),
        conv_padding(s), conv_dilation(s), false, {0, 0}, groups, mask);
  };
  AT_DISPATCH_FLOATING_TYPES(cpu::compute_dtype(input.scalar_type()), "lightning_hw::conv2d_backward", [&] {
    at::Tensor aten_grad_input, aten_grad_weight, aten_grad_bias;  // the "aten" routes' results
    const auto run_input_grad = [&](const std::string& route) {
      if (route == "aten") {
        aten_grad_input = std::get<0>(aten_backward({true, false, false}));
      } else if (route == "amx") {
        allocate_input_grad();
        cpu::amx::conv_input_grad(grad4, weight, s, setup.grad_input4);
      } else {
        allocate_input_grad();
        at::Tensor grad_input4 = cpu::compute_buffer(setup.grad_input4);
        input_grad_route<scalar_t>(route, cpu::in_compute_dtype(grad4), cpu::in_compute_dtype(weight), s, grad_input4);
        cpu::store_result(setup.grad_input4, grad_input4);
      }
    };
    const auto run_weight_grad = [&](const std::string& route) {
      if (route == "aten") {
        std::tie(std::ignore, aten_grad_weight, aten_grad_bias) = aten_backward({false, true, output_mask[2]});
        return;
      }
      // The tiles take the weight gradient unless the input holds non-finite
      // values (see amx.h); the bias gradient, one pass over grad_output, and
      // such a weight gradient go to our float kernels, by their rule.
      allocate_weight_grads();
      const bool amx_weight = route == "amx" && output_mask[1] && cpu::amx::conv_weight_grad(grad4, input4, s, grad_weight);
      const std::string ours = route == "amx" ? conv_rule_route<scalar_t>(s, ConvPart::kWeightGrad) : route;
      const bool weight_by_ours = output_mask[1] && !amx_weight;
      if (!weight_by_ours && !output_mask[2]) return;
      at::Tensor weight_buffer = cpu::compute_buffer(grad_weight), bias_buffer = cpu::compute_buffer(grad_bias);
      weight_grad_route<scalar_t>(
          ours, cpu::in_compute_dtype(input4), cpu::in_compute_dtype(grad4), s, weight_by_ours ? &weight_buffer : nullptr,
          output_mask[2] ? &bias_buffer : nullptr);
      if (weight_by_ours) cpu::store_result(grad_weight, weight_buffer);
      cpu::store_result(grad_bias, bias_buffer);
    };
    const std::string input_route =
        output_mask[0] && input.numel() > 0
            ? cpu::choose_route(
                  conv_route_query<scalar_t>(s, ConvPart::kInputGrad, pad_same, input.scalar_type()), run_input_grad)
            : "";
    // The bias gradient alone is one pass over grad_output: nothing to time or force.
    std::string weight_route;
    // With both gradients asked for (and routes not forced), torch's "aten"
    // weight gradient is its one backward call computing both (it shares its
    // work on grad_output between them, and is at times faster than its two
    // gradients apart): the weight gradient's routes are timed as whole
    // backwards, each of ours after the input gradient's route, "aten" as that
    // one call, under a key of their own; where that call wins, it gives both
    // (routes_run() still counts the input gradient's route as chosen).
    bool both = false;
    const auto run_backward = [&](const std::string& route) {
      if (route == "aten") {
        aten_backward({true, true, output_mask[2]});
        return;
      }
      run_input_grad(input_route);
      run_weight_grad(route);
    };
    if (output_mask[1]) {
      cpu::RouteQuery query = conv_route_query<scalar_t>(s, ConvPart::kWeightGrad, pad_same, input.scalar_type());
      both = !input_route.empty() && !cpu::routes_forced(query);
      if (both) query.shape += " with input grad by " + input_route;
      weight_route = both ? cpu::choose_route(query, run_backward) : cpu::choose_route(query, run_weight_grad);
    } else if (output_mask[2]) {
      weight_route = conv_rule_route<scalar_t>(s, ConvPart::kWeightGrad);
    }
    // One call for both, as torch.nn makes it, where torch computes the weight
    // gradient and the input gradient is torch's too or timed with it.
    const bool joint = weight_route == "aten" && (input_route == "aten" || both);
    if (joint) {
      std::tie(aten_grad_input, aten_grad_weight, aten_grad_bias) = aten_backward({true, true, output_mask[2]});
    } else {
      if (!input_route.empty()) run_input_grad(input_route);
      if (!weight_route.empty()) run_weight_grad(weight_route);
    }
    // torch's results in our layout (contiguous: a copy only where they are not).
    if (joint || input_route == "aten") grad_input = aten_grad_input.contiguous().view(input.sizes());
    if (weight_route == "aten") {
      grad_weight = aten_grad_weight.contiguous();
      if (output_mask[2]) grad_bias = aten_grad_bias.contiguous();
    }
  });
  // An input gradient of no elements, which no route computed.
  if (output_mask[0] && input.numel() == 0) allocate_input_grad();
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

std::vector<std::string> cpu::conv2d_routes(
    const at::Tensor& input,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  const Conv2dShape s = conv2d_shape_of(input, weight, std::nullopt, stride, padding, dilation, groups, pad_same);
  std::vector<std::string> lines;
  AT_DISPATCH_FLOATING_TYPES(cpu::compute_dtype(input.scalar_type()), "lightning_hw::conv2d_cpu_routes", [&] {
    for (const ConvPart part : {ConvPart::kForward, ConvPart::kInputGrad, ConvPart::kWeightGrad})
      for (std::string& line : cpu::describe_routes(conv_route_query<scalar_t>(s, part, pad_same, input.scalar_type())))
        lines.push_back(std::move(line));
  });
  return lines;
}

}  // namespace lightning_hw

TORCH_LIBRARY_IMPL(lightning_hw, CPU, m) {
  m.impl("conv2d", &lightning_hw::conv2d_cpu);
  m.impl("conv2d_backward", &lightning_hw::conv2d_backward_cpu);
}
