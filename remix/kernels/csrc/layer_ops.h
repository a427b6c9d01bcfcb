// Fused ops of a Llama decoder layer for the engine's lean forward: add_rms_norm_, silu_mul_, rotary_, kv_write_
// and kv_write_q8_.
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "ops.h"
#include "vec_math.h"

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

// The vector forms of the norm's first and last loops (g_norm_vec; off: the scalar loops, for A/B runs and the test
// that the two agree): each element's same operations and roundings, sixteen at a time (round_v / store_v round to
// nearest even as from_f does; only a NaN's payload may differ), the sum of squares untouched.
bool g_norm_vec = true;

template <typename T>
void add_rms_rows(T* h, const T* delta, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  const bool vec = g_norm_vec;
  at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* hr = h + i * D;
      if (delta) {  // h = h + delta
        const T* dr = delta + i * D;
        int64_t d = 0;
        if (vec)
          for (; d + L <= D; d += L) store_v(hr + d, load(hr + d) + load(dr + d));
        for (; d < D; ++d) hr[d] = from_f<T>(to_f(hr[d]) + to_f(dr[d]));
      }
      vf acc = vf{};  // sum of squares in L lanes, then hsum's fixed order and the tail: the same for every row
      int64_t d = 0;
      for (; d + L <= D; d += L) { const vf v = load(hr + d); acc += v * v; }
      float ss = hsum(acc);
      for (; d < D; ++d) { const float v = to_f(hr[d]); ss = __builtin_fmaf(v, v, ss); }  // explicit: see dots4x4's tail
      const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      int64_t e = 0;
      if (vec)  // LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
        for (; e + L <= D; e += L) store_v(out + i * D + e, load(w + e) * round_v<T>(load(hr + e) * r));
      for (; e < D; ++e)
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

// g_rotary_vec: bfloat16's pairs sixteen at a time (each element's same products, sum and roundings: round_v as
// round_to), off: the scalar loop (A/B runs, and the test that the two agree). float32 keeps the scalar loop, where
// GCC contracts a product and the sum into one FMA (round_to<float> is x itself), a contraction the vector form would
// have to repeat operand for operand in every build (test_avx2_build compares them) to give the same values.
bool g_rotary_vec = true;

template <typename T>
void rotary_rows(T* x, int64_t row_stride, const T* cs, const T* sn, int64_t rows, int64_t heads, int64_t Dh) {
  const int64_t half = Dh / 2;
  const bool vec = g_rotary_vec;
  at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t i0, int64_t i1) {
    // float copies of a row's cos / sin and of one head, so the arithmetic runs on plain float arrays (vectorised)
    alignas(64) float c[ROTARY_MAX_DH], sg[ROTARY_MAX_DH], v[ROTARY_MAX_DH], o[ROTARY_MAX_DH];
    for (int64_t i = i0; i < i1; ++i) {
      to_floats(cs + i * Dh, c, Dh);
      to_floats(sn + i * Dh, sg, Dh);
      for (int64_t hd = 0; hd < heads; ++hd) {
        T* x_h = x + i * row_stride + hd * Dh;
        to_floats(x_h, v, Dh);
        int64_t d = 0;
        if constexpr (!std::is_same_v<T, float>)  // (each product rounded to T before the sum: nothing to contract)
          if (vec)
            for (; d + L <= half; d += L) {
              const vf a = load(v + d), b = load(v + d + half);
              store(o + d, round_v<T>(round_v<T>(a * load(c + d)) + round_v<T>(b * load(sg + d))));
              store(o + d + half, round_v<T>(round_v<T>(b * load(c + d + half)) + round_v<T>(a * load(sg + d + half))));
            }
        for (; d < half; ++d) {
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

// The positions a K/V write puts b x q tokens at: pos int64 [b, q], each in [0, P) (checked); pc holds the contiguous
// copy its data points into.
const int64_t* checked_positions(const torch::Tensor& pos, int64_t b, int64_t q, int64_t P, torch::Tensor& pc) {
  pc = pos.contiguous();
  TORCH_CHECK(pc.scalar_type() == torch::kInt64 && pc.dim() == 2 && pc.size(0) == b && pc.size(1) == q, "pos must be int64 [b, q]");
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t e = 0; e < b * q; ++e)
    TORCH_CHECK(pp[e] >= 0 && pp[e] < P, message("position %lld out of [0, %lld)", pp[e], P));
  return pp;
}

void kv_write_(torch::Tensor cache, torch::Tensor fresh, int64_t row0, torch::Tensor pos, torch::Tensor rows) {
  TORCH_CHECK(cache.device().is_cpu() && fresh.device().is_cpu() && cache.dim() == 4 && fresh.dim() == 4 && cache.is_contiguous(),
              "cache must be a contiguous CPU [S, H, P, Dh] tensor, fresh a CPU [b, H, q, Dh] tensor");
  TORCH_CHECK(fresh.scalar_type() == cache.scalar_type(), "fresh must have the cache's dtype");
  const int64_t S = cache.size(0), H = cache.size(1), P = cache.size(2), Dh = cache.size(3);
  const int64_t b = fresh.size(0), q = fresh.size(2);
  TORCH_CHECK(fresh.size(1) == H && fresh.size(3) == Dh && (Dh == 1 || fresh.stride(3) == 1), "fresh must be [b, H, q, Dh] with Dh contiguous");
  const CacheRows cr(rows, row0, b, S);
  torch::Tensor pc;
  const int64_t* pp = checked_positions(pos, b, q, P, pc);
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
  torch::Tensor pc;
  const int64_t* pp = checked_positions(pos, b, q, P, pc);
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
