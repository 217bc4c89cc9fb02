// CUDA kernels of lightning_hw::conv2d and conv2d_backward: a direct
// convolution (no im2col buffer, no call into cuDNN or torch's convolutions).
//
// Forward and input gradient are one kernel. Both are "out[n][o][y][x] = bias
// + sum over reduce channel r and tap (i, j) of source * weight" where the
// source pixel is found at the virtual coordinate v = y * stride + i * dilation
// - offset, and the virtual grid maps onto the real source with a step: the
// element is src[v / step] when v is a multiple of step inside the source, else
// zero. The forward has step 1 and offset = padding. The input gradient reads
// grad_output zero-stuffed by the conv stride (step = stride), with stride 1,
// offset = (kernel extent - 1 - padding) and the kernel flipped and its in/out
// channels swapped (negative tap strides): each input pixel gathers its own
// sum, so no two threads write one element and no atomics are needed.
//
// The tiled kernel stages a (reduce chunk x input tile with halo) block of the
// source and the matching weights in shared memory, converted to float, and
// gives each thread several output pixels times several output channels in
// registers. When the tile does not fit in shared memory (huge dilation or
// kernel), and for float64, a kernel with one output per thread does the job.
//
// The weight gradient (with the bias gradient as one more row whose "input" is
// 1) is a split reduction over the N x Hout x Wout output pixels: each split
// sums its slice into its own float buffer, tiled as a small GEMM in shared
// memory (grad_output pixels x input patches), and a second pass adds the
// splits in a fixed order. The split count depends on the shape only, so the
// result is bitwise reproducible, whatever torch.use_deterministic_algorithms
// says.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "common.cuh"
#include "conv2d_geometry.h"

namespace lightning_hw {
namespace cuda {
namespace {

// Element strides of a 4-D (N, C, H, W) tensor.
struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// One direct convolution, forward or input gradient (see the top of the file).
template <typename scalar_t>
struct DirectConv {
  const scalar_t* src;
  Strides4 src_stride;
  int64_t src_h, src_w;
  // Weight of (group 0, out 0, reduce 0, tap (0, 0)); taps may have negative strides.
  const scalar_t* weight;
  int64_t w_stride_group, w_stride_out, w_stride_reduce, w_stride_tap_h, w_stride_tap_w;
  const scalar_t* bias;  // nullptr: none
  scalar_t* out;         // contiguous (batch, groups * out_per_group, out_h, out_w)
  int64_t batch, out_h, out_w;
  int64_t groups, out_per_group, reduce_per_group, kernel_h, kernel_w;
  int64_t stride_h, stride_w, dilation_h, dilation_w, step_h, step_w, offset_h, offset_w;
};

// The real source index of virtual coordinate v, or false where the virtual
// grid is zero (padding, or a stuffed zero between two source elements).
__device__ __forceinline__ bool source_index(int64_t v, int64_t step, int64_t size, int64_t& index) {
  if (v < 0) return false;
  if (step != 1) {
    if (v % step != 0) return false;
    v /= step;
  }
  index = v;
  return v < size;
}

// ---- one output element per thread: float64, and tiles too big for shared memory ----

template <typename scalar_t>
__global__ void conv_per_output_kernel(const DirectConv<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out_channels = p.groups * p.out_per_group;
  const int64_t total = p.batch * out_channels * p.out_h * p.out_w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = idx % p.out_w;
    int64_t rest = idx / p.out_w;
    const int64_t y = rest % p.out_h;
    rest /= p.out_h;
    const int64_t channel = rest % out_channels;
    const int64_t n = rest / out_channels;
    const int64_t g = channel / p.out_per_group, o = channel % p.out_per_group;
    const scalar_t* src = p.src + n * p.src_stride.n + g * p.reduce_per_group * p.src_stride.c;
    const scalar_t* w = p.weight + g * p.w_stride_group + o * p.w_stride_out;
    acc_t acc = 0;
    for (int64_t i = 0; i < p.kernel_h; ++i) {
      int64_t sy;
      if (!source_index(y * p.stride_h + i * p.dilation_h - p.offset_h, p.step_h, p.src_h, sy)) continue;
      for (int64_t j = 0; j < p.kernel_w; ++j) {
        int64_t sx;
        if (!source_index(x * p.stride_w + j * p.dilation_w - p.offset_w, p.step_w, p.src_w, sx)) continue;
        const scalar_t* s = src + sy * p.src_stride.h + sx * p.src_stride.w;
        const scalar_t* wt = w + i * p.w_stride_tap_h + j * p.w_stride_tap_w;
        for (int64_t r = 0; r < p.reduce_per_group; ++r)
          acc += static_cast<acc_t>(s[r * p.src_stride.c]) * static_cast<acc_t>(wt[r * p.w_stride_reduce]);
      }
    }
    if (p.bias != nullptr) acc += static_cast<acc_t>(p.bias[channel]);
    p.out[idx] = static_cast<scalar_t>(acc);
  }
}

// ---- tiled: shared-memory input tile plus halo, weights in shared memory ----

constexpr int kConvThreads = 256;
constexpr int kTileW = 16;  // output columns per tile; a warp covers two tile rows
constexpr int64_t kConvSharedBytes = 48 * 1024;  // the default limit, no opt-in needed

// Each thread owns kPixels output pixels (strided by the pixel-thread count, so
// a warp reads consecutive shared-memory words) times kChannels consecutive
// output channels (the same for the whole warp: weight reads are broadcasts).
// kMinBlocks: resident blocks per SM asked of the compiler (2 caps a thread at
// 128 registers, so that one block's tile loads overlap another's arithmetic;
// the widest tile would spill under that cap).
template <int kChannels_, int kPixels_, int kChannelThreads_, int kMinBlocks_>
struct TileConfig {
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kChannels = kChannels_;
  static constexpr int kPixels = kPixels_;
  static constexpr int kChannelThreads = kChannelThreads_;
  static constexpr int kPixelThreads = kConvThreads / kChannelThreads;
  static constexpr int kTileChannels = kChannels * kChannelThreads;
  static constexpr int kTilePixels = kPixels * kPixelThreads;
  static constexpr int kTileH = kTilePixels / kTileW;
  static_assert(kPixelThreads % 32 == 0, "a warp must share its output channels");
  static_assert(kTilePixels % kTileW == 0, "whole tile rows");
};

// By output channels per group: depthwise, first layers, mid-size, wide layers.
using TileOne = TileConfig<1, 1, 1, 2>;     // 1 channel x 256 pixels
using TileSmall = TileConfig<4, 2, 2, 2>;   // 8 channels x 256 pixels
using TileMid = TileConfig<8, 4, 4, 2>;     // 32 channels x 256 pixels
using TileWide = TileConfig<8, 8, 8, 1>;    // 64 channels x 256 pixels

struct TileLayout {
  int64_t tiles_h, tiles_w, channel_tiles, blocks;
  int in_tile_h, in_tile_w, reduce_chunk;
  int in_floats;  // shared floats of the input tiles, rounded up to a 16-byte multiple
  size_t shared_bytes;
};

template <typename Config, typename scalar_t>
__global__ void __launch_bounds__(kConvThreads, Config::kMinBlocks)
    conv_tiled_kernel(const DirectConv<scalar_t> p, const TileLayout t) {
  constexpr int C = Config::kChannels, P = Config::kPixels;
  extern __shared__ float4 shared_words[];  // float4: 16-byte aligned
  float* in_s = reinterpret_cast<float*>(shared_words);
  float* w_s = in_s + t.in_floats;
  const int tid = threadIdx.x;
  const int pixel_thread = tid % Config::kPixelThreads;
  const int channel_thread = tid / Config::kPixelThreads;
  const int in_tile = t.in_tile_h * t.in_tile_w;
  const int taps = static_cast<int>(p.kernel_h * p.kernel_w);
  const int kernel_w = static_cast<int>(p.kernel_w);
  const int kernel_h = static_cast<int>(p.kernel_h);
  // Shared-memory offsets; they fit in int because the tile fits in shared memory.
  const int tap_row = static_cast<int>(p.dilation_h) * t.in_tile_w;
  const int tap_col = static_cast<int>(p.dilation_w);
  int pixel_offset[P];
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int pixel = pixel_thread + k * Config::kPixelThreads;
    pixel_offset[k] = (pixel / kTileW) * static_cast<int>(p.stride_h) * t.in_tile_w +
                      (pixel % kTileW) * static_cast<int>(p.stride_w);
  }

  for (int64_t block = blockIdx.x; block < t.blocks; block += gridDim.x) {
    int64_t rest = block;
    const int64_t tile_x = rest % t.tiles_w;
    rest /= t.tiles_w;
    const int64_t tile_y = rest % t.tiles_h;
    rest /= t.tiles_h;
    const int64_t channel_tile = rest % t.channel_tiles;
    rest /= t.channel_tiles;
    const int64_t g = rest % p.groups;
    const int64_t n = rest / p.groups;
    const int64_t y0 = tile_y * Config::kTileH, x0 = tile_x * kTileW;
    const int64_t o0 = channel_tile * Config::kTileChannels;
    const int64_t vy0 = y0 * p.stride_h - p.offset_h, vx0 = x0 * p.stride_w - p.offset_w;
    const scalar_t* src = p.src + n * p.src_stride.n + g * p.reduce_per_group * p.src_stride.c;
    const scalar_t* weight = p.weight + g * p.w_stride_group;

    float acc[P][C];
#pragma unroll
    for (int k = 0; k < P; ++k)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[k][c] = 0.f;

    for (int64_t r0 = 0; r0 < p.reduce_per_group; r0 += t.reduce_chunk) {
      const int chunk = static_cast<int>(std::min<int64_t>(t.reduce_chunk, p.reduce_per_group - r0));
      __syncthreads();  // the previous chunk is consumed
      for (int e = tid; e < chunk * in_tile; e += kConvThreads) {
        const int r = e / in_tile;
        const int pos = e - r * in_tile;
        const int row = pos / t.in_tile_w, col = pos - row * t.in_tile_w;
        int64_t sy, sx;
        float v = 0.f;
        if (source_index(vy0 + row, p.step_h, p.src_h, sy) && source_index(vx0 + col, p.step_w, p.src_w, sx))
          v = static_cast<float>(src[(r0 + r) * p.src_stride.c + sy * p.src_stride.h + sx * p.src_stride.w]);
        in_s[e] = v;
      }
      // w_s[(r * taps + tap) * kTileChannels + channel]; read with the tap fastest
      // (contiguous in a forward weight).
      for (int e = tid; e < chunk * taps * Config::kTileChannels; e += kConvThreads) {
        const int tap = e % taps;
        const int r = (e / taps) % chunk;
        const int channel = e / (taps * chunk);
        const int64_t o = o0 + channel;
        float v = 0.f;
        if (o < p.out_per_group) {
          const int i = tap / kernel_w, j = tap - (tap / kernel_w) * kernel_w;
          v = static_cast<float>(weight[o * p.w_stride_out + (r0 + r) * p.w_stride_reduce +
                                        i * p.w_stride_tap_h + j * p.w_stride_tap_w]);
        }
        w_s[(r * taps + tap) * Config::kTileChannels + channel] = v;
      }
      __syncthreads();
      for (int r = 0; r < chunk; ++r) {
        const float* in_r = in_s + r * in_tile;
        const float* w_r = w_s + r * taps * Config::kTileChannels + channel_thread * C;
        for (int i = 0; i < kernel_h; ++i) {
          for (int j = 0; j < kernel_w; ++j) {
            const float* in_ij = in_r + i * tap_row + j * tap_col;
            const float* w_ij = w_r + (i * kernel_w + j) * Config::kTileChannels;
            float wv[C];
#pragma unroll
            for (int c = 0; c < C; ++c) wv[c] = w_ij[c];
#pragma unroll
            for (int k = 0; k < P; ++k) {
              const float xv = in_ij[pixel_offset[k]];
#pragma unroll
              for (int c = 0; c < C; ++c) acc[k][c] = fmaf(xv, wv[c], acc[k][c]);
            }
          }
        }
      }
    }

    const int64_t out_channels = p.groups * p.out_per_group;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t o = o0 + channel_thread * C + c;
      if (o >= p.out_per_group) continue;
      const int64_t channel = g * p.out_per_group + o;
      const float b = p.bias != nullptr ? static_cast<float>(p.bias[channel]) : 0.f;
      scalar_t* out = p.out + (n * out_channels + channel) * p.out_h * p.out_w;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const int pixel = pixel_thread + k * Config::kPixelThreads;
        const int64_t y = y0 + pixel / kTileW, x = x0 + pixel % kTileW;
        if (y < p.out_h && x < p.out_w) out[y * p.out_w + x] = static_cast<scalar_t>(acc[k][c] + b);
      }
    }
  }
}

// The tile layout of a convolution, or false when even one reduce channel's
// tile does not fit in shared memory.
template <typename Config, typename scalar_t>
bool tile_layout(const DirectConv<scalar_t>& p, TileLayout& t) {
  const int64_t in_tile_h = (Config::kTileH - 1) * p.stride_h + (p.kernel_h - 1) * p.dilation_h + 1;
  const int64_t in_tile_w = (kTileW - 1) * p.stride_w + (p.kernel_w - 1) * p.dilation_w + 1;
  const int64_t budget = kConvSharedBytes / int64_t(sizeof(float)) - 4;  // 4: rounding of in_floats
  if (in_tile_h > budget || in_tile_w > budget) return false;
  const int64_t per_channel = in_tile_h * in_tile_w + p.kernel_h * p.kernel_w * Config::kTileChannels;
  const int64_t chunk = std::min(p.reduce_per_group, budget / per_channel);
  if (chunk < 1) return false;
  t.in_tile_h = static_cast<int>(in_tile_h);
  t.in_tile_w = static_cast<int>(in_tile_w);
  t.reduce_chunk = static_cast<int>(chunk);
  t.in_floats = static_cast<int>((chunk * in_tile_h * in_tile_w + 3) / 4 * 4);
  t.shared_bytes =
      (t.in_floats + chunk * p.kernel_h * p.kernel_w * Config::kTileChannels) * sizeof(float);
  t.tiles_h = ceil_div(p.out_h, Config::kTileH);
  t.tiles_w = ceil_div(p.out_w, kTileW);
  t.channel_tiles = ceil_div(p.out_per_group, Config::kTileChannels);
  t.blocks = p.batch * p.groups * t.channel_tiles * t.tiles_h * t.tiles_w;
  return true;
}

template <typename Config, typename scalar_t>
bool launch_tiled(const DirectConv<scalar_t>& p, cudaStream_t stream) {
  TileLayout t;
  if (!tile_layout<Config>(p, t)) return false;
  conv_tiled_kernel<Config, scalar_t>
      <<<grid_blocks(t.blocks), kConvThreads, t.shared_bytes, stream>>>(p, t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// LIGHTNING_HW_CUDA_CONV=per_output sends every convolution to the one-output-
// per-thread kernel (to test it in float32 too).
bool per_output_forced() {
  static const bool forced = [] {
    const char* value = std::getenv("LIGHTNING_HW_CUDA_CONV");
    return value != nullptr && std::strcmp(value, "per_output") == 0;
  }();
  return forced;
}

template <typename scalar_t>
void run_direct_conv(const DirectConv<scalar_t>& p) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (!per_output_forced()) {
      const bool launched = p.out_per_group == 1    ? launch_tiled<TileOne>(p, stream)
                            : p.out_per_group <= 8  ? launch_tiled<TileSmall>(p, stream)
                            : p.out_per_group <= 32 ? launch_tiled<TileMid>(p, stream)
                                                    : launch_tiled<TileWide>(p, stream);
      if (launched) return;
    }
  }
  constexpr int kThreads = 256;
  const int64_t total = p.batch * p.groups * p.out_per_group * p.out_h * p.out_w;
  conv_per_output_kernel<scalar_t><<<grid_blocks(ceil_div(total, kThreads)), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- weight and bias gradients: split reduction over output pixels ----

// Rows of the reduction: row = r * taps + tap for weight element (r, tap) of an
// output channel, and row = weight_rows (= in_per_group * taps) for the bias.
// Only rows [row_begin, row_end) are computed. partial[split][...] holds, for
// output channel co and row, the element co * weight_rows + row (weight rows,
// present when row_begin == 0) and after them bias_offset + co.
template <typename scalar_t>
struct WeightGrad {
  const scalar_t* input;
  Strides4 in_stride;
  int64_t in_h, in_w;
  const scalar_t* grad;
  Strides4 grad_stride;
  int64_t out_h, out_w, pixels;  // pixels = batch * out_h * out_w
  int64_t groups, out_per_group, in_per_group, kernel_h, kernel_w;
  int64_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left;
  int64_t weight_rows, row_begin, row_end, bias_offset, split_stride;
  int64_t splits;
  at::opmath_type<scalar_t>* partial;
};

template <typename scalar_t>
__device__ __forceinline__ int64_t partial_index(const WeightGrad<scalar_t>& p, int64_t channel, int64_t row) {
  return row < p.weight_rows ? channel * p.weight_rows + row : p.bias_offset + channel;
}

// The input value that weight row `row` meets at output pixel (n, y, x) of
// group g, or 1 for the bias row.
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> patch_value(
    const WeightGrad<scalar_t>& p, int64_t row, int64_t n, int64_t g, int64_t y, int64_t x) {
  using acc_t = at::opmath_type<scalar_t>;
  if (row >= p.weight_rows) return acc_t(1);
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t r = row / taps, tap = row % taps;
  const int64_t iy = y * p.stride_h - p.pad_top + (tap / p.kernel_w) * p.dilation_h;
  const int64_t ix = x * p.stride_w - p.pad_left + (tap % p.kernel_w) * p.dilation_w;
  if (iy < 0 || iy >= p.in_h || ix < 0 || ix >= p.in_w) return acc_t(0);
  return static_cast<acc_t>(p.input[n * p.in_stride.n + (g * p.in_per_group + r) * p.in_stride.c +
                                    iy * p.in_stride.h + ix * p.in_stride.w]);
}

// One thread per (split, output channel, row): float64 and the forced path.
template <typename scalar_t>
__global__ void weight_grad_per_output_kernel(const WeightGrad<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = p.row_end - p.row_begin;
  const int64_t out_channels = p.groups * p.out_per_group;
  const int64_t total = p.splits * out_channels * rows;
  const int64_t image = p.out_h * p.out_w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = p.row_begin + idx % rows;
    const int64_t channel = (idx / rows) % out_channels;
    const int64_t split = idx / (rows * out_channels);
    const int64_t g = channel / p.out_per_group;
    acc_t acc = 0;
    for (int64_t l = p.pixels * split / p.splits; l < p.pixels * (split + 1) / p.splits; ++l) {
      const int64_t n = l / image, y = (l % image) / p.out_w, x = l % p.out_w;
      const acc_t go = static_cast<acc_t>(
          p.grad[n * p.grad_stride.n + channel * p.grad_stride.c + y * p.grad_stride.h + x * p.grad_stride.w]);
      acc += go * patch_value(p, row, n, g, y, x);
    }
    p.partial[split * p.split_stride + partial_index(p, channel, row)] = acc;
  }
}

constexpr int kWgradThreads = 256;
constexpr int kWgradPixels = 32;  // output pixels per shared-memory step

// A tile of kChannels output channels x kRows rows; thread (ty, tx) of a 16 x 16
// grid owns channels ty + 16 a and rows tx + 16 b.
template <int kChannels, int kRows, typename scalar_t>
__global__ void __launch_bounds__(kWgradThreads)
    weight_grad_tiled_kernel(const WeightGrad<scalar_t> p, int64_t channel_tiles, int64_t row_tiles) {
  constexpr int A = kChannels / 16, B = kRows / 16;
  static_assert(A * 16 == kChannels && B * 16 == kRows, "tiles of whole 16s");
  __shared__ float grad_s[kWgradPixels][kChannels + 1];
  __shared__ float patch_s[kWgradPixels][kRows + 1];
  // Per pixel of the current step: grad offset, image offset, top-left input corner.
  __shared__ int64_t pixel_grad[kWgradPixels], pixel_image[kWgradPixels];
  __shared__ int64_t pixel_iy[kWgradPixels], pixel_ix[kWgradPixels];
  __shared__ bool pixel_valid[kWgradPixels];
  // Per row of the tile: input channel offset and tap displacement; -1: bias row.
  __shared__ int64_t row_channel[kRows], row_dy[kRows], row_dx[kRows];

  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t image = p.out_h * p.out_w;
  const int64_t total = p.splits * p.groups * channel_tiles * row_tiles;
  for (int64_t block = blockIdx.x; block < total; block += gridDim.x) {
    int64_t rest = block;
    const int64_t row_tile = rest % row_tiles;
    rest /= row_tiles;
    const int64_t channel_tile = rest % channel_tiles;
    rest /= channel_tiles;
    const int64_t g = rest % p.groups;
    const int64_t split = rest / p.groups;
    const int64_t o0 = channel_tile * kChannels;
    const int64_t row0 = p.row_begin + row_tile * kRows;
    const int64_t l_begin = p.pixels * split / p.splits, l_end = p.pixels * (split + 1) / p.splits;

    __syncthreads();  // the previous block's row table is no longer read
    for (int rr = tid; rr < kRows; rr += kWgradThreads) {
      const int64_t row = row0 + rr;
      if (row < p.weight_rows) {
        row_channel[rr] = (g * p.in_per_group + row / taps) * p.in_stride.c;
        row_dy[rr] = ((row % taps) / p.kernel_w) * p.dilation_h;
        row_dx[rr] = (row % p.kernel_w) * p.dilation_w;
      } else {
        row_channel[rr] = -1;
        row_dy[rr] = row_dx[rr] = 0;
      }
    }
    float acc[A][B];
#pragma unroll
    for (int a = 0; a < A; ++a)
#pragma unroll
      for (int b = 0; b < B; ++b) acc[a][b] = 0.f;

    for (int64_t l0 = l_begin; l0 < l_end; l0 += kWgradPixels) {
      __syncthreads();  // the previous step's tiles are consumed
      if (tid < kWgradPixels) {
        const int64_t l = l0 + tid;
        const bool valid = l < l_end;
        const int64_t n = valid ? l / image : 0, pos = valid ? l % image : 0;
        const int64_t y = pos / p.out_w, x = pos % p.out_w;
        pixel_valid[tid] = valid;
        pixel_grad[tid] = n * p.grad_stride.n + y * p.grad_stride.h + x * p.grad_stride.w;
        pixel_image[tid] = n * p.in_stride.n;
        pixel_iy[tid] = y * p.stride_h - p.pad_top;
        pixel_ix[tid] = x * p.stride_w - p.pad_left;
      }
      __syncthreads();
      for (int e = tid; e < kWgradPixels * kChannels; e += kWgradThreads) {
        const int px = e % kWgradPixels, c = e / kWgradPixels;
        const int64_t o = o0 + c;
        float v = 0.f;
        if (pixel_valid[px] && o < p.out_per_group)
          v = static_cast<float>(p.grad[pixel_grad[px] + (g * p.out_per_group + o) * p.grad_stride.c]);
        grad_s[px][c] = v;
      }
      for (int e = tid; e < kWgradPixels * kRows; e += kWgradThreads) {
        const int px = e % kWgradPixels, rr = e / kWgradPixels;
        float v = 0.f;
        if (pixel_valid[px] && row0 + rr < p.row_end) {
          if (row_channel[rr] < 0) {
            v = 1.f;
          } else {
            const int64_t iy = pixel_iy[px] + row_dy[rr], ix = pixel_ix[px] + row_dx[rr];
            if (iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w)
              v = static_cast<float>(
                  p.input[pixel_image[px] + row_channel[rr] + iy * p.in_stride.h + ix * p.in_stride.w]);
          }
        }
        patch_s[px][rr] = v;
      }
      __syncthreads();
#pragma unroll 4
      for (int px = 0; px < kWgradPixels; ++px) {
        float gv[A], pv[B];
#pragma unroll
        for (int a = 0; a < A; ++a) gv[a] = grad_s[px][ty + 16 * a];
#pragma unroll
        for (int b = 0; b < B; ++b) pv[b] = patch_s[px][tx + 16 * b];
#pragma unroll
        for (int a = 0; a < A; ++a)
#pragma unroll
          for (int b = 0; b < B; ++b) acc[a][b] = fmaf(gv[a], pv[b], acc[a][b]);
      }
    }

    float* partial = p.partial + split * p.split_stride;
#pragma unroll
    for (int a = 0; a < A; ++a) {
      const int64_t o = o0 + ty + 16 * a;
      if (o >= p.out_per_group) continue;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const int64_t row = row0 + tx + 16 * b;
        if (row < p.row_end) partial[partial_index(p, g * p.out_per_group + o, row)] = acc[a][b];
      }
    }
  }
}

// Splits of the pixel range: enough blocks to fill a large GPU, at least four
// steps of pixels per split, and a bounded partial buffer. Shape-only, so the
// summation order (and the result) never changes between runs.
int64_t choose_splits(int64_t tiles, int64_t pixels, int64_t split_stride) {
  constexpr int64_t kTargetBlocks = 1024, kMaxPartialElements = int64_t(1) << 26;
  int64_t splits = ceil_div(kTargetBlocks, std::max<int64_t>(tiles, 1));
  splits = std::min(splits, ceil_div(pixels, 4 * kWgradPixels));
  splits = std::min(splits, kMaxPartialElements / std::max<int64_t>(split_stride, 1));
  return std::max<int64_t>(splits, 1);
}

template <int kChannels, int kRows, typename scalar_t>
void launch_weight_grad_tiled(WeightGrad<scalar_t>& p, cudaStream_t stream, at::Tensor& partial) {
  const int64_t channel_tiles = ceil_div(p.out_per_group, kChannels);
  const int64_t row_tiles = ceil_div(p.row_end - p.row_begin, kRows);
  p.splits = choose_splits(p.groups * channel_tiles * row_tiles, p.pixels, p.split_stride);
  partial = at::empty({p.splits * p.split_stride}, partial.options());
  p.partial = partial.mutable_data_ptr<at::opmath_type<scalar_t>>();
  const int64_t blocks = p.splits * p.groups * channel_tiles * row_tiles;
  weight_grad_tiled_kernel<kChannels, kRows, scalar_t>
      <<<grid_blocks(blocks), kWgradThreads, 0, stream>>>(p, channel_tiles, row_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void weight_and_bias_grad(
    const at::Tensor& grad4, const at::Tensor& input4, const Conv2dShape& s, bool need_weight,
    bool need_bias, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  WeightGrad<scalar_t> p;
  p.input = input4.const_data_ptr<scalar_t>();
  p.in_stride = strides_of(input4);
  p.in_h = s.in_h;
  p.in_w = s.in_w;
  p.grad = grad4.const_data_ptr<scalar_t>();
  p.grad_stride = strides_of(grad4);
  p.out_h = s.out_h;
  p.out_w = s.out_w;
  p.pixels = s.batch * s.out_h * s.out_w;
  p.groups = s.groups;
  p.out_per_group = s.out_channels_per_group();
  p.in_per_group = s.in_channels_per_group();
  p.kernel_h = s.kernel_h;
  p.kernel_w = s.kernel_w;
  p.stride_h = s.stride_h;
  p.stride_w = s.stride_w;
  p.dilation_h = s.dilation_h;
  p.dilation_w = s.dilation_w;
  p.pad_top = s.pad_top;
  p.pad_left = s.pad_left;
  p.weight_rows = p.in_per_group * s.kernel_h * s.kernel_w;
  p.row_begin = need_weight ? 0 : p.weight_rows;
  p.row_end = p.weight_rows + (need_bias ? 1 : 0);
  const int64_t weight_elements = need_weight ? s.out_channels * p.weight_rows : 0;
  p.bias_offset = weight_elements;
  p.split_stride = weight_elements + (need_bias ? s.out_channels : 0);

  at::Tensor partial = at::empty({0}, input4.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (std::is_same_v<scalar_t, double> || per_output_forced()) {
    constexpr int kThreads = 256;
    const int64_t items = s.out_channels * (p.row_end - p.row_begin);
    p.splits = choose_splits(ceil_div(items, kThreads), p.pixels, p.split_stride);
    partial = at::empty({p.splits * p.split_stride}, partial.options());
    p.partial = partial.mutable_data_ptr<acc_t>();
    weight_grad_per_output_kernel<scalar_t>
        <<<grid_blocks(ceil_div(p.splits * items, kThreads)), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if constexpr (!std::is_same_v<scalar_t, double>) {
    // Small tiles where the channels or the rows are few (first layers, bias only).
    if (p.out_per_group <= 32 || p.row_end - p.row_begin <= 32)
      launch_weight_grad_tiled<32, 32>(p, stream, partial);
    else
      launch_weight_grad_tiled<64, 64>(p, stream, partial);
  }
  if (need_weight)
    sum_splits(p.partial, p.split_stride, static_cast<int>(p.splits), weight_elements,
               grad_weight.mutable_data_ptr<scalar_t>(), stream);
  if (need_bias)
    sum_splits(p.partial + p.bias_offset, p.split_stride, static_cast<int>(p.splits), s.out_channels,
               grad_bias.mutable_data_ptr<scalar_t>(), stream);
}

// ---- host side ----

// Element counts and the flattened reduction rows must fit the int arithmetic
// of the tiles and the int64 arithmetic everywhere else.
void check_sizes(const char* op, const Conv2dShape& s) {
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(
      s.in_channels_per_group() * s.kernel_h * s.kernel_w < kMaxInt && s.out_channels < kMaxInt,
      op, ": the CUDA kernel supports at most 2^31 - 1 weight elements per output channel "
      "and output channels, got weight (", s.out_channels, ", ", s.in_channels_per_group(), ", ",
      s.kernel_h, ", ", s.kernel_w, ")");
}

// The fields the forward and the input gradient fill alike: source `src4` and
// result `out4` (both 4-D), the weight's base and group stride, the kernel.
template <typename scalar_t>
DirectConv<scalar_t> direct_conv_over(
    const at::Tensor& src4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& out4) {
  DirectConv<scalar_t> p;
  p.src = src4.const_data_ptr<scalar_t>();
  p.src_stride = strides_of(src4);
  p.src_h = src4.size(2);
  p.src_w = src4.size(3);
  p.weight = weight.const_data_ptr<scalar_t>();
  p.w_stride_group = s.out_channels_per_group() * weight.stride(0);
  p.bias = nullptr;
  p.out = out4.mutable_data_ptr<scalar_t>();
  p.batch = s.batch;
  p.out_h = out4.size(2);
  p.out_w = out4.size(3);
  p.groups = s.groups;
  p.kernel_h = s.kernel_h;
  p.kernel_w = s.kernel_w;
  p.dilation_h = s.dilation_h;
  p.dilation_w = s.dilation_w;
  return p;
}

template <typename scalar_t>
DirectConv<scalar_t> forward_conv(
    const at::Tensor& input4, const at::Tensor& weight, const scalar_t* bias, const Conv2dShape& s,
    at::Tensor& out4) {
  DirectConv<scalar_t> p = direct_conv_over<scalar_t>(input4, weight, s, out4);
  p.w_stride_out = weight.stride(0);
  p.w_stride_reduce = weight.stride(1);
  p.w_stride_tap_h = weight.stride(2);
  p.w_stride_tap_w = weight.stride(3);
  p.bias = bias;
  p.out_per_group = s.out_channels_per_group();
  p.reduce_per_group = s.in_channels_per_group();
  p.stride_h = s.stride_h;
  p.stride_w = s.stride_w;
  p.step_h = p.step_w = 1;
  p.offset_h = s.pad_top;
  p.offset_w = s.pad_left;
  return p;
}

// The input gradient as a direct convolution of the zero-stuffed grad_output
// with the flipped, channel-swapped kernel (see the top of the file).
template <typename scalar_t>
DirectConv<scalar_t> input_grad_conv(
    const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4) {
  DirectConv<scalar_t> p = direct_conv_over<scalar_t>(grad4, weight, s, grad_input4);
  p.weight += (s.kernel_h - 1) * weight.stride(2) + (s.kernel_w - 1) * weight.stride(3);
  p.w_stride_out = weight.stride(1);
  p.w_stride_reduce = weight.stride(0);
  p.w_stride_tap_h = -weight.stride(2);
  p.w_stride_tap_w = -weight.stride(3);
  p.out_per_group = s.in_channels_per_group();
  p.reduce_per_group = s.out_channels_per_group();
  p.stride_h = p.stride_w = 1;
  p.step_h = s.stride_h;
  p.step_w = s.stride_w;
  p.offset_h = (s.kernel_h - 1) * s.dilation_h - s.pad_top;
  p.offset_w = (s.kernel_w - 1) * s.dilation_w - s.pad_left;
  return p;
}

at::Tensor conv2d_cuda(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same) {
  Conv2dForwardSetup setup = conv2d_forward_setup(
      input, weight, bias, stride, padding, dilation, groups, pad_same, kCudaDtypes, "CUDA");
  const Conv2dShape& s = setup.shape;
  check_sizes("conv2d", s);
  if (setup.out.numel() == 0) return setup.out;
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor bias_contiguous = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lightning_hw::conv2d_cuda", [&] {
    const scalar_t* bias_data = bias.has_value() ? bias_contiguous.const_data_ptr<scalar_t>() : nullptr;
    run_direct_conv(forward_conv<scalar_t>(setup.input4, weight, bias_data, s, setup.out4));
  });
  return setup.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
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
      grad_output, input, weight, stride, padding, dilation, groups, pad_same, output_mask, kCudaDtypes,
      "CUDA");
  const Conv2dShape& s = setup.shape;
  check_sizes("conv2d_backward", s);
  at::Tensor& grad_input = setup.grad_input;
  at::Tensor& grad_weight = setup.grad_weight;
  at::Tensor& grad_bias = setup.grad_bias;
  if (s.batch == 0) return {grad_input, grad_weight, grad_bias};
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor& grad4 = setup.grad4;
  const at::Tensor& input4 = setup.input4;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "lightning_hw::conv2d_backward_cuda", [&] {
        if (output_mask[0] && grad_input.numel() > 0)
          run_direct_conv(input_grad_conv<scalar_t>(grad4, weight, s, setup.grad_input4));
        if (output_mask[1] || output_mask[2])
          weight_and_bias_grad<scalar_t>(
              grad4, input4, s, output_mask[1], output_mask[2], grad_weight, grad_bias);
      });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace lightning_hw

TORCH_LIBRARY_IMPL(lightning_hw, CUDA, m) {
  m.impl("conv2d", &lightning_hw::cuda::conv2d_cuda);
  m.impl("conv2d_backward", &lightning_hw::cuda::conv2d_backward_cuda);
}
