"""Optional C++ kernels for the CPU: the per-token top-k routing and LoRA gather of one module, fused.

On this class of CPU a torch op costs ~5-15 us of dispatch, and the dense-masked torch path (one GEMM
over every pool's A, a mask, one GEMM over every B) does n/k times the useful work in shapes that GEMM
libraries handle poorly (K = n*r = 64). These kernels compute only the selected LoRAs:

    route_gather_(x, y, ...)   for each token: logits = P_s x (float32), J = top-k (ties to the lower
                               index), y += omega_s * sum_{i in J} B_i (A_i x); returns J (global ids)
    gather_(x, y, a, bt, idx, w)   the kernel contract with given ids and weights (-1 = none)
    ModuleCall(...)            the whole module with its arguments bound once (see :func:`bind_module`): the base
                               GEMM and route_gather_ into its output in one parallel region (float32 below 256
                               rows, bfloat16 below 128; above, oneDNN's GEMM first); call(x) -> (y, idx), or None
                               when it does not apply
                               (autograd, changed weights, not a CPU float tensor)
    linear(x, w, bias)         that base GEMM alone, each thread on its own slice of the outputs: with AVX-512 or
                               AVX2 + FMA a dot-product kernel (a row's outputs bit-identical in any batch, and the
                               same in both builds; ~2x ATen's MKL GEMM at small batches on the AMD machines
                               measured; from 256 rows oneDNN's linear, MKL's on Intel CPUs: F32_LARGE_GEMM), else MKL;
                               bfloat16 its own kernel below 128 rows (AMX tiles where the CPU has AMX-BF16, else
                               AVX512-BF16), else ATen's
    kv_write_(cache, fresh, row0, pos)   a slot KV cache's write of new keys or values (a memcpy per head and token)
    decode_attention(qk, K, V, row0, lens, Hq, scale)   one decode token per row over its own slot of the cache
    slot_attention(qk, K, V, slots, lens, Hq, scale)   the same with query row i reading slot slots[i] (prefill tokens)
    kv_write_q8_(cache, scales, fresh, row0, pos), decode_attention_q8(qk, K, V, Ks, Vs, row0, lens, Hq, scale)
                               the same two over an 8-bit cache (int8 values, a float32 scale per position and head)
    add_rms_norm_, rotary_     small fused ops of a Llama decoder layer, for the engine's lean forward
    argmax_rows(logits)        each row's first maximum (as torch.max(dim).indices), for greedy sampling
    masked_argmax_rows(logits, rows, mask, nbits)   the same for given rows under a grammar's token bitmask
    sample_rows(logits, rows, temperature, top_k, top_p, u[, mask, nbits, min_p])   sampled tokens, one uniform draw
                               a row (the sampler's reference distribution, no sort of the vocabulary; a grammar's
                               bitmask applied as the logits are read)
    DecodeStack(layers, ...).run(h, ...)   every decoder layer of a decode step in one call (those ops in order);
                               stack_clock(on) reads and resets its time per kind of op (server.bench's breakdown)

The gather is blocked by LoRA (phase A: U = w * A_i x for four tokens per load of A_i; phase B: each LoRA's
rows of B held in registers while its tokens' y are updated), with explicit SIMD (GCC/Clang vector types)
and one OpenMP region per call: below 64 tokens the threads split the pools' reads (they dominate a small
batch), from 64 tokens they split the tokens. Every token's sums run in the same order whoever shares the
call and however the work is split, so a token's result is bit-identical alone or in any batch. x and y
may be float32 or bfloat16, and so may the pools A and B (a bfloat16 model's: widened as they are read, half the
bytes); routers and all arithmetic stay float32, and a bfloat16 y is rounded once.

Compiled once on first use with torch's JIT extension loader (~30 s, cached under
``~/.cache/torch_extensions`` in a directory named after this CPU's instruction-set flags, since it is
built with ``-march=native``). If there is no compiler, or ``REMIX_DISABLE_EXT=1``, :func:`load`
returns None and callers use the torch-ops path (:mod:`remix.kernels.torch_ops`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import threading

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <chrono>
#include <functional>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
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
inline float hsum(vf v) {  // a fixed pairwise order (depth 4, not 16)
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) h[l] += h[l + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
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
// dots4x4 without AVX-512: its 4 x 4 sixteen-lane sums are 32 256-bit registers, twice AVX2's, and GCC spilled them
// (and moved halves through general registers): routing and phase A of one float32 module at 32 rows took 3-4x their
// AVX-512 time on the same CPU (an AVX2 build on the Zen 4 VM). Here blocks of 2 x 2, each sum in two 8-lane halves:
// lane l of 16 still sums d = l mod 16 in order with one fused multiply-add a step, then hsum's order, then the tail -
// every value the 16-lane code's.
template <typename R, typename XT>
inline void dots2x2_avx2(const XT* x0, const XT* x1, int64_t nq, const R* a0, const R* a1, int64_t nc, int64_t D,
                         float out[2][2], const R* pf0, const R* pf1) {
  __m256 lo[2][2], hi[2][2];
  for (int q = 0; q < 2; ++q) for (int c = 0; c < 2; ++c) lo[q][c] = hi[q][c] = _mm256_setzero_ps();
  const XT* x[2] = {x0, nq > 1 ? x1 : x0};
  const R* a[2] = {a0, nc > 1 ? a1 : a0};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    if (pf0 && (d * static_cast<int64_t>(sizeof(R))) % 64 == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(pf0 + d), _MM_HINT_T1);
      if (pf1) _mm_prefetch(reinterpret_cast<const char*>(pf1 + d), _MM_HINT_T1);
    }
    __m256 al[2], ah[2];
    for (int c = 0; c < 2; ++c) { al[c] = keep8(load8(a[c] + d)); ah[c] = keep8(load8(a[c] + d + 8)); }
    for (int q = 0; q < 2; ++q) {
      const __m256 xl = keep8(load8(x[q] + d)), xh = keep8(load8(x[q] + d + 8));
      for (int c = 0; c < 2; ++c) {
        lo[q][c] = _mm256_fmadd_ps(al[c], xl, lo[q][c]);
        hi[q][c] = _mm256_fmadd_ps(ah[c], xh, hi[q][c]);
      }
    }
  }
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t c = 0; c < nc; ++c) {
      float sum = hsum16(lo[q][c], hi[q][c]);
      for (int64_t e = d; e < D; ++e) sum = __builtin_fmaf(static_cast<float>(a[c][e]), static_cast<float>(x[q][e]), sum);
      out[q][c] = sum;
    }
}
#endif

// out[q * os + c] = scale[q] * dot(xs[q], rows + c * D) for q < nq, c < nc (both <= 4): each row load serves four
// tokens and each token load four rows (a short block repeats its last token or row: computed, never stored). Every
// dot is summed in one order (16 lanes over D, the lanes pairwise, then the tail), so a token's value never depends
// on which tokens share its block.
template <typename R, typename XT = float>
inline void dots4x4(const XT* const* xs, int64_t nq, const R* rows, int64_t nc, int64_t D, float* out, int64_t os,
                    const float* scale, const R* pf = nullptr) {
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  for (int64_t q0 = 0; q0 < nq; q0 += 2)
    for (int64_t c0 = 0; c0 < nc; c0 += 2) {
      float o2[2][2];
      const int64_t mq = std::min<int64_t>(2, nq - q0), mc = std::min<int64_t>(2, nc - c0);
      const bool first = q0 == 0 && pf;  // the first token pair prefetches the next call's rows, two at a time
      dots2x2_avx2(xs[q0], xs[q0 + mq - 1], mq, rows + c0 * D, rows + (c0 + mc - 1) * D, mc, D, o2,
                   first ? pf + c0 * D : nullptr, first ? pf + (c0 + 1) * D : nullptr);
      for (int64_t q = 0; q < mq; ++q)
        for (int64_t c = 0; c < mc; ++c) out[(q0 + q) * os + c0 + c] = scale ? o2[q][c] * scale[q0 + q] : o2[q][c];
    }
#else
  const XT* x[4];
  const R* a[4];
  for (int q = 0; q < 4; ++q) x[q] = xs[std::min<int64_t>(q, nq - 1)];
  for (int c = 0; c < 4; ++c) a[c] = rows + std::min<int64_t>(c, nc - 1) * D;
  vf acc[4][4];
  for (int q = 0; q < 4; ++q) for (int c = 0; c < 4; ++c) acc[q][c] = vf{};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    if (pf && (d * static_cast<int64_t>(sizeof(R))) % 64 == 0)  // a line of each of the four rows the next call reads
      for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + c * D + d), _MM_HINT_T1);
    vf av[4];
    for (int c = 0; c < 4; ++c) av[c] = keep(load(a[c] + d));
    for (int q = 0; q < 4; ++q) {
      const vf xv = keep(load(x[q] + d));
      for (int c = 0; c < 4; ++c) acc[q][c] += av[c] * xv;
    }
  }
  // every sum taken at a constant index first: read at the runtime indices below, acc had to live in memory, and
  // GCC stored all sixteen accumulators on every step of the loop above (32 stores a step in route_rows' bfloat16
  // instance: the router ran at a third of its arithmetic's speed)
  float sums[4][4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) sums[q][c] = hsum(acc[q][c]);
  // The tail of D an explicit fused multiply-add a step (as dot_tile's): written `s += a * x`, GCC vectorised the loop
  // as rounded products added in order and left a remainder of FMAs, split by the build's vector width - the AVX2 and
  // AVX-512 builds' routers and phase A differed by an ulp where D is not a multiple of 16 (35th session)
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t c = 0; c < nc; ++c) {
      float s = sums[q][c];
      for (int64_t e = d; e < D; ++e) s = __builtin_fmaf(static_cast<float>(a[c][e]), static_cast<float>(x[q][e]), s);
      out[q * os + c] = scale ? s * scale[q] : s;
    }
#endif
}

// Y[rows[p]][o0, o1) += sum_{c < CN} U[p * us + c] * b[c] for the np pairs of one LoRA (o0 a multiple of 2L), where
// Y[t][o] is Y[t * ldy + o - yo] (y itself: ldy = O, yo = 0; a block of columns from yo: a buffer of its own). For each
// slice of 2L outputs the CN rows of b sit in registers while every pair's y is read, updated and written once (in
// pair order, so a token listed twice is updated twice). Which code path an output takes depends only on its index
// o, so its sum runs in one order however the outputs are split between threads.
// Rows of B fresh from memory (a small batch): axpy_lora asks, at each slice of 2L outputs from o, for the CN rows' slice
// 256 bytes on (two lines of a float32 row, one of a bfloat16 row).
template <int CN, typename R>
inline void prefetch_rows_ahead(const R* b, int64_t O, int64_t o) {
  for (int c = 0; c < CN; ++c) {
    const R* ahead = b + c * O + o + 256 / sizeof(R);
    __builtin_prefetch(ahead, 0, 3);
    if constexpr (sizeof(R) == 4) __builtin_prefetch(ahead + L, 0, 3);
  }
}
template <int CN, typename R>
void axpy_lora(float* Y, int64_t ldy, int64_t yo, int64_t O, const R* b, const float* U, int64_t us, const int64_t* rows,
               int64_t np, int64_t o0, int64_t o1, bool prefetch) {
  int64_t o = o0;
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  // Without AVX-512 the 16-lane vectors below are pairs of 256-bit registers, and the CN rows of B for 2L outputs (4 CN
  // of them) do not fit AVX2's sixteen: GCC spilled them and moved halves through general registers - phase B of one
  // float32 module at 32 rows took 210 us against 14-29 with AVX-512 (an AVX2 build, -march=haswell, run on the Zen 4
  // VM). Here eight outputs a step, CN registers of B: each output's sum in the same order, one fused multiply-add per
  // c, as below (outputs bit-identical to the old AVX2 build's): that phase B 210 -> 21 us (576 -> 1536), 82 -> 11
  // (1536 -> 576); with dots4x4's AVX2 path the ReMix delta of one float32 module (30 in turn, 10 at 512 rows) 314 / 261
  // -> 39 / 52 us at 32 rows and 4167 / 3156 -> 473 / 488 at 512, bfloat16 at 32 rows 280 / 226 -> 52 / 56.
  for (; o + 8 <= o1; o += 8) {
    __m256 bv[CN];
    for (int c = 0; c < CN; ++c) bv[c] = load8(b + c * O + o);
    if (prefetch && (o - o0) % (2 * L) == 0) prefetch_rows_ahead<CN>(b, O, o);
    for (int64_t p = 0; p < np; ++p) {
      float* y = Y + rows[p] * ldy + (o - yo);
      const float* u = U + p * us;
      __m256 y0 = _mm256_loadu_ps(y);
      for (int c = 0; c < CN; ++c) y0 = _mm256_fmadd_ps(_mm256_set1_ps(u[c]), bv[c], y0);
      _mm256_storeu_ps(y, y0);
    }
  }
#endif
  for (; o + 2 * L <= o1; o += 2 * L) {
    vf b0[CN], b1[CN];
    for (int c = 0; c < CN; ++c) { b0[c] = load(b + c * O + o); b1[c] = load(b + c * O + o + L); }
    if (prefetch) prefetch_rows_ahead<CN>(b, O, o);
    for (int64_t p = 0; p < np; ++p) {
      float* y = Y + rows[p] * ldy + (o - yo);
      const float* u = U + p * us;
      vf y0 = load(y), y1 = load(y + L);
      for (int c = 0; c < CN; ++c) { y0 += u[c] * b0[c]; y1 += u[c] * b1[c]; }
      store(y, y0);
      store(y + L, y1);
    }
  }
  for (; o + L <= o1; o += L) {
    vf b0[CN];
    for (int c = 0; c < CN; ++c) b0[c] = load(b + c * O + o);
    for (int64_t p = 0; p < np; ++p) {
      float* y = Y + rows[p] * ldy + (o - yo);
      const float* u = U + p * us;
      vf y0 = load(y);
      for (int c = 0; c < CN; ++c) y0 += u[c] * b0[c];
      store(y, y0);
    }
  }
  for (; o < o1; ++o)
    for (int64_t p = 0; p < np; ++p) {
      float* y = Y + rows[p] * ldy + (o - yo);
      const float* u = U + p * us;
      float acc = *y;
      for (int c = 0; c < CN; ++c) acc = __builtin_fmaf(u[c], static_cast<float>(b[c * O + o]), acc);
      *y = acc;
    }
}

template <typename R>
void axpy_rows(int64_t cn, float* Y, int64_t ldy, int64_t yo, int64_t O, const R* b, const float* U, int64_t us,
               const int64_t* rows, int64_t np, int64_t o0, int64_t o1, bool prefetch) {
  switch (cn) {
    case 8: return axpy_lora<8, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
    case 7: return axpy_lora<7, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
    case 6: return axpy_lora<6, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
    case 5: return axpy_lora<5, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
    case 4: return axpy_lora<4, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
    case 3: return axpy_lora<3, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
    case 2: return axpy_lora<2, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
    default: return axpy_lora<1, R>(Y, ldy, yo, O, b, U, us, rows, np, o0, o1, prefetch);
  }
}

// The (token, j) pairs of a batch with a LoRA and a nonzero weight, sorted by LoRA id (counting sort, so the same
// input gives the same order): LoRA i's are [start[i], start[i + 1]); rows[p] is the pair's token, scale[p] its
// weight; blocks lists (LoRA, first pair) of every run of up to four pairs of one LoRA (phase A's work items).
struct Pairs {
  std::vector<int64_t> start, rows, blocks;
  std::vector<float> scale;
  Pairs(const int64_t* sel, const float* w, int64_t T, int64_t k, int64_t N) : start(N + 1, 0) {
    for (int64_t e = 0; e < T * k; ++e) if (sel[e] >= 0 && w[e] != 0.f) ++start[sel[e] + 1];
    for (int64_t i = 0; i < N; ++i) start[i + 1] += start[i];
    rows.resize(start[N]);
    scale.resize(start[N]);
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < T * k; ++e)
      if (sel[e] >= 0 && w[e] != 0.f) { const int64_t p = fill[sel[e]]++; rows[p] = e / k; scale[p] = w[e]; }
    for (int64_t i = 0; i < N; ++i)
      for (int64_t p0 = start[i]; p0 < start[i + 1]; p0 += 4) { blocks.push_back(i); blocks.push_back(p0); }
  }
  int64_t size() const { return static_cast<int64_t>(rows.size()); }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks.size()) / 2; }
};

// A [N*r, D] and B^T [N*r, O] of every LoRA, float32 or bfloat16 (bf16: both; widened to float32 as they are read,
// every sum in float32: bfloat16 pools halve the bytes a small batch reads, the arithmetic is the same).
// rank: each LoRA's own rank (its first rank[i] rows of A and of B^T; the rest, up to r, the zeros a stack of several
// ranks pads it with), or null where every LoRA has rank r. The padding's products are exact zeros, so skipping them
// changes no sum; a stack of rank-8 adapters beside one of rank 16 (a peft LoRA) had read and multiplied twice their
// pools' bytes. 90 modules of the default base's FFN shapes in bfloat16, a ReMix pool (n 8, r 8) beside a rank-16
// LoRA, every token on the ReMix adapter, both bindings in turn (29th session, Zen 4 VM, medians of 15 rounds): the
// whole modules (base GEMM included) 12.71 -> 11.39 ms at 8 rows, 23.45 -> 21.29 at 32 (scripts/ab_ranks.py).
struct Pools {
  const void *a, *bt;
  int64_t r, N, D, O;
  bool bf16 = false;
  const int64_t* rank = nullptr;
  int64_t rank_of(int64_t i) const { return rank ? rank[i] : r; }
};

// phase A prefetches, while one call of dots4x4 runs, the four rows of A the next call reads (into L2, a line of each
// per 64 bytes of a row, as the AMX GEMM does with W): at 8 to 32 rows each LoRA's rows come from memory, a few KB
// each, too short for the hardware prefetchers. In turn in one process (default base, medians of 8 rounds, two runs
// in both orders; twenty-fifth session's Intel VM), bfloat16 (vdpbf16ps): the FFN projections 0.98 of the time at 8
// sequences with one adapter, 0.94-0.95 with four, 0.95-1.01 at 32 with one, 0.92-0.93 with four, decode steps
// 0.95-1.00; float32: 1.00-1.03 / 0.96-0.97 / 0.95-1.00 / 0.98-1.00. Only where the prefetch goes changes, so the
// outputs do not. g_pa_pf: off for A/B runs (_phase_a_prefetch).
bool g_pa_pf = true;
bool g_phase_a_dot = true;  // A/B runs
#ifdef REMIX_DOT_BF16
// dots4x4 for bfloat16 x rows and pool rows (the overload phase_a_of takes for bfloat16 x) on vdpbf16ps: two exact
// products per float32 lane, 32 inputs a step, the tail by zero-masked loads; then hsum. One order per dot whatever
// the block, as dots4x4; the sums differ from dots4x4's (which widens both and runs 16-lane FMAs) only by their order.
inline void dots4x4(const uint16_t* const* xs, int64_t nq, const uint16_t* rows, int64_t nc, int64_t D, float* out,
                    int64_t os, const float* scale, const uint16_t* pf = nullptr) {
  const uint16_t* x[4];
  const uint16_t* a[4];
  for (int q = 0; q < 4; ++q) x[q] = xs[std::min<int64_t>(q, nq - 1)];
  for (int c = 0; c < 4; ++c) a[c] = rows + std::min<int64_t>(c, nc - 1) * D;
  __m512 acc[4][4];
  for (int q = 0; q < 4; ++q) for (int c = 0; c < 4; ++c) acc[q][c] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    if (pf)
      for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + c * D + d), _MM_HINT_T1);
    __m512bh av[4];
    for (int c = 0; c < 4; ++c) av[c] = (__m512bh)_mm512_loadu_si512(a[c] + d);
    for (int q = 0; q < 4; ++q) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[q] + d);
      for (int c = 0; c < 4; ++c) acc[q][c] = _mm512_dpbf16_ps(acc[q][c], av[c], xv);
    }
  }
  if (d < D) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (D - d)) - 1);
    __m512bh av[4];
    for (int c = 0; c < 4; ++c) av[c] = (__m512bh)_mm512_maskz_loadu_epi16(m, a[c] + d);
    for (int q = 0; q < 4; ++q) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x[q] + d);
      for (int c = 0; c < 4; ++c) acc[q][c] = _mm512_dpbf16_ps(acc[q][c], av[c], xv);
    }
  }
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t c = 0; c < nc; ++c) {
      const float s = hsum((vf)acc[q][c]);
      out[q * os + c] = scale ? s * scale[q] : s;
    }
}
#endif

// Phase A over blocks [b0, b1): U[p, :] = scale[p] * A[i] @ x[rows[p]] for the pairs of each block (four share a load).
// X float32 (a float32 call, or a bfloat16 call's widened copy) or bfloat16 (x itself, with bfloat16 pools: R uint16_t).
template <typename R, typename XT>
void phase_a_of(const Pairs& pr, int64_t b0, int64_t b1, const XT* X, const Pools& pl, float* U) {
  const int64_t r = pl.r, D = pl.D;
  const R* A = static_cast<const R*>(pl.a);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i = pr.blocks[2 * b], p0 = pr.blocks[2 * b + 1];
    const int64_t nq = std::min<int64_t>(4, pr.start[i + 1] - p0);
    const XT* xs[4];
    for (int64_t q = 0; q < nq; ++q) xs[q] = X + pr.rows[p0 + q] * D;
    const int64_t next = b + 1 < b1 ? pr.blocks[2 * b + 2] : -1;  // the next block's LoRA
    const int64_t rk = pl.rank_of(i);  // (U's entries past it are neither written nor read)
    for (int64_t c0 = 0; c0 < rk; c0 += 4) {
      // the rows the next call reads: this LoRA's next four, or the next block's LoRA's first four (into L2)
      const R* pf = !g_pa_pf ? nullptr
                    : c0 + 4 < rk ? A + (i * r + c0 + 4) * D : next >= 0 && next != i ? A + next * r * D : nullptr;
      dots4x4(xs, nq, A + (i * r + c0) * D, std::min<int64_t>(4, rk - c0), D, U + p0 * r + c0, r, pr.scale.data() + p0, pf);
    }
  }
}

// Phase B over outputs [o0, o1): Y[rows[p]] += B[i] @ U[p] for every LoRA i in ascending id, its rows of B read once
// (Y[t][o] at Y[t * ldy + o - yo], as axpy_lora).
template <typename R>
void phase_b_of(const Pairs& pr, const Pools& pl, const float* U, float* Y, int64_t ldy, int64_t yo, int64_t o0,
                int64_t o1, bool prefetch) {
  const int64_t r = pl.r, O = pl.O;
  const R* Bt = static_cast<const R*>(pl.bt);
  for (int64_t i = 0; i < pl.N; ++i) {
    const int64_t np = pr.start[i + 1] - pr.start[i];
    if (np == 0) continue;
    const int64_t rk = pl.rank_of(i);
    for (int64_t c0 = 0; c0 < rk; c0 += 8)
      axpy_rows(std::min<int64_t>(8, rk - c0), Y, ldy, yo, O, Bt + (i * r + c0) * O, U + pr.start[i] * r + c0, r,
                pr.rows.data() + pr.start[i], np, o0, o1, prefetch);
  }
}

// Whether phase_a reads a bfloat16 call's x as it is (else a float32 copy of it, X).
inline bool phase_a_reads_bf16(const Pools& pl) {
#ifdef REMIX_DOT_BF16
  return pl.bf16 && g_phase_a_dot;
#else
  return false;
#endif
}

// phase_a: with Xh (a bfloat16 call's own x rows, row t at Xh + t D) and bfloat16 pools, the bfloat16 dots4x4 reads them
// (g_phase_a_dot: on unless switched off for an A/B run), else dots4x4 on X (float32). On the 2-core Zen 5 VM (2026-12-03), 90 modules of one
// adapter (n 8, k 2, r 8) in bfloat16, both paths in turn in one process, medians of 15 rounds: the ReMix delta at
// 8 / 32 / 128 / 512 rows 0.96 / 0.75 / 0.84 / 0.87 of the widening path's for 1536 -> 576 and 0.87 / 0.82 / 0.91 /
// 0.94 for 576 -> 1536 (45.1 -> 33.8 us at 32 rows, 1536 -> 576); after the bfloat16 rounding the two paths' outputs
// were equal in 7 of these 8 cases and in places an ulp apart in the eighth. (Session 14 measured phase A on vdpbf16ps
// on the Intel VM: 0.82-0.90 at 8-32 rows on 1536 -> 576 only, 0.98-1.02 at 64-512, and did not keep it; this VM's
// arithmetic is the delta's limit.)
void phase_a(const Pairs& pr, int64_t b0, int64_t b1, const float* X, const uint16_t* Xh, const Pools& pl, float* U) {
#ifdef REMIX_DOT_BF16
  if (Xh && phase_a_reads_bf16(pl)) return phase_a_of<uint16_t>(pr, b0, b1, Xh, pl, U);
#endif
  if (pl.bf16) return phase_a_of<c10::BFloat16>(pr, b0, b1, X, pl, U);
  phase_a_of<float>(pr, b0, b1, X, pl, U);
}
void phase_b(const Pairs& pr, const Pools& pl, const float* U, float* Y, int64_t ldy, int64_t yo, int64_t o0, int64_t o1,
             bool prefetch) {
  if (pl.bf16) return phase_b_of<c10::BFloat16>(pr, pl, U, Y, ldy, yo, o0, o1, prefetch);
  phase_b_of<float>(pr, pl, U, Y, ldy, yo, o0, o1, prefetch);
}

// A token share is gathered TILE tokens at a time for each adapter among its tokens (up to 8: 64 to 512 tokens), so
// that a LoRA has ~16 pairs in a tile whatever the mix and its rows of B, read once a tile, serve them all: the tile's
// y rows (and a bfloat16 call's float32 copy of its x) stay in the thread's cache across both phases. A token's sums do
// not depend on its tile (each phase runs one order per token). Four adapters mixed round-robin, 45 modules, the two
// rules in turn in one process (twenty-fourth session's Intel VM, medians of 9 rounds): tiles of 64 x adapters against
// 64 at 512 / 1024 tokens took 0.85 / 0.90 (576 -> 1536) and 0.90 / 0.95 (1536 -> 576) of the module's time in
// bfloat16 (the adapters' share of it ~0.7), 0.95 / 0.96 and 0.94 / 0.97 in float32; one adapter is unchanged.
// bfloat16 takes tiles of TILE_BF16 tokens an adapter (its y goes through phase_b_bf16's blocks of YBLOCK columns, so a
// tile's float32 y is C x YBLOCK, not C x O): one adapter's ReMix delta at 512 tokens (30 modules a shape, in turn in
// one process, medians of 12 rounds, two runs; 26th session's Intel VM) 466 / 439 -> 430 / 367 us (576 -> 1536) and
// 431 / 424 -> 405 / 389 (1536 -> 576) with tiles of 256 against 64; at 1,024 tokens 256 and 512 within 3 % of 64;
// the engine's prefill of 32 prompts of 128 tokens 1.866 -> 1.819 s and 1.955 -> 1.930 (medians of 6). float32 updates
// y itself (C x O floats in the tile): 256 was slower at 576 -> 1536 (385 -> 407, 345 -> 470 us), so it keeps 64.
constexpr int64_t TILE = 64, TILE_BF16 = 256;

void check_pools(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& a, const torch::Tensor& bt, int64_t r) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU [T, D] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == x.scalar_type() && y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0),
              "y must be a contiguous [T, O] tensor of x's dtype");
  TORCH_CHECK((a.scalar_type() == torch::kFloat32 || a.scalar_type() == torch::kBFloat16) && bt.scalar_type() == a.scalar_type() &&
              a.is_contiguous() && bt.is_contiguous(), "pools must be contiguous, both float32 or both bfloat16");
  TORCH_CHECK(r >= 1 && r <= 256 && a.size(0) % r == 0 && a.size(1) == x.size(1) && bt.size(0) == a.size(0) && bt.size(1) == y.size(1),
              "pool shapes: a [N*r, D], bt [N*r, O]");
}

// Uninitialised scratch of n floats that starts on a cache line (new float[] starts 16 bytes into one): with rows of
// whole lines (D, O multiples of 16), no 64-byte vector load or store of x's and y's float32 copies straddles two.
struct FreeScratch { void operator()(float* p) const { std::free(p); } };
using Scratch = std::unique_ptr<float[], FreeScratch>;
inline Scratch scratch(int64_t n) {
  void* p = std::aligned_alloc(64, static_cast<size_t>(std::max<int64_t>(1, (n * 4 + 63) / 64)) * 64);
  TORCH_CHECK(p != nullptr, "out of memory for the kernel's scratch");
  return Scratch(static_cast<float*>(p));
}

// bfloat16 <-> float32 in branch-free integer code, sixteen values a step with AVX-512 (the compiler's own
// vectorisation of the scalar loops below takes 256-bit registers and a permute per store: at 512 rows the copies of a
// bfloat16 call's x and y took ~a quarter of its routing and gather), the same code per value elsewhere. narrow rounds
// to nearest even and keeps denormals, as c10's conversion does (AVX512-BF16's vcvtneps2bf16 flushes them to zero:
// checked on this project's Intel VM), and quiets a NaN.
inline void widen(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))), 16));
#endif
  for (; i < n; ++i) { uint32_t b = static_cast<uint32_t>(src[i]) << 16; std::memcpy(dst + i, &b, 4); }
}
#ifdef __AVX512F__
bool g_narrow_cvt = true;  // A/B runs (_narrow_cvt)
// narrow()'s rounding of sixteen float32 lanes (bits b) to bfloat16, kept in the 32-bit lanes (the low 16 bits zero):
// to nearest even, a NaN kept a quiet NaN. round_v's bfloat16 rounding, and narrow16's where vcvtneps2bf16 is not exact.
inline __m512i round_lanes_bf16(__m512i b) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i r = _mm512_and_si512(
      _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)))), hi);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_or_epi32(r, nan, _mm512_and_si512(b, hi), _mm512_set1_epi32(0x00400000));
}
// Sixteen float32 lanes rounded to bfloat16 as narrow() rounds them (to nearest even; NaN kept quiet), as 16-bit lanes.
// With AVX512-BF16, vcvtneps2bf16 where no lane is a denormal, an infinity or a NaN (it rounds every normal float to
// nearest even as the integer code does, but flushes denormals to zero), else the integer code.
inline __m256i narrow16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
#ifdef REMIX_DOT_BF16
  if (g_narrow_cvt) {
    // exponent 0 (a nonzero lane: a denormal) or 255: the exponent field minus one wraps to >= 0x7F000000
    const __m512i e = _mm512_and_si512(b, _mm512_set1_epi32(0x7F800000));
    const __mmask16 odd = _mm512_mask_cmpge_epu32_mask(_mm512_test_epi32_mask(b, _mm512_set1_epi32(0x7FFFFFFF)),
                                                       _mm512_sub_epi32(e, _mm512_set1_epi32(0x00800000)),
                                                       _mm512_set1_epi32(0x7F000000));
    if (__builtin_expect(odd == 0, 1)) return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  }
#endif
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_lanes_bf16(b), 16));
}
#endif
inline void narrow(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {  // round to nearest even
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), narrow16(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, src + i, 4);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = static_cast<uint16_t>(nan ? ((b >> 16) | 0x40u) : rounded);
  }
}

// Phase B of a bfloat16 call on y itself (yh: bfloat16 rows of O, T of them): outputs [o0, o1) in blocks of YBLOCK
// columns, each block's rows of the tokens with a selection (has[t]) widened into yb [T, YBLOCK] (float32: 32 KB at 64
// tokens, in L1 while every LoRA passes over it), updated by phase B and rounded once back into y. Every y element gets
// the sums a float32 copy of the whole of y would get (its LoRAs in ascending id, c ascending, one rounding), with ~4
// bytes per element through L2 instead of ~26 by count (widen, each LoRA's read and write, narrow of a copy in L2).
// With widen / narrow's 512-bit loops, route_gather_ alone (one adapter, n 8, k 2, r 8; this build and the one before
// timed in turn in one process, 40 rounds, medians, two runs) at 8 / 32 / 64 / 128 / 512 rows: 576 -> 1536 in
// 0.86-0.87 / 0.74-0.75 / 0.88-0.98 / 0.83-0.87 / 0.79-0.88 of the time, 1536 -> 576 in 0.93-0.94 / 0.83-0.85 /
// 0.94-0.95 / 0.91-0.93 / 0.91-0.95; the outputs bit-identical. (Four pairs' updates interleaved, eight independent
// chains of FMAs instead of two, changed nothing once y sat in L1: 0.96-1.04.)
constexpr int64_t YBLOCK = 128;  // a multiple of 2L: blocks end where axpy_lora's vector slices do
void phase_b_bf16(const Pairs& pr, const Pools& pl, const float* U, uint16_t* yh, int64_t T, const char* has, float* yb,
                  int64_t o0, int64_t o1, bool prefetch) {
  const int64_t O = pl.O;
  for (int64_t b0 = o0; b0 < o1; b0 += YBLOCK) {
    const int64_t n = std::min(YBLOCK, o1 - b0);
    for (int64_t t = 0; t < T; ++t) if (has[t]) widen(yh + t * O + b0, yb + t * YBLOCK, n);
    phase_b(pr, pl, U, yb, YBLOCK, b0, b0, b0 + n, prefetch);
    for (int64_t t = 0; t < T; ++t) if (has[t]) narrow(yb + t * YBLOCK, yh + t * O + b0, n);
  }
}

// Top-k of the float32 router logits of tokens [t0, t1) (rows of x), each within its slot's pool (ties to the lower
// index): writes global ids to ip [T, kmax] and the slot's omega to wp. Tokens of one slot go in blocks of four
// that share each router load.
struct Routing {
  const float* router;
  const int64_t *slot, *off, *n, *k;  // slot: [T] or null (every token slot 0)
  const float* omega;
  int64_t S, kmax;
};

// Whether slot s of S (n: LoRAs a slot) has a pool to route in: not a missing slot, one past the tables or an empty pool.
inline bool slot_routes(const int64_t* n, int64_t S, int64_t s) { return s >= 0 && s < S && n[s] > 0; }

// Token t's slot when it has a pool to route in, else -1.
inline int64_t routed_slot(const Routing& rt, int64_t t) {
  const int64_t s = rt.slot ? rt.slot[t] : 0;
  return slot_routes(rt.n, rt.S, s) ? s : -1;
}

// Tokens by slot (counting sort, no slot / empty pool skipped): slot s's tokens are tok[start[s], start[s + 1]).
inline void tokens_by_slot(const Routing& rt, int64_t t0, int64_t t1, std::vector<int64_t>& start, std::vector<int64_t>& tok) {
  const int64_t S = rt.S;
  start.assign(S + 1, 0);
  for (int64_t t = t0; t < t1; ++t) { const int64_t s = routed_slot(rt, t); if (s >= 0) ++start[s + 1]; }
  for (int64_t s = 0; s < S; ++s) start[s + 1] += start[s];
  tok.resize(start[S]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = t0; t < t1; ++t) { const int64_t s = routed_slot(rt, t); if (s >= 0) tok[fill[s]++] = t; }
}

// Token t's top k of its slot s's n logits lg (ties to the lower index): global ids into ip [T, kmax], omega into wp.
inline void topk_token(const float* lg, int64_t t, int64_t s, const Routing& rt, int64_t* ip, float* wp) {
  const int64_t o = rt.off[s], n = rt.n[s], k = rt.k[s];
  uint64_t taken = 0;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float value = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      if ((taken >> i) & 1ull) continue;
      if (best < 0 || lg[i] > value) { best = i; value = lg[i]; }  // strict >: ties keep the lower index
    }
    taken |= 1ull << best;
    ip[t * rt.kmax + j] = o + best;
    wp[t * rt.kmax + j] = rt.omega[s];
  }
}

// x's first row is token x0's; float32 x, or a bfloat16 call's own x (XT c10::BFloat16: each element widened in a
// register where it is read - the same float values as a widened copy, summed in the same order, without the copy,
// and with half the bytes of four x rows in L1 beside four router rows).
template <typename XT>
void route_rows(const XT* x, int64_t x0, int64_t D, int64_t t0, int64_t t1, const Routing& rt, int64_t* ip, float* wp) {
  const int64_t S = rt.S;
  std::vector<int64_t> start, tok;
  tokens_by_slot(rt, t0, t1, start, tok);
  float logits[4 * 64];
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b0 = start[s]; b0 < start[s + 1]; b0 += 4) {
      const int64_t nq = std::min<int64_t>(4, start[s + 1] - b0), o = rt.off[s], n = rt.n[s];
      const XT* xs[4];
      for (int64_t q = 0; q < nq; ++q) xs[q] = x + (tok[b0 + q] - x0) * D;
      for (int64_t c0 = 0; c0 < n; c0 += 4)
        dots4x4(xs, nq, rt.router + (o + c0) * D, std::min<int64_t>(4, n - c0), D, logits + c0, 64, nullptr);
      for (int64_t q = 0; q < nq; ++q) topk_token(logits + q * 64, tok[b0 + q], s, rt, ip, wp);
    }
}

// The router logits of every routed token of x [T, D] for this thread's share (h of nh) of the units (slot, block of
// four router rows) of the slots in use: logits[t * 64 + i] for LoRA i of token t's slot. Each logit is dots4x4's sum
// for its token and row, whatever block it is computed in, so the split does not change a value. run() takes it below
// SPLIT_POOLS_BELOW tokens of two or more adapters: split by tokens, every thread read every router of the batch (a
// token of each adapter on each thread: four adapters' float32 routers, 4 x 8 x 1536 x 4 bytes for a down_proj, read
// twice); split by units, each reads its share once. The decode stack's FFN projections (default base, bfloat16, four
// adapters mixed, both ways in turn in one process, medians of 8 rounds, two runs in both orders; 26th session's
// Intel VM): 8 sequences 12.77 -> 12.54 and 12.42 -> 12.15 ms a step, 32 sequences 17.33 -> 17.20 and 16.53 -> 16.75
// (noise); with one adapter (two units: each thread half the router for every token) 32 sequences went 13.37 ->
// 13.61, and in the 27th session (the split by tokens still on a float32 copy of x, since dropped) 1 / 8 / 32 sequences
// 9.49 / 10.96 / 14.80 ms by tokens, 9.47 / 10.86 / 14.79 by units (noise), so one adapter keeps the split by tokens.
// g_route_units: off for tests and A/B runs (_route_units).
bool g_route_units = true;
template <typename XT>
void route_logits_share(const XT* x, int64_t D, int64_t T, const Routing& rt, int64_t h, int64_t nh, float* logits) {
  std::vector<int64_t> start, tok;
  tokens_by_slot(rt, 0, T, start, tok);
  std::vector<int64_t> units;  // slot * 64 + first row
  for (int64_t s = 0; s < rt.S; ++s)
    if (start[s + 1] > start[s])
      for (int64_t c0 = 0; c0 < rt.n[s]; c0 += 4) units.push_back(s * 64 + c0);
  const int64_t nu = static_cast<int64_t>(units.size());
  float out[4 * 4];
  for (int64_t u = nu * h / nh; u < nu * (h + 1) / nh; ++u) {
    const int64_t s = units[u] / 64, c0 = units[u] % 64, nc = std::min<int64_t>(4, rt.n[s] - c0);
    for (int64_t b0 = start[s]; b0 < start[s + 1]; b0 += 4) {
      const int64_t nq = std::min<int64_t>(4, start[s + 1] - b0);
      const XT* xs[4];
      for (int64_t q = 0; q < nq; ++q) xs[q] = x + tok[b0 + q] * D;
      dots4x4(xs, nq, rt.router + (rt.off[s] + c0) * D, nc, D, out, 4, nullptr);
      for (int64_t q = 0; q < nq; ++q)
        for (int64_t c = 0; c < nc; ++c) logits[tok[b0 + q] * 64 + c0 + c] = out[q * 4 + c];
    }
  }
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

// Y[t, o0 + c] = dot(X[t], W[c]) (+ bias[c]) for t < RT, c < nw (<= GO; a short block repeats its last row of W:
// computed, never stored). The dot-product form on W's own [O, D] layout (no packed copy of the weights): each of the
// GO x RT sums has its own accumulator of L lanes over D, then hsum, then the tail of D - one order per output whatever
// the block shape, so a row of X gets bit-identical outputs alone or in any batch, and from any thread split.
// pf: npf rows of the next block of W (pstride elements apart) that this tile prefetches, one cache line of each per
// step of L over D (a step reads 64 bytes of a row): see dot_gemm.
// From two rows each loaded vector is kept in a register (keep): every float32 linear of the default base, the build
// before and this one in turn in one process (33rd session, Zen 4 VM, medians of 12 passes), 8 / 16 / 32 / 64 rows
// in 0.79-0.81 / 0.98 / 0.97 / 0.95 of the time; one and two rows within the noise (+-3.5 %), so the one-row tile
// (a GEMV step: each W vector used once either way) is left as it was.
template <int GO, int RT, int PFL>
inline void dot_tile(const float* X, int64_t D, const float* W, int64_t nw, float* Y, int64_t ldy, const float* bias,
                     const float* pf, int64_t npf, int64_t pstride) {
  const float* a[GO];
  for (int c = 0; c < GO; ++c) a[c] = W + std::min<int64_t>(c, nw - 1) * D;
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  // AVX2: each 16-lane sum in two 8-lane halves (lanes 0-7, 8-15), as dots2x2_avx2: lane l still sums d = l mod 16 in
  // order, one fused multiply-add a step, then hsum's order (hsum16), the tail, the bias - every output the AVX-512
  // code's, bit for bit. The tile shapes (dot_gemm_any) keep the 2 RT GO halves and the loaded vectors in AVX2's 16
  // registers.
  __m256 acc[2][RT][GO];  // [lanes 0-7 / 8-15]
  for (int h = 0; h < 2; ++h) for (int q = 0; q < RT; ++q) for (int c = 0; c < GO; ++c) acc[h][q][c] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    for (int64_t p = 0; p < npf; ++p) __builtin_prefetch(pf + p * pstride + d, 0, PFL);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256 av[GO];
      for (int c = 0; c < GO; ++c) av[c] = RT > 1 ? keep8(load8(a[c] + d + 8 * h)) : load8(a[c] + d + 8 * h);
      for (int q = 0; q < RT; ++q) {
        const __m256 xv = GO > 1 ? keep8(load8(X + q * D + d + 8 * h)) : load8(X + q * D + d + 8 * h);
        for (int c = 0; c < GO; ++c) acc[h][q][c] = _mm256_fmadd_ps(av[c], xv, acc[h][q][c]);
      }
    }
  }
  float sums[RT * GO];
  for (int q = 0; q < RT; ++q) for (int c = 0; c < GO; ++c) sums[q * GO + c] = hsum16(acc[0][q][c], acc[1][q][c]);
#else
  vf acc[RT][GO];
  for (int q = 0; q < RT; ++q) for (int c = 0; c < GO; ++c) acc[q][c] = vf{};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    for (int64_t p = 0; p < npf; ++p) __builtin_prefetch(pf + p * pstride + d, 0, PFL);
    vf av[GO];
    for (int c = 0; c < GO; ++c) av[c] = RT > 1 ? keep(load(a[c] + d)) : load(a[c] + d);
    for (int q = 0; q < RT; ++q) {
      const vf xv = RT > 1 ? keep(load(X + q * D + d)) : load(X + q * D + d);
      for (int c = 0; c < GO; ++c) acc[q][c] += av[c] * xv;
    }
  }
  float sums[RT * GO];
  hsum_many(&acc[0][0], RT * GO, sums);
#endif
#ifdef __AVX512F__
  if (d == D && GO <= 16) {  // no tail of D: each row of the tile's outputs (+ bias) in one masked store
    const __mmask16 m = static_cast<__mmask16>((1u << nw) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
    for (int q = 0; q < RT; ++q) {
      const __m512 s = _mm512_maskz_loadu_ps(m, sums + q * GO);
      _mm512_mask_storeu_ps(Y + q * ldy, m, bias ? _mm512_add_ps(s, bv) : s);
    }
    return;
  }
#endif
  for (int q = 0; q < RT; ++q)
    for (int64_t c = 0; c < nw; ++c) {
      float s = sums[q * GO + c];
      for (int64_t e = d; e < D; ++e) s = __builtin_fmaf(a[c][e], X[q * D + e], s);  // one rounding a step, in every build
      Y[q * ldy + c] = bias ? s + bias[c] : s;
    }
}

#ifdef REMIX_DOT_BF16
// dot_tile for bfloat16 X, W, Y and bias with AVX512-BF16: vdpbf16ps adds two products of bfloat16 pairs into each float32
// lane (lane l holds d = 32 i + 2 l, 2 l + 1), the D tail a zero-masked load (zeros add nothing); then hsum, the bias
// (widened), one rounding to bfloat16. One order per output, as dot_tile.
template <int GO, int RT, int PFL>
inline void dot_tile(const uint16_t* X, int64_t D, const uint16_t* W, int64_t nw, uint16_t* Y, int64_t ldy,
                     const uint16_t* bias, const uint16_t* pf, int64_t npf, int64_t pstride) {
  const uint16_t* a[GO];
  for (int c = 0; c < GO; ++c) a[c] = W + std::min<int64_t>(c, nw - 1) * D;
  __m512 acc[RT][GO];
  for (int q = 0; q < RT; ++q) for (int c = 0; c < GO; ++c) acc[q][c] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    for (int64_t p = 0; p < npf; ++p) __builtin_prefetch(pf + p * pstride + d, 0, PFL);
    __m512bh av[GO];
    for (int c = 0; c < GO; ++c) av[c] = (__m512bh)_mm512_loadu_si512(a[c] + d);
    for (int q = 0; q < RT; ++q) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(X + q * D + d);
      for (int c = 0; c < GO; ++c) acc[q][c] = _mm512_dpbf16_ps(acc[q][c], av[c], xv);
    }
  }
  if (d < D) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (D - d)) - 1);
    __m512bh av[GO];
    for (int c = 0; c < GO; ++c) av[c] = (__m512bh)_mm512_maskz_loadu_epi16(m, a[c] + d);
    for (int q = 0; q < RT; ++q) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, X + q * D + d);
      for (int c = 0; c < GO; ++c) acc[q][c] = _mm512_dpbf16_ps(acc[q][c], av[c], xv);
    }
  }
  float sums[RT * GO];
  hsum_many(reinterpret_cast<const vf*>(&acc[0][0]), RT * GO, sums);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (GO <= 16) {  // each row of the tile's outputs (+ bias) rounded as narrow() does, one masked store
    const __mmask16 m = static_cast<__mmask16>((1u << nw) - 1);
    const __m512 bv = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bias)), 16))
                           : _mm512_setzero_ps();
    for (int q = 0; q < RT; ++q) {
      const __m512 s = _mm512_maskz_loadu_ps(m, sums + q * GO);
      _mm256_mask_storeu_epi16(Y + q * ldy, m, narrow16(bias ? _mm512_add_ps(s, bv) : s));
    }
    return;
  }
#endif
  for (int q = 0; q < RT; ++q)
    for (int64_t c = 0; c < nw; ++c) {
      float s = sums[q * GO + c];
      if (bias) { float b; widen(bias + c, &b, 1); s += b; }
      narrow(&s, Y + q * ldy + c, 1);
    }
}
#endif

// How dot_gemm runs a tile of RT rows: one row (a GEMV step that streams W) inlined into dot_gemm, two or more rows
// in a call of its own (dot_tile_call). Inlined there too, GCC (at -O3, -march=native on the 2-core Zen 4 VM) had kept
// the accumulators of the bfloat16 6 x 3 and 6 x 2 tiles (and the float32 ones in some builds) in memory, a store after
// every vdpbf16ps and a load-add-store chain through one of them: one hot 576 -> 1536 bfloat16 linear at 2 / 4 / 8 rows
// took 24 / 49 / 89 us, in its own call 19 / 34 / 57 (16 and 32 rows, the 5 x 5 tile, already out of line: unchanged).
// Only where the code lies changes, so no output does. Every tile out of line had cost ~6 % at one row (a decode step
// at one sequence 10.5 -> 11.1 ms, in turn in one process), so one row stays inline.
template <int GO, int RT, int PFL, typename E>
__attribute__((noinline)) void dot_tile_call(const E* X, int64_t D, const E* W, int64_t nw, E* Y, int64_t ldy, const E* bias,
                                             const E* pf, int64_t npf, int64_t pstride) {
  dot_tile<GO, RT, PFL>(X, D, W, nw, Y, ldy, bias, pf, npf, pstride);
}

template <int GO, int RT, int PFL, typename E>
inline void run_tile(const E* X, int64_t D, const E* W, int64_t nw, E* Y, int64_t ldy, const E* bias, const E* pf,
                     int64_t npf, int64_t pstride) {
  if constexpr (RT == 1) dot_tile<GO, RT, PFL>(X, D, W, nw, Y, ldy, bias, pf, npf, pstride);
  else dot_tile_call<GO, RT, PFL, E>(X, D, W, nw, Y, ldy, bias, pf, npf, pstride);
}

// Thread h of nh's share [o0, o1) of O outputs: whole slices of 2L, so phase B's vector paths (and the fused GEMM's
// columns) never depend on the split.
inline std::pair<int64_t, int64_t> out_slice(int64_t O, int64_t h, int64_t nh) {
  const int64_t chunks = (O + 2 * L - 1) / (2 * L);
  return {std::min(O, chunks * h / nh * 2 * L), std::min(O, chunks * (h + 1) / nh * 2 * L)};
}

// Threads for a parallel region over `items` units of work: torch's setting, capped by the work; 1 inside another
// region or without OpenMP (then torch's parallel_for runs serially too).
inline int64_t region_threads(int64_t items) {
#ifdef _OPENMP
  return at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), items);
#else
  return 1;
#endif
}

// (this thread's index, the region's thread count) inside an OpenMP region; (0, 1) without OpenMP.
inline std::pair<int64_t, int64_t> region_thread() {
#ifdef _OPENMP
  return {omp_get_thread_num(), omp_get_num_threads()};
#else
  return {0, 1};
#endif
}

// The pool rows of the routed module a decode step runs next (its routers, A and B^T rows of the LoRAs of the slots in
// the step), prefetched into L2 while an earlier GEMM of the step streams its weights, so that module's routing and
// phases read them from cache instead of from memory, a few KB at a time, each stage waiting for its first reads.
// Thread h of nh takes every router row (each thread routes a share of the tokens over all of them), its share of the
// LoRAs' A rows (phase A splits the LoRA blocks in order) and of B^T's columns (phase B's output slice, out_slice).
// Only where a line goes changes (no value), so nothing a kernel computes does. The lines are spread evenly over the
// GEMM's blocks of weight rows (from the share g_ahead_start of them: 0, all of it; from the second half the FFN took
// 9.93 against 9.59 ms a step at 8 sequences, one run of whole runs in turn). The stack asks for it from g_ahead_from
// rows: at one row two of eight LoRAs are read, and the other six would be prefetched for nothing (from one row the
// step took 9.98 -> 10.42 ms at one sequence; the routers alone from one row, 9.98 -> 10.00). In one run, the
// variant alternating step by step (29th session, 2-vCPU AMD EPYC Zen 4 VM, default base in bfloat16, 128-token
// prompts, 128 new tokens, medians of ~240 decode steps a variant): one adapter, the FFN projections a step 10.67 ->
// 10.42 ms at 8 sequences and 20.96 -> 20.80 at 32 (steps 20.34 -> 20.19 and 42.85 -> 42.57); four adapters 11.74 ->
// 11.13 and 23.07 -> 22.06 (steps 21.45 -> 21.43 and 44.56 -> 44.17). Since the 32nd session it starts at 16 rows,
// where a call stops prefetching its own selected LoRAs' B^T rows during its GEMM (OWN_BT_BELOW): below, those alone,
// and no whole pools during the GEMM before, took the steps 11.57 -> 11.19 ms at 4 sequences and 15.43 -> 15.29 at 8
// with one adapter, 11.46 -> 11.41 and 16.56 -> 16.53 with four (scripts/ab_steps.py, in turn step by step).
struct Ahead {
  const float* router = nullptr;  // [N, D]
  Pools pl{nullptr, nullptr, 0, 0, 0, 0};
  std::vector<std::pair<int64_t, int64_t>> ranges;  // the LoRAs [lo, hi) of each slot prefetched, in order
  bool bt_only = false;  // B^T's rows alone (no routers, no A): a call's own selected LoRAs, for its phase B
  int64_t loras() const {
    int64_t n = 0;
    for (const auto& [lo, hi] : ranges) n += hi - lo;
    return n;
  }
};
int64_t g_ahead_from = 16;  // rows of a decode step from which the stack prefetches ahead (0: never; A/B runs: _ahead_from)
double g_ahead_start = 0.0;  // the share of a GEMM's blocks after which its prefetches start (A/B runs)
// A slot's pools are prefetched whole from tokens x k >= g_ahead_cover x n: with fewer picks most of its LoRAs go unread
// (four adapters at eight rows, two tokens each: ~14 of the 32 LoRAs prefetched were read, and the other bytes slowed the
// GEMM that streamed them). The 32nd session's Zen 4 VM, bfloat16, scripts/ab_steps.py (the rule against any token): four
// adapters at 8 sequences 17.46 -> 16.41 ms a step; one adapter at 8 and 32, four at 32 (every slot whole either way)
// 14.46 / 14.46, 42.61 / 42.43, 45.30 / 45.28. (0: any token; A/B runs: _ahead_cover.)
double g_ahead_cover = 1.0;
// Whether the stack's Ahead takes a slot of n LoRAs (k a token) whole when `tokens` of the step are on it.
inline bool whole_slot(int64_t tokens, int64_t k, int64_t n) {
  return tokens > 0 && tokens * std::max<int64_t>(1, k) >= g_ahead_cover * n;
}
// A call of fewer than OWN_BT_BELOW rows, its own selected LoRAs that no Ahead prefetched whole: their B^T rows (this
// thread's columns, what its phase B reads next) prefetched into L2 over the GEMM's blocks from the share g_own_start
// of them on (earlier, the rest of the GEMM's weights would push them out again). Cold, those rows had come in at
// ~9 GB/s: phase B took 19 of a module call's 95 us with four adapters at 8 rows. Four adapters at 8 sequences 16.52
// -> 15.88 ms a step (from half of the GEMM: 16.01; scripts/ab_steps.py); one sequence, and one adapter at 8 or 32
// (nothing left to prefetch), unchanged. Only where lines go changes, so no output does. (A/B runs: _own_bt.)
bool g_own_bt = true;
double g_own_start = 0.75;

// This thread's lines of an Ahead, issued a few at a time by a GEMM's blocks (segments of rows of a byte length: the
// routers; each of its LoRAs' A rows; each LoRA's B^T rows, this thread's columns of them - a LoRA's own rank only).
struct AheadCursor {
  struct Seg { const char* p; int64_t rows, bytes, stride; };
  std::vector<Seg> seg;
  size_t s = 0;
  int64_t row = 0, off = 0, lines = 0;
  AheadCursor(const Ahead* ah, int64_t h, int64_t nh) {
    if (!ah || ah->ranges.empty()) return;
    const Pools& pl = ah->pl;
    const int64_t n = ah->loras(), r = pl.r, D = pl.D, O = pl.O, esz = pl.bf16 ? 2 : 4;
    const char *A = static_cast<const char*>(pl.a), *Bt = static_cast<const char*>(pl.bt);
    std::vector<int64_t> ids;  // the prefetched LoRAs in order
    ids.reserve(n);
    seg.reserve(ah->ranges.size() + 2 * n);
    for (const auto& [lo, hi] : ah->ranges) {
      if (!ah->bt_only) seg.push_back({reinterpret_cast<const char*>(ah->router + lo * D), 1, (hi - lo) * D * 4, 0});
      for (int64_t i = lo; i < hi; ++i) ids.push_back(i);
    }
    for (int64_t j = n * h / nh; !ah->bt_only && j < n * (h + 1) / nh; ++j)
      seg.push_back({A + ids[j] * r * D * esz, 1, pl.rank_of(ids[j]) * D * esz, 0});
    const auto [o0, o1] = out_slice(O, h, nh);
    if (o1 > o0)
      for (const int64_t i : ids) seg.push_back({Bt + (i * r * O + o0) * esz, pl.rank_of(i), (o1 - o0) * esz, O * esz});
    for (const Seg& g : seg) lines += g.rows * ((g.bytes + 63) / 64);
  }
  // This thread's lines of ah (none where null), spread evenly over a GEMM's `blocks` from the share `start` of them
  // on: at(blk) issues block blk's share.
  static AheadCursor spread(const Ahead* ah, int64_t blocks, double start) {
    if (!ah) return AheadCursor(nullptr, 0, 1);
    const auto [h, nh] = region_thread();
    AheadCursor c(ah, h, nh);
    c.first = std::min<int64_t>(blocks - 1, static_cast<int64_t>(blocks * start));
    c.per = c.lines ? (c.lines + (blocks - c.first) - 1) / (blocks - c.first) : 0;
    return c;
  }
  int64_t first = 0, per = 0;
  void at(int64_t blk) {
    if (per && blk >= first) issue(per);
  }
  void issue(int64_t count) {
    while (count > 0 && s < seg.size()) {
      const Seg& g = seg[s];
      const char* p = g.p + row * g.stride;
      for (; off < g.bytes && count > 0; off += 64, --count) _mm_prefetch(p + off, _MM_HINT_T1);
      if (off >= g.bytes) {
        off = 0;
        if (++row >= g.rows) { row = 0; ++s; }
      }
    }
  }
};

// Y[:, o0:o1) = X W[o0:o1)^T (+ bias) for X [T, D] of float32 or bfloat16 (E = uint16_t: dot_tile's AVX512-BF16 form),
// on this thread: blocks of GO rows of W (they stay in L1 while every block of RT rows of X passes), the last rows of X
// in one smaller tile. While a block is computed, its tiles prefetch the next block's rows of W (tile j rows j,
// j + tiles, ...: each row one line per step, all rows in flight by the block's end), so a decode step's weights,
// which come from memory, arrive while the FMAs run instead of when the next block first loads them (measured on the
// Zen 5 VM, float32, cold weights: 32 rows 1.15-1.3x, 10 rows 1.25x faster; no change to any sum). PFL is the
// prefetch's locality hint: below 16 rows (the 6 x 3 tile: a GEMV-like pass that only streams W) into L2 (1): the
// next block's 6 rows prefetched into L1 evicted the block being read (on a 2-core Zen 4 VM, 2026-12-02, all of the
// default base's linears of one decode step, cold: float32 25.6 -> 20.5 ms and bfloat16 17.4 -> 10.0 ms at one row,
// 26 / 18 GB/s -> 20-22 / 26 of the ~40 GB/s that two threads stream); from 16 rows (5 x 5, compute-bound) into L1
// (3), as before (L2 there: 32 rows 61 -> 71 ms). Into L2 the tiles prefetch the block after next (two blocks ahead: at
// eight sequences a bfloat16 decode step's FFN 6.80 -> 6.49 ms and the step 14.92 -> 14.08 with one adapter, 13.77 ->
// 12.95 bare, in turn in one process; three blocks 7.05; no change at one; at 32, into L1, two blocks 21.5 -> 21.8).
template <int GO, int RT, int PFL, typename E>
void dot_gemm(const E* X, int64_t T, int64_t D, const E* W, const E* bias, E* Y, int64_t O, int64_t o0, int64_t o1,
              const Ahead* ahead = nullptr, const Ahead* own = nullptr) {
  const int64_t tiles = (T + RT - 1) / RT;
  constexpr int64_t AHEAD = PFL == 1 ? 2 * GO : GO;  // the rows of W between a row read and its prefetch (see above)
  const int64_t blocks = (o1 - o0 + GO - 1) / GO;
  AheadCursor next = AheadCursor::spread(ahead, blocks, g_ahead_start);  // the next routed module's pools
  AheadCursor mine = AheadCursor::spread(own, blocks, g_own_start);  // this call's own B^T rows
  for (int64_t o = o0, blk = 0; o < o1; o += GO, ++blk) {
    next.at(blk);
    mine.at(blk);
    const int64_t nw = std::min<int64_t>(GO, o1 - o);
    const int64_t nn = std::min<int64_t>(GO, std::max<int64_t>(0, o1 - o - AHEAD));  // rows of the block prefetched
    const E* Wo = W + o * D;
    const E* bo = bias ? bias + o : nullptr;
    auto prefetches = [&](int64_t j) { return nn > j ? (nn - 1 - j) / tiles + 1 : 0; };  // rows j, j + tiles, ... < nn
    int64_t t = 0, j = 0;
    for (; t + RT <= T; t += RT, ++j)
      run_tile<GO, RT, PFL>(X + t * D, D, Wo, nw, Y + t * O + o, O, bo, Wo + (AHEAD + j) * D, prefetches(j), tiles * D);
    const E* Xt = X + t * D;
    E* Yt = Y + t * O + o;
    const E* pf = Wo + (AHEAD + j) * D;
    const int64_t npf = prefetches(j);
    switch (T - t) {  // RT <= 5
      case 1: run_tile<GO, 1, PFL>(Xt, D, Wo, nw, Yt, O, bo, pf, npf, tiles * D); break;
      case 2: if constexpr (RT > 2) run_tile<GO, 2, PFL>(Xt, D, Wo, nw, Yt, O, bo, pf, npf, tiles * D); break;
      case 3: if constexpr (RT > 3) run_tile<GO, 3, PFL>(Xt, D, Wo, nw, Yt, O, bo, pf, npf, tiles * D); break;
      case 4: if constexpr (RT > 4) run_tile<GO, 4, PFL>(Xt, D, Wo, nw, Yt, O, bo, pf, npf, tiles * D); break;
      default: break;
    }
  }
}

// AVX2 tile shapes (rows of W x rows of X) of the float32 dot_gemm: 3 x 2 at every row count - 12 accumulator halves,
// 3 rows of W and one of X in the 16 registers. Until the 34th session an AVX2 build ran MKL's sgemm on each thread's
// slice of the outputs here, whose roundings change with the shape (16 batch-invariance tests failed on an AVX2 build).
// All float32 linears of the default base (an AVX2 build on the 34th session's Zen 4 VM, `python scripts/as_march.py
// haswell -m remix.kernels.gemm_bench --dtype float32 --rows 1,2,4,8,16,32,64`), sgemm slices -> 3 x 2 tiles: 24.0 /
// 39.4 / 36.8 / 43.9 / 55.6 / 76.3 / 125.4 -> 17.8 / 18.6 / 18.8 / 22.9 / 46.4 / 74.2 / 127.7 ms at 1 / 2 / 4 / 8 /
// 16 / 32 / 64 rows. Tried (docs/BENCHMARKS.md, 34th session): 4 x 1 below 16 rows, 3 x 3, 4 x 2 and 6 x 1 from 16,
// two passes over D in 4 x 3 / 4 x 2 tiles - all slower.
constexpr int AVX2_GO = 3, AVX2_RT = 2;

// dot_gemm with the tile shape for T rows: 6 x 3 below 16 rows (more of W per load of X), else 5 x 5.
template <typename E>
void dot_gemm_any(const void* X, int64_t T, int64_t D, const void* W, const void* bias, void* Y, int64_t O, int64_t o0,
                  int64_t o1, const Ahead* ahead = nullptr, const Ahead* own = nullptr) {
  const auto *x = static_cast<const E*>(X), *w = static_cast<const E*>(W), *b = static_cast<const E*>(bias);
  auto* y = static_cast<E*>(Y);
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<E, float>) {  // AVX2: the tiles above
    if (T < 16) return dot_gemm<AVX2_GO, AVX2_RT, 1>(x, T, D, w, b, y, O, o0, o1, ahead, own);  // (PFL: see dot_gemm)
    return dot_gemm<AVX2_GO, AVX2_RT, 3>(x, T, D, w, b, y, O, o0, o1, ahead, own);
  }
#endif
  if (T < 16) return dot_gemm<6, 3, 1>(x, T, D, w, b, y, O, o0, o1, ahead, own);
  dot_gemm<5, 5, 3>(x, T, D, w, b, y, O, o0, o1, ahead, own);
}

#ifdef REMIX_AMX
// ---- bfloat16 GEMM on AMX tiles (Intel Sapphire Rapids and later): the base GEMM of a bfloat16 model where the CPU has
// AMX-BF16. Y^T = W X^T tile by tile, so W's rows load into tiles as they lie in memory (no packed copy of the weights):
// a W tile is 16 rows x 32 inputs, an X tile 16 pairs of inputs x 16 tokens (VNNI: each 32-bit element a pair of
// bfloat16 of one token), packed from X on every call (~1-5 us at a decode step's size). TDPBF16PS adds the products of
// each pair into float32 (Intel SDM: round to nearest even, denormals flushed) in input order, one 32-input block after
// another: one order per output whatever the token count or split, so a row's outputs are bit-identical alone or in any
// batch. The float32 tile is transposed in registers, the bias added, one rounding to bfloat16 (vcvtneps2bf16).
// Measured on the 2-core Intel VM with AMX (2026-12-02, weights cold, 576 <-> 1536): 32 rows 95-125 us (up to ~200 in
// this VM's slow spells) against the AVX512-BF16 dot_gemm's 490-690 and oneDNN's 200-330 (which reorders the weight on
// every call); 1 row ~70-110 us, as dot_gemm (a GEMV: memory-bound either way). (Twenty-fourth session's Intel VM, all
// linears of a decode step: at one row dot_gemm streamed them in 11.3 ms against 12.5 here, from 8 rows AMX is ahead -
// 13.4 against 15.4 at 8, 16.7 against 48 at 32; one kernel serves every row count below DOT_BF16_BELOW, since a row's
// outputs must not depend on the batch.)

// Linux hands out AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once per process); false where the
// OS refuses, or where REMIX_DISABLE_AMX is set to anything but 0 (read once: for A/B runs), and then dot_gemm.
bool amx_ready() {
  static const bool ok = [] {
    const char* off = std::getenv("REMIX_DISABLE_AMX");
    if (off && *off && std::strcmp(off, "0") != 0) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// The shapes the tile kernel takes: D whole blocks of 32 inputs, O whole tiles of 16 outputs (a tile load reads 16 full
// rows: never past W's end).
inline bool amx_shape(int64_t D, int64_t O) { return D % 32 == 0 && O % 16 == 0; }

struct TileConfig {  // LDTILECFG's 64-byte operand, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// r[i] lane j -> r[j] lane i, 16 x 16 elements of 32 bits
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[4 g + c], 128-bit lane l: column 4 l + c of rows 4 g .. 4 g + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit blocks across the groups g
    const __m512i p0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), p1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i p2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44), p3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(p0, p2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(p0, p2, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(p1, p3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(p1, p3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// X [T, D] bfloat16 -> tiles of 16 pairs x 16 tokens (tokens past T zero), tile (kb, tb) at Xp + (kb TB + tb) 256: the
// two token blocks a step of the kernel reads lie side by side.
void amx_pack_x(const uint16_t* X, int64_t T, int64_t D, uint32_t* Xp) {
  const int64_t KB = D / 32, TB = (T + 15) / 16;
  for (int64_t tb = 0; tb < TB; ++tb)
    for (int64_t kb = 0; kb < KB; ++kb) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t t = tb * 16 + i;
        r[i] = t < T ? _mm512_loadu_si512(X + t * D + kb * 32) : _mm512_setzero_si512();
      }
      transpose16(r);
      uint32_t* dst = Xp + (kb * TB + tb) * 256;
      for (int i = 0; i < 16; ++i) _mm512_store_si512(dst + i * 16, r[i]);
    }
}

// A float32 tile c [16 outputs o.., 16 tokens t0..] -> Y[t, o .. o + 16) (+ bias), rounded to bfloat16, tokens < T.
inline void amx_write_tile(const float* c, int64_t t0, int64_t T, int64_t o, const uint16_t* bias, uint16_t* Y, int64_t O) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + i * 16);
  transpose16(r);
  const __m512 b = bias ? (__m512)load(reinterpret_cast<const c10::BFloat16*>(bias + o)) : _mm512_setzero_ps();
  const int64_t n = std::min<int64_t>(16, T - t0);
  for (int64_t i = 0; i < n; ++i)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(Y + (t0 + i) * O + o),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_castsi512_ps(r[i]), b))));
}

// Tiles 0-3 += W rows (w0: 16, w1: 16) x one or two token blocks over all of D; the npf rows of W at pf (the next block)
// are prefetched into L2 a line per row per step, so they arrive while this block computes (as dot_gemm does). Measured
// (eleventh session, one 576 <-> 1536 linear at 32 rows): without it 170-270 us, into L1 126-185, into L2 176. Every
// linear of a decode step (twenty-fourth session's Intel VM, both hints in turn in one process, medians of 15 rounds):
// into L2 0.95 / 0.96 / 0.90 / 0.94 / 0.96 of the time into L1 at 1 / 8 / 32 / 64 / 127 rows (13.1 -> 12.5 ms at one
// row, 16.8 -> 15.3 at 32) - a block of 32 rows of W is 36-96 KB, and prefetched into L1 (48 KB) it evicted the block
// being read; a whole decode step at one sequence 0.97, at 32 the same (outputs unchanged: only the hint differs).
template <bool TWO_T, bool TWO_W>
inline void amx_block(const uint16_t* w0, const uint16_t* w1, const uint32_t* xp, int64_t KB, int64_t TB, int64_t D,
                      const uint16_t* pf, int64_t npf) {
  _tile_zero(0);
  if constexpr (TWO_W) _tile_zero(1);
  if constexpr (TWO_T) { _tile_zero(2); _tile_zero(3); }
  for (int64_t kb = 0; kb < KB; ++kb) {
    for (int64_t p = 0; p < npf; ++p) _mm_prefetch(reinterpret_cast<const char*>(pf + p * D + kb * 32), _MM_HINT_T1);
    _tile_loadd(4, w0 + kb * 32, D * 2);
    if constexpr (TWO_W) _tile_loadd(5, w1 + kb * 32, D * 2);
    const uint32_t* xb = xp + kb * TB * 256;
    _tile_loadd(6, xb, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TWO_W) _tile_dpbf16ps(1, 5, 6);
    if constexpr (TWO_T) {
      _tile_loadd(7, xb + 256, 64);
      _tile_dpbf16ps(2, 4, 7);
      if constexpr (TWO_W) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Y[:, o0:o1) = X W[o0:o1)^T (+ bias) on this thread, o0 and o1 multiples of 16 (amx_shape), bfloat16 throughout: blocks
// of 32 rows of W, each against the tokens 32 at a time (beyond 32 tokens the block is read again, from L2); up to 16
// tokens, blocks of 16 rows (one W tile a step: half the rows streaming at once, each output's tile and its order of
// sums the same). All linears of a decode step, both block heights in turn in one process (twenty-fourth session's
// Intel VM, medians of 15 rounds): 16 rows 0.95 / 0.92 / 0.97 / 1.00 of 32 rows' time at 1 / 4 / 8 / 16 tokens (12.5
// -> 12.0 ms at one), a one-sequence decode step 15.4 -> 14.5 ms, at eight 0.98; from 17 tokens (two token blocks,
// where each W tile serves both) 0.96-1.01, not taken.
void amx_gemm(const uint16_t* X, int64_t T, int64_t D, const uint16_t* W, const uint16_t* bias, uint16_t* Y, int64_t O,
              int64_t o0, int64_t o1) {
  const int64_t KB = D / 32, TB = (T + 15) / 16;
  thread_local Scratch packed;  // each thread packs all of X for itself (no barrier); kept between calls
  thread_local int64_t packed_cap = 0;
  if (KB * TB * 256 > packed_cap) { packed = scratch(KB * TB * 256); packed_cap = KB * TB * 256; }
  uint32_t* xp = reinterpret_cast<uint32_t*>(packed.get());
  amx_pack_x(X, T, D, xp);
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  _tile_loadconfig(&cfg);
  alignas(64) float c[4][256];
  const int64_t H = TB == 1 ? 16 : 32;  // rows of W a block: up to 16 tokens one W tile a step (see above)
  for (int64_t o = o0; o < o1; o += H) {
    const bool two = H == 32 && o + 16 < o1;  // a second W tile (16 more rows) in this block
    const uint16_t* w0 = W + o * D;
    const uint16_t* w1 = two ? w0 + 16 * D : w0;
    const int64_t next = std::max<int64_t>(0, std::min<int64_t>(H, o1 - o - H));  // rows of the next block
    for (int64_t tb = 0; tb < TB; tb += 2) {
      const int64_t npf = tb == 0 ? next : 0;  // prefetched during the block's first pass only
      const uint16_t* pf = npf ? w0 + H * D : nullptr;
      const uint32_t* xb = xp + tb * 256;
      if (tb + 1 < TB) {
        if (two) amx_block<true, true>(w0, w1, xb, KB, TB, D, pf, npf);
        else amx_block<true, false>(w0, w1, xb, KB, TB, D, pf, npf);
      } else if (two) {
        amx_block<false, true>(w0, w1, xb, KB, TB, D, pf, npf);
      } else {
        amx_block<false, false>(w0, w1, xb, KB, TB, D, pf, npf);
      }
      _tile_stored(0, c[0], 64);
      amx_write_tile(c[0], tb * 16, T, o, bias, Y, O);
      if (two) {
        _tile_stored(1, c[1], 64);
        amx_write_tile(c[1], tb * 16, T, o + 16, bias, Y, O);
      }
      if (tb + 1 < TB) {
        _tile_stored(2, c[2], 64);
        amx_write_tile(c[2], tb * 16 + 16, T, o, bias, Y, O);
        if (two) {
          _tile_stored(3, c[3], 64);
          amx_write_tile(c[3], tb * 16 + 16, T, o + 16, bias, Y, O);
        }
      }
    }
  }
  _tile_release();  // the tile state off again: a context switch need not save 8 KB of it
}
#endif  // REMIX_AMX

// The base layer's GEMM, fused into the kernel's parallel region: Y[:, o0:o1) = X W[o0:o1)^T (+ bias), each thread its
// own slice of the outputs - the slice its phase B then updates while it is still in its cache, and no second parallel
// region to start. With AVX-512 it is dot_gemm (24-25 accumulators in the 32 registers): on this project's 2-core AMD
// Zen 5 VM, all of the default base's linears at batch 1 / 8 / 32 take 0.39 / 0.52 / 0.52 of the time of ATen's
// linear (MKL, whose float32 GEMMs reach ~100-190 GFLOP/s there; its GEMV at batch 1 ~17 GB/s of the machine's ~44)
// - and every row's outputs are the same in any batch. With AVX2 + FMA and no AVX-512 it is dot_gemm too, in tiles
// that fit AVX2's 16 registers (dot_tile's AVX2 path: the same outputs bit for bit); without either, each thread calls
// MKL on its own slice of the outputs (shape-dependent roundings). bfloat16 (X, W, Y and bias all bfloat16) only where the CPU has
// AVX512-BF16 and below DOT_BF16_BELOW rows: dot_gemm in its bfloat16 form, float32 sums rounded once (as oneDNN's);
// elsewhere the caller takes ATen's.
struct BaseGemm {
  const void *w, *bias;  // w [O, D] contiguous; bias [O] or null; float32, or bfloat16 when bf16
  bool bf16 = false;
  bool amx = false;  // bfloat16 on AMX tiles (amx_gemm)
  const Ahead* ahead = nullptr;  // the next routed module's pools, prefetched while this GEMM runs (dot_gemm only)
  const Ahead* own = nullptr;  // this call's own selected LoRAs' B^T rows, prefetched over the GEMM's later blocks (g_own_bt)
  bool on() const { return w != nullptr; }
  void operator()(const void* Xv, void* Yv, int64_t T, int64_t D, int64_t O, int64_t o0, int64_t o1) const {
    if (o1 <= o0 || T == 0) return;
#ifdef REMIX_AMX
    if (amx)
      return amx_gemm(static_cast<const uint16_t*>(Xv), T, D, static_cast<const uint16_t*>(w),
                      static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(Yv), O, o0, o1);
#endif
#ifdef REMIX_DOT_BF16
    if (bf16) return dot_gemm_any<uint16_t>(Xv, T, D, w, bias, Yv, O, o0, o1, ahead, own);
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    dot_gemm_any<float>(Xv, T, D, w, bias, Yv, O, o0, o1, ahead, own);
#else
    const auto* X = static_cast<const float*>(Xv);
    const auto* W = static_cast<const float*>(w);
    const auto* b = static_cast<const float*>(bias);
    auto* Y = static_cast<float*>(Yv);
    const int m = static_cast<int>(o1 - o0), n = static_cast<int>(T), k = static_cast<int>(D), ldc = static_cast<int>(O);
    const float one = 1.f;
    float beta = 0.f;
    if (b) {
      for (int64_t t = 0; t < T; ++t) std::memcpy(Y + t * O + o0, b + o0, (o1 - o0) * sizeof(float));
      beta = 1.f;
    }
    sgemm_("T", "N", &m, &n, &k, &one, W + o0 * D, &k, X, &k, &beta, Y + o0, &ldc);  // MKL runs one thread inside a region
#endif
  }
};

// The BaseGemm for y = x2 W^T (+ bias) where it applies (CPU, x, weight and bias all float32 - or all bfloat16 on a CPU
// with AVX512-BF16 -, contiguous weight, sizes that fit BLAS's int), else an off one: the caller takes ATen's linear.
// Rows from which bfloat16 takes ATen's (oneDNN) GEMM. On the 2-core Zen 5 VM (session of 2026-12-02), all of the
// default base's bfloat16 linears in turn (weights cold) at 16 / 24 / 32 / 64 / 128 rows took 0.62 / 0.62 / 0.77 / 0.84
// / 1.04 of oneDNN's time in the bfloat16 dot_gemm (with its prefetch of the next block of W; without it, oneDNN won
// from ~32 rows, and the split was at 16). Below 16 rows oneDNN also leaves the second thread idle, and a parallel
// region right after it waits for that thread to wake.
constexpr int64_t DOT_BF16_BELOW = 128;

// Rows from which float32 takes oneDNN's linear (mkldnn::_linear_pointwise with the plain weight, reordered by oneDNN
// on each call - no packed copy kept) instead of dot_gemm: on the 2-core Zen 5 VM, the default base's four linear
// shapes at 128 / 256 / 512 rows ran at 248-296 / 294-353 / 359-390 GFLOP/s there against dot_gemm's 210-264 /
// 253-263 / 240-267 (and ATen's own float32 linear, MKL, at ~150-190). Below, dot_gemm is as fast or faster: every
// decode step up to 255 sequences keeps a row's outputs independent of the batch; prefill steps of 256 tokens or
// more round as oneDNN does.
constexpr int64_t ONEDNN_F32_FROM = 256;

// Batch-invariant mode (the engine's --batch-invariant, set before each forward): the dot-product kernel at every row
// count, so a row's outputs never depend on how many rows share the call (prefill steps of any size included), at the
// cost of oneDNN's speed on large calls.
bool g_batch_invariant = false;

// The operator handle of mkldnn::_linear_pointwise, or null where this torch has none (then ATen's linear).
const c10::OperatorHandle* onednn_linear_op() {
  static const c10::OperatorHandle* op = []() -> const c10::OperatorHandle* {
    const auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return found.has_value() ? new c10::OperatorHandle(*found) : nullptr;
  }();
  return op;
}

// Whether float32 calls from ONEDNN_F32_FROM rows take oneDNN's linear (AMD and other CPUs) or ATen's (MKL's sgemm, on
// Intel CPUs, which MKL is tuned for). Measured per linear of the default base at 256 / 512 / 1024 rows: on the 2-core
// Intel Xeon (AMX) VM of 2026-12-02, oneDNN's took 0.89-1.26 / 1.06-1.13 / 1.06-1.17 of MKL's time; on the 2-core
// Zen 5 VM oneDNN ran at 359-390 GFLOP/s at 512 rows against MKL's 150-190 (MKL's AMD paths are generic).
inline bool intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}
bool onednn_f32_large() {
  static const bool use = onednn_linear_op() != nullptr && !intel_cpu();
  return use;
}

// Whether float32 calls from ONEDNN_F32_FROM rows leave the dot-product kernel: for oneDNN's linear, or MKL's on Intel.
bool large_f32_elsewhere() {
  static const bool elsewhere = onednn_linear_op() != nullptr || intel_cpu();
  return elsewhere;
}

// y = x2 W^T (+ bias) where no BaseGemm applies: for float32 from ONEDNN_F32_FROM rows, oneDNN's linear where
// onednn_f32_large() (boxed call: no dependence on the operator's C++ signature), else ATen's linear (as nn.Linear).
at::Tensor other_linear(const torch::Tensor& x2, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (onednn_f32_large() && x2.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32 && x2.size(0) >= ONEDNN_F32_FROM &&
      x2.device().is_cpu() && weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() && x2.is_contiguous() &&
      (!bias.numel() || (bias.scalar_type() == torch::kFloat32 && bias.dim() == 1 && bias.size(0) == weight.size(0)))) {
    torch::jit::Stack stack{x2, weight, bias.numel() ? c10::IValue(bias) : c10::IValue(), c10::IValue(std::string("none")),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
    onednn_linear_op()->callBoxed(&stack);
    return stack.at(0).toTensor();
  }
  return bias.numel() ? at::linear(x2, weight, bias) : at::linear(x2, weight);
}

// The compiled GEMM for T rows of a checked weight w [O, D] (bias or null), or an off one where oneDNN's (or MKL's) is
// faster: bfloat16 from DOT_BF16_BELOW rows, float32 from ONEDNN_F32_FROM (unless batch-invariant).
BaseGemm gemm_for_rows(const void* w, const void* bias, bool bf16, int64_t T, int64_t D, int64_t O) {
  if (!g_batch_invariant && ((bf16 && T >= DOT_BF16_BELOW) || (!bf16 && T >= ONEDNN_F32_FROM && large_f32_elsewhere())))
    return {nullptr, nullptr};
#ifdef REMIX_AMX
  const bool amx = bf16 && amx_shape(D, O) && amx_ready();
#else
  const bool amx = false;
  (void)D;
  (void)O;
#endif
  return {w, bias, bf16, amx};
}

BaseGemm base_gemm_for(const torch::Tensor& x2, const torch::Tensor& weight, const torch::Tensor& bias) {
  const int64_t O = weight.size(0), lim = int64_t{1} << 30;
  const auto dt = x2.scalar_type();
#ifdef REMIX_DOT_BF16
  const bool dtype_ok = dt == torch::kFloat32 || dt == torch::kBFloat16;
#else
  const bool dtype_ok = dt == torch::kFloat32;
#endif
  const bool ok = x2.device().is_cpu() && dtype_ok && weight.device().is_cpu() && weight.scalar_type() == dt &&
                  weight.is_contiguous() && (!bias.numel() || (bias.scalar_type() == dt && bias.is_contiguous() && bias.numel() == O)) &&
                  x2.size(0) < lim && x2.size(1) < lim && O < lim;
  if (!ok) return {nullptr, nullptr};
  return gemm_for_rows(weight.data_ptr(), bias.numel() ? bias.data_ptr() : nullptr, dt == torch::kBFloat16, x2.size(0),
                       x2.size(1), O);
}

constexpr int64_t SPLIT_POOLS_BELOW = 64;  // tokens: below, threads split the pools' reads instead of the tokens

// Optionally route (rt non-null: fills sel/w), then gather, for x [T, D] and y [T, O] (float32 or bfloat16), in place.
//   T >= SPLIT_POOLS_BELOW: each thread routes and gathers its own contiguous share of the tokens (no barrier).
//   Fewer tokens: the pools' reads dominate and every thread would read all of them, so the threads split the work
//   instead: route a share of the tokens | phase A over a share of the LoRA blocks | phase B over a share of the
//   outputs (each boundary a multiple of 2L), with a barrier between the stages.
// A token's result is the same either way and whatever shares its call.
// With gemm on (float32 only), y is first computed as the base layer's output inside the same region: by column slices
// that match phase B's, so each thread's y slice is still in its own cache when phase B updates it.
void run(const void* xv, void* yv, int64_t T, bool bf16, const Pools& pl, const Routing* rt, int64_t* sel, float* w,
         int64_t k, const BaseGemm& gemm = {nullptr, nullptr});

// Whether token t has a LoRA to gather in sel / w [T, k] (an id and a nonzero weight): the pairs Pairs collects.
inline bool has_selection(const int64_t* sel, const float* w, int64_t k, int64_t t) {
  for (int64_t j = 0; j < k; ++j) if (sel[t * k + j] >= 0 && w[t * k + j] != 0.f) return true;
  return false;
}

// Phase B of a small batch (T < SPLIT_POOLS_BELOW) on this thread's output slice [o0, o1) of y [T, O] (float32, or
// bfloat16 through phase_b_bf16's blocks: the rows of tokens with a selection in sel / w [T, k]), B^T's rows prefetched.
void phase_b_slice(const Pairs& pr, const Pools& pl, const float* U, void* y, int64_t T, bool bf16, const int64_t* sel,
                   const float* w, int64_t k, int64_t o0, int64_t o1) {
  if (o1 <= o0 || pr.size() == 0) return;
  if (!bf16) return phase_b(pr, pl, U, static_cast<float*>(y), pl.O, 0, o0, o1, /*prefetch=*/true);
  char has[SPLIT_POOLS_BELOW];
  for (int64_t t = 0; t < T; ++t) has[t] = has_selection(sel, w, k, t);
  const Scratch yb = scratch(T * YBLOCK);
  phase_b_bf16(pr, pl, U, static_cast<uint16_t*>(y), T, has, yb.get(), o0, o1, /*prefetch=*/true);
}
// Rows from which a call leaves its own B^T rows to phase B's reads: 90 bound modules of one pool (n 8, k 2, r 8) in
// turn with and without (32nd session, Zen 4 VM, medians of 25 rounds; outside the stack, so no Ahead): bfloat16 the
// adapter's share 0.51 -> 0.42 / 1.25 -> 0.87 / 2.20 -> 2.05 ms at 1 / 8 / 32 rows, float32 0.60 -> 0.52 / 1.68 -> 1.65
// / 3.40 -> 3.67 (the GEMM compute-bound there, the float32 rows twice the bytes).
constexpr int64_t OWN_BT_BELOW = 16;

// Whether the calling thread runs a decode stack's layers with its Ahead on (each routed module's pools of the slots
// worth it prefetched during the GEMM before it): set by DecodeStack::run, read by run() before its region.
thread_local bool t_stack_ahead = false;

// The Ahead of a small call's own selected LoRAs (pr) for g_own_bt: their B^T rows, less, where the decode stack has
// prefetched this module's pools (stack_ahead), the LoRAs of the slots it took whole (tokens x k >= g_ahead_cover x n).
Ahead own_ahead(const Pairs& pr, const Pools& pl, const Routing* rt, int64_t T, bool stack_ahead) {
  Ahead mine;
  if (pr.size() == 0 || T >= OWN_BT_BELOW) return mine;
  std::vector<char> whole(pl.N, 0);
  if (rt && stack_ahead) {
    std::vector<int64_t> count(rt->S, 0);
    for (int64_t t = 0; t < T; ++t)
      if (const int64_t sl = routed_slot(*rt, t); sl >= 0) ++count[sl];
    for (int64_t sl = 0; sl < rt->S; ++sl)
      if (whole_slot(count[sl], rt->k[sl], rt->n[sl]))
        for (int64_t i = std::max<int64_t>(0, rt->off[sl]); i < std::min(pl.N, rt->off[sl] + rt->n[sl]); ++i) whole[i] = 1;
  }
  for (int64_t i = 0; i < pl.N; ++i)
    if (pr.start[i + 1] > pr.start[i] && !whole[i]) {
      if (!mine.ranges.empty() && mine.ranges.back().second == i) mine.ranges.back().second = i + 1;
      else mine.ranges.emplace_back(i, i + 1);
    }
  mine.pl = pl;
  mine.bt_only = true;
  return mine;
}

void run(const torch::Tensor& x, torch::Tensor& y, const Pools& pl, const Routing* rt, int64_t* sel, float* w, int64_t k,
         const BaseGemm& gemm = {nullptr, nullptr}) {
  run(x.data_ptr(), y.data_ptr(), x.size(0), x.scalar_type() == torch::kBFloat16, pl, rt, sel, w, k, gemm);
}
// The same on x [T, D] and y [T, O] given as pointers (contiguous, both bfloat16 where bf16, else float32).
void run(const void* xv, void* yv, int64_t T, bool bf16, const Pools& pl, const Routing* rt, int64_t* sel, float* w,
         int64_t k, const BaseGemm& gemm) {
  const int64_t D = pl.D, O = pl.O;
  TORCH_CHECK(!gemm.on() || gemm.bf16 == bf16, "the fused base GEMM's dtype must be x's");
  const int64_t P = region_threads(gemm.on() ? (O + 2 * L - 1) / (2 * L) : T);
  const float* X = bf16 ? nullptr : static_cast<const float*>(xv);
  float* Y = bf16 ? nullptr : static_cast<float*>(yv);
  // bfloat16 with phase A on vdpbf16ps: the router reads x as it is (route_rows widens in registers; the same values
  // and sums as from a copy) - a float32 copy of x (a token tile's, 64 x 1536 x 4 bytes, or below SPLIT_POOLS_BELOW
  // rows all of x, in memory fresh each call) and its reads go. Two builds in turn in one process (45 modules a shape,
  // bfloat16, one adapter, outputs equal bit for bit; 2026-12-03, Zen 5 VM): the delta at 128 rows 64-84 against
  // 63-138 us (576 -> 1536) and 54-74 against 62-78 (1536 -> 576), at 512 rows 210-318 against 195-330 and 183-342
  // against 220-343, better in 13 of 16 pairs of runs. Below 64 rows that bench had found the copy faster (32 rows:
  // 22-34 against 31-51 us, 576 -> 1536, one module cycled outside the engine); in the engine's decode steps (27th
  // session's Intel VM, both in turn in one process, medians of 8 rounds, both orders) reading x as it is took the FFN
  // projections 10.46 -> 10.37 and 10.76 -> 10.47 ms a step at 8 sequences with one adapter, 14.02 -> 13.62 and 14.75
  // -> 14.21 at 32, 12.40 -> 12.04 and 13.06 -> 12.88 at 8 with four, 18.28 -> 17.60 at 32 with four; at one
  // sequence 9.03 -> 8.85 and 9.01 -> 9.10 (noise). Phase A's widening path (float32 pools, no AVX512-BF16) reads a
  // float32 copy, left uninitialised (every element is widened into before it is read: a vector's zero fill ran on the
  // calling thread before the region, ~10 us a module at 32 rows).
  const bool copy_x = bf16 && !phase_a_reads_bf16(pl);
  const auto* xb = bf16 ? static_cast<const c10::BFloat16*>(xv) : nullptr;
  Scratch xbuf;
  if (copy_x && P > 1 && T < SPLIT_POOLS_BELOW) {  // (a token share copies its rows in chunks of its own)
    xbuf = scratch(T * D);
    X = xbuf.get();
  }
  const uint16_t* xh = bf16 ? static_cast<const uint16_t*>(xv) : nullptr;
  uint16_t* yh = bf16 ? static_cast<uint16_t*>(yv) : nullptr;
  const void* gx = bf16 ? static_cast<const void*>(xh) : X;  // the GEMM reads and writes x's dtype
  void* gy = bf16 ? static_cast<void*>(yh) : Y;

  // bfloat16: float32 copies only of the rows that are read: x of a token routed in a pool (of a token with a selection
  // where the ids are given), y of a token with a selection (by blocks, phase_b_bf16) - a base-only token of a mixed
  // batch (or a whole batch of them) costs its GEMM and nothing else; its y keeps the GEMM's rounding, which widen then
  // narrow would give back.
  auto selected = [&](int64_t t) { return has_selection(sel, w, k, t); };
  // x rows [t0, t1) that are read into dst, whose first row is token row0's
  auto widen_x = [&](int64_t t0, int64_t t1, float* dst, int64_t row0) {
    for (int64_t t = t0; t < t1; ++t)
      if (rt ? routed_slot(*rt, t) >= 0 : selected(t)) widen(xh + t * D, dst + (t - row0) * D, D);
  };
  // route (where asked) and gather tokens [t0, t1) on this thread, by tiles; bfloat16: x's float32 copy (copy_x) in a
  // buffer of one tile, y updated by blocks (phase_b_bf16) - copies of a whole share (~1.5 MB each for x and y at 512
  // rows) went out to memory and came back (128 / 512 rows: 1.1-1.35x the time)
  auto token_share = [&](int64_t t0, int64_t t1) {
    if (t1 <= t0) return;
    int64_t slots = 1;  // the adapters among the share's tokens (at most 8 counted)
    if (rt && rt->slot) {
      int64_t seen[8], n = 0;
      for (int64_t t = t0; t < t1 && n < 8; ++t) {
        const int64_t sl = routed_slot(*rt, t);
        if (sl >= 0 && std::find(seen, seen + n, sl) == seen + n) seen[n++] = sl;
      }
      slots = std::max<int64_t>(1, n);
    }
    const int64_t C = std::min<int64_t>((bf16 ? TILE_BF16 : TILE) * slots, t1 - t0);
    Scratch xc = scratch(copy_x ? C * D : 0), yb = scratch(bf16 ? C * YBLOCK : 0);
    std::vector<float> U;
    std::vector<char> has(C);
    for (int64_t c0 = t0; c0 < t1; c0 += C) {
      const int64_t c1 = std::min(c0 + C, t1);
      if (copy_x) widen_x(c0, c1, xc.get(), c0);
      const float* xt = copy_x ? xc.get() : bf16 ? nullptr : X + c0 * D;  // the tile's first row (float32 x)
      if (rt && !copy_x && bf16) route_rows(xb, 0, D, c0, c1, *rt, sel, w);
      else if (rt) route_rows(xt, c0, D, c0, c1, *rt, sel, w);
      const Pairs pr(sel + c0 * k, w + c0 * k, c1 - c0, k, pl.N);
      if (pr.size() == 0) continue;
      U.resize(pr.size() * pl.r);
      phase_a(pr, 0, pr.num_blocks(), xt, bf16 ? xh + c0 * D : nullptr, pl, U.data());
      if (!bf16) {
        phase_b(pr, pl, U.data(), Y + c0 * O, O, 0, 0, O, false);
        continue;
      }
      for (int64_t t = c0; t < c1; ++t) has[t - c0] = selected(t);
      phase_b_bf16(pr, pl, U.data(), yh + c0 * O, c1 - c0, has.data(), yb.get(), 0, O, false);
    }
  };
  if (P <= 1) {
    if (gemm.on()) gemm(gx, gy, T, D, O, 0, O);
    return token_share(0, T);
  }
  if (T >= SPLIT_POOLS_BELOW) {
#pragma omp parallel num_threads(P)
    {
      const auto [h, nh] = region_thread();
      if (gemm.on()) {  // the GEMM by output slices, then the gather by tokens
        const auto [o0, o1] = out_slice(O, h, nh);
        gemm(gx, gy, T, D, O, o0, o1);
#pragma omp barrier
      }
      token_share(T * h / nh, T * (h + 1) / nh);
    }
    return;
  }
  Scratch U = scratch(T * k * pl.r);
  bool units = false;  // two or more slots in use: route by units of the routers (route_logits_share)
  if (g_route_units && rt)
    for (int64_t t = 0, first = -1; t < T && !units; ++t) {
      const int64_t s = routed_slot(*rt, t);
      if (s >= 0 && first < 0) first = s;
      units = s >= 0 && s != first;
    }
  Scratch logits = scratch(units ? T * 64 : 0);
  const bool stack_ahead = t_stack_ahead;  // (thread-local: read on the calling thread)
#pragma omp parallel num_threads(P)
  {
    const auto [h, nh] = region_thread();
    std::vector<int64_t> own_sel;
    std::vector<float> own_w;
    {  // stage 1: widen and route a share of the tokens (or compute a share of the routers' logits)
      const int64_t t0 = T * h / nh, t1 = T * (h + 1) / nh;
      if (copy_x && t1 > t0) widen_x(t0, t1, xbuf.get(), 0);
      if (units) {
        own_sel.assign(sel, sel + T * k);  // (read before the barrier, after which thread 0 writes sel)
        own_w.assign(w, w + T * k);
        if (bf16) route_logits_share(xb, D, T, *rt, h, nh, logits.get());
        else route_logits_share(X, D, T, *rt, h, nh, logits.get());
      } else if (rt && t1 > t0) {
        if (bf16 && !copy_x) route_rows(xb, 0, D, t0, t1, *rt, sel, w);
        else route_rows(X, 0, D, t0, t1, *rt, sel, w);
      }
    }
#pragma omp barrier
    if (units) {  // every thread takes the top-k of every token from the logits (thread 0 into sel / w)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = routed_slot(*rt, t);
        if (s >= 0) topk_token(logits.get() + t * 64, t, s, *rt, own_sel.data(), own_w.data());
      }
      if (h == 0) {
        std::copy(own_sel.begin(), own_sel.end(), sel);
        std::copy(own_w.begin(), own_w.end(), w);
      }
    }
    // every thread sorts the (few) pairs itself: same input, same order
    const Pairs pr(units ? own_sel.data() : sel, units ? own_w.data() : w, T, k, pl.N);
    const int64_t nb = pr.num_blocks();
    if (pr.size() > 0) {  // the same for every thread: all of them meet the barrier, or none
      phase_a(pr, nb * h / nh, nb * (h + 1) / nh, X, xh, pl, U.get());
#pragma omp barrier
    }
    const auto [o0, o1] = out_slice(O, h, nh);
    if (gemm.on()) {  // this thread's slice of the base output, updated by phase B next
      BaseGemm g = gemm;
      const Ahead mine = g_own_bt ? own_ahead(pr, pl, rt, T, stack_ahead) : Ahead{};
      if (!mine.ranges.empty()) g.own = &mine;
      g(gx, gy, T, D, O, o0, o1);
    }
    phase_b_slice(pr, pl, U.get(), yv, T, bf16, sel, w, k, o0, o1);
  }
}


// act = silu(y_a) * y_b over columns [o0, o1) of T rows of O (y_a in place), silu_mul_'s values (defined below).
void silu_mul_cols(void* ya, const void* yb, int64_t T, int64_t O, int64_t o0, int64_t o1, bool bf16);

// The gate and up projections of one FFN (one x [T, D], T < SPLIT_POOLS_BELOW, both pools read by phase A as run()'s
// small-batch path reads them: float32 x, or bfloat16 x with pools phase_a_reads_bf16) in one parallel region, then
// act = silu(gate) * up into y_a. Each module's y, selections and weights are run()'s for it (route_rows per token,
// phase A per block, the GEMM per output, phase B per slice: the same sums and roundings), and act is silu_mul_'s.
// What goes: one region's fork and join of the two, two of its four barriers, the second module's routing and
// phase A waiting after the first's (here the two run side by side: at one token one thread routes gate's token
// while the other routes up's), and silu_mul_'s own pass over the outputs (each thread takes its slice as soon as
// its two GEMM slices are done). ra / rb null: that module routes nothing (its base GEMM alone). The decode stack takes
// it for steps of fewer than g_fuse_pair_below rows (_fuse_pair_below: tests and A/B runs). scripts/ab_steps.py (the
// variant alternating step by step; 30th session, Zen 4 VM, default base in bfloat16), steps with it against without:
// one sequence, one adapter 12.19 -> 12.06, 10.57 -> 10.32 and 11.51 -> 11.42 ms, four adapters 11.19 -> 10.90 and
// 11.42 -> 11.28; two sequences 11.33 -> 11.27 and 11.65 -> 11.40; three 13.73 -> 13.31 and 14.37 -> 14.51. From 4
// rows the stack then prefetched each routed module's pools during the GEMM before it (Ahead), which this order would
// have to take from o_proj's GEMM alone: at 8 sequences the steps went 21.08 -> 20.97, 18.84 -> 18.92 and 21.56 ->
// 21.75 (four adapters), so there the two calls stay; with Ahead from 16 rows and each call's own B^T rows prefetched
// during its GEMM (which run_pair does not do), 15.08 -> 14.83 and 16.21 -> 16.41 (32nd session) - no change made. The
// bare gate and up in one region the same way (two GEMM slices and silu a thread) gained nothing: 10.23 -> 10.27 and
// 9.37 -> 9.29 ms at one sequence, 18.71 -> 18.77 and 18.29 -> 18.65 at 8, 41.19 -> 41.41 and 38.78 -> 38.79 at 32 - so
// a bare step keeps its two linears. 35th session (Zen 4 VM, bfloat16, scripts/ab_steps.py, three runs, the pair at the
// row count against the two calls): 4 sequences 9.83 -> 9.62, 11.24 -> 11.05 and 9.89 -> 9.57 ms with one adapter,
// 12.12 -> 12.02, 10.40 -> 10.25 and 10.34 -> 10.24 with four; 6 sequences 12.26 -> 12.08 with one but 13.10 -> 13.22
// with four; 8 sequences 14.70 -> 14.59 and 14.61 -> 14.50 with one but 15.99 -> 16.17 and 15.62 -> 15.78 with four (FFN
// 8.46 -> 8.82, 8.30 -> 8.67: below 16 rows the two calls each prefetch their own LoRAs' B^T rows during their GEMMs,
// which run_pair does not, and with four adapters few of a slot's LoRAs are picked) - so the pair runs up to 4 rows.
int64_t g_fuse_pair_below = 5;
void run_pair(const void* xv, void* ya, void* yb, int64_t T, bool bf16, const Pools& pa, const Pools& pb,
              const Routing* ra, const Routing* rb, int64_t* sela, float* wa, int64_t* selb, float* wb, int64_t k,
              const BaseGemm& ga, const BaseGemm& gb) {
  const int64_t D = pa.D, O = pa.O;
  TORCH_CHECK(pb.D == D && pb.O == O && T < SPLIT_POOLS_BELOW && ga.on() && gb.on(), "run_pair: gate and up must share x and O");
  const int64_t P = region_threads((O + 2 * L - 1) / (2 * L));
  const float* X = bf16 ? nullptr : static_cast<const float*>(xv);
  const uint16_t* xh = bf16 ? static_cast<const uint16_t*>(xv) : nullptr;
  const auto* xb = bf16 ? static_cast<const c10::BFloat16*>(xv) : nullptr;
  const Scratch Ua = scratch(T * k * pa.r), Ub = scratch(T * k * pb.r);
#pragma omp parallel num_threads(P)
  {
    const auto [h, nh] = region_thread();
    // stage 1: the items (module, token), gate's tokens first, a share to each thread
    const int64_t i0 = 2 * T * h / nh, i1 = 2 * T * (h + 1) / nh;
    const auto route = [&](const Routing* rt, int64_t t0, int64_t t1, int64_t* sel, float* w) {
      if (!rt || t1 <= t0) return;
      if (bf16) route_rows(xb, 0, D, t0, t1, *rt, sel, w);
      else route_rows(X, 0, D, t0, t1, *rt, sel, w);
    };
    route(ra, std::min(i0, T), std::min(i1, T), sela, wa);
    route(rb, std::max(i0, T) - T, std::max(i1, T) - T, selb, wb);
#pragma omp barrier
    // every thread sorts the (few) pairs itself: same input, same order; phase A over both modules' blocks in turn
    const Pairs pra(sela, wa, T, k, pa.N), prb(selb, wb, T, k, pb.N);
    const int64_t na = pra.num_blocks(), nt = na + prb.num_blocks();
    if (nt > 0) {  // the same for every thread: all of them meet the barrier, or none
      const int64_t b0 = nt * h / nh, b1 = nt * (h + 1) / nh;
      if (std::min(b1, na) > b0) phase_a(pra, b0, std::min(b1, na), X, xh, pa, Ua.get());
      if (b1 > std::max(b0, na)) phase_a(prb, std::max(b0, na) - na, b1 - na, X, xh, pb, Ub.get());
#pragma omp barrier
    }
    const auto [o0, o1] = out_slice(O, h, nh);
    ga(xv, ya, T, D, O, o0, o1);  // this thread's slices of both base outputs, each updated by its phase B next
    phase_b_slice(pra, pa, Ua.get(), ya, T, bf16, sela, wa, k, o0, o1);
    gb(xv, yb, T, D, O, o0, o1);
    phase_b_slice(prb, pb, Ub.get(), yb, T, bf16, selb, wb, k, o0, o1);
    silu_mul_cols(ya, yb, T, O, o0, o1, bf16);
  }
}

// ---- decode attention over a slot cache: one query token per row, each reading only its own row's first len positions

typedef int32_t vi __attribute__((vector_size(L * sizeof(int32_t))));

// exp(x) for x <= 0 (scores minus their maximum): Cephes' expf reduction and polynomial (~1 ulp), 2^n by exponent add.
// On any vector type V of floats (VI: its int32 twin): vf, and on AVX2 builds the 8-lane vf8, which GCC compiles to
// AVX2's own registers - a 16-lane vector's compares and selects it lowered to scalar code there (vcmpss / vblendvps
// lane by lane). Each lane's arithmetic is the same either way, so are its values.
template <typename V, typename VI>
__attribute__((always_inline)) inline V vexp_of(V x) {
  const V lo = V{} - 87.f;
  x = x < lo ? lo : x;
  const V magic = V{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V e = p * r * r + r + 1.f;
  VI bits;
  std::memcpy(&bits, &e, sizeof e);
  bits += __builtin_convertvector(n, VI) << 23;
  std::memcpy(&e, &bits, sizeof e);
  return e;
}
__attribute__((always_inline)) inline vf vexp(vf x) { return vexp_of<vf, vi>(x); }
typedef float vf8 __attribute__((vector_size(8 * sizeof(float)), aligned(sizeof(float))));  // unaligned loads allowed
typedef int32_t vi8 __attribute__((vector_size(8 * sizeof(int32_t))));
inline vf8 load_8(const float* p) { return *reinterpret_cast<const vf8*>(p); }
inline void store_8(float* p, vf8 v) { *reinterpret_cast<vf8*>(p) = v; }

// Lane l of the result = the sum of a[REV4[l]]'s lanes, by a pairwise tree of shuffles (16 dots for ~30 operations
// instead of 16 horizontal sums); the same order on every call. (The shuffle tree is GCC's vector extension; with
// clang, sixteen hsums. Until 2026-12 the test here also read "|| L != 16", which the preprocessor evaluates with
// L = 0 - L is a C++ constant, not a macro - so every build took the scalar sums: the decode attention ran ~2x slower.)
constexpr int REV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
static_assert(L == 16, "reduce16's shuffles are written for 16 lanes");
inline vf reduce16(const vf* a) {
#if defined(__clang__)
  vf out;
  for (int l = 0; l < L; ++l) out[l] = hsum(a[REV4[l]]);
  return out;
#else
  vf b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j)
    b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], vi{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(a[2 * j], a[2 * j + 1], vi{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int j = 0; j < 4; ++j)
    c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], vi{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}) +
           __builtin_shuffle(b[2 * j], b[2 * j + 1], vi{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  for (int j = 0; j < 2; ++j)
    d[j] = __builtin_shuffle(c[2 * j], c[2 * j + 1], vi{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}) +
           __builtin_shuffle(c[2 * j], c[2 * j + 1], vi{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  return __builtin_shuffle(d[0], d[1], vi{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}) +
         __builtin_shuffle(d[0], d[1], vi{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
#endif
}

constexpr int ATTN_PFL = 1;  // locality hint of attend_group's prefetches (see there)
constexpr int MAX_GROUP = 8;  // query heads per key/value head

// Prefetch (into L2, ATTN_PFL) the `bytes` of K from `ahead` on, continuing into V's start once past K's end
// (`k_end`): the attention's K stream, some blocks ahead of the block being scored.
inline void prefetch_k(const void* ahead, int64_t bytes, const void* k_end, const void* v) {
  const char *a = static_cast<const char*>(ahead), *e = static_cast<const char*>(k_end), *vs = static_cast<const char*>(v);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(a + o < e ? a + o : vs + (a + o - e), 0, ATTN_PFL);
}

// The K stream of one key/value head, block by block: f(t0, n) for each block of L positions (n of them before len),
// after prefetching (prefetch_k) K's block AHEAD blocks on, continuing into V's start past K's k_rows rows of row_bytes.
template <int AHEAD = 2, typename F>
__attribute__((always_inline)) inline void for_k_blocks(const void* K, const void* V, int64_t len, int64_t k_rows,
                                                        int64_t row_bytes, F&& f) {
  const char* k = static_cast<const char*>(K);
  for (int64_t t0 = 0; t0 < len; t0 += L) {
    prefetch_k(k + (t0 + AHEAD * L) * row_bytes, L * row_bytes, k + k_rows * row_bytes, V);
    f(t0, std::min<int64_t>(L, len - t0));
  }
}

// The de-interleave of a V pass that took two positions a step (attend_group_bf16, attend_group_q8_int): lane 4 l + i
// of a holds dimension 8 l + i, of b 8 l + 4 + i; d0, d1 get dimensions 0-15 and 16-31 in order.
inline void unpair(vf a, vf b, vf& d0, vf& d1) {
  d0 = __builtin_shuffle(a, b, vi{0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23});
  d1 = __builtin_shuffle(a, b, vi{8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31});
}

// One head's softmax numerators over its scores sr[0, len) (sr padded to a multiple of L: the pad set to -1e30, whose
// exp is 0): e = exp(s - max), 16 at a time, each block handed to put(t, e); returns 1 / (their float32 sum).
template <typename Put>
inline float softmax_pass(float* sr, int64_t len, int64_t padded, Put&& put) {
  for (int64_t t = len; t < padded; ++t) sr[t] = -1e30f;
  vf mv = load(sr);
  for (int64_t t = L; t < padded; t += L) { const vf x = load(sr + t); mv = mv > x ? mv : x; }
  float m = mv[0];
  for (int l = 1; l < L; ++l) m = mv[l] > m ? mv[l] : m;
  vf sum = vf{};
  for (int64_t t = 0; t < padded; t += L) {
    const vf e = vexp(load(sr + t) - m);
    put(t, e);
    sum += e;
  }
  return 1.f / hsum(sum);
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// softmax_pass on 8-lane vectors (AVX2 builds: see vexp_of), storing e into sr: the same max, the same exp of each
// score, and the sum in the same order (lanes 0-7 and 8-15 of each 16 in two sums, then hsum's order).
// vs (the 8-bit cache's V scales, or null): each stored e times its position's scale (0 past len), the sum e's own.
inline float softmax_pass8(float* sr, int64_t len, int64_t padded, const float* vs = nullptr) {
  for (int64_t t = len; t < padded; ++t) sr[t] = -1e30f;
  vf8 mv = load_8(sr);
  for (int64_t t = 8; t < padded; t += 8) { const vf8 x = load_8(sr + t); mv = mv > x ? mv : x; }
  float m = mv[0];
  for (int l = 1; l < 8; ++l) m = mv[l] > m ? mv[l] : m;
  vf8 lo = vf8{}, hi = vf8{};
  for (int64_t t = 0; t < padded; t += L) {
    const vf8 a = vexp_of<vf8, vi8>(load_8(sr + t) - m), b = vexp_of<vf8, vi8>(load_8(sr + t + 8) - m);
    if (vs) {
      alignas(32) float sc[L] = {};
      std::memcpy(sc, vs + t, std::min<int64_t>(L, len - t) * sizeof(float));
      store_8(sr + t, a * load_8(sc));
      store_8(sr + t + 8, b * load_8(sc + 8));
    } else {
      store_8(sr + t, a);
      store_8(sr + t + 8, b);
    }
    lo += a;
    hi += b;
  }
  return 1.f / hsum16((__m256)lo, (__m256)hi);
}
#endif

// A float V pass's prefetches at position u (v: its row): V's row 32 positions on (it may run past the tensor: no
// fault) and, a line a row, the next group's first two K blocks.
template <typename VT>
__attribute__((always_inline)) inline void prefetch_v_row(const VT* v, int64_t DH, const VT* next_k, int64_t u) {
  constexpr int64_t ES = sizeof(VT);
  for (int64_t o = 0; o < DH * ES; o += 64) __builtin_prefetch(reinterpret_cast<const char*>(v + 32 * DH) + o, 0, ATTN_PFL);
  if (next_k && u < 2 * L * DH * ES / 64) __builtin_prefetch(reinterpret_cast<const char*>(next_k) + u * 64, 0, ATTN_PFL);
}

// The V pass of the float paths (attend_group, attend_group_q8): out[r] = (sum_u s[r][u] V[u]) * inv[r], V's rows
// (float32, bfloat16 or int8: `load` widens each) read once for all nrep heads, every sum in float32, rounded once to T.
template <int DH, typename VT, typename T>
void float_v_pass(const VT* V, int64_t len, int64_t nrep, const float* s, int64_t padded, const float* inv, T* out,
                  const VT* next_k) {
  constexpr int NV = DH / L;
  vf acc[MAX_GROUP][NV];
  for (int64_t r = 0; r < nrep; ++r) for (int c = 0; c < NV; ++c) acc[r][c] = vf{};
  for (int64_t u = 0; u < len; ++u) {
    const VT* v = V + u * DH;
    prefetch_v_row(v, DH, next_k, u);
    vf vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load(v + c * L);
    for (int64_t r = 0; r < nrep; ++r) {
      const float p = s[r * padded + u];
      for (int c = 0; c < NV; ++c) acc[r][c] += p * vv[c];
    }
  }
  for (int64_t r = 0; r < nrep; ++r)
    for (int c = 0; c < NV; ++c) {
      const vf o = acc[r][c] * inv[r];
      for (int l = 0; l < L; ++l) out[r * DH + c * L + l] = static_cast<T>(o[l]);
    }
}

// The nrep query heads of one key/value head of one row: softmax(scale * q K[:len]^T) V[:len], computed in float32
// and rounded once to T. Scores 16 positions at a time (K rows read once per block, the block's next-but-one
// prefetched), one pass of exp over the scores, then V read once for all nrep heads. s: scratch of nrep * (len + L).
// The prefetches go to L2 (ATTN_PFL 1): into L1 they evicted the lines in use (2-core Zen 4 VM, 30 layers x 32 rows of
// ~190 positions, cold: float32 14.4-16.3 -> 11.9-12.7 ms, bfloat16 12.1 -> 10.9; twice as far ahead for bfloat16: 15 ms).
template <typename T, int DH>
void attend_group(const T* q, const T* K, const T* V, int64_t len, int64_t nrep, float scale, T* out, float* s,
                  const T* next_k) {
  constexpr int NV = DH / L;
  vf qv[MAX_GROUP][NV];
  for (int64_t r = 0; r < nrep; ++r)
    for (int c = 0; c < NV; ++c) qv[r][c] = load(q + r * DH + c * L) * scale;
  const int64_t padded = (len + L - 1) / L * L;
  for_k_blocks(K, V, len, len, DH * static_cast<int64_t>(sizeof(T)), [&](int64_t t0, int64_t n) {
    // bfloat16: the block's rows widened once into kb for all nrep heads (each head widening them again cost ~10 %
    // of a decode step's attention); float32 reads K directly. The same float values either way.
    [[maybe_unused]] alignas(64) float kb[std::is_same_v<T, float> ? 1 : L * DH];
    if constexpr (!std::is_same_v<T, float>)
      for (int64_t j = 0; j < n; ++j)
        for (int c = 0; c < NV; ++c) store(kb + j * DH + c * L, load(K + (t0 + j) * DH + c * L));
    for (int64_t r = 0; r < nrep; ++r) {
      vf a[L];
      for (int j = 0; j < L; ++j) {
        const int64_t row = std::min<int64_t>(REV4[j], n - 1);  // past len: the last row again, never used
        const float* k;
        if constexpr (std::is_same_v<T, float>) k = K + (t0 + row) * DH;
        else k = kb + row * DH;
        // the first product rounded on its own (keep: GCC had fused it into the second step's FMA and rounded the
        // second product instead - either is one order, but only this one is spelled out, so the AVX2 build's
        // attend_group_avx2 can give the same bits)
        vf acc = keep(qv[r][0] * load(k));
        for (int c = 1; c < NV; ++c) acc += qv[r][c] * load(k + c * L);
        a[j] = acc;
      }
      store(s + r * padded + t0, reduce16(a));
    }
  });
  float inv[MAX_GROUP];
  for (int64_t r = 0; r < nrep; ++r) {
    float* sr = s + r * padded;
    inv[r] = softmax_pass(sr, len, padded, [&](int64_t t, vf e) { store(sr + t, e); });
  }
  float_v_pass<DH>(V, len, nrep, s, padded, inv, out, next_k);
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// attend_group without AVX-512 (AVX2 + FMA builds): the same sums in the same order on 8-lane halves. With 16-lane
// vectors split in two by the compiler, the generic code spilled (nrep x Dh / 8 accumulators of V against AVX2's 16
// registers) and reduce16's cross-half shuffles went through memory: on an AVX2 build (the 34th session's Zen 4 VM,
// -march=haswell, default base in float32) a decode step's attention took 44.7 of the step's 125 ms at 32 sequences
// (11.5 of 35 at 8), where its K / V bytes take ~10. Every output is the AVX-512 build's, bit for bit
// (tests/test_avx2_build.py).

// The scores of 8 rows from h[j] = lo_j + hi_j (hsum's first step): hsum's remaining adds for each row, in row order.
inline __m256 reduce8_avx2(__m256 h0, __m256 h1, __m256 h2, __m256 h3, __m256 h4, __m256 h5, __m256 h6, __m256 h7) {
  // [g_j | g_j+4], g[l] = h[l] + h[l + 4] (hsum's second step)
  const auto pair = [](__m256 a, __m256 b) {
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  };
  const __m256 p0 = pair(h0, h4), p1 = pair(h1, h5), p2 = pair(h2, h6), p3 = pair(h3, h7);
  // (g0 + g2), (g1 + g3) of rows 0, 1 | 4, 5 and 2, 3 | 6, 7; then their sum, rows 0-3 | 4-7
  const __m256 r01 = _mm256_add_ps(_mm256_shuffle_ps(p0, p1, 0x44), _mm256_shuffle_ps(p0, p1, 0xEE));
  const __m256 r23 = _mm256_add_ps(_mm256_shuffle_ps(p2, p3, 0x44), _mm256_shuffle_ps(p2, p3, 0xEE));
  return _mm256_add_ps(_mm256_shuffle_ps(r01, r23, 0x88), _mm256_shuffle_ps(r01, r23, 0xDD));
}

// h = lo + hi of q . k over DH: lane l of 16 sums d = l mod 16 with one fused multiply-add a step after a product
template <int DH>
__attribute__((always_inline)) inline __m256 qk_halves(const float* q, const float* k) {
  __m256 lo = _mm256_mul_ps(_mm256_load_ps(q), _mm256_loadu_ps(k));
  __m256 hi = _mm256_mul_ps(_mm256_load_ps(q + 8), _mm256_loadu_ps(k + 8));
  for (int c = 1; c < DH / L; ++c) {
    lo = _mm256_fmadd_ps(_mm256_load_ps(q + c * L), _mm256_loadu_ps(k + c * L), lo);
    hi = _mm256_fmadd_ps(_mm256_load_ps(q + c * L + 8), _mm256_loadu_ps(k + c * L + 8), hi);
  }
  // keep8: GCC's _mm256_mul_ps / _mm256_add_ps are plain vector arithmetic, which it contracts - at DH 16 (no FMA step)
  // it had fused hi's product into this add (one rounding fewer than attend_group's), and the builds' scores differed
  // by an ulp
  return _mm256_add_ps(keep8(lo), keep8(hi));
}

// The V pass's halves [c0, c0 + CW) of G heads (NR = nrep <= G; G x CW accumulators in registers): as float_v_pass.
template <int G, int CW, typename VT, typename T>
void v_cols_avx2(const VT* V, int64_t DH, int64_t c0, int64_t len, int64_t nrep, const float* s, int64_t padded,
                 const float* inv, T* out, const VT* next_k, bool first) {
  __m256 acc[G][CW];
  for (int r = 0; r < G; ++r) for (int c = 0; c < CW; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t u = 0; u < len; ++u) {
    const VT* v = V + u * DH;
    if (first) prefetch_v_row(v, DH, next_k, u);
    __m256 vv[CW];
    for (int c = 0; c < CW; ++c) vv[c] = load8(v + 8 * (c0 + c));
    for (int r = 0; r < G; ++r) {
      if (r >= nrep) break;
      const __m256 p = _mm256_set1_ps(s[r * padded + u]);
      for (int c = 0; c < CW; ++c) acc[r][c] = _mm256_fmadd_ps(p, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < G && r < nrep; ++r)
    for (int c = 0; c < CW; ++c) {
      alignas(32) float o[8];
      _mm256_store_ps(o, _mm256_mul_ps(acc[r][c], _mm256_set1_ps(inv[r])));
      for (int l = 0; l < 8; ++l) out[r * DH + 8 * (c0 + c) + l] = static_cast<T>(o[l]);
    }
}

template <int G, int DH, typename VT, typename T>
void v_pass_avx2(const VT* V, int64_t len, int64_t nrep, const float* s, int64_t padded, const float* inv, T* out,
                 const VT* next_k) {
  // CW: the largest power of two (a divisor of NH) with at most 12 accumulators
  constexpr int NH = DH / 8, CAP = std::min(NH, std::max(1, 12 / G)), CW = CAP >= 8 ? 8 : CAP >= 4 ? 4 : CAP >= 2 ? 2 : 1;
  static_assert(NH % CW == 0, "the V pass's column blocks must tile the head");
  for (int c0 = 0; c0 < NH; c0 += CW)
    v_cols_avx2<G, CW>(V, DH, c0, len, nrep, s, padded, inv, out, next_k, c0 == 0);
}

// v_pass_avx2 with G (a register block's heads) for nrep, and q * scale for nrep heads into qs (as attend_group's qv):
// what attend_group_avx2 and attend_group_q8_avx2 share.
template <int DH, typename VT, typename T>
void v_pass_avx2_any(const VT* V, int64_t len, int64_t nrep, const float* s, int64_t padded, const float* inv, T* out,
                     const VT* next_k) {
  switch (nrep) {
    case 1: return v_pass_avx2<1, DH>(V, len, nrep, s, padded, inv, out, next_k);
    case 2: return v_pass_avx2<2, DH>(V, len, nrep, s, padded, inv, out, next_k);
    case 3: return v_pass_avx2<3, DH>(V, len, nrep, s, padded, inv, out, next_k);
    case 4: return v_pass_avx2<4, DH>(V, len, nrep, s, padded, inv, out, next_k);
    default: return v_pass_avx2<MAX_GROUP, DH>(V, len, nrep, s, padded, inv, out, next_k);
  }
}
template <int DH, typename T>
inline void scaled_q_avx2(const T* q, int64_t nrep, float scale, float* qs) {
  for (int64_t r = 0; r < nrep; ++r)
    for (int c = 0; c < DH; c += 8) _mm256_store_ps(qs + r * DH + c, _mm256_mul_ps(load8(q + r * DH + c), _mm256_set1_ps(scale)));
}

template <typename T, int DH>
void attend_group_avx2(const T* q, const T* K, const T* V, int64_t len, int64_t nrep, float scale, T* out, float* s,
                       const T* next_k) {
  alignas(32) float qs[MAX_GROUP * DH];
  scaled_q_avx2<DH>(q, nrep, scale, qs);
  const int64_t padded = (len + L - 1) / L * L;
  for_k_blocks(K, V, len, len, DH * static_cast<int64_t>(sizeof(T)), [&](int64_t t0, int64_t n) {
    [[maybe_unused]] alignas(32) float kb[std::is_same_v<T, float> ? 1 : L * DH];  // bfloat16 rows widened once
    if constexpr (!std::is_same_v<T, float>)
      for (int64_t j = 0; j < n; ++j)
        for (int c = 0; c < DH; c += 8) _mm256_store_ps(kb + j * DH + c, load8(K + (t0 + j) * DH + c));
    const auto row = [&](int64_t j) -> const float* {  // past len: the last row again, never used
      const int64_t i = std::min<int64_t>(j, n - 1);
      if constexpr (std::is_same_v<T, float>) return K + (t0 + i) * DH;
      else return kb + i * DH;
    };
    for (int64_t r = 0; r < nrep; ++r) {
      const float* qr = qs + r * DH;
      for (int64_t j0 = 0; j0 < L; j0 += 8) {
        const __m256 h0 = qk_halves<DH>(qr, row(j0)), h4 = qk_halves<DH>(qr, row(j0 + 4));
        const __m256 h1 = qk_halves<DH>(qr, row(j0 + 1)), h5 = qk_halves<DH>(qr, row(j0 + 5));
        const __m256 h2 = qk_halves<DH>(qr, row(j0 + 2)), h6 = qk_halves<DH>(qr, row(j0 + 6));
        const __m256 h3 = qk_halves<DH>(qr, row(j0 + 3)), h7 = qk_halves<DH>(qr, row(j0 + 7));
        _mm256_storeu_ps(s + r * padded + t0 + j0, reduce8_avx2(h0, h1, h2, h3, h4, h5, h6, h7));
      }
    }
  });
  float inv[MAX_GROUP];
  for (int64_t r = 0; r < nrep; ++r) inv[r] = softmax_pass8(s + r * padded, len, padded);
  v_pass_avx2_any<DH>(V, len, nrep, s, padded, inv, out, next_k);
}
#endif

bool g_attn_dot = true;  // off: bfloat16 takes attend_group's widening path too (A/B runs, tests)
#ifdef REMIX_DOT_BF16
// attend_group for bfloat16 with AVX512-BF16, DH a multiple of 32: the same two passes on vdpbf16ps, which takes two
// bfloat16 products per float32 lane (half the instructions of widening and FMAs - the attention is bound by the
// vector unit's throughput once K and V are in cache). Scores: q . k over pairs of dimensions (products exact in
// float32), times scale. Weights: exp(s - max) in float32 and their float32 sum, as before; each weight then rounded
// to bfloat16 for V, as SDPA's own CPU kernel does for bfloat16 (torch's flash attention converts the exponentials to
// the input dtype before its second GEMM). V: two positions per step, their rows interleaved dimension by dimension
// (unpacklo / unpackhi of 16-bit words: lane 4 l + i of the low half holds dimension 8 l + i, of the high half
// 8 l + 4 + i, put back in order once at the end), times the pair of weights (u, u + 1) broadcast; an odd last position
// pairs with zeros. One order per output whatever the batch, as the float32 path; results differ from it by the
// weights' rounding (~2^-9 relative each). Measured: see decode_attention_impl.
template <int DH>
void attend_group_bf16(const uint16_t* q, const uint16_t* K, const uint16_t* V, int64_t len, int64_t nrep, float scale,
                       uint16_t* out, float* s, uint16_t* pb, const uint16_t* next_k) {
  constexpr int NQ = DH / 32;  // 512-bit vectors of 32 bfloat16 per row
  __m512bh qv[MAX_GROUP][NQ];
  for (int64_t r = 0; r < nrep; ++r)
    for (int c = 0; c < NQ; ++c) qv[r][c] = (__m512bh)_mm512_loadu_si512(q + r * DH + c * 32);
  const int64_t padded = (len + L - 1) / L * L;
  for_k_blocks(K, V, len, len, DH * 2, [&](int64_t t0, int64_t n) {
    for (int64_t r = 0; r < nrep; ++r) {
      vf a[L];
      for (int j = 0; j < L; ++j) {
        const uint16_t* k = K + (t0 + std::min<int64_t>(REV4[j], n - 1)) * DH;  // past len: the last row again, never used
        __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[r][0], (__m512bh)_mm512_loadu_si512(k));
        for (int c = 1; c < NQ; ++c) acc = _mm512_dpbf16_ps(acc, qv[r][c], (__m512bh)_mm512_loadu_si512(k + c * 32));
        a[j] = (vf)acc;
      }
      store(s + r * padded + t0, reduce16(a) * scale);
    }
  });
  float inv[MAX_GROUP];
  for (int64_t r = 0; r < nrep; ++r) {
    uint16_t* pr = pb + r * padded;  // the weights rounded to bfloat16
    inv[r] = softmax_pass(s + r * padded, len, padded, [&](int64_t t, vf e) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + t), (__m256i)_mm512_cvtneps_pbh((__m512)e));
    });
  }
  __m512 acc[MAX_GROUP][2 * NQ];
  for (int64_t r = 0; r < nrep; ++r) for (int c = 0; c < 2 * NQ; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t u = 0; u < len; u += 2) {
    const uint16_t* v = V + u * DH;
    for (int64_t o = 0; o < 2 * DH * 2; o += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(v + 32 * DH) + o, 0, ATTN_PFL);  // may run past the tensor: no fault
    if (next_k && u < 2 * L * DH * 2 / 64)  // the next group's first two K blocks, two lines a step
      for (int64_t e = u; e < u + 2; ++e) __builtin_prefetch(reinterpret_cast<const char*>(next_k) + e * 64, 0, ATTN_PFL);
    const bool two = u + 1 < len;
    __m512i lo[NQ], hi[NQ];
    for (int c = 0; c < NQ; ++c) {
      const __m512i a0 = _mm512_loadu_si512(v + c * 32);
      const __m512i a1 = two ? _mm512_loadu_si512(v + DH + c * 32) : _mm512_setzero_si512();
      lo[c] = _mm512_unpacklo_epi16(a0, a1);
      hi[c] = _mm512_unpackhi_epi16(a0, a1);
    }
    for (int64_t r = 0; r < nrep; ++r) {
      uint32_t pair;  // (p[u], p[u + 1]); past len p is exp's floor (~1e-38), its V row the zeros above
      std::memcpy(&pair, pb + r * padded + u, 4);
      const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < NQ; ++c) {
        acc[r][2 * c] = _mm512_dpbf16_ps(acc[r][2 * c], p, (__m512bh)lo[c]);
        acc[r][2 * c + 1] = _mm512_dpbf16_ps(acc[r][2 * c + 1], p, (__m512bh)hi[c]);
      }
    }
  }
  for (int64_t r = 0; r < nrep; ++r)
    for (int c = 0; c < NQ; ++c) {
      const vf a = (vf)acc[r][2 * c] * inv[r], b = (vf)acc[r][2 * c + 1] * inv[r];
      vf d0, d1;
      unpair(a, b, d0, d1);
      narrow(reinterpret_cast<const float*>(&d0), out + r * DH + c * 32, L);
      narrow(reinterpret_cast<const float*>(&d1), out + r * DH + c * 32 + L, L);
    }
}
#endif

// bfloat16 with AVX512-BF16 and DH a multiple of 32 takes attend_group_bf16 (g_attn_dot, on unless switched off for an
// A/B run). On the 2-core Zen 5 VM (2026-12-03), 30 layers x 32 rows x 192 positions, Dh 64, 3 key/value heads of 3
// query heads: one layer's K and V in cache 4.28 -> 2.08 ms; all 30 layers' (141 MB) from memory 5.87 -> 4.56; and as in
// a decode step, each layer's attention between its q/k/v and MLP GEMMs (32 rows, weights from memory), both paths in
// turn in one process, medians of 12 rounds, two runs: 5.46 / 5.70 -> 4.53 / 4.63 ms, the whole loop 24.3 / 25.5 ->
// 23.5 / 24.7 ms. There the attention is bound by the K/V read (~26 GB/s of the ~39 two threads stream). (Tried and not
// kept: prefetching the next layer's K and V into L2 from the MLP's GEMM tiles, 8-32 lines a tile: the attention
// 6.1 -> 4.7 ms, the GEMMs slower by as much, the loop 25.7 -> 26.5; prefetching K and V 2-8 blocks ahead instead of
// 2: no change.)
template <typename T, int DH>
void decode_attention_impl(const T* q, int64_t q_row, const T* K, const T* V, int64_t row0, int64_t Hkv, int64_t P,
                           const int64_t* lens, int64_t b, int64_t nrep, float scale, T* out, const int64_t* slots) {
  const int64_t items = b * Hkv;
  const auto slot = [&](int64_t i) { return slots ? slots[i] : row0 + i; };  // the cache row query row i reads
#pragma omp parallel num_threads(region_threads(items))
  {
    std::vector<float> s(nrep * (P + L));
#ifdef REMIX_DOT_BF16
    std::vector<uint16_t> pb(std::is_same_v<T, float> ? 0 : nrep * (P + L));
#endif
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t i = it / Hkv, g = it % Hkv, at = (slot(i) * Hkv + g) * P * DH;
      const int64_t next = it + 1 < items ? ((slot((it + 1) / Hkv) * Hkv + (it + 1) % Hkv) * P * DH) : -1;
#ifdef REMIX_DOT_BF16
      if constexpr (!std::is_same_v<T, float> && DH % 32 == 0) if (g_attn_dot) {
        const auto u16 = [](const T* p) { return reinterpret_cast<const uint16_t*>(p); };
        attend_group_bf16<DH>(u16(q + i * q_row + g * nrep * DH), u16(K + at), u16(V + at), lens[i], nrep, scale,
                              reinterpret_cast<uint16_t*>(out + it * nrep * DH), s.data(), pb.data(),
                              next >= 0 ? u16(K + next) : nullptr);
        continue;
      }
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
      attend_group_avx2<T, DH>(q + i * q_row + g * nrep * DH, K + at, V + at, lens[i], nrep, scale, out + it * nrep * DH,
                               s.data(), next >= 0 ? K + next : nullptr);
#else
      attend_group<T, DH>(q + i * q_row + g * nrep * DH, K + at, V + at, lens[i], nrep, scale, out + it * nrep * DH, s.data(),
                          next >= 0 ? K + next : nullptr);
#endif
    }
  }
}
}  // namespace

// ---- the 8-bit K/V cache (opt-in, --kv-cache-dtype int8): each key (value) head's row at one position is Dh int8
// values c and one float32 scale s: s = max|x| / 127, c = round(x / s) (ties to even, as torch.round; 0 where s is 0),
// x ~ s * c - half bfloat16's bytes (Dh + 4 a row against 2 Dh), which is what a long decode attention is bound by.
// V is stored by rows, [S, H, P, Dh]; K in blocks of 16 positions with pairs of dimensions inner, [S, H, P / 16,
// Dh / 2, 16, 2] (KB = 16): a block's scores come out of Dh / 2 products of a query pair with 32 codes (16 positions x
// a pair), one 16-lane vector per head with no horizontal sums (per-row dot products each needed a 16-to-1 reduction a
// block, a third of the attention's instructions); on AVX512-VNNI one vpdpwssd each.
namespace {
inline vf load_n(const float* p, int64_t n) {  // p[0, n) and zeros (n <= L): never reads past the tensor
  if (n == L) return load(p);
  vf v = vf{};
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}

constexpr int KB = 16;  // positions of a K block

// attend_group over an 8-bit cache: scores a block of 16 positions at a time, sum over dimension pairs of q[2e] times
// the block's codes of dimension 2e (and 2e + 1), times the block's 16 scales; the softmax numerators times V's scales
// before the V pass (the sum stays the numerators'), V's rows widened as they are read. Every product and sum in
// float32, rounded once to T; the same order whatever the batch. (The integer path below is the default where the CPU
// has AVX512-VNNI; this one serves other CPUs and the tests.)
template <typename T, int DH>
void attend_group_q8(const T* q, const int8_t* K, const int8_t* V, const float* ks, const float* vs, int64_t len,
                     int64_t nrep, float scale, T* out, float* s, const int8_t* next_k) {
  constexpr int NV = DH / L;
  static_assert(KB == L, "a K block is one vector of scores");
  alignas(64) float qf[MAX_GROUP][DH];
  for (int64_t r = 0; r < nrep; ++r)
    for (int c = 0; c < NV; ++c) store(qf[r] + c * L, load(q + r * DH + c * L) * scale);
  const int64_t padded = (len + L - 1) / L * L;
  for_k_blocks(K, V, len, padded, DH, [&](int64_t t0, int64_t n) {
    const int8_t* kb = K + t0 * DH;  // [DH / 2][16][2]; positions past len hold stale codes, never used
    vf acc[MAX_GROUP];
    for (int64_t r = 0; r < nrep; ++r) acc[r] = vf{};
    for (int e = 0; e < DH / 2; ++e) {
      const vf lo = load(kb + e * 2 * L), hi = load(kb + e * 2 * L + L);  // positions 0-7 and 8-15, pairs inner
      const vf k0 = __builtin_shuffle(lo, hi, vi{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
      const vf k1 = __builtin_shuffle(lo, hi, vi{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
      for (int64_t r = 0; r < nrep; ++r) {  // two fused multiply-adds, even dimension first (as the AVX2 code)
        acc[r] += qf[r][2 * e] * k0;
        acc[r] += qf[r][2 * e + 1] * k1;
      }
    }
    const vf kscale = load_n(ks + t0, n);
    for (int64_t r = 0; r < nrep; ++r) store(s + r * padded + t0, acc[r] * kscale);
  });
  float inv[MAX_GROUP];
  for (int64_t r = 0; r < nrep; ++r) {
    float* sr = s + r * padded;
    inv[r] = softmax_pass(sr, len, padded, [&](int64_t t, vf e) { store(sr + t, e * load_n(vs + t, std::min<int64_t>(L, len - t))); });
  }
  float_v_pass<DH>(V, len, nrep, s, padded, inv, out, next_k);
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// attend_group_q8 without AVX-512 (AVX2 + FMA builds): GCC's code for the 16-lane version widened the codes and
// shuffled the pairs element by element - 30 layers x 32 rows x ~190 positions took 80 ms on an AVX2 build against
// 3.5 on the AVX-512 build's integer path (34th session, Zen 4 VM). Here each K block's codes are widened once into
// kf ([DH / 2][2][16] floats: the pair's even / odd dimension for 16 positions, de-interleaved by a byte shuffle),
// then each head's scores are two fused multiply-adds a pair on 8-lane halves; the softmax (softmax_pass8, V's scales
// folded into the numerators) and V pass (v_pass_avx2, codes widened as read) as attend_group_avx2's. One order per
// output whatever the batch, the AVX-512 float path's (tests/kernel_outputs.py; CPUs with AVX512-VNNI take the
// integer path by default).
template <typename T, int DH>
void attend_group_q8_avx2(const T* q, const int8_t* K, const int8_t* V, const float* ks, const float* vs, int64_t len,
                          int64_t nrep, float scale, T* out, float* s, const int8_t* next_k) {
  static_assert(KB == L, "a K block is one block of scores");
  alignas(32) float qf[MAX_GROUP * DH];
  scaled_q_avx2<DH>(q, nrep, scale, qf);
  const int64_t padded = (len + L - 1) / L * L;
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  alignas(32) float kf[DH / 2][2][L];
  for_k_blocks(K, V, len, padded, DH, [&](int64_t t0, int64_t n) {
    const int8_t* kb = K + t0 * DH;  // [DH / 2][16][2]; positions past len hold stale codes, never used
    for (int e = 0; e < DH / 2; ++e)
      for (int h = 0; h < 2; ++h) {  // positions 8 h .. 8 h + 7: even dimensions in the low 8 bytes, odd in the high
        const __m128i b = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kb + e * 2 * L + h * L)), split);
        _mm256_store_ps(kf[e][0] + 8 * h, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
        _mm256_store_ps(kf[e][1] + 8 * h, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b))));
      }
    alignas(32) float kscale[L] = {};
    std::memcpy(kscale, ks + t0, n * sizeof(float));
    for (int64_t r = 0; r < nrep; ++r) {
      const float* qr = qf + r * DH;
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      for (int e = 0; e < DH / 2; ++e) {
        const __m256 q0 = _mm256_set1_ps(qr[2 * e]), q1 = _mm256_set1_ps(qr[2 * e + 1]);
        lo = _mm256_fmadd_ps(q1, _mm256_load_ps(kf[e][1]), _mm256_fmadd_ps(q0, _mm256_load_ps(kf[e][0]), lo));
        hi = _mm256_fmadd_ps(q1, _mm256_load_ps(kf[e][1] + 8), _mm256_fmadd_ps(q0, _mm256_load_ps(kf[e][0] + 8), hi));
      }
      _mm256_storeu_ps(s + r * padded + t0, _mm256_mul_ps(lo, _mm256_load_ps(kscale)));
      _mm256_storeu_ps(s + r * padded + t0 + 8, _mm256_mul_ps(hi, _mm256_load_ps(kscale + 8)));
    }
  });
  float inv[MAX_GROUP];
  for (int64_t r = 0; r < nrep; ++r) inv[r] = softmax_pass8(s + r * padded, len, padded, vs);
  v_pass_avx2_any<DH>(V, len, nrep, s, padded, inv, out, next_k);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define REMIX_Q8_VNNI 1
bool g_attn_q8_int = true;  // off: the 8-bit cache takes attend_group_q8's float path (A/B runs, tests)
// Prefetch distances of the integer path: K this many blocks of 16 rows ahead, V this many rows (both into L2). On the
// 2-core Zen 5 VM, 30 layers x 32 rows x 192-1024 positions, interleaved A/B in one process: 4 / 96 against 8 / 192,
// 0.64-0.82 against 0.69-0.88 of the bfloat16 cache's attention time; 2 / 64 the same as 4 / 96 within the noise.
constexpr int Q8_KPF = 4, Q8_VPF = 96;

// The V pass of attend_group_q8_int for NR query heads (nr of them used: NR = MAX_GROUP serves 5-8): acc[r] = the
// int16 weights pb[r] (rows pstride apart) times V's int8 rows, two positions a step, in int32 flushed into float32
// every 64 steps.
template <int NR, int DH>
inline void q8_vpass(const int8_t* V, int64_t len, const int16_t* pb, int64_t pstride, __m512 (*acc)[2 * DH / 32],
                     const int8_t* next_k, int64_t nr = NR) {
  constexpr int NQ = DH / 32;
  __m512i iacc[NR][2 * NQ];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 2 * NQ; ++c) { acc[r][c] = _mm512_setzero_ps(); iacc[r][c] = _mm512_setzero_si512(); }
  for (int64_t u = 0; u < len; u += 2) {
    const int8_t* v = V + u * DH;
    for (int64_t o = 0; o < 2 * DH; o += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(v + Q8_VPF * DH) + o, 0, ATTN_PFL);  // may run past the tensor: no fault
    if (next_k && u < 2 * L * DH / 64)  // the next group's first two K blocks, two lines a step
      for (int64_t e = u; e < u + 2; ++e) __builtin_prefetch(reinterpret_cast<const char*>(next_k) + e * 64, 0, ATTN_PFL);
    const bool two = u + 1 < len;
    __m512i lo[NQ], hi[NQ];
    for (int c = 0; c < NQ; ++c) {
      const __m512i a0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + c * 32)));
      const __m512i a1 = two ? _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + DH + c * 32)))
                             : _mm512_setzero_si512();
      lo[c] = _mm512_unpacklo_epi16(a0, a1);
      hi[c] = _mm512_unpackhi_epi16(a0, a1);
    }
    for (int r = 0; r < NR; ++r) {
      if (NR == MAX_GROUP && r >= nr) break;
      uint32_t pair;  // (p[u], p[u + 1]); past len 0
      std::memcpy(&pair, pb + r * pstride + u, 4);
      const __m512i p = _mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < NQ; ++c) {
        iacc[r][2 * c] = _mm512_dpwssd_epi32(iacc[r][2 * c], p, lo[c]);
        iacc[r][2 * c + 1] = _mm512_dpwssd_epi32(iacc[r][2 * c + 1], p, hi[c]);
      }
    }
    if ((u / 2) % 64 == 63 || u + 2 >= len)
      for (int r = 0; r < NR; ++r)
        for (int c = 0; c < 2 * NQ; ++c) {
          acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_cvtepi32_ps(iacc[r][c]));
          iacc[r][c] = _mm512_setzero_si512();
        }
  }
}

// The scores of attend_group_q8_int for NR query heads (nr used): per block of 16 positions, Dh / 2 vpdpwssd a head,
// each a broadcast pair of the query's int16 values times the block's 32 codes of that dimension pair (widened to
// int16), the pairs split over four accumulators (independent chains; int32 sums are exact, so the split changes
// nothing), then times the block's scales and the query's.
template <int NR, int DH>
inline void q8_kpass(const int8_t* K, const float* ks, int64_t len, int64_t padded, const int16_t (*qi)[DH],
                     const float* qscale, float* s, const int8_t* V, int64_t nr = NR) {
  for_k_blocks<Q8_KPF>(K, V, len, padded, DH, [&](int64_t t0, int64_t) {
    const int8_t* kb = K + t0 * DH;  // [DH / 2][16][2]; positions past len hold stale codes, never used
    __m512i acc[NR][4];
    for (int r = 0; r < NR; ++r) for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_si512();
    static_assert(DH % 8 == 0, "four accumulators of dimension pairs");
    for (int e0 = 0; e0 < DH / 2; e0 += 4)
#pragma GCC unroll 4
      for (int a = 0; a < 4; ++a) {  // unrolled: acc[r][a] in registers (a run-time index kept them on the stack)
        const int e = e0 + a;
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + e * 2 * KB)));
        for (int r = 0; r < NR; ++r) {
          if (NR == MAX_GROUP && r >= nr) break;
          int32_t pair;
          std::memcpy(&pair, qi[r] + 2 * e, 4);
          acc[r][a] = _mm512_dpwssd_epi32(acc[r][a], _mm512_set1_epi32(pair), w);
        }
      }
    const vf kscale = load_n(ks + t0, std::min<int64_t>(KB, len - t0));
    for (int r = 0; r < NR; ++r) {
      if (NR == MAX_GROUP && r >= nr) break;
      const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]), _mm512_add_epi32(acc[r][2], acc[r][3]));
      store(s + r * padded + t0, (vf)_mm512_cvtepi32_ps(sum) * (kscale * qscale[r]));
    }
  });
}

// attend_group_q8 on integer dot products (AVX512-VNNI's vpdpwssd: 32 int16 products summed pairwise into 16 int32
// lanes): each query head (times scale) quantized to int16 (its max|q| / 32767 a step), K's blocks widened to int16
// (q8_kpass), the scores exact in int32 (|sum| <= 128 * 32767 * 127 < 2^31) and scaled by the query's and the
// position's scales in float32. Weights: the softmax numerators times V's scales, quantized to int16 per head (their
// max / 32767 a step: the largest weights to ~1e-5 relative, every weight to 1/65534 of the largest, finer than
// bfloat16's 2^-9 near the top); V two positions a step, their int8 rows widened and interleaved (as attend_group_bf16
// interleaves bfloat16), int32 sums flushed into float32 every 64 steps (|sum| <= 128 * 2 * 32767 * 127 < 2^31).
// With one layer's K/V in cache (32 rows x 192 positions, 30 calls) 1.9 ms against the float path's 3.9 and the
// bfloat16 cache's vdpbf16ps attention's 3.1; from memory 0.60-0.64 of the bfloat16 attention's time (the bytes: 0.53).
// Deterministic; each row's result independent of the batch.
template <typename T, int DH>
void attend_group_q8_int(const T* q, const int8_t* K, const int8_t* V, const float* ks, const float* vs, int64_t len,
                         int64_t nrep, float scale, T* out, float* s, int16_t* pb, const int8_t* next_k) {
  constexpr int NQ = DH / 32;  // 512-bit vectors of 32 int16 a row of V
  alignas(64) int16_t qi[MAX_GROUP][DH];
  float qscale[MAX_GROUP];
  for (int64_t r = 0; r < nrep; ++r) {
    alignas(64) float qf[DH];
    vf mv = vf{};
    for (int c = 0; c < DH / L; ++c) {
      const vf x = load(q + r * DH + c * L) * scale;
      store(qf + c * L, x);
      const vf a = x < 0 ? -x : x;
      mv = mv > a ? mv : a;
    }
    float m = 0.f;
    for (int l = 0; l < L; ++l) m = std::max(m, mv[l]);
    const float st = m / 32767.f;
    qscale[r] = st;
    for (int d = 0; d < DH; ++d) qi[r][d] = st > 0.f ? static_cast<int16_t>(std::nearbyint(qf[d] / st)) : 0;
  }
  const int64_t padded = (len + L - 1) / L * L;
  switch (nrep) {  // as q8_vpass
    case 1: q8_kpass<1, DH>(K, ks, len, padded, qi, qscale, s, V); break;
    case 2: q8_kpass<2, DH>(K, ks, len, padded, qi, qscale, s, V); break;
    case 3: q8_kpass<3, DH>(K, ks, len, padded, qi, qscale, s, V); break;
    case 4: q8_kpass<4, DH>(K, ks, len, padded, qi, qscale, s, V); break;
    default: q8_kpass<MAX_GROUP, DH>(K, ks, len, padded, qi, qscale, s, V, nrep); break;
  }
  float pscale[MAX_GROUP], inv[MAX_GROUP];
  for (int64_t r = 0; r < nrep; ++r) {
    float* sr = s + r * padded;
    vf mx = vf{};
    inv[r] = softmax_pass(sr, len, padded, [&](int64_t t, vf e) {
      const vf w = e * load_n(vs + t, std::min<int64_t>(L, len - t));
      mx = mx > w ? mx : w;
      store(sr + t, w);
    });
    float m = 0.f;
    for (int l = 0; l < L; ++l) m = std::max(m, mx[l]);
    const float st = m / 32767.f;
    pscale[r] = st;
    const float is = st > 0.f ? 1.f / st : 0.f;
    int16_t* pr = pb + r * (padded + 2);
    for (int64_t t = 0; t < padded; t += L)  // round to nearest (even) as the vector conversion does, in [0, 32767]
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + t),
                          _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps((__m512)load(sr + t), _mm512_set1_ps(is)))));
    pr[padded] = pr[padded + 1] = 0;
  }
  __m512 acc[MAX_GROUP][2 * NQ];
  switch (nrep) {  // the group's accumulators in registers: a loop over a run-time nrep kept them on the stack
    case 1: q8_vpass<1, DH>(V, len, pb, padded + 2, acc, next_k); break;
    case 2: q8_vpass<2, DH>(V, len, pb, padded + 2, acc, next_k); break;
    case 3: q8_vpass<3, DH>(V, len, pb, padded + 2, acc, next_k); break;
    case 4: q8_vpass<4, DH>(V, len, pb, padded + 2, acc, next_k); break;
    default: q8_vpass<MAX_GROUP, DH>(V, len, pb, padded + 2, acc, next_k, nrep); break;
  }
  for (int64_t r = 0; r < nrep; ++r)
    for (int c = 0; c < NQ; ++c) {
      const float f = pscale[r] * inv[r];
      const vf a = (vf)acc[r][2 * c] * f, b = (vf)acc[r][2 * c + 1] * f;
      vf d0, d1;
      unpair(a, b, d0, d1);
      for (int l = 0; l < L; ++l) {
        out[r * DH + c * 32 + l] = static_cast<T>(d0[l]);
        out[r * DH + c * 32 + L + l] = static_cast<T>(d1[l]);
      }
    }
}
#endif

template <typename T, int DH>
void decode_attention_q8_impl(const T* q, int64_t q_row, const int8_t* K, const int8_t* V, const float* Ks,
                              const float* Vs, int64_t row0, int64_t Hkv, int64_t P, const int64_t* lens, int64_t b,
                              int64_t nrep, float scale, T* out, const int64_t* slots) {
  const int64_t items = b * Hkv;
  const auto slot = [&](int64_t i) { return slots ? slots[i] : row0 + i; };
#pragma omp parallel num_threads(region_threads(items))
  {
    std::vector<float> s(nrep * (P + L));
#ifdef REMIX_Q8_VNNI
    std::vector<int16_t> pb(nrep * (P + L + 2));
#endif
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t i = it / Hkv, g = it % Hkv, at = (slot(i) * Hkv + g) * P;
      const int64_t next = it + 1 < items ? ((slot((it + 1) / Hkv) * Hkv + (it + 1) % Hkv) * P * DH) : -1;
#ifdef REMIX_Q8_VNNI
      if constexpr (DH % 32 == 0) if (g_attn_q8_int) {
        attend_group_q8_int<T, DH>(q + i * q_row + g * nrep * DH, K + at * DH, V + at * DH, Ks + at, Vs + at, lens[i],
                                   nrep, scale, out + it * nrep * DH, s.data(), pb.data(), next >= 0 ? K + next : nullptr);
        continue;
      }
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
      attend_group_q8_avx2<T, DH>(q + i * q_row + g * nrep * DH, K + at * DH, V + at * DH, Ks + at, Vs + at, lens[i],
                                  nrep, scale, out + it * nrep * DH, s.data(), next >= 0 ? K + next : nullptr);
#else
      attend_group_q8<T, DH>(q + i * q_row + g * nrep * DH, K + at * DH, V + at * DH, Ks + at, Vs + at, lens[i], nrep,
                             scale, out + it * nrep * DH, s.data(), next >= 0 ? K + next : nullptr);
#endif
    }
  }
}
}  // namespace

// y[t] += sum_j weight[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t]), in place (idx -1 = none). Returns y.
torch::Tensor gather_(torch::Tensor x, torch::Tensor y, torch::Tensor a, torch::Tensor bt, torch::Tensor idx,
                      torch::Tensor weight, int64_t r) {
  check_pools(x, y, a, bt, r);
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.dim() == 2 && idx.size(0) == x.size(0), "idx must be int64 [T, k]");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.sizes() == idx.sizes(), "weight must be float32 [T, k]");
  auto ic = idx.contiguous(); auto wc = weight.contiguous();
  const int64_t N = a.size(0) / r;
  TORCH_CHECK(ic.numel() == 0 || (ic.max().item<int64_t>() < N && ic.min().item<int64_t>() >= -1), "idx out of range");
  const Pools pl{a.data_ptr(), bt.data_ptr(), r, N, x.size(1), y.size(1), a.scalar_type() == torch::kBFloat16};
  run(x, y, pl, nullptr, const_cast<int64_t*>(ic.data_ptr<int64_t>()), const_cast<float*>(wc.data_ptr<float>()), ic.size(1));  // read only without routing
  return y;
}

// Whether a bound call can take this slot map (empty, or int64 [T] contiguous) and counts (empty, or int64 [N]
// contiguous) on raw pointers; and the selections ip [n] (-1: none) added into counts where given.
inline bool call_args_fit(const torch::Tensor& slots, int64_t T, const torch::Tensor& counts, int64_t N) {
  return (slots.numel() == 0 || (slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == T)) &&
         (counts.numel() == 0 || (counts.scalar_type() == torch::kInt64 && counts.is_contiguous() && counts.numel() == N));
}
inline void add_counts(const torch::Tensor& counts, const int64_t* ip, int64_t n) {
  if (counts.numel() == 0) return;
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e) if (ip[e] >= 0) cp[ip[e]] += 1;
}

// Every slot's table entry fits a pool of N LoRAs (no pool, or up to 64 LoRAs inside it with 1 <= k <= min(n, kmax)),
// else an error naming the first that does not.
void check_slot_tables(const int64_t* op, const int64_t* np, const int64_t* kp, int64_t S, int64_t N, int64_t kmax) {
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(np[s] == 0 || (np[s] <= 64 && op[s] >= 0 && op[s] + np[s] <= N && kp[s] >= 1 && kp[s] <= np[s] &&
                               kp[s] <= kmax),
                message("slot %lld: bad offset / n / k", s));
}

// Each LoRA's own rank (Pools::rank) from ranks (int64 [N], each in [0, r]), or null where ranks is empty (all r).
const int64_t* checked_ranks(const torch::Tensor& ranks, int64_t N, int64_t r) {
  if (!ranks.defined() || ranks.numel() == 0) return nullptr;
  TORCH_CHECK(ranks.device().is_cpu() && ranks.scalar_type() == torch::kInt64 && ranks.is_contiguous() && ranks.numel() == N,
              "ranks must be a contiguous CPU int64 [N] tensor (one per LoRA) or empty");
  const int64_t* rp = ranks.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] <= r, message("ranks[%lld] = %lld: not in [0, r]", i, rp[i]));
  return rp;
}

// Route every token within its slot's pool (top-k of float32 router logits, ties to the lower index, constant
// weight omega) and add its delta into y in place. slot_of_token empty = every token is slot 0; slot -1, or a
// slot with n = 0, gets no delta. Returns idx [T, kmax] (global ids, -1 padded); adds each selection to counts
// [N] when counts is non-empty.
torch::Tensor route_gather_into(torch::Tensor x, torch::Tensor y, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                                torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k,
                                torch::Tensor slot_omega, int64_t r, int64_t kmax, torch::Tensor counts, torch::Tensor idx,
                                const BaseGemm& gemm = {nullptr, nullptr}, const torch::Tensor& ranks = {}) {
  check_pools(x, y, a, bt, r);
  const int64_t T = x.size(0), D = x.size(1), N = a.size(0) / r;
  TORCH_CHECK(router.scalar_type() == torch::kFloat32 && router.is_contiguous() && router.size(0) == N && router.size(1) == D,
              "router must be contiguous float32 [N, D]");
  TORCH_CHECK(kmax >= 1 && kmax <= 64, "kmax must be in [1, 64]");
  auto off = slot_off.contiguous(); auto nn = slot_n.contiguous(); auto kk = slot_k.contiguous(); auto om = slot_omega.contiguous();
  TORCH_CHECK(off.scalar_type() == torch::kInt64 && nn.scalar_type() == torch::kInt64 && kk.scalar_type() == torch::kInt64 &&
              om.scalar_type() == torch::kFloat32, "slot tables: int64 off / n / k, float32 omega");
  const int64_t S = off.numel();
  TORCH_CHECK(nn.numel() == S && kk.numel() == S && om.numel() == S, "slot tables must have one entry per slot");
  const int64_t *op = off.data_ptr<int64_t>(), *np = nn.data_ptr<int64_t>(), *kp = kk.data_ptr<int64_t>();
  check_slot_tables(op, np, kp, S, N, kmax);
  auto sot = slot_of_token.contiguous();
  const bool one = sot.numel() == 0;
  TORCH_CHECK(one || (sot.scalar_type() == torch::kInt64 && sot.numel() == T), "slot_of_token must be int64 [T] or empty");
  TORCH_CHECK(!one || S >= 1, "slot tables are empty");
  TORCH_CHECK(counts.numel() == 0 || (counts.scalar_type() == torch::kInt64 && counts.is_contiguous() && counts.numel() == N),
              "counts must be int64 [N] or empty");
  if (!idx.defined()) idx = torch::empty({T, kmax}, x.options().dtype(torch::kInt64));
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.is_contiguous() && idx.numel() == T * kmax, "idx must be int64 [T, kmax]");
  int64_t* ip = idx.data_ptr<int64_t>();
  std::fill_n(ip, T * kmax, int64_t{-1});  // not idx.fill_: a dispatched op, ~1.7 us a call at decode sizes
  std::vector<float> weight(T * kmax, 0.f);
  const Routing rt{router.data_ptr<float>(), one ? nullptr : sot.data_ptr<int64_t>(), op, np, kp, om.data_ptr<float>(), S, kmax};
  Pools pl{a.data_ptr(), bt.data_ptr(), r, N, D, y.size(1), a.scalar_type() == torch::kBFloat16};
  pl.rank = checked_ranks(ranks, N, r);
  run(x, y, pl, &rt, ip, weight.data(), kmax, gemm);
  add_counts(counts, ip, T * kmax);
  return idx;
}

torch::Tensor route_gather_(torch::Tensor x, torch::Tensor y, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                            torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k,
                            torch::Tensor slot_omega, int64_t r, int64_t kmax, torch::Tensor counts) {
  return route_gather_into(x, y, router, a, bt, slot_of_token, slot_off, slot_n, slot_k, slot_omega, r, kmax, counts, {});
}
torch::Tensor route_gather_ranks_(torch::Tensor x, torch::Tensor y, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                                  torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n,
                                  torch::Tensor slot_k, torch::Tensor slot_omega, int64_t r, int64_t kmax,
                                  torch::Tensor counts, torch::Tensor ranks) {
  return route_gather_into(x, y, router, a, bt, slot_of_token, slot_off, slot_n, slot_k, slot_omega, r, kmax, counts, {},
                           {nullptr, nullptr}, ranks);
}

// The whole module in one call: y = x @ weight^T (+ bias), then route_gather_ into it; x: [..., D]; returns
// (y [..., O], idx [T, kmax]). float32 (contiguous weight): the GEMM runs inside the gather's parallel region (BaseGemm),
// otherwise ATen's linear computes y first. Saves the Python-level call of the base layer and a second crossing.
bool g_proj_skip = true;
// ModuleCall::routed's call on the bound tensors' raw pointers (ModuleCall::Raw); off: every call through
// linear_route_gather's checked path (tests, A/B runs: _module_call_raw).
bool g_raw_call = true;
// Whether any of `rows` tokens (slots sp, or slot 0 for every token when sp is null) has a pool in a call's slot
// tables (n: LoRAs a slot), by routed_slot's rule (slot_routes).
inline bool routes_any(const int64_t* np, int64_t S, const int64_t* sp, int64_t rows) {
  for (int64_t t = 0; t < rows; ++t)
    if (slot_routes(np, S, sp ? sp[t] : 0)) return true;
  return false;
}
inline bool routes_any(const torch::Tensor& n, const int64_t* sp, int64_t rows) {
  if (n.scalar_type() != torch::kInt64 || !n.is_contiguous()) return true;  // (route_gather_into then checks them)
  return routes_any(n.data_ptr<int64_t>(), n.numel(), sp, rows);
}

torch::Tensor linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, const Ahead* ahead = nullptr);

// A module call with no token to route (a step of bare-base requests, or of adapters on other modules) runs its base
// weight by linear(): the same kernel, sums and output slices as the call's own base GEMM, so the same y,
// without the call's routing stage and barrier. (Its counts and last selections are left as they are: the call would
// add nothing to the counts.) Bare-base decode steps of the default base in bfloat16 with one adapter loaded (on the
// FFN), this and the call in turn in one process (26th session's Intel VM, medians of 8 rounds, both orders): the FFN
// projections 8.54 -> 7.64 and 8.72 -> 8.02 ms a step at 8 sequences, 9.91 -> 9.21 and 10.43 -> 9.59 at 32 (the call
// alone, 90 cycled copies outside the engine, had timed as the plain GEMM: the cost is in situ). The decode stack does
// the like for q / k / v with a LoRA on them (DecodeStack::Layer): a peft adapter on all seven linears loaded beside a
// ReMix one, its q / k / v had cost steps without it 1.93 -> 2.97 ms at 8 sequences and 2.09 -> 3.64 at 32; with the
// one GEMM 1.71 / 2.14.
// Here in the call (it first sat in the decode stack's projections) the same A/B: 9.27 -> 8.44 and 10.52 -> 9.63 ms
// (one run). g_proj_skip: off for A/B runs (_proj_skip).
std::tuple<torch::Tensor, torch::Tensor> linear_route_gather(
    torch::Tensor x, torch::Tensor weight, torch::Tensor bias, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
    torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k, torch::Tensor slot_omega,
    int64_t r, int64_t kmax, torch::Tensor counts, torch::Tensor idx,
    const torch::Tensor& ranks = {}) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), "x [..., D] and weight [O, D] disagree");
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  if (!idx.defined()) idx = torch::empty({x2.size(0), kmax}, x.options().dtype(torch::kInt64));
  const int64_t T = x2.size(0);
  const auto sot = slot_of_token.contiguous();
  if (g_proj_skip && kmax >= 1 && idx.scalar_type() == torch::kInt64 && idx.is_contiguous() && idx.numel() == T * kmax &&
      (sot.numel() == 0 || (sot.scalar_type() == torch::kInt64 && sot.numel() == T)) &&
      !routes_any(slot_n, sot.numel() ? sot.data_ptr<int64_t>() : nullptr, T)) {
    std::fill_n(idx.data_ptr<int64_t>(), T * kmax, int64_t{-1});
    return {linear(x, weight, bias), idx};
  }
  const BaseGemm gemm = base_gemm_for(x2, weight, bias);  // on: the base GEMM runs inside the kernel's parallel region
  auto y = gemm.on() ? torch::empty({x2.size(0), weight.size(0)}, x2.options()) : other_linear(x2, weight, bias).contiguous();
  route_gather_into(x2, y, router, a, bt, slot_of_token, slot_off, slot_n, slot_k, slot_omega, r, kmax, counts, idx, gemm,
                    ranks);
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return {y.view(shape), idx};
}


// The base layer alone, y = x W^T (+ bias), by the fused path's GEMM (BaseGemm on the same output slices) where it
// applies, else ATen's linear: the base GEMM the kernel bench measures the ReMix module against.
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, const Ahead* ahead) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), "x [..., D] and weight [O, D] disagree");
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  BaseGemm gemm = base_gemm_for(x2, weight, bias);
  gemm.ahead = ahead;
  if (!gemm.on()) {
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return other_linear(x2, weight, bias).view(shape);
  }
  const int64_t T = x2.size(0), D = x2.size(1), O = weight.size(0);
  auto y = torch::empty({T, O}, x2.options());
  const void* X = x2.data_ptr();
  void* Y = y.data_ptr();
  const int64_t P = region_threads((O + 2 * L - 1) / (2 * L));
  if (P <= 1) {
    gemm(X, Y, T, D, O, 0, O);
  } else {
#pragma omp parallel num_threads(P)
    {
      const auto [h, nh] = region_thread();
      const auto [o0, o1] = out_slice(O, h, nh);
      gemm(X, Y, T, D, O, o0, o1);
    }
  }
  auto shape = x.sizes().vec();
  shape.back() = O;
  return y.view(shape);
}

// One module's arguments bound once, so a forward crosses into C++ with x alone (each argument pybind converts costs
// time on every call of every module) and the checks that decide whether the call applies run here, not in Python.
// module(x) returns (y, idx), or None when it does not apply: x not a CPU float32/bfloat16 tensor, autograd needed
// (grad mode on and x or a watched tensor requires grad), or a watched tensor (the parameters the bound copies were
// made from, the base's weight) changed in place or was given new storage since binding. module.routed(x, slots,
// counts) is the serving form: every token routed within its slot's pool, selections counted.
// inference tensors keep no version counter (they cannot be changed outside inference mode anyway)
inline int64_t version(const torch::Tensor& t) { return t.is_inference() ? 0 : static_cast<int64_t>(t._version()); }

struct ModuleCall {
  torch::Tensor weight, bias, router, a, bt, off, n, k, omega;
  int64_t r, kmax;
  std::vector<torch::Tensor> watched;
  std::vector<std::pair<int64_t, const void*>> seen;  // (version, data pointer) of each watched tensor at binding
  torch::Tensor ranks;  // int64 [N]: each LoRA's own rank where the stack pads some (Pools::rank), else empty

  bool applies(const torch::Tensor& x) const {
    if (!x.device().is_cpu() || (x.scalar_type() != torch::kFloat32 && x.scalar_type() != torch::kBFloat16)) return false;
    const bool grad = at::GradMode::is_enabled();
    if (grad && x.requires_grad()) return false;
    for (size_t i = 0; i < watched.size(); ++i) {
      const auto& t = watched[i];
      if ((grad && t.requires_grad()) || version(t) != seen[i].first || t.data_ptr() != seen[i].second)
        return false;
    }
    return true;
  }
  // idx goes into one buffer per module, overwritten by the next call: a fresh small tensor that the layer keeps
  // (last_idx) while y is freed splits y's freed block in glibc's heap, and every next y then lands in memory the
  // caches have not seen (measured: +10 % on a 512-token module)
  mutable torch::Tensor idx_buf;

  // The bound tensors as raw pointers and sizes, taken once at binding where they pass every check route_gather_into
  // and base_gemm_for would make of them (ok), so that a call reads none of their headers (a TensorImpl and a
  // StorageImpl each, nine tensors, cold at every call of a decode step: ~30 cache lines), copies no handle (an atomic
  // on each, twice: linear_route_gather and route_gather_into take them by value) and dispatches no reshape or view.
  // They stay valid: router, a, bt and the slot tables are never changed in place (a pool stack is replaced when an
  // adapter comes or goes, and bound again; a layer's own binding watches the parameters they alias), and the base's
  // weight and bias are watched - applies(), which every caller asks first, declines a call once one changed. Only
  // the tables' entries are checked again at each call. The sums are those of the checked path (the same run()).
  // The decode stack's FFN projections a step (default base, bfloat16, one adapter; this and the checked path in turn
  // in one process, medians of 10 rounds, both orders; 28th session's Intel VM): 9.71 -> 9.03 and 9.80 -> 9.14 ms at
  // one sequence, 10.69 -> 9.95 and 10.63 -> 10.03 at 8, 14.29 -> 13.59 and 14.24 -> 13.47 at 32 (~7 us a call).
  struct Raw {
    bool ok = false;
    at::ScalarType dt = torch::kFloat32;  // the weight's (x must match it)
    const void *w = nullptr, *b = nullptr;
    Pools pl{nullptr, nullptr, 0, 0, 0, 0};
    const float *router = nullptr, *omega = nullptr;
    const int64_t *off = nullptr, *n = nullptr, *k = nullptr;
    int64_t S = 0;
  } raw;
  void bind_raw() {
    const int64_t O = weight.size(0), D = weight.dim() == 2 ? weight.size(1) : -1, lim = int64_t{1} << 30;
#ifdef REMIX_DOT_BF16
    const bool dt_ok = weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16;
#else
    const bool dt_ok = weight.scalar_type() == torch::kFloat32;
#endif
    const auto tab = [&](const torch::Tensor& t, at::ScalarType st) {
      return t.device().is_cpu() && t.scalar_type() == st && t.is_contiguous() && t.dim() == 1 && t.numel() == off.numel();
    };
    raw.ok = dt_ok && weight.dim() == 2 && weight.device().is_cpu() && weight.is_contiguous() && O < lim && D < lim &&
             (!bias.numel() || (bias.scalar_type() == weight.scalar_type() && bias.is_contiguous() && bias.numel() == O)) &&
             kmax >= 1 && kmax <= 64 && r >= 1 && r <= 256 && a.dim() == 2 && bt.dim() == 2 && a.device().is_cpu() &&
             bt.device().is_cpu() && (a.scalar_type() == torch::kFloat32 || a.scalar_type() == torch::kBFloat16) &&
             bt.scalar_type() == a.scalar_type() && a.is_contiguous() && bt.is_contiguous() && a.size(0) % r == 0 &&
             a.size(1) == D && bt.size(0) == a.size(0) && bt.size(1) == O && router.device().is_cpu() &&
             router.scalar_type() == torch::kFloat32 && router.is_contiguous() && router.dim() == 2 &&
             router.size(0) == a.size(0) / r && router.size(1) == D && off.numel() >= 1 && tab(off, torch::kInt64) &&
             tab(n, torch::kInt64) && tab(k, torch::kInt64) && tab(omega, torch::kFloat32);
    if (!raw.ok) return;
    raw.dt = weight.scalar_type();
    raw.w = weight.data_ptr();
    raw.b = bias.numel() ? bias.data_ptr() : nullptr;
    raw.pl = Pools{a.data_ptr(), bt.data_ptr(), r, a.size(0) / r, D, O, a.scalar_type() == torch::kBFloat16};
    raw.pl.rank = ranks.defined() ? ranks.data_ptr<int64_t>() : nullptr;  // (checked at construction)
    raw.router = router.data_ptr<float>();
    raw.omega = omega.data_ptr<float>();
    raw.off = off.data_ptr<int64_t>();
    raw.n = n.data_ptr<int64_t>();
    raw.k = k.data_ptr<int64_t>();
    raw.S = off.numel();
  }
  // base_gemm_for's decision from the bound weight's facts (x has the weight's dtype and is a contiguous CPU tensor)
  BaseGemm raw_gemm(int64_t T) const { return gemm_for_rows(raw.w, raw.b, raw.dt == torch::kBFloat16, T, raw.pl.D, raw.pl.O); }

  // The Ahead of this call's pools for the slots worth prefetching whole (tokens[s]: the step's tokens of slot s; null:
  // slot 0 alone) - those whose tokens pick at least as many LoRAs as they have (g_ahead_cover) -, or an empty one where
  // the bound pools are not raw-ready or no such slot has a pool.
  Ahead ahead_for(const std::vector<int64_t>* tokens) const {
    Ahead ah;
    if (!raw.ok) return ah;
    for (int64_t s = 0; s < raw.S; ++s) {
      const int64_t count = tokens ? (s < static_cast<int64_t>(tokens->size()) ? (*tokens)[s] : 0) : s == 0;
      if (count > 0 && raw.n[s] > 0 && raw.off[s] >= 0 && raw.off[s] + raw.n[s] <= raw.pl.N &&
          (!tokens || whole_slot(count, raw.k[s], raw.n[s])))
        ah.ranges.emplace_back(raw.off[s], raw.off[s] + raw.n[s]);
    }
    if (ah.ranges.empty()) return ah;
    std::sort(ah.ranges.begin(), ah.ranges.end());
    ah.router = raw.router;
    ah.pl = raw.pl;
    return ah;
  }

  // idx_buf sized for T rows (kept while the row count stays), its data
  int64_t* idx_of(int64_t T) const {
    if (!idx_buf.defined() || idx_buf.size(0) != T) idx_buf = torch::empty({T, kmax}, torch::kInt64);
    return idx_buf.data_ptr<int64_t>();
  }

  std::tuple<torch::Tensor, torch::Tensor> routed(torch::Tensor x, torch::Tensor slot_of_token, torch::Tensor counts,
                                                  const Ahead* ahead = nullptr) const {
    const int64_t T = x.dim() ? x.numel() / std::max<int64_t>(1, x.size(-1)) : 0;
    int64_t* const ip = idx_of(T);  // (the checked path below fills the same buffer)
    const Raw& R = raw;
    if (R.ok && g_raw_call && x.dim() >= 1 && x.size(-1) == R.pl.D && x.scalar_type() == R.dt && x.device().is_cpu() &&
        x.is_contiguous() && call_args_fit(slot_of_token, T, counts, R.pl.N)) {
      BaseGemm gemm = raw_gemm(T);
      gemm.ahead = ahead;
      const int64_t* sp = slot_of_token.numel() ? slot_of_token.data_ptr<int64_t>() : nullptr;
      if (g_proj_skip && !routes_any(R.n, R.S, sp, T)) {  // as linear_route_gather: the base GEMM alone
        std::fill_n(ip, T * kmax, int64_t{-1});
        return {linear(x, weight, bias, ahead), idx_buf};
      }
      if (gemm.on()) {  // (otherwise a GEMM outside the kernel: linear_route_gather below, as before)
        check_slot_tables(R.off, R.n, R.k, R.S, R.pl.N, kmax);
        auto shape = x.sizes().vec();
        shape.back() = R.pl.O;
        auto y = torch::empty(shape, x.options());
        std::fill_n(ip, T * kmax, int64_t{-1});
        std::vector<float> w(T * kmax, 0.f);
        const Routing rt{R.router, sp, R.off, R.n, R.k, R.omega, R.S, kmax};
        run(x.data_ptr(), y.data_ptr(), T, R.dt == torch::kBFloat16, R.pl, &rt, ip, w.data(), kmax, gemm);
        add_counts(counts, ip, T * kmax);
        return {y, idx_buf};
      }
    }
    return linear_route_gather(x, weight, bias, router, a, bt, slot_of_token, off, n, k, omega, r, kmax, counts, idx_buf,
                               ranks);
  }

  // This call (an FFN's gate) and `up` on the same x: act = silu(gate(x)) * up(x), each module's selections counted
  // and left in its idx_buf as routed() leaves them, by run_pair in one region; an undefined tensor where that does not
  // apply (the caller then makes the two calls and silu_mul_, which give the same values). up_ahead: what up's GEMM
  // prefetches (the next routed module's pools).
  torch::Tensor routed_pair(const ModuleCall& up, const torch::Tensor& x, const torch::Tensor& slot_of_token,
                            const torch::Tensor& counts, const torch::Tensor& up_counts, const Ahead* up_ahead) const {
    const Raw &A = raw, &B = up.raw;
    if (!g_raw_call || !A.ok || !B.ok || A.dt != B.dt || kmax != up.kmax || x.dim() < 1 ||
        x.scalar_type() != A.dt || !x.device().is_cpu() || !x.is_contiguous() || x.size(-1) != A.pl.D ||
        B.pl.D != A.pl.D || B.pl.O != A.pl.O)
      return {};
    const int64_t T = x.numel() / A.pl.D;
    const bool bf16 = A.dt == torch::kBFloat16;
    if (T < 1 || T >= SPLIT_POOLS_BELOW || region_threads((A.pl.O + 2 * L - 1) / (2 * L)) <= 1 ||
        (bf16 && (!phase_a_reads_bf16(A.pl) || !phase_a_reads_bf16(B.pl))))
      return {};
    if (!call_args_fit(slot_of_token, T, counts, A.pl.N) || !call_args_fit(slot_of_token, T, up_counts, B.pl.N)) return {};
    BaseGemm ga = raw_gemm(T), gb = up.raw_gemm(T);
    if (!ga.on() || !gb.on()) return {};
    gb.ahead = up_ahead;
    const int64_t* sp = slot_of_token.numel() ? slot_of_token.data_ptr<int64_t>() : nullptr;
    const bool route_a = !g_proj_skip || routes_any(A.n, A.S, sp, T), route_b = !g_proj_skip || routes_any(B.n, B.S, sp, T);
    if (route_a) check_slot_tables(A.off, A.n, A.k, A.S, A.pl.N, kmax);
    if (route_b) check_slot_tables(B.off, B.n, B.k, B.S, B.pl.N, kmax);
    int64_t *ia = idx_of(T), *ib = up.idx_of(T);
    std::fill_n(ia, T * kmax, int64_t{-1});
    std::fill_n(ib, T * kmax, int64_t{-1});
    std::vector<float> wa(T * kmax, 0.f), wb(T * kmax, 0.f);
    const Routing ra{A.router, sp, A.off, A.n, A.k, A.omega, A.S, kmax}, rb{B.router, sp, B.off, B.n, B.k, B.omega, B.S, kmax};
    auto shape = x.sizes().vec();
    shape.back() = A.pl.O;
    auto ya = torch::empty(shape, x.options()), yb = torch::empty(shape, x.options());
    run_pair(x.data_ptr(), ya.data_ptr(), yb.data_ptr(), T, bf16, A.pl, B.pl, route_a ? &ra : nullptr,
             route_b ? &rb : nullptr, ia, wa.data(), ib, wb.data(), kmax, ga, gb);
    add_counts(counts, ia, T * kmax);
    add_counts(up_counts, ib, T * kmax);
    return ya;
  }
};


// Calls f(float{}) or f(c10::BFloat16{}) by dtype: the element type of the float32 / bfloat16 ops below.
template <typename F>
void by_dtype(at::ScalarType t, F&& f) {
  TORCH_CHECK(t == torch::kFloat32 || t == torch::kBFloat16, "float32 or bfloat16 only");
  if (t == torch::kFloat32) f(float{});
  else f(c10::BFloat16{});
}

// Attention of one decode token per row over a slot cache: row i (cache row row0 + i) attends to its first lens[i]
// positions. qk: [b, >= Hq, Dh] (its first Hq heads are the queries, head stride Dh, as the fused q/k/v output gives
// them); K, V: [S, Hkv, P, Dh] contiguous; query head h reads key/value head h / (Hq / Hkv), as repeat_kv maps them.
// Returns [b, Hkv, Hq / Hkv, Dh] in qk's dtype (float32 or bfloat16; arithmetic in float32), the layout SDPA returns
// for the GQA-packed query. Dh must be 16, 32, 64 or 128.
// The checks both decode attentions share; returns lens' data.
const int64_t* check_decode(const torch::Tensor& qk, const torch::Tensor& K, const torch::Tensor& V, int64_t row0,
                            const torch::Tensor& ln, int64_t Hq, const torch::Tensor& slots) {
  TORCH_CHECK(qk.device().is_cpu() && qk.dim() == 3 && K.dim() == 4 && V.sizes() == K.sizes() && K.is_contiguous() &&
              V.is_contiguous() && K.device().is_cpu() && V.device().is_cpu(),
              "qk must be a CPU [b, heads, Dh] tensor, K and V contiguous CPU [S, Hkv, P, Dh] tensors");
  TORCH_CHECK(qk.scalar_type() == torch::kFloat32 || qk.scalar_type() == torch::kBFloat16, "qk must be float32 or bfloat16");
  const int64_t b = qk.size(0), Hkv = K.size(1), P = K.size(2), Dh = K.size(3);
  TORCH_CHECK(Dh == 16 || Dh == 32 || Dh == 64 || Dh == 128, message("head dim must be 16, 32, 64 or 128, got %lld", Dh));
  TORCH_CHECK(qk.size(2) == Dh && qk.stride(2) == 1 && qk.stride(1) == Dh && qk.size(1) >= Hq, "qk must be [b, >= Hq, Dh] with heads Dh apart");
  TORCH_CHECK(Hq >= Hkv && Hq % Hkv == 0 && Hq / Hkv <= MAX_GROUP, message("query heads must be 1 to %lld times the key/value heads", MAX_GROUP));
  if (slots.defined()) {
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == b, "slots must be int64 [b]");
    const int64_t* sp = slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; ++i)
      TORCH_CHECK(sp[i] >= 0 && sp[i] < K.size(0), message("slots[%lld] = %lld out of the cache's %lld", i, sp[i], K.size(0)));
  } else {
    TORCH_CHECK(row0 >= 0 && row0 + b <= K.size(0), "rows out of the cache");
  }
  TORCH_CHECK(ln.scalar_type() == torch::kInt64 && ln.numel() == b, "lens must be int64 [b]");
  const int64_t* lp = ln.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i)
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= P, message("lens[%lld] = %lld out of [1, %lld]", i, lp[i], P));
  return lp;
}

torch::Tensor attention_at(torch::Tensor qk, torch::Tensor K, torch::Tensor V, int64_t row0, torch::Tensor slots,
                           torch::Tensor lens, int64_t Hq, double scale) {
  auto ln = lens.contiguous();
  const int64_t* lp = check_decode(qk, K, V, row0, ln, Hq, slots);
  TORCH_CHECK(qk.scalar_type() == K.scalar_type() && K.scalar_type() == V.scalar_type(), "qk, K and V must share float32 or bfloat16");
  const int64_t b = qk.size(0), Hkv = K.size(1), P = K.size(2), Dh = K.size(3), nrep = Hq / Hkv;
  auto out = torch::empty({b, Hkv, nrep, Dh}, qk.options());
  by_dtype(qk.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto f = Dh == 16 ? decode_attention_impl<T, 16> : Dh == 32 ? decode_attention_impl<T, 32>
           : Dh == 64 ? decode_attention_impl<T, 64> : decode_attention_impl<T, 128>;
    f(qk.data_ptr<T>(), qk.stride(0), K.data_ptr<T>(), V.data_ptr<T>(), row0, Hkv, P, lp, b, nrep, static_cast<float>(scale),
      out.data_ptr<T>(), slots.defined() ? slots.data_ptr<int64_t>() : nullptr);
  });
  return out;
}

torch::Tensor decode_attention(torch::Tensor qk, torch::Tensor K, torch::Tensor V, int64_t row0, torch::Tensor lens,
                               int64_t Hq, double scale) {
  return attention_at(qk, K, V, row0, torch::Tensor(), lens, Hq, scale);
}

// decode_attention with each query row i reading cache row slots[i] (int64 [b]): a prefill chunk's tokens, several to
// a slot, each over its own first lens[i] positions (its position + 1) - the same kernel and order as a decode token's.
torch::Tensor slot_attention(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor slots, torch::Tensor lens,
                             int64_t Hq, double scale) {
  return attention_at(qk, K, V, 0, slots.contiguous(), lens, Hq, scale);
}

// decode_attention over an 8-bit cache: V int8 [S, Hkv, P, Dh], K int8 in blocks [S, Hkv, P / 16, Dh / 2, 16, 2], Ks,
// Vs their float32 scales [S, Hkv, P]; qk and the output float32 or bfloat16. The integer path where the build has
// AVX512-VNNI and Dh is 32, 64 or 128, else the float path.
torch::Tensor attention_at_q8(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor Ks, torch::Tensor Vs,
                              int64_t row0, torch::Tensor slots, torch::Tensor lens, int64_t Hq, double scale) {
  auto ln = lens.contiguous();
  const int64_t* lp = check_decode(qk, V, V, row0, ln, Hq, slots);
  TORCH_CHECK(K.scalar_type() == torch::kChar && V.scalar_type() == torch::kChar, "K and V must be int8");
  TORCH_CHECK(K.dim() == 6 && K.is_contiguous() && K.size(0) == V.size(0) && K.size(1) == V.size(1) &&
              K.size(2) * KB == V.size(2) && K.size(3) * 2 == V.size(3) && K.size(4) == KB && K.size(5) == 2,
              "K must be a contiguous int8 [S, Hkv, P / 16, Dh / 2, 16, 2] tensor (blocks of 16 positions) beside V [S, Hkv, P, Dh]");
  TORCH_CHECK(Ks.scalar_type() == torch::kFloat32 && Vs.scalar_type() == torch::kFloat32 && Ks.is_contiguous() &&
              Vs.is_contiguous() && Ks.sizes() == V.sizes().slice(0, 3) && Vs.sizes() == Ks.sizes(),
              "Ks and Vs must be contiguous float32 [S, Hkv, P]");
  const int64_t b = qk.size(0), Hkv = V.size(1), P = V.size(2), Dh = V.size(3), nrep = Hq / Hkv;
  auto out = torch::empty({b, Hkv, nrep, Dh}, qk.options());
  by_dtype(qk.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto f = Dh == 16 ? decode_attention_q8_impl<T, 16> : Dh == 32 ? decode_attention_q8_impl<T, 32>
           : Dh == 64 ? decode_attention_q8_impl<T, 64> : decode_attention_q8_impl<T, 128>;
    f(qk.data_ptr<T>(), qk.stride(0), K.data_ptr<int8_t>(), V.data_ptr<int8_t>(), Ks.data_ptr<float>(),
      Vs.data_ptr<float>(), row0, Hkv, P, lp, b, nrep, static_cast<float>(scale), out.data_ptr<T>(),
      slots.defined() ? slots.data_ptr<int64_t>() : nullptr);
  });
  return out;
}

torch::Tensor decode_attention_q8(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor Ks, torch::Tensor Vs,
                                  int64_t row0, torch::Tensor lens, int64_t Hq, double scale) {
  return attention_at_q8(qk, K, V, Ks, Vs, row0, torch::Tensor(), lens, Hq, scale);
}

torch::Tensor slot_attention_q8(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor Ks, torch::Tensor Vs,
                                torch::Tensor slots, torch::Tensor lens, int64_t Hq, double scale) {
  return attention_at_q8(qk, K, V, Ks, Vs, 0, slots.contiguous(), lens, Hq, scale);
}

// ---- greedy sampling: the first index of each row's maximum

// One row's first maximum (a NaN counts as larger than any number: the first NaN, as torch.max(dim) picks it). Each
// lane keeps its largest value and the first index that held it (strict >: a tie keeps the earlier index); the lanes
// then give the largest value at the smallest index. One pass, vectorised; a row with a NaN is scanned again.
// MASKED (structured output's greedy rows): every token a grammar does not allow counts as -inf - the same token as
// masking a copy to -inf (server/engine/grammar.py) and then taking the plain argmax, in one pass that writes nothing.
// mask: bit t % 32 of word t / 32 set where token t is allowed; tokens from nbits on never are.
// The lanes argmax_row runs on: 16 (vf), or 8 for float32 on AVX2 builds (vf8: GCC lowered the 16-lane compares and
// selects to scalar code there - see vexp_of). The result is the same either way (each lane keeps its first maximum;
// then the largest value, the lowest index among equals).
template <int W> struct Lanes;
template <> struct Lanes<16> {
  using F = vf;
  using I = vi;
  using U = vu;
  template <typename T> static F load_at(const T* p) { return load(p); }
  static void store_at(float* p, F v) { store(p, v); }
};
typedef uint32_t vu8 __attribute__((vector_size(8 * sizeof(uint32_t))));
template <> struct Lanes<8> {
  using F = vf8;
  using I = vi8;
  using U = vu8;
  static F load_at(const float* p) { return load_8(p); }
  static void store_at(float* p, F v) { store_8(p, v); }
};
template <typename T>
constexpr int argmax_lanes() {
#if !defined(__AVX512F__) && defined(__AVX2__)
  return std::is_same_v<T, float> ? 8 : 16;
#else
  return 16;
#endif
}

template <typename T, bool MASKED = false>
int64_t argmax_row(const T* p, int64_t V, const int32_t* mask = nullptr, int64_t nbits = 0) {
  constexpr int W = argmax_lanes<T>();
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  using U = typename Lanes<W>::U;
  F best = F{} - INFINITY;
  I at = I{} - 1, lane;
  I nan = I{};
  for (int l = 0; l < W; ++l) lane[l] = l;
  auto allowed = [&](int64_t t) {
    return !MASKED || (t < nbits && ((static_cast<uint32_t>(mask[t / 32]) >> (t % 32)) & 1u));
  };
  const int64_t Vv = MASKED ? std::min(V, nbits) : V;  // (the vectors' end: padded columns go to the tail)
  int64_t i = 0;
  for (; i + W <= Vv && i + W <= INT32_MAX; i += W) {
    F v = Lanes<W>::load_at(p + i);
    if constexpr (MASKED) {  // (W <= 32 and i a multiple of W: a vector's bits sit in one word)
      const U bits = (U{} + static_cast<uint32_t>(mask[i / 32])) >> (U)(lane + static_cast<int32_t>(i % 32));
      v = (I)((bits & 1u) != 0) ? v : F{} - INFINITY;
    }
    const I here = lane + static_cast<int32_t>(i);
    const I gt = v > best;
    best = gt ? v : best;
    at = gt ? here : at;
    nan |= v != v;
  }
  float bv = -INFINITY;
  int64_t bi = -1;
  bool any_nan = false;
  for (int l = 0; l < W; ++l) {
    any_nan |= nan[l] != 0;
    if (at[l] >= 0 && (best[l] > bv || (best[l] == bv && at[l] < bi))) { bv = best[l]; bi = at[l]; }
  }
  for (; i < V; ++i) {
    const float v = allowed(i) ? static_cast<float>(p[i]) : -INFINITY;
    any_nan |= v != v;
    if (v > bv) { bv = v; bi = i; }  // the tail comes after every vector's index: only strictly larger wins
  }
  if (any_nan)
    for (int64_t j = 0; j < V; ++j) { const float v = static_cast<float>(p[j]); if (v != v && allowed(j)) return j; }
  return bi < 0 ? 0 : bi;  // every value -inf: the first
}

// argmax over the last dimension of logits [b, V] (float32 or bfloat16) with torch.max(dim)'s choice (the first
// maximum; a NaN wins): rows split among threads. ATen's max(dim) runs a scalar compare loop: ~1 ms for [32, 49152]
// float32 on the 2-core Zen 4 VM, ~60 us here.
torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.size(1) >= 1 &&
              (logits.scalar_type() == torch::kFloat32 || logits.scalar_type() == torch::kBFloat16),
              "logits must be a CPU float32 or bfloat16 [b, V] tensor with V >= 1");
  auto x = logits.contiguous();
  const int64_t b = x.size(0), V = x.size(1);
  auto out = torch::empty({b}, x.options().dtype(torch::kInt64));
  int64_t* op = out.data_ptr<int64_t>();
  by_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * V, V);
    });
  });
  return out;
}

// ---- sampling: temperature, top-k, top-p and one uniform draw per row, without sorting the vocabulary

// One row's token for the uniform u in [0, 1): the distribution of server/engine/sampler.py's reference path
// (softmax of logits / temperature; top-k: tokens below the k-th largest value dropped, ties kept; top-p: over
// (probability descending, token ascending), a token kept while the mass before it is < top_p; then the token whose
// interval of the kept tokens' cumulative mass, in token order, holds u times their total). The reference sorts the
// whole vocabulary for top-p (~4.3 ms a row of 49152 here); this finds the same set from a histogram of the
// probabilities by their float exponent (and two mantissa bits): buckets above the one where the mass crosses top_p
// are kept whole, buckets below dropped, and only the crossing bucket's tokens are sorted; then min-p (tokens below
// min_p times the top token's probability dropped, as HF's warper after top-p). Top-k: a heap of the k
// largest (nth_element from 1024). e: scratch of V floats. A row with a NaN, or all -inf, takes its argmax.
// MASKED: a grammar's token bitmask (as masked_argmax_rows takes it) sets the tokens it leaves out to -inf first, as
// the reference's mask on a copy of the row does.
template <typename T, bool MASKED = false>
int64_t sample_row(const T* x, int64_t V, float temp, int64_t top_k, float top_p, float min_p, double u, float* e,
                   const int32_t* mask = nullptr, int64_t nbits = 0) {
  auto allowed = [&](int64_t t) {
    return !MASKED || (t < nbits && ((static_cast<uint32_t>(mask[t / 32]) >> (t % 32)) & 1u));
  };
  // the vector loops on W lanes (x) and WE lanes (e: float32): 16, or 8 on AVX2 builds (see argmax_lanes); every sum
  // below keeps the 16-lane order (lane l of 16 sums the indices l mod 16: on 8 lanes two vectors a block of 16)
  constexpr int W = argmax_lanes<T>(), WE = argmax_lanes<float>(), NE = L / WE;
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  using U = typename Lanes<W>::U;
  using FE = typename Lanes<WE>::F;
  using IE = typename Lanes<WE>::I;
  float m = -INFINITY;
  bool nan = false;
  int64_t i = 0;
  {
    F mv = F{} - INFINITY;
    I nv = I{}, lane;
    for (int l = 0; l < W; ++l) lane[l] = l;
    const int64_t Vv = MASKED ? std::min(V, nbits) : V;
    for (; i + W <= Vv; i += W) {
      F y = Lanes<W>::load_at(x + i) / temp;
      if constexpr (MASKED) {  // (W <= 32 and i a multiple of W: a vector's bits sit in one word)
        const U bits = (U{} + static_cast<uint32_t>(mask[i / 32])) >> (U)(lane + static_cast<int32_t>(i % 32));
        y = (I)((bits & 1u) != 0) ? y : F{} - INFINITY;
      }
      Lanes<W>::store_at(e + i, y);
      nv |= y != y;
      mv = y > mv ? y : mv;
    }
    for (int l = 0; l < W; ++l) { nan |= nv[l] != 0; m = mv[l] > m ? mv[l] : m; }
  }
  for (; i < V; ++i) {
    const float y = allowed(i) ? static_cast<float>(x[i]) / temp : -INFINITY;
    e[i] = y;
    nan |= y != y;
    m = y > m ? y : m;
  }
  if (nan || m == -INFINITY) return argmax_row<T, MASKED>(x, V, mask, nbits);
  float kth = -INFINITY;
  if (top_k > 0 && top_k < V) {
    if (top_k <= 1024) {
      std::vector<float> heap(e, e + top_k);
      std::make_heap(heap.begin(), heap.end(), std::greater<float>());
      for (int64_t i = top_k; i < V; ++i)
        if (e[i] > heap.front()) {
          std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
          heap.back() = e[i];
          std::push_heap(heap.begin(), heap.end(), std::greater<float>());
        }
      kth = heap.front();
    } else {
      std::vector<float> copy(e, e + V);
      std::nth_element(copy.begin(), copy.begin() + (top_k - 1), copy.end(), std::greater<float>());
      kth = copy[top_k - 1];
    }
  }
  // exp(y - m) where kept (y >= kth, finite), else 0
  double Z = 0.0;
  FE zv[NE] = {};  // (lane sums in float32, as a float32 softmax sums; a chain of double adds took ~60 us a row)
  for (i = 0; i + L <= V; i += L)
    for (int h = 0; h < NE; ++h) {
      const FE y = Lanes<WE>::load_at(e + i + h * WE);
      FE v = vexp_of<FE, IE>(y - m);
      v = (y >= kth && y - m >= -87.f) ? v : FE{};  // (below: a float32 softmax's probability is < 2^-125, and vexp
      Lanes<WE>::store_at(e + i + h * WE, v);        //  clamps there; such a token is never drawn)
      zv[h] += v;
    }
  for (int h = 0; h < NE; ++h) for (int l = 0; l < WE; ++l) Z += zv[h][l];
  for (; i < V; ++i) {
    const float y = e[i];
    e[i] = (y >= kth && y - m >= -87.f) ? std::exp(y - m) : 0.f;
    Z += e[i];
  }
  double Wt = Z;  // the kept tokens' mass
  if (top_p < 1.f) {
    const double target = static_cast<double>(top_p) * Z;
    constexpr int NB = 1024;  // e in (0, 1]: its bits >> 21 (8 exponent bits, 2 of the mantissa) are below 1024
    std::vector<double> mass(NB, 0.0), m4(4 * NB, 0.0);  // four interleaved histograms: shorter chains of adds
    auto key = [](float v) { uint32_t b; std::memcpy(&b, &v, 4); return static_cast<int>(b >> 21); };
    for (int64_t j = 0; j < V; ++j) if (e[j] > 0.f) m4[(j & 3) * NB + key(e[j])] += e[j];
    for (int k = 0; k < NB; ++k) mass[k] = (m4[k] + m4[NB + k]) + (m4[2 * NB + k] + m4[3 * NB + k]);
    int cross = NB - 1;
    double before = 0.0;  // the mass of the buckets above `cross`
    while (cross > 0 && before + mass[cross] < target) before += mass[cross--];
    std::vector<std::pair<float, int64_t>> edge;  // the crossing bucket's tokens
    for (int64_t j = 0; j < V; ++j)
      if (e[j] > 0.f) {
        const int k = key(e[j]);
        if (k == cross) edge.emplace_back(e[j], j);
        else if (k < cross) e[j] = 0.f;
      }
    std::sort(edge.begin(), edge.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    double acc = before;
    size_t kept = 0;
    for (; kept < edge.size() && acc < target; ++kept) acc += edge[kept].first;
    for (size_t j = kept; j < edge.size(); ++j) e[edge[j].second] = 0.f;
    Wt = acc;
  }
  if (min_p > 0.f) {  // after top-p, as HF's warpers run: e is the probability over the top token's (whose e is 1)
    FE wv[NE] = {};
    for (i = 0; i + L <= V; i += L)
      for (int h = 0; h < NE; ++h) {
        const FE v = Lanes<WE>::load_at(e + i + h * WE);
        const FE kept = v >= min_p ? v : FE{};
        Lanes<WE>::store_at(e + i + h * WE, kept);
        wv[h] += kept;
      }
    Wt = 0.0;
    for (int h = 0; h < NE; ++h) for (int l = 0; l < WE; ++l) Wt += wv[h][l];
    for (; i < V; ++i) { if (e[i] < min_p) e[i] = 0.f; Wt += e[i]; }
  }
  // the token in whose interval goal falls: whole blocks of L summed first, then the block it falls in
  const double goal = u * Wt;
  double acc = 0.0;
  int64_t j = 0;
  for (; j + L <= V; j += L) {
    float block = 0.f;
    for (int l = 0; l < L; ++l) block += e[j + l];
    if (acc + block >= goal && block > 0.f) break;
    acc += block;
  }
  int64_t last = -1;
  for (; j < V; ++j)
    if (e[j] > 0.f) {
      acc += e[j];
      last = j;
      if (acc >= goal) return j;
    }
  for (j = V - 1; last < 0 && j >= 0; --j) if (e[j] > 0.f) last = j;  // (rounding left goal past the end)
  return last >= 0 ? last : argmax_row<T, MASKED>(x, V, mask, nbits);
}

// sample_row for rows[k] of logits [B, V] (float32 or bfloat16) with temperature[k] (> 0), top_k[k] (0: off),
// top_p[k] (1: off), min_p[k] (0: off; empty: all off) and u[k]: rows split among threads. mask: empty, or a grammar's bitmask per row ([b, W] int32,
// W * 32 >= nbits: bit t % 32 of word t / 32 set where token t is allowed; tokens from nbits on never are).
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor rows, torch::Tensor temperature, torch::Tensor top_k,
                          torch::Tensor top_p, torch::Tensor u, torch::Tensor mask, int64_t nbits, torch::Tensor min_p) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.size(1) >= 1 &&
              (logits.scalar_type() == torch::kFloat32 || logits.scalar_type() == torch::kBFloat16),
              "logits must be a CPU float32 or bfloat16 [B, V] tensor with V >= 1");
  const int64_t b = rows.numel();
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kInt64 && temperature.scalar_type() == torch::kFloat32 &&
              top_k.scalar_type() == torch::kInt64 && top_p.scalar_type() == torch::kFloat32 &&
              u.scalar_type() == torch::kFloat64 && temperature.numel() == b && top_k.numel() == b &&
              top_p.numel() == b && u.numel() == b,
              "rows int64, temperature float32, top_k int64, top_p float32, u float64: one each per row");
  auto x = logits.contiguous();
  auto r = rows.contiguous(); auto t = temperature.contiguous(); auto k = top_k.contiguous();
  auto p = top_p.contiguous(); auto uu = u.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  const int64_t* rp = r.data_ptr<int64_t>();
  const float* tp = t.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  for (int64_t j = 0; j < b; ++j)
    TORCH_CHECK(rp[j] >= 0 && rp[j] < B && tp[j] > 0.f && pp[j] > 0.f && pp[j] <= 1.f,
                "rows must index logits, temperatures be > 0 and top_p in (0, 1]");
  const bool masked = mask.defined() && mask.numel() > 0;
  TORCH_CHECK(min_p.numel() == 0 || (min_p.scalar_type() == torch::kFloat32 && min_p.numel() == b),
              "min_p must be empty or float32, one per row");
  auto mn = min_p.contiguous();
  const float* mnp = mn.numel() ? mn.data_ptr<float>() : nullptr;
  for (int64_t j = 0; mnp && j < b; ++j) TORCH_CHECK(mnp[j] >= 0.f && mnp[j] <= 1.f, "min_p must be in [0, 1]");
  TORCH_CHECK(!masked || (mask.device().is_cpu() && mask.dim() == 2 && mask.scalar_type() == torch::kInt32 &&
                          mask.size(0) == b && mask.size(1) * 32 >= nbits && nbits >= 0),
              "mask must be empty or a CPU int32 [b, W] tensor with W * 32 >= nbits");
  auto mk = mask.contiguous();
  const int32_t* mp = masked ? mk.data_ptr<int32_t>() : nullptr;
  const int64_t W = masked ? mk.size(1) : 0;
  auto out = torch::empty({b}, r.options());
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  const double* up = uu.data_ptr<double>();
  by_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t j0, int64_t j1) {
      Scratch e = scratch(V);
      for (int64_t j = j0; j < j1; ++j)
        op[j] = masked ? sample_row<T, true>(xp + rp[j] * V, V, tp[j], kp[j], pp[j], mnp ? mnp[j] : 0.f, up[j], e.get(),
                                             mp + j * W, nbits)
                       : sample_row<T>(xp + rp[j] * V, V, tp[j], kp[j], pp[j], mnp ? mnp[j] : 0.f, up[j], e.get());
    });
  });
  return out;
}

// argmax_row<T, true> for rows[k] of logits [B, V] (float32 or bfloat16) under mask[k] ([b, W] int32, W * 32 >= nbits).
torch::Tensor masked_argmax_rows(torch::Tensor logits, torch::Tensor rows, torch::Tensor mask, int64_t nbits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.size(1) >= 1 &&
              (logits.scalar_type() == torch::kFloat32 || logits.scalar_type() == torch::kBFloat16),
              "logits must be a CPU float32 or bfloat16 [B, V] tensor with V >= 1");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kInt64, "rows must be int64 [b]");
  TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 2 && mask.scalar_type() == torch::kInt32 &&
              mask.size(0) == rows.size(0) && mask.size(1) * 32 >= nbits && nbits >= 0,
              "mask must be a CPU int32 [b, W] tensor with W * 32 >= nbits");
  auto x = logits.contiguous();
  auto m = mask.contiguous();
  auto r = rows.contiguous();
  const int64_t b = r.size(0), B = x.size(0), V = x.size(1), W = m.size(1);
  const int64_t* rp = r.data_ptr<int64_t>();
  for (int64_t k = 0; k < b; ++k) TORCH_CHECK(rp[k] >= 0 && rp[k] < B, "rows must index logits");
  auto out = torch::empty({b}, x.options().dtype(torch::kInt64));
  int64_t* op = out.data_ptr<int64_t>();
  const int32_t* mp = m.data_ptr<int32_t>();
  by_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) op[k] = argmax_row<T, true>(xp + rp[k] * V, V, mp + k * W, nbits);
    });
  });
  return out;
}

// ---- fused ops of a Llama decoder layer (the engine's lean forward): one call instead of 4-7 ATen ops each.
// Each keeps Hugging Face's order of roundings in bfloat16 (float32 inside an op, the dtype between the ops HF runs);
// float32 sums run in another order than ATen's. Rows are independent and split among threads in blocks of ROW_GRAIN
// (a step of up to ROW_GRAIN rows runs on one thread), and a row's result never depends on how many rows share the
// call: so the engine can use these ops for every step size, and a request's numbers do not depend on its batch-mates.
// 16, not 32: a 32-sequence decode step's norms and rotary on both threads instead of one (the rows they read were
// written by both threads' GEMM slices): in the decode stack (default base, bfloat16, one adapter, the two grains in
// turn in one process, 26th session's Intel VM) norms 1.54-1.56 -> 1.18-1.21 ms a step and rotary 0.80-0.83 ->
// 0.54-0.55; a 16-sequence step unchanged (one thread either way).
constexpr int64_t ROW_GRAIN = 16;

template <typename T> inline float to_f(T v) { return static_cast<float>(v); }
template <typename T> inline T from_f(float v) { return static_cast<T>(v); }

template <typename T>
void add_rms_rows(T* h, const T* delta, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* hr = h + i * D;
      if (delta) for (int64_t d = 0; d < D; ++d) hr[d] = from_f<T>(to_f(hr[d]) + to_f(delta[i * D + d]));  // h = h + delta
      vf acc = vf{};  // sum of squares in L lanes, then hsum's fixed order and the tail: the same for every row
      int64_t d = 0;
      for (; d + L <= D; d += L) { const vf v = load(hr + d); acc += v * v; }
      float ss = hsum(acc);
      for (; d < D; ++d) { const float v = to_f(hr[d]); ss = __builtin_fmaf(v, v, ss); }  // explicit: see dots4x4's tail
      const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (int64_t e = 0; e < D; ++e)  // LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
        out[i * D + e] = from_f<T>(to_f(w[e]) * to_f(from_f<T>(to_f(hr[e]) * r)));
    }
  });
}

// h += delta (if given, in place, in h's dtype), then returns RMSNorm(h) * weight: the residual add of one sublayer
// and the norm of the next in one pass. h, delta: [..., D] contiguous; weight [D]; all one dtype (float32 / bfloat16).
torch::Tensor add_rms_norm_(torch::Tensor h, torch::Tensor delta, torch::Tensor weight, double eps) {
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 &&
              h.size(-1) == weight.size(0) && weight.scalar_type() == h.scalar_type(), "h [..., D] contiguous, weight [D] of h's dtype");
  TORCH_CHECK(!delta.defined() || delta.numel() == 0 || (delta.is_contiguous() && delta.sizes() == h.sizes() &&
              delta.scalar_type() == h.scalar_type()), "delta must be h's shape and dtype");
  const bool add = delta.defined() && delta.numel() > 0;
  auto out = torch::empty_like(h);
  const int64_t D = weight.size(0), rows = D ? h.numel() / D : 0;
  by_dtype(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    add_rms_rows<T>(h.data_ptr<T>(), add ? delta.data_ptr<T>() : nullptr, weight.data_ptr<T>(), out.data_ptr<T>(), rows, D,
                    static_cast<float>(eps));
  });
  return out;
}

// In place on x [rows, heads, Dh] (heads Dh apart, rows any distance apart: the q and k heads of a fused q/k/v output):
// x = x * cos + roll(x, Dh / 2) * sin_signed, with cos / sin_signed
// [rows, Dh] (sin_signed: sin with its first half negated), each product and the sum rounded to x's dtype as HF's
// apply_rotary_pos_emb does. Both halves of a pair are read before either is written.
// The value x rounds to in T, as a float: bfloat16 round to nearest even in bit operations (NaN kept), which the
// compiler vectorises; float32 x itself.
template <typename T> inline float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    b = (b & 0x7FFFFFFFu) > 0x7F800000u ? b : (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    float r;
    std::memcpy(&r, &b, 4);
    return r;
  }
}
template <typename T> inline void to_floats(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) std::memcpy(dst, src, n * sizeof(float));
  else widen(reinterpret_cast<const uint16_t*>(src), dst, n);
}
template <typename T> inline void from_floats(const float* src, T* dst, int64_t n) {  // src values already exact in T
  if constexpr (std::is_same_v<T, float>) std::memcpy(dst, src, n * sizeof(float));
  else for (int64_t i = 0; i < n; ++i) { uint32_t b; std::memcpy(&b, src + i, 4); dst[i].x = static_cast<uint16_t>(b >> 16); }
}

// silu(g) * u in place on g ([n] contiguous, float32 or bfloat16, u the same): HF's LlamaMLP roundings (silu rounded to
// the dtype, then the product rounded), float32 inside. silu(x) = x / (1 + e^-x), computed as x / (1 + e) for x >= 0
// and x e / (1 + e) below, e = exp(-|x|) (vexp, ~1 ulp; ATen's Sleef exp is another ~1-ulp exp, so a bfloat16 result
// differs from ATen's two ops only where the float32 silu lies within an ulp of a rounding boundary). Every element
// goes through the same 16-lane code (a tail padded into a vector), so its value never depends on where a thread's
// share of the elements begins. In a decode step (twenty-fifth session's Intel VM, bfloat16, in turn in one process)
// ATen's silu_ + mul_ took ~1 ns an element (1.48 ms a step at 32 sequences), this op 0.97 (docs/BENCHMARKS.md).
constexpr int64_t SILU_GRAIN = 4096;  // elements a thread at least

template <typename V, typename VI>
inline V silu_of(V x) {
  const V ax = x < 0.f ? -x : x;
  const V e = vexp_of<V, VI>(-ax);
  return (x >= 0.f ? x : x * e) / (e + 1.f);  // one division (a vector select of the numerator)
}
inline vf silu_v(vf x) { return silu_of<vf, vi>(x); }

// every lane rounded to T's precision (round_to's values; 16 at a time by narrow16 with AVX-512, NaN kept a NaN)
template <typename T>
inline vf round_v(vf x) {
  if constexpr (!std::is_same_v<T, float>) {
#ifdef __AVX512F__
    if constexpr (L == 16)  // on the 32-bit lanes themselves (no narrowing shuffle and back)
      return (vf)_mm512_castsi512_ps(round_lanes_bf16(_mm512_castps_si512((__m512)x)));
#endif
    for (int l = 0; l < L; ++l) x[l] = round_to<T>(x[l]);
  }
  return x;
}

template <typename T>
inline void store_v(T* p, vf x) {  // x rounded to T (to nearest even) and stored
#ifdef __AVX512F__
  if constexpr (L == 16 && !std::is_same_v<T, float>)
    return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16((__m512)x));
#endif
  alignas(64) float f[L];
  store(f, round_v<T>(x));
  from_floats(f, p, L);
}

// silu(g) rounded to T, times u; the product is rounded to T by store_v (which every caller stores it with). For
// bfloat16, round_v rounds on the float32 lanes (integer adds and masks) where it had narrowed to 16 bits and widened
// back (two shuffles), twice a vector - the second time before store_v narrowed the same value again: bfloat16
// [512, 1536] 487 -> 317 us, [32, 1536] 30.6 -> 19.6 us; the activation of a 512-token prefill step of the default base
// (30 layers, the stack's clock, alternating in one process, 31st session's Zen 4 VM) 12.65 -> 9.39 ms, the step 308.8 ->
// 304.2 ms (bare) and 335.4 -> 327.0 (one adapter). The same bits but a NaN's sign (x86 keeps the NaN operand's).
template <typename T>
inline vf silu_mul_v(vf g, vf u) { return round_v<T>(silu_v(g)) * u; }

template <typename T>
inline void silu_mul_block(T* g, const T* u, int64_t n) {  // n <= L elements, through one vector
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {  // AVX2: 8 lanes at a time (see vexp_of), each element's same arithmetic
    for (int64_t i = 0; i < n; i += 8) {
      if (n - i >= 8) {
        store_8(g + i, silu_of<vf8, vi8>(load_8(g + i)) * load_8(u + i));
      } else {
        alignas(32) float a[8] = {}, b[8] = {};
        std::memcpy(a, g + i, (n - i) * sizeof(float));
        std::memcpy(b, u + i, (n - i) * sizeof(float));
        store_8(a, silu_of<vf8, vi8>(load_8(a)) * load_8(b));
        std::memcpy(g + i, a, (n - i) * sizeof(float));
      }
    }
    return;
  }
#endif
  if (n == L) return store_v(g, silu_mul_v<T>(load(g), load(u)));
  alignas(64) T a[L] = {}, b[L] = {};
  std::memcpy(a, g, n * sizeof(T));
  std::memcpy(b, u, n * sizeof(T));
  store_v(a, silu_mul_v<T>(load(a), load(b)));
  std::memcpy(g, a, n * sizeof(T));
}

// Four vectors a step, vexp inlined (GCC had called it out of line, one vector's chain of ~12 dependent FMAs at a
// time): bfloat16 [512, 1536] 533 -> 430 us (with a copy to reset g), float32 ~0.9 of the time; the same values.
template <typename T>
void silu_mul_elems(T* g, const T* u, int64_t n) {
  at::parallel_for(0, (n + L - 1) / L, SILU_GRAIN / L, [&](int64_t v0, int64_t v1) {
    int64_t v = v0;
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<T, float>) {  // AVX2: silu_mul_block's 8-lane path over the share
      const int64_t e0 = v0 * L, e1 = std::min<int64_t>(v1 * L, n);
      int64_t e = e0;
      for (; e + 32 <= e1; e += 32) {
        vf8 a[4];
        for (int j = 0; j < 4; ++j) a[j] = silu_of<vf8, vi8>(load_8(g + e + 8 * j)) * load_8(u + e + 8 * j);
        for (int j = 0; j < 4; ++j) store_8(g + e + 8 * j, a[j]);
      }
      if (e < e1) silu_mul_block(g + e, u + e, e1 - e);
      return;
    }
#endif
    for (; v + 4 <= v1 && (v + 4) * L <= n; v += 4) {
      vf a[4];
      for (int j = 0; j < 4; ++j) a[j] = silu_mul_v<T>(load(g + (v + j) * L), load(u + (v + j) * L));
      for (int j = 0; j < 4; ++j) store_v(g + (v + j) * L, a[j]);
    }
    for (; v < v1; ++v) silu_mul_block(g + v * L, u + v * L, std::min<int64_t>(L, n - v * L));
  });
}

namespace {  // (declared in it, for run_pair)
void silu_mul_cols(void* ya, const void* yb, int64_t T, int64_t O, int64_t o0, int64_t o1, bool bf16) {
  const auto cols = [&](auto* g, const auto* u) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = o0; o < o1; o += L)  // per element silu_mul_v's arithmetic, as silu_mul_elems
        silu_mul_block(g + t * O + o, u + t * O + o, std::min<int64_t>(L, o1 - o));
  };
  if (bf16) cols(static_cast<c10::BFloat16*>(ya), static_cast<const c10::BFloat16*>(yb));
  else cols(static_cast<float*>(ya), static_cast<const float*>(yb));
}
}  // namespace

torch::Tensor silu_mul_(torch::Tensor g, torch::Tensor u) {
  TORCH_CHECK(g.device().is_cpu() && u.device().is_cpu() && g.is_contiguous() && u.is_contiguous() && g.sizes() == u.sizes() &&
              g.scalar_type() == u.scalar_type(), "g and u must be contiguous CPU tensors of one shape and dtype");
  by_dtype(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    silu_mul_elems<T>(g.data_ptr<T>(), u.data_ptr<T>(), g.numel());
  });
  return g;
}

constexpr int64_t ROTARY_MAX_DH = 512;

template <typename T>
void rotary_rows(T* x, int64_t row_stride, const T* cs, const T* sn, int64_t rows, int64_t heads, int64_t Dh) {
  const int64_t half = Dh / 2;
  at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t i0, int64_t i1) {
    // float copies of a row's cos / sin and of one head, so the arithmetic runs on plain float arrays (vectorised)
    alignas(64) float c[ROTARY_MAX_DH], sg[ROTARY_MAX_DH], v[ROTARY_MAX_DH], o[ROTARY_MAX_DH];
    for (int64_t i = i0; i < i1; ++i) {
      to_floats(cs + i * Dh, c, Dh);
      to_floats(sn + i * Dh, sg, Dh);
      for (int64_t hd = 0; hd < heads; ++hd) {
        T* x_h = x + i * row_stride + hd * Dh;
        to_floats(x_h, v, Dh);
        for (int64_t d = 0; d < half; ++d) {
          const float a = v[d], b = v[d + half];
          o[d] = round_to<T>(round_to<T>(a * c[d]) + round_to<T>(b * sg[d]));
          o[d + half] = round_to<T>(round_to<T>(b * c[d + half]) + round_to<T>(a * sg[d + half]));
        }
        from_floats(o, x_h, Dh);
      }
    }
  });
}

void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin_signed) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(2) % 2 == 0 && x.stride(2) == 1 && x.stride(1) == x.size(2) &&
              x.stride(0) >= x.size(1) * x.size(2), "x must be [rows, heads, Dh] with heads Dh apart and Dh even");
  TORCH_CHECK(x.size(2) <= ROTARY_MAX_DH, "rotary_: head dim above 512");
  TORCH_CHECK(cos.is_contiguous() && sin_signed.is_contiguous() && cos.dim() == 2 && cos.size(0) == x.size(0) &&
              cos.size(1) == x.size(2) && sin_signed.sizes() == cos.sizes() && cos.scalar_type() == x.scalar_type() &&
              sin_signed.scalar_type() == x.scalar_type(), "cos, sin_signed must be contiguous [rows, Dh] of x's dtype");
  by_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rotary_rows<T>(x.data_ptr<T>(), x.stride(0), cos.data_ptr<T>(), sin_signed.data_ptr<T>(), x.size(0), x.size(1), x.size(2));
  });
}


// cache[row0 + i, h, pos[i, j], :] = new[i, h, j, :] for every row i, query j and head h: a slot cache's K or V write,
// one memcpy of a head's Dh values each (any dtype; new's last dim contiguous). The index_put_ it replaces costs
// ~10-45 us a call in dispatch and index handling, twice a layer.
// The cache row of kv_write_'s row i: rows[i] where rows is given (int64 [b], checked against S), else row0 + i.
struct CacheRows {
  const int64_t* r = nullptr;
  int64_t row0 = 0;
  CacheRows(const torch::Tensor& rows, int64_t row0_, int64_t b, int64_t S) : row0(row0_) {
    if (rows.defined() && rows.numel() > 0) {
      TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.is_contiguous() && rows.numel() == b, "rows must be int64 [b]");
      r = rows.data_ptr<int64_t>();
      for (int64_t i = 0; i < b; ++i) TORCH_CHECK(r[i] >= 0 && r[i] < S, message("rows[%lld] = %lld out of the cache's %lld", i, r[i], S));
    } else {
      TORCH_CHECK(row0 >= 0 && row0 + b <= S, "rows out of the cache");
    }
  }
  int64_t operator[](int64_t i) const { return r ? r[i] : row0 + i; }
};

void kv_write_(torch::Tensor cache, torch::Tensor fresh, int64_t row0, torch::Tensor pos, torch::Tensor rows) {
  TORCH_CHECK(cache.device().is_cpu() && fresh.device().is_cpu() && cache.dim() == 4 && fresh.dim() == 4 && cache.is_contiguous(),
              "cache must be a contiguous CPU [S, H, P, Dh] tensor, fresh a CPU [b, H, q, Dh] tensor");
  TORCH_CHECK(fresh.scalar_type() == cache.scalar_type(), "fresh must have the cache's dtype");
  const int64_t S = cache.size(0), H = cache.size(1), P = cache.size(2), Dh = cache.size(3);
  const int64_t b = fresh.size(0), q = fresh.size(2);
  TORCH_CHECK(fresh.size(1) == H && fresh.size(3) == Dh && (Dh == 1 || fresh.stride(3) == 1), "fresh must be [b, H, q, Dh] with Dh contiguous");
  const CacheRows cr(rows, row0, b, S);
  auto pc = pos.contiguous();
  TORCH_CHECK(pc.scalar_type() == torch::kInt64 && pc.dim() == 2 && pc.size(0) == b && pc.size(1) == q, "pos must be int64 [b, q]");
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t e = 0; e < b * q; ++e)
    TORCH_CHECK(pp[e] >= 0 && pp[e] < P, message("position %lld out of [0, %lld)", pp[e], P));
  const int64_t es = cache.element_size(), row = Dh * es;
  char* dst = static_cast<char*>(cache.data_ptr());
  const char* src = static_cast<const char*>(fresh.data_ptr());
  const int64_t s0 = fresh.stride(0) * es, s1 = fresh.stride(1) * es, s2 = fresh.stride(2) * es;
  for (int64_t i = 0; i < b; ++i)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < q; ++j)
        std::memcpy(dst + ((cr[i] * H + h) * P + pp[i * q + j]) * row, src + i * s0 + h * s1 + j * s2, row);
}


// One row of kv_write_q8_: codes[d] = round(x[d] / s) (ties to even) in [-127, 127], 0 where s is not > 0; returns
// s = max|x| / 127 (NaN if x holds one, as torch's amax). Vectorised where Dh is a multiple of 16 (a decode step
// quantizes 2 x 30 x 3 rows a sequence: the scalar divisions had cost ~1 ms of a 32-sequence step); the same IEEE
// divisions and rounding either way.
template <typename T>
float quantize_row(const T* x, int64_t Dh, int8_t* codes) {
#ifdef __AVX512F__
  if (Dh % L == 0) {
    __m512 mv = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t d = 0; d < Dh; d += L) {
      const __m512 v = (__m512)load(x + d);
      mv = _mm512_max_ps(mv, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float amax = nan ? NAN : _mm512_reduce_max_ps(mv), s = amax / 127.f;
    if (!(s > 0.f)) {
      std::memset(codes, 0, Dh);
      return s;
    }
    const __m512 sv = _mm512_set1_ps(s), lim = _mm512_set1_ps(127.f);
    for (int64_t d = 0; d < Dh; d += L) {
      __m512 c = _mm512_roundscale_ps(_mm512_div_ps((__m512)load(x + d), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      c = _mm512_min_ps(lim, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), c));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + d), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
    }
    return s;
  }
#endif
  float amax = 0.f;
  for (int64_t d = 0; d < Dh; ++d) {
    const float a = std::fabs(static_cast<float>(x[d]));
    amax = a > amax || a != a ? a : amax;  // a NaN stays (as torch's amax)
  }
  const float s = amax / 127.f;
  for (int64_t d = 0; d < Dh; ++d)
    codes[d] = s > 0.f ? static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(x[d]) / s)))) : 0;
  return s;
}

// kv_write_ into an 8-bit cache: each head's Dh values of fresh [b, H, q, Dh] (float32 or bfloat16, Dh contiguous)
// quantized to int8 with one float32 scale (see attend_group_q8), into scales [S, H, P] and cache: V's [S, H, P, Dh]
// or K's blocks [S, H, P / 16, Dh / 2, 16, 2] (position p's dimension pair e at [p / 16, e, p % 16]). The same
// arithmetic as server.engine.cache.quantize_kv (IEEE float32 divisions, ties to even): bit-identical.
void kv_write_q8_(torch::Tensor cache, torch::Tensor scales, torch::Tensor fresh, int64_t row0, torch::Tensor pos,
                  torch::Tensor rows) {
  TORCH_CHECK(cache.device().is_cpu() && fresh.device().is_cpu() && scales.device().is_cpu() &&
              (cache.dim() == 4 || cache.dim() == 6) && fresh.dim() == 4 && scales.dim() == 3 && cache.is_contiguous() &&
              scales.is_contiguous(),
              "cache must be a contiguous CPU [S, H, P, Dh] or [S, H, P / 16, Dh / 2, 16, 2] tensor, scales a contiguous "
              "CPU [S, H, P] one, fresh a CPU [b, H, q, Dh] tensor");
  const bool blocked = cache.dim() == 6;
  const int64_t S = cache.size(0), H = cache.size(1), P = scales.size(2), Dh = fresh.size(3);
  TORCH_CHECK(cache.scalar_type() == torch::kChar && scales.scalar_type() == torch::kFloat32 && scales.size(0) == S &&
              scales.size(1) == H && (blocked ? cache.size(2) * KB == P && cache.size(3) * 2 == Dh && cache.size(4) == KB &&
              cache.size(5) == 2 : cache.size(2) == P && cache.size(3) == Dh),
              "cache must be int8 and scales float32 [S, H, P], of the cache's rows, positions and head dim");
  const int64_t b = fresh.size(0), q = fresh.size(2);
  TORCH_CHECK(fresh.size(1) == H && (Dh == 1 || fresh.stride(3) == 1), "fresh must be [b, H, q, Dh] with Dh contiguous");
  const CacheRows cr(rows, row0, b, S);
  auto pc = pos.contiguous();
  TORCH_CHECK(pc.scalar_type() == torch::kInt64 && pc.dim() == 2 && pc.size(0) == b && pc.size(1) == q, "pos must be int64 [b, q]");
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t e = 0; e < b * q; ++e)
    TORCH_CHECK(pp[e] >= 0 && pp[e] < P, message("position %lld out of [0, %lld)", pp[e], P));
  int8_t* dst = cache.data_ptr<int8_t>();
  float* sc = scales.data_ptr<float>();
  std::vector<int8_t> codes(Dh);
  by_dtype(fresh.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* src = fresh.data_ptr<T>();
    for (int64_t i = 0; i < b; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < q; ++j) {
          const T* x = src + i * fresh.stride(0) + h * fresh.stride(1) + j * fresh.stride(2);
          const int64_t p = pp[i * q + j], row = (cr[i] * H + h) * P;
          sc[row + p] = quantize_row(x, Dh, codes.data());
          if (!blocked) {
            std::memcpy(dst + (row + p) * Dh, codes.data(), Dh);
          } else {
            int8_t* blk = dst + (row + p / KB * KB) * Dh + (p % KB) * 2;  // the block's [Dh / 2][16][2]
            for (int64_t e = 0; e < Dh / 2; ++e) std::memcpy(blk + e * 2 * KB, codes.data() + 2 * e, 2);
          }
        }
  });
}

// ---- the decoder layers of one decode step in one call (the engine's lean forward on CPU, see server/engine/fastpath.py)
// The same calls, in the same order and on the same tensors, as the Python loop of LeanForward for a decode step:
// add_rms_norm_, the fused q/k/v linear, rotary_, kv_write_ of K and V, decode_attention, o_proj, add_rms_norm_,
// silu(gate) * up in place, down_proj - so the result is bit-identical to it; what goes is ~10 Python-level calls a layer
// (~3 ms a 32-sequence step of the default base, ~2.5 ms of a one-sequence step of ~25 ms).
// A projection is either a ModuleCall (a ReMix layer: base GEMM, routing and gather, with its slot map and counts)
// or a plain linear (weight, bias) run by linear() above.
struct Proj {
  pybind11::object owner;  // the ModuleCall's Python object (kept alive), or None
  const ModuleCall* call = nullptr;
  torch::Tensor w, b, counts;
  torch::Tensor operator()(const torch::Tensor& x, const torch::Tensor& slots, const Ahead* ahead = nullptr) const {
    return call ? std::get<0>(call->routed(x, slots, counts, ahead)) : linear(x, w, b, ahead);
  }
};

// The decode stack's clock (server.bench's "where a decode step goes"): the nanoseconds DecodeStack::run spent in each
// kind of op since the last read (stack_clock), and the runs they cover. Off unless switched on; on, a run reads the
// clock ~12 times a layer (~0.3 us a layer here), each op's time taken from the end of the op before it.
constexpr int STACK_OPS = 10;  // the kinds, in the order of STACK_OPS in cpu_ext.py
enum StackOp { OP_NORMS, OP_QKV, OP_ROTARY, OP_KV_WRITE, OP_ATTENTION, OP_O_PROJ, OP_GATE, OP_UP, OP_ACT, OP_DOWN };
bool g_stack_clock = false;
double g_stack_ns[STACK_OPS];
int64_t g_stack_runs = 0;
struct StackClock {
  const bool on = g_stack_clock;
  std::chrono::steady_clock::time_point t = on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  void lap(StackOp op) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    g_stack_ns[op] += std::chrono::duration<double, std::nano>(now - t).count();
    t = now;
  }
};

struct DecodeStack {
  struct Layer {
    // wqkv: the base [q; k; v] weight (its rows the three base weights); undefined: q, k and v run as three projections
    // (some wrapped). Both given (a LoRA on q / k / v, base weights still those rows): wqkv where no token of the call
    // routes in q, k or v (any_routed), the projections where one does - the same base outputs either way (the
    // compiled GEMM's sums do not depend on the other outputs of the call)
    torch::Tensor in_w, post_w, wqkv, bqkv;
    double in_eps, post_eps;
    Proj q, k, v, o, gate, up, down;
  };
  // Whether any of the b tokens has a pool in one of L's wrapped q / k / v projections.
  static bool any_routed(const Layer& L, const int64_t* sp, int64_t b) {
    for (const Proj* p : {&L.q, &L.k, &L.v})
      if (p->call && routes_any(p->call->n, sp, b)) return true;
    return false;
  }
  std::vector<Layer> layers;
  int64_t H, Hkv, Dh;
  double scaling;

  // None when a ReMix call does not apply to h (see ModuleCall::applies), else (h, the last sublayer's output not
  // yet added into h); h [b, 1, D] is updated in place, as the Python loop does.
  // Ks, Vs: an 8-bit cache's scales, one per layer (K and V int8), or empty.
  // cache_rows (int64 [b], or empty): row i is a token of cache row cache_rows[i] at position pos[i] (attending to its
  // first lens[i] positions) - the tokens of prefill chunks or checked drafts, several to a row, as the Python loop's
  // slot_attention and kv writes take them; empty: a decode step, row i of cache row row0 + i.
  pybind11::object run(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, const std::vector<torch::Tensor>& K,
                       const std::vector<torch::Tensor>& V, int64_t row0, torch::Tensor pos, torch::Tensor lens,
                       torch::Tensor slots, const std::vector<torch::Tensor>& Ks, const std::vector<torch::Tensor>& Vs,
                       torch::Tensor cache_rows) const {
    TORCH_CHECK(K.size() == layers.size() && V.size() == layers.size(), "one K and one V cache per layer");
    const bool q8 = !Ks.empty();
    TORCH_CHECK(!q8 || (Ks.size() == layers.size() && Vs.size() == layers.size()), "one K and one V scale tensor per layer");
    TORCH_CHECK(h.dim() == 3 && h.size(1) == 1, "h must be [b, 1, D]: one decode token per row");
    for (const auto& L : layers)
      for (const Proj* p : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
        if (p->call && !p->call->applies(h)) return pybind11::none();
    const int64_t b = h.size(0);
    const bool by_rows = cache_rows.defined() && cache_rows.numel() > 0;
    if (by_rows) {
      cache_rows = cache_rows.contiguous();
      TORCH_CHECK(cache_rows.scalar_type() == torch::kInt64 && cache_rows.numel() == b, "cache_rows must be int64 [b]");
      row0 = 0;
    }
    torch::Tensor pending = torch::empty({0}, h.options());
    const torch::Tensor slots_c = slots.numel() ? slots.contiguous() : slots;
    TORCH_CHECK(!slots_c.numel() || (slots_c.scalar_type() == torch::kInt64 && slots_c.numel() == b), "slots must be int64 [b] or empty");
    const int64_t* sp = slots_c.numel() ? slots_c.data_ptr<int64_t>() : nullptr;
    // without the GIL (nothing below touches Python): a step holds it ~25-80 ms here, and the server's HTTP threads
    // (streaming, /metrics, new requests) must not wait a whole step for it, as they did not between the Python loop's ops
    // the slots in this step, and each routed projection's Ahead for them (prefetched during the GEMM before it)
    const bool ahead_on = g_ahead_from > 0 && b >= g_ahead_from;
    std::vector<Ahead> aheads;  // per layer: gate, up, down
    if (ahead_on) {
      aheads.resize(3 * layers.size());
      int64_t S = 0;  // the slot tables' longest
      for (const auto& L : layers)
        for (const Proj* p : {&L.gate, &L.up, &L.down})
          if (p->call) S = std::max(S, p->call->raw.S);
      std::vector<int64_t> used(S, 0);  // tokens a slot (a slot past every table routes nowhere)
      for (int64_t t = 0; sp && t < b; ++t)
        if (sp[t] >= 0 && sp[t] < S) ++used[sp[t]];
      for (size_t i = 0; i < layers.size(); ++i) {
        const Proj* ps[3] = {&layers[i].gate, &layers[i].up, &layers[i].down};
        for (int j = 0; j < 3; ++j)
          if (ps[j]->call) aheads[3 * i + j] = ps[j]->call->ahead_for(sp ? &used : nullptr);
      }
    }
    auto ahead_of = [&](size_t i, int j) -> const Ahead* {
      if (!ahead_on) return nullptr;
      const Ahead& ah = aheads[3 * i + j];
      return ah.ranges.empty() ? nullptr : &ah;
    };
    {
    pybind11::gil_scoped_release nogil;
    struct StackAhead {  // t_stack_ahead for the layers below, off again however they end
      explicit StackAhead(bool on) { t_stack_ahead = on; }
      ~StackAhead() { t_stack_ahead = false; }
    } stack_ahead(ahead_on);
    StackClock clock;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& L = layers[i];
      auto x = add_rms_norm_(h, pending, L.in_w, L.in_eps);
      clock.lap(OP_NORMS);
      auto qkv = (L.wqkv.defined() && !any_routed(L, sp, b)
                      ? linear(x, L.wqkv, L.bqkv)
                      : torch::cat({L.q(x, slots), L.k(x, slots), L.v(x, slots)}, -1))
                     .view({b, 1, H + 2 * Hkv, Dh});
      clock.lap(OP_QKV);
      rotary_(qkv.view({-1, H + 2 * Hkv, Dh}).slice(1, 0, H + Hkv), cos, sin);
      clock.lap(OP_ROTARY);
      const auto k = qkv.slice(2, H, H + Hkv).transpose(1, 2), v = qkv.slice(2, H + Hkv, H + 2 * Hkv).transpose(1, 2);
      const auto qk = qkv.select(1, 0).slice(1, 0, H + Hkv);
      torch::Tensor o;
      const torch::Tensor at_rows = by_rows ? cache_rows : torch::Tensor();
      if (q8) {
        kv_write_q8_(K[i], Ks[i], k, row0, pos, at_rows);
        kv_write_q8_(V[i], Vs[i], v, row0, pos, at_rows);
        clock.lap(OP_KV_WRITE);
        o = attention_at_q8(qk, K[i], V[i], Ks[i], Vs[i], row0, at_rows, lens, H, scaling);
      } else {
        kv_write_(K[i], k, row0, pos, at_rows);
        kv_write_(V[i], v, row0, pos, at_rows);
        clock.lap(OP_KV_WRITE);
        o = attention_at(qk, K[i], V[i], row0, at_rows, lens, H, scaling);
      }
      o = o.reshape({b, H, 1, Dh}).transpose(1, 2).reshape({b, 1, H * Dh});
      clock.lap(OP_ATTENTION);
      pending = L.o(o, slots, ahead_of(i, 0));
      clock.lap(OP_O_PROJ);
      x = add_rms_norm_(h, pending, L.post_w, L.post_eps);
      clock.lap(OP_NORMS);
      // a routed gate, up and silu(gate) * up in one region in steps of few rows (run_pair: the same values), its
      // time on the clock's gate
      auto act = L.gate.call && L.up.call && b < g_fuse_pair_below
                     ? L.gate.call->routed_pair(*L.up.call, x, slots, L.gate.counts, L.up.counts, ahead_of(i, 2))
                     : torch::Tensor();
      if (act.defined()) {
        clock.lap(OP_GATE);
      } else {
        act = L.gate(x, slots, ahead_of(i, 1));
        clock.lap(OP_GATE);
        auto up = L.up(x, slots, ahead_of(i, 2));
        clock.lap(OP_UP);
        silu_mul_(act, up);
        clock.lap(OP_ACT);
      }
      pending = L.down(act, slots);
      clock.lap(OP_DOWN);
    }
    if (clock.on) ++g_stack_runs;
    }  // the GIL again
    return pybind11::cast(std::make_tuple(h, pending));
  }
};

// A projection from Python: (ModuleCall, counts) or (weight, bias or None).
Proj to_proj(const pybind11::tuple& t) {
  TORCH_CHECK(t.size() == 2, "a projection is (ModuleCall, counts) or (weight, bias)");
  Proj p;
  if (pybind11::isinstance<ModuleCall>(t[0])) {
    p.owner = t[0];
    p.call = &t[0].cast<const ModuleCall&>();
    p.counts = t[1].cast<torch::Tensor>();
  } else {
    p.owner = pybind11::none();
    p.w = t[0].cast<torch::Tensor>();
    p.b = t[1].is_none() ? torch::empty({0}, p.w.options()) : t[1].cast<torch::Tensor>();
  }
  return p;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_proj_skip", [](bool on) { g_proj_skip = on; }, "A/B");
  m.def("_fuse_pair_below", [](int64_t rows) { g_fuse_pair_below = rows; },
        "tests and A/B runs: decode steps of fewer rows run a routed gate, up and silu in one region (default 4)");
  m.def("_ahead_from", [](int64_t rows, double start) { g_ahead_from = rows; g_ahead_start = start; }, "A/B");
  m.def("_narrow_cvt", [](bool on) {
#ifdef __AVX512F__
    g_narrow_cvt = on;
#endif
  }, "A/B runs and tests: float32 -> bfloat16 rounding by vcvtneps2bf16 where no lane is special (default on)");
  m.def("_to_bf16", [](torch::Tensor x) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(), "contiguous CPU float32");
    auto out = torch::empty(x.sizes(), x.options().dtype(torch::kBFloat16));
    narrow(x.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), x.numel());
    return out;
  }, "tests: the kernels' float32 -> bfloat16 rounding (narrow) of a tensor");
  m.def("_route_units", [](bool on) { g_route_units = on; }, "A/B");
  m.def("_module_call_raw", [](bool on) { g_raw_call = on; }, "tests and A/B runs: ModuleCall's call on raw pointers (default on)");
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta in place, then LlamaRMSNorm(h) * weight");
  m.def("_ahead_cover", [](double c) { g_ahead_cover = c; }, "A/B runs: prefetch a slot's pools from tokens x k >= c x n");
  m.def("_own_bt", [](bool on, double start) { g_own_bt = on; g_own_start = start; },
        "A/B runs: a small call's own B^T rows prefetched during its GEMM, from this share of its blocks (default on, 0.75)");
  m.def("_phase_a_prefetch", [](bool on) { g_pa_pf = on; }, "A/B runs: phase A's prefetch of the next rows of A (default on)");
  m.def("silu_mul_", &silu_mul_, "g = silu(g) * u in place (HF's roundings), float32 or bfloat16");
  m.def("rotary_", &rotary_, "x = x * cos + roll(x, Dh / 2) * sin_signed in place (HF's roundings)");
  m.def("decode_attention", &decode_attention, "one decode token per row attending to its own slot's first lens positions");
  m.def("kv_write_", &kv_write_, "cache[row0 + i (or rows[i]), h, pos[i, j]] = fresh[i, h, j] for a slot KV cache, in place",
        pybind11::arg("cache"), pybind11::arg("fresh"), pybind11::arg("row0"), pybind11::arg("pos"),
        pybind11::arg("rows") = torch::empty({0}, torch::kInt64));
  m.def("kv_write_q8_", &kv_write_q8_, "kv_write_ into an 8-bit cache and its scales (quantizing), in place",
        pybind11::arg("cache"), pybind11::arg("scales"), pybind11::arg("fresh"), pybind11::arg("row0"), pybind11::arg("pos"),
        pybind11::arg("rows") = torch::empty({0}, torch::kInt64));
  m.def("decode_attention_q8", &decode_attention_q8, "decode_attention over an 8-bit cache (int8 K, V and float32 scales)");
  m.def("slot_attention", &slot_attention, "decode_attention with query row i reading cache row slots[i] (prefill chunks)");
  m.def("slot_attention_q8", &slot_attention_q8, "slot_attention over an 8-bit cache");
  m.def("_attention_q8_int", [](bool on) {
#ifdef REMIX_Q8_VNNI
    g_attn_q8_int = on;
    return true;
#else
    return false;
#endif
  }, "A/B runs and tests: whether the 8-bit cache's attention takes integer dot products (AVX512-VNNI; default) or "
     "the float path; returns whether the integer path exists in this build");
  m.def("_attention_bf16_dot", [](bool on) { g_attn_dot = on; },
        "A/B runs and tests: whether bfloat16 decode attention takes vdpbf16ps (default) or the widening path");
  m.def("_phase_a_bf16_dot", [](bool on) { g_phase_a_dot = on; }, "A/B runs: bfloat16 phase A on vdpbf16ps or widened");
  m.def("stack_clock", [](bool on) {
    std::vector<double> ns(g_stack_ns, g_stack_ns + STACK_OPS);
    const int64_t runs = g_stack_runs;
    std::fill_n(g_stack_ns, STACK_OPS, 0.0);
    g_stack_runs = 0;
    g_stack_clock = on;
    return std::make_tuple(ns, runs);
  }, "the decode stack's time per kind of op (ns) and its runs since the last call; resets them, then switches the clock on or off");
  m.def("_batch_invariant", [](bool on) {
    const bool was = g_batch_invariant;
    g_batch_invariant = on;
    return was;
  }, "batch-invariant mode: the base GEMM on the dot-product kernel (or AMX tiles) at every row count, not oneDNN's "
     "from DOT_BF16_BELOW (bfloat16) / ONEDNN_F32_FROM (float32) rows; returns the previous setting");
  m.def("argmax_rows", &argmax_rows, "the first index of each row's maximum (a NaN wins), as torch.max(dim).indices");
  m.def("sample_rows", &sample_rows, "one token per given row by temperature, top-k, top-p and a uniform draw u, as sampler.py's reference",
        pybind11::arg("logits"), pybind11::arg("rows"), pybind11::arg("temperature"), pybind11::arg("top_k"),
        pybind11::arg("top_p"), pybind11::arg("u"), pybind11::arg("mask") = torch::empty({0}, torch::kInt32), pybind11::arg("nbits") = 0,
        pybind11::arg("min_p") = torch::empty({0}, torch::kFloat32));
  m.def("masked_argmax_rows", &masked_argmax_rows, "argmax_rows of given rows with the tokens a bitmask leaves out as -inf");
  m.def("linear", [](torch::Tensor x, torch::Tensor w, torch::Tensor b) { return linear(x, w, b); }, "y = x W^T (+ bias): the fused path's base GEMM where it applies, else oneDNN's or ATen's linear");
  m.attr("DOT_BF16_BELOW") = DOT_BF16_BELOW;
  m.attr("ONEDNN_F32_FROM") = large_f32_elsewhere() ? ONEDNN_F32_FROM : -1;  // -1: the dot-product kernel at every size
  m.attr("F32_LARGE_GEMM") = large_f32_elsewhere() ? (onednn_f32_large() ? "onednn" : "aten") : "dot";  // from that limit
  m.def("dot_gemm", [](bool bf16) {
#ifdef REMIX_DOT_BF16
    if (bf16) return true;  // below DOT_BF16_BELOW rows
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return !bf16;
#else
    return false;
#endif
  }, "True when the base GEMM of this dtype (float32, or bfloat16) is the dot-product kernel (a row's outputs the same "
     "in any batch); False: MKL (float32) or ATen (bfloat16)");
  m.def("amx_bf16", []() {
#ifdef REMIX_AMX
    return amx_ready();
#else
    return false;
#endif
  }, "True when bfloat16 base GEMMs of whole tiles (D % 32 == 0, O % 16 == 0) below DOT_BF16_BELOW rows run on AMX tiles");
  m.def("gather_", &gather_, "y += the kernel contract's gather for given ids and weights, in place");
  m.def("route_gather_", &route_gather_, "top-k routing per token within its slot's pool, then the gather, in place");
  m.def("route_gather_", &route_gather_ranks_, "the same with each LoRA's own rank (ranks: int64 [N]; padded rows skipped)");
  pybind11::class_<ModuleCall>(m, "ModuleCall", pybind11::module_local())
      .def(pybind11::init([](torch::Tensor weight, torch::Tensor bias, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                             torch::Tensor off, torch::Tensor n, torch::Tensor k, torch::Tensor omega, int64_t r, int64_t kmax,
                             std::vector<torch::Tensor> watched, torch::Tensor ranks) {
        ModuleCall c{weight, bias, router, a, bt, off, n, k, omega, r, kmax, watched, {}, {}};
        c.ranks = ranks.numel() ? ranks.contiguous() : torch::Tensor();
        if (c.ranks.defined()) checked_ranks(c.ranks, a.size(0) / std::max<int64_t>(1, r), r);  // a bad table fails here
        for (const auto& t : watched) c.seen.emplace_back(version(t), t.data_ptr());
        c.bind_raw();
        return c;
      }))
      .def("__call__", [](const ModuleCall& c, torch::Tensor x) -> pybind11::object {
        static const torch::Tensor none = torch::empty({0}, torch::kInt64);  // no slot map (all slot 0), no counts
        if (!c.applies(x)) return pybind11::none();
        return pybind11::cast(c.routed(x, none, none));
      })
      .def("routed", [](const ModuleCall& c, torch::Tensor x, torch::Tensor slots, torch::Tensor counts) -> pybind11::object {
        if (!c.applies(x)) return pybind11::none();
        return pybind11::cast(c.routed(x, slots, counts));
      });
  // layers: one (in_norm_weight, in_eps, post_norm_weight, post_eps, qkv_weight or None, qkv_bias or None,
  // (q, k, v) or None, o, gate, up, down) per decoder layer, each projection as to_proj takes it; (q, k, v) where
  // qkv_weight is None (they run in turn and their outputs are concatenated), or both (see DecodeStack::Layer)
  pybind11::class_<DecodeStack>(m, "DecodeStack", pybind11::module_local())
      .def(pybind11::init([](pybind11::list layers, int64_t H, int64_t Hkv, int64_t Dh, double scaling) {
        DecodeStack d{{}, H, Hkv, Dh, scaling};
        for (const auto& item : layers) {
          const auto t = item.cast<pybind11::tuple>();
          TORCH_CHECK(t.size() == 11, "a layer is 11 items: norms, the q/k/v weight and bias or projections, o, gate, up, down");
          DecodeStack::Layer L;
          L.in_w = t[0].cast<torch::Tensor>();
          L.in_eps = t[1].cast<double>();
          L.post_w = t[2].cast<torch::Tensor>();
          L.post_eps = t[3].cast<double>();
          TORCH_CHECK(!t[4].is_none() || !t[6].is_none(), "a layer has one q/k/v weight, three q/k/v projections or both");
          if (!t[4].is_none()) {
            L.wqkv = t[4].cast<torch::Tensor>();
            L.bqkv = t[5].is_none() ? torch::empty({0}, L.wqkv.options()) : t[5].cast<torch::Tensor>();
          }
          if (!t[6].is_none()) {
            const auto qkv = t[6].cast<pybind11::tuple>();
            TORCH_CHECK(qkv.size() == 3, "q/k/v projections: (q, k, v)");
            L.q = to_proj(qkv[0].cast<pybind11::tuple>());
            L.k = to_proj(qkv[1].cast<pybind11::tuple>());
            L.v = to_proj(qkv[2].cast<pybind11::tuple>());
          }
          L.o = to_proj(t[7].cast<pybind11::tuple>());
          L.gate = to_proj(t[8].cast<pybind11::tuple>());
          L.up = to_proj(t[9].cast<pybind11::tuple>());
          L.down = to_proj(t[10].cast<pybind11::tuple>());
          d.layers.push_back(std::move(L));
        }
        return d;
      }))
      .def("run", &DecodeStack::run, "the decoder layers of one decode step, or of tokens of given cache rows: (h, "
           "pending) or None (see the source)", pybind11::arg("h"), pybind11::arg("cos"), pybind11::arg("sin"),
           pybind11::arg("K"), pybind11::arg("V"), pybind11::arg("row0"), pybind11::arg("pos"), pybind11::arg("lens"),
           pybind11::arg("slots"), pybind11::arg("Ks"), pybind11::arg("Vs"), pybind11::arg("cache_rows") = torch::empty({0}, torch::kInt64));
}
"""

_lock = threading.Lock()
_state: dict = {}
FLAG_SETS = [["-march=native", "-fopenmp"], ["-fopenmp"], []]  # without OpenMP, torch's parallel_for runs serially


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, family and model number from /proc/cpuinfo (``platform.machine()`` where there is none), so a
    benchmark's JSON says which machine it ran on: e.g. ``AMD EPYC (family 26, model 2)`` for a Zen 5 VM."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    if "model name" not in fields:
        return platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def _cpu_tag() -> str:
    """A short hash of the machine and its instruction-set flags (the build uses -march=native)."""
    return hashlib.sha1((platform.machine() + " ".join(sorted(cpu_flags()))).encode()).hexdigest()[:8]


def _env_tag() -> str:
    """A short hash of the torch build and the environment that imports it: two virtual environments (a developer's
    and CI's fresh one) had shared one build directory and rebuilt it in turn, each for its own torch headers."""
    return hashlib.sha1(f"{torch.__version__} {sys.prefix}".encode()).hexdigest()[:6]


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """Hold an advisory lock on ``build_dir`` (fcntl.flock: the kernel releases it when its holder dies) while building;
    once held, a ``lock`` file torch's own build baton left there is stale - its builder was killed mid-build (a
    server stopped during its first start) - and is removed: torch would otherwise wait on it forever, and every later
    start hang without a word. Where flock is missing (not Linux/macOS) nothing is done."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "remix.flock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # waits for a live builder (ours hold this too)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                log.warning("removing a stale build lock %s (a build was interrupted)", stale)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load():
    """The compiled module, or None when disabled or unbuildable (then a warning is logged once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("REMIX_DISABLE_EXT", "") not in ("", "0"):
            log.info("REMIX_DISABLE_EXT is set: using the torch-ops path")
        else:
            from torch.utils.cpp_extension import get_default_build_root, load_inline

            errors = []
            for i, flags in enumerate(FLAG_SETS):  # the fastest build this compiler accepts
                try:
                    name = f"remix_cpu_ops_v218_{_cpu_tag()}_{_env_tag()}_{i}"
                    build_dir = os.path.join(get_default_build_root(), name)
                    with _build_lock(build_dir):
                        module = load_inline(
                            name, cpp_sources=[SOURCE], build_directory=build_dir,
                            extra_cflags=["-O3", *flags], extra_ldflags=[f for f in flags if f == "-fopenmp"],
                        )
                    if i:
                        log.warning("built the C++ kernels without %s (%s)", FLAG_SETS[0], errors[0])
                    break
                except Exception as e:  # no compiler, no ninja, no OpenMP, read-only cache...: try less, then fall back
                    errors.append(str(e).splitlines()[0][:300])
            else:
                log.warning("could not build the C++ kernels (%s); using torch ops, which are slower on CPU", errors[-1])
        _state["module"] = module
        return module


def available() -> bool:
    return load() is not None


_off = threading.local()


@contextlib.contextmanager
def disabled():
    """Within this block (this thread) the layers take the torch-ops path: for tests and benchmarks."""
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def bind_module(base, router, a, bt, tables: tuple, r: int, kmax: int, watched: tuple = (), ranks=None):
    """The compiled whole-module call (base GEMM, routing, gather) bound to ``base`` and one pool stack, or
    None where it cannot stand in for the base: no compiled kernels, or a base that is not a plain CPU ``nn.Linear``.
    It watches the base's tensors and ``watched`` (the parameters the pools were copied from) and declines a call
    once any of them changed; :func:`bound_applies` covers what it cannot see (hooks, replaced tensors). ``ranks``
    (int64 [N], or None where every LoRA has rank r): each LoRA's own rank in a stack padded to r, whose padding the
    kernel then skips."""
    ext = load()
    if ext is None or type(base) is not torch.nn.Linear or base.weight.device.type != "cpu":
        return None
    own = [t for t in (base.weight, base.bias) if t is not None]
    return ext.ModuleCall(base.weight, NONE if base.bias is None else base.bias, router, a, bt, *tables, r, kmax,
                          [*own, *watched], NONE if ranks is None else ranks)


def base_key(base) -> tuple:
    """What a bound call depends on beyond the tensors it watches: the base module and its parameter objects."""
    return (base, base._parameters.get("weight"), base._parameters.get("bias"))


def bound_applies(base, key: tuple) -> bool:
    """True when a call bound for ``key`` (:func:`base_key`) may stand in for ``base`` now: the same module and
    parameter objects, no forward hooks on it, and not inside :func:`disabled`. On every module call: a few lookups."""
    params = base._parameters
    return (base is key[0] and params["weight"] is key[1] and params.get("bias") is key[2]
            and not (base._forward_hooks or base._forward_pre_hooks or getattr(_off, "on", False)))


def for_input(x) -> object | None:
    """The compiled kernels when they apply to ``x`` (a CPU float32/bfloat16 tensor, no autograd needed), else None.

    On every module call of a forward, so kept to a few attribute reads.
    """
    if not x.is_cpu or x.dtype not in _DTYPES or getattr(_off, "on", False) or (x.requires_grad and torch.is_grad_enabled()):
        return None
    module = _state.get("module", _MISSING)
    return load() if module is _MISSING else module


def dot_gemm(dtype: torch.dtype = torch.float32) -> bool:
    """True when the base GEMM of ``dtype`` (:func:`linear`, the fused module call) is the compiled dot-product kernel,
    whose row outputs do not depend on the batch: float32 with AVX-512 or AVX2 + FMA (below ``load().ONEDNN_F32_FROM`` rows),
    bfloat16 with AVX512-BF16 (below ``load().DOT_BF16_BELOW`` rows); oneDNN's GEMM above. False without the kernels
    or those instructions (float32 then runs MKL, bfloat16 ATen's oneDNN GEMM)."""
    ext = load()
    return ext is not None and ext.dot_gemm(dtype == torch.bfloat16)


def set_batch_invariant(on: bool) -> bool:
    """Batch-invariant mode of this process's compiled base GEMMs (:func:`linear`, the fused module call; the serving
    engine sets it before each forward from its ``batch_invariant`` setting): the dot-product kernel (or AMX tiles) at
    every row count instead of oneDNN's GEMM for large calls, so where :func:`dot_gemm` is True a row's outputs never
    depend on how many rows share the call. Returns the previous setting (False without the kernels)."""
    ext = load()
    return bool(ext is not None and ext._batch_invariant(on))


def amx_bf16() -> bool:
    """True when bfloat16 base GEMMs run on AMX tiles (an Intel CPU with AMX-BF16, Sapphire Rapids or later, and a Linux
    that grants the tile state): for weights of whole tiles (inputs a multiple of 32, outputs of 16) below
    ``load().DOT_BF16_BELOW`` rows, in place of the AVX512-BF16 dot-product kernel; a row's outputs still the same in any
    batch (:func:`dot_gemm` stays True). ``REMIX_DISABLE_AMX=1`` in the environment (read once per process) turns it off:
    the AVX512-BF16 kernel then runs, for comparisons."""
    ext = load()
    return ext is not None and ext.amx_bf16()


# the kinds of op the decode stack's clock times, in its order (``StackOp`` in the C++ source)
STACK_OPS = ("norms", "qkv", "rotary", "kv_write", "attention", "o_proj", "gate", "up", "act", "down")


def stack_clock(on: bool) -> tuple[dict[str, float], int]:
    """The compiled decode stack's (``DecodeStack``) time in each kind of op since the last call, in milliseconds by
    :data:`STACK_OPS` name (norms: both RMSNorms of a layer with their residual adds; act: ``silu(gate) * up``;
    where a step of few rows runs a routed gate, up and act in one region, all three on gate; each op from the end
    of the one before it, so they add up to the stack's whole run), and the number of runs (decode steps) they
    cover; resets both, then switches the clock on (or off). ({}, 0) without the kernels."""
    ext = load()
    if ext is None:
        return {}, 0
    ns, runs = ext.stack_clock(on)
    return {name: v / 1e6 for name, v in zip(STACK_OPS, ns)}, runs


def pool_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the compiled kernel keeps a model's ReMix pools (A and B) in: bfloat16 for a bfloat16 model (widened as
    they are read, every sum in float32: half the bytes a decode step reads), else float32. Routers stay float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


_MISSING = object()
_DTYPES = (torch.float32, torch.bfloat16)
NONE = torch.empty(0, dtype=torch.int64)  # for route_gather_'s optional tensors: no slot map (all slot 0), no counts
NONE_F = torch.empty(0, dtype=torch.float32)  # linear's "no bias", add_rms_norm_'s "no residual" (any dtype when empty)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the compiled kernels' base GEMM where it applies (CPU float32 or bfloat16, contiguous weight, no
    autograd): each thread its own slice of the outputs, with AVX-512 or AVX2 by the dot-product kernel (see BaseGemm in the
    source: the default base's float32 linears at batch 1 / 32 in 0.39 / 0.52 of ATen's time on the AMD Zen 5 VM,
    a row's outputs the same in any batch - :func:`dot_gemm` says which), else MKL; bfloat16 below 128 rows with
    AVX512-BF16 (1.7x oneDNN's GEMV at one row), else ATen's; elsewhere plain ``F.linear``. The kernel bench times
    both (base / base_aten) and measures the ReMix module against the faster."""
    ext = for_input(x)
    if ext is None or (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))):
        return torch.nn.functional.linear(x, weight, bias)
    return ext.linear(x, weight, NONE_F if bias is None else bias)

