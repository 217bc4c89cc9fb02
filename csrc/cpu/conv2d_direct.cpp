// conv2d's direct convolution on CPU (the "direct" route, see conv2d_direct.h).
//
// Layouts. Activations are copied once per call into NHWC buffers, zero-padded
// so that every kernel tap of every output pixel reads a valid address (no
// bounds tests in the inner loops). Weights are re-packed into blocks of up to
// two 64-byte vectors of output channels: packed[group][block][tap][channel][lanes].
//
// Forward and input gradient share one loop nest: out[pixel][lanes] +=
// src[pixel + tap][c] * packed[tap][c][lanes] (a broadcast scalar times a vector
// of output channels; register tile of 12 pixels x 32 channels on AVX-512).
// The input gradient is the same direct convolution run on
// grad_output, zero-stuffed by the stride and padded by (kernel extent - 1 -
// padding), with the kernel flipped and in/out channels swapped: each input
// pixel gathers its own sum, so no two threads ever write the same element.
//
// The weight gradient accumulates tiles of (tap, input channel) x output-channel
// vectors over all output pixels. The pixel range is split into a number of
// parts fixed by the shape alone; each part sums into its own buffer and the
// parts are added in order, so the result is bitwise reproducible whatever the
// thread count or scheduling.
//
// Parallelism: at::parallel_for over (group, chunk of output pixels) for the
// convolutions, so one image still feeds every core; over (reduction part,
// block of weight-gradient tiles) for the weight gradient.
//
// The inner loops live in conv2d_kernels.h, compiled three times (AVX-512,
// AVX2+FMA, baseline) in tile_kernels.cpp and chosen at run time from the CPU's
// features, so the default build stays portable.
#include "cpu/conv2d_direct.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/conv2d_layouts.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace lightning_hw {
namespace cpu {
namespace direct {
namespace {

using namespace workspace_slots;

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
  const int64_t pad_h = padded_input_h(s);
  const int64_t pad_w = padded_input_w(s);
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

}  // namespace

template <typename scalar_t>
void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4) {
  constexpr int64_t L = lanes<scalar_t>();
  const int64_t cout_g = s.out_channels_per_group();
  const int64_t pad_h = padded_input_h(s), pad_w = padded_input_w(s);
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

// grad_input: the direct convolution of grad_output, zero-stuffed by the
// stride and padded by (kernel extent - 1 - padding), with the flipped,
// channel-swapped kernel, stride 1, the same dilation.
template <typename scalar_t>
void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4) {
  const auto [src_h, src_w, offset_h, offset_w] = input_grad_source(s);
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

template <typename scalar_t>
void conv_weight_grad(const at::Tensor& input4, const at::Tensor& grad4, const Conv2dShape& s, at::Tensor& grad_weight) {
  const int64_t cout_g_padded = round_up(s.out_channels_per_group(), lanes<scalar_t>());
  at::Tensor keep_alive;
  const scalar_t* grad_nhwc = grad_output_nhwc<scalar_t>(grad4, s, cout_g_padded, keep_alive);
  weight_grad_impl<scalar_t>(input4, grad_nhwc, cout_g_padded, s, grad_weight);
}

// grad_bias[c]: the sum of grad_output over images and pixels of channel c.
// Each channel is summed by one thread in a fixed order (reproducible).
template <typename scalar_t>
void conv_bias_grad(const at::Tensor& grad4, at::Tensor& grad_bias) {
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

template void conv_forward<float>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const Conv2dShape&, at::Tensor&);
template void conv_forward<double>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const Conv2dShape&, at::Tensor&);
template void conv_input_grad<float>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template void conv_input_grad<double>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template void conv_weight_grad<float>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template void conv_weight_grad<double>(const at::Tensor&, const at::Tensor&, const Conv2dShape&, at::Tensor&);
template void conv_bias_grad<float>(const at::Tensor&, at::Tensor&);
template void conv_bias_grad<double>(const at::Tensor&, at::Tensor&);

}  // namespace direct
}  // namespace cpu
}  // namespace lightning_hw
