// The register-tile kernels of conv2d_kernels.h, depthwise_kernels.h and
// gemm_kernels.h, compiled three times (AVX-512, AVX2+FMA, baseline SSE2)
// inside `#pragma GCC target` regions, and the choice among them at run time
// from the CPU's features: the default build stays portable.
#include "cpu/tile_kernels.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>


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

// The variants, best first, and the CPU features each needs that this CPU lacks.
struct Variant {
  Isa isa;
  const char* name;
  std::vector<std::string> missing;
};

const std::vector<Variant>& variants() {
  static const std::vector<Variant> list = [] {
    __builtin_cpu_init();
    // __builtin_cpu_supports takes string literals only: one test per feature.
    std::vector<std::string> avx512, avx2;
    if (!__builtin_cpu_supports("avx512f")) avx512.push_back("avx512f");
    if (!__builtin_cpu_supports("avx512vl")) avx512.push_back("avx512vl");
    if (!__builtin_cpu_supports("avx512dq")) avx512.push_back("avx512dq");
    if (!__builtin_cpu_supports("avx2")) avx2.push_back("avx2");
    if (!__builtin_cpu_supports("fma")) avx2.push_back("fma");
    for (const std::string& feature : avx2) avx512.push_back(feature);  // its kernels use AVX2 and FMA too
    return std::vector<Variant>{{Isa::kAvx512, "avx512", avx512}, {Isa::kAvx2, "avx2", avx2}, {Isa::kBaseline, "baseline", {}}};
  }();
  return list;
}

std::string join(const std::vector<std::string>& names, const char* separator) {
  std::string text;
  for (const std::string& name : names) text += (text.empty() ? "" : separator) + name;
  return text;
}

// The best variant this CPU runs, or the one LIGHTNING_HW_CPU_ISA names: a
// name of no variant, or of one this CPU cannot run, is an error (thrown on
// every use: a static whose initialiser throws is initialised again next time).
Isa chosen_isa() {
  static const Isa chosen = [] {
    const char* forced = std::getenv("LIGHTNING_HW_CPU_ISA");
    const std::string want = forced ? forced : "";
    std::vector<std::string> names, runnable;
    for (const Variant& variant : variants()) {
      names.push_back(variant.name);
      if (variant.missing.empty()) runnable.push_back(variant.name);
    }
    for (const Variant& variant : variants()) {
      if (want.empty() ? !variant.missing.empty() : want != variant.name) continue;
      TORCH_CHECK(
          variant.missing.empty(), "LIGHTNING_HW_CPU_ISA=", want, ": this CPU cannot run the ", want,
          " kernels, it lacks ", join(variant.missing, ", "), " (it runs ", join(runnable, ", "), ")");
      return variant.isa;
    }
    TORCH_CHECK(
        false, "LIGHTNING_HW_CPU_ISA=", want, " is not a kernel variant: expected one of ", join(names, ", "),
        ", or unset for the best this CPU runs (", runnable.front(), ")");
  }();
  return chosen;
}

}  // namespace

const char* cpu_isa_name() {
  for (const Variant& variant : variants())
    if (variant.isa == chosen_isa()) return variant.name;
  return "";
}

std::vector<std::string> cpu_isa_variants() {
  std::vector<std::string> lines;
  for (const Variant& variant : variants()) lines.push_back(std::string(variant.name) + "\t" + join(variant.missing, " "));
  return lines;
}

std::vector<std::string> cpu_kernel_tiles() {
  const ConvKernels<float>& conv = kernels<float>();
  const IsaTiles& t = conv.tiles;
  const auto values = [](const char* key, std::vector<int> numbers) {
    std::string line = std::string(key) + "=";
    for (size_t i = 0; i < numbers.size(); ++i) line += (i > 0 ? "," : "") + std::to_string(numbers[i]);
    return line;
  };
  std::vector<int> planar_rows[2];
  for (int vectors = 0; vectors < 2; ++vectors)
    for (int channels = 0; channels < t.planar_channels[vectors]; ++channels)
      planar_rows[vectors].push_back(conv.planar_rows[vectors][channels]);
  return {
      std::string("isa=") + cpu_isa_name(),
      values("vector_bytes", {conv.native_lanes * int(sizeof(float))}),
      values("conv_pixels", {t.conv_pixels}),
      values("wgrad_rows", {t.wgrad_rows[0], t.wgrad_rows[1]}),
      values("planar_channels", {t.planar_channels[0], t.planar_channels[1]}),
      values("planar_rows_one_vector", planar_rows[0]),
      values("planar_rows_two_vectors", planar_rows[1]),
      values("planar_wgrad_channels", {t.planar_wgrad_channels}),
      values("planar_wgrad_positions", {t.planar_wgrad_positions}),
      values("dw_pixels", {depthwise_kernels<float>().pixels}),
      values("dw_wgrad_taps", {depthwise_kernels<float>().taps}),
      values("gemm_rows", {gemm_kernels<float>().rows_per_tile}),
  };
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
