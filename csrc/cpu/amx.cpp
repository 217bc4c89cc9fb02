// The "amx" route of linear_relu and conv2d for bfloat16 (see amx.h): every
// GEMM runs as 32 x 32 blocks of float32 sums in AMX tiles (amx_kernels.h, the
// only code that touches tiles, compiled for the hardware and for the scalar
// model); this file lays the operands out for the tiles and stores the sums.
//
// Operand layouts. A tile reads 16 rows of 32 bf16 (64 bytes) at any row
// stride, so an operand whose reduction index is contiguous is read in place
// (the "A" side) wherever its rows are zero-padded to whole steps of 32; the
// other operand (the "B" side) is packed into 1 KiB tiles of 16 pairs of
// reduction indices x 16 columns x 2 (the layout TDPBF16PS multiplies).
//
// Convolutions as direct convolutions on tiles. The source is copied once per
// call into zero-padded planes, split by the stride into stride_h x stride_w
// phases: tap (kh, kw) of output pixel (oh, ow) reads phase (kh*d % s) at
// (oh + kh*d / s, ow + kw*d / s). With output pixels numbered over the phase
// plane's width (p = oh * plane_w + ow, the columns past out_w computed and
// dropped), every tap is a constant offset from p: the rows of an A tile are
// 16 consecutive p, read in place whatever the stride and dilation. The
// forward and the input gradient (a stride-1 convolution of grad_output
// zero-stuffed by the stride, flipped kernel) read channels-last planes and
// reduce over (tap, 32 channels); the weight gradient reads channel-major
// planes, rows of channels, and reduces over pixels (each tap its own GEMM),
// against grad_output packed over pixels.
//
// Parallelism: blocks of output are independent items, each summed whole by
// one thread in a fixed order, so results do not depend on the thread count.
#include "cpu/amx.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/tile_kernels.h"

namespace lightning_hw {
namespace cpu {
namespace amx {
namespace {

// One 32 x 32 block for block_32x32 (amx_kernels.h); offsets count elements.
struct AmxBlock {
  const uint16_t* a;
  const int64_t* a_offsets;  // per step
  int64_t a_row_stride;
  const uint16_t* b;
  const int64_t* b_offsets;  // per step
  int64_t b_second;          // from a B tile to the next 16 columns' tile
  int64_t steps;
};

struct AmxKernels {
  void (*configure)();
  void (*release)();
  void (*block)(const AmxBlock&, float*);
};

}  // namespace
}  // namespace amx
}  // namespace cpu
}  // namespace lightning_hw

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")
namespace lightning_hw {
namespace cpu {
namespace amx {
namespace {
namespace hardware {
#include "cpu/amx_tiles_hardware.h"
#include "cpu/amx_kernels.h"
}  // namespace hardware
}  // namespace
}  // namespace amx
}  // namespace cpu
}  // namespace lightning_hw
#pragma GCC pop_options

namespace lightning_hw {
namespace cpu {
namespace amx {
namespace {
namespace emulated {
#include "cpu/amx_tiles_emulated.h"
#include "cpu/amx_kernels.h"
}  // namespace emulated

constexpr int64_t kBlock = 32;          // rows and columns of a block
constexpr int64_t kStep = 32;           // reduction indices per tile step
constexpr int64_t kTileElements = 512;  // bf16 in a packed B tile (1 KiB)

const AmxKernels& kernels() {
  static const AmxKernels chosen =
      tile_source() == TileSource::kHardware ? hardware::amx_kernels() : emulated::amx_kernels();
  return chosen;
}

// Runs items [0, count) in parallel: every thread loads the tile configuration
// once, computes block_of(item) into a 32 x 32 float32 buffer and hands it to
// store(item, sums), and releases the tiles when its items are done.
template <typename BlockOf, typename Store>
void run_blocks(int64_t count, const BlockOf& block_of, const Store& store) {
  TORCH_CHECK(tile_source() != TileSource::kNone, "lightning_hw: the amx route needs AMX tiles (or amx-emulated)");
  const AmxKernels& k = kernels();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float sums[kBlock * kBlock];
    k.configure();
    for (int64_t item = begin; item < end; ++item) {
      k.block(block_of(item), sums);
      store(item, static_cast<const float*>(sums));
    }
    k.release();
  });
}

const uint16_t* bits(const at::Tensor& tensor) {
  return reinterpret_cast<const uint16_t*>(tensor.const_data_ptr<at::BFloat16>());
}

// A zero-filled buffer of bf16 bit patterns.
at::Tensor zeroed_bits(int64_t elements) {
  return at::zeros({elements}, at::TensorOptions().dtype(at::kBFloat16));
}

uint16_t* mutable_bits(at::Tensor& tensor) {
  return reinterpret_cast<uint16_t*>(tensor.mutable_data_ptr<at::BFloat16>());
}

// Packs the (K x N) matrix element(k, n) = src[k * k_stride + n * n_stride]
// into B tiles at out: tile (n block of 16, step) at out + nb * block_stride +
// step * 512, each [16 pairs of k][16 columns][2]. out must hold zeros: they
// stay past K and N.
void pack_b_into(
    uint16_t* out, int64_t block_stride, const uint16_t* src, int64_t k_size, int64_t n_size, int64_t k_stride,
    int64_t n_stride) {
  const int64_t steps = ceil_div(k_size, kStep);
  const int64_t n_blocks = ceil_div(n_size, 16);
  at::parallel_for(0, n_blocks * steps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nb = item / steps, step = item % steps;
      uint16_t* tile = out + nb * block_stride + step * kTileElements;
      const int64_t n_count = std::min<int64_t>(16, n_size - nb * 16);
      const int64_t k_count = std::min<int64_t>(kStep, k_size - step * kStep);
      const uint16_t* origin = src + step * kStep * k_stride + nb * 16 * n_stride;
      // Read along whichever index is contiguous in the source.
      if (n_stride == 1) {
        for (int64_t k = 0; k < k_count; ++k)
          for (int64_t n = 0; n < n_count; ++n) tile[((k / 2) * 16 + n) * 2 + k % 2] = origin[k * k_stride + n];
      } else {
        for (int64_t n = 0; n < n_count; ++n)
          for (int64_t k = 0; k < k_count; ++k)
            tile[((k / 2) * 16 + n) * 2 + k % 2] = origin[k * k_stride + n * n_stride];
      }
    }
  });
}

// pack_b_into a new buffer: packed[n block of 16][step][tile], N padded to
// whole pairs of 16-column blocks (zeros).
at::Tensor pack_b(const uint16_t* src, int64_t k_size, int64_t n_size, int64_t k_stride, int64_t n_stride) {
  const int64_t steps = ceil_div(k_size, kStep);
  at::Tensor packed = zeroed_bits(2 * ceil_div(n_size, kBlock) * steps * kTileElements);
  pack_b_into(mutable_bits(packed), steps * kTileElements, src, k_size, n_size, k_stride, n_stride);
  return packed;
}

// An A operand: rows x k_size, element (r, k) at src[r * r_stride + k * k_stride],
// as tile rows of whole steps of 32 (zeros past k_size) in whole blocks of 32
// rows (zeros past the last). Read in place where its rows already are whole
// steps (k contiguous, k_size a multiple of 32), the last partial block from a
// padded copy; else all from a padded copy.
struct ARows {
  const uint16_t* data;  // block mb starts at data + mb * 32 * stride
  int64_t stride;        // elements from row to row in data
  int64_t full_blocks;   // blocks read from data; the one after them from copy
  at::Tensor copy;       // the padded copy: all of the rows, or that last block
  int64_t copy_stride;

  const uint16_t* block(int64_t mb) const {
    return mb < full_blocks ? data + mb * kBlock * stride : bits(copy);
  }
  int64_t block_stride(int64_t mb) const {
    return mb < full_blocks ? stride : copy_stride;
  }
};

ARows a_rows(const uint16_t* src, int64_t rows, int64_t k_size, int64_t r_stride, int64_t k_stride) {
  const auto padded_copy = [&](int64_t first_row, int64_t row_count, int64_t stride) {
    at::Tensor copy = zeroed_bits(round_up(row_count, kBlock) * stride);
    uint16_t* out = mutable_bits(copy);
    at::parallel_for(0, row_count, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint16_t* row = src + (first_row + r) * r_stride;
        if (k_stride == 1) {
          std::memcpy(out + r * stride, row, k_size * sizeof(uint16_t));
        } else {
          for (int64_t k = 0; k < k_size; ++k) out[r * stride + k] = row[k * k_stride];
        }
      }
    });
    return copy;
  };
  if (k_stride == 1 && k_size > 0 && k_size % kStep == 0) {
    const int64_t full_blocks = rows / kBlock;
    const int64_t tail_rows = rows - full_blocks * kBlock;
    return {src, r_stride, full_blocks,
            tail_rows > 0 ? padded_copy(full_blocks * kBlock, tail_rows, k_size) : at::Tensor(), k_size};
  }
  const int64_t stride = round_up(std::max<int64_t>(k_size, 1), kStep);
  at::Tensor copy = padded_copy(0, rows, stride);
  return {bits(copy), stride, ceil_div(rows, kBlock), copy, stride};
}

// C = A . B over whole blocks: A (m_size rows), B packed by pack_b for n_size
// columns, `steps` of the reduction; store(row, column, sum) stores each
// element of C. Items run column pairs outermost, so a thread's B panel stays
// in cache across its row blocks.
template <typename Store>
void gemm(const ARows& a, int64_t m_size, const uint16_t* b, int64_t n_size, int64_t steps, const Store& store) {
  const int64_t m_blocks = ceil_div(m_size, kBlock), n_pairs = ceil_div(n_size, kBlock);
  std::vector<int64_t> a_offsets(steps), b_offsets(steps);
  for (int64_t s = 0; s < steps; ++s) {
    a_offsets[s] = s * kStep;
    b_offsets[s] = s * kTileElements;
  }
  const int64_t panel = steps * kTileElements;  // one 16-column block
  run_blocks(
      m_blocks * n_pairs,
      [&](int64_t item) {
        const int64_t mb = item % m_blocks, np = item / m_blocks;
        return AmxBlock{
            a.block(mb), a_offsets.data(), a.block_stride(mb), b + 2 * np * panel, b_offsets.data(), panel, steps};
      },
      [&](int64_t item, const float* sums) {
        const int64_t m0 = (item % m_blocks) * kBlock, n0 = (item / m_blocks) * kBlock;
        for (int64_t i = 0; i < kBlock && m0 + i < m_size; ++i)
          for (int64_t j = 0; j < kBlock && n0 + j < n_size; ++j) store(m0 + i, n0 + j, sums[i * kBlock + j]);
      });
}

at::BFloat16* out_bits(at::Tensor& tensor) {
  return tensor.mutable_data_ptr<at::BFloat16>();
}

std::vector<float> as_floats(const at::Tensor& tensor) {
  const at::Tensor values = tensor.to(at::kFloat).contiguous();
  return std::vector<float>(values.const_data_ptr<float>(), values.const_data_ptr<float>() + values.numel());
}

// ---- convolutions ----

// Zero-padded, phase-split planes of a (N, C, H, W) source: plane position
// (i, j) of phase (ph, pw) holds virtual position (i * phases_h + ph, j *
// phases_w + pw), and virtual row v is source row (v - offset_h) / step_h
// when that divides and is inside (step > 1: zero-stuffing), else zero.
struct Planes {
  int64_t phases_h, phases_w, rows, cols;  // per phase: rows x cols positions
  int64_t offset_h, offset_w, step_h, step_w;
  int64_t size() const { return rows * cols + kBlock + cols; }  // + the reach of the last blocks
};

int64_t source_index(int64_t virtual_index, int64_t offset, int64_t step, int64_t extent) {
  const int64_t shifted = virtual_index - offset;
  if (shifted < 0 || shifted % step != 0 || shifted / step >= extent) return -1;
  return shifted / step;
}

// The source column (or row) of each plane column of each phase: -1 where the
// plane holds a zero. `phases` phases of `count` positions each.
std::vector<int64_t> source_indices(int64_t phases, int64_t count, int64_t offset, int64_t step, int64_t extent) {
  std::vector<int64_t> map(phases * count);
  for (int64_t phase = 0; phase < phases; ++phase)
    for (int64_t j = 0; j < count; ++j) map[phase * count + j] = source_index(j * phases + phase, offset, step, extent);
  return map;
}

// Channels-last planes [n][phase][position][channel], channels padded to
// `channels` (whole steps of 32). Each source row is read along its pixels,
// one channel at a time, and written across the channels of the plane row.
at::Tensor channels_last_planes(const at::Tensor& src4, const Planes& g, int64_t channels) {
  const int64_t batch = src4.size(0), c_size = src4.size(1), h = src4.size(2), w = src4.size(3);
  const int64_t phases = g.phases_h * g.phases_w, plane = g.size() * channels;
  at::Tensor planes = zeroed_bits(batch * phases * plane);
  uint16_t* out = mutable_bits(planes);
  const uint16_t* in = bits(src4);
  const int64_t sn = src4.stride(0), sc = src4.stride(1), sh = src4.stride(2), sw = src4.stride(3);
  const std::vector<int64_t> rows = source_indices(g.phases_h, g.rows, g.offset_h, g.step_h, h);
  const std::vector<int64_t> cols = source_indices(g.phases_w, g.cols, g.offset_w, g.step_w, w);
  at::parallel_for(0, batch * phases * g.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (phases * g.rows), phase = (item / g.rows) % phases, i = item % g.rows;
      const int64_t y = rows[(phase / g.phases_w) * g.rows + i];
      if (y < 0) continue;
      uint16_t* row = out + (n * phases + phase) * plane + i * g.cols * channels;
      const int64_t* x = &cols[(phase % g.phases_w) * g.cols];
      for (int64_t c = 0; c < c_size; ++c) {
        const uint16_t* source = in + n * sn + c * sc + y * sh;
        for (int64_t j = 0; j < g.cols; ++j)
          if (x[j] >= 0) row[j * channels + c] = source[x[j] * sw];
      }
    }
  });
  return planes;
}

bool finite(uint16_t bf16_bits) {
  return (bf16_bits & 0x7f80) != 0x7f80;
}

// Channel-major planes [n][channel][phase][position], channels padded to
// `channels`; `all_finite` says whether every value copied was finite.
at::Tensor channel_major_planes(const at::Tensor& src4, const Planes& g, int64_t channels, bool& all_finite) {
  const int64_t batch = src4.size(0), c_size = src4.size(1), h = src4.size(2), w = src4.size(3);
  const int64_t phases = g.phases_h * g.phases_w, plane = g.size();
  at::Tensor planes = zeroed_bits(batch * channels * phases * plane);
  uint16_t* out = mutable_bits(planes);
  const uint16_t* in = bits(src4);
  const int64_t sn = src4.stride(0), sc = src4.stride(1), sh = src4.stride(2), sw = src4.stride(3);
  const std::vector<int64_t> rows = source_indices(g.phases_h, g.rows, g.offset_h, g.step_h, h);
  const std::vector<int64_t> cols = source_indices(g.phases_w, g.cols, g.offset_w, g.step_w, w);
  std::atomic<bool> finite_so_far{true};
  at::parallel_for(0, batch * c_size * phases, 1, [&](int64_t begin, int64_t end) {
    bool finite_here = true;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (c_size * phases), c = (item / phases) % c_size, phase = item % phases;
      uint16_t* dst = out + ((n * channels + c) * phases + phase) * plane;
      const int64_t* x = &cols[(phase % g.phases_w) * g.cols];
      for (int64_t i = 0; i < g.rows; ++i) {
        const int64_t y = rows[(phase / g.phases_w) * g.rows + i];
        if (y < 0) continue;
        const uint16_t* source = in + n * sn + c * sc + y * sh;
        for (int64_t j = 0; j < g.cols; ++j) {
          if (x[j] < 0) continue;
          const uint16_t value = source[x[j] * sw];
          finite_here = finite_here && finite(value);
          dst[i * g.cols + j] = value;
        }
      }
    }
    if (!finite_here) finite_so_far = false;
  });
  all_finite = finite_so_far;
  return planes;
}

// The planes a convolution of stride (s_h, s_w), dilation (d_h, d_w) and
// kernel (k_h, k_w) reads for out_h x out_w outputs, over a source whose
// virtual rows map as Planes says: tap kh reads plane row oh + kh * d_h / s_h
// of phase kh * d_h % s_h.
Planes conv_planes(int64_t out_h, int64_t out_w, int64_t k_h, int64_t k_w, int64_t s_h, int64_t s_w, int64_t d_h,
                   int64_t d_w, int64_t offset_h, int64_t offset_w, int64_t step_h, int64_t step_w) {
  return Planes{s_h, s_w, out_h + (k_h - 1) * d_h / s_h, out_w + (k_w - 1) * d_w / s_w,
                offset_h, offset_w, step_h, step_w};
}

// Offset of tap (kh, kw) from output pixel p (position units of one plane), and its phase.
struct Tap {
  int64_t phase, offset;
};

std::vector<Tap> taps_of(const Planes& g, int64_t k_h, int64_t k_w, int64_t d_h, int64_t d_w) {
  std::vector<Tap> taps;
  for (int64_t kh = 0; kh < k_h; ++kh)
    for (int64_t kw = 0; kw < k_w; ++kw)
      taps.push_back({(kh * d_h % g.phases_h) * g.phases_w + kw * d_w % g.phases_w,
                      (kh * d_h / g.phases_h) * g.cols + kw * d_w / g.phases_w});
  return taps;
}

// out (N, O, out_h, out_w) = bias + the direct convolution of the planes
// (channels-last, `channels` per position) with B tiles packed as
// [16 outputs][tap][channel step] (weights_packed), written as bf16.
void planes_conv(const at::Tensor& planes, const Planes& g, int64_t channels, const std::vector<Tap>& taps,
                 const at::Tensor& weights_packed, const std::vector<float>& bias, int64_t out_channels,
                 int64_t out_h, int64_t out_w, at::Tensor& out4) {
  const int64_t batch = out4.size(0);
  const int64_t c_steps = channels / kStep, steps = static_cast<int64_t>(taps.size()) * c_steps;
  const int64_t phases = g.phases_h * g.phases_w, plane = g.size() * channels;
  std::vector<int64_t> a_offsets(steps), b_offsets(steps);
  for (size_t t = 0; t < taps.size(); ++t)
    for (int64_t cs = 0; cs < c_steps; ++cs) {
      a_offsets[t * c_steps + cs] = taps[t].phase * plane + taps[t].offset * channels + cs * kStep;
      b_offsets[t * c_steps + cs] = (t * c_steps + cs) * kTileElements;
    }
  const int64_t positions = out_h * g.cols;  // p = oh * cols + ow; ow >= out_w dropped
  const int64_t m_blocks = ceil_div(positions, kBlock), n_pairs = ceil_div(out_channels, kBlock);
  const int64_t panel = steps * kTileElements;
  const uint16_t* a = bits(planes);
  const uint16_t* b = bits(weights_packed);
  at::BFloat16* out = out_bits(out4);
  const int64_t on = out4.stride(0), oc = out4.stride(1), oy = out4.stride(2), ox = out4.stride(3);
  run_blocks(
      batch * m_blocks * n_pairs,
      [&](int64_t item) {
        const int64_t n = item / (m_blocks * n_pairs), mb = item % m_blocks, np = (item / m_blocks) % n_pairs;
        return AmxBlock{a + n * phases * plane + mb * kBlock * channels, a_offsets.data(), channels,
                        b + 2 * np * panel, b_offsets.data(), panel, steps};
      },
      [&](int64_t item, const float* sums) {
        const int64_t n = item / (m_blocks * n_pairs), mb = item % m_blocks, np = (item / m_blocks) % n_pairs;
        // Along the block's pixels, one output channel at a time: whole runs of each NCHW row.
        for (int64_t j = 0; j < kBlock && np * kBlock + j < out_channels; ++j) {
          const int64_t o = np * kBlock + j;
          const float add = bias.empty() ? 0.f : bias[o];
          at::BFloat16* channel = out + n * on + o * oc;
          for (int64_t r = 0; r < kBlock; ++r) {
            const int64_t p = mb * kBlock + r, oh = p / g.cols, ow = p % g.cols;
            if (p < positions && ow < out_w) channel[oh * oy + ow * ox] = at::BFloat16(sums[r * kBlock + j] + add);
          }
        }
      });
}

// Weights (O, C, KH, KW) as B tiles for planes_conv: element (channel c of
// tap t, output o). The input gradient's (transposed) swaps C and O and flips
// the kernel.
at::Tensor pack_conv_weights(const at::Tensor& weight, bool transposed, int64_t channels) {
  const at::Tensor w = weight.contiguous();
  const int64_t o_size = w.size(0), c_size = w.size(1), taps = w.size(2) * w.size(3);
  const int64_t reduce = transposed ? o_size : c_size, outputs = transposed ? c_size : o_size;
  const int64_t c_steps = channels / kStep;
  const int64_t n_blocks = 2 * ceil_div(outputs, kBlock);
  at::Tensor packed = zeroed_bits(n_blocks * taps * c_steps * kTileElements);
  uint16_t* dst = mutable_bits(packed);
  const uint16_t* src = bits(w);
  // Element (k = reduced channel, n = output) of each tap, its tiles at
  // [n block][tap][channel step].
  const int64_t k_stride = transposed ? c_size * taps : taps, n_stride = transposed ? taps : c_size * taps;
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t source_tap = transposed ? taps - 1 - t : t;
    pack_b_into(dst + t * c_steps * kTileElements, taps * c_steps * kTileElements, src + source_tap, reduce, outputs,
                k_stride, n_stride);
  }
  return packed;
}

}  // namespace

void emulation_fault(const std::string& case_name) {
  using namespace emulated;
  struct Reset {  // whatever happens, this thread's model ends unconfigured
    ~Reset() { release(); }
  } reset;
  TileShape shapes[8];
  for (TileShape& shape : shapes) shape = {16, 64};
  alignas(64) uint8_t memory[16 * 64] = {};
  release();
  if (case_name == "rows") {
    shapes[0] = {17, 64};
    configure(shapes);
  } else if (case_name == "bytes") {
    shapes[0] = {16, 68};
    configure(shapes);
  } else if (case_name == "half-empty") {
    shapes[3] = {0, 64};
    configure(shapes);
  } else if (case_name == "unconfigured") {
    load<0>(memory, 64);
  } else if (case_name == "empty") {
    shapes[5] = {0, 0};
    configure(shapes);
    load<5>(memory, 64);
  } else if (case_name == "released") {
    configure(shapes);
    release();
    dpbf16ps<0, 4, 6>();
  } else if (case_name == "shapes") {
    shapes[6] = {8, 64};
    configure(shapes);
    dpbf16ps<0, 4, 6>();
  } else if (case_name == "multiple of 4") {
    shapes[0] = shapes[6] = {16, 62};
    configure(shapes);
    dpbf16ps<0, 4, 6>();
  }
  TORCH_CHECK(false, "_amx_emulation_fault: no fault case '", case_name, "'");
}

std::vector<std::string> hardware_missing() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  std::vector<std::string> missing;
  const bool leaf7 = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx);
  if (!leaf7 || (edx & (1u << 24)) == 0) missing.push_back("amx_tile");
  if (!leaf7 || (edx & (1u << 22)) == 0) missing.push_back("amx_bf16");
  // Linux hands out the tile data state only on request, once per process;
  // without it the first tile instruction raises SIGILL.
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  if (missing.empty() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    missing.push_back("the tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM refused)");
  return missing;
}

TileSource tile_source() {
  static const TileSource source = [] {
    const std::string variant = cpu_isa_name();
    return variant == "amx" ? TileSource::kHardware : variant == "amx-emulated" ? TileSource::kEmulated
                                                                               : TileSource::kNone;
  }();
  return source;
}

std::string tiles_refusal() {
  if (tile_source() != TileSource::kNone) return "";
  return c10::str(
      "amx needs AMX tiles: this process runs the ", cpu_isa_name(),
      " kernels (LIGHTNING_HW_CPU_ISA=amx where the CPU has AMX-BF16, amx-emulated on any CPU)");
}

bool conv_can_run(const Conv2dShape& s) {
  return s.groups == 1;
}

void linear_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out) {
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = w.size(0);
  const std::vector<float> bias_values = bias.defined() ? as_floats(bias) : std::vector<float>();
  at::BFloat16* dst = out_bits(out);
  const auto store_relu = [&](int64_t r, int64_t o, float sum) {
    dst[r * out_features + o] = at::BFloat16(std::max(sum + (bias_values.empty() ? 0.f : bias_values[o]), 0.f));
  };
  const int64_t steps = ceil_div(in_features, kStep);
  // The larger operand is read in place (rows padded), the smaller packed into B tiles.
  const bool rows_as_a = rows >= out_features;
  const at::Tensor& a_src = rows_as_a ? x : w;
  const at::Tensor& b_src = rows_as_a ? w : x;
  const int64_t m_size = a_src.size(0), n_size = b_src.size(0);
  const ARows a = a_rows(bits(a_src), m_size, in_features, in_features, 1);
  const at::Tensor b = pack_b(bits(b_src), in_features, n_size, 1, in_features);
  gemm(a, m_size, bits(b), n_size, steps, [&](int64_t m, int64_t n, float sum) {
    if (rows_as_a) {
      store_relu(m, n, sum);
    } else {
      store_relu(n, m, sum);
    }
  });
}

void linear_input_grad(const at::Tensor& grad_pre, const at::Tensor& w, at::Tensor& grad_input) {
  // grad_input (rows, in) = grad_pre (rows, out) . w (out, in): reduce over out.
  const int64_t rows = grad_pre.size(0), out_features = w.size(0), in_features = w.size(1);
  const ARows a = a_rows(bits(grad_pre), rows, out_features, out_features, 1);
  const at::Tensor b = pack_b(bits(w), out_features, in_features, in_features, 1);
  at::BFloat16* dst = out_bits(grad_input);
  gemm(a, rows, bits(b), in_features, ceil_div(out_features, kStep),
       [&](int64_t m, int64_t n, float sum) { dst[m * in_features + n] = at::BFloat16(sum); });
}

void linear_weight_grad(const at::Tensor& grad_pre, const at::Tensor& x, at::Tensor& grad_weight) {
  // grad_weight (out, in) = grad_pre^T (out, rows) . x (rows, in): reduce over rows.
  const int64_t rows = grad_pre.size(0), out_features = grad_pre.size(1), in_features = x.size(1);
  const ARows a = a_rows(bits(grad_pre), out_features, rows, 1, out_features);
  const at::Tensor b = pack_b(bits(x), rows, in_features, in_features, 1);
  at::BFloat16* dst = out_bits(grad_weight);
  gemm(a, out_features, bits(b), in_features, ceil_div(rows, kStep),
       [&](int64_t m, int64_t n, float sum) { dst[m * in_features + n] = at::BFloat16(sum); });
}

void conv_forward(
    const at::Tensor& input4, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Conv2dShape& s,
    at::Tensor& out4) {
  const Planes g = conv_planes(
      s.out_h, s.out_w, s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.dilation_h, s.dilation_w, s.pad_top,
      s.pad_left, 1, 1);
  const int64_t channels = round_up(s.in_channels, kStep);
  const at::Tensor planes = channels_last_planes(input4, g, channels);
  const at::Tensor packed = pack_conv_weights(weight, /*transposed=*/false, channels);
  const std::vector<float> bias_values = bias.has_value() ? as_floats(*bias) : std::vector<float>();
  planes_conv(planes, g, channels, taps_of(g, s.kernel_h, s.kernel_w, s.dilation_h, s.dilation_w), packed,
              bias_values, s.out_channels, s.out_h, s.out_w, out4);
}

void conv_input_grad(const at::Tensor& grad4, const at::Tensor& weight, const Conv2dShape& s, at::Tensor& grad_input4) {
  // A stride-1 convolution of grad_output, zero-stuffed by the stride and
  // offset by (kernel extent - 1 - padding), with the flipped kernel.
  const Planes g = conv_planes(
      s.in_h, s.in_w, s.kernel_h, s.kernel_w, 1, 1, s.dilation_h, s.dilation_w,
      (s.kernel_h - 1) * s.dilation_h - s.pad_top, (s.kernel_w - 1) * s.dilation_w - s.pad_left, s.stride_h,
      s.stride_w);
  const int64_t channels = round_up(s.out_channels, kStep);
  const at::Tensor planes = channels_last_planes(grad4, g, channels);
  const at::Tensor packed = pack_conv_weights(weight, /*transposed=*/true, channels);
  planes_conv(planes, g, channels, taps_of(g, s.kernel_h, s.kernel_w, s.dilation_h, s.dilation_w), packed, {},
              s.in_channels, s.in_h, s.in_w, grad_input4);
}

bool conv_weight_grad(const at::Tensor& grad4, const at::Tensor& input4, const Conv2dShape& s, at::Tensor& grad_weight) {
  // Per tap: grad_weight[o][c][tap] = sum over images and pixels p of
  // input planes[c][p + tap offset] * grad_output[o][p]: A = channel-major input
  // planes (rows of channels, read in place), B = grad_output packed over pixels.
  const Planes g = conv_planes(
      s.out_h, s.out_w, s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.dilation_h, s.dilation_w, s.pad_top,
      s.pad_left, 1, 1);
  const int64_t channels = round_up(s.in_channels, kBlock);
  bool all_finite = true;
  const at::Tensor planes = channel_major_planes(input4, g, channels, all_finite);
  if (!all_finite) return false;
  const int64_t phases = g.phases_h * g.phases_w, plane = g.size();
  const int64_t positions = s.out_h * g.cols, pixel_steps = ceil_div(positions, kStep);
  // grad_output over the same positions (zero past out_w and past the last row).
  const int64_t batch = s.batch;
  const int64_t n_blocks = 2 * ceil_div(s.out_channels, kBlock);
  at::Tensor grad_tiles = zeroed_bits(batch * n_blocks * pixel_steps * kTileElements);
  {
    uint16_t* dst = mutable_bits(grad_tiles);
    const uint16_t* src = bits(grad4);
    const int64_t gn = grad4.stride(0), gc = grad4.stride(1), gy = grad4.stride(2), gx = grad4.stride(3);
    at::parallel_for(0, batch * s.out_channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / s.out_channels, o = item % s.out_channels;
        uint16_t* image = dst + n * n_blocks * pixel_steps * kTileElements;
        for (int64_t oh = 0; oh < s.out_h; ++oh)
          for (int64_t ow = 0; ow < s.out_w; ++ow) {
            const int64_t p = oh * g.cols + ow, step = p / kStep, k = p % kStep;
            image[((o / 16) * pixel_steps + step) * kTileElements + ((k / 2) * 16 + o % 16) * 2 + k % 2] =
                src[n * gn + o * gc + oh * gy + ow * gx];
          }
      }
    });
  }
  const std::vector<Tap> taps = taps_of(g, s.kernel_h, s.kernel_w, s.dilation_h, s.dilation_w);
  const int64_t tap_count = static_cast<int64_t>(taps.size());
  const int64_t steps = batch * pixel_steps;
  const int64_t image_planes = channels * phases * plane;
  std::vector<int64_t> a_offsets(tap_count * steps), b_offsets(steps);
  for (int64_t t = 0; t < tap_count; ++t)
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t ps = 0; ps < pixel_steps; ++ps)
        a_offsets[t * steps + n * pixel_steps + ps] =
            n * image_planes + taps[t].phase * plane + taps[t].offset + ps * kStep;
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t ps = 0; ps < pixel_steps; ++ps)
      b_offsets[n * pixel_steps + ps] = (n * n_blocks * pixel_steps + ps) * kTileElements;
  const int64_t m_blocks = channels / kBlock, n_pairs = n_blocks / 2;
  const uint16_t* a = bits(planes);
  const uint16_t* b = bits(grad_tiles);
  at::BFloat16* gw = out_bits(grad_weight);
  const int64_t panel = pixel_steps * kTileElements;  // next 16 outputs of the same image
  run_blocks(
      tap_count * m_blocks * n_pairs,
      [&](int64_t item) {
        const int64_t t = item / (m_blocks * n_pairs), mb = item % m_blocks, np = (item / m_blocks) % n_pairs;
        return AmxBlock{a + mb * kBlock * phases * plane, a_offsets.data() + t * steps, phases * plane,
                        b + 2 * np * panel, b_offsets.data(), panel, steps};
      },
      [&](int64_t item, const float* sums) {
        const int64_t t = item / (m_blocks * n_pairs), mb = item % m_blocks, np = (item / m_blocks) % n_pairs;
        for (int64_t i = 0; i < kBlock && mb * kBlock + i < s.in_channels; ++i)
          for (int64_t j = 0; j < kBlock && np * kBlock + j < s.out_channels; ++j)
            gw[((np * kBlock + j) * s.in_channels + mb * kBlock + i) * tap_count + t] =
                at::BFloat16(sums[i * kBlock + j]);
      });
  return true;
}

}  // namespace amx
}  // namespace cpu
}  // namespace lightning_hw
