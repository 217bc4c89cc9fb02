/* The CPU's float32 FMA peak, measured: every thread runs chains of independent
 * vector FMAs that never touch memory (enough chains to cover the FMA latency on
 * both FMA ports), on the widest vectors the CPU has (AVX-512, AVX2+FMA, or SSE2
 * multiply + add). Prints "<isa> <threads> <GFLOP/s>". bench_ops.py compiles and
 * runs it (cc -O2 -fopenmp) to state each figure's % of this peak.
 *
 *   cc -O2 -fopenmp benchmarks/fma_peak.c -o fma_peak && OMP_NUM_THREADS=2 ./fma_peak
 */
#include <omp.h>
#include <stdio.h>
#include <string.h>

#define CHAINS 12
#define ITERATIONS 20000000L

#define PEAK_KERNEL(name, isa_flags, bytes)                                         \
  __attribute__((target(isa_flags))) static double name(void) {                      \
    typedef float vec __attribute__((vector_size(bytes)));                        \
    double total = 0.0;                                                            \
    _Pragma("omp parallel reduction(+ : total)") {                                 \
      vec acc[CHAINS];                                                             \
      vec scale, shift;                                                            \
      for (int i = 0; i < (int)(bytes / 4); ++i) {                                 \
        scale[i] = 0.999999f;                                                      \
        shift[i] = 1e-7f;                                                          \
      }                                                                            \
      for (int c = 0; c < CHAINS; ++c) acc[c] = scale * (float)(c + omp_get_thread_num()); \
      for (long it = 0; it < ITERATIONS; ++it) {                                   \
        _Pragma("GCC unroll 12") for (int c = 0; c < CHAINS; ++c) {                \
          acc[c] = acc[c] * scale + shift;                                         \
        }                                                                          \
      }                                                                            \
      float sum = 0.0f;                                                            \
      for (int c = 0; c < CHAINS; ++c)                                             \
        for (int i = 0; i < (int)(bytes / 4); ++i) sum += acc[c][i];               \
      total += sum;                                                                \
    }                                                                              \
    return total;                                                                  \
  }

PEAK_KERNEL(peak_avx512, "avx512f", 64)
PEAK_KERNEL(peak_avx2, "avx2,fma", 32)
PEAK_KERNEL(peak_sse2, "sse2", 16)

int main(void) {
  __builtin_cpu_init();
  const char* isa;
  double (*kernel)(void);
  int lanes;
  if (__builtin_cpu_supports("avx512f")) {
    isa = "avx512", kernel = peak_avx512, lanes = 16;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    isa = "avx2", kernel = peak_avx2, lanes = 8;
  } else {
    isa = "sse2", kernel = peak_sse2, lanes = 4;
  }
  kernel(); /* warm-up: clocks settle, threads start */
  const double start = omp_get_wtime();
  const double checksum = kernel();
  const double seconds = omp_get_wtime() - start;
  const double flops = 2.0 * lanes * CHAINS * (double)ITERATIONS * omp_get_max_threads();
  printf("%s %d %.1f\n", isa, omp_get_max_threads(), flops / seconds / 1e9);
  return checksum == 12345.678 ? 1 : 0; /* keeps the result live */
}
