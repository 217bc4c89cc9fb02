// Register-blocked inner loops of the direct convolution (and of linear_relu's
// small GEMMs, which are 1x1 convolutions). No include guard on purpose:
// tile_kernels.cpp includes this file once per instruction set, each time
// inside its own namespace and `#pragma GCC target` region, so the same source
// becomes an AVX-512, an AVX2 and a baseline (SSE2) variant, picked at run time.
// Everything this file needs is included by tile_kernels.cpp before it.

// The kernels work on 64-byte vectors of channels or pixels (16 floats / 8
// doubles: the unit of the packed layouts), each held as 64 / kIsaVectorBytes
// native vectors of this instruction set: one zmm, two ymm or four xmm. GCC
// vector extensions keep the code free of intrinsics, so the baseline variant
// compiles anywhere. (A plain 64-byte vector type would compile too, but
// without AVX-512 GCC builds its scalar broadcasts through the stack.)
template <typename scalar_t>
struct NativeVec {
  typedef scalar_t type __attribute__((vector_size(kIsaVectorBytes)));
  static constexpr int lanes = kIsaVectorBytes / sizeof(scalar_t);
};
constexpr int kPieces = 64 / kIsaVectorBytes;  // native vectors per 64-byte vector

template <typename V>
inline V load_vec(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store_vec(void* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// A register tile's starting sums: acc[p][j] = native vector j of init for
// every pixel p (the bias), or zero without init. Always inlined, so that acc
// stays in registers.
template <typename scalar_t, typename V, int P, int N>
__attribute__((always_inline)) inline void start_tile(V (&acc)[P][N], const scalar_t* init) {
  constexpr int L = NativeVec<scalar_t>::lanes;
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j) {
    const V start = init ? load_vec<V>(init + j * L) : V{};
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) acc[p][j] = start;
  }
}

// Output tile of P pixels x NV vectors of output channels, accumulated in
// registers: for every kernel tap k and reduced channel c, NV weight vectors
// are loaded once and multiplied by P broadcast input scalars (P*NV FMAs for
// NV loads + P broadcasts). Tile sizes per instruction set: IsaTiles.
//   pixel_base[p] + tap_offset[k] + c : input scalar of pixel p at tap k
//   weights + (k * reduce + c) * NV*lanes : the output-channel vector(s)
//   init: NV*lanes starting values (bias) or null for zero
//   tile: [P][NV*lanes] result
template <typename scalar_t, int NV, int P>
void conv_tile(
    const scalar_t* const* pixel_base,
    const int64_t* tap_offset,
    int64_t taps,
    int64_t reduce,
    const scalar_t* weights,
    const scalar_t* init,
    scalar_t* tile) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  constexpr int N = NV * kPieces;  // native vectors of output channels
  V acc[P][N];
  start_tile(acc, init);
  for (int64_t k = 0; k < taps; ++k) {
    const scalar_t* src[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) src[p] = pixel_base[p] + tap_offset[k];
    const scalar_t* w = weights + k * reduce * (N * L);
    for (int64_t c = 0; c < reduce; ++c) {
      V wv[N];
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) wv[j] = load_vec<V>(w + c * (N * L) + j * L);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const scalar_t x = src[p][c];
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) acc[p][j] += wv[j] * x;
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) store_vec(tile + p * (N * L) + j * L, acc[p][j]);
}

// Weight-gradient tile: R reduced positions q (a kernel tap and an input
// channel each, at input offsets q_offset[r]) x NV vectors of output channels,
// summed over every output pixel of the rows. acc_io holds [R][NV*lanes]
// running sums, read at the start and written back at the end, so a caller
// can feed the pixels chunk by chunk (the chunk stays in L2 across tiles).
// Consecutive: the R positions are consecutive channels of one tap
// (q_offset[r] = q_offset[0] + r), read from one pointer; otherwise every
// position keeps its own offset (in registers or spilled).
template <typename scalar_t, int NV, int R, bool Consecutive>
void wgrad_tile(const WgradRows<scalar_t>& rows, const int64_t* q_offset, scalar_t* acc_io) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  constexpr int N = NV * kPieces;  // native vectors of output channels
  V acc[R][N];
  int64_t offset[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    offset[r] = Consecutive ? q_offset[0] + r : q_offset[r];
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) acc[r][j] = load_vec<V>(acc_io + r * (N * L) + j * L);
  }
  for (int64_t row = rows.row_begin; row < rows.row_end; ++row) {
    const int64_t image = row / rows.out_h;
    const int64_t oh = row - image * rows.out_h;
    const scalar_t* x = rows.input + image * rows.input_image_stride + oh * rows.input_row_stride +
                        (Consecutive ? q_offset[0] : 0);
    const scalar_t* g =
        rows.grad_output + image * rows.grad_image_stride + oh * rows.grad_row_stride;
    for (int64_t ow = 0; ow < rows.out_w; ++ow) {
      V gv[N];
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) gv[j] = load_vec<V>(g + j * L);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const scalar_t xv = Consecutive ? x[r] : x[offset[r]];
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) acc[r][j] += gv[j] * xv;
      }
      x += rows.input_pixel_stride;
      g += rows.grad_pixel_stride;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) store_vec(acc_io + r * (N * L) + j * L, acc[r][j]);
}

// Stride-1 tile for few output channels (where a vector of output channels
// would be mostly empty lanes): R consecutive output rows x O output channels
// x NP vectors of consecutive pixels, read from a planar (NCHW) source. For
// every reduced channel c and tap k, O weights are broadcast once and
// multiplied by R*NP pixel vectors. Several rows keep enough independent
// accumulators in flight when O is small (1 or 3 input channels, in the
// input gradient of a first layer).
//   src + r * row_stride + c * channel_stride + tap_offset[k] : row r of channel c at tap k
//   weights + (c * taps + k) * weight_stride + o : the weight of output channel o
//   init: O starting values (bias) or null for zero
//   tile: [R][O][NP*lanes] result
template <typename scalar_t, int O, int NP, int R>
void planar_tile(
    const scalar_t* src,
    int64_t row_stride,
    int64_t channel_stride,
    const int64_t* tap_offset,
    int64_t taps,
    int64_t reduce,
    const scalar_t* weights,
    int64_t weight_stride,
    const scalar_t* init,
    scalar_t* tile) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  constexpr int N = NP * kPieces;  // native vectors of pixels
  V acc[R][O][N];
#pragma GCC unroll 8
  for (int o = 0; o < O; ++o) {
    const scalar_t start = init ? init[o] : scalar_t(0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) acc[r][o][j] = V{} + start;
  }
  for (int64_t c = 0; c < reduce; ++c) {
    const scalar_t* plane = src + c * channel_stride;
    const scalar_t* w = weights + c * taps * weight_stride;
    for (int64_t k = 0; k < taps; ++k) {
      const scalar_t* row = plane + tap_offset[k];
      V xv[R][N];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) xv[r][j] = load_vec<V>(row + r * row_stride + j * L);
#pragma GCC unroll 8
      for (int o = 0; o < O; ++o) {
        const scalar_t wo = w[k * weight_stride + o];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
          for (int j = 0; j < N; ++j) acc[r][o][j] += xv[r][j] * wo;
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int o = 0; o < O; ++o)
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) store_vec(tile + (r * O + o) * (N * L) + j * L, acc[r][o][j]);
}

// Rows per planar tile: as many as the accumulator budget allows, at most
// kPlanarMaxRows.
constexpr int planar_rows(int O, int NP) {
  const int rows = kIsaTiles.planar_accumulators / (O * NP * kPieces);
  return rows < 1 ? 1 : rows > kPlanarMaxRows ? kPlanarMaxRows : rows;
}

// Stride-1 weight-gradient tile over planar (NCHW) rows, for few channels: O
// output channels x T reduced positions (an input channel and a kernel tap
// each), one native vector accumulator per pair, summed over `rows` rows of
// `vectors` native vectors of output pixels. Per row and vector, O grad_output
// vectors and T shifted input vectors are loaded once each (O*T FMAs for O+T
// loads). acc_io holds the running vector sums, [o * acc_stride + t * lanes],
// read at the start and written back at the end.
//   g + r * g_row_stride + o * g_channel_stride : grad_output row r of channel o
//   x + r * x_row_stride + x_offset[t] : the input row that position t meets
// Lanes past the row's end must read zero in g (then x there only needs to be
// finite).
template <typename scalar_t, int O, int T>
void planar_wgrad_tile(
    const scalar_t* g,
    int64_t g_row_stride,
    int64_t g_channel_stride,
    const scalar_t* x,
    int64_t x_row_stride,
    const int64_t* x_offset,
    int64_t rows,
    int64_t vectors,
    scalar_t* acc_io,
    int64_t acc_stride) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  V acc[O][T];
  int64_t offset[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) offset[t] = x_offset[t];
#pragma GCC unroll 8
  for (int o = 0; o < O; ++o)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[o][t] = load_vec<V>(acc_io + o * acc_stride + t * L);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gr = g + r * g_row_stride;
    const scalar_t* xr = x + r * x_row_stride;
    for (int64_t v = 0; v < vectors; ++v) {
      V gv[O];
#pragma GCC unroll 8
      for (int o = 0; o < O; ++o) gv[o] = load_vec<V>(gr + o * g_channel_stride + v * L);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const V xv = load_vec<V>(xr + offset[t] + v * L);
#pragma GCC unroll 8
        for (int o = 0; o < O; ++o) acc[o][t] += gv[o] * xv;
      }
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < O; ++o)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) store_vec(acc_io + o * acc_stride + t * L, acc[o][t]);
}

// The kernels of this instruction set, as plain function pointers.
template <typename scalar_t, int NV, bool Consecutive, size_t... R>
void fill_wgrad_table(typename ConvKernels<scalar_t>::WgradTile* table, std::index_sequence<R...>) {
  ((table[R] = &wgrad_tile<scalar_t, NV, int(R) + 1, Consecutive>), ...);
}

template <typename scalar_t, int NP, size_t... O>
void fill_planar_table(ConvKernels<scalar_t>& k, std::index_sequence<O...>) {
  ((k.planar[NP - 1][O] = &planar_tile<scalar_t, int(O) + 1, NP, planar_rows(int(O) + 1, NP)>), ...);
  ((k.planar_rows[NP - 1][O] = planar_rows(int(O) + 1, NP)), ...);
  ((k.planar_one_row[NP - 1][O] = &planar_tile<scalar_t, int(O) + 1, NP, 1>), ...);
}

template <typename scalar_t, int O, size_t... T>
void fill_planar_wgrad_row(typename ConvKernels<scalar_t>::PlanarWgradTile* row, std::index_sequence<T...>) {
  ((row[T] = &planar_wgrad_tile<scalar_t, O, int(T) + 1>), ...);
}

template <typename scalar_t, size_t... O>
void fill_planar_wgrad_table(
    typename ConvKernels<scalar_t>::PlanarWgradTile (*table)[kPlanarWgradMaxPositions],
    std::index_sequence<O...>) {
  using PositionSeq = std::make_index_sequence<kPlanarWgradMaxPositions>;
  (fill_planar_wgrad_row<scalar_t, int(O) + 1>(table[O], PositionSeq{}), ...);
}

template <typename scalar_t>
ConvKernels<scalar_t> conv_kernels() {
  ConvKernels<scalar_t> k;
  k.tiles = kIsaTiles;
  k.conv[0] = &conv_tile<scalar_t, 1, kIsaTiles.conv_pixels>;
  k.conv[1] = &conv_tile<scalar_t, 2, kIsaTiles.conv_pixels>;
  using WgradRowsSeq = std::make_index_sequence<kWgradMaxRows>;
  fill_wgrad_table<scalar_t, 1, false>(k.wgrad[0][0], WgradRowsSeq{});
  fill_wgrad_table<scalar_t, 2, false>(k.wgrad[0][1], WgradRowsSeq{});
  fill_wgrad_table<scalar_t, 1, true>(k.wgrad[1][0], WgradRowsSeq{});
  fill_wgrad_table<scalar_t, 2, true>(k.wgrad[1][1], WgradRowsSeq{});
  using PlanarSeq = std::make_index_sequence<kPlanarMaxChannels>;
  fill_planar_table<scalar_t, 1>(k, PlanarSeq{});
  fill_planar_table<scalar_t, 2>(k, PlanarSeq{});
  fill_planar_wgrad_table<scalar_t>(
      k.planar_wgrad, std::make_index_sequence<kPlanarWgradMaxChannels>{});
  k.native_lanes = NativeVec<scalar_t>::lanes;
  return k;
}
