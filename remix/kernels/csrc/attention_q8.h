// Decode attention over the opt-in 8-bit KV cache (--kv-cache-dtype int8): int8 codes with a float32 scale a row.
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "attention.h"

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
  const int64_t team = region_threads(items);
  const Split sp = split_peek(team);  // (ATTN_ITEM_COST: the items by their lengths, at the GEMMs' speed weights)
#pragma omp parallel num_threads(team)
  {
    const auto [h, nh] = region_thread();
    const auto [i0, i1] = item_share(items, h, nh, sp, [&](int64_t it) { return attn_item_cost(lens, it, Hkv); });
    std::vector<float> s(nrep * (P + L));
#ifdef REMIX_Q8_VNNI
    std::vector<int16_t> pb(nrep * (P + L + 2));
#endif
    for (int64_t it = i0; it < i1; ++it) {
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
