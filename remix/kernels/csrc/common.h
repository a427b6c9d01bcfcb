// Includes, build switches (REMIX_DOT_BF16, REMIX_AMX), the 16-lane float vector vf with its loads, stores and
// horizontal sums, and the AVX2 builds' 8-lane helpers: what every kernel below uses.
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>  // __rdtsc (the output splits' meters, gemm.h)
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define REMIX_DOT_BF16 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define REMIX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// MKL's BLAS inside libtorch (the library ATen's float32 GEMMs call); called here on one thread's share of the columns
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
                       const float*, const int*, const float*, float*, const int*);

namespace {

// Whether this is an Intel CPU (GCC's CPU detection, initialised here first: global initializers call this before
// main, and so before the constructor that would otherwise run it).
inline bool intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

constexpr int L = 16;  // lanes of one vector: a 512-bit register with AVX-512, split by the compiler otherwise
// An error message with numbers, formatted by snprintf into one std::string. TORCH_CHECK's own formatting of numbers
// goes through std::ostringstream, and on one machine (g++ 13.3, torch 2.11, Python 3.12 with many wheels loaded) every
// failed check whose message held a number crashed the process (segfault) where the same checks with literal-only
// messages raised RuntimeError as they should; a check must never take the server down.
template <typename... A>
inline std::string message(const char* format, A... args) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), format, static_cast<long long>(args)...);
  return std::string(buf);
}

typedef float vf __attribute__((vector_size(L * sizeof(float)), aligned(sizeof(float))));  // unaligned loads allowed

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
typedef uint16_t vh __attribute__((vector_size(L * sizeof(uint16_t)), aligned(sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(L * sizeof(uint32_t))));
// widen 16 bfloat16 values (exact). With AVX-512 one zero-extending load and a shift: GCC's code for the generic form
// (it prefers 256-bit vectors) took four operations, on the FMA's ports, per 16 values - a third of the operations of
// phase A's dot products on bfloat16 pools.
inline vf load(const c10::BFloat16* p) {
#ifdef __AVX512F__
  return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#else
  const vu u = __builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
// int8 (an 8-bit K/V cache's codes), widened exactly
typedef int8_t vb __attribute__((vector_size(L), aligned(1)));
inline vf load(const int8_t* p) {  // exact; GCC's code for the generic form went element by element (4x the attention)
#ifdef __AVX512F__
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return __builtin_convertvector(*reinterpret_cast<const vb*>(p), vf);
#endif
}
// With AVX-512 the same adds in the same order, written as three vector adds and a scalar one: GCC had compiled the
// loops below into extracts, aligns and scalar adds (~25 instructions a sum), and routing's dots4x4 takes 16 sums a
// block of 4 tokens x 4 routers - route_rows alone on 256 tokens x 8 routers of D 576 (a temporary binding; 41st
// session, Intel VM) took 39.0 us, 30.1 with this, ~25 with dots4x4's sums by hsum_many below (every output of 108
// module calls bit-identical either way, and the AVX2 build's hsum16 still gives the same sums: test_avx2_build).
inline float hsum(vf v) {  // a fixed pairwise order (depth 4, not 16)
#ifdef __AVX512F__
  const __m512 z = reinterpret_cast<__m512>(v);
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(z),  // h[l] = v[l] + v[l + 8]
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
  const __m128 g = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // h[l] += h[l + 4]
  const __m128 t = _mm_add_ps(g, _mm_movehl_ps(g, g));  // (h0 + h2), (h1 + h3)
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
#else
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) h[l] += h[l + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
#endif
}

// out[i] = hsum(v[i]) for i < n, bit for bit, sixteen at a time: with AVX-512 the same pairwise tree runs across
// sixteen vectors by shuffles (15 vector adds for 16 sums instead of 16 x 15 scalar ones): step 1 pairs the halves
// (v[l] + v[l + 8]), step 2 the quarters (h[l] + h[l + 4]), then (h0 + h2) and (h1 + h3), then their sum - hsum's
// operands in hsum's order, so the dot kernels' outputs do not change with it.
inline void hsum_many(const vf* v, int64_t n, float* out) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i < n; i += 16) {
    __m512 s[16];
    for (int j = 0; j < 16; ++j) s[j] = i + j < n ? reinterpret_cast<const __m512&>(v[i + j]) : _mm512_setzero_ps();
    __m512 c[8], g[4], m[2];
    for (int j = 0; j < 8; ++j)
      c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0x44), _mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0xEE));
    for (int j = 0; j < 4; ++j)
      g[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0x88), _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0xDD));
    for (int j = 0; j < 2; ++j)
      m[j] = _mm512_add_ps(_mm512_shuffle_ps(g[2 * j], g[2 * j + 1], 0x44), _mm512_shuffle_ps(g[2 * j], g[2 * j + 1], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(m[0], m[1], 0x88), _mm512_shuffle_ps(m[0], m[1], 0xDD));
    // lane 4 q + u holds source 4 u + q: out[j] = r[4 (j % 4) + j / 4]
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const int64_t left = std::min<int64_t>(16, n - i);
    _mm512_mask_storeu_ps(out + i, static_cast<__mmask16>((1u << left) - 1), _mm512_permutexvar_ps(order, r));
  }
#endif
  for (; i < n; ++i) out[i] = hsum(v[i]);
}

// v itself, in a register: GCC may not load it again where it is used. It had folded each use of a loaded vector into
// its FMA as a memory operand, so that a vector read once in the source was loaded once per use: dots4x4's float32
// loop 32 loads to 16 FMAs (its rows four times each), the float32 GEMM tiles 30 to 25 (5 x 5) and 24 to 20 (5 x 4),
// against the one 512-bit load a cycle this Zen 4 issues beside an FMA. Kept in registers (8 and 10 loads; the same
// FMAs in the same order, so no value changes), on the 33rd session's Zen 4 VM: dots4x4, one float32 module at 32 rows
// timed stage by stage on thread 0 (a scratch build), hot, routing 5.3 -> 3.3 us (576 -> 1536) and 8.8 -> 4.9 (1536
// -> 576), phase A 11.0 -> 6.4 and 28.9 -> 10.7; cold (90 modules in turn) routing 6.0 -> 5.2 and 12 -> 8.2, phase A
// 11 -> 11.5 and 23-27 -> 20; a bfloat16 decode step's routing (router float32, x widened in registers) 3.3-4.0 ->
// 2.75 us a call at 8 sequences, 4.6-4.9 -> 3.9 at 32. The float32 GEMM tiles: see dot_tile.
__attribute__((always_inline)) inline vf keep(vf v) {
#ifdef __AVX512F__
  asm("" : "+v"(v));
#endif
  return v;
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// Eight float32 values (widened where bfloat16) - axpy_lora's and dots4x4's AVX2 paths.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 load8(const int8_t* p) {  // eight int8 codes widened exactly
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((always_inline)) inline __m256 keep8(__m256 v) {  // as keep(): v from a register
  asm("" : "+x"(v));
  return v;
}
// hsum of the 16 lanes lo (0-7) and hi (8-15): hsum's order, add for add.
inline float hsum16(__m256 lo, __m256 hi) {
  const __m256 h = _mm256_add_ps(lo, hi);  // h[l] = v[l] + v[l + 8]
  const __m128 g = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // h[l] += h[l + 4]
  const __m128 t = _mm_add_ps(g, _mm_movehl_ps(g, g));  // (h0 + h2), (h1 + h3)
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif

}  // namespace
