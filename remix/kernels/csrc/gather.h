// The per-token LoRA gather of one module (DESIGN's kernel contract): the dot-product blocks that route and run phase
// A (dots4x4), phase B's row updates (axpy_lora), the (token, LoRA) pairs sorted by LoRA, the pools, scratch buffers,
// bfloat16 widen / narrow, phase B on bfloat16 y, and routing (top-k of each token's float32 router logits).
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "common.h"

namespace {

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
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
  hsum_many(&acc[0][0], 16, &sums[0][0]);  // (hsum's sixteen sums at once: the same adds, by shuffles)
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
  float sums[4][4];
  hsum_many(reinterpret_cast<const vf*>(&acc[0][0]), 16, &sums[0][0]);
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t c = 0; c < nc; ++c) out[q * os + c] = scale ? sums[q][c] * scale[q] : sums[q][c];
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
#ifdef __AVX512DQ__
    // a denormal, an infinity or a NaN in one vfpclassps (QNaN 0x01, +inf 0x08, -inf 0x10, denormal 0x20, SNaN 0x80):
    // the integer test (#else: builds without AVX512DQ) takes four instructions on the two ports vcvtneps2bf16 and the
    // FMAs share. scripts/ab_modules.py (bfloat16, the two alternating, 24 rounds; 40th session's Intel VM), the adapter's cost
    // over bare GEMMs at 32 / 128 / 512 rows 2.62 / 9.71 / 32.1 ms with the integer test against 2.38 / 9.26 / 29.8
    // (one adapter), 15.6 / 37.7 against 14.4 / 35.5 at 128 / 512 (four); the same lanes take the integer code.
    const __mmask16 odd = _mm512_fpclass_ps_mask(v, 0xB9);
#else
    // exponent 0 (a nonzero lane: a denormal) or 255: the exponent field minus one wraps to >= 0x7F000000
    const __m512i e = _mm512_and_si512(b, _mm512_set1_epi32(0x7F800000));
    const __mmask16 odd = _mm512_mask_cmpge_epu32_mask(_mm512_test_epi32_mask(b, _mm512_set1_epi32(0x7FFFFFFF)),
                                                       _mm512_sub_epi32(e, _mm512_set1_epi32(0x00800000)),
                                                       _mm512_set1_epi32(0x7F000000));
#endif
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

// A slot of one LoRA (a plain LoRA: n = k = 1) whose routing is skipped: its one LoRA is every token's top 1 whatever
// the logit (NaN included: topk_token takes index 0 first), so the router's dot product, ~1-3 KB of cold router row and
// a few hundred FMAs a token and module, is not computed. Off (_single_route): the logits are computed as for any pool
// (tests: the same selections either way).
bool g_skip_single = true;
inline bool single_lora_skips(int64_t n) { return g_skip_single && n == 1; }  // a slot of n LoRAs
inline bool skips_routing(const Routing& rt, int64_t s) { return single_lora_skips(rt.n[s]); }

// Token t's top k of its slot s's n logits lg (ties to the lower index): global ids into ip [T, kmax], omega into wp.
// lg is not read where skips_routing(rt, s).
inline void topk_token(const float* lg, int64_t t, int64_t s, const Routing& rt, int64_t* ip, float* wp) {
  const int64_t o = rt.off[s], n = rt.n[s], k = rt.k[s];
  if (skips_routing(rt, s)) {
    ip[t * rt.kmax] = o;  // (k <= n = 1)
    wp[t * rt.kmax] = rt.omega[s];
    return;
  }
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
      for (int64_t c0 = 0; c0 < n && !skips_routing(rt, s); c0 += 4)
        dots4x4(xs, nq, rt.router + (o + c0) * D, std::min<int64_t>(4, n - c0), D, logits + c0, 64, nullptr);
      for (int64_t q = 0; q < nq; ++q) topk_token(logits + q * 64, tok[b0 + q], s, rt, ip, wp);
    }
}

// The router logits of every routed token of x [T, D] for this thread's share of the units (slot, block of
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
// The thread's share of the units is [nu lo / den, nu hi / den) (h, h + 1, nh for an even split; gemm.h's share_frac).
template <typename XT>
void route_logits_share(const XT* x, int64_t D, int64_t T, const Routing& rt, int64_t lo, int64_t hi, int64_t den,
                        float* logits) {
  std::vector<int64_t> start, tok;
  tokens_by_slot(rt, 0, T, start, tok);
  std::vector<int64_t> units;  // slot * 64 + first row
  for (int64_t s = 0; s < rt.S; ++s)
    if (start[s + 1] > start[s] && !skips_routing(rt, s))
      for (int64_t c0 = 0; c0 < rt.n[s]; c0 += 4) units.push_back(s * 64 + c0);
  const int64_t nu = static_cast<int64_t>(units.size());
  float out[4 * 4];
  for (int64_t u = nu * lo / den; u < nu * hi / den; ++u) {
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

}  // namespace
