// The AMX tile instructions the bf16 kernels use, as the intrinsics (compiled
// inside amx.cpp's `#pragma GCC target("amx-tile,amx-bf16,...")` region); the
// same names as amx_tiles_emulated.h, which models them on any CPU. Tile numbers
// are template arguments: the instructions encode them as constants.
//
// No include guard on purpose: included inside the namespace of its variant.

struct TileShape {
  int rows;   // 0..16
  int colsb;  // bytes per row, 0..64
};

// The 64-byte operand of LDTILECFG (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void configure(const TileShape (&shapes)[8]) {
  TileConfig config{};
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = static_cast<uint16_t>(shapes[t].colsb);
    config.rows[t] = static_cast<uint8_t>(shapes[t].rows);
  }
  _tile_loadconfig(&config);
}

inline void release() {
  _tile_release();
}

// gcc's tile intrinsics paste the tile number into the instruction text, so each
// tile number the kernels use gets its own specialisation (a literal digit).
template <int T>
void zero();
template <int T>
void load(const void* base, int64_t stride);
template <int T>
void store(void* base, int64_t stride);
template <int C, int A, int B>
void dpbf16ps();

#define LIGHTNING_HW_TILE_ACCESS(T)                                                      \
  template <>                                                                            \
  inline void zero<T>() {                                                                \
    _tile_zero(T);                                                                       \
  }                                                                                      \
  template <>                                                                            \
  inline void load<T>(const void* base, int64_t stride) {                                \
    _tile_loadd(T, base, stride);                                                        \
  }                                                                                      \
  template <>                                                                            \
  inline void store<T>(void* base, int64_t stride) {                                     \
    _tile_stored(T, base, stride);                                                       \
  }
LIGHTNING_HW_TILE_ACCESS(0)
LIGHTNING_HW_TILE_ACCESS(1)
LIGHTNING_HW_TILE_ACCESS(2)
LIGHTNING_HW_TILE_ACCESS(3)
LIGHTNING_HW_TILE_ACCESS(4)
LIGHTNING_HW_TILE_ACCESS(5)
LIGHTNING_HW_TILE_ACCESS(6)
LIGHTNING_HW_TILE_ACCESS(7)
#undef LIGHTNING_HW_TILE_ACCESS

#define LIGHTNING_HW_TILE_DOT(C, A, B) \
  template <>                          \
  inline void dpbf16ps<C, A, B>() {    \
    _tile_dpbf16ps(C, A, B);           \
  }
LIGHTNING_HW_TILE_DOT(0, 4, 6)
LIGHTNING_HW_TILE_DOT(1, 4, 7)
LIGHTNING_HW_TILE_DOT(2, 5, 6)
LIGHTNING_HW_TILE_DOT(3, 5, 7)
#undef LIGHTNING_HW_TILE_DOT
