// The tile part of the bf16 AMX kernels: a 32 x 32 block of float32 sums over
// steps of 32 bf16 products, in the four accumulator tiles of a 2 x 2 register
// blocking. amx.cpp includes this file twice: after amx_tiles_hardware.h (the
// intrinsics, in a `#pragma GCC target("amx-tile,amx-bf16")` region) and after
// amx_tiles_emulated.h (a scalar model), so one source serves both; everything
// around it (packing, epilogues, threads) is plain C++ in amx.cpp.
//
// Tiles: accumulators 0..3 (rows i, columns j of the block: tile 2i + j), A
// tiles 4 and 5 (rows 0-15 and 16-31), B tiles 6 and 7 (columns 0-15, 16-31).
// Every tile is 16 rows of 64 bytes.
//
// No include guard on purpose: included inside the namespace of its variant.

inline void configure_tiles() {
  TileShape shapes[8];
  for (TileShape& shape : shapes) shape = {16, 64};
  configure(shapes);
}

inline void release_tiles() {
  release();
}

// acc (32 x 32 float32, row-major) = sum over steps s of A_s . B_s, where A_s
// is 32 rows of 32 bf16 at a + a_offsets[s] + row * a_row_stride and B_s two
// packed 16 x 16 (VNNI: [16 pairs of k][16 columns][2]) tiles at
// b + b_offsets[s] and b + b_offsets[s] + b_second (elements of 2 bytes). The
// sums stay in the tiles for all steps (the reduction order is fixed: steps in
// order, pairs of k in order).
inline void block_32x32(const AmxBlock& block, float* acc) {
  zero<0>();
  zero<1>();
  zero<2>();
  zero<3>();
  const int64_t a_bytes = block.a_row_stride * 2;
  const uint16_t* a_rows16 = block.a + 16 * block.a_row_stride;
  for (int64_t s = 0; s < block.steps; ++s) {
    const uint16_t* b = block.b + block.b_offsets[s];
    load<4>(block.a + block.a_offsets[s], a_bytes);
    load<6>(b, 64);
    load<7>(b + block.b_second, 64);
    dpbf16ps<0, 4, 6>();
    dpbf16ps<1, 4, 7>();
    load<5>(a_rows16 + block.a_offsets[s], a_bytes);
    dpbf16ps<2, 5, 6>();
    dpbf16ps<3, 5, 7>();
  }
  store<0>(acc, 32 * sizeof(float));
  store<1>(acc + 16, 32 * sizeof(float));
  store<2>(acc + 16 * 32, 32 * sizeof(float));
  store<3>(acc + 16 * 32 + 16, 32 * sizeof(float));
}

inline AmxKernels amx_kernels() {
  return {&configure_tiles, &release_tiles, &block_32x32};
}
