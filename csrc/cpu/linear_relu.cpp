// Fused Linear+ReLU on CPU, three routes for the GEMMs: the streamed GEMMs
// (the weight read once in its own layout), our register-tile kernels (the
// GEMMs as 1x1 convolutions, bias and ReLU applied as each tile is stored),
// and torch's BLAS (at::mm) with bias and ReLU fused into one pass over its
// output; for bfloat16 also our GEMMs on AMX tiles (amx.h) or on AVX512-BF16
// dot products (bf16_dot.h). Which one runs a shape is timed on this machine the first time it
// is seen (route_choice.h); the built-in rule below (streamed for wide layers
// on at most as many rows as outputs, tiles for narrow layers and for wide ones
// on many rows, BLAS for the rest) decides when timing is off. In the backward,
// the ReLU mask and the bias gradient take one pass over grad_output.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/amx.h"
#include "cpu/bf16_dot.h"
#include "cpu/precision.h"
#include "cpu/route_choice.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"
#include "linear_relu_geometry.h"

namespace lightning_hw {
namespace {

// Which GEMMs take the tile kernels (rows x two vectors of columns per tile,
// the whole reduction in one pass, so a packed block of weights, reduce x two
// vectors, must stay within half of L2): narrow layers (few output features, as a
// classifier head) always, where BLAS is at its weakest; wider ones (more rows
// than outputs: see use_streamed) once there are enough rows to repay
// re-packing the weights on every call. The forward
// packs a transposed copy, the input gradient a plain one, so the forward
// needs more rows. Measured in benchmarks/NOTES.md (steps 9-10).
constexpr int64_t kTileMaxOutFeatures = 64;
constexpr int64_t kTileMinRowsForward = 64;
constexpr int64_t kTileMinRowsBackward = 32;
constexpr int64_t kTileMaxBlockBytes = int64_t(1) << 19;

template <typename scalar_t>
bool tiles_can_run(int64_t rows, int64_t reduce) {
  return rows > 0 && reduce * 2 * cpu::lanes<scalar_t>() * int64_t(sizeof(scalar_t)) <= kTileMaxBlockBytes;
}

template <typename scalar_t>
bool use_tiles(int64_t rows, int64_t reduce, int64_t out_features, int64_t min_rows) {
  return tiles_can_run<scalar_t>(rows, reduce) && (out_features <= kTileMaxOutFeatures || rows >= min_rows);
}

// Packs a (reduce x width_total) matrix, element (c, j) at
// src[c * c_stride + j * j_stride], into blocks of two vectors of columns:
// packed[block][c][width] (packed_size elements), lanes past width_total
// zero. This is the layout conv_tile reads its weights in. Blocks and runs of
// reduced indices are packed in parallel; a transposing pack (j_stride > 1)
// goes 16 reduced indices at a time, so that it reads whole cache lines and
// its writes stay in L1.
template <typename scalar_t>
int64_t packed_size(int64_t reduce, int64_t width_total) {
  return cpu::ceil_div(width_total, 2 * cpu::lanes<scalar_t>()) * reduce * 2 * cpu::lanes<scalar_t>();
}

template <typename scalar_t>
void pack_columns(
    const scalar_t* src, int64_t reduce, int64_t width_total, int64_t c_stride, int64_t j_stride, scalar_t* packed) {
  constexpr int64_t L2 = 2 * cpu::lanes<scalar_t>();
  constexpr int64_t kStep = 16;
  // Runs of reduced indices too, so that a single block (the transposed rows
  // of a small batch) is packed by every thread.
  constexpr int64_t kRun = 32 * kStep;
  const int64_t blocks = cpu::ceil_div(width_total, L2);
  const int64_t runs = cpu::ceil_div(reduce, kRun);
  at::parallel_for(0, blocks * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / runs;
      const int64_t run_begin = (item % runs) * kRun;
      const int64_t run_end = std::min(reduce, run_begin + kRun);
      const int64_t width = cpu::block_width<scalar_t>(width_total, b);
      const int64_t valid = std::min(width, width_total - b * L2);
      scalar_t* dst = packed + b * reduce * L2;
      if (valid < width) {
        for (int64_t c = run_begin; c < run_end; ++c)
          std::fill(dst + c * width + valid, dst + (c + 1) * width, scalar_t(0));
      }
      const scalar_t* col = src + b * L2 * j_stride;
      if (j_stride == 1) {
        for (int64_t c = run_begin; c < run_end; ++c)
          for (int64_t lane = 0; lane < valid; ++lane) dst[c * width + lane] = col[c * c_stride + lane];
      } else {
        for (int64_t c0 = run_begin; c0 < run_end; c0 += kStep) {
          const int64_t c1 = std::min(run_end, c0 + kStep);
          for (int64_t lane = 0; lane < valid; ++lane)
            for (int64_t c = c0; c < c1; ++c) dst[c * width + lane] = col[c * c_stride + lane * j_stride];
        }
      }
    }
  });
}

// out[r][j] = epilogue(init[j] + sum over c of a[r][c] * packed[c][j]) for a
// row-major a (rows x reduce), packed by pack_columns: tiles of P rows x two
// vectors of columns. Row tiles are split between threads; each output is
// computed whole by one tile.
template <typename scalar_t>
void tile_gemm(
    const scalar_t* a,
    int64_t rows,
    int64_t reduce,
    const scalar_t* packed,
    const scalar_t* init,  // [blocks][2 * lanes] or null
    int64_t width_total,
    bool relu,
    scalar_t* out) {
  constexpr int64_t L2 = 2 * cpu::lanes<scalar_t>();
  const cpu::ConvKernels<scalar_t>& kern = cpu::kernels<scalar_t>();
  const int64_t P = kern.tiles.conv_pixels;
  const int64_t blocks = cpu::ceil_div(width_total, L2);
  const int64_t tiles = cpu::ceil_div(rows, P);
  const int64_t tap_offset = 0;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t tile[cpu::kConvPixels * L2];
    const scalar_t* base[cpu::kConvPixels];
    for (int64_t t = begin; t < end; ++t) {
      // The last tile repeats the last row: recomputed, stored once.
      for (int64_t p = 0; p < P; ++p) base[p] = a + std::min(t * P + p, rows - 1) * reduce;
      const int64_t tile_rows = std::min(P, rows - t * P);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t width = cpu::block_width<scalar_t>(width_total, b);
        const int64_t valid = std::min(width, width_total - b * L2);
        kern.conv[width > L2 / 2 ? 1 : 0](
            base, &tap_offset, 1, reduce, packed + b * reduce * L2, init ? init + b * L2 : nullptr, tile);
        for (int64_t p = 0; p < tile_rows; ++p) {
          scalar_t* dst = out + (t * P + p) * width_total + b * L2;
          const scalar_t* src = tile + p * width;
          if (relu) {
            for (int64_t j = 0; j < valid; ++j) dst[j] = std::max(src[j], scalar_t(0));
          } else {
            std::memcpy(dst, src, valid * sizeof(scalar_t));
          }
        }
      }
    }
  });
}

// grad_weight[o][i] = sum over rows r of grad_pre[r][o] * input[r][i]: tiles of
// up to R output features x two vectors of input features, each summed over
// all rows in order by one thread (reproducible). The last column block, if
// it is not whole vectors, is read from a zero-padded copy of its columns.
template <typename scalar_t>
void tile_weight_grad(
    const scalar_t* grad_pre,
    const scalar_t* input,
    int64_t rows,
    int64_t in_features,
    int64_t out_features,
    scalar_t* grad_weight) {
  constexpr int64_t L2 = 2 * cpu::lanes<scalar_t>();
  const cpu::ConvKernels<scalar_t>& kern = cpu::kernels<scalar_t>();
  const int64_t blocks = cpu::ceil_div(in_features, L2);
  const int64_t last_width = cpu::block_width<scalar_t>(in_features, blocks - 1);
  const bool ragged = (blocks - 1) * L2 + last_width > in_features;
  std::vector<scalar_t> last_columns;
  if (ragged) {
    last_columns.assign(rows * last_width, scalar_t(0));
    const int64_t first = (blocks - 1) * L2;
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(&last_columns[r * last_width], input + r * in_features + first, (in_features - first) * sizeof(scalar_t));
  }
  const int64_t max_rows = kern.tiles.wgrad_rows[1];
  const auto feature_tiles = cpu::even_runs(out_features, max_rows);
  const int64_t tiles = static_cast<int64_t>(feature_tiles.size());
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t acc[cpu::kWgradMaxRows * L2];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles;
      const auto [o0, count] = feature_tiles[item % tiles];
      const int64_t width = cpu::block_width<scalar_t>(in_features, b);
      const bool padded = ragged && b == blocks - 1;
      // One "row" of `rows` pixels: the scalar side is grad_pre (consecutive
      // features), the vector side the input columns.
      const cpu::WgradRows<scalar_t> wr{
          grad_pre, padded ? last_columns.data() : input + b * L2, 0, 1, 1, rows, 0, 0, out_features,
          0, 0, padded ? width : in_features};
      std::fill(acc, acc + count * width, scalar_t(0));
      kern.wgrad[1][width > L2 / 2 ? 1 : 0][count - 1](wr, &o0, acc);
      const int64_t valid = std::min(width, in_features - b * L2);
      for (int64_t o = 0; o < count; ++o)
        std::memcpy(grad_weight + (o0 + o) * in_features + b * L2, acc + o * width, valid * sizeof(scalar_t));
    }
  });
}

// Rows per parallel task: enough work to amortise scheduling, small enough to
// keep both cores busy on the reports' batch sizes.
constexpr int64_t kRowGrain = 16;

// Wide layers (more than kTileMaxOutFeatures outputs) on at most as many rows
// as outputs, as the fruit CNN's 6728->841 at batch 32: each GEMM does
// 2 x rows flops per weight element, enough to be compute-bound, but BLAS
// reaches less than half of peak there and packing the weight for the conv
// tiles costs as much as the GEMM. The streamed GEMMs read the weight in its
// own (out, in) layout, once, and re-lay only the rows (rows x features),
// which they re-read from cache once per tile of weight rows: past as many
// rows as outputs the packed tiles win (3072->128 on 1000 rows). Measured in
// benchmarks/NOTES.md (round 2).
bool streamed_can_run(int64_t rows, int64_t out_features) {
  return rows > 0 && out_features > kTileMaxOutFeatures;
}

bool use_streamed(int64_t rows, int64_t out_features) {
  return streamed_can_run(rows, out_features) && rows <= out_features;
}

// Reduction chunks: the forward's chunk of transposed rows (chunk x two
// vectors, 128 KiB per block of rows) stays in cache while its tiles sweep
// the weight rows; the input gradient's chunk of weight columns (chunk x two
// vectors) stays in L2 while every row tile reads it (a whole 841-feature
// reduction is one chunk). The weight gradient sweeps its input columns in
// chunks of this many blocks, which stay in L2 while every output tile reads
// them. Chunk sizes between a quarter and twice these measured within 10%.
constexpr int64_t kStreamForwardChunk = 1024;
constexpr int64_t kStreamInputGradChunk = 1024;
constexpr int64_t kStreamWeightGradBlocks = 32;

// out[r][o] = relu(bias[o] + sum over c of x[r][c] * w[o][c]): tiles of P
// weight rows (broadcast) x a block of two vectors of x's rows, transposed by
// pack_columns. Weight tiles are split between threads; each sums its
// reduction in chunks, in order, into partial[row block][o][width], then
// writes its outputs with bias and ReLU.
template <typename scalar_t>
void streamed_forward(
    const scalar_t* x,
    const scalar_t* w,
    const scalar_t* bias,
    int64_t rows,
    int64_t in_features,
    int64_t out_features,
    scalar_t* out) {
  constexpr int64_t L2 = 2 * cpu::lanes<scalar_t>();
  const cpu::GemmKernels<scalar_t>& kern = cpu::gemm_kernels<scalar_t>();
  const int64_t P = kern.rows_per_tile;
  const int64_t row_blocks = cpu::ceil_div(rows, L2);
  const int64_t tiles = cpu::ceil_div(out_features, P);
  const int64_t padded_out = tiles * P;
  at::Tensor keep_packed, keep_partial;
  scalar_t* xt = cpu::workspace<scalar_t>(
      cpu::workspace_slots::kPackedSlot, packed_size<scalar_t>(in_features, rows), keep_packed);
  pack_columns<scalar_t>(x, in_features, rows, 1, in_features, xt);
  scalar_t* partial =
      cpu::workspace<scalar_t>(cpu::workspace_slots::kStreamSlot, row_blocks * padded_out * L2, keep_partial);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const scalar_t* a[cpu::kConvPixels];
    scalar_t* c[cpu::kConvPixels];
    for (int64_t c0 = 0; c0 < in_features; c0 += kStreamForwardChunk) {
      const int64_t count = std::min(kStreamForwardChunk, in_features - c0);
      for (int64_t t = begin; t < end; ++t) {
        // Rows past out_features repeat the last weight row into padding.
        for (int64_t p = 0; p < P; ++p) a[p] = w + std::min(t * P + p, out_features - 1) * in_features + c0;
        for (int64_t rb = 0; rb < row_blocks; ++rb) {
          const int64_t width = cpu::block_width<scalar_t>(rows, rb);
          for (int64_t p = 0; p < P; ++p) c[p] = partial + rb * padded_out * L2 + (t * P + p) * width;
          kern.broadcast[width > L2 / 2 ? 1 : 0](
              a, xt + rb * in_features * L2 + c0 * width, width, count, c, c0 > 0, nullptr);
        }
      }
    }
    const int64_t o_end = std::min(end * P, out_features);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t rb = r / L2;
      const int64_t width = cpu::block_width<scalar_t>(rows, rb);
      const scalar_t* src = partial + rb * padded_out * L2 + (r - rb * L2);
      scalar_t* dst = out + r * out_features;
      for (int64_t o = begin * P; o < o_end; ++o)
        dst[o] = std::max(src[o * width] + (bias != nullptr ? bias[o] : scalar_t(0)), scalar_t(0));
    }
  });
}

// Blocks of two vectors of input features for the streamed GEMMs: their
// count, where the last starts, its (vector-rounded) width, and whether it
// reaches past in_features (then it goes through a zero-padded copy).
struct ColumnBlocks {
  int64_t blocks, last, last_width;
  bool ragged;
};

template <typename scalar_t>
ColumnBlocks column_blocks(int64_t in_features) {
  const int64_t blocks = cpu::ceil_div(in_features, 2 * cpu::lanes<scalar_t>());
  const int64_t last = (blocks - 1) * 2 * cpu::lanes<scalar_t>();
  const int64_t last_width = cpu::block_width<scalar_t>(in_features, blocks - 1);
  return {blocks, last, last_width, last + last_width > in_features};
}

// grad_input[r][i] = sum over o of grad_pre[r][o] * w[o][i]: tiles of P rows
// of grad_pre (broadcast) x two vectors of input features read straight from
// the weight rows. Column blocks are split between threads; the reduction
// runs in chunks, in order, accumulating in grad_input. A last block that is
// not whole vectors reads a zero-padded copy of its weight columns and writes
// to a padded buffer first.
template <typename scalar_t>
void streamed_input_grad(
    const scalar_t* grad_pre,
    const scalar_t* w,
    int64_t rows,
    int64_t in_features,
    int64_t out_features,
    scalar_t* grad_input) {
  constexpr int64_t L2 = 2 * cpu::lanes<scalar_t>();
  const cpu::GemmKernels<scalar_t>& kern = cpu::gemm_kernels<scalar_t>();
  const int64_t P = kern.rows_per_tile;
  const ColumnBlocks split = column_blocks<scalar_t>(in_features);
  const int64_t blocks = split.blocks, last = split.last, last_width = split.last_width;
  const bool ragged = split.ragged;
  at::Tensor keep_last;
  scalar_t* last_w = nullptr;    // [out_features][last_width]
  scalar_t* last_out = nullptr;  // [rows][last_width]
  if (ragged) {
    last_w = cpu::workspace<scalar_t>(
        cpu::workspace_slots::kStreamSlot, (out_features + rows) * last_width, keep_last);
    last_out = last_w + out_features * last_width;
    pack_columns<scalar_t>(w + last, out_features, in_features - last, in_features, 1, last_w);
  }
  const int64_t row_tiles = cpu::ceil_div(rows, P);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const scalar_t* a[cpu::kConvPixels];
    scalar_t* c[cpu::kConvPixels];
    for (int64_t o0 = 0; o0 < out_features; o0 += kStreamInputGradChunk) {
      const int64_t count = std::min(kStreamInputGradChunk, out_features - o0);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t width = cpu::block_width<scalar_t>(in_features, b);
        const bool padded = ragged && b == blocks - 1;
        const scalar_t* cols = padded ? last_w + o0 * width : w + o0 * in_features + b * L2;
        for (int64_t t = 0; t < row_tiles; ++t) {
          // Rows past the last repeat it (broadcast_tile allows that).
          for (int64_t p = 0; p < P; ++p) {
            const int64_t r = std::min(t * P + p, rows - 1);
            a[p] = grad_pre + r * out_features + o0;
            c[p] = padded ? last_out + r * width : grad_input + r * in_features + b * L2;
          }
          // The row tiles fetch the next block's weight columns (a piece of
          // each weight row, which no hardware prefetcher sees coming), each
          // tile one of the up to three cache lines a misaligned piece spans.
          const bool next_in_place = b + 1 < end && !(ragged && b + 2 == blocks);
          const scalar_t* next = next_in_place && t < 3 ? cols + std::min(t * L2 / 2, L2 - 1) + L2 : nullptr;
          kern.broadcast[width > L2 / 2 ? 1 : 0](a, cols, padded ? width : in_features, count, c, o0 > 0, next);
        }
      }
    }
    if (ragged && end == blocks) {
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(
            grad_input + r * in_features + last, last_out + r * last_width, (in_features - last) * sizeof(scalar_t));
    }
  });
}

// grad_weight[o][i] = sum over rows r of grad_pre[r][o] * input[r][i]: tiles
// of P output features (broadcast from grad_pre transposed) x two vectors of
// input features read straight from the input rows, each summed over all rows
// in order by one thread (reproducible) and stored once. Output tiles are
// split between threads. A last block that is not whole vectors reads a
// zero-padded copy of its input columns.
template <typename scalar_t>
void streamed_weight_grad(
    const scalar_t* grad_pre,
    const scalar_t* input,
    int64_t rows,
    int64_t in_features,
    int64_t out_features,
    scalar_t* grad_weight) {
  constexpr int64_t L2 = 2 * cpu::lanes<scalar_t>();
  const cpu::GemmKernels<scalar_t>& kern = cpu::gemm_kernels<scalar_t>();
  const int64_t P = kern.rows_per_tile;
  const ColumnBlocks split = column_blocks<scalar_t>(in_features);
  const int64_t blocks = split.blocks, last = split.last, last_width = split.last_width;
  const bool ragged = split.ragged;
  at::Tensor keep_alive;
  // [out_features][rows] grad_pre transposed, then [rows][last_width] input columns.
  scalar_t* grad_t = cpu::workspace<scalar_t>(
      cpu::workspace_slots::kPackedSlot, out_features * rows + (ragged ? rows * last_width : 0), keep_alive);
  scalar_t* last_x = grad_t + out_features * rows;
  at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t r = 0; r < rows; ++r) grad_t[o * rows + r] = grad_pre[r * out_features + o];
  });
  if (ragged) pack_columns<scalar_t>(input + last, rows, in_features - last, in_features, 1, last_x);
  const int64_t tiles = cpu::ceil_div(out_features, P);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const scalar_t* a[cpu::kConvPixels];
    scalar_t* c[cpu::kConvPixels];
    alignas(64) scalar_t padded_tile[cpu::kConvPixels * L2];
    for (int64_t b0 = 0; b0 < blocks; b0 += kStreamWeightGradBlocks) {
      const int64_t b1 = std::min(blocks, b0 + kStreamWeightGradBlocks);
      for (int64_t t = begin; t < end; ++t) {
        // Features past the last repeat it (broadcast_tile allows that).
        for (int64_t p = 0; p < P; ++p) a[p] = grad_t + std::min(t * P + p, out_features - 1) * rows;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t width = cpu::block_width<scalar_t>(in_features, b);
          const bool padded = ragged && b == blocks - 1;
          for (int64_t p = 0; p < P; ++p)
            c[p] = padded ? padded_tile + p * width
                          : grad_weight + std::min(t * P + p, out_features - 1) * in_features + b * L2;
          kern.broadcast[width > L2 / 2 ? 1 : 0](
              a, padded ? last_x : input + b * L2, padded ? width : in_features, rows, c, false, nullptr);
          if (padded) {
            for (int64_t p = 0; p < P && t * P + p < out_features; ++p)
              std::memcpy(grad_weight + (t * P + p) * in_features + last, padded_tile + p * width,
                          (in_features - last) * sizeof(scalar_t));
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void bias_relu_inplace(scalar_t* out, const scalar_t* bias, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = out + r * cols;
      if (bias != nullptr) {
        for (int64_t c = 0; c < cols; ++c) row[c] = std::max(row[c] + bias[c], scalar_t(0));
      } else {
        for (int64_t c = 0; c < cols; ++c) row[c] = std::max(row[c], scalar_t(0));
      }
    }
  });
}

// The routes that can run a GEMM of this shape (with why the others cannot),
// and the built-in rule's pick. The tiles reduce over `tile_reduce` features
// and the rule gives them shapes of at least `tile_min_rows` rows (or few
// outputs); `streamed_ok` is false where the streamed route cannot run whatever
// the shape. `dtype` is the op's (our kernels compute in scalar_t, see
// cpu/precision.h).
template <typename scalar_t>
cpu::RouteQuery route_query(
    const std::string& op, at::ScalarType dtype, int64_t rows, int64_t in_features, int64_t out_features,
    int64_t tile_reduce, int64_t tile_min_rows, bool streamed_ok) {
  const bool streamed = streamed_ok && streamed_can_run(rows, out_features);
  const bool tiles = tiles_can_run<scalar_t>(rows, tile_reduce);
  cpu::RouteQuery query;
  query.op = op;
  query.family = "linear_relu";
  query.shape = std::string(c10::toString(dtype)) + " " + std::to_string(rows) +
                "x" + std::to_string(in_features) + "x" + std::to_string(out_features);
  if (streamed) {
    query.candidates.push_back("streamed");
  } else {
    query.excluded.emplace_back(
        "streamed", !streamed_ok ? std::string("the streamed forward needs input features to sum over, there are none")
                    : rows == 0  ? std::string("there are no rows")
                                 : c10::str("streamed takes layers of more than ", kTileMaxOutFeatures,
                                            " output features, this one has ", out_features));
  }
  if (tiles) {
    query.candidates.push_back("tiles");
  } else {
    query.excluded.emplace_back(
        "tiles", rows == 0 ? std::string("there are no rows")
                           : c10::str("a packed block of ", tile_reduce, " features x 2 vectors (",
                                      tile_reduce * 2 * cpu::lanes<scalar_t>() * int64_t(sizeof(scalar_t)) / 1024,
                                      " KiB) is past the tiles' ", kTileMaxBlockBytes / 1024, " KiB"));
  }
  query.candidates.push_back("blas");
  // bfloat16 on AMX tiles (or their model): the rule's pick for layers wide
  // enough to fill the tiles' 32-feature steps and 16-feature columns.
  const std::string amx_refused = dtype != at::kBFloat16
                                      ? c10::str("amx runs bfloat16 layers; this one is ", dtype)
                                      : cpu::amx::tiles_refusal();
  const bool amx = amx_refused.empty();
  query.offer("amx", amx_refused);
  // bfloat16 on AVX512-BF16 dot products: timed, never the rule's pick.
  query.offer("bf16dot", dtype != at::kBFloat16 ? c10::str("bf16dot runs bfloat16 layers; this one is ", dtype)
                                                : cpu::bf16dot::refusal());
  query.fallback = amx && in_features >= 32 && out_features >= 16                             ? "amx"
                   : streamed && use_streamed(rows, out_features)                             ? "streamed"
                   : use_tiles<scalar_t>(rows, tile_reduce, out_features, tile_min_rows) ? "tiles"
                                                                                             : "blas";
  query.flops = 2.0 * double(rows) * double(in_features) * double(out_features);
  return query;
}

// The streamed forward sums its reduction chunk by chunk into partial sums
// that an empty reduction would leave unwritten: no input features go to the
// tiles or BLAS, whose empty sums are zero.
template <typename scalar_t>
cpu::RouteQuery forward_query(at::ScalarType dtype, int64_t rows, int64_t in_features, int64_t out_features) {
  return route_query<scalar_t>(
      "linear_relu_forward", dtype, rows, in_features, out_features, in_features, kTileMinRowsForward,
      in_features > 0);
}

// The backward's part is named after the gradients it computes ("i", "w");
// the input gradient's tiles reduce over the output features.
template <typename scalar_t>
cpu::RouteQuery backward_query(
    at::ScalarType dtype, std::array<bool, 3> output_mask, int64_t rows, int64_t in_features, int64_t out_features) {
  // The input gradient's tiles reduce over the output features.
  const std::string masks = std::string(output_mask[0] ? "i" : "") + (output_mask[1] ? "w" : "");
  return route_query<scalar_t>(
      "linear_relu_backward_" + masks, dtype, rows, in_features, out_features, out_features, kTileMinRowsBackward,
      true);
}

// out = relu(x w^T + bias) by `route`; x (rows, in) and w (out, in) contiguous.
template <typename scalar_t>
void linear_relu_forward_route(
    const std::string& route, const at::Tensor& x, const at::Tensor& w, const scalar_t* bias_data, at::Tensor& out) {
  const int64_t in_features = w.size(1), out_features = w.size(0);
  if (route == "streamed") {
    streamed_forward<scalar_t>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bias_data, x.size(0), in_features, out_features,
        out.mutable_data_ptr<scalar_t>());
  } else if (route == "tiles") {
    // Columns are output features: packed[c][o] = weight[o][c].
    at::Tensor keep_alive;
    scalar_t* packed = cpu::workspace<scalar_t>(
        cpu::workspace_slots::kPackedSlot, packed_size<scalar_t>(in_features, out_features), keep_alive);
    pack_columns<scalar_t>(w.const_data_ptr<scalar_t>(), in_features, out_features, 1, in_features, packed);
    std::vector<scalar_t> init;
    if (bias_data != nullptr) {
      init.resize(packed_size<scalar_t>(1, out_features));
      pack_columns<scalar_t>(bias_data, 1, out_features, 0, 1, init.data());
    }
    tile_gemm<scalar_t>(
        x.const_data_ptr<scalar_t>(), x.size(0), in_features, packed, bias_data != nullptr ? init.data() : nullptr,
        out_features, /*relu=*/true, out.mutable_data_ptr<scalar_t>());
  } else {
    at::mm_out(out, x, w.t());
    bias_relu_inplace<scalar_t>(out.data_ptr<scalar_t>(), bias_data, out.size(0), out_features);
  }
}

// The "blas" route of a bfloat16 or float16 op: torch's GEMM in that dtype
// where it accumulates in float32, else (as for float32) float32 BLAS on
// float32 copies (cpu/precision.h).
bool blas_in_reduced_dtype(at::ScalarType dtype) {
  return cpu::reduced_precision(dtype) && cpu::torch_kernels_accumulate_in_float(dtype);
}

at::Tensor linear_relu_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_relu_operands(input, weight, bias, cpu::kCpuDtypes, "CPU");
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  const at::Tensor x = as_rows(input, in_features).contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t rows = x.size(0);
  const at::ScalarType dtype = input.scalar_type();
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({rows, out_features}, x.options());
  AT_DISPATCH_FLOATING_TYPES(cpu::compute_dtype(dtype), "linear_relu_cpu", [&] {
    const auto query = forward_query<scalar_t>(dtype, rows, in_features, out_features);
    const auto run = [&](const std::string& route) {
      if (route == "amx") {
        cpu::amx::linear_forward(x, w, bias_c, out);
        return;
      }
      if (route == "bf16dot") {
        cpu::bf16dot::linear_forward(x, w, bias_c, out);
        return;
      }
      if (route == "blas" && blas_in_reduced_dtype(dtype)) {
        // torch's own linear in this dtype: the bias added before the one rounding.
        if (bias_c.defined()) {
          at::addmm_out(out, bias_c, x, w.t());
        } else {
          at::mm_out(out, x, w.t());
        }
        out.relu_();
        return;
      }
      const at::Tensor bias_compute = bias_c.defined() ? cpu::in_compute_dtype(bias_c) : at::Tensor();
      at::Tensor out_compute = cpu::compute_buffer(out);
      linear_relu_forward_route<scalar_t>(
          route, cpu::in_compute_dtype(x), cpu::in_compute_dtype(w),
          bias_compute.defined() ? bias_compute.const_data_ptr<scalar_t>() : nullptr, out_compute);
      cpu::store_result(out, out_compute);
    };
    run(cpu::choose_route(query, run));
  });
  return out.view(linear_relu_output_sizes(input, out_features));
}

// grad_pre = output <= 0 ? 0 : grad_output (a NaN output passes its gradient,
// as torch's threshold_backward does), written in place of a fresh buffer, and
// the bias gradient as its column sums. Columns are split between threads so
// each sum is owned by one thread and summed in a fixed order (deterministic).
// The sums of a column block run in a local array (no aliasing with the rows),
// in float32 for bfloat16 and float16 (sum_t, torch's opmath type).
template <typename scalar_t, typename sum_t = at::opmath_type<scalar_t>>
void relu_mask_and_bias_grad(
    const scalar_t* grad_output,
    const scalar_t* output,
    scalar_t* grad_pre,
    sum_t* grad_bias,
    int64_t rows,
    int64_t cols) {
  constexpr int64_t kColumnBlock = 64;
  const int64_t column_blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, column_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kColumnBlock;
      const int64_t width = std::min(kColumnBlock, cols - c0);
      sum_t sums[kColumnBlock] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* __restrict g = grad_output + r * cols + c0;
        const scalar_t* __restrict o = output + r * cols + c0;
        scalar_t* __restrict p = grad_pre + r * cols + c0;
        for (int64_t c = 0; c < width; ++c) {
          // Both loads unconditional, so the select compiles to a vector blend
          // instead of a branch on the data.
          const scalar_t gv = g[c], ov = o[c];
          const scalar_t masked = ov <= scalar_t(0) ? scalar_t(0) : gv;
          p[c] = masked;
          sums[c] += masked;
        }
      }
      if (grad_bias != nullptr) std::copy(sums, sums + width, grad_bias + c0);
    }
  });
}

// grad_input (rows, in) = grad_pre w and grad_weight (out, in) = grad_pre^T x
// by `route`, each only where it is given (allocated, contiguous); grad_pre
// (rows, out), w and x contiguous.
template <typename scalar_t>
void linear_relu_backward_route(
    const std::string& route, const at::Tensor& grad_pre, const at::Tensor& w, const at::Tensor& x,
    at::Tensor* grad_input, at::Tensor* grad_weight) {
  const int64_t rows = grad_pre.size(0), in_features = w.size(1), out_features = w.size(0);
  const scalar_t* gp = grad_pre.const_data_ptr<scalar_t>();
  if (route == "streamed") {
    if (grad_input != nullptr)
      streamed_input_grad<scalar_t>(
          gp, w.const_data_ptr<scalar_t>(), rows, in_features, out_features, grad_input->mutable_data_ptr<scalar_t>());
    if (grad_weight != nullptr)
      streamed_weight_grad<scalar_t>(
          gp, x.const_data_ptr<scalar_t>(), rows, in_features, out_features, grad_weight->mutable_data_ptr<scalar_t>());
  } else if (route == "tiles") {
    if (grad_input != nullptr) {
      // Columns are input features, the reduction runs over output features:
      // packed[o][i] = weight[o][i].
      at::Tensor keep_alive;
      scalar_t* packed = cpu::workspace<scalar_t>(
          cpu::workspace_slots::kPackedSlot, packed_size<scalar_t>(out_features, in_features), keep_alive);
      pack_columns<scalar_t>(w.const_data_ptr<scalar_t>(), out_features, in_features, in_features, 1, packed);
      tile_gemm<scalar_t>(
          gp, rows, out_features, packed, nullptr, in_features, /*relu=*/false, grad_input->mutable_data_ptr<scalar_t>());
    }
    if (grad_weight != nullptr)
      tile_weight_grad<scalar_t>(
          gp, x.const_data_ptr<scalar_t>(), rows, in_features, out_features, grad_weight->mutable_data_ptr<scalar_t>());
  } else {
    if (grad_input != nullptr) {
      at::Tensor grad_input_2d = grad_input->view({rows, in_features});
      at::mm_out(grad_input_2d, grad_pre, w);
    }
    if (grad_weight != nullptr) at::mm_out(*grad_weight, grad_pre.t(), x);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& output,
    const at::Tensor& input,
    const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  check_linear_relu_backward_operands(grad_output, output, input, weight, cpu::kCpuDtypes, "CPU");
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  const at::ScalarType dtype = input.scalar_type();
  const at::Tensor grad_2d = as_rows(grad_output, out_features).contiguous();
  const at::Tensor out_2d = as_rows(output, out_features).contiguous();
  const int64_t rows = grad_2d.size(0);
  const auto options = grad_output.options();
  // grad_pre in the op's dtype (masked copies of grad_output: exact), the bias
  // gradient summed in the compute dtype.
  at::Tensor grad_pre = at::empty_like(grad_2d);
  at::Tensor grad_bias = at::empty({output_mask[2] ? out_features : 0}, options);
  at::Tensor grad_bias_compute = cpu::compute_buffer(grad_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "linear_relu_backward_mask", [&] {
    using sum_t = at::opmath_type<scalar_t>;
    relu_mask_and_bias_grad<scalar_t>(
        grad_2d.const_data_ptr<scalar_t>(), out_2d.const_data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(),
        output_mask[2] ? grad_bias_compute.data_ptr<sum_t>() : nullptr, rows, out_features);
  });
  cpu::store_result(grad_bias, grad_bias_compute);
  at::Tensor grad_input = at::empty({0}, options);
  at::Tensor grad_weight = at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(cpu::compute_dtype(dtype), "linear_relu_backward_cpu", [&] {
    if (!output_mask[0] && !output_mask[1]) return;  // the bias gradient alone is done
    const at::Tensor w = weight.contiguous();
    const at::Tensor x = as_rows(input, in_features).contiguous();
    const auto query = backward_query<scalar_t>(dtype, output_mask, rows, in_features, out_features);
    const auto run = [&](const std::string& route) {
      if (output_mask[0]) grad_input = at::empty(input.sizes(), options);
      if (output_mask[1]) grad_weight = cpu::recycled_empty(weight.sizes(), options);
      // Routes in the op's dtype: each gradient from its own GEMM on the op's tensors.
      const auto run_gemms = [&](const auto& input_grad, const auto& weight_grad) {
        if (output_mask[0]) {
          at::Tensor grad_input_2d = grad_input.view({rows, in_features});
          input_grad(grad_pre, w, grad_input_2d);
        }
        if (output_mask[1]) weight_grad(grad_pre, x, grad_weight);
      };
      if (route == "amx") return run_gemms(cpu::amx::linear_input_grad, cpu::amx::linear_weight_grad);
      if (route == "bf16dot") return run_gemms(cpu::bf16dot::linear_input_grad, cpu::bf16dot::linear_weight_grad);
      if (route == "blas" && blas_in_reduced_dtype(dtype)) {
        // torch's own GEMMs in this dtype.
        return run_gemms([](const at::Tensor& g, const at::Tensor& w, at::Tensor& out) { at::mm_out(out, g, w); },
                         [](const at::Tensor& g, const at::Tensor& x, at::Tensor& out) { at::mm_out(out, g.t(), x); });
      }
      at::Tensor grad_input_compute = cpu::compute_buffer(grad_input);
      at::Tensor grad_weight_compute = cpu::compute_buffer(grad_weight);
      linear_relu_backward_route<scalar_t>(
          route, cpu::in_compute_dtype(grad_pre), cpu::in_compute_dtype(w), cpu::in_compute_dtype(x),
          output_mask[0] ? &grad_input_compute : nullptr, output_mask[1] ? &grad_weight_compute : nullptr);
      cpu::store_result(grad_input, grad_input_compute);
      cpu::store_result(grad_weight, grad_weight_compute);
    };
    run(cpu::choose_route(query, run));
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

std::vector<std::string> cpu::linear_relu_routes(const at::Tensor& input, const at::Tensor& weight) {
  check_linear_relu_operands(input, weight, std::nullopt, cpu::kCpuDtypes, "CPU");
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  const int64_t rows = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  const at::ScalarType dtype = input.scalar_type();
  std::vector<std::string> lines;
  AT_DISPATCH_FLOATING_TYPES(cpu::compute_dtype(dtype), "lightning_hw::linear_relu_cpu_routes", [&] {
    lines = cpu::describe_routes(forward_query<scalar_t>(dtype, rows, in_features, out_features));
    const auto backward = backward_query<scalar_t>(dtype, {true, true, true}, rows, in_features, out_features);
    for (std::string& line : cpu::describe_routes(backward)) lines.push_back(std::move(line));
  });
  return lines;
}

}  // namespace lightning_hw

TORCH_LIBRARY_IMPL(lightning_hw, CPU, m) {
  m.impl("linear_relu", &lightning_hw::linear_relu_cpu);
  m.impl("linear_relu_backward", &lightning_hw::linear_relu_backward_cpu);
}
