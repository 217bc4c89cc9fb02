// What conv2d's CPU kernel families (conv2d_direct.cpp, conv2d_planar.cpp,
// conv2d_depthwise.cpp) share: the geometry of their zero-padded sources, the
// zero-padded planar view that the planar and depthwise kernels copy their rows
// from, and the split of a weight gradient's reduction into parts.
//
// Weight gradients: the range of output pixels is split into a number of parts
// fixed by the shape alone; each part sums into its own buffer and the parts
// are added in order, so the result is bitwise reproducible whatever the
// thread count or scheduling.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "conv2d_geometry.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace lightning_hw {
namespace cpu {

// Rows and columns of the zero-padded input that the forward and the weight
// gradient read. Padded only as far as the taps reach: bottom/right rows the
// kernel never touches are left out, and 'same' padding comes out asymmetric
// by itself.
inline int64_t padded_input_h(const Conv2dShape& s) {
  return (s.out_h - 1) * s.stride_h + (s.kernel_h - 1) * s.dilation_h + 1;
}

inline int64_t padded_input_w(const Conv2dShape& s) {
  return (s.out_w - 1) * s.stride_w + (s.kernel_w - 1) * s.dilation_w + 1;
}

// The input gradient is a stride-1 convolution (same dilation, kernel flipped,
// in/out channels swapped) of grad_output, zero-stuffed by the stride and
// padded by (kernel extent - 1 - padding): a source of h x w pixels where
// grad_output pixel (y, x) sits at (offset_h + y * stride_h, offset_w + x * stride_w).
struct InputGradSource {
  int64_t h, w, offset_h, offset_w;
};

inline InputGradSource input_grad_source(const Conv2dShape& s) {
  return {
      s.in_h + (s.kernel_h - 1) * s.dilation_h, s.in_w + (s.kernel_w - 1) * s.dilation_w,
      (s.kernel_h - 1) * s.dilation_h - s.pad_top, (s.kernel_w - 1) * s.dilation_w - s.pad_left};
}

// A zero-padded (and possibly zero-stuffed) planar view of a 4-D (N, C, H, W)
// tensor of any strides: source pixel (h, w) sits at padded row
// offset_h + h * step_h, column offset_w + w * step_w (a negative offset crops);
// every other padded element is zero. The planar kernels copy the rows they
// need into a small per-thread buffer, which stays in cache: the padding costs
// no memory traffic beyond one read of the source.
template <typename scalar_t>
struct PaddedPlanes {
  const scalar_t* data;
  int64_t h, w, sn, sc, sh, sw;
  int64_t offset_h, offset_w, step_h, step_w;

  PaddedPlanes(const at::Tensor& src, int64_t offset_h, int64_t offset_w, int64_t step_h, int64_t step_w)
      : data(src.const_data_ptr<scalar_t>()),
        h(src.size(2)),
        w(src.size(3)),
        sn(src.stride(0)),
        sc(src.stride(1)),
        sh(src.stride(2)),
        sw(src.stride(3)),
        offset_h(offset_h),
        offset_w(offset_w),
        step_h(step_h),
        step_w(step_w) {}

  // Padded rows [row_begin, row_begin + rows) and columns [0, dst_w) of
  // channels [c_begin, c_begin + channels) of image n, as
  // dst[c * dst_channel_stride + row * dst_w + column].
  void copy(
      int64_t n,
      int64_t c_begin,
      int64_t channels,
      int64_t row_begin,
      int64_t rows,
      scalar_t* dst,
      int64_t dst_w,
      int64_t dst_channel_stride) const {
    const auto [w_begin, w_end] = columns(dst_w);
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t j = 0; j < rows; ++j) {
        scalar_t* out = dst + c * dst_channel_stride + j * dst_w;
        std::memset(out, 0, dst_w * sizeof(scalar_t));
        const scalar_t* in = source_row(n, c_begin + c, row_begin + j);
        if (in == nullptr) continue;
        if (sw == 1 && step_w == 1) {
          if (w_end > w_begin)
            std::memcpy(out + offset_w + w_begin, in + w_begin, (w_end - w_begin) * sizeof(scalar_t));
        } else {
          for (int64_t x = w_begin; x < w_end; ++x) out[offset_w + x * step_w] = in[x * sw];
        }
      }
    }
  }

  // The same padded rows and columns of channels [c_begin, c_begin + channels)
  // (at most one vector) as an NHWC stripe of one 64-byte vector per pixel:
  // dst[(row * dst_w + column) * lanes + c], lanes past `channels` zero. dst
  // holds one more vector, where source pixels left of or past the columns
  // land; `offsets` is scratch.
  void copy_stripe(
      int64_t n,
      int64_t c_begin,
      int64_t channels,
      int64_t row_begin,
      int64_t rows,
      scalar_t* dst,
      int64_t dst_w,
      std::vector<int64_t>& offsets) const {
    constexpr int64_t L = lanes<scalar_t>();
    const int64_t row_size = dst_w * L;
    // Source rows [h_begin, h_end) land inside the stripe's rows.
    const int64_t h_begin = ceil_div(std::max<int64_t>(0, row_begin - offset_h), step_h);
    const int64_t h_end = std::min(h, ceil_div(std::max<int64_t>(0, row_begin + rows - offset_h), step_h));
    const auto [w_begin, w_end] = columns(dst_w);
    const bool gather = sc != 1 && sw == 1 && h_end > h_begin && w_end > w_begin;
    if (!gather) std::memset(dst, 0, rows * row_size * sizeof(scalar_t));
    if (h_end <= h_begin || w_end <= w_begin) return;
    const scalar_t* in = data + n * sn + c_begin * sc + h_begin * sh;
    const auto stripe_row = [&](int64_t hh) { return offset_h + hh * step_h - row_begin; };
    if (gather) {
      // Whole source rows, transposed by blocks in registers: only the
      // stripe's other pixels need zeros. Source columns outside the stripe
      // go to its spare vector.
      const int64_t spare = rows * row_size;
      const int64_t col_begin = offset_w + w_begin * step_w, col_end = offset_w + (w_end - 1) * step_w + 1;
      offsets.resize((h_end - h_begin) * w);
      int64_t zero_from = 0;  // stripe rows before this one are done
      for (int64_t hh = h_begin; hh < h_end; ++hh) {
        const int64_t j = stripe_row(hh);
        scalar_t* row = dst + j * row_size;
        std::memset(dst + zero_from * row_size, 0, (j - zero_from) * row_size * sizeof(scalar_t));
        if (step_w > 1) {
          std::memset(row, 0, row_size * sizeof(scalar_t));
        } else {
          std::memset(row, 0, col_begin * L * sizeof(scalar_t));
          std::memset(row + col_end * L, 0, (dst_w - col_end) * L * sizeof(scalar_t));
        }
        zero_from = j + 1;
        int64_t* o = &offsets[(hh - h_begin) * w];
        for (int64_t x = 0; x < w_begin; ++x) o[x] = spare;
        for (int64_t x = w_begin; x < w_end; ++x) o[x] = j * row_size + (offset_w + x * step_w) * L;
        for (int64_t x = w_end; x < w; ++x) o[x] = spare;
      }
      std::memset(dst + zero_from * row_size, 0, (rows - zero_from) * row_size * sizeof(scalar_t));
      const auto gather_rows = depthwise_kernels<scalar_t>().gather;
      if (sh == w) {
        gather_rows(in, sc, channels, (h_end - h_begin) * w, offsets.data(), dst);
      } else {
        for (int64_t hh = h_begin; hh < h_end; ++hh)
          gather_rows(in + (hh - h_begin) * sh, sc, channels, w, &offsets[(hh - h_begin) * w], dst);
      }
    } else if (sc == 1) {
      // Channels are the fastest source dimension (channels_last): copy pixel by pixel.
      for (int64_t hh = h_begin; hh < h_end; ++hh)
        for (int64_t x = w_begin; x < w_end; ++x)
          std::memcpy(
              dst + stripe_row(hh) * row_size + (offset_w + x * step_w) * L, in + (hh - h_begin) * sh + x * sw,
              channels * sizeof(scalar_t));
    } else {
      for (int64_t hh = h_begin; hh < h_end; ++hh)
        for (int64_t c = 0; c < channels; ++c)
          for (int64_t x = w_begin; x < w_end; ++x)
            dst[stripe_row(hh) * row_size + (offset_w + x * step_w) * L + c] =
                in[(hh - h_begin) * sh + c * sc + x * sw];
    }
  }

 private:
  // Columns of the source that land inside [0, dst_w).
  std::pair<int64_t, int64_t> columns(int64_t dst_w) const {
    return {offset_w >= 0 ? 0 : ceil_div(-offset_w, step_w), std::min(w, ceil_div(dst_w - offset_w, step_w))};
  }

  // Source row of padded row `row` of channel c of image n, or null where the
  // padded row is zero.
  const scalar_t* source_row(int64_t n, int64_t c, int64_t row) const {
    const int64_t jj = row - offset_h;
    if (jj < 0 || jj % step_h != 0 || jj / step_h >= h) return nullptr;
    return data + n * sn + c * sc + (jj / step_h) * sh;
  }
};

// Per-thread scratch of `elements` zeros: the partial sums of a weight gradient.
template <typename scalar_t>
scalar_t* zeroed_partials(int64_t elements, at::Tensor& keep_alive) {
  scalar_t* data = workspace<scalar_t>(workspace_slots::kPartialSlot, elements, keep_alive);
  std::fill(data, data + elements, scalar_t(0));
  return data;
}

// Calls fn(image, first output row, row count), in order, for chunks of at
// most chunk_rows output rows, each within one image, that cover reduction
// part `part` of `parts`: the rows [part * rows / parts, (part + 1) * rows /
// parts) of the flattened (image, output row) index.
template <typename Fn>
void for_each_row_chunk(int64_t part, int64_t parts, int64_t rows, int64_t out_h, int64_t chunk_rows, const Fn& fn) {
  const int64_t row_end = (part + 1) * rows / parts;
  for (int64_t row = part * rows / parts; row < row_end;) {
    const int64_t n = row / out_h, oh = row % out_h;
    const int64_t count = std::min({chunk_rows, out_h - oh, row_end - row});
    fn(n, oh, count);
    row += count;
  }
}

}  // namespace cpu
}  // namespace lightning_hw
