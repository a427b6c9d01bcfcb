// Decode attention over a slot KV cache, float32 and bfloat16: each query row reads only its own cache row's first
// len positions; the nrep query heads of one key/value head share each K and V read.
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "vec_math.h"
#include "gemm.h"

namespace {

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

// softmax_pass's second half: e = exp(s - m) for sr[0, padded), 16 at a time, each block handed to put(t, e); returns
// 1 / (their float32 sum, one running sum of 16 lanes, then hsum).
template <typename Put>
__attribute__((always_inline)) inline float softmax_exp(const float* sr, int64_t padded, float m, Put&& put) {
  vf sum = vf{};
  for (int64_t t = 0; t < padded; t += L) {
    const vf e = vexp(load(sr + t) - m);
    put(t, e);
    sum += e;
  }
  return 1.f / hsum(sum);
}

// The largest of sr[0, padded) (padded a multiple of W lanes of V, at least W), by four running maxima of W lanes
// (one had been a chain of dependent vmaxps, 4 cycles each, ~8 % of the prompt kernel's time), combined as vectors,
// then across the lanes. With SCALE (the bfloat16 prompt kernel, whose scores come unscaled from the tiles) each score
// is first multiplied by scale and stored back, in the same pass. A maximum does not depend on the order it is taken
// in (for scores that are not NaN), so neither does any weight.
template <typename V, bool SCALE = false>
__attribute__((always_inline)) inline float max_pass(float* sr, int64_t padded, float scale = 1.f) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  const auto at = [&](int64_t t) {
    V x;
    std::memcpy(&x, sr + t, sizeof x);
    if constexpr (SCALE) {
      x = x * scale;
      std::memcpy(sr + t, &x, sizeof x);
    }
    return x;
  };
  const auto mx = [](V a, V b) { return a > b ? a : b; };
  V m0 = at(0), m1 = m0, m2 = m0, m3 = m0;
  int64_t t = W;
  for (; t + 4 * W <= padded; t += 4 * W) {
    m0 = mx(m0, at(t));
    m1 = mx(m1, at(t + W));
    m2 = mx(m2, at(t + 2 * W));
    m3 = mx(m3, at(t + 3 * W));
  }
  for (; t < padded; t += W) m0 = mx(m0, at(t));
  const V mv = mx(mx(m0, m1), mx(m2, m3));
  float m = mv[0];
  for (int64_t l = 1; l < W; ++l) m = mv[l] > m ? mv[l] : m;
  return m;
}

// One head's softmax numerators over its scores sr[0, len) (sr padded to a multiple of L: the pad set to -1e30, whose
// exp is 0): e = exp(s - max), 16 at a time, each block handed to put(t, e); returns 1 / (their float32 sum).
// SCALE: the scores times scale first (stored back; the pad is not scaled).
template <bool SCALE = false, typename Put>
inline float softmax_pass(float* sr, int64_t len, int64_t padded, Put&& put, float scale = 1.f) {
  if constexpr (SCALE) {
    const int64_t whole = len / L * L;
    for (int64_t t = whole; t < len; ++t) sr[t] *= scale;
    for (int64_t t = len; t < padded; ++t) sr[t] = -1e30f;
    float m = whole ? max_pass<vf, true>(sr, whole, scale) : max_pass<vf>(sr, padded);
    if (whole && whole < padded) m = std::max(m, max_pass<vf>(sr + whole, L));
    return softmax_exp(sr, padded, m, put);
  } else {
    for (int64_t t = len; t < padded; ++t) sr[t] = -1e30f;
    return softmax_exp(sr, padded, max_pass<vf>(sr, padded), put);
  }
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// softmax_pass on 8-lane vectors (AVX2 builds: see vexp_of), storing e into sr: the same max, the same exp of each
// score, and the sum in the same order (lanes 0-7 and 8-15 of each 16 in two sums, then hsum's order).
// vs (the 8-bit cache's V scales, or null): each stored e times its position's scale (0 past len), the sum e's own.
inline float softmax_pass8(float* sr, int64_t len, int64_t padded, const float* vs = nullptr) {
  for (int64_t t = len; t < padded; ++t) sr[t] = -1e30f;
  const float m = max_pass<vf8>(sr, padded);
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
bool g_attn_v_fma = intel_cpu();  // attend_group_bf16's V pass on FMAs (v_pass_fma, below; A/B runs, tests)
#ifdef REMIX_DOT_BF16
// attend_group_bf16's V pass on float32 FMAs (g_attn_v_fma): the same sums as its vdpbf16ps form, bit for bit.
// VDPBF16PS adds a lane's two products one after the other, the odd element's first, each rounded as an FMA rounds
// (a product of two bfloat16 is exact in float32), with denormal inputs read as zero and denormal results flushed
// (a /tmp check, 47th session's Intel VM: 3.2 M random lanes, every one equal to the two FMAs in that order, 94 %
// to the other order or to the exact sum rounded once). So here each pair of positions (u, u + 1) adds p[u + 1] v[u + 1]
// and then p[u] v[u] into each dimension's float32 sum, under MXCSR's FTZ and DAZ; the weights are the vdpbf16ps
// form's, rounded to bfloat16 (written back over the scores as floats). A V row is widened by a shift (its even
// dimensions) and a mask (its odd ones), so a sum's lanes hold a group of 32 dimensions' even or odd ones, put back in
// order at the end. On Intel, vdpbf16ps issues one every two cycles where FMAs issue two a cycle (scripts/
// vector_rates.c: 1.5-1.6 G against 6.0-6.3 G a second a core, 47th session): half the products a second, where on
// AMD's Zen 5 the vdpbf16ps form had halved the attention's time in cache (decode_attention_impl, below) - so the FMA
// form is the default on Intel CPUs only (measured on the AMX generation; the values are the same either way). The V pass alone, Dh
// 64, three query heads, 192 positions in L1 (a /tmp harness): 22.1 -> 13.5 TSC cycles a pair of positions; 30 calls
// of 4 rows with K and V in cache 0.69 -> 0.59 ms. Where K and V come from memory their reads bound the attention:
// 30 calls of 8 / 32 rows of 129-255 positions 1.39 -> 1.37 / 6.73 -> 6.71 ms, and in the engine (scripts/ab_steps.py
// --adapters 0 --ops attention, steps alternating) 2.05 -> 1.99 ms a step at 8 sequences, 7.68 -> 7.46 at 32.
template <int DH, int NR>
void v_pass_fma(const uint16_t* V, int64_t len, const float* w, int64_t padded, const float* inv, uint16_t* out,
                const uint16_t* next_k) {
  constexpr int NQ = DH / 32;  // groups of 32 dimensions (one 512-bit load of a row each)
  constexpr int CW = NR <= 1 ? std::min(NQ, 4) : NR <= 4 ? std::min(NQ, 2) : 1;  // groups a pass: the sums in registers
  static_assert(NQ % CW == 0, "the V pass's groups must tile the head");
  const __m512i odd_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int c0 = 0; c0 < NQ; c0 += CW) {
    __m512 acc[NR][2 * CW];  // [r][2 g]: group c0 + g's even dimensions, [r][2 g + 1] its odd ones
    for (int r = 0; r < NR; ++r) for (int g = 0; g < 2 * CW; ++g) acc[r][g] = _mm512_setzero_ps();
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);  // FTZ and DAZ, as vdpbf16ps computes whatever MXCSR says
    for (int64_t u = 0; u < len; u += 2) {
      const uint16_t* v = V + u * DH;
      if (c0 == 0) {  // the vdpbf16ps form's prefetches, in the first pass
        for (int64_t o = 0; o < 2 * DH * 2; o += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(v + 32 * DH) + o, 0, ATTN_PFL);  // may run past the tensor
        if (next_k && u < 2 * L * DH * 2 / 64)
          for (int64_t e = u; e < u + 2; ++e) __builtin_prefetch(reinterpret_cast<const char*>(next_k) + e * 64, 0, ATTN_PFL);
      }
      const bool two = u + 1 < len;  // (an odd last position: the next row zeros, as the vdpbf16ps form pairs it)
      __m512 e0[CW], o0[CW], e1[CW], o1[CW];
      for (int g = 0; g < CW; ++g) {
        const __m512i a0 = _mm512_loadu_si512(v + (c0 + g) * 32);
        const __m512i a1 = two ? _mm512_loadu_si512(v + DH + (c0 + g) * 32) : _mm512_setzero_si512();
        e0[g] = _mm512_castsi512_ps(_mm512_slli_epi32(a0, 16));
        o0[g] = _mm512_castsi512_ps(_mm512_and_si512(a0, odd_mask));
        e1[g] = _mm512_castsi512_ps(_mm512_slli_epi32(a1, 16));
        o1[g] = _mm512_castsi512_ps(_mm512_and_si512(a1, odd_mask));
      }
      for (int r = 0; r < NR; ++r) {  // position u + 1 first (past len its weight is exp's floor, its row zeros)
        const __m512 p = _mm512_set1_ps(w[r * padded + u + 1]);
        for (int g = 0; g < CW; ++g) {
          acc[r][2 * g] = _mm512_fmadd_ps(p, e1[g], acc[r][2 * g]);
          acc[r][2 * g + 1] = _mm512_fmadd_ps(p, o1[g], acc[r][2 * g + 1]);
        }
      }
      for (int r = 0; r < NR; ++r) {
        const __m512 p = _mm512_set1_ps(w[r * padded + u]);
        for (int g = 0; g < CW; ++g) {
          acc[r][2 * g] = _mm512_fmadd_ps(p, e0[g], acc[r][2 * g]);
          acc[r][2 * g + 1] = _mm512_fmadd_ps(p, o0[g], acc[r][2 * g + 1]);
        }
      }
    }
    _mm_setcsr(csr);  // (the scaling below under the caller's MXCSR, as the vdpbf16ps form's)
    for (int r = 0; r < NR; ++r)
      for (int g = 0; g < CW; ++g) {
        const __m512 a = _mm512_mul_ps(acc[r][2 * g], _mm512_set1_ps(inv[r]));
        const __m512 b = _mm512_mul_ps(acc[r][2 * g + 1], _mm512_set1_ps(inv[r]));
        const __m512 d0 = _mm512_permutex2var_ps(a, lo_idx, b), d1 = _mm512_permutex2var_ps(a, hi_idx, b);
        narrow(reinterpret_cast<const float*>(&d0), out + r * DH + (c0 + g) * 32, L);
        narrow(reinterpret_cast<const float*>(&d1), out + r * DH + (c0 + g) * 32 + L, L);
      }
  }
}
template <int DH>
void v_pass_fma_any(const uint16_t* V, int64_t len, int64_t nrep, const float* w, int64_t padded, const float* inv,
                    uint16_t* out, const uint16_t* next_k) {
  switch (nrep) {
    case 1: return v_pass_fma<DH, 1>(V, len, w, padded, inv, out, next_k);
    case 2: return v_pass_fma<DH, 2>(V, len, w, padded, inv, out, next_k);
    case 3: return v_pass_fma<DH, 3>(V, len, w, padded, inv, out, next_k);
    case 4: return v_pass_fma<DH, 4>(V, len, w, padded, inv, out, next_k);
    case 5: return v_pass_fma<DH, 5>(V, len, w, padded, inv, out, next_k);
    case 6: return v_pass_fma<DH, 6>(V, len, w, padded, inv, out, next_k);
    case 7: return v_pass_fma<DH, 7>(V, len, w, padded, inv, out, next_k);
    default: return v_pass_fma<DH, MAX_GROUP>(V, len, w, padded, inv, out, next_k);
  }
}

// attend_group for bfloat16 with AVX512-BF16, DH a multiple of 32: the same two passes on vdpbf16ps, which takes two
// bfloat16 products per float32 lane (half the instructions of widening and FMAs - the attention is bound by the
// vector unit's throughput once K and V are in cache). Scores: q . k over pairs of dimensions (products exact in
// float32), times scale. Weights: exp(s - max) in float32 and their float32 sum, as before; each weight then rounded
// to bfloat16 for V, as SDPA's own CPU kernel does for bfloat16 (torch's flash attention converts the exponentials to
// the input dtype before its second GEMM). V: two positions per step, their rows interleaved dimension by dimension
// (unpacklo / unpackhi of 16-bit words: lane 4 l + i of the low half holds dimension 8 l + i, of the high half
// 8 l + 4 + i, put back in order once at the end), times the pair of weights (u, u + 1) broadcast; an odd last position
// pairs with zeros. One order per output whatever the batch, as the float32 path; results differ from it by the
// weights' rounding (~2^-9 relative each). Measured: see decode_attention_impl. On Intel the V pass runs the same sums
// on FMAs (v_pass_fma, above: vdpbf16ps issues at a quarter of the FMAs' rate there).
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
  if (g_attn_v_fma) {  // the same weights, as floats over the scores, for the FMA form of the V pass (v_pass_fma)
    for (int64_t r = 0; r < nrep; ++r) {
      float* sr = s + r * padded;
      inv[r] = softmax_pass(sr, len, padded, [&](int64_t t, vf e) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh((__m512)e);
        _mm512_storeu_si512(sr + t, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      });
    }
    return v_pass_fma_any<DH>(V, len, nrep, s, padded, inv, out, next_k);
  }
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

// A decode step's attention items (a row's key/value head) go to the threads by their cost, the row's length plus
// ATTN_ITEM_COST positions for an item's own fixed work (its query, softmax and output), at the speed weights of the
// GEMMs' output splits (item_share, gemm.h): a static split by count had one thread take a long row and its share of
// short ones while the other waited, and one slow vCPU (a spell) held every step's attention. Which thread runs an
// item changes no value.
constexpr int64_t ATTN_ITEM_COST = 16;
bool g_attn_by_length = true;  // off: every item the same cost, a split by count (A/B runs: _attention_by_length)
inline double attn_item_cost(const int64_t* lens, int64_t it, int64_t Hkv) {
  return g_attn_by_length ? static_cast<double>(lens[it / Hkv] + ATTN_ITEM_COST) : 1.0;
}

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
  const int64_t team = region_threads(items);
  const Split sp = split_peek(team);  // (ATTN_ITEM_COST: the items by their lengths, at the GEMMs' speed weights)
#pragma omp parallel num_threads(team)
  {
    const auto [h, nh] = region_thread();
    const auto [i0, i1] = item_share(items, h, nh, sp, [&](int64_t it) { return attn_item_cost(lens, it, Hkv); });
    std::vector<float> s(nrep * (P + L));
#ifdef REMIX_DOT_BF16
    std::vector<uint16_t> pb(std::is_same_v<T, float> || g_attn_v_fma ? 0 : nrep * (P + L));  // (v_pass_fma: unused)
#endif
    for (int64_t it = i0; it < i1; ++it) {
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
