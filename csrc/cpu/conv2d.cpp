// CPU kernels of lightning_hw::conv2d and conv2d_backward: a direct convolution
// (no im2col buffer). Each part (forward, input gradient, weight gradient) runs
// the route timed fastest for its shape on this machine (route_choice.h): one
// of our kernels below, or torch's own convolution where that is faster.
//
// Layouts. Activations are copied once per call into NHWC buffers, zero-padded
// so that every kernel tap of every output pixel reads a valid address (no
// bounds tests in the inner loops). Weights are re-packed into blocks of up to
// two 64-byte vectors of output channels: packed[group][block][tap][channel][lanes].
//
// Forward and input gradient share one loop nest: out[pixel][lanes] +=
// src[pixel + tap][c] * packed[tap][c][lanes] (a broadcast scalar times a vector
// of output channels; register tile of 12 pixels x 32 channels on AVX-512).
// Stride-1 convolutions with few output channels or a short reduction (first
// layers, grouped) use a planar variant instead: vectors along output rows
// of an NCHW copy, times broadcast weights. The input gradient is the same
// direct convolution run on
// grad_output, zero-stuffed by the stride and padded by (kernel extent - 1 -
// padding), with the kernel flipped and in/out channels swapped: each input
// pixel gathers its own sum, so no two threads ever write the same element.
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
// The weight gradient accumulates tiles of (tap, input channel) x output-channel
// vectors over all output pixels. The pixel range is split into a number of
// parts fixed by the shape alone; each part sums into its own buffer and the
// parts are added in order, so the result is bitwise reproducible whatever the
// thread count or scheduling.
//
// Parallelism: at::parallel_for over (group, chunk of output pixels) for the
// convolutions, so one image still feeds every core; over (reduction part,
// block of weight-gradient tiles) for the weight gradient; for the depthwise
// path over its units, and (reduction part, channel vector).
//
// The inner loops live in conv2d_kernels.h and depthwise_kernels.h, compiled
// three times (AVX-512, AVX2+FMA, baseline) in tile_kernels.cpp and chosen at
// run time from the CPU's features, so the default build stays portable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "conv2d_geometry.h"
#include "cpu/route_choice.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace lightning_hw {
namespace {

using cpu::ConvKernels;
using cpu::DepthwiseKernels;
using cpu::kConvPixels;
using cpu::kPlanarMaxChannels;
using cpu::WgradRows;
using cpu::block_width;
using cpu::ceil_div;
using cpu::depthwise_kernels;
using cpu::even_runs;
using cpu::kernels;
using cpu::lanes;
using cpu::round_up;
using cpu::workspace;
using namespace cpu::workspace_slots;

// Longest reduction (channels x taps per output) sent to the planar path even
// with many output channels; see use_planar.
constexpr int64_t kPlanarMaxReduce = 64;


// Copies a 4-D (N, C, H, W) tensor of any strides into an NHWC buffer
// dst[n][j][i][slot] of size (N, dst_h, dst_w, dst_channels). Source pixel
// (h, w) lands at j = offset_h + h * step_h, i = offset_w + w * step_w when that
// is inside the buffer (a negative offset crops); everything else is zero.
// Channel c goes to slot (c / per_group) * per_group_padded + c % per_group, so
// that each group can be padded to a whole vector.
template <typename scalar_t>
void fill_nhwc(
    const at::Tensor& src,
    scalar_t* dst,
    int64_t dst_h,
    int64_t dst_w,
    int64_t dst_channels,
    int64_t per_group,
    int64_t per_group_padded,
    int64_t offset_h,
    int64_t offset_w,
    int64_t step_h,
    int64_t step_w) {
  const scalar_t* data = src.const_data_ptr<scalar_t>();
  const int64_t batch = src.size(0), channels = src.size(1), h = src.size(2), w = src.size(3);
  const int64_t sn = src.stride(0), sc = src.stride(1), sh = src.stride(2), sw = src.stride(3);
  std::vector<int64_t> slot(channels);
  for (int64_t c = 0; c < channels; ++c)
    slot[c] = (c / per_group) * per_group_padded + c % per_group;
  const bool identity_slots = per_group == per_group_padded;
  const int64_t row_size = dst_w * dst_channels;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, row_size));
  at::parallel_for(0, batch * dst_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / dst_h, j = row % dst_h;
      scalar_t* out = dst + row * row_size;
      std::memset(out, 0, row_size * sizeof(scalar_t));
      const int64_t jj = j - offset_h;
      if (jj < 0 || jj % step_h != 0 || jj / step_h >= h) continue;
      const scalar_t* in = data + n * sn + (jj / step_h) * sh;
      // Columns of the source that land inside the buffer.
      const int64_t w_begin = offset_w >= 0 ? 0 : ceil_div(-offset_w, step_w);
      const int64_t w_end = std::min(w, ceil_div(dst_w - offset_w, step_w));
      if (sc <= sw) {
        // Channels are the faster source dimension (channels_last): copy pixel by pixel.
        for (int64_t x = w_begin; x < w_end; ++x) {
          scalar_t* o = out + (offset_w + x * step_w) * dst_channels;
          const scalar_t* s = in + x * sw;
          for (int64_t c = 0; c < channels; ++c) o[slot[c]] = s[c * sc];
        }
      } else {
        // Columns are the faster source dimension (NCHW): transpose 16x16
        // tiles through a local buffer. A tile reads 16 cache lines once and
        // writes 16 pixels of 16 channels; the 16 destination pixels (all
        // channels) stay in L1 while the channel tiles go by.
        const int64_t pixel_stride = step_w * dst_channels;
        scalar_t* o = out + offset_w * dst_channels;
        alignas(64) scalar_t tile[16][16];
        for (int64_t x0 = w_begin; x0 < w_end; x0 += 16) {
          const int64_t xn = std::min<int64_t>(16, w_end - x0);
          for (int64_t c0 = 0; c0 < channels; c0 += 16) {
            const int64_t cn = std::min<int64_t>(16, channels - c0);
            for (int64_t c = 0; c < cn; ++c) {
              const scalar_t* s = in + (c0 + c) * sc + x0 * sw;
              if (sw == 1 && xn == 16) {
                std::memcpy(tile[c], s, sizeof(tile[c]));  // fixed size: inlined vector copy
              } else {
                for (int64_t x = 0; x < xn; ++x) tile[c][x] = s[x * sw];
              }
            }
            if (identity_slots && cn == 16) {
              for (int64_t x = 0; x < xn; ++x) {
                scalar_t* dst = o + (x0 + x) * pixel_stride + c0;
                for (int c = 0; c < 16; ++c) dst[c] = tile[c][x];
              }
            } else {
              for (int64_t x = 0; x < xn; ++x) {
                scalar_t* dst = o + (x0 + x) * pixel_stride;
                for (int64_t c = 0; c < cn; ++c) dst[slot[c0 + c]] = tile[c][x];
              }
            }
          }
        }
      }
    }
  });
}

// A zero-padded (and possibly zero-stuffed) planar view of a 4-D (N, C, H, W)
// tensor of any strides: source pixel (h, w) sits at padded row
// offset_h + h * step_h, column offset_w + w * step_w (a negative offset crops);
// every other padded element is zero. The planar kernels copy the rows they
// need into a small per-thread buffer, which stays in cache: the padding costs
// no memory traffic beyond one read of the source.
template <typename scalar_t>
struct PaddedPlanes {
  const scalar_t* data;
  int64_t h, w, sn, sc, sh, sw;
  int64_t offset_h, offset_w, step_h, step_w;

  PaddedPlanes(const at::Tensor& src, int64_t offset_h, int64_t offset_w, int64_t step_h, int64_t step_w)
      : data(src.const_data_ptr<scalar_t>()),
        h(src.size(2)),
        w(src.size(3)),
        sn(src.stride(0)),
        sc(src.stride(1)),
        sh(src.stride(2)),
        sw(src.stride(3)),
        offset_h(offset_h),
        offset_w(offset_w),
        step_h(step_h),
        step_w(step_w) {}

  // Padded rows [row_begin, row_begin + rows) and columns [0, dst_w) of
  // channels [c_begin, c_begin + channels) of image n, as
  // dst[c * dst_channel_stride + row * dst_w + column].
  void copy(
      int64_t n,
      int64_t c_begin,
      int64_t channels,
      int64_t row_begin,
      int64_t rows,
      scalar_t* dst,
      int64_t dst_w,
      int64_t dst_channel_stride) const {
    const auto [w_begin, w_end] = columns(dst_w);
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t j = 0; j < rows; ++j) {
        scalar_t* out = dst + c * dst_channel_stride + j * dst_w;
        std::memset(out, 0, dst_w * sizeof(scalar_t));
        const scalar_t* in = source_row(n, c_begin + c, row_begin + j);
        if (in == nullptr) continue;
        if (sw == 1 && step_w == 1) {
          if (w_end > w_begin)
            std::memcpy(out + offset_w + w_begin, in + w_begin, (w_end - w_begin) * sizeof(scalar_t));
        } else {
          for (int64_t x = w_begin; x < w_end; ++x) out[offset_w + x * step_w] = in[x * sw];
        }
      }
    }
  }

  // The same padded rows and columns of channels [c_begin, c_begin + channels)
  // (at most one vector) as an NHWC stripe of one 64-byte vector per pixel:
  // dst[(row * dst_w + column) * lanes + c], lanes past `channels` zero. dst
  // holds one more vector, where source pixels left of or past the columns
  // land; `offsets` is scratch.
  void copy_stripe(
      int64_t n,
      int64_t c_begin,
      int64_t channels,
      int64_t row_begin,
      int64_t rows,
      scalar_t* dst,
      int64_t dst_w,
      std::vector<int64_t>& offsets) const {
    constexpr int64_t L = lanes<scalar_t>();
    const int64_t row_size = dst_w * L;
    // Source rows [h_begin, h_end) land inside the stripe's rows.
    const int64_t h_begin = ceil_div(std::max<int64_t>(0, row_begin - offset_h), step_h);
    const int64_t h_end = std::min(h, ceil_div(std::max<int64_t>(0, row_begin + rows - offset_h), step_h));
    const auto [w_begin, w_end] = columns(dst_w);
    const bool gather = sc != 1 && sw == 1 && h_end > h_begin && w_end > w_begin;
    if (!gather) std::memset(dst, 0, rows * row_size * sizeof(scalar_t));
    if (h_end <= h_begin || w_end <= w_begin) return;
    const scalar_t* in = data + n * sn + c_begin * sc + h_begin * sh;
    const auto stripe_row = [&](int64_t hh) { return offset_h + hh * step_h - row_begin; };
    if (gather) {
      // Whole source rows, transposed by blocks in registers: only the
      // stripe's other pixels need zeros. Source columns outside the stripe
      // go to its spare vector.
      const int64_t spare = rows * row_size;
      const int64_t col_begin = offset_w + w_begin * step_w, col_end = offset_w + (w_end - 1) * step_w + 1;
      offsets.resize((h_end - h_begin) * w);
      int64_t zero_from = 0;  // stripe rows before this one are done
      for (int64_t hh = h_begin; hh < h_end; ++hh) {
        const int64_t j = stripe_row(hh);
        scalar_t* row = dst + j * row_size;
        std::memset(dst + zero_from * row_size, 0, (j - zero_from) * row_size * sizeof(scalar_t));
        if (step_w > 1) {
          std::memset(row, 0, row_size * sizeof(scalar_t));
        } else {
          std::memset(row, 0, col_begin * L * sizeof(scalar_t));
          std::memset(row + col_end * L, 0, (dst_w - col_end) * L * sizeof(scalar_t));
        }
        zero_from = j + 1;
        int64_t* o = &offsets[(hh - h_begin) * w];
        for (int64_t x = 0; x < w_begin; ++x) o[x] = spare;
        for (int64_t x = w_begin; x < w_end; ++x) o[x] = j * row_size + (offset_w + x * step_w) * L;
        for (int64_t x = w_end; x < w; ++x) o[x] = spare;
      }
      std::memset(dst + zero_from * row_size, 0, (rows - zero_from) * row_size * sizeof(scalar_t));
      const auto gather_rows = depthwise_kernels<scalar_t>().gather;
      if (sh == w) {
        gather_rows(in, sc, channels, (h_end - h_begin) * w, offsets.data(), dst);
      } else {
        for (int64_t hh = h_begin; hh < h_end; ++hh)
          gather_rows(in + (hh - h_begin) * sh, sc, channels, w, &offsets[(hh - h_begin) * w], dst);
      }
    } else if (sc == 1) {
      // Channels are the fastest source dimension (channels_last): copy pixel by pixel.
      for (int64_t hh = h_begin; hh < h_end; ++hh)
        for (int64_t x = w_begin; x < w_end; ++x)
          std::memcpy(
              dst + stripe_row(hh) * row_size + (offset_w + x * step_w) * L, in + (hh - h_begin) * sh + x * sw,
              channels * sizeof(scalar_t));
    } else {
      for (int64_t hh = h_begin; hh < h_end; ++hh)
        for (int64_t c = 0; c < channels; ++c)
          for (int64_t x = w_begin; x < w_end; ++x)
            dst[stripe_row(hh) * row_size + (offset_w + x * step_w) * L + c] =
                in[(hh - h_begin) * sh + c * sc + x * sw];
    }
  }

 private:
  // Columns of the source that land inside [0, dst_w).
  std::pair<int64_t, int64_t> columns(int64_t dst_w) const {
    return {offset_w >= 0 ? 0 : ceil_div(-offset_w, step_w), std::min(w, ceil_div(dst_w - offset_w, step_w))};
  }

  // Source row of padded row `row` of channel c of image n, or null where the
  // padded row is zero.
  const scalar_t* source_row(int64_t n, int64_t c, int64_t row) const {
    const int64_t jj = row - offset_h;
    if (jj < 0 || jj % step_h != 0 || jj / step_h >= h) return nullptr;
    return data + n * sn + c * sc + (jj / step_h) * sh;
  }
};

// Packs the (Cout, Cin/groups, KH, KW) contiguous weights as
// packed[g][block][tap][c][width], block stride taps * reduce * 2 * lanes,
// lanes past the group's channel count zero. For the forward, c runs over input
// channels and lanes over output channels; for the input gradient
// (transposed) the roles swap and the kernel is flipped.
template <typename scalar_t>
at::Tensor pack_weights(const at::Tensor& weight, const Conv2dShape& s, bool transposed) {
  const at::Tensor w = weight.contiguous();
  const scalar_t* wd = w.const_data_ptr<scalar_t>();
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t cin_g = s.in_channels_per_group(), cout_g = s.out_channels_per_group();
  const int64_t reduce = transposed ? cout_g : cin_g;
  const int64_t out_pg = transposed ? cin_g : cout_g;
  const int64_t block_lanes = 2 * lanes<scalar_t>();
  const int64_t blocks = ceil_div(out_pg, block_lanes);
  const int64_t block_size = taps * reduce * block_lanes;
  at::Tensor packed = at::zeros({s.groups * blocks * block_size}, weight.options());
  scalar_t* pd = packed.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, s.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gb = begin; gb < end; ++gb) {
      const int64_t g = gb / blocks, b = gb % blocks;
      const int64_t width = block_width<scalar_t>(out_pg, b);
      scalar_t* dst = pd + gb * block_size;
      for (int64_t k = 0; k < taps; ++k) {
        // The transposed (input-gradient) kernel is flipped in both directions.
        const int64_t src_tap = transposed ? taps - 1 - k : k;
        for (int64_t c = 0; c < reduce; ++c) {
          for (int64_t lane = 0; lane < width; ++lane) {
            const int64_t o = b * block_lanes + lane;
            if (o >= out_pg) break;
            const int64_t co = transposed ? c : o, ci = transposed ? o : c;
            dst[(k * reduce + c) * width + lane] = wd[((g * cout_g + co) * cin_g + ci) * taps + src_tap];
          }
        }
      }
    }
  });
  return packed;
}

// A direct convolution over an NHWC source:
//   out[n][g*out_pg + o][oh][ow] = init[o] + sum over taps and c of
//     src[n][oh*stride + kh*dil][ow*stride + kw*dil][g*reduce + c] * w[g][o][c][kh][kw]
// with the weights packed by pack_weights and out contiguous NCHW.
template <typename scalar_t>
struct DirectConv {
  const scalar_t* src;
  int64_t src_h, src_w, src_channels;
  int64_t batch, groups, reduce, out_per_group;
  int64_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, out_h, out_w;
  const scalar_t* packed_weights;
  const scalar_t* packed_bias;  // [g][block][2 * lanes], or null
  scalar_t* out;
};

template <typename scalar_t>
void run_direct_conv(const DirectConv<scalar_t>& a) {
  constexpr int64_t L = lanes<scalar_t>();
  const ConvKernels<scalar_t>& kern = kernels<scalar_t>();
  const int64_t P = kern.tiles.conv_pixels;
  const int64_t taps = a.kernel_h * a.kernel_w;
  const int64_t block_size = taps * a.reduce * 2 * L;
  // Without groups and column dilation, the taps of one kernel row read one
  // contiguous run of kernel_w * channels inputs, in the packed weights' order:
  // one long reduction per kernel row instead of kernel_w short ones (this
  // matters for 1 or 3 input channels).
  const bool merge_row = a.groups == 1 && a.dilation_w == 1 && a.reduce == a.src_channels;
  const int64_t tap_count = merge_row ? a.kernel_h : taps;
  const int64_t tap_reduce = merge_row ? a.kernel_w * a.reduce : a.reduce;
  std::vector<int64_t> tap_offset(tap_count);
  for (int64_t k = 0; k < tap_count; ++k) {
    const int64_t kh = merge_row ? k : k / a.kernel_w, kw = merge_row ? 0 : k % a.kernel_w;
    tap_offset[k] = (kh * a.dilation_h * a.src_w + kw * a.dilation_w) * a.src_channels;
  }
  const int64_t blocks = ceil_div(a.out_per_group, 2 * L);
  const int64_t plane = a.out_h * a.out_w;
  const int64_t total = a.batch * plane;
  const int64_t out_channels = a.groups * a.out_per_group;
  const int64_t tiles = ceil_div(total, P);
  // Chunks of up to 96 pixels: their input rows stay in L2 while every output
  // channel block passes over them; smaller chunks when there is little work,
  // so that every thread gets some.
  const int64_t threads = at::get_num_threads();
  const int64_t tiles_per_chunk =
      std::clamp<int64_t>(tiles * a.groups / (8 * threads), 1, ceil_div(96, P));
  const int64_t chunks = ceil_div(tiles, tiles_per_chunk);
  at::parallel_for(0, a.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t tile[kConvPixels * 2 * L];
    std::vector<const scalar_t*> base(tiles_per_chunk * P);
    std::vector<int64_t> out_offset(tiles_per_chunk * P);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t g = unit / chunks, chunk = unit % chunks;
      const int64_t t_begin = chunk * tiles_per_chunk;
      const int64_t t_end = std::min(tiles, t_begin + tiles_per_chunk);
      for (int64_t i = 0; i < (t_end - t_begin) * P; ++i) {
        // The last tile repeats the last pixel: recomputing it is harmless and
        // keeps a single fixed-size kernel.
        const int64_t pixel = std::min(t_begin * P + i, total - 1);
        const int64_t n = pixel / plane, r = pixel % plane;
        const int64_t oh = r / a.out_w, ow = r % a.out_w;
        base[i] = a.src +
                  ((n * a.src_h + oh * a.stride_h) * a.src_w + ow * a.stride_w) * a.src_channels +
                  g * a.reduce;
        out_offset[i] = n * out_channels * plane + r;
      }
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t width = block_width<scalar_t>(a.out_per_group, b);
        const int64_t valid = std::min(width, a.out_per_group - b * 2 * L);
        const auto conv = kern.conv[width > L ? 1 : 0];
        const scalar_t* w = a.packed_weights + (g * blocks + b) * block_size;
        const scalar_t* init = a.packed_bias ? a.packed_bias + (g * blocks + b) * 2 * L : nullptr;
        scalar_t* out = a.out + (g * a.out_per_group + b * 2 * L) * plane;
        for (int64_t t = t_begin; t < t_end; ++t) {
          const int64_t first = (t - t_begin) * P;
          conv(&base[first], tap_offset.data(), tap_count, tap_reduce, w, init, tile);
          for (int64_t lane = 0; lane < valid; ++lane) {
            scalar_t* dst = out + lane * plane;
            for (int64_t p = 0; p < P; ++p) dst[out_offset[first + p]] = tile[p * width + lane];
          }
        }
      }
    }
  });
}

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

// Per-thread scratch of `elements` zeros: the partial sums of a weight gradient.
template <typename scalar_t>
scalar_t* zeroed_partials(int64_t elements, at::Tensor& keep_alive) {
  scalar_t* data = workspace<scalar_t>(kPartialSlot, elements, keep_alive);
  std::fill(data, data + elements, scalar_t(0));
  return data;
}

// Calls fn(image, first output row, row count), in order, for chunks of at
// most chunk_rows output rows, each within one image, that cover reduction
// part `part` of `parts`: the rows [part * rows / parts, (part + 1) * rows /
// parts) of the flattened (image, output row) index.
template <typename Fn>
void for_each_row_chunk(int64_t part, int64_t parts, int64_t rows, int64_t out_h, int64_t chunk_rows, const Fn& fn) {
  const int64_t row_end = (part + 1) * rows / parts;
  for (int64_t row = part * rows / parts; row < row_end;) {
    const int64_t n = row / out_h, oh = row % out_h;
    const int64_t count = std::min({chunk_rows, out_h - oh, row_end - row});
    fn(n, oh, count);
    row += count;
  }
}

// Depthwise convolutions (channel multiplier 1: in_channels == out_channels
// == groups) take their own path, whatever the stride, padding or dilation.
bool depthwise(const Conv2dShape& s) {
  return s.groups == s.in_channels && s.out_channels == s.groups;
}

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
void depthwise_weight_grad_impl(
    const at::Tensor& input4,
    const at::Tensor& grad4,
    const Conv2dShape& s,
    at::Tensor* grad_weight,
    at::Tensor* grad_bias) {
  constexpr int64_t L = lanes<scalar_t>();
  const DepthwiseKernels<scalar_t>& kern = depthwise_kernels<scalar_t>();
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t pad_w = (s.out_w - 1) * s.stride_w + (s.kernel_w - 1) * s.dilation_w + 1;
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

// out4 = conv2d(input4) by one of our routes: "depthwise", "planar" or "direct".
template <typename scalar_t>
void conv2d_forward_impl(
    const std::string& route,
    const at::Tensor& input4,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const Conv2dShape& s,
    at::Tensor& out4) {
  constexpr int64_t L = lanes<scalar_t>();
  const int64_t cout_g = s.out_channels_per_group();
  // Padded only as far as the taps reach: bottom/right rows the kernel never
  // touches are left out, and 'same' padding comes out asymmetric by itself.
  const int64_t pad_h = (s.out_h - 1) * s.stride_h + (s.kernel_h - 1) * s.dilation_h + 1;
  const int64_t pad_w = (s.out_w - 1) * s.stride_w + (s.kernel_w - 1) * s.dilation_w + 1;
  at::Tensor bias_contiguous;
  if (bias.has_value()) bias_contiguous = bias->contiguous();
  const scalar_t* bias_data = bias.has_value() ? bias_contiguous.const_data_ptr<scalar_t>() : nullptr;
  if (route == "depthwise") {
    const at::Tensor packed = pack_depthwise_weights<scalar_t>(weight, /*transposed=*/false);
    run_depthwise_conv(DepthwiseConv<scalar_t>{
        PaddedPlanes<scalar_t>(input4, s.pad_top, s.pad_left, 1, 1), pad_w, s.batch, s.in_channels, s.kernel_h,
        s.kernel_w, s.stride_h, s.stride_w, s.dilation_h, s.dilation_w, s.out_h, s.out_w,
        packed.const_data_ptr<scalar_t>(), bias_data, out4.mutable_data_ptr<scalar_t>()});
    return;
  }
  if (route == "planar") {
    const at::Tensor packed = pack_planar_weights<scalar_t>(weight, s, /*transposed=*/false);
    PlanarConv<scalar_t> a{
        PaddedPlanes<scalar_t>(input4, s.pad_top, s.pad_left, 1, 1), pad_w, s.batch, s.groups,
        s.in_channels_per_group(), cout_g, s.kernel_h, s.kernel_w, s.dilation_h, s.dilation_w,
        s.out_h, s.out_w, packed.const_data_ptr<scalar_t>(), bias_data, out4.mutable_data_ptr<scalar_t>()};
    run_planar_conv(a);
    return;
  }
  at::Tensor keep_alive;
  scalar_t* src =
      workspace<scalar_t>(kSourceSlot, s.batch * pad_h * pad_w * s.in_channels, keep_alive);
  fill_nhwc<scalar_t>(
      input4, src, pad_h, pad_w, s.in_channels, s.in_channels, s.in_channels, s.pad_top,
      s.pad_left, 1, 1);
  const at::Tensor packed = pack_weights<scalar_t>(weight, s, /*transposed=*/false);
  const int64_t blocks = ceil_div(cout_g, 2 * L);
  at::Tensor packed_bias;
  if (bias.has_value()) {
    packed_bias = at::zeros({s.groups * blocks * 2 * L}, input4.options());
    const at::Tensor b = bias->contiguous();
    const scalar_t* bd = b.const_data_ptr<scalar_t>();
    scalar_t* pb = packed_bias.mutable_data_ptr<scalar_t>();
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t o = 0; o < cout_g; ++o) pb[g * blocks * 2 * L + o] = bd[g * cout_g + o];
  }
  DirectConv<scalar_t> a{
      src,
      pad_h,
      pad_w,
      s.in_channels,
      s.batch,
      s.groups,
      s.in_channels_per_group(),
      cout_g,
      s.kernel_h,
      s.kernel_w,
      s.stride_h,
      s.stride_w,
      s.dilation_h,
      s.dilation_w,
      s.out_h,
      s.out_w,
      packed.const_data_ptr<scalar_t>(),
      bias.has_value() ? packed_bias.const_data_ptr<scalar_t>() : nullptr,
      out4.mutable_data_ptr<scalar_t>()};
  run_direct_conv(a);
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
  if (depthwise(s)) return "depthwise";
  // The input gradient is a stride-1 convolution with in/out channels swapped;
  // the weight gradient follows the forward's layout choice.
  const bool planar = part == ConvPart::kInputGrad
                          ? use_planar<scalar_t>(
                                s.in_channels_per_group(), s.out_channels_per_group() * s.kernel_h * s.kernel_w, 1, 1)
                          : planar_forward<scalar_t>(s);
  return planar ? "planar" : "direct";
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

template <typename scalar_t>
cpu::RouteQuery conv_route_query(const Conv2dShape& s, ConvPart part, bool pad_same) {
  static constexpr const char* kOps[] = {"conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad"};
  cpu::RouteQuery query;
  query.op = kOps[static_cast<int>(part)];
  query.family = "conv2d";
  query.shape = c10::str(
      c10::toString(c10::CppTypeToScalarType<scalar_t>::value), " ", s.batch, "x", s.in_channels, "x", s.in_h, "x",
      s.in_w, " out ", s.out_channels, "x", s.out_h, "x", s.out_w, " k", s.kernel_h, "x", s.kernel_w, " s",
      s.stride_h, "x", s.stride_w, " p", s.pad_top, "x", s.pad_left, " d", s.dilation_h, "x", s.dilation_w, " g",
      s.groups);
  query.fallback = conv_rule_route<scalar_t>(s, part);
  query.candidates = {query.fallback};
  // The direct kernels run every shape; they are timed against the planar
  // ones (whose rule is a threshold), not against depthwise (one useful lane
  // in a vector there).
  const int64_t taps = s.kernel_h * s.kernel_w;
  if (query.fallback == "depthwise") {
    const std::string why = c10::str(
        "a depthwise convolution (in_channels == out_channels == groups == ", s.groups, ") runs the depthwise route");
    query.excluded = {{"direct", why}, {"planar", why}};
  } else {
    query.excluded.emplace_back(
        "depthwise", c10::str("depthwise runs convolutions with in_channels == out_channels == groups; here in_channels ",
                              s.in_channels, ", out_channels ", s.out_channels, ", groups ", s.groups));
    if (query.fallback == "planar") {
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
  if (aten_can_run(s, pad_same)) {
    query.candidates.push_back("aten");
  } else {
    query.excluded.emplace_back(
        "aten", c10::str(
                    "torch's convolution pads both sides alike, and padding='same' with a kernel extent of ",
                    (s.kernel_h - 1) * s.dilation_h + 1, "x", (s.kernel_w - 1) * s.dilation_w + 1,
                    " pads one side more"));
  }
  query.flops = 2.0 * double(s.batch) * double(s.out_channels) * double(s.out_h * s.out_w) *
                double(s.in_channels_per_group() * taps);
  return query;
}

std::vector<int64_t> conv_stride(const Conv2dShape& s) { return {s.stride_h, s.stride_w}; }
std::vector<int64_t> conv_padding(const Conv2dShape& s) { return {s.pad_top, s.pad_left}; }
std::vector<int64_t> conv_dilation(const Conv2dShape& s) { return {s.dilation_h, s.dilation_w}; }

// A result of torch's kernels as the op's output: itself where it is laid out
// as ours are (contiguous), else copied into ours.
at::Tensor adopt(const at::Tensor& result, at::Tensor& ours4, const at::Tensor& ours) {
  if (!result.is_contiguous()) {
    ours4.copy_(result);
    return ours;
  }
  return result.view(ours.sizes());
}

at::Tensor conv2d_cpu(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  Conv2dForwardSetup setup = conv2d_forward_setup(
      input, weight, bias, stride, padding, dilation, groups, pad_same, {at::kFloat, at::kDouble}, "CPU");
  if (setup.out.numel() == 0) return setup.out;
  const Conv2dShape& s = setup.shape;
  check_buffer_sizes(s);
  at::Tensor aten_out;
  std::string route;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lightning_hw::conv2d", [&] {
    const auto run = [&](const std::string& name) {
      if (name == "aten") {
        aten_out = at::convolution(
            setup.input4, weight, bias, conv_stride(s), conv_padding(s), conv_dilation(s), false, {0, 0}, groups);
      } else {
        conv2d_forward_impl<scalar_t>(name, setup.input4, weight, bias, s, setup.out4);
      }
    };
    route = cpu::choose_route(conv_route_query<scalar_t>(s, ConvPart::kForward, pad_same), run);
    run(route);
  });
  return route == "aten" ? adopt(aten_out, setup.out4, setup.out) : setup.out;
}

// grad_input: the direct convolution of grad_output, zero-stuffed by the
// stride and padded by (kernel extent - 1 - padding), with the flipped,
// channel-swapped kernel, stride 1, the same dilation.
template <typename scalar_t>
void input_grad_impl(
    const std::string& route, const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s,
    at::Tensor& grad_input4) {
  const int64_t src_h = s.in_h + (s.kernel_h - 1) * s.dilation_h;
  const int64_t src_w = s.in_w + (s.kernel_w - 1) * s.dilation_w;
  const int64_t offset_h = (s.kernel_h - 1) * s.dilation_h - s.pad_top;
  const int64_t offset_w = (s.kernel_w - 1) * s.dilation_w - s.pad_left;
  if (route == "depthwise") {
    const at::Tensor packed = pack_depthwise_weights<scalar_t>(weight, /*transposed=*/true);
    run_depthwise_conv(DepthwiseConv<scalar_t>{
        PaddedPlanes<scalar_t>(grad4, offset_h, offset_w, s.stride_h, s.stride_w), src_w, s.batch, s.in_channels,
        s.kernel_h, s.kernel_w, 1, 1, s.dilation_h, s.dilation_w, s.in_h, s.in_w, packed.const_data_ptr<scalar_t>(),
        nullptr, grad_input4.mutable_data_ptr<scalar_t>()});
    return;
  }
  if (route == "planar") {
    const at::Tensor packed = pack_planar_weights<scalar_t>(weight, s, /*transposed=*/true);
    PlanarConv<scalar_t> a{
        PaddedPlanes<scalar_t>(grad4, offset_h, offset_w, s.stride_h, s.stride_w), src_w, s.batch,
        s.groups, s.out_channels_per_group(), s.in_channels_per_group(), s.kernel_h, s.kernel_w,
        s.dilation_h, s.dilation_w, s.in_h, s.in_w, packed.const_data_ptr<scalar_t>(), nullptr,
        grad_input4.mutable_data_ptr<scalar_t>()};
    run_planar_conv(a);
    return;
  }
  at::Tensor keep_alive;
  scalar_t* src =
      workspace<scalar_t>(kSourceSlot, s.batch * src_h * src_w * s.out_channels, keep_alive);
  fill_nhwc<scalar_t>(
      grad4, src, src_h, src_w, s.out_channels, s.out_channels,
      s.out_channels, offset_h, offset_w, s.stride_h, s.stride_w);
  const at::Tensor packed = pack_weights<scalar_t>(weight, s, /*transposed=*/true);
  DirectConv<scalar_t> a{
      src,
      src_h,
      src_w,
      s.out_channels,
      s.batch,
      s.groups,
      s.out_channels_per_group(),
      s.in_channels_per_group(),
      s.kernel_h,
      s.kernel_w,
      1,
      1,
      s.dilation_h,
      s.dilation_w,
      s.in_h,
      s.in_w,
      packed.const_data_ptr<scalar_t>(),
      nullptr,
      grad_input4.mutable_data_ptr<scalar_t>()};
  run_direct_conv(a);
}

// grad_output in NHWC with each group's channels padded to whole vectors
// (zero lanes), as the weight- and bias-gradient loops read it.
template <typename scalar_t>
const scalar_t* grad_output_nhwc(
    const at::Tensor& grad4, const Conv2dShape& s, int64_t cout_g_padded, at::Tensor& keep_alive) {
  scalar_t* buffer = workspace<scalar_t>(
      kGradOutputSlot, s.batch * s.out_h * s.out_w * s.groups * cout_g_padded, keep_alive);
  fill_nhwc<scalar_t>(
      grad4, buffer, s.out_h, s.out_w, s.groups * cout_g_padded, s.out_channels_per_group(),
      cout_g_padded, 0, 0, 1, 1);
  return buffer;
}

// Number of independent partial sums of a reduction over `rows`: fixed by the
// shape alone (never by the thread count), so results are reproducible.
int64_t reduction_parts(int64_t rows, int64_t independent_items) {
  if (independent_items >= 16) return 1;
  return std::clamp<int64_t>(rows, 1, 8);
}

template <typename scalar_t>
void weight_grad_impl(
    const at::Tensor& input4,
    const scalar_t* grad_nhwc,
    int64_t cout_g_padded,
    const Conv2dShape& s,
    at::Tensor& grad_weight) {
  constexpr int64_t L = lanes<scalar_t>();
  const ConvKernels<scalar_t>& kern = kernels<scalar_t>();
  const int64_t pad_h = (s.out_h - 1) * s.stride_h + (s.kernel_h - 1) * s.dilation_h + 1;
  const int64_t pad_w = (s.out_w - 1) * s.stride_w + (s.kernel_w - 1) * s.dilation_w + 1;
  at::Tensor keep_alive;
  scalar_t* input_padded = workspace<scalar_t>(
      kPaddedInputSlot, s.batch * pad_h * pad_w * s.in_channels, keep_alive);
  fill_nhwc<scalar_t>(
      input4, input_padded, pad_h, pad_w, s.in_channels,
      s.in_channels, s.in_channels, s.pad_top, s.pad_left, 1, 1);

  const int64_t cin_g = s.in_channels_per_group(), cout_g = s.out_channels_per_group();
  const int64_t taps = s.kernel_h * s.kernel_w;
  // Reduced positions q = (tap, input channel), tap-major.
  const int64_t positions = taps * cin_g;
  std::vector<int64_t> q_offset(positions);
  for (int64_t k = 0; k < taps; ++k)
    for (int64_t c = 0; c < cin_g; ++c)
      q_offset[k * cin_g + c] =
          ((k / s.kernel_w) * s.dilation_h * pad_w + (k % s.kernel_w) * s.dilation_w) *
              s.in_channels +
          c;
  // Tiles of at most max_rows positions, as even as possible; they never
  // overlap, since every tile adds its chunk's sums into its own slots. With
  // enough channels the tiles stay within one tap (consecutive channels: one
  // pointer, no offset table); with few channels (1 or 3) they run across taps.
  struct PositionTile {
    int64_t first, count;
    bool consecutive;
  };
  std::vector<PositionTile> q_tile_list;
  const bool per_tap = cin_g >= 4;
  const int64_t span = per_tap ? cin_g : positions;
  const int64_t max_rows = kern.tiles.wgrad_rows[cout_g_padded > L ? 1 : 0];
  const int64_t tiles_per_span = ceil_div(span, max_rows);
  for (int64_t start = 0; start < positions; start += span) {
    for (int64_t t = 0; t < tiles_per_span; ++t) {
      const int64_t first = t * span / tiles_per_span, next = (t + 1) * span / tiles_per_span;
      q_tile_list.push_back({start + first, next - first, per_tap});
    }
  }
  const int64_t q_tiles = static_cast<int64_t>(q_tile_list.size());
  const int64_t blocks = ceil_div(cout_g_padded, 2 * L);
  const int64_t block_size = positions * 2 * L;
  const int64_t items = s.groups * blocks * q_tiles;
  const int64_t rows = s.batch * s.out_h;
  const int64_t parts = reduction_parts(rows, items);
  // Items are independent outputs, so how they are split among threads does not
  // change any result: one block per thread, so that every row chunk brought
  // into L2 serves as many items as possible.
  const int64_t item_blocks = std::min<int64_t>(items, at::get_num_threads());
  const int64_t part_size = s.groups * blocks * block_size;
  at::Tensor partial_keep;
  scalar_t* partial_data = zeroed_partials<scalar_t>(parts * part_size, partial_keep);
  const scalar_t* x = input_padded;
  const scalar_t* gy = grad_nhwc;
  const int64_t grad_channels = s.groups * cout_g_padded;
  // Rows per chunk: about 512 KiB of input and grad_output (half of this
  // machine's 1 MiB L2), reused from L2 by every tile of the unit.
  const int64_t row_elements =
      s.out_w * grad_channels + s.stride_h * pad_w * s.in_channels;
  const int64_t chunk_rows = std::max<int64_t>(1, (int64_t(1) << 19) / sizeof(scalar_t) / row_elements);

  at::parallel_for(0, parts * item_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t part = unit / item_blocks, item_block = unit % item_blocks;
      const int64_t row_begin = part * rows / parts, row_end = (part + 1) * rows / parts;
      const int64_t item_begin = item_block * items / item_blocks;
      const int64_t item_end = (item_block + 1) * items / item_blocks;
      for (int64_t r0 = row_begin; r0 < row_end; r0 += chunk_rows) {
        for (int64_t item = item_begin; item < item_end; ++item) {
          const int64_t g = item / (blocks * q_tiles);
          const int64_t b = (item / q_tiles) % blocks;
          const PositionTile& tile = q_tile_list[item % q_tiles];
          const int64_t q0 = tile.first;
          const int64_t width = block_width<scalar_t>(cout_g_padded, b);
          WgradRows<scalar_t> wr{
              x + g * cin_g,
              gy + g * cout_g_padded + b * 2 * L,
              r0,
              std::min(row_end, r0 + chunk_rows),
              s.out_h,
              s.out_w,
              pad_h * pad_w * s.in_channels,
              s.stride_h * pad_w * s.in_channels,
              s.stride_w * s.in_channels,
              s.out_h * s.out_w * grad_channels,
              s.out_w * grad_channels,
              grad_channels};
          scalar_t* acc = partial_data + part * part_size + (g * blocks + b) * block_size + q0 * width;
          kern.wgrad[tile.consecutive][width > L ? 1 : 0][tile.count - 1](wr, &q_offset[q0], acc);
        }
      }
    }
  });

  // Sum the parts in order into grad_weight (Cout, Cin/groups, KH, KW).
  scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, s.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t co = begin; co < end; ++co) {
      const int64_t g = co / cout_g, o = co % cout_g;
      const int64_t b = o / (2 * L), lane = o % (2 * L);
      const int64_t width = block_width<scalar_t>(cout_g_padded, b);
      const scalar_t* block = partial_data + (g * blocks + b) * block_size + lane;
      for (int64_t c = 0; c < cin_g; ++c) {
        for (int64_t k = 0; k < taps; ++k) {
          const int64_t at_q = (k * cin_g + c) * width;
          scalar_t sum = block[at_q];
          for (int64_t part = 1; part < parts; ++part) sum += block[part * part_size + at_q];
          gw[(co * cin_g + c) * taps + k] = sum;
        }
      }
    }
  });
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
template <typename scalar_t>
void planar_weight_grad_impl(
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
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::Tensor x_keep, g_keep;
    scalar_t* x_buffer = workspace<scalar_t>(kRowsSlot, x_channels * x_channel_stride, x_keep);
    std::fill(x_buffer + s.in_channels * x_channel_stride, x_buffer + x_channels * x_channel_stride, scalar_t(1));
    scalar_t* g_buffer = grad_in_place
        ? nullptr
        : workspace<scalar_t>(kGradRowsSlot, s.out_channels * g_buffer_channel_stride, g_keep);
    for (int64_t part = begin; part < end; ++part) {
      scalar_t* acc = partial_data + part * outputs * NL;
      for_each_row_chunk(part, parts, rows, s.out_h, chunk_rows, [&](int64_t n, int64_t oh, int64_t count) {
        if (grad_weight != nullptr) x_src.copy(n, 0, s.in_channels, oh, count + reach, x_buffer, x_w, x_channel_stride);
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
}

// grad_bias[c]: the sum of grad_output over images and pixels of channel c.
// Each channel is summed by one thread in a fixed order (reproducible).
template <typename scalar_t>
void bias_grad_impl(const at::Tensor& grad4, at::Tensor& grad_bias) {
  const at::Tensor g = grad4.contiguous();
  const scalar_t* gd = g.const_data_ptr<scalar_t>();
  const int64_t batch = g.size(0), channels = g.size(1), plane = g.size(2) * g.size(3);
  scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kSums = 16;  // independent running sums: one vector of them
    for (int64_t c = begin; c < end; ++c) {
      scalar_t sums[kSums] = {};
      for (int64_t n = 0; n < batch; ++n) {
        const scalar_t* p = gd + (n * channels + c) * plane;
        int64_t i = 0;
        for (; i + kSums <= plane; i += kSums)
          for (int64_t j = 0; j < kSums; ++j) sums[j] += p[i + j];
        for (; i < plane; ++i) sums[i - (plane / kSums) * kSums] += p[i];
      }
      scalar_t total = 0;
      for (int64_t j = 0; j < kSums; ++j) total += sums[j];
      gb[c] = total;
    }
  });
}

// grad_weight and grad_bias (each where not null) by one of our routes.
template <typename scalar_t>
void weight_grad_route(
    const std::string& route, const at::Tensor& input4, const at::Tensor& grad4, const Conv2dShape& s,
    at::Tensor* grad_weight, at::Tensor* grad_bias) {
  if (route == "depthwise") {
    depthwise_weight_grad_impl<scalar_t>(input4, grad4, s, grad_weight, grad_bias);
    return;
  }
  // The planar shapes (few channels): grad_output in NHWC would be mostly
  // padding lanes, and its copy would cost more than the arithmetic.
  if (route == "planar") {
    planar_weight_grad_impl<scalar_t>(input4, grad4, s, grad_weight, grad_bias);
    return;
  }
  if (grad_weight != nullptr) {
    const int64_t cout_g_padded = round_up(s.out_channels_per_group(), lanes<scalar_t>());
    at::Tensor keep_alive;
    const scalar_t* grad_nhwc = grad_output_nhwc<scalar_t>(grad4, s, cout_g_padded, keep_alive);
    weight_grad_impl<scalar_t>(input4, grad_nhwc, cout_g_padded, s, *grad_weight);
  }
  if (grad_bias != nullptr) bias_grad_impl<scalar_t>(grad4, *grad_bias);
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
  Conv2dBackwardSetup setup = conv2d_backward_setup(
      grad_output, input, weight, stride, padding, dilation, groups, pad_same, output_mask,
      {at::kFloat, at::kDouble}, "CPU");
  const Conv2dShape& s = setup.shape;
  at::Tensor& grad_input = setup.grad_input;
  at::Tensor& grad_weight = setup.grad_weight;
  at::Tensor& grad_bias = setup.grad_bias;
  if (s.batch == 0) return {grad_input, grad_weight, grad_bias};
  check_buffer_sizes(s);
  const at::Tensor& grad4 = setup.grad4;
  const at::Tensor& input4 = setup.input4;
  // torch's backward for the "aten" route, computing the gradients `mask` asks for.
  const auto aten_backward = [&](std::array<bool, 3> mask) {
    const std::vector<int64_t> bias_sizes{s.out_channels};
    return at::convolution_backward(
        grad4, input4, weight, mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, conv_stride(s),
        conv_padding(s), conv_dilation(s), false, {0, 0}, groups, mask);
  };
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lightning_hw::conv2d_backward", [&] {
    at::Tensor aten_grad_input, aten_grad_weight, aten_grad_bias;  // the "aten" routes' results
    const auto run_input_grad = [&](const std::string& route) {
      if (route == "aten") {
        aten_grad_input = std::get<0>(aten_backward({true, false, false}));
      } else {
        input_grad_impl<scalar_t>(route, grad4, weight, s, setup.grad_input4);
      }
    };
    const auto run_weight_grad = [&](const std::string& route) {
      if (route == "aten") {
        std::tie(std::ignore, aten_grad_weight, aten_grad_bias) = aten_backward({false, true, output_mask[2]});
      } else {
        weight_grad_route<scalar_t>(
            route, input4, grad4, s, output_mask[1] ? &grad_weight : nullptr, output_mask[2] ? &grad_bias : nullptr);
      }
    };
    const std::string input_route =
        output_mask[0] && grad_input.numel() > 0
            ? cpu::choose_route(conv_route_query<scalar_t>(s, ConvPart::kInputGrad, pad_same), run_input_grad)
            : "";
    // The bias gradient alone is one pass over grad_output: nothing to time or force.
    std::string weight_route;
    if (output_mask[1]) {
      weight_route =
          cpu::choose_route(conv_route_query<scalar_t>(s, ConvPart::kWeightGrad, pad_same), run_weight_grad);
    } else if (output_mask[2]) {
      weight_route = conv_rule_route<scalar_t>(s, ConvPart::kWeightGrad);
    }
    if (input_route == "aten" && weight_route == "aten") {
      // One call for both, as torch.nn makes it: torch shares its work on grad_output between them.
      std::tie(aten_grad_input, aten_grad_weight, aten_grad_bias) = aten_backward({true, true, output_mask[2]});
    } else {
      if (!input_route.empty()) run_input_grad(input_route);
      if (!weight_route.empty()) run_weight_grad(weight_route);
    }
    if (input_route == "aten") grad_input = adopt(aten_grad_input, setup.grad_input4, grad_input);
    if (weight_route == "aten") {
      grad_weight = adopt(aten_grad_weight, grad_weight, grad_weight);
      if (output_mask[2]) grad_bias = adopt(aten_grad_bias, grad_bias, grad_bias);
    }
  });
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
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lightning_hw::conv2d_cpu_routes", [&] {
    for (const ConvPart part : {ConvPart::kForward, ConvPart::kInputGrad, ConvPart::kWeightGrad})
      for (std::string& line : cpu::describe_routes(conv_route_query<scalar_t>(s, part, pad_same)))
        lines.push_back(std::move(line));
  });
  return lines;
}

}  // namespace lightning_hw

TORCH_LIBRARY_IMPL(lightning_hw, CPU, m) {
  m.impl("conv2d", &lightning_hw::conv2d_cpu);
  m.impl("conv2d_backward", &lightning_hw::conv2d_backward_cpu);
}
