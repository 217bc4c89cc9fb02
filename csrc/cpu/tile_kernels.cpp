// The register-tile kernels of conv2d_kernels.h, depthwise_kernels.h and
// gemm_kernels.h, compiled three times (AVX-512, AVX2+FMA, baseline SSE2)
// inside `#pragma GCC target` regions, and the choice among them at run time
// from the CPU's features: the default build stays portable.
#include "cpu/tile_kernels.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>


#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace lightning_hw {
namespace cpu {
namespace {
namespace isa_avx512 {
// 24 of 32 zmm as accumulators: 12 pixels x 2 vectors, 12 positions x 2, 8 channels x 2
// (or rows x channels x vectors up to 24), 4 channels x 6 positions; depthwise
// 12 pixels or 12 taps x 1 vector (the 12 tap offsets fill the integer registers).
constexpr IsaTiles kIsaTiles{12, {12, 12}, {8, 8}, 24, 4, 6, 12, 12};
constexpr int kIsaVectorBytes = 64;
#include "conv2d_kernels.h"
#include "depthwise_kernels.h"
#include "gemm_kernels.h"
}  // namespace isa_avx512
}  // namespace
}  // namespace cpu
}  // namespace lightning_hw
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace lightning_hw {
namespace cpu {
namespace {
namespace isa_avx2 {
// 12 of 16 ymm as accumulators (a 64-byte vector is two ymm); 9 for the planar
// weight gradient, whose accumulators are single ymm. Depthwise: 6 pixels or
// 6 taps (12 ymm, 2 for the weights or grad_output).
constexpr IsaTiles kIsaTiles{3, {6, 3}, {6, 3}, 12, 3, 3, 6, 6};
constexpr int kIsaVectorBytes = 32;
#include "conv2d_kernels.h"
#include "depthwise_kernels.h"
#include "gemm_kernels.h"
}  // namespace isa_avx2
}  // namespace
}  // namespace cpu
}  // namespace lightning_hw
#pragma GCC pop_options

namespace lightning_hw {
namespace cpu {
namespace {
namespace isa_baseline {
// 8 to 12 of 16 xmm as accumulators (a 64-byte vector is four xmm); 9 for the
// planar weight gradient, whose accumulators are single xmm; 8 for the
// depthwise tiles (2 pixels or 2 taps).
constexpr IsaTiles kIsaTiles{1, {3, 1}, {3, 1}, 12, 3, 3, 2, 2};
constexpr int kIsaVectorBytes = 16;
#include "conv2d_kernels.h"
#include "depthwise_kernels.h"
#include "gemm_kernels.h"
}  // namespace isa_baseline

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa chosen_isa() {
  static const Isa chosen = [] {
    const char* forced = std::getenv("LIGHTNING_HW_CPU_ISA");
    const std::string want = forced ? forced : "";
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    // The AMX variants (amx.h) run the bf16 tiles beside the best float kernels.
    const bool best = want.empty() || want == "avx512" || want == "amx" || want == "amx-emulated";
    if (avx512 && best) return Isa::kAvx512;
    if (avx2 && want != "baseline") return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return chosen;
}

}  // namespace

const char* cpu_isa_name() {
  switch (chosen_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

namespace {
// The variant of a table for the chosen instruction set.
template <typename Table>
Table pick(Table (*avx512)(), Table (*avx2)(), Table (*baseline)()) {
  switch (chosen_isa()) {
    case Isa::kAvx512: return avx512();
    case Isa::kAvx2: return avx2();
    default: return baseline();
  }
}
}  // namespace

template <typename scalar_t>
const ConvKernels<scalar_t>& kernels() {
  static const ConvKernels<scalar_t> chosen = pick(
      &isa_avx512::conv_kernels<scalar_t>, &isa_avx2::conv_kernels<scalar_t>, &isa_baseline::conv_kernels<scalar_t>);
  return chosen;
}

template <typename scalar_t>
const GemmKernels<scalar_t>& gemm_kernels() {
  static const GemmKernels<scalar_t> chosen = pick(
      &isa_avx512::gemm_kernels<scalar_t>, &isa_avx2::gemm_kernels<scalar_t>, &isa_baseline::gemm_kernels<scalar_t>);
  return chosen;
}

template <typename scalar_t>
const DepthwiseKernels<scalar_t>& depthwise_kernels() {
  static const DepthwiseKernels<scalar_t> chosen = pick(
      &isa_avx512::depthwise_kernels<scalar_t>, &isa_avx2::depthwise_kernels<scalar_t>,
      &isa_baseline::depthwise_kernels<scalar_t>);
  return chosen;
}

template const ConvKernels<float>& kernels<float>();
template const ConvKernels<double>& kernels<double>();
template const GemmKernels<float>& gemm_kernels<float>();
template const GemmKernels<double>& gemm_kernels<double>();
template const DepthwiseKernels<float>& depthwise_kernels<float>();
template const DepthwiseKernels<double>& depthwise_kernels<double>();

}  // namespace cpu
}  // namespace lightning_hw
