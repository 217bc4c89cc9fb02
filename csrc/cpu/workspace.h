// Per-thread scratch buffers shared by the CPU ops, and recycled buffers for
// their large outputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

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
  kPanelSlot = 8,      // per-thread packed panels of the bf16dot GEMMs
  kSlotCount = 9
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

// Large outputs (the weight gradients of training: 22.6 MB for the fruit
// CNN's 6728->841 layer) in buffers released by earlier outputs of the same
// size. A training step frees the last step's gradient (zero_grad) and
// allocates the next; through malloc the small allocations in between
// fragment the top of glibc's heap, so the new gradient extends the heap and
// the next free trims it again (45-69 MB, two or three times per epoch), and
// every re-grown page costs a fault and a page clear on first touch: 100,000
// faults per epoch (benchmarks/NOTES.md). Idle buffers are kept up to
// kRecycleIdleLimit bytes, the oldest freed first.
constexpr int64_t kRecycleMinBytes = int64_t(4) << 20;
constexpr int64_t kRecycleIdleLimit = int64_t(64) << 20;

namespace detail {
struct IdleBuffers {
  std::mutex mutex;
  std::vector<std::pair<int64_t, void*>> buffers;  // (bytes, data), oldest first
  int64_t bytes = 0;
};

// Never destroyed: outputs may still be freed while the process exits.
inline IdleBuffers& idle_buffers() {
  static IdleBuffers* idle = new IdleBuffers();
  return *idle;
}

inline void* take_idle_buffer(int64_t bytes) {
  IdleBuffers& idle = idle_buffers();
  std::lock_guard<std::mutex> lock(idle.mutex);
  for (auto it = idle.buffers.rbegin(); it != idle.buffers.rend(); ++it) {
    if (it->first == bytes) {
      void* data = it->second;
      idle.buffers.erase(std::next(it).base());
      idle.bytes -= bytes;
      return data;
    }
  }
  return nullptr;
}

inline void release_buffer(void* data, int64_t bytes) {
  IdleBuffers& idle = idle_buffers();
  std::vector<void*> evicted;
  {
    std::lock_guard<std::mutex> lock(idle.mutex);
    idle.buffers.emplace_back(bytes, data);
    idle.bytes += bytes;
    while (idle.bytes > kRecycleIdleLimit) {
      evicted.push_back(idle.buffers.front().second);
      idle.bytes -= idle.buffers.front().first;
      idle.buffers.erase(idle.buffers.begin());
    }
  }
  for (void* buffer : evicted) c10::free_cpu(buffer);
}
}  // namespace detail

// at::empty on the CPU, from a recycled buffer when the tensor is large.
inline at::Tensor recycled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (bytes < kRecycleMinBytes) return at::empty(sizes, options);
  void* data = detail::take_idle_buffer(bytes);
  if (data == nullptr) data = c10::alloc_cpu(bytes);
  return at::from_blob(data, sizes, [bytes](void* buffer) { detail::release_buffer(buffer, bytes); }, options);
}

}  // namespace cpu
}  // namespace lightning_hw
