// The compiled base GEMM (dot_gemm: tiles of rows x outputs as dot products, each row's sums in one order whatever
// its batch), the parallel-region helpers, and Ahead (a module's pools prefetched during the GEMM before it).
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "gather.h"

namespace {

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

// Output splits weighted by each thread's measured speed. On a VM a vCPU can run slower than its sibling for seconds
// to minutes at a time (its host core shared with another guest: this project's 2-vCPU Intel VM had one thread take
// 1.4-1.9x the other's time in every stage of a module call, cached or not, in about a third of its processes, while
// both vCPUs ran a pure FMA loop at the same rate), and an even split then waits on the slow thread at every barrier.
// Each thread times its base GEMM slice (TSC cycles against its multiply-adds, SplitMeter); every SPLIT_EVERY regions
// the calling thread moves each thread's share of the next regions' outputs toward its share of the measured speed
// (half way from the share before, each within [1/2, 3/2] of an even share), or back to even where the speeds are
// within SPLIT_DEAD of an even share - where two windows in a row agree (split_update). A module call's routing and
// phase A split their tokens, router units, blocks and AMX row tiles by the same weights (share_range, share_frac),
// and the decode attention its rows (item_share). A region reads the weights once, before it starts (Split,
// captured by every thread), so its threads always cover its work exactly once; no value depends on the split (every
// GEMM and phase B path sums an output in one order whatever its slice, a token's routing and a block's phase A are
// the same on any thread: tested). g_split_adapt off (_split_adapt): even splits, as before; _split_fixed sets fixed
// weights (tests).
constexpr int MAX_SPLIT = 16;  // teams larger than this split evenly
constexpr int64_t SPLIT_UNITS = 4096;  // a share in 1/SPLIT_UNITS of the outputs' slices
constexpr uint64_t SPLIT_EVERY = 128;  // regions between updates of the weights (~2-3 a decode step of the default base)
constexpr double SPLIT_DEAD = 0.02;  // speeds' shares within this of even (a speed ratio under ~1.08 for two): even
bool g_split_adapt = true;
bool g_split_fixed = false;  // weights set by _split_fixed: not updated
struct alignas(64) SplitMeter { std::atomic<uint64_t> cycles{0}, work{0}; };
SplitMeter g_split_meter[MAX_SPLIT];
std::atomic<int64_t> g_split_team{0};  // the team size the weights are for (0: even splits)
std::atomic<int64_t> g_split_w[MAX_SPLIT];  // thread h's share in SPLIT_UNITS (they sum to SPLIT_UNITS)
std::atomic<uint64_t> g_split_regions{0};

inline uint64_t split_ticks() {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#else
  return static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
#endif
}

// A region's split, fixed before it starts: thread h's outputs' slices from cut[h] to cut[h + 1] (in SPLIT_UNITS of
// the slices), for a team of nh; nh 0: even.
struct Split {
  int64_t nh = 0;
  int64_t cut[MAX_SPLIT + 1] = {};
};

// The last window's speed shares (split_update's hysteresis): g_split_last_n threads, 0 where it was even.
double g_split_last[MAX_SPLIT];
int64_t g_split_last_n = -1;  // -1: no window yet
std::mutex g_split_mu;  // one update at a time (callers on other threads skip theirs)

// Thread h's share w[h] / (the sum of w) of a team of nh, in SPLIT_UNITS (the last thread takes what rounding left, so
// they sum to SPLIT_UNITS), as the weights every region reads from now on.
inline void split_store(const double* w, int64_t nh) {
  double total = 0;
  for (int64_t h = 0; h < nh; ++h) total += w[h];
  int64_t given = 0;
  for (int64_t h = 0; h < nh; ++h) {
    const int64_t units = h + 1 < nh ? static_cast<int64_t>(w[h] / total * SPLIT_UNITS + 0.5) : SPLIT_UNITS - given;
    g_split_w[h].store(units, std::memory_order_relaxed);
    given += units;
  }
  g_split_team.store(nh, std::memory_order_relaxed);
}

// New weights from the meters of a team of nh (on one thread; the meters reset). A window's speed shares move the
// weights only where the window before agrees: both off even (half way from the weights before to the two windows'
// mean shares), or both within SPLIT_DEAD of even (even) - one window that a preempted or faulting thread skewed
// moves nothing. Returns whether the meters were read.
inline bool split_update(int64_t nh) {
  std::unique_lock<std::mutex> lock(g_split_mu, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  double share[MAX_SPLIT], sum = 0;
  for (int64_t h = 0; h < nh; ++h) {
    const double c = static_cast<double>(g_split_meter[h].cycles.load(std::memory_order_relaxed));
    const double w = static_cast<double>(g_split_meter[h].work.load(std::memory_order_relaxed));
    if (c <= 0 || w <= 0) return false;  // a thread without a timed slice: wait for more
    share[h] = w / c;
    sum += share[h];
  }
  for (int64_t h = 0; h < nh; ++h) {
    g_split_meter[h].cycles.store(0, std::memory_order_relaxed);
    g_split_meter[h].work.store(0, std::memory_order_relaxed);
    share[h] /= sum;
  }
  const double even = 1.0 / static_cast<double>(nh);
  bool near_even = true;
  for (int64_t h = 0; h < nh; ++h) near_even = near_even && std::abs(share[h] - even) < SPLIT_DEAD;
  const bool agree = g_split_last_n == (near_even ? 0 : nh);
  const bool last_off = g_split_last_n == nh;
  double last[MAX_SPLIT];
  std::copy(g_split_last, g_split_last + nh, last);
  g_split_last_n = near_even ? 0 : nh;
  std::copy(share, share + nh, g_split_last);
  if (!agree) return true;
  if (near_even) {
    g_split_team.store(0, std::memory_order_relaxed);
    return true;
  }
  const bool had = g_split_team.load(std::memory_order_relaxed) == nh;
  double w[MAX_SPLIT];
  for (int64_t h = 0; h < nh; ++h) {
    const double before = had ? static_cast<double>(g_split_w[h].load(std::memory_order_relaxed)) / SPLIT_UNITS : even;
    const double seen = last_off ? 0.5 * (share[h] + last[h]) : share[h];
    w[h] = std::clamp(0.5 * before + 0.5 * seen, 0.5 * even, 1.5 * even);
  }
  split_store(w, nh);
  return true;
}

// The weights as they are, for a team of nh (not counted as a region: the pools' prefetches, which only guess at the
// split of the region that reads them).
inline Split split_peek(int64_t nh) {
  Split sp;
  if (!g_split_adapt || nh < 2 || nh > MAX_SPLIT || g_split_team.load(std::memory_order_relaxed) != nh) return sp;
  sp.nh = nh;
  for (int64_t h = 0; h < nh; ++h) sp.cut[h + 1] = sp.cut[h] + g_split_w[h].load(std::memory_order_relaxed);
  if (sp.cut[nh] != SPLIT_UNITS) sp.nh = 0;  // (weights being rewritten by another caller: even this once)
  return sp;
}

// The split of a region of nh threads about to start (on the calling thread): counts the region, updates the weights
// every SPLIT_EVERY regions, and reads them. Even where adapting is off, for a team of one or one past MAX_SPLIT, or
// where the weights are for another team size.
inline Split split_for(int64_t nh) {
  if (g_split_adapt && !g_split_fixed && nh >= 2 && nh <= MAX_SPLIT &&
      (g_split_regions.fetch_add(1, std::memory_order_relaxed) + 1) % SPLIT_EVERY == 0)
    split_update(nh);
  return split_peek(nh);
}

// Thread h's time for `work` multiply-adds of its GEMM slice, counted toward the weights (nh >= 2 teams only).
inline void split_meter(int64_t h, int64_t nh, uint64_t ticks, int64_t work) {
  if (!g_split_adapt || g_split_fixed || nh < 2 || nh > MAX_SPLIT || work <= 0) return;
  g_split_meter[h].cycles.fetch_add(ticks, std::memory_order_relaxed);
  g_split_meter[h].work.fetch_add(static_cast<uint64_t>(work), std::memory_order_relaxed);
}

// Thread h of nh's share of a region's work as the fraction [lo / den, hi / den): sp's cuts where they are for a team
// of nh, else h / nh. The one place the weighted and the even split part.
struct Frac { int64_t lo, hi, den; };
inline Frac share_frac(int64_t h, int64_t nh, const Split& sp) {
  if (sp.nh == nh && nh >= 2) return {sp.cut[h], sp.cut[h + 1], SPLIT_UNITS};
  return {h, h + 1, nh};
}

// Thread h of nh's share [i0, i1) of n like items (tokens to route, phase A's blocks, router units, AMX row tiles).
// Which thread takes an item changes none of its values.
inline std::pair<int64_t, int64_t> share_range(int64_t n, int64_t h, int64_t nh, const Split& sp) {
  const Frac f = share_frac(h, nh, sp);
  return {n * f.lo / f.den, n * f.hi / f.den};
}

// Thread h of nh's share [o0, o1) of O outputs: whole slices of 2L (share_range of the slices), so phase B's vector
// paths (and the fused GEMM's columns) never depend on the split.
inline std::pair<int64_t, int64_t> out_slice(int64_t O, int64_t h, int64_t nh, const Split& sp = Split{}) {
  const auto [c0, c1] = share_range((O + 2 * L - 1) / (2 * L), h, nh, sp);
  return {std::min(O, c0 * 2 * L), std::min(O, c1 * 2 * L)};
}

// Thread h of nh's share [i0, i1) of n items of work, item i costing cost(i) >= 0: each item goes to the thread whose
// cut of the total cost (share_frac) holds the item's midpoint.
// Which thread runs an item changes none of its values.
template <typename Cost>
std::pair<int64_t, int64_t> item_share(int64_t n, int64_t h, int64_t nh, const Split& sp, Cost cost) {
  if (nh <= 1) return {0, n};
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += cost(i);
  const auto first = [&](int64_t j) -> int64_t {  // thread j's first item
    if (j <= 0) return 0;
    if (j >= nh) return n;
    const Frac f = share_frac(j, nh, sp);
    const double target = total * static_cast<double>(f.lo) / static_cast<double>(f.den);
    double run = 0;
    int64_t i = 0;
    for (; i < n && run + 0.5 * cost(i) < target; ++i) run += cost(i);
    return i;
  };
  return {first(h), first(h + 1)};
}

// A/B runs (_split_drag): thread g_split_drag_thread runs each of its GEMM slices g_split_drag_extra more times (the
// same outputs again), a stand-in for a slow vCPU in a controlled run.
int64_t g_split_drag_thread = -1, g_split_drag_extra = 0;

// A thread's base GEMM slice [o0, o1) of a region split by sp, timed for the weights: gemm(o0, o1).
template <typename G>
inline void split_gemm(int64_t h, int64_t nh, int64_t T, int64_t D, int64_t o0, int64_t o1, G&& gemm) {
  const uint64_t t0 = split_ticks();
  gemm(o0, o1);
  if (h == g_split_drag_thread)
    for (int64_t i = 0; i < g_split_drag_extra; ++i) gemm(o0, o1);
  split_meter(h, nh, split_ticks() - t0, (o1 - o0) * T * D);
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
  int64_t o0 = 0, o1 = 0;  // where o1 > o0: B^T's columns [o0, o1) (a chunk of the thread's outputs), not its out_slice
  double start = -1;  // where >= 0: the share of the GEMM's blocks the lines start at (else the caller's)
  int64_t loras() const {
    int64_t n = 0;
    for (const auto& [lo, hi] : ranges) n += hi - lo;
    return n;
  }
};
// Whether the software prefetches of the pools pay on this CPU: the decode stack's Ahead (g_ahead_from), a small call's
// own B^T rows (g_own_bt) and float32 phase B by chunks (g_chunk_b) were measured and kept on AMD Zen 4 / 5 VMs; on the
// Intel Xeon VM of the 38th-40th sessions (family 6 model 207, AMX) each of them slowed what it was meant to speed up:
// its memory streams W at full rate on the hardware prefetchers alone, and lines prefetched beside that stream take
// from it. Variants alternating in one process (40th session; scripts/ab_modules.py: 90 bound FFN modules, the adapter's
// cost over their bare GEMMs; scripts/ab_steps.py: the engine's decode steps), float32, on against off:
//   own B^T rows:  1 / 8 / 12 rows 0.98 / 2.69 / 2.87 ms against 0.90 / 2.28 / 2.28 (one adapter), 1.05 / 4.71 / 6.28
//                  against 0.98 / 4.16 / 5.37 (four)
//   chunks (160):  24 / 32 / 48 rows 3.53 / 4.21 / 4.92 ms against 3.33 / 3.53 / 4.71 (one), 8.96 / 11.07 / 11.58
//                  against 7.97 / 8.98 / 9.68 (four); the kernel bench's overhead_over_base at T = 32 0.19 / 0.19 against
//                  0.17 / 0.17 (two runs each, in turn)
//   Ahead:         the step at 16 / 32 sequences 42.40 / 64.69 ms against 41.25 / 63.19 (one adapter), 47.93 / 72.11
//                  against 42.69 / 66.36 (four)
// (bfloat16 there runs its GEMMs on AMX tiles, which issue none of them: 39th session, in BENCHMARKS.) Where they go
// changes no value, so the default is by vendor; the A/B switches set them either way.
inline bool pool_prefetch_pays() { return !intel_cpu(); }
// rows of a decode step from which the stack prefetches ahead (0: never; A/B runs: _ahead_from)
int64_t g_ahead_from = pool_prefetch_pays() ? 16 : 0;
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
bool g_own_bt = pool_prefetch_pays();
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
      if (!ah->bt_only && !single_lora_skips(hi - lo))  // (a slot's range; a one-LoRA slot's router is never read)
        seg.push_back({reinterpret_cast<const char*>(ah->router + lo * D), 1, (hi - lo) * D * 4, 0});
      for (int64_t i = lo; i < hi; ++i) ids.push_back(i);
    }
    for (int64_t j = n * h / nh; !ah->bt_only && j < n * (h + 1) / nh; ++j)
      seg.push_back({A + ids[j] * r * D * esz, 1, pl.rank_of(ids[j]) * D * esz, 0});
    const auto [s0, s1] = out_slice(O, h, nh, split_peek(nh));  // (a guess at the reading region's split)
    const int64_t o0 = ah->o1 > ah->o0 ? ah->o0 : s0, o1 = ah->o1 > ah->o0 ? ah->o1 : s1;
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
    if (ah->start >= 0) start = ah->start;
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
              const Ahead* ahead = nullptr, const Ahead* own = nullptr, int64_t pf_end = 0) {
  pf_end = std::max(pf_end, o1);  // W's rows prefetched up to pf_end (a chunk's call: the rest of the slice)
  const int64_t tiles = (T + RT - 1) / RT;
  constexpr int64_t AHEAD = PFL == 1 ? 2 * GO : GO;  // the rows of W between a row read and its prefetch (see above)
  const int64_t blocks = (o1 - o0 + GO - 1) / GO;
  AheadCursor next = AheadCursor::spread(ahead, blocks, g_ahead_start);  // the next routed module's pools
  AheadCursor mine = AheadCursor::spread(own, blocks, g_own_start);  // this call's own B^T rows
  for (int64_t o = o0, blk = 0; o < o1; o += GO, ++blk) {
    next.at(blk);
    mine.at(blk);
    const int64_t nw = std::min<int64_t>(GO, o1 - o);
    const int64_t nn = std::min<int64_t>(GO, std::max<int64_t>(0, pf_end - o - AHEAD));  // rows of the block prefetched
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
                  int64_t o1, const Ahead* ahead = nullptr, const Ahead* own = nullptr, int64_t pf_end = 0) {
  const auto *x = static_cast<const E*>(X), *w = static_cast<const E*>(W), *b = static_cast<const E*>(bias);
  auto* y = static_cast<E*>(Y);
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<E, float>) {  // AVX2: the tiles above
    if (T < 16) return dot_gemm<AVX2_GO, AVX2_RT, 1>(x, T, D, w, b, y, O, o0, o1, ahead, own, pf_end);  // (PFL: see dot_gemm)
    return dot_gemm<AVX2_GO, AVX2_RT, 3>(x, T, D, w, b, y, O, o0, o1, ahead, own, pf_end);
  }
#endif
  if (T < 16) return dot_gemm<6, 3, 1>(x, T, D, w, b, y, O, o0, o1, ahead, own, pf_end);
  dot_gemm<5, 5, 3>(x, T, D, w, b, y, O, o0, o1, ahead, own, pf_end);
}

}  // namespace
