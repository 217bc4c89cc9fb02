// Register tiles of the depthwise convolution (one input and one output
// channel per group): every operand is a 64-byte vector of channels, so each
// lane is its own channel and no scalar is ever broadcast. No include guard on
// purpose: tile_kernels.cpp includes this file once per instruction set right
// after conv2d_kernels.h, inside the same namespace and `#pragma GCC target`
// region, and it uses that file's NativeVec, load_vec, store_vec and kPieces.
//
// The sources are per-thread NHWC stripes of one 64-byte vector of channels:
// pixel after pixel, each a whole vector (lanes past the channel count zero);
// dw_gather and dw_scatter move planar (NCHW) rows in and out of them.

// P output pixels x one vector of channels, accumulated in registers: for
// every kernel tap the weight vector is loaded once, then P input vectors are
// loaded and multiplied into the P accumulators.
//   src + pixel_offset[p] + tap_offset[k] : the input vector of pixel p at tap k
//   weights + k * lanes64 : the tap's weight vector ([tap][lanes])
//   init: the starting vector (bias) or null for zero
//   tile: [P][lanes64] result
template <typename scalar_t, int P>
void dw_conv_tile(
    const scalar_t* src,
    const int64_t* pixel_offset,
    const int64_t* tap_offset,
    int64_t taps,
    const scalar_t* weights,
    const scalar_t* init,
    scalar_t* tile) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  constexpr int N = kPieces;  // native vectors per 64-byte vector
  V acc[P][N];
  start_tile(acc, init);
  const scalar_t* base[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) base[p] = src + pixel_offset[p];
  for (int64_t k = 0; k < taps; ++k) {
    const int64_t offset = tap_offset[k];
    V wv[N];
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) wv[j] = load_vec<V>(weights + k * (N * L) + j * L);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) acc[p][j] += load_vec<V>(base[p] + offset + j * L) * wv[j];
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) store_vec(tile + p * (N * L) + j * L, acc[p][j]);
}

// Weight-gradient tile: T kernel taps x one vector of channels, summed over
// `rows` x `cols` output pixels. Per pixel the grad_output vector is loaded
// once, then one input vector per tap. acc_io holds [T][lanes64] running sums,
// read at the start and written back at the end, so that a caller can feed the
// pixels chunk by chunk.
//   g + (r * cols + c) * lanes64 : grad_output vector of pixel (r, c)
//   x + r * x_row_stride + c * x_pixel_stride + tap_offset[t] : the input vector tap t meets there
template <typename scalar_t, int T>
void dw_wgrad_tile(
    const scalar_t* x,
    int64_t x_row_stride,
    int64_t x_pixel_stride,
    const int64_t* tap_offset,
    const scalar_t* g,
    int64_t rows,
    int64_t cols,
    scalar_t* acc_io) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  constexpr int N = kPieces;
  V acc[T][N];
  int64_t offset[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    offset[t] = tap_offset[t];
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) acc[t][j] = load_vec<V>(acc_io + t * (N * L) + j * L);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xp = x + r * x_row_stride;
    const scalar_t* gp = g + r * cols * (N * L);
    for (int64_t c = 0; c < cols; ++c) {
      V gv[N];
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) gv[j] = load_vec<V>(gp + j * L);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) acc[t][j] += load_vec<V>(xp + offset[t] + j * L) * gv[j];
      xp += x_pixel_stride;
      gp += N * L;
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) store_vec(acc_io + t * (N * L) + j * L, acc[t][j]);
}

// Bias-gradient sums: acc_io[lanes64] += the `count` grad_output vectors at
// g, g + lanes64, ... Four running sums (pixel k in sum k % 4), added in a
// fixed order at the end: the result depends on the count alone.
template <typename scalar_t>
void dw_bias_sum(const scalar_t* g, int64_t count, scalar_t* acc_io) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  constexpr int N = kPieces;
  V sum[4][N] = {};
  int64_t k = 0;
  for (; k + 4 <= count; k += 4)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) sum[q][j] += load_vec<V>(g + (k + q) * (N * L) + j * L);
  for (int q = 0; k < count; ++k, ++q)
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) sum[q][j] += load_vec<V>(g + k * (N * L) + j * L);
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j)
    store_vec(acc_io + j * L, load_vec<V>(acc_io + j * L) + ((sum[0][j] + sum[1][j]) + (sum[2][j] + sum[3][j])));
}

// Integer vectors with the lanes of NativeVec: the masks of __builtin_shuffle.
template <typename scalar_t>
struct LaneIndex;
template <>
struct LaneIndex<float> {
  typedef int32_t type __attribute__((vector_size(kIsaVectorBytes)));
};
template <>
struct LaneIndex<double> {
  typedef int64_t type __attribute__((vector_size(kIsaVectorBytes)));
};

// Stage B of transpose_native: rows i and i + B (i without bit B) exchange the
// lanes j whose bit B differs from the row's; lane j of the new row i
// (Upper: i + B) reads lane mask[j] of the pair (row i, row i + B).
template <typename M, typename E, int n, int B, bool Upper, size_t... j>
constexpr M stage_mask(std::index_sequence<j...>) {
  return M{static_cast<E>(Upper ? ((j & B) ? n + j : j + B) : ((j & B) ? n + j - B : j))...};
}

// Transposes n x n scalars held as n native vectors (n = lanes): each stage B
// moves element (i, j) to (i ^ B, j ^ B) where bit B of i and j differ, so
// after the stages 1, 2, 4, ... every differing bit has moved: (i, j) -> (j, i).
// Each stage is n two-input shuffles with constant masks (vshufps, vblendps,
// vperm2f128 and the like).
template <typename scalar_t, int B = 1>
inline void transpose_native(typename NativeVec<scalar_t>::type* r) {
  using V = typename NativeVec<scalar_t>::type;
  using M = typename LaneIndex<scalar_t>::type;
  using E = std::remove_reference_t<decltype(M{}[0])>;
  constexpr int n = NativeVec<scalar_t>::lanes;
  if constexpr (B < n) {
    constexpr M lower = stage_mask<M, E, n, B, false>(std::make_index_sequence<n>{});
    constexpr M upper = stage_mask<M, E, n, B, true>(std::make_index_sequence<n>{});
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      if (i & B) continue;
      const V a = r[i], b = r[i + B];
      r[i] = __builtin_shuffle(a, b, lower);
      r[i + B] = __builtin_shuffle(a, b, upper);
    }
    transpose_native<scalar_t, 2 * B>(r);
  }
}

// Planar channels into an NHWC stripe: pixel k of channel c, src[c *
// channel_stride + k] (consecutive along k), goes to lane c of the vector at
// dst + dst_offset[k]; lanes from `channels` (at most lanes64) up are written
// zero. Blocks of n pixels x n channels are transposed in registers; a last
// partial block overlaps its predecessor (the same values stored again).
template <typename scalar_t>
void dw_gather(
    const scalar_t* src,
    int64_t channel_stride,
    int64_t channels,
    int64_t count,
    const int64_t* dst_offset,
    scalar_t* dst) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int n = NativeVec<scalar_t>::lanes;
  for (int64_t next = 0; next < count; next += n) {
    const int64_t k0 = count >= n ? std::min<int64_t>(next, count - n) : 0;
#pragma GCC unroll 4
    for (int g = 0; g < kPieces; ++g) {
      V r[n];
#pragma GCC unroll 16
      for (int i = 0; i < n; ++i) {
        const int64_t c = g * n + i;
        const scalar_t* row = src + c * channel_stride + k0;
        if (c >= channels) {
          r[i] = V{};
        } else if (count >= n) {
          r[i] = load_vec<V>(row);
        } else {
          scalar_t part[n] = {};
          for (int64_t k = 0; k < count; ++k) part[k] = row[k];
          r[i] = load_vec<V>(part);
        }
      }
      transpose_native<scalar_t>(r);
#pragma GCC unroll 16
      for (int i = 0; i < n; ++i)
        if (i < count) store_vec(dst + dst_offset[k0 + i] + g * n, r[i]);
    }
  }
}

// The reverse, for results: the vector of pixel k at src + k * lanes64 goes to
// dst[c * channel_stride + k] for the channels c < `channels`.
template <typename scalar_t>
void dw_scatter(const scalar_t* src, int64_t count, int64_t channels, scalar_t* dst, int64_t channel_stride) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int n = NativeVec<scalar_t>::lanes;
  constexpr int L = n * kPieces;
  for (int64_t next = 0; next < count; next += n) {
    const int64_t k0 = count >= n ? std::min<int64_t>(next, count - n) : 0;
#pragma GCC unroll 4
    for (int g = 0; g < kPieces; ++g) {
      if (g * n >= channels) break;
      V r[n];
#pragma GCC unroll 16
      for (int i = 0; i < n; ++i) r[i] = i < count ? load_vec<V>(src + (k0 + i) * L + g * n) : V{};
      transpose_native<scalar_t>(r);
#pragma GCC unroll 16
      for (int i = 0; i < n; ++i) {
        const int64_t c = g * n + i;
        if (c >= channels) break;
        scalar_t* row = dst + c * channel_stride + k0;
        if (count >= n) {
          store_vec(row, r[i]);
        } else {
          scalar_t part[n];
          store_vec(part, r[i]);
          for (int64_t k = 0; k < count; ++k) row[k] = part[k];
        }
      }
    }
  }
}

// The tables of this instruction set: tiles up to kIsaTiles' sizes (the
// larger entries stay null).
template <typename scalar_t, size_t... P>
void fill_dw_conv_table(DepthwiseKernels<scalar_t>& k, std::index_sequence<P...>) {
  ((k.conv[P] = &dw_conv_tile<scalar_t, int(P) + 1>), ...);
}

template <typename scalar_t, size_t... T>
void fill_dw_wgrad_table(DepthwiseKernels<scalar_t>& k, std::index_sequence<T...>) {
  ((k.wgrad[T] = &dw_wgrad_tile<scalar_t, int(T) + 1>), ...);
}

template <typename scalar_t>
DepthwiseKernels<scalar_t> depthwise_kernels() {
  DepthwiseKernels<scalar_t> k{};
  k.pixels = kIsaTiles.dw_pixels;
  k.taps = kIsaTiles.dw_wgrad_taps;
  fill_dw_conv_table<scalar_t>(k, std::make_index_sequence<kIsaTiles.dw_pixels>{});
  fill_dw_wgrad_table<scalar_t>(k, std::make_index_sequence<kIsaTiles.dw_wgrad_taps>{});
  k.bias_sum = &dw_bias_sum<scalar_t>;
  k.gather = &dw_gather<scalar_t>;
  k.scatter = &dw_scatter<scalar_t>;
  return k;
}
