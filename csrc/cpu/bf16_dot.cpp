// The "bf16dot" route of linear_relu (see bf16_dot.h).
//
// One register tile: up to 12 rows x 32 columns of float32 sums in 24 zmm
// accumulators. Each step of the reduction takes a pair of bf16 from each
// row of A (one 32-bit broadcast) and a pair from each of 32 columns of B
// (two zmm of a packed panel, [pair][column][2], the layout VDPBF16PS
// multiplies), so the A side is read in place wherever its reduction index is
// contiguous (x in the forward, grad_pre in the input gradient) and only the
// B side is packed. An odd reduction length ends in a pair whose second
// element is zero on both sides. Bias, ReLU and the rounding to bfloat16 are
// applied as the tile is stored.
#include "cpu/bf16_dot.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace lightning_hw {
namespace cpu {
namespace bf16dot {
namespace {

constexpr int kColumns = 32;                // columns of a panel: two vectors of sums
constexpr int64_t kPanelPair = 2 * kColumns;  // bf16 per reduction pair of a panel
constexpr int kMaxRows = 12;                // rows of a register tile (24 of 32 zmm)
constexpr int64_t kTilesPerItem = 8;        // row tiles per parallel item (its panel packed once)

struct Tile {
  const uint16_t* a;   // row r's reduction at a + r * a_stride (bf16 bits)
  int64_t a_stride;
  int64_t pairs;       // whole pairs of A read
  bool odd;            // one more index, a[r * a_stride + 2 * pairs], paired with zero
  const uint16_t* b;   // panel [pairs + odd][32][2]
  at::BFloat16* out;   // row r, column j at out[r * out_stride + j]
  int64_t out_stride;
  int cols;            // columns stored, 1..32
  const float* bias;   // 32 floats added before the ReLU (one per row where transposed), or null
  bool relu;
  bool transposed;     // row r, column j at out[j * out_stride + r], through a float tile
};

using TileKernel = void (*)(const Tile&);

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
// GCC 12's AVX-512 headers pass _mm512_undefined_*() as the merge source of
// unmasked shuffles, which -Wmaybe-uninitialized reports at every use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int R, int V>
void dot_tile(const Tile& t) {
  __m512 acc[R][V];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const auto step = [&](const uint16_t* b, const auto& a_word) {
    __m512bh bv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + v * 32);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(a_word(r));
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  };
  const uint16_t* b = t.b;
  for (int64_t p = 0; p < t.pairs; ++p, b += kPanelPair) {
    step(b, [&](int r) {
      int32_t word;
      std::memcpy(&word, t.a + r * t.a_stride + 2 * p, sizeof(word));
      return word;
    });
  }
  if (t.odd) step(b, [&](int r) { return int32_t(t.a[r * t.a_stride + 2 * t.pairs]); });

  if (t.transposed) {
    // Few columns (the batch rows of a forward computed as out^T): each row's
    // bias added and the tile written out column by column.
    alignas(64) float sums[R][kColumns];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) _mm512_store_ps(&sums[r][16 * v], acc[r][v]);
    for (int r = 0; r < R; ++r) {
      const float row_bias = t.bias != nullptr ? t.bias[r] : 0.f;
      for (int j = 0; j < t.cols; ++j) {
        const float sum = sums[r][j] + row_bias;
        // NaN is not below zero: it passes the ReLU, as in torch.
        t.out[j * t.out_stride + r] = at::BFloat16(t.relu && sum < 0.f ? 0.f : sum);
      }
    }
    return;
  }
  const __mmask16 masks[2] = {
      __mmask16(t.cols >= 16 ? 0xffff : (1u << t.cols) - 1),
      __mmask16(t.cols >= 32 ? 0xffff : t.cols > 16 ? (1u << (t.cols - 16)) - 1 : 0)};
  __m512 bias[V];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) bias[v] = t.bias != nullptr ? _mm512_loadu_ps(t.bias + 16 * v) : _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      __m512 sum = _mm512_add_ps(acc[r][v], bias[v]);
      // max(0, NaN) is the second operand: NaN passes the ReLU, as in torch.
      if (t.relu) sum = _mm512_max_ps(zero, sum);
      _mm256_mask_storeu_epi16(t.out + r * t.out_stride + 16 * v, masks[v], (__m256i)_mm512_cvtneps_pbh(sum));
    }
}

// Panel nb of the (k_size x n_size) matrix src (row stride ld): pairs of rows
// interleaved over 32 columns, [pair s][j][2] = (src[2s][32 nb + j],
// src[2s + 1][32 nb + j]), zeros past the last row and column.
void pack_row_pairs(const uint16_t* src, int64_t k_size, int64_t n_size, int64_t ld, int64_t nb, uint16_t* panel) {
  alignas(64) static const uint16_t kLow[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  const int64_t cols = std::min<int64_t>(kColumns, n_size - nb * kColumns);
  const __mmask32 mask = cols >= 32 ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
  const uint16_t* column = src + nb * kColumns;
  for (int64_t s = 0; 2 * s < k_size; ++s) {
    const __m512i even = _mm512_maskz_loadu_epi16(mask, column + 2 * s * ld);
    const __m512i odd = 2 * s + 1 < k_size ? _mm512_maskz_loadu_epi16(mask, column + (2 * s + 1) * ld)
                                           : _mm512_setzero_si512();
    _mm512_storeu_si512(panel + s * kPanelPair, _mm512_permutex2var_epi16(even, low, odd));
    _mm512_storeu_si512(panel + s * kPanelPair + 32, _mm512_permutex2var_epi16(even, high, odd));
  }
}

// Transposes 16 rows of 16 32-bit words in place.
inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // r[4q + c] holds, in 128-bit lane l, words 4l + c of rows 4q..4q+3.
  for (int q = 0; q < 16; q += 4) {
    r[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
    r[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
    r[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
    r[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);       // words c, 8 + c of rows 0-7
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);   // words 4 + c, 12 + c of rows 0-7
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// Words [p_begin, p_end) (whole pairs of bf16) of 16 rows of w from row
// `first` (zeros past `rows`) as 16-word columns of a panel ([pair][32]
// words), from its column `column`.
void pack_transposed_words(
    const uint16_t* w, int64_t rows, int64_t row_length, int64_t first, int64_t p_begin, int64_t p_end,
    uint32_t* panel, int64_t column) {
  __m512i r[16];
  for (int64_t p0 = p_begin; p0 < p_end; p0 += 16) {
    const int64_t count = std::min<int64_t>(16, p_end - p0);
    const __mmask16 mask = count == 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      r[i] = first + i < rows ? _mm512_maskz_loadu_epi32(mask, w + (first + i) * row_length + 2 * p0)
                              : _mm512_setzero_si512();
    transpose_16x16(r);
    for (int64_t i = 0; i < count; ++i) _mm512_storeu_si512(panel + (p0 + i) * kColumns + column, r[i]);
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

template <int V, size_t... R>
constexpr std::array<TileKernel, kMaxRows> tiles_of(std::index_sequence<R...>) {
  return {&dot_tile<int(R) + 1, V>...};
}

const std::array<TileKernel, kMaxRows> kTiles[2] = {
    tiles_of<1>(std::make_index_sequence<kMaxRows>()), tiles_of<2>(std::make_index_sequence<kMaxRows>())};

// Rows of the output in register tiles: even runs of at most 12 rows (so no
// tile is left with a few rows), grouped into parallel items of up to 8 runs
// where there is enough work for every thread.
struct RowTiles {
  std::vector<std::pair<int64_t, int64_t>> runs;  // (first row, rows)
  int64_t per_item;
  int64_t groups() const { return ceil_div(int64_t(runs.size()), per_item); }
};

RowTiles row_tiles(int64_t m_size, int64_t col_blocks, int64_t most_per_item) {
  RowTiles tiles{even_runs(m_size, kMaxRows), 1};
  const int64_t tile_count = int64_t(tiles.runs.size()) * col_blocks;
  tiles.per_item = std::clamp<int64_t>(tile_count / (8 * at::get_num_threads()), 1, most_per_item);
  return tiles;
}

// Group `group` of the row tiles of one panel's 32 columns.
void run_group(Tile tile, const RowTiles& tiles, int64_t group) {
  const TileKernel* kernels = kTiles[tile.cols > 16 ? 1 : 0].data();
  const uint16_t* a = tile.a;
  at::BFloat16* out = tile.out;
  const float* bias = tile.bias;
  const int64_t end = std::min<int64_t>(int64_t(tiles.runs.size()), (group + 1) * tiles.per_item);
  for (int64_t run = group * tiles.per_item; run < end; ++run) {
    const auto [first, count] = tiles.runs[run];
    tile.a = a + first * tile.a_stride;
    tile.out = out + (tile.transposed ? first : first * tile.out_stride);
    if (tile.transposed && bias != nullptr) tile.bias = bias + first;
    kernels[count - 1](tile);
  }
}

// out (m_size x n_size) = A . B, B given as (k_size x n_size) row-major at
// b (row stride ldb), packed a panel per parallel item; A rows of k_size at
// a (row stride lda). Items: 32 columns x a group of row tiles.
void gemm_row_pairs_b(
    const uint16_t* a, int64_t lda, int64_t m_size, const uint16_t* b, int64_t ldb, int64_t k_size, int64_t n_size,
    at::BFloat16* out) {
  const int64_t col_blocks = ceil_div(n_size, kColumns);
  const RowTiles tiles = row_tiles(m_size, col_blocks, kTilesPerItem);
  const int64_t groups = tiles.groups();
  at::parallel_for(0, col_blocks * groups, 1, [&](int64_t begin, int64_t end) {
    at::Tensor keep_alive;
    uint16_t* panel = workspace<uint16_t>(workspace_slots::kPanelSlot, ceil_div(k_size, 2) * kPanelPair, keep_alive);
    int64_t packed_block = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nb = item / groups;
      if (nb != packed_block) {
        pack_row_pairs(b, k_size, n_size, ldb, nb, panel);
        packed_block = nb;
      }
      const Tile tile{a,
                      lda,
                      k_size / 2,
                      k_size % 2 == 1,
                      panel,
                      out + nb * kColumns,
                      n_size,
                      int(std::min<int64_t>(kColumns, n_size - nb * kColumns)),
                      nullptr,
                      false,
                      false};
      run_group(tile, tiles, item % groups);
    }
  });
}

const uint16_t* bits(const at::Tensor& tensor) {
  return reinterpret_cast<const uint16_t*>(tensor.const_data_ptr<at::BFloat16>());
}

bool cpu_has_avx512_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5)) != 0;
}

}  // namespace

std::string refusal() {
  static const std::string text = [] {
    const std::string isa = cpu_isa_name();
    if (isa != "avx512" && isa != "amx")
      return c10::str("bf16dot runs with the AVX-512 kernels; this process runs the ", isa, " kernels");
    __builtin_cpu_init();
    std::string missing;
    if (!cpu_has_avx512_bf16()) missing += " avx512_bf16";
    if (!__builtin_cpu_supports("avx512bw")) missing += " avx512bw";
    return missing.empty() ? std::string() : c10::str("bf16dot needs AVX512-BF16; this CPU lacks", missing);
  }();
  return text;
}

void linear_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out) {
  TORCH_CHECK(refusal().empty(), "lightning_hw: ", refusal());
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = w.size(0);
  if (rows == 0 || out_features == 0) return;
  // Both operands have the reduction contiguous: the larger one is read in
  // place as A, the smaller one packed as B (its rows become panel columns,
  // 32-bit pairs transposed 16 x 16 at a time). With fewer rows than outputs
  // (a wide layer on a small batch) that computes out^T = w . x^T.
  const bool rows_as_a = rows >= out_features;
  const at::Tensor& a_side = rows_as_a ? x : w;
  const at::Tensor& b_side = rows_as_a ? w : x;
  const int64_t m_size = a_side.size(0), n_size = b_side.size(0);
  const int64_t pairs = in_features / 2, panel_pairs = ceil_div(in_features, 2);
  const int64_t col_blocks = ceil_div(n_size, kColumns);
  // Every word is written below (zeros past the last column and input).
  at::Tensor keep_alive;
  uint32_t* packed =
      workspace<uint32_t>(workspace_slots::kPackedSlot, col_blocks * panel_pairs * kColumns, keep_alive);
  const uint16_t* b_rows = bits(b_side);
  constexpr int64_t kPairsPerItem = 256;
  const int64_t pair_runs = std::max<int64_t>(1, ceil_div(pairs, kPairsPerItem));
  at::parallel_for(0, col_blocks * 2 * pair_runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nb = item / (2 * pair_runs), half = (item / pair_runs) % 2, run = item % pair_runs;
      const int64_t first = nb * kColumns + 16 * half;
      uint32_t* panel = packed + nb * panel_pairs * kColumns;
      pack_transposed_words(b_rows, n_size, in_features, first, run * kPairsPerItem,
                            std::min(pairs, (run + 1) * kPairsPerItem), panel, 16 * half);
      if (panel_pairs > pairs && run == pair_runs - 1) {
        // The last input pairs with zero.
        for (int64_t i = 0; i < 16; ++i)
          panel[pairs * kColumns + 16 * half + i] =
              first + i < n_size ? b_rows[(first + i) * in_features + 2 * pairs] : 0;
      }
    }
  });
  // Per output: padded to whole panels where outputs are columns.
  std::vector<float> bias_values(rows_as_a ? col_blocks * kColumns : out_features, 0.f);
  if (bias.defined()) {
    const at::Tensor values = bias.to(at::kFloat).contiguous();
    std::copy(values.const_data_ptr<float>(), values.const_data_ptr<float>() + out_features, bias_values.begin());
  }
  // The panels are packed already: items of one row tile.
  const RowTiles tiles = row_tiles(m_size, col_blocks, 1);
  const int64_t groups = tiles.groups();
  const uint16_t* a = bits(a_side);
  at::BFloat16* dst = out.mutable_data_ptr<at::BFloat16>();
  const uint16_t* panels = reinterpret_cast<const uint16_t*>(packed);
  at::parallel_for(0, col_blocks * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nb = item / groups;
      const Tile tile{a,
                      in_features,
                      pairs,
                      panel_pairs > pairs,
                      panels + nb * panel_pairs * kPanelPair,
                      dst + nb * kColumns * (rows_as_a ? 1 : out_features),
                      out_features,
                      int(std::min<int64_t>(kColumns, n_size - nb * kColumns)),
                      bias.defined() ? bias_values.data() + (rows_as_a ? nb * kColumns : 0) : nullptr,
                      true,
                      !rows_as_a};
      run_group(tile, tiles, item % groups);
    }
  });
}

void linear_input_grad(const at::Tensor& grad_pre, const at::Tensor& w, at::Tensor& grad_input) {
  // grad_input (rows, in) = grad_pre (rows, out) . w (out, in): reduce over outputs.
  TORCH_CHECK(refusal().empty(), "lightning_hw: ", refusal());
  const int64_t rows = grad_pre.size(0), out_features = grad_pre.size(1), in_features = w.size(1);
  if (rows == 0 || in_features == 0) return;
  gemm_row_pairs_b(
      bits(grad_pre), out_features, rows, bits(w), in_features, out_features, in_features,
      grad_input.mutable_data_ptr<at::BFloat16>());
}

void linear_weight_grad(const at::Tensor& grad_pre, const at::Tensor& x, at::Tensor& grad_weight) {
  // grad_weight (out, in) = grad_pre^T (out, rows) . x (rows, in): reduce over
  // rows; A = grad_pre^T, its rows read in pairs like any A (an odd last row
  // pairs with zero in the tile).
  TORCH_CHECK(refusal().empty(), "lightning_hw: ", refusal());
  const int64_t rows = grad_pre.size(0), out_features = grad_pre.size(1), in_features = x.size(1);
  if (out_features == 0 || in_features == 0) return;
  at::Tensor keep_alive;
  uint16_t* transposed = workspace<uint16_t>(workspace_slots::kPackedSlot, out_features * rows, keep_alive);
  const uint16_t* g = bits(grad_pre);
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t r = 0; r < rows; ++r) transposed[o * rows + r] = g[r * out_features + o];
  });
  gemm_row_pairs_b(
      transposed, rows, out_features, bits(x), in_features, rows, in_features,
      grad_weight.mutable_data_ptr<at::BFloat16>());
}

}  // namespace bf16dot
}  // namespace cpu
}  // namespace lightning_hw
