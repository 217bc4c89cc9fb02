// conv2d's depthwise kernels on CPU (the "depthwise" route, see
// conv2d_depthwise.h).
//
// Depthwise convolutions (in_channels == out_channels == groups) have a path
// of their own, for every stride, padding and dilation: a work unit (image,
// block of output rows, 64-byte vector of channels) copies its zero-padded
// rows (for the input gradient: zero-stuffed grad_output, flipped kernel) into
// a per-thread NHWC stripe of one vector per pixel, transposing NCHW blocks
// in registers; tiles of pixels load one weight vector per tap and one input
// vector per pixel (no broadcasts, each lane a channel), and the results are
// transposed back into NCHW rows. Its weight gradient runs tiles of taps over
// the same stripes, in parts fixed by the shape.
//
// Parallelism: at::parallel_for over the units, and over (reduction part,
// channel vector) for the weight gradient.
//
// The inner loops live in depthwise_kernels.h, compiled three times (AVX-512,
// AVX2+FMA, baseline) in tile_kernels.cpp and chosen at run time from the CPU's
// features, so the default build stays portable.
#include "cpu/conv2d_depthwise.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/conv2d_layouts.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace lightning_hw {
namespace cpu {
namespace depthwise {
namespace {

using namespace workspace_slots;

// Output pixels per depthwise work unit (and per weight-gradient chunk): the
// unit's results (32 KiB of floats) and its input stripe stay in L2, and the
// rows a stride-1 unit copies twice (the kernel's reach) are few.
constexpr int64_t kDepthwiseUnitPixels = 512;

// Depthwise weights (C, 1, KH, KW) as packed[vector][tap][lanes], lanes past C
// zero; for the input gradient (transposed) the kernel is flipped.
template <typename scalar_t>
at::Tensor pack_depthwise_weights(const at::Tensor& weight, bool transposed) {
  constexpr int64_t L = lanes<scalar_t>();
  const at::Tensor w = weight.contiguous();
  const scalar_t* wd = w.const_data_ptr<scalar_t>();
  const int64_t channels = w.size(0), taps = w.size(2) * w.size(3);
  at::Tensor packed = at::zeros({ceil_div(channels, L) * taps * L}, weight.options());
  scalar_t* pd = packed.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t k = 0; k < taps; ++k)
      pd[((c / L) * taps + k) * L + c % L] = wd[c * taps + (transposed ? taps - 1 - k : k)];
  return packed;
}

// A depthwise convolution over a zero-padded (and possibly zero-stuffed)
// planar source:
//   out[n][c][oh][ow] = bias[c] + sum over taps of
//     src[n][c][oh*stride + kh*dil][ow*stride + kw*dil] * w[c][kh][kw]
// with src_w columns per padded row and out contiguous NCHW.
template <typename scalar_t>
struct DepthwiseConv {
  PaddedPlanes<scalar_t> src;
  int64_t src_w;
  int64_t batch, channels;
  int64_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, out_h, out_w;
  const scalar_t* packed_weights;  // pack_depthwise_weights
  const scalar_t* bias;            // (channels) or null
  scalar_t* out;
};

template <typename scalar_t>
void run_depthwise_conv(const DepthwiseConv<scalar_t>& a) {
  constexpr int64_t L = lanes<scalar_t>();
  const DepthwiseKernels<scalar_t>& kern = depthwise_kernels<scalar_t>();
  const int64_t P = kern.pixels;
  const int64_t taps = a.kernel_h * a.kernel_w;
  const int64_t reach = (a.kernel_h - 1) * a.dilation_h;  // source rows beyond the last output row's
  const int64_t vectors = ceil_div(a.channels, L);
  // Work units: (image, block of output rows, vector of channels). A unit
  // copies its padded source rows into an NHWC stripe of one vector per pixel
  // (a per-thread buffer), computes tiles of P pixels into a second one and
  // transposes that into the NCHW output: each block's rows of a channel are
  // one contiguous run there.
  const int64_t block_rows = std::clamp<int64_t>(kDepthwiseUnitPixels / a.out_w, 1, a.out_h);
  const int64_t row_blocks = ceil_div(a.out_h, block_rows);
  const int64_t stripe_rows = (block_rows - 1) * a.stride_h + reach + 1;
  std::vector<int64_t> tap_offset(taps), pixel_offset(block_rows * a.out_w);
  for (int64_t k = 0; k < taps; ++k)
    tap_offset[k] = ((k / a.kernel_w) * a.dilation_h * a.src_w + (k % a.kernel_w) * a.dilation_w) * L;
  for (int64_t i = 0; i < block_rows * a.out_w; ++i)
    pixel_offset[i] = ((i / a.out_w) * a.stride_h * a.src_w + (i % a.out_w) * a.stride_w) * L;
  at::Tensor bias_keep;
  const scalar_t* bias = nullptr;
  if (a.bias != nullptr) {
    bias_keep = at::zeros({vectors * L}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
    std::copy(a.bias, a.bias + a.channels, bias_keep.mutable_data_ptr<scalar_t>());
    bias = bias_keep.const_data_ptr<scalar_t>();
  }
  const int64_t plane = a.out_h * a.out_w;
  at::parallel_for(0, a.batch * vectors * row_blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor stripe_keep, result_keep;
    scalar_t* stripe = workspace<scalar_t>(kRowsSlot, (stripe_rows * a.src_w + 1) * L, stripe_keep);
    scalar_t* result = workspace<scalar_t>(kGradRowsSlot, block_rows * a.out_w * L, result_keep);
    std::vector<int64_t> scratch;
    for (int64_t unit = begin; unit < end; ++unit) {
      // Row blocks innermost: a thread sweeps each plane of its channels from top to bottom.
      const int64_t n = unit / (vectors * row_blocks);
      const int64_t v = (unit / row_blocks) % vectors;
      const int64_t oh0 = unit % row_blocks * block_rows;
      const int64_t rows = std::min(block_rows, a.out_h - oh0);
      const int64_t pixels = rows * a.out_w;
      const int64_t valid = std::min(L, a.channels - v * L);
      a.src.copy_stripe(
          n, v * L, valid, oh0 * a.stride_h, (rows - 1) * a.stride_h + reach + 1, stripe, a.src_w, scratch);
      const scalar_t* w = a.packed_weights + v * taps * L;
      const scalar_t* init = bias != nullptr ? bias + v * L : nullptr;
      for (int64_t i = 0; i < pixels; i += P) {
        const int64_t count = std::min(P, pixels - i);
        kern.conv[count - 1](stripe, &pixel_offset[i], tap_offset.data(), taps, w, init, result + i * L);
      }
      kern.scatter(result, pixels, valid, a.out + (n * a.channels + v * L) * plane + oh0 * a.out_w, plane);
    }
  });
}

}  // namespace

template <typename scalar_t>
void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4) {
  const int64_t pad_w = padded_input_w(s);
  at::Tensor bias_contiguous;
  if (bias.has_value()) bias_contiguous = bias->contiguous();
  const scalar_t* bias_data = bias.has_value() ? bias_contiguous.const_data_ptr<scalar_t>() : nullptr;
  const at::Tensor packed = pack_depthwise_weights<scalar_t>(weight, /*transposed=*/false);
  run_depthwise_conv(DepthwiseConv<scalar_t>{
      PaddedPlanes<scalar_t>(input4, s.pad_top, s.pad_left, 1, 1), pad_w, s.batch, s.in_channels, s.kernel_h,
      s.kernel_w, s.stride_h, s.stride_w, s.dilation_h, s.dilation_w, s.out_h, s.out_w,
      packed.const_data_ptr<scalar_t>(), bias_data, out4.mutable_data_ptr<scalar_t>()});
}

template <typename scalar_t>
void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4) {
  const auto [src_h, src_w, offset_h, offset_w] = input_grad_source(s);
  const at::Tensor packed = pack_depthwise_weights<scalar_t>(weight, /*transposed=*/true);
  run_depthwise_conv(DepthwiseConv<scalar_t>{
      PaddedPlanes<scalar_t>(grad4, offset_h, offset_w, s.stride_h, s.stride_w), src_w, s.batch, s.in_channels,
      s.kernel_h, s.kernel_w, 1, 1, s.dilation_h, s.dilation_w, s.in_h, s.in_w, packed.const_data_ptr<scalar_t>(),
      nullptr, grad_input4.mutable_data_ptr<scalar_t>()});
}

// Depthwise weight and/or bias gradient:
//   gw[c][tap] = sum over images and output pixels of
//     x_padded[n][c][oh*s + kh*d][ow*s + kw*d] * gy[n][c][oh][ow]
// Work units: (reduction part, vector of channels). A unit walks its part's
// (image, output row) range in chunks of up to kDepthwiseUnitPixels pixels
// within one image, copies the chunk's grad_output and padded input rows into
// NHWC stripes of one vector per pixel, and runs tiles of taps over them. The
// parts are fixed by the shape alone; each sums into its own vectors, and the
// parts are added in order: bitwise reproducible whatever the thread count.
// The bias sums come from the same grad_output stripes (read once for both),
// bit for bit the same with or without the weight gradient.
template <typename scalar_t>
void conv_weight_grad(
    const at::Tensor& input4,
    const at::Tensor& grad4,
    const Conv2dShape& s,
    at::Tensor* grad_weight,
    at::Tensor* grad_bias) {
  constexpr int64_t L = lanes<scalar_t>();
  const DepthwiseKernels<scalar_t>& kern = depthwise_kernels<scalar_t>();
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t pad_w = padded_input_w(s);
  const int64_t reach = (s.kernel_h - 1) * s.dilation_h;
  const int64_t channels = s.in_channels, vectors = ceil_div(channels, L);
  const int64_t chunk_rows = std::clamp<int64_t>(kDepthwiseUnitPixels / s.out_w, 1, s.out_h);
  const int64_t x_rows = (chunk_rows - 1) * s.stride_h + reach + 1;
  std::vector<int64_t> tap_offset(taps);
  for (int64_t k = 0; k < taps; ++k)
    tap_offset[k] = ((k / s.kernel_w) * s.dilation_h * pad_w + (k % s.kernel_w) * s.dilation_w) * L;
  const auto tap_tiles = even_runs(taps, kern.taps);
  // Enough parts for about 32 units, at most 16.
  const int64_t rows = s.batch * s.out_h;
  const int64_t parts = std::clamp<int64_t>(ceil_div(32, vectors), 1, std::min<int64_t>(rows, 16));
  const int64_t sums = taps + 1;  // per vector: taps, then the bias
  const int64_t part_size = vectors * sums * L;
  at::Tensor partial_keep;
  scalar_t* partial = zeroed_partials<scalar_t>(parts * part_size, partial_keep);
  const PaddedPlanes<scalar_t> x_src(input4, s.pad_top, s.pad_left, 1, 1);
  const PaddedPlanes<scalar_t> g_src(grad4, 0, 0, 1, 1);
  const bool with_weight = grad_weight != nullptr, with_bias = grad_bias != nullptr;
  at::parallel_for(0, parts * vectors, 1, [&](int64_t begin, int64_t end) {
    at::Tensor x_keep, g_keep;
    scalar_t* x_stripe = workspace<scalar_t>(kRowsSlot, (x_rows * pad_w + 1) * L, x_keep);
    scalar_t* g_stripe = workspace<scalar_t>(kGradRowsSlot, (chunk_rows * s.out_w + 1) * L, g_keep);
    std::vector<int64_t> scratch;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t part = unit / vectors, v = unit % vectors;
      const int64_t valid = std::min(L, channels - v * L);
      scalar_t* acc = partial + part * part_size + v * sums * L;
      for_each_row_chunk(part, parts, rows, s.out_h, chunk_rows, [&](int64_t n, int64_t oh, int64_t count) {
        g_src.copy_stripe(n, v * L, valid, oh, count, g_stripe, s.out_w, scratch);
        if (with_bias) kern.bias_sum(g_stripe, count * s.out_w, acc + taps * L);
        if (!with_weight) return;
        x_src.copy_stripe(
            n, v * L, valid, oh * s.stride_h, (count - 1) * s.stride_h + reach + 1, x_stripe, pad_w, scratch);
        for (const auto& [t0, tap_count] : tap_tiles) {
          kern.wgrad[tap_count - 1](
              x_stripe, s.stride_h * pad_w * L, s.stride_w * L, &tap_offset[t0], g_stripe, count, s.out_w,
              acc + t0 * L);
        }
      });
    }
  });

  // Sum the parts in order: grad_weight (C, 1, KH, KW) is [c][tap].
  scalar_t* gw = with_weight ? grad_weight->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = with_bias ? grad_bias->mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const scalar_t* sum_c = partial + (c / L) * sums * L + c % L;
      for (int64_t k = with_weight ? 0 : taps; k < (with_bias ? sums : taps); ++k) {
        scalar_t sum = sum_c[k * L];
        for (int64_t part = 1; part < parts; ++part) sum += sum_c[part * part_size + k * L];
        if (k < taps) {
          gw[c * taps + k] = sum;
        } else {
          gb[c] = sum;
        }
      }
    }
  });
}

template void conv_forward<float>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const Conv2dShape&, at::Tensor&);
template void conv_forward<double>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const Conv2dShape&, at::Tensor&);
template void conv_input_grad<float>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template void conv_input_grad<double>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template void conv_weight_grad<float>(
    const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor*, at::Tensor*);
template void conv_weight_grad<double>(
    const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor*, at::Tensor*);

}  // namespace depthwise
}  // namespace cpu
}  // namespace lightning_hw
