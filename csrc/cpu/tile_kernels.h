// Register-tile kernels shared by the CPU ops (conv2d, linear_relu): their
// tables, the tile sizes of each instruction set, and the run-time choice of
// the best variant this CPU runs. The kernels themselves are in
// conv2d_kernels.h, depthwise_kernels.h and gemm_kernels.h, compiled once per
// instruction set in tile_kernels.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lightning_hw {
namespace cpu {

// Largest register tiles of any instruction set (sizes of tables and local
// buffers). Each variant picks its own sizes, see IsaTiles.
constexpr int kConvPixels = 12;
constexpr int kWgradMaxRows = 12;
constexpr int kPlanarMaxChannels = 8;
constexpr int kPlanarMaxRows = 4;
constexpr int kPlanarWgradMaxChannels = 4;
constexpr int kPlanarWgradMaxPositions = 6;
constexpr int kDwMaxPixels = 12;
constexpr int kDwMaxTaps = 12;

// Register tile sizes of one instruction set. A 64-byte vector is one zmm
// register, two ymm or four xmm; the accumulators must fit in the register
// file (32 zmm, 16 ymm, 16 xmm) with room left for the operands, else every
// FMA goes through the stack.
struct IsaTiles {
  int conv_pixels;              // output pixels per conv tile (NV = 1 and 2)
  int wgrad_rows[2];            // [NV - 1] most positions per weight-gradient tile
  int planar_channels[2];       // [NP - 1] most output channels per planar tile
  int planar_accumulators;      // native vectors of accumulators in a planar tile (rows x channels)
  int planar_wgrad_channels;    // output channels x positions per planar weight-gradient tile
  int planar_wgrad_positions;
  int dw_pixels;                // output pixels per depthwise tile (one vector of channels)
  int dw_wgrad_taps;            // most kernel taps per depthwise weight-gradient tile
};

template <typename scalar_t>
struct WgradRows {
  const scalar_t* input;        // zero-padded NHWC input, group channel offset applied
  const scalar_t* grad_output;  // NHWC grad_output, group and channel-block offset applied
  int64_t row_begin, row_end;   // rows of the flattened (image, output row) index
  int64_t out_h, out_w;
  int64_t input_image_stride, input_row_stride, input_pixel_stride;  // per image / output row / output pixel
  int64_t grad_image_stride, grad_row_stride, grad_pixel_stride;
};

template <typename scalar_t>
struct ConvKernels {
  using ConvTile = void (*)(
      const scalar_t* const*, const int64_t*, int64_t, int64_t, const scalar_t*, const scalar_t*,
      scalar_t*);
  using WgradTile = void (*)(const WgradRows<scalar_t>&, const int64_t*, scalar_t*);
  using PlanarTile = void (*)(
      const scalar_t*, int64_t, int64_t, const int64_t*, int64_t, int64_t, const scalar_t*, int64_t,
      const scalar_t*, scalar_t*);
  using PlanarWgradTile = void (*)(
      const scalar_t*, int64_t, int64_t, const scalar_t*, int64_t, const int64_t*, int64_t, int64_t,
      scalar_t*, int64_t);
  IsaTiles tiles;
  int native_lanes;                               // lanes of one native vector
  ConvTile conv[2];                               // [NV - 1], P = tiles.conv_pixels
  WgradTile wgrad[2][2][kWgradMaxRows];           // [consecutive positions][NV - 1][R - 1]
  PlanarTile planar[2][kPlanarMaxChannels];       // [NP - 1][O - 1], planar_rows rows
  int planar_rows[2][kPlanarMaxChannels];
  PlanarTile planar_one_row[2][kPlanarMaxChannels];  // the same for a single row
  PlanarWgradTile planar_wgrad[kPlanarWgradMaxChannels][kPlanarWgradMaxPositions];  // [O - 1][T - 1]
};

// The depthwise convolution's tiles (depthwise_kernels.h), over NHWC stripes
// of one 64-byte vector of channels.
template <typename scalar_t>
struct DepthwiseKernels {
  using ConvTile = void (*)(
      const scalar_t*, const int64_t*, const int64_t*, int64_t, const scalar_t*, const scalar_t*, scalar_t*);
  using WgradTile =
      void (*)(const scalar_t*, int64_t, int64_t, const int64_t*, const scalar_t*, int64_t, int64_t, scalar_t*);
  using BiasSum = void (*)(const scalar_t*, int64_t, scalar_t*);
  using Gather = void (*)(const scalar_t*, int64_t, int64_t, int64_t, const int64_t*, scalar_t*);
  using Scatter = void (*)(const scalar_t*, int64_t, int64_t, scalar_t*, int64_t);
  int pixels;                       // IsaTiles::dw_pixels
  int taps;                         // IsaTiles::dw_wgrad_taps
  ConvTile conv[kDwMaxPixels];      // [P - 1], P <= pixels
  WgradTile wgrad[kDwMaxTaps];      // [T - 1], T <= taps
  BiasSum bias_sum;
  Gather gather;                    // planar channels -> NHWC stripe
  Scatter scatter;                  // NHWC stripe -> planar channels
};

// linear_relu's streamed GEMM tiles (gemm_kernels.h): rows_per_tile rows of
// broadcast scalars x one or two 64-byte vectors.
template <typename scalar_t>
struct GemmKernels {
  using BroadcastTile = void (*)(
      const scalar_t* const*, const scalar_t*, int64_t, int64_t, scalar_t* const*, bool, const scalar_t*);
  int rows_per_tile;
  BroadcastTile broadcast[2];  // [NV - 1]
};

// The best variant this CPU runs (float and double). LIGHTNING_HW_CPU_ISA=
// avx512|avx2|baseline forces one (to test each variant's code on one machine);
// a name of no variant, or of one this CPU lacks the features for, is an error
// (on first use, and on every use after).
template <typename scalar_t>
const ConvKernels<scalar_t>& kernels();
template <typename scalar_t>
const GemmKernels<scalar_t>& gemm_kernels();
template <typename scalar_t>
const DepthwiseKernels<scalar_t>& depthwise_kernels();
// That variant's name: "avx512", "avx2" or "baseline".
const char* cpu_isa_name();
// Every variant, best first, as "name<TAB>features this CPU lacks" lines (the
// features space-separated, none where this CPU runs it).
std::vector<std::string> cpu_isa_variants();
// The chosen variant's register tile sizes (IsaTiles, the depthwise and GEMM
// tiles, the planar tiles' rows per channel count), as "key=value[,value...]"
// lines after "isa=name": the tests pick shapes that end in partial tiles of
// each variant from them.
std::vector<std::string> cpu_kernel_tiles();

// Lanes of the 64-byte vector, the unit of the packed layouts.
template <typename scalar_t>
constexpr int64_t lanes() {
  return 64 / sizeof(scalar_t);
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Output channels are processed in blocks of two vectors; the last block of a
// group may be a single vector.
template <typename scalar_t>
inline int64_t block_width(int64_t out_per_group, int64_t block) {
  return std::min<int64_t>(2 * lanes<scalar_t>(), round_up(out_per_group - block * 2 * lanes<scalar_t>(), lanes<scalar_t>()));
}

// Splits `count` items into ceil(count / most) runs of at most `most`, as even
// as possible: (first, size) of each.
inline std::vector<std::pair<int64_t, int64_t>> even_runs(int64_t count, int64_t most) {
  const int64_t runs = ceil_div(count, most);
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t i = 0; i < runs; ++i) out.emplace_back(i * count / runs, (i + 1) * count / runs - i * count / runs);
  return out;
}

}  // namespace cpu
}  // namespace lightning_hw
