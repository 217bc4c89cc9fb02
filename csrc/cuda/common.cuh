// What the CUDA kernels of every op share: the dtypes they accept, grid sizing
// for grid-stride loops, and the ordered sum of split-reduction partials.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace lightning_hw {
namespace cuda {

// float16 and bfloat16 accumulate in float32; float64 is there for gradcheck.
constexpr at::ScalarType kCudaDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

// Every kernel walks its work items with a grid-stride loop, so the grid can be
// capped (gridDim.x is limited to 2^31 - 1) without losing work.
constexpr int64_t kMaxGridBlocks = int64_t(1) << 30;

inline unsigned int grid_blocks(int64_t blocks) {
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, kMaxGridBlocks));
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// out[i] = sum over s = 0, 1, ... of partial[s * split_stride + i], in that
// order: the second pass of every split reduction, so results are bitwise
// reproducible (no atomics anywhere).
template <typename scalar_t, typename acc_t>
__global__ void sum_splits_kernel(
    const acc_t* __restrict__ partial, int64_t split_stride, int splits, int64_t count,
    scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = partial[i];
    for (int s = 1; s < splits; ++s) sum += partial[s * split_stride + i];
    out[i] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename acc_t>
void sum_splits(
    const acc_t* partial, int64_t split_stride, int splits, int64_t count, scalar_t* out,
    cudaStream_t stream) {
  if (count == 0) return;
  constexpr int kThreads = 256;
  sum_splits_kernel<scalar_t, acc_t><<<grid_blocks(ceil_div(count, kThreads)), kThreads, 0, stream>>>(
      partial, split_stride, splits, count, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lightning_hw
