/* The CPU's bfloat16 dot-product peak, measured as fma_peak.c measures float32:
 * every thread runs instructions that never touch memory, on the widest bf16
 * unit the CPU has:
 *   amx          TDPBF16PS on tiles (4 independent 16x16 float32 accumulators,
 *                16x64-byte operands: 16 * 16 * 32 * 2 flops each), after asking
 *                Linux for the tile data permission (arch_prctl);
 *   avx512_bf16  VDPBF16PS on zmm registers (12 chains: 16 lanes * 2 pairs * 2 flops).
 * Prints "<isa> <threads> <GFLOP/s>", or "none <threads> 0" where the CPU has
 * neither. bench_ops.py --autocast bfloat16 compiles and runs it
 * (cc -O2 -fopenmp) to state each figure's % of this peak.
 *
 *   cc -O2 -fopenmp benchmarks/bf16_peak.c -o bf16_peak && OMP_NUM_THREADS=2 ./bf16_peak
 */
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CHAINS 12
#define VECTOR_ITERATIONS 20000000L
#define TILE_ITERATIONS 2000000L

static int cpu_has_amx_bf16(void) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  return (edx & (1u << 24)) && (edx & (1u << 22));
}

static int cpu_has_avx512_bf16(void) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return 0;
  __builtin_cpu_init();
  return (eax & (1u << 5)) && __builtin_cpu_supports("avx512f");
}

struct tile_config {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile,amx-bf16"))) static double peak_amx(void) {
  double total = 0.0;
#pragma omp parallel reduction(+ : total)
  {
    struct tile_config config __attribute__((aligned(64)));
    memset(&config, 0, sizeof(config));
    config.palette_id = 1;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
    static const uint16_t ones[16 * 32] __attribute__((aligned(64))) = {0};
    float sums[16 * 16] __attribute__((aligned(64)));
    _tile_loadconfig(&config);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    for (long it = 0; it < TILE_ITERATIONS; ++it) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, sums, 64);
    _tile_release();
    total += sums[0];
  }
  return total;
}

__attribute__((target("avx512f,avx512bf16"))) static double peak_avx512_bf16(void) {
  double total = 0.0;
#pragma omp parallel reduction(+ : total)
  {
    __m512 acc[CHAINS];
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80); /* bf16 1.0 */
    const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3380); /* bf16 ~6e-8 */
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_set1_ps((float)(c + omp_get_thread_num()));
    for (long it = 0; it < VECTOR_ITERATIONS; ++it) {
#pragma GCC unroll 12
      for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    }
    float sum = 0.0f;
    for (int c = 0; c < CHAINS; ++c) sum += _mm512_reduce_add_ps(acc[c]);
    total += sum;
  }
  return total;
}

int main(void) {
  const char* isa = "none";
  double (*kernel)(void) = 0;
  double flops_per_thread = 0.0;
  if (cpu_has_amx_bf16() && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0) {
    isa = "amx", kernel = peak_amx, flops_per_thread = 4.0 * 16 * 16 * 32 * 2 * (double)TILE_ITERATIONS;
  } else if (cpu_has_avx512_bf16()) {
    isa = "avx512_bf16", kernel = peak_avx512_bf16, flops_per_thread = CHAINS * 16.0 * 4 * (double)VECTOR_ITERATIONS;
  }
  if (!kernel) {
    printf("none %d 0\n", omp_get_max_threads());
    return 0;
  }
  kernel(); /* warm-up: clocks settle, threads start */
  const double start = omp_get_wtime();
  const double checksum = kernel();
  const double seconds = omp_get_wtime() - start;
  printf("%s %d %.1f\n", isa, omp_get_max_threads(), flops_per_thread * omp_get_max_threads() / seconds / 1e9);
  return checksum == 12345.678 ? 1 : 0; /* keeps the result live */
}
