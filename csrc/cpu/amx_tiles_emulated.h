// A scalar model of the AMX tile instructions the bf16 kernels use, for
// machines without AMX: amx.cpp compiles amx_kernels.h once against this file
// and once against amx_tiles_hardware.h, so the tests run the same kernel
// source everywhere (LIGHTNING_HW_CPU_ISA=amx-emulated).
//
// The model follows Intel's ISA reference (palette 1: 8 tiles of at most 16
// rows of 64 bytes) and refuses, with an error naming the instruction and the
// rule, what the hardware would fault on: an unconfigured or out-of-range tile,
// rows over 16, bytes per row over 64 or not a multiple of 4 for TDPBF16PS, a
// dot product whose shapes disagree (dst.rows == a.rows, a.colsb == 4 * b.rows,
// dst.colsb == b.colsb) or whose tiles are not distinct. TDPBF16PS ignores
// MXCSR: bf16 inputs that are denormal read as zero, every float32 result that
// is denormal is flushed to zero, rounding is to nearest even; each pair of
// products is accumulated into the float32 element in order (k even, then
// odd), each product exact and each addition rounded once.
//
// No include guard on purpose: included inside the namespace of its variant.

struct TileShape {
  int rows;   // 0..16
  int colsb;  // bytes per row, 0..64
};

struct EmulatedTileFile {
  bool configured = false;
  TileShape shape[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};

inline EmulatedTileFile& tile_file() {
  thread_local EmulatedTileFile file;
  return file;
}

inline const TileShape& checked_tile(int tile, const char* instruction) {
  const EmulatedTileFile& file = tile_file();
  TORCH_CHECK(file.configured, "AMX emulation: ", instruction, " with no tile configuration loaded (#UD on hardware)");
  TORCH_CHECK(tile >= 0 && tile < 8, "AMX emulation: ", instruction, " names tile ", tile, " (palette 1 has 0..7)");
  const TileShape& shape = file.shape[tile];
  TORCH_CHECK(
      shape.rows > 0 && shape.colsb > 0, "AMX emulation: ", instruction, " uses tile ", tile,
      ", which the configuration leaves empty (#UD on hardware)");
  return shape;
}

// LDTILECFG: palette 1, every tile's rows and bytes per row; zeroes every tile.
inline void configure(const TileShape (&shapes)[8]) {
  EmulatedTileFile& file = tile_file();
  for (int t = 0; t < 8; ++t) {
    const TileShape& s = shapes[t];
    TORCH_CHECK(
        s.rows >= 0 && s.rows <= 16 && s.colsb >= 0 && s.colsb <= 64, "AMX emulation: LDTILECFG tile ", t,
        " with ", s.rows, " rows of ", s.colsb, " bytes (palette 1: at most 16 rows of 64 bytes; #GP on hardware)");
    TORCH_CHECK(
        (s.rows == 0) == (s.colsb == 0), "AMX emulation: LDTILECFG tile ", t, " with ", s.rows, " rows of ", s.colsb,
        " bytes: rows and bytes per row must be both zero or both set (#GP on hardware)");
    file.shape[t] = s;
  }
  std::memset(file.data, 0, sizeof(file.data));
  file.configured = true;
}

// TILERELEASE: back to the initial state (no configuration, tiles zero).
inline void release() {
  EmulatedTileFile& file = tile_file();
  file = EmulatedTileFile();
}

template <int T>
inline void zero() {
  checked_tile(T, "TILEZERO");
  std::memset(tile_file().data[T], 0, sizeof(tile_file().data[T]));
}

// TILELOADD: rows x colsb bytes from base + row * stride; the rest of the tile zero.
template <int T>
inline void load(const void* base, int64_t stride) {
  const TileShape& s = checked_tile(T, "TILELOADD");
  auto& tile = tile_file().data[T];
  std::memset(tile, 0, sizeof(tile));
  for (int r = 0; r < s.rows; ++r)
    std::memcpy(tile[r], static_cast<const uint8_t*>(base) + r * stride, s.colsb);
}

// TILESTORED: rows x colsb bytes to base + row * stride.
template <int T>
inline void store(void* base, int64_t stride) {
  const TileShape& s = checked_tile(T, "TILESTORED");
  for (int r = 0; r < s.rows; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tile_file().data[T][r], s.colsb);
}

// float32 value of a bf16 bit pattern, a denormal read as a zero of its sign (DAZ).
inline float bf16_daz(uint16_t bits) {
  if ((bits & 0x7f80) == 0) bits &= 0x8000;
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// A denormal float32 result becomes a zero of its sign (FTZ).
inline float flush_denormal(float value) {
  return std::fpclassify(value) == FP_SUBNORMAL ? std::copysign(0.0f, value) : value;
}

// TDPBF16PS dst, a, b: dst[m][n] += sum over k of a[m][2k + i] * b[k][2n + i], i = 0, 1.
template <int C, int A, int B>
inline void dpbf16ps() {
  static_assert(C != A && C != B && A != B, "TDPBF16PS needs three distinct tiles (#UD on hardware)");
  const TileShape& sc = checked_tile(C, "TDPBF16PS (dst)");
  const TileShape& sa = checked_tile(A, "TDPBF16PS (src1)");
  const TileShape& sb = checked_tile(B, "TDPBF16PS (src2)");
  TORCH_CHECK(
      sc.colsb % 4 == 0 && sa.colsb % 4 == 0 && sb.colsb % 4 == 0,
      "AMX emulation: TDPBF16PS with bytes per row not a multiple of 4 (dst ", sc.colsb, ", src1 ", sa.colsb,
      ", src2 ", sb.colsb, "; #UD on hardware)");
  TORCH_CHECK(
      sc.rows == sa.rows && sa.colsb == 4 * sb.rows && sc.colsb == sb.colsb,
      "AMX emulation: TDPBF16PS shapes disagree: dst ", sc.rows, "x", sc.colsb, " bytes, src1 ", sa.rows, "x",
      sa.colsb, ", src2 ", sb.rows, "x", sb.colsb,
      " (need dst.rows == src1.rows, src1.colsb == 4 * src2.rows, dst.colsb == src2.colsb; #UD on hardware)");
  auto& dst = tile_file().data[C];
  const auto& a = tile_file().data[A];
  const auto& b = tile_file().data[B];
  for (int m = 0; m < sc.rows; ++m) {
    for (int k = 0; k < sa.colsb / 4; ++k) {
      for (int n = 0; n < sc.colsb / 4; ++n) {
        float acc;
        std::memcpy(&acc, &dst[m][4 * n], sizeof(acc));
        for (int i = 0; i < 2; ++i) {
          uint16_t a_bits, b_bits;
          std::memcpy(&a_bits, &a[m][4 * k + 2 * i], sizeof(a_bits));
          std::memcpy(&b_bits, &b[k][4 * n + 2 * i], sizeof(b_bits));
          acc = flush_denormal(std::fma(bf16_daz(a_bits), bf16_daz(b_bits), acc));
        }
        std::memcpy(&dst[m][4 * n], &acc, sizeof(acc));
      }
    }
  }
}
