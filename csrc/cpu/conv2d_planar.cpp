// conv2d's planar kernels on CPU (the "planar" route, see conv2d_planar.h).
//
// Stride-1 convolutions with few output channels or a short reduction (first
// layers, grouped) use a planar variant of the direct convolution: vectors
// along output rows of an NCHW copy, times broadcast weights. The input
// gradient is the same convolution run on grad_output, zero-stuffed by the
// stride and padded by (kernel extent - 1 - padding), with the kernel flipped
// and in/out channels swapped (conv2d_layouts.h).
//
// The inner loops live in conv2d_kernels.h, compiled three times (AVX-512,
// AVX2+FMA, baseline) in tile_kernels.cpp and chosen at run time from the CPU's
// features, so the default build stays portable.
#include "cpu/conv2d_planar.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/conv2d_layouts.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace lightning_hw {
namespace cpu {
namespace planar {
namespace {

using namespace workspace_slots;

// Whether the n values at p are all finite (no infinity, no NaN).
template <typename scalar_t>
bool all_finite(const scalar_t* p, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(p[i]);
  return finite;
}

// Weights as packed[g][c][tap][o]: c over the reduced channels, o over the
// group's outputs; transposed (input gradient) swaps the roles of in/out
// channels and flips the kernel, as in pack_weights.
template <typename scalar_t>
at::Tensor pack_planar_weights(const at::Tensor& weight, const Conv2dShape& s, bool transposed) {
  const at::Tensor w = weight.contiguous();
  const scalar_t* wd = w.const_data_ptr<scalar_t>();
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t cin_g = s.in_channels_per_group(), cout_g = s.out_channels_per_group();
  const int64_t reduce = transposed ? cout_g : cin_g;
  const int64_t out_pg = transposed ? cin_g : cout_g;
  at::Tensor packed = at::empty({s.groups * reduce * taps * out_pg}, weight.options());
  scalar_t* pd = packed.mutable_data_ptr<scalar_t>();
  for (int64_t g = 0; g < s.groups; ++g)
    for (int64_t c = 0; c < reduce; ++c)
      for (int64_t k = 0; k < taps; ++k)
        for (int64_t o = 0; o < out_pg; ++o) {
          const int64_t co = transposed ? c : o, ci = transposed ? o : c;
          const int64_t src_tap = transposed ? taps - 1 - k : k;
          pd[((g * reduce + c) * taps + k) * out_pg + o] =
              wd[((g * cout_g + co) * cin_g + ci) * taps + src_tap];
        }
  return packed;
}

// A stride-1 direct convolution over a zero-padded planar source:
//   out[n][g*out_pg + o][oh][ow] = bias[g*out_pg + o] + sum over taps and c of
//     src[n][g*reduce + c][oh + kh*dil][ow + kw*dil] * w[g][o][c][kh][kw]
// with src_w columns per padded row and out contiguous NCHW.
template <typename scalar_t>
struct PlanarConv {
  PaddedPlanes<scalar_t> src;
  int64_t src_w;
  int64_t batch, groups, reduce, out_per_group;
  int64_t kernel_h, kernel_w, dilation_h, dilation_w, out_h, out_w;
  const scalar_t* packed_weights;  // pack_planar_weights
  const scalar_t* bias;            // (groups * out_per_group) or null
  scalar_t* out;
};

template <typename scalar_t>
void run_planar_conv(const PlanarConv<scalar_t>& a) {
  constexpr int64_t L = lanes<scalar_t>();
  const ConvKernels<scalar_t>& kern = kernels<scalar_t>();
  const int64_t taps = a.kernel_h * a.kernel_w;
  const int64_t reach = (a.kernel_h - 1) * a.dilation_h;  // source rows beyond the output rows
  // Work units: (image, group, block of output rows). A unit copies its
  // padded source rows into a per-thread buffer of at most ~256 KiB (kept in
  // L2), then sweeps them; blocks are smaller when there are few images, so
  // that every thread gets work.
  const int64_t row_bytes = a.reduce * a.src_w * int64_t(sizeof(scalar_t));
  const int64_t fit_rows = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, row_bytes) - reach);
  const int64_t spread = ceil_div(4 * at::get_num_threads(), a.batch * a.groups);
  const int64_t block_rows = std::min(ceil_div(a.out_h, spread), fit_rows);
  const int64_t row_blocks = ceil_div(a.out_h, block_rows);
  const int64_t buffer_rows = block_rows + reach;
  const int64_t channel_stride = buffer_rows * a.src_w;
  std::vector<int64_t> tap_offset(taps);
  for (int64_t kh = 0; kh < a.kernel_h; ++kh)
    for (int64_t kw = 0; kw < a.kernel_w; ++kw)
      tap_offset[kh * a.kernel_w + kw] = kh * a.dilation_h * a.src_w + kw * a.dilation_w;
  // Rows of more than one vector use two-vector tiles (the tail may use one).
  const int64_t max_channels = kern.tiles.planar_channels[a.out_w > L ? 1 : 0];
  const int64_t out_channels = a.groups * a.out_per_group;
  at::parallel_for(0, a.batch * a.groups * row_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t tile[cpu::kPlanarMaxRows * kPlanarMaxChannels * 2 * L];
    at::Tensor keep_alive;
    // The last vector of a row may run 2 * lanes past the buffer's end: those
    // lanes are computed, never stored.
    const int64_t buffer_size = a.reduce * channel_stride;
    scalar_t* buffer = workspace<scalar_t>(kRowsSlot, buffer_size + 2 * L, keep_alive);
    std::memset(buffer + buffer_size, 0, 2 * L * sizeof(scalar_t));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / (a.groups * row_blocks);
      const int64_t g = (unit / row_blocks) % a.groups;
      const int64_t oh_begin = (unit % row_blocks) * block_rows;
      const int64_t oh_end = std::min(a.out_h, oh_begin + block_rows);
      a.src.copy(n, g * a.reduce, a.reduce, oh_begin, oh_end - oh_begin + reach, buffer, a.src_w, channel_stride);
      const scalar_t* w = a.packed_weights + g * a.reduce * taps * a.out_per_group;
      for (int64_t o0 = 0; o0 < a.out_per_group;) {
        const int64_t count = std::min<int64_t>(max_channels, a.out_per_group - o0);
        for (int64_t ow0 = 0; ow0 < a.out_w;) {
          const int64_t vectors = a.out_w - ow0 > L ? 2 : 1;
          const int64_t valid = std::min(vectors * L, a.out_w - ow0);
          // Tiles of R rows; the last one may overlap its predecessor (rows
          // recomputed, same values stored twice). Blocks shorter than R go
          // row by row.
          const int64_t R = kern.planar_rows[vectors - 1][count - 1];
          const bool multi = oh_end - oh_begin >= R;
          const auto planar = multi ? kern.planar[vectors - 1][count - 1] : kern.planar_one_row[vectors - 1][count - 1];
          const int64_t step = multi ? R : 1;
          for (int64_t oh_next = oh_begin; oh_next < oh_end; oh_next += step) {
            const int64_t oh = std::min(oh_next, oh_end - step);
            planar(
                buffer + (oh - oh_begin) * a.src_w + ow0, a.src_w, channel_stride, tap_offset.data(), taps,
                a.reduce, w + o0, a.out_per_group, a.bias ? a.bias + g * a.out_per_group + o0 : nullptr, tile);
            for (int64_t r = 0; r < step; ++r) {
              for (int64_t o = 0; o < count; ++o) {
                scalar_t* dst = a.out +
                                ((n * out_channels + g * a.out_per_group + o0 + o) * a.out_h + oh + r) * a.out_w + ow0;
                std::memcpy(dst, tile + (r * count + o) * vectors * L, valid * sizeof(scalar_t));
              }
            }
          }
          ow0 += valid;
        }
        o0 += count;
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4) {
  const int64_t cout_g = s.out_channels_per_group();
  const int64_t pad_w = padded_input_w(s);
  at::Tensor bias_contiguous;
  if (bias.has_value()) bias_contiguous = bias->contiguous();
  const scalar_t* bias_data = bias.has_value() ? bias_contiguous.const_data_ptr<scalar_t>() : nullptr;
  const at::Tensor packed = pack_planar_weights<scalar_t>(weight, s, /*transposed=*/false);
  PlanarConv<scalar_t> a{
      PaddedPlanes<scalar_t>(input4, s.pad_top, s.pad_left, 1, 1), pad_w, s.batch, s.groups,
      s.in_channels_per_group(), cout_g, s.kernel_h, s.kernel_w, s.dilation_h, s.dilation_w,
      s.out_h, s.out_w, packed.const_data_ptr<scalar_t>(), bias_data, out4.mutable_data_ptr<scalar_t>()};
  run_planar_conv(a);
}

template <typename scalar_t>
void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4) {
  const auto [src_h, src_w, offset_h, offset_w] = input_grad_source(s);
  const at::Tensor packed = pack_planar_weights<scalar_t>(weight, s, /*transposed=*/true);
  PlanarConv<scalar_t> a{
      PaddedPlanes<scalar_t>(grad4, offset_h, offset_w, s.stride_h, s.stride_w), src_w, s.batch,
      s.groups, s.out_channels_per_group(), s.in_channels_per_group(), s.kernel_h, s.kernel_w,
      s.dilation_h, s.dilation_w, s.in_h, s.in_w, packed.const_data_ptr<scalar_t>(), nullptr,
      grad_input4.mutable_data_ptr<scalar_t>()};
  run_planar_conv(a);
}

// Weight gradient from planar rows: grad_output is read in place (NCHW) or, when
// its rows are not whole vectors, through a per-thread buffer of padded rows;
// the input rows a chunk needs are copied, zero-padded, into another. Tiles of
// (output channels x positions) accumulate vectors over a chunk of rows of one
// image (both buffers stay in L2). The rows are split into a number of parts
// fixed by the shape; each part sums into its own vectors, and the parts and
// then the lanes are added in order: bitwise reproducible whatever the thread
// count. The bias gradient is one more position per group whose input rows
// are all ones: with both wanted, grad_output is read once for the two (and
// the bias sums come out the same, bit for bit, with or without the weights).
// The rows' columns past the output width meet zeros of grad_output: an
// infinite or NaN input there would make 0 * inf = NaN where torch has none,
// so with such input the weight gradient is not final and this returns false
// (the caller computes it again by the direct kernels); else true.
template <typename scalar_t>
bool conv_weight_grad(
    const at::Tensor& input4,
    const at::Tensor& grad4,
    const Conv2dShape& s,
    at::Tensor* grad_weight,
    at::Tensor* grad_bias) {
  constexpr int64_t L = lanes<scalar_t>();
  const ConvKernels<scalar_t>& kern = kernels<scalar_t>();
  const int64_t NL = kern.native_lanes;
  const int64_t row_w = round_up(s.out_w, L);                           // grad_output row, whole vectors
  const int64_t x_w = row_w + (s.kernel_w - 1) * s.dilation_w;           // every tap's vectors in bounds
  const int64_t reach = (s.kernel_h - 1) * s.dilation_h;
  const int64_t cin_g = s.in_channels_per_group(), cout_g = s.out_channels_per_group();
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t weight_positions = grad_weight != nullptr ? cin_g * taps : 0;  // q = ci * taps + tap
  const int64_t positions = weight_positions + (grad_bias != nullptr ? 1 : 0);  // then the bias
  const bool grad_in_place = grad4.stride(3) == 1 && s.out_w % L == 0;
  // Rows per chunk: grad_output and input rows within ~256 KiB.
  const int64_t chunk_bytes = int64_t(1) << 18;
  const int64_t x_channels = s.in_channels + 1;  // the input's, then one of ones
  const int64_t per_row = (s.out_channels * row_w + x_channels * x_w) * int64_t(sizeof(scalar_t));
  const int64_t chunk_rows = std::clamp<int64_t>(
      (chunk_bytes - x_channels * reach * x_w * int64_t(sizeof(scalar_t))) / per_row, 1, s.out_h);
  const int64_t x_channel_stride = (chunk_rows + reach) * x_w;
  const int64_t g_buffer_channel_stride = chunk_rows * row_w;
  // Offsets of each group's positions from the start of the input rows.
  std::vector<int64_t> x_offset(s.groups * positions);
  for (int64_t grp = 0; grp < s.groups; ++grp) {
    int64_t* offset = &x_offset[grp * positions];
    for (int64_t ci = 0; ci < weight_positions / taps; ++ci)
      for (int64_t k = 0; k < taps; ++k)
        offset[ci * taps + k] = (grp * cin_g + ci) * x_channel_stride +
                                (k / s.kernel_w) * s.dilation_h * x_w + (k % s.kernel_w) * s.dilation_w;
    if (grad_bias != nullptr) offset[weight_positions] = s.in_channels * x_channel_stride;
  }
  const auto channel_blocks = even_runs(cout_g, kern.tiles.planar_wgrad_channels);
  const auto position_tiles = even_runs(positions, kern.tiles.planar_wgrad_positions);

  const int64_t rows = s.batch * s.out_h;
  const int64_t parts = std::clamp<int64_t>(ceil_div(rows, 64), 1, 16);
  const int64_t outputs = s.out_channels * positions;
  at::Tensor partial_keep;
  scalar_t* partial_data = zeroed_partials<scalar_t>(parts * outputs * NL, partial_keep);
  const PaddedPlanes<scalar_t> x_src(input4, s.pad_top, s.pad_left, 1, 1);
  const PaddedPlanes<scalar_t> g_src(grad4, 0, 0, 1, 1);
  std::atomic<bool> all_input_finite{true};
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    bool input_finite = true;
    at::Tensor x_keep, g_keep;
    scalar_t* x_buffer = workspace<scalar_t>(kRowsSlot, x_channels * x_channel_stride, x_keep);
    std::fill(x_buffer + s.in_channels * x_channel_stride, x_buffer + x_channels * x_channel_stride, scalar_t(1));
    scalar_t* g_buffer = grad_in_place
        ? nullptr
        : workspace<scalar_t>(kGradRowsSlot, s.out_channels * g_buffer_channel_stride, g_keep);
    for (int64_t part = begin; part < end; ++part) {
      scalar_t* acc = partial_data + part * outputs * NL;
      for_each_row_chunk(part, parts, rows, s.out_h, chunk_rows, [&](int64_t n, int64_t oh, int64_t count) {
        if (grad_weight != nullptr) {
          x_src.copy(n, 0, s.in_channels, oh, count + reach, x_buffer, x_w, x_channel_stride);
          for (int64_t c = 0; c < s.in_channels; ++c)
            if (!all_finite(x_buffer + c * x_channel_stride, (count + reach) * x_w)) input_finite = false;
        }
        const scalar_t* g;
        int64_t g_row_stride, g_channel_stride;
        if (grad_in_place) {
          g = g_src.data + n * g_src.sn + oh * g_src.sh;
          g_row_stride = g_src.sh;
          g_channel_stride = g_src.sc;
        } else {
          g_src.copy(n, 0, s.out_channels, oh, count, g_buffer, row_w, g_buffer_channel_stride);
          g = g_buffer;
          g_row_stride = row_w;
          g_channel_stride = g_buffer_channel_stride;
        }
        for (int64_t grp = 0; grp < s.groups; ++grp) {
          for (const auto& [co0, channels] : channel_blocks) {
            const int64_t co = grp * cout_g + co0;
            for (const auto& [q0, count_q] : position_tiles) {
              kern.planar_wgrad[channels - 1][count_q - 1](
                  g + co * g_channel_stride, g_row_stride, g_channel_stride,
                  x_buffer, x_w, &x_offset[grp * positions + q0], count, row_w / NL,
                  acc + (co * positions + q0) * NL, positions * NL);
            }
          }
        }
      });
    }
    if (!input_finite) all_input_finite = false;
  });

  // grad_weight (Cout, Cin/groups, KH, KW) is [co][q < weight_positions]; the
  // bias position follows. Sum the parts, then the lanes, in order.
  scalar_t* gw = grad_weight != nullptr ? grad_weight->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = grad_bias != nullptr ? grad_bias->mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, outputs, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t sum = 0;
      for (int64_t part = 0; part < parts; ++part) {
        const scalar_t* v = partial_data + (part * outputs + i) * NL;
        for (int64_t lane = 0; lane < NL; ++lane) sum += v[lane];
      }
      const int64_t co = i / positions, q = i % positions;
      if (q < weight_positions) {
        gw[co * weight_positions + q] = sum;
      } else {
        gb[co] = sum;
      }
    }
  });
  return all_input_finite;
}

template void conv_forward<float>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const Conv2dShape&, at::Tensor&);
template void conv_forward<double>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const Conv2dShape&, at::Tensor&);
template void conv_input_grad<float>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template void conv_input_grad<double>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template bool conv_weight_grad<float>(
    const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor*, at::Tensor*);
template bool conv_weight_grad<double>(
    const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor*, at::Tensor*);

}  // namespace planar
}  // namespace cpu
}  // namespace lightning_hw
