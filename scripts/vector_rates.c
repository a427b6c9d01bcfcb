#define _POSIX_C_SOURCE 199309L
// The vector units' rates on this machine: 512- and 256-bit FMAs and AVX512-BF16's vdpbf16ps, the throughput (twelve
// independent chains) and the latency (one chain) of each, in TSC cycles an instruction and in instructions a second.
// The stages of a ReMix module and of the decode attention are weighed against these (docs/BENCHMARKS.md, 47th session).
//   gcc -O2 -march=native scripts/vector_rates.c -o /tmp/vector_rates && /tmp/vector_rates [steps, default 2000000]
// (both cores at once: /tmp/vector_rates & /tmp/vector_rates; wait)
// Each chain starts from its own value, read from a volatile array, and runs on its own operands: with twelve chains
// of the same inputs the compiler merges them into one (GCC 13 does, at -O2), and a "rate" measured so is one chain's
// latency divided by twelve - the last line shows that trap.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

#define CHAINS 12
static long STEPS = 2000000L;  // argv[1] overrides (tests: fewer)
static volatile float seed[CHAINS] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
static volatile float sink;
static inline uint64_t tsc(void) { unsigned a; return __rdtscp(&a); }

// c[i] = STEP(i) for n steps of the CHAINS chains at once, or (chains 1) for n x CHAINS steps of chain 0 alone: the
// same count of instructions either way
#define RUN_CHAINS(n, chains, c, STEP)                                                  \
  do {                                                                                  \
    if ((chains) == 1)                                                                  \
      for (long k = 0; k < (n) * CHAINS; ++k) c[0] = STEP(0);                           \
    else                                                                                \
      for (long k = 0; k < (n); ++k) {                                                  \
        _Pragma("GCC unroll 12") for (int i = 0; i < CHAINS; ++i) c[i] = STEP(i);       \
      }                                                                                 \
  } while (0)

static void keep512(const __m512* c) {  // every chain's result used, so none is dropped
  float s = 0;
  for (int i = 0; i < CHAINS; ++i) s += _mm512_reduce_add_ps(c[i]);
  sink = s;
}

__attribute__((noinline)) static void fma512(long n, int chains) {
  __m512 c[CHAINS], m[CHAINS];
  for (int i = 0; i < CHAINS; ++i) { c[i] = _mm512_set1_ps(seed[i]); m[i] = _mm512_set1_ps(0.999f + 1e-6f * seed[i]); }
  const __m512 b = _mm512_set1_ps(1e-7f);
#define FMA512(i) _mm512_fmadd_ps(c[i], m[i], b)
  RUN_CHAINS(n, chains, c, FMA512);
  keep512(c);
}

__attribute__((noinline)) static void fma256(long n) {
  __m256 c[CHAINS], m[CHAINS];
  for (int i = 0; i < CHAINS; ++i) { c[i] = _mm256_set1_ps(seed[i]); m[i] = _mm256_set1_ps(0.999f + 1e-6f * seed[i]); }
  const __m256 b = _mm256_set1_ps(1e-7f);
#define FMA256(i) _mm256_fmadd_ps(c[i], m[i], b)
  RUN_CHAINS(n, CHAINS, c, FMA256);
  float s = 0, o[8];
  for (int i = 0; i < CHAINS; ++i) { _mm256_storeu_ps(o, c[i]); s += o[0]; }
  sink = s;
}

#ifdef __AVX512BF16__
__attribute__((noinline)) static void dpbf16(long n, int chains) {
  __m512 c[CHAINS];
  __m512bh a[CHAINS];
  for (int i = 0; i < CHAINS; ++i) {
    c[i] = _mm512_set1_ps(seed[i]);
    a[i] = (__m512bh)_mm512_set1_epi16((short)(0x3c00 + (int)seed[i]));  // ~2^-7, a little more each chain
  }
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0
#define DPBF16(i) _mm512_dpbf16_ps(c[i], a[i], b)
  RUN_CHAINS(n, chains, c, DPBF16);
  keep512(c);
}
#endif

// the trap: twelve "chains" of the same inputs, which the compiler may merge into one
__attribute__((noinline)) static void fma512_same(long n) {
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0,
         c10 = c0, c11 = c0;
  const __m512 m = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-7f);
  for (long k = 0; k < n; ++k) {
    c0 = _mm512_fmadd_ps(c0, m, b); c1 = _mm512_fmadd_ps(c1, m, b); c2 = _mm512_fmadd_ps(c2, m, b);
    c3 = _mm512_fmadd_ps(c3, m, b); c4 = _mm512_fmadd_ps(c4, m, b); c5 = _mm512_fmadd_ps(c5, m, b);
    c6 = _mm512_fmadd_ps(c6, m, b); c7 = _mm512_fmadd_ps(c7, m, b); c8 = _mm512_fmadd_ps(c8, m, b);
    c9 = _mm512_fmadd_ps(c9, m, b); c10 = _mm512_fmadd_ps(c10, m, b); c11 = _mm512_fmadd_ps(c11, m, b);
  }
  __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                           _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
  s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)));
  sink = _mm512_reduce_add_ps(s);
}

// TSC cycles an instruction of f over STEPS x CHAINS instructions, the fastest of three runs
#define TIME(call)                                                                \
  ({                                                                              \
    double best = 1e30;                                                           \
    for (int r = 0; r < 3; ++r) {                                                 \
      uint64_t t0 = tsc();                                                        \
      call;                                                                       \
      double c = (double)(tsc() - t0) / ((double)STEPS * CHAINS);                 \
      best = c < best ? c : best;                                                 \
    }                                                                             \
    best;                                                                         \
  })

static double tsc_hz(void) {  // the TSC's rate, against the wall clock
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  uint64_t t0 = tsc();
  do clock_gettime(CLOCK_MONOTONIC, &b); while ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec) < 2e8);
  return (double)(tsc() - t0) / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9);
}

static void line(const char* what, double cyc, double hz) {
  printf("%-52s %6.3f TSC cycles  %6.2f G a second\n", what, cyc, hz / cyc / 1e9);
}

int main(int argc, char** argv) {
  if (argc > 1) STEPS = atol(argv[1]);
  const double hz = tsc_hz();
  printf("TSC %.2f GHz\n", hz / 1e9);
  line("512-bit FMA, 12 independent chains (throughput)", TIME(fma512(STEPS, CHAINS)), hz);
  line("512-bit FMA, one chain (latency)", TIME(fma512(STEPS, 1)), hz);
  line("256-bit FMA, 12 independent chains (throughput)", TIME(fma256(STEPS)), hz);
#ifdef __AVX512BF16__
  line("vdpbf16ps (512-bit), 12 independent chains (throughput)", TIME(dpbf16(STEPS, CHAINS)), hz);
  line("vdpbf16ps (512-bit), one chain (latency)", TIME(dpbf16(STEPS, 1)), hz);
#else
  printf("vdpbf16ps: not in this build (no AVX512-BF16 with -march=native)\n");
#endif
  line("512-bit FMA, 12 chains of the same inputs (the trap)", TIME(fma512_same(STEPS)), hz);
  return 0;
}
