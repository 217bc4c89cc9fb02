// Per-thread scratch buffers shared by the CPU ops.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>

namespace lightning_hw {
namespace cpu {

// Scratch buffers (re-laid-out activations, packed weights, partial sums),
// kept per calling thread and reused from call to call, one per slot. A fresh
// allocation above glibc's mmap threshold is new memory every time and pays a
// page fault and a page clear per 4 KiB on first touch, which costs as much as
// the copy itself for the big layers; training repeats the same shapes, so the
// buffers are simply reused. Buffers over kWorkspaceCacheLimit bytes are not
// kept.
namespace workspace_slots {
enum WorkspaceSlot {
  kSourceSlot = 0,
  kGradOutputSlot = 1,
  kPaddedInputSlot = 2,
  kRowsSlot = 3,       // per-thread rows of the planar kernels
  kGradRowsSlot = 4,   // per-thread grad_output rows of the planar weight gradient
  kPartialSlot = 5,    // partial sums of the weight gradient
  kPackedSlot = 6,     // linear_relu's packed weights, or its transposed small operand
  kStreamSlot = 7,     // linear_relu's streamed GEMMs: partial sums, padded last columns
  kSlotCount = 8
};
}  // namespace workspace_slots
constexpr int64_t kWorkspaceCacheLimit = int64_t(64) << 20;

template <typename scalar_t>
inline scalar_t* workspace(workspace_slots::WorkspaceSlot slot, int64_t elements, at::Tensor& keep_alive) {
  thread_local std::array<at::Tensor, workspace_slots::kSlotCount> cache;
  const int64_t bytes = std::max<int64_t>(1, elements) * int64_t(sizeof(scalar_t));
  if (bytes > kWorkspaceCacheLimit) {
    keep_alive = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    return reinterpret_cast<scalar_t*>(keep_alive.mutable_data_ptr());
  }
  at::Tensor& buffer = cache[slot];
  if (!buffer.defined() || buffer.numel() < bytes)
    buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  keep_alive = buffer;
  return reinterpret_cast<scalar_t*>(buffer.mutable_data_ptr());
}

}  // namespace cpu
}  // namespace lightning_hw
