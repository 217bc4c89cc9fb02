// Register tile of linear_relu's streamed GEMMs (few rows, wide layers), read
// straight from the operands' own row-major layouts. No include guard on
// purpose: tile_kernels.cpp includes this file once per instruction set right
// after conv2d_kernels.h, inside the same namespace and `#pragma GCC target`
// region, and it uses that file's NativeVec, load_vec, store_vec and kPieces.

// c[p][0 .. NV*lanes) (+)= sum over k < count of a[p][k] * b[k * b_stride + 0 .. NV*lanes):
// P rows of broadcast scalars, each contiguous along k, against one row of
// NV 64-byte vectors per k, accumulated in registers; `accumulate` starts
// from the values in c instead of zero. Every c row is read before any is
// written, so a caller may repeat a row (a and c alike) to fill a ragged tile:
// the copies compute and store the same values. P is IsaTiles::conv_pixels
// (the register budget of conv_tile).
template <typename scalar_t, int NV, int P>
void broadcast_tile(
    const scalar_t* const* a,
    const scalar_t* b,
    int64_t b_stride,
    int64_t count,
    scalar_t* const* c,
    bool accumulate,
    const scalar_t* prefetch) {
  using V = typename NativeVec<scalar_t>::type;
  constexpr int L = NativeVec<scalar_t>::lanes;
  constexpr int N = NV * kPieces;  // native vectors per row of b
  V acc[P][N];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) acc[p][j] = accumulate ? load_vec<V>(c[p] + j * L) : V{};
  const scalar_t* row[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) row[p] = a[p];
  for (int64_t k = 0; k < count; ++k) {
    if (prefetch != nullptr) __builtin_prefetch(prefetch + k * b_stride);
    V bv[N];
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) bv[j] = load_vec<V>(b + k * b_stride + j * L);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const scalar_t s = row[p][k];
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) acc[p][j] += bv[j] * s;
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) store_vec(c[p] + j * L, acc[p][j]);
}

template <typename scalar_t>
GemmKernels<scalar_t> gemm_kernels() {
  GemmKernels<scalar_t> k;
  k.rows_per_tile = kIsaTiles.conv_pixels;
  k.broadcast[0] = &broadcast_tile<scalar_t, 1, kIsaTiles.conv_pixels>;
  k.broadcast[1] = &broadcast_tile<scalar_t, 2, kIsaTiles.conv_pixels>;
  return k;
}
