// Token choice without sorting the vocabulary: argmax_rows / masked_argmax_rows (greedy, a grammar's bitmask) and
// sample_rows (temperature, top-k, top-p, min-p, one uniform draw a row).
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "ops.h"
#include "vec_math.h"

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
