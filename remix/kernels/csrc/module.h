// One ReMix module call in one parallel region: run (base GEMM, routing, phase A, phase B; below 64 tokens the
// threads split the pools' reads, from 64 the tokens) and run_pair (an FFN's gate and up together, then silu * up).
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "base_gemm.h"

namespace {

constexpr int64_t SPLIT_POOLS_BELOW = 64;  // tokens: below, threads split the pools' reads instead of the tokens

// The module clock (scripts/module_stages.py; cpu_ext.module_clock): the nanoseconds each thread of run()'s region spent
// in each stage since the last read, and the calls they cover - what the 38th-41st sessions had measured with
// temporary builds. Off unless switched on (then ~8 reads of the clock a thread and call); each stage's time is taken
// from the end of the stage before it, so a thread's stages add up to its time in the region. Below SPLIT_POOLS_BELOW
// rows: route (and a float32 copy of bfloat16 x where phase A needs one), wait_1 (the barrier after it), pairs_pack
// (the top-k of routing by units, the pairs' sort, x packed for AMX tiles), phase_a, wait_2, gemm (the thread's
// slice of the base GEMM, where the call runs it), phase_b. From SPLIT_POOLS_BELOW: gemm and wait_1 (its barrier),
// then per token tile route, pairs_pack (with phase A's packing), phase_a, phase_b. A fused call (run_fused), per
// token tile: pairs_pack (x packed), route, phase_a, phase_b (U's dense rows, packed), gemm (with the delta's steps).
// Only time is read, no value changes.
constexpr int MODULE_STAGES = 7;  // in the order of MODULE_STAGES in remix/kernels/cpu_ext.py
enum ModuleStage { MS_ROUTE, MS_WAIT_1, MS_PAIRS_PACK, MS_PHASE_A, MS_WAIT_2, MS_GEMM, MS_PHASE_B };
constexpr int MODULE_CLOCK_THREADS = 16;  // threads past these are not timed
bool g_module_clock = false;
struct alignas(64) ModuleNs { double ns[MODULE_STAGES]; };  // (a cache line a thread)
ModuleNs g_module_ns[MODULE_CLOCK_THREADS];
int64_t g_module_calls = 0;
struct ModuleClock {
  const bool on;
  const int64_t h;
  std::chrono::steady_clock::time_point t;
  explicit ModuleClock(int64_t thread) : on(g_module_clock && thread < MODULE_CLOCK_THREADS), h(thread),
      t(on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{}) {}
  void lap(ModuleStage s) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    g_module_ns[h].ns[s] += std::chrono::duration<double, std::nano>(now - t).count();
    t = now;
  }
};

// Optionally route (rt non-null: fills sel/w), then gather, for x [T, D] and y [T, O] (float32 or bfloat16), in place.
//   T >= SPLIT_POOLS_BELOW: each thread routes and gathers its own contiguous share of the tokens (no barrier).
//   Fewer tokens: the pools' reads dominate and every thread would read all of them, so the threads split the work
//   instead: route a share of the tokens | phase A over a share of the LoRA blocks (on AMX tiles: of A's row tiles) |
//   phase B over a share of the outputs (each boundary a multiple of 2L), with a barrier between the stages.
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

// Phase B by chunks (float32, AVX-512): from g_chunk_b_from rows (below SPLIT_POOLS_BELOW), a thread takes its slice of
// the outputs in chunks of g_chunk_b (a multiple of 2L, so phase B's vector slices and sums are the slice's, and of the
// 5 x 5 tile's 5 rows of W, so no chunk ends in a part-filled block): the chunk's GEMM (its prefetches of W running on
// to the slice's end; the next chunk's B^T rows of the selected LoRAs prefetched over its blocks, the first chunk's own
// too), then the chunk's phase B with its y and B^T rows in L1 / L2 - instead of the whole slice's GEMM, then phase B
// reading ~200 KB of B^T cold. The same values (the GEMM's outputs do not depend on the call's other outputs, nor phase
// B's on the split of the columns). The float32 5 x 5 tiles are compute-bound from ~16 rows: the B^T lines come in
// while the FMAs run. What it buys hangs on the memory's load. 90 bound modules (n 8, k 2, r 8), variants alternating
// round by round in one process, medians of 40 rounds (37th session, Zen 4 VM; a /tmp script): in a busy spell, chunks
// of 128, 576 -> 1536 / 1536 -> 576 at 32 rows 411.6 / 389.0 -> 385.6 / 376.5 us (base 344.6 / 326.2: the delta 67 /
// 63 -> 41 / 50), 397.5 / 379.0 -> 386.7 / 367.0 in the other order, 24 rows 312.1 / 302.3 -> 305.1 / 297.0, 40 rows
// 491.0 / 451.9 -> 478.6 / 446.0; in a quiet spell an hour later (the delta without chunks 30 / 37 us) 128 cost 4-7 us,
// 160 nothing (32 rows 368.8 / 357.2 -> 370.4 / 355.6, 24 rows 285.2 / 283.9 -> 282.9 / 282.9). Not kept: 16 rows
// (226.5 / 239.7 -> 234.0 / 242.7), bfloat16 (8 / 32 rows 81.8 / 227.6 -> 84.8 / 229.7 us for 576 -> 1536: its phase B
// already goes by YBLOCK blocks of a float32 copy), the AVX2 build's 3 x 2 tiles (16 / 32 / 48 rows 1-5 us slower);
// the first chunk's GEMM before phase A, prefetching phase A's rows of A (no better). (A/B runs and tests: _chunk_b.)
#ifdef __AVX512F__
int64_t g_chunk_b = pool_prefetch_pays() ? 160 : 0;  // (off on Intel CPUs: see pool_prefetch_pays)
#else
int64_t g_chunk_b = 0;
#endif
int64_t g_chunk_b_from = 24;

// Whether the calling thread runs a decode stack's layers with its Ahead on (each routed module's pools of the slots
// worth it prefetched during the GEMM before it): set by DecodeStack::run, read by run() before its region.
thread_local bool t_stack_ahead = false;

// The Ahead of the B^T rows of the selected LoRAs of pr (skip[i]: leave LoRA i out, where given).
Ahead selected_bt(const Pairs& pr, const Pools& pl, const std::vector<char>* skip = nullptr) {
  Ahead mine;
  for (int64_t i = 0; i < pl.N; ++i)
    if (pr.start[i + 1] > pr.start[i] && !(skip && (*skip)[i])) {
      if (!mine.ranges.empty() && mine.ranges.back().second == i) mine.ranges.back().second = i + 1;
      else mine.ranges.emplace_back(i, i + 1);
    }
  mine.pl = pl;
  mine.bt_only = true;
  return mine;
}

// The Ahead of a small call's own selected LoRAs (pr) for g_own_bt: their B^T rows, less, where the decode stack has
// prefetched this module's pools (stack_ahead), the LoRAs of the slots it took whole (tokens x k >= g_ahead_cover x n).
Ahead own_ahead(const Pairs& pr, const Pools& pl, const Routing* rt, int64_t T, bool stack_ahead) {
  if (pr.size() == 0 || T >= OWN_BT_BELOW) return Ahead{};
  if (!rt || !stack_ahead) return selected_bt(pr, pl);  // (nothing prefetched whole)
  std::vector<char> whole(pl.N, 0);
  std::vector<int64_t> count(rt->S, 0);
  for (int64_t t = 0; t < T; ++t)
    if (const int64_t sl = routed_slot(*rt, t); sl >= 0) ++count[sl];
  for (int64_t sl = 0; sl < rt->S; ++sl)
    if (whole_slot(count[sl], rt->k[sl], rt->n[sl]))
      for (int64_t i = std::max<int64_t>(0, rt->off[sl]); i < std::min(pl.N, rt->off[sl] + rt->n[sl]); ++i) whole[i] = 1;
  return selected_bt(pr, pl, &whole);
}

// Where every routed token of a call sits in a one-LoRA slot (skips_routing: a plain LoRA's), writes their selections
// (topk_token's) into sel / w [T, k] and returns true: the call then needs no routing stage, nor the barrier after it
// (run / run_pair take sel as given). g_trivial_route off: the routing stage as for any pool (A/B runs, tests).
// A peft LoRA on all seven projections (scripts/ab_steps.py --peft, alternating, two runs in both orders; 37th session,
// Zen 4 VM, bfloat16): steps 11.87 -> 11.73 / 11.77 -> 11.62 ms at one sequence, 16.10 -> 15.92 / 14.00 -> 13.89 at 8,
// the projections 31.69 -> 31.22 / 26.49 -> 26.27 at 32.
bool g_trivial_route = true;
inline bool route_trivially(const Routing& rt, int64_t T, int64_t* sel, float* w) {
  if (!g_trivial_route) return false;
  for (int64_t t = 0; t < T; ++t)
    if (const int64_t s = routed_slot(rt, t); s >= 0 && !skips_routing(rt, s)) return false;
  for (int64_t t = 0; t < T; ++t)
    if (const int64_t s = routed_slot(rt, t); s >= 0) topk_token(nullptr, t, s, rt, sel, w);
  return true;
}

#ifdef REMIX_AMX
// ---- The fused form of a large bfloat16 call on AMX (run_fused): the ReMix delta inside the base GEMM's tiles.
// From g_fuse_from rows (not in batch-invariant mode), each thread takes a contiguous share of the tokens, in tiles of
// up to TILE_BF16: routes them, sorts the pairs, packs x once (amx_pack_here) for both phase A (phase_a_amx) and the
// GEMM, writes each token's U (its pairs' rows, scaled) into a dense row of N r columns rounded to bfloat16 (the other
// LoRAs' columns zero), packs it as x is packed, and runs amx_gemm over every output with the delta's steps appended
// to each tile's: y = round(x W^T + U B^T (+ bias)), one rounding, every sum in float32 - where the small-batch path
// rounds x W^T to bfloat16, adds the float32 delta (U unrounded) and rounds again. A token's outputs depend on no other
// token (tiles skip a block of U's columns only where no token of the block pair uses it: the skipped products are
// zeros), but not the same as a small call's: as oneDNN's GEMM (which these calls took) rounds differently too.
// What goes: phase B (y's widening, the FMAs, the rounding back: ~170 us a thread of a 512-row call), x packed twice
// (oneDNN's reorder, then phase A's tiles'); what comes: the delta's steps (N r / D more tile steps: +4-11 % of the
// GEMM's with one adapter). From 128 rows, where these calls had taken oneDNN's GEMM (DOT_BF16_BELOW), so a decode
// step of up to 127 sequences still computes every row as batch-invariant mode does. scripts/ab_modules.py (90 bound
// FFN modules of the default base, n 8, k 2, r 8; 42nd session, Intel VM, the two alternating, medians of 12 rounds):
// one adapter 128 / 256 / 512 rows 29.6 / 47.6 / 72.7 -> 23.6 / 35.5 / 59.7 ms (bare GEMMs 20.0 / 30.6 / 44.2), four
// adapters 34.1 / 54.0 / 78.9 -> 26.4 / 40.2 / 66.4; at 64 rows (the GEMM by output slices inside the region, then
// phase B by token tiles) 14.7 -> 15.1 with one, 18.6 -> 18.2 with four. At decode sizes (the small-batch path's
// slices with the delta's steps) 8 rows 6.30 -> 6.68 (four adapters 7.94 -> 9.25: a token block of four adapters' tokens
// reads every adapter's B^T), 32 rows 10.02 -> 9.18 - and a decode step's rows must not round by the step's size.
// In the engine (32 prompts of 128 tokens, 128 new tokens each, one adapter, steps of the variants in turn): the
// prompt steps 1.47-1.57 -> 1.28-1.37 s a run (the bare base 1.29-1.31), engine over bare 0.881 -> 0.919.
int64_t g_fuse_from = 128;  // rows (A/B runs and tests: _fuse_from; 0: off)

inline bool fuse_applies(const Pools& pl, bool bf16, int64_t T) {
  return g_fuse_from > 0 && T >= std::max(g_fuse_from, SPLIT_POOLS_BELOW) && bf16 && pl.bf16 && !g_batch_invariant && amx_shape(pl.D, pl.O) &&
         amx_phase_a(pl, true) && pl.N * pl.r <= 1024;
}
inline int64_t fuse_cols(const Pools& pl) { return (pl.N * pl.r + 31) / 32 * 32; }
// The routers on tiles (fused_routers): each float32 row split into three bfloat16 rows whose sum is the row (the
// first rounded, then what it left, then what that left: 24 bits of significand in three 8-bit parts), router i's
// parts in rows 3 i, 3 i + 1, 3 i + 2 - so a slot's routers are 3 n rows in a row from 3 off - and 32 zero rows after
// (a slot's last tile reads up to 32 rows from its first). A token's logit is (p1 . x + p2 . x) + p3 . x, each product
// exact and each dot summed in float32 on the tiles: the float32 router's logit to float32's rounding, in another order
// than route_rows' (so a near-tie can fall the other way: fused calls round differently from small ones anyway).
// g_fuse_route: off keeps route_rows (A/B runs and tests: _fuse_route).
bool g_fuse_route = true;
// The LoRAs a slot may have for run_fused to route it on the tiles (its 3 n rows in two tiles): a token block's logits
// are computed for the slots of its tokens only, two token blocks a step where both have tokens of the slot. Every
// slot of a call must fit, else route_rows routes the call. (42nd session, every router's logit of every token, one
// tile set for the whole stack: one adapter 128 / 512 rows 18.31 / 49.33 -> 17.93 / 47.58 ms, 90 modules, bare 13.81
// / 36.83; four adapters, 96 rows, 21.54 / 52.59 against 22.01 / 53.76 - so four had stayed on route_rows. A dense
// phase A over every LoRA's rows on the same tiles, bit-identical to phase_a_amx's, gained nothing with one adapter,
// 47.97, and cost with four, 60.06: not kept.)
constexpr int64_t FUSE_ROUTE_LORAS = 10;
torch::Tensor fused_routers(const torch::Tensor& router) {
  const int64_t N = router.size(0);
  auto out = torch::zeros({3 * N + 32, router.size(1)}, torch::kBFloat16);
  auto parts = out.narrow(0, 0, 3 * N).view({N, 3, router.size(1)});
  auto rest = router.to(torch::kFloat32).clone();
  for (int64_t part = 0; part < 3; ++part) {
    auto p = rest.to(torch::kBFloat16);
    parts.select(1, part).copy_(p);
    rest = rest - p.to(torch::kFloat32);
  }
  return out;
}
// Whether run_fused routes these tables' slots on the tiles (each slot that routes has at most FUSE_ROUTE_LORAS).
inline bool tiles_route(const Routing& rt) {
  for (int64_t s = 0; s < rt.S; ++s)
    if (rt.n[s] > FUSE_ROUTE_LORAS && !skips_routing(rt, s)) return false;
  return true;
}
// run_fused's routing on the tiles for n tokens from c0 (x packed at xp; R: fused_routers): for each pair of token
// blocks, for each slot among their routed tokens, its routers' logits of the blocks that have its tokens, then the
// top k of those tokens within the slot, for the 16 tokens of a block at once (each lane the scalar loop's
// comparisons in its order: the logits the same sums, ties to the lower index, NaN never taken over a number).
// g_route_lanes off: token by token (topk_token; A/B runs and tests: _route_lanes). 43rd session's Intel VM, one
// adapter: a 512-row call's routing 38.6 -> 20.3 us a thread (module clock; the logits had gone out token-major by a
// scalar transpose, each token taking its top k alone), 90 bound modules at 128 / 256 / 512 rows 23.69 / 32.80 /
// 53.42 -> 22.13 / 31.64 / 51.78 ms (bare 18.24 / 25.27 / 39.95; scripts/ab_modules.py, alternating, 20 rounds).
bool g_route_lanes = true;
std::atomic<int64_t> g_route_tiles_calls{0};  // calls of route_tiles since the last read (tests: _route_tiles_calls)
void route_tiles(const uint16_t* R, const uint32_t* xp, int64_t n, int64_t D, int64_t c0, const Routing& rt,
                 int64_t* sel, float* w) {
  ++g_route_tiles_calls;
  const int64_t KB = D / 32, TB = (n + 15) / 16;
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  _tile_loadconfig(&cfg);
  alignas(64) float c[4][256];
  alignas(64) int32_t bj[16];
  float one[FUSE_ROUTE_LORAS];
  std::vector<int64_t> slots;
  for (int64_t tb = 0; tb < TB; tb += 2) {
    const int64_t tn = std::min<int64_t>(32, n - tb * 16), t0 = c0 + tb * 16;
    slots.clear();
    for (int64_t q = 0; q < tn; ++q) {
      const int64_t sl = routed_slot(rt, t0 + q);
      if (sl < 0) continue;
      if (skips_routing(rt, sl)) {
        topk_token(nullptr, t0 + q, sl, rt, sel, w);
        continue;
      }
      if (std::find(slots.begin(), slots.end(), sl) == slots.end()) slots.push_back(sl);
    }
    for (const int64_t sl : slots) {
      __mmask16 lanes[2] = {0, 0};  // the block's tokens of this slot
      for (int64_t q = 0; q < tn; ++q)
        if (routed_slot(rt, t0 + q) == sl) lanes[q / 16] |= static_cast<__mmask16>(1u << (q % 16));
      const int64_t o = rt.off[sl], ns = rt.n[sl], ks = rt.k[sl];
      const bool two_r = 3 * ns > 16, both = lanes[0] && lanes[1];
      const uint16_t* r0 = R + 3 * o * D;
      const int b0 = lanes[0] ? 0 : 1;  // the first block with the slot's tokens
      amx_block_any(both, two_r, r0, r0 + (two_r ? 16 : 0) * D, xp + (tb + b0) * 256, KB, TB, D, nullptr, 0);
      _tile_stored(0, c[0], 64);
      if (two_r) _tile_stored(1, c[1], 64);
      if (both) _tile_stored(2, c[2], 64);
      if (two_r && both) _tile_stored(3, c[3], 64);
      for (int b = b0; b < 2; ++b) {
        if (!lanes[b]) continue;
        const int tile = both ? 2 * b : 0;  // (c[0..1]: the first block computed, c[2..3]: the second)
        const auto row = [&](int64_t j) { return (j < 16 ? c[tile] : c[tile + 1]) + (j % 16) * 16; };
        const int64_t tq = tb * 16 + b * 16;  // the block's first token (of the n)
        if (!g_route_lanes) {
          for (int64_t q = 0; q < 16; ++q) {
            if (!((lanes[b] >> q) & 1)) continue;
            for (int64_t i = 0; i < ns; ++i) one[i] = (row(3 * i)[q] + row(3 * i + 1)[q]) + row(3 * i + 2)[q];
            topk_token(one, c0 + tq + q, sl, rt, sel, w);
          }
          continue;
        }
        __m512 li[FUSE_ROUTE_LORAS];
        for (int64_t i = 0; i < ns; ++i)
          li[i] = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(row(3 * i)), _mm512_load_ps(row(3 * i + 1))),
                                _mm512_load_ps(row(3 * i + 2)));
        __m512i taken = _mm512_setzero_si512();
        for (int64_t j = 0; j < ks; ++j) {
          __m512i best = _mm512_set1_epi32(-1);
          __m512 value = _mm512_setzero_ps();
          for (int64_t i = 0; i < ns; ++i) {
            const __mmask16 avail = _mm512_testn_epi32_mask(taken, _mm512_set1_epi32(1 << i));
            const __mmask16 none = _mm512_cmplt_epi32_mask(best, _mm512_setzero_si512());
            const __mmask16 gt = _mm512_cmp_ps_mask(li[i], value, _CMP_GT_OQ);
            const __mmask16 take = avail & (none | gt);
            best = _mm512_mask_mov_epi32(best, take, _mm512_set1_epi32(static_cast<int>(i)));
            value = _mm512_mask_mov_ps(value, take, li[i]);
          }
          taken = _mm512_or_si512(taken, _mm512_sllv_epi32(_mm512_set1_epi32(1), best));
          _mm512_store_si512(bj, best);
          for (int64_t q = 0; q < 16; ++q) {
            if (!((lanes[b] >> q) & 1)) continue;
            const int64_t t = c0 + tq + q;
            sel[t * rt.kmax + j] = o + bj[q];
            w[t * rt.kmax + j] = rt.omega[sl];
          }
        }
      }
    }
  }
  _tile_release();
}

// B^T [N r, O] (bfloat16) -> its transpose [O, fuse_cols], the columns past N r zero: the delta's rows for amx_gemm
torch::Tensor fused_btt(const torch::Tensor& bt, const Pools& pl) {
  auto t = torch::zeros({pl.O, fuse_cols(pl)}, torch::kBFloat16);
  t.narrow(1, 0, pl.N * pl.r).copy_(bt.t());
  return t;
}

// The delta's operands of a fused GEMM over n tokens: each token's U (pairs' rows of r in pr's order) rounded to
// bfloat16 into a dense row of fuse_cols(pl) columns (zeros where the token has no pair), packed as amx_gemm packs x,
// and which blocks of 32 columns each pair of token blocks uses. (A token's selections are distinct - routing's top-k
// - so each of its pairs writes columns of its own.)
struct FusedU {
  std::vector<uint16_t> ud;
  std::vector<char> nz;
  Scratch up;
  int64_t cap = 0;
  AmxDelta dl{nullptr, 0, nullptr, nullptr};
  const AmxDelta* make(const Pairs& pr, const Pools& pl, const float* U, int64_t n, const uint16_t* btt) {
    const int64_t r = pl.r, NRP = fuse_cols(pl), KU = NRP / 32, tbn = (n + 15) / 16, pairs = (tbn + 1) / 2;
    if (pr.size() == 0) return nullptr;
    ud.assign(n * NRP, 0);
    nz.assign(KU * pairs, 0);
    for (int64_t i = 0; i < pl.N; ++i) {
      const int64_t rk = pl.rank_of(i);
      if (rk == 0) continue;
      for (int64_t p = pr.start[i]; p < pr.start[i + 1]; ++p) {
        const int64_t t = pr.rows[p];
        narrow(U + p * r, ud.data() + t * NRP + i * r, rk);
        for (int64_t ku = i * r / 32; ku <= (i * r + rk - 1) / 32; ++ku) nz[ku * pairs + t / 32] = 1;
      }
    }
    const int64_t need = KU * tbn * 256;
    if (need > cap) { up = scratch(need); cap = need; }
    amx_pack_x(ud.data(), n, NRP, reinterpret_cast<uint32_t*>(up.get()));
    dl = AmxDelta{btt, NRP, reinterpret_cast<const uint32_t*>(up.get()), nz.data()};
    return &dl;
  }
};

// btt: [O, fuse_cols(pl)] bfloat16, B^T's transpose with zero columns past N r; W [O, D], bias [O] or null.
// rtt: the routers on tiles (fused_routers), or null: route_rows (also where a slot has more than FUSE_ROUTE_LORAS).
void run_fused(const uint16_t* xh, uint16_t* yh, int64_t T, const Pools& pl, const Routing* rt, int64_t* sel, float* w,
               int64_t k, const uint16_t* W, const uint16_t* bias, const uint16_t* btt, const uint16_t* rtt) {
  const int64_t D = pl.D, O = pl.O, r = pl.r;
  const int64_t TB = (T + 15) / 16;
  const int64_t P = region_threads(TB);
  const auto* xb = reinterpret_cast<const c10::BFloat16*>(xh);
  if (g_module_clock) ++g_module_calls;
#pragma omp parallel num_threads(P)
  {
    const auto [h, nh] = region_thread();
    ModuleClock clk(h);
    const int64_t t0 = std::min(T, TB * h / nh * 16), t1 = std::min(T, TB * (h + 1) / nh * 16);
    std::vector<float> U;
    FusedU fu;
    const bool tile_route = rtt && rt && tiles_route(*rt);
    for (int64_t c0 = t0; c0 < t1; c0 += TILE_BF16) {
      const int64_t c1 = std::min(t1, c0 + TILE_BF16), n = c1 - c0;
      const uint32_t* xp = amx_pack_here(xh + c0 * D, n, D);
      clk.lap(MS_PAIRS_PACK);
      if (tile_route) {  // each slot's routers' logits on the tiles, then its tokens' top k (route_tiles)
        route_tiles(rtt, xp, n, D, c0, *rt, sel, w);
      } else if (rt) {
        route_rows(xb, 0, D, c0, c1, *rt, sel, w);
      }
      clk.lap(MS_ROUTE);
      const Pairs pr(sel + c0 * k, w + c0 * k, n, k, pl.N);
      if (pr.size() > 0) {
        U.resize(pr.size() * r);
        phase_a_amx(pr, pl, xp, n, 0, 1, U.data());
      }
      clk.lap(MS_PHASE_A);
      const AmxDelta* dl = fu.make(pr, pl, U.data(), n, btt);
      clk.lap(MS_PHASE_B);
      amx_gemm(xh + c0 * D, n, D, W, bias, yh + c0 * O, O, 0, O, xp, dl);
      clk.lap(MS_GEMM);
    }
  }
}
#endif

void run(const torch::Tensor& x, torch::Tensor& y, const Pools& pl, const Routing* rt, int64_t* sel, float* w, int64_t k,
         const BaseGemm& gemm = {nullptr, nullptr}) {
  run(x.data_ptr(), y.data_ptr(), x.size(0), x.scalar_type() == torch::kBFloat16, pl, rt, sel, w, k, gemm);
}
// The same on x [T, D] and y [T, O] given as pointers (contiguous, both bfloat16 where bf16, else float32).
void run(const void* xv, void* yv, int64_t T, bool bf16, const Pools& pl, const Routing* rt, int64_t* sel, float* w,
         int64_t k, const BaseGemm& gemm) {
  const int64_t D = pl.D, O = pl.O;
  TORCH_CHECK(!gemm.on() || gemm.bf16 == bf16, "the fused base GEMM's dtype must be x's");
#ifdef REMIX_AMX
  if (gemm.btt)
    return run_fused(static_cast<const uint16_t*>(xv), static_cast<uint16_t*>(yv), T, pl, rt, sel, w, k,
                     static_cast<const uint16_t*>(gemm.w), static_cast<const uint16_t*>(gemm.bias), gemm.btt,
                     g_fuse_route ? gemm.rtt : nullptr);
#endif
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
#ifdef REMIX_AMX
  const bool amx_a = amx_phase_a(pl, bf16);  // phase A on AMX tiles (phase_a_amx; x read as it is: no copy_x)
#endif
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
  auto token_share = [&](int64_t t0, int64_t t1, ModuleClock& clk) {
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
    std::vector<int64_t> start, order, pos;  // (AMX phase A of several adapters' tokens: packed by adapter)
    for (int64_t c0 = t0; c0 < t1; c0 += C) {
      const int64_t c1 = std::min(c0 + C, t1);
      if (copy_x) widen_x(c0, c1, xc.get(), c0);
      const float* xt = copy_x ? xc.get() : bf16 ? nullptr : X + c0 * D;  // the tile's first row (float32 x)
      if (rt && !copy_x && bf16) route_rows(xb, 0, D, c0, c1, *rt, sel, w);
      else if (rt) route_rows(xt, c0, D, c0, c1, *rt, sel, w);
      clk.lap(MS_ROUTE);
      const Pairs pr(sel + c0 * k, w + c0 * k, c1 - c0, k, pl.N);
      if (pr.size() == 0) {
        clk.lap(MS_PAIRS_PACK);
        continue;
      }
      U.resize(pr.size() * pl.r);
      if (bf16)
        for (int64_t t = c0; t < c1; ++t) has[t - c0] = selected(t);
#ifdef REMIX_AMX
      if (amx_a && slots > 1) {  // the tile's tokens packed by adapter (tokens_by_slot: each adapter's LoRAs then meet
        // the blocks of its own tokens, not every block of a round-robin mix); tokens with no selection left out
        tokens_by_slot(*rt, c0, c1, start, order);  // (slots > 1: a slot map; a token with a selection is routed)
        order.erase(std::remove_if(order.begin(), order.end(), [&](int64_t t) { return !has[t - c0]; }), order.end());
        pos.assign(c1 - c0, 0);
        for (size_t q = 0; q < order.size(); ++q) pos[order[q] - c0] = static_cast<int64_t>(q);
        for (int64_t& t : order) t -= c0;  // (rows of the tile's x)
        const uint32_t* xq = amx_pack_here(xh + c0 * D, static_cast<int64_t>(order.size()), D, order.data());
        clk.lap(MS_PAIRS_PACK);
        phase_a_amx(pr, pl, xq, static_cast<int64_t>(order.size()), 0, 1, U.data(), pos.data());
      } else if (amx_a) {
        const uint32_t* xq = amx_pack_here(xh + c0 * D, c1 - c0, D);
        clk.lap(MS_PAIRS_PACK);
        phase_a_amx(pr, pl, xq, c1 - c0, 0, 1, U.data());
      } else
#endif
      {
        clk.lap(MS_PAIRS_PACK);
        phase_a(pr, 0, pr.num_blocks(), xt, bf16 ? xh + c0 * D : nullptr, pl, U.data());
      }
      clk.lap(MS_PHASE_A);
      if (!bf16) phase_b(pr, pl, U.data(), Y + c0 * O, O, 0, 0, O, false);
      else phase_b_bf16(pr, pl, U.data(), yh + c0 * O, c1 - c0, has.data(), yb.get(), 0, O, false);
      clk.lap(MS_PHASE_B);
    }
  };
  if (g_module_clock) ++g_module_calls;  // (the calling thread, before any region)
  if (P <= 1) {
    ModuleClock clk(0);
    if (gemm.on()) gemm(gx, gy, T, D, O, 0, O);
    clk.lap(MS_GEMM);
    return token_share(0, T, clk);
  }
  if (T >= SPLIT_POOLS_BELOW) {
    const Split sp = gemm.on() ? split_for(P) : split_peek(P);  // (a region without a GEMM to time is not counted)
#pragma omp parallel num_threads(P)
    {
      const auto [h, nh] = region_thread();
      ModuleClock clk(h);
      if (gemm.on()) {  // the GEMM by output slices, then the gather by tokens
        const auto [o0, o1] = out_slice(O, h, nh, sp);
        split_gemm(h, nh, T, D, o0, o1, [&](int64_t a, int64_t b) { gemm(gx, gy, T, D, O, a, b); });
        clk.lap(MS_GEMM);
#pragma omp barrier
        clk.lap(MS_WAIT_1);
      }
      const auto [t0, t1] = share_range(T, h, nh, sp);
      token_share(t0, t1, clk);
    }
    return;
  }
  const Routing* const tables = rt;  // (own_ahead reads the slot tables whether or not the call routes)
  if (rt && route_trivially(*rt, T, sel, w)) rt = nullptr;
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
  const Split sp = gemm.on() ? split_for(P) : split_peek(P);  // (every stage's split: route, phase A, GEMM, phase B)
#pragma omp parallel num_threads(P)
  {
    const auto [h, nh] = region_thread();
    ModuleClock clk(h);
    std::vector<int64_t> own_sel;
    std::vector<float> own_w;
    {  // stage 1: widen and route a share of the tokens (or compute a share of the routers' logits)
      const auto [t0, t1] = share_range(T, h, nh, sp);
      if (copy_x && t1 > t0) widen_x(t0, t1, xbuf.get(), 0);
      if (units) {
        own_sel.assign(sel, sel + T * k);  // (read before the barrier, after which thread 0 writes sel)
        own_w.assign(w, w + T * k);
        const Frac f = share_frac(h, nh, sp);
        if (bf16) route_logits_share(xb, D, T, *rt, f.lo, f.hi, f.den, logits.get());
        else route_logits_share(X, D, T, *rt, f.lo, f.hi, f.den, logits.get());
      } else if (rt && t1 > t0) {
        if (bf16 && !copy_x) route_rows(xb, 0, D, t0, t1, *rt, sel, w);
        else route_rows(X, 0, D, t0, t1, *rt, sel, w);
      }
    }
    clk.lap(MS_ROUTE);
    if (rt || copy_x) {  // (the same for every thread)
#pragma omp barrier
    }
    clk.lap(MS_WAIT_1);
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
    const uint32_t* xp = nullptr;  // x packed for the tiles: phase A's, then the base GEMM's (AMX)
#ifdef REMIX_AMX
    if (gemm.amx || (amx_a && pr.size() > 0)) xp = amx_pack_here(xh, T, D);
#endif
    clk.lap(MS_PAIRS_PACK);
    if (pr.size() > 0) {  // the same for every thread: all of them meet the barrier, or none
#ifdef REMIX_AMX
      if (amx_a) phase_a_amx(pr, pl, xp, T, h, nh, U.get(), nullptr, sp);
      else
#endif
      {
        const auto [b0, b1] = share_range(nb, h, nh, sp);
        phase_a(pr, b0, b1, X, xh, pl, U.get());
      }
      clk.lap(MS_PHASE_A);
#pragma omp barrier
      clk.lap(MS_WAIT_2);
    }
    const auto [o0, o1] = out_slice(O, h, nh, sp);
    if (gemm.on() && !bf16 && g_chunk_b > 0 && T >= g_chunk_b_from && pr.size() > 0) {
      // by chunks (g_chunk_b, above): each chunk's GEMM, prefetching the next chunk's B^T rows of the selected LoRAs
      // (the first chunk's own too; g_own_bt off: none), then its phase B. All selected LoRAs, even a slot the decode
      // stack prefetched whole during the GEMM before: the slice's ~1.8 MB of W would have pushed those lines out
      Ahead next = selected_bt(pr, pl);
      next.start = 0;
      BaseGemm g = gemm;
      g.pf_end = o1;
      for (int64_t c0 = o0; c0 < o1; c0 += g_chunk_b) {
        const int64_t c1 = std::min(o1, c0 + g_chunk_b);
        next.o0 = c0 == o0 ? c0 : c1;
        next.o1 = std::min(o1, c1 + g_chunk_b);
        g.own = g_own_bt && next.o1 > next.o0 ? &next : nullptr;
        g.ahead = c0 == o0 ? gemm.ahead : nullptr;  // the decode stack's next module, over the first chunk's blocks
        split_gemm(h, nh, T, D, c0, c1, [&](int64_t a, int64_t b) { g(gx, gy, T, D, O, a, b); });
        clk.lap(MS_GEMM);
        phase_b_slice(pr, pl, U.get(), yv, T, bf16, sel, w, k, c0, c1);
        clk.lap(MS_PHASE_B);
      }
    } else {
      if (gemm.on()) {  // this thread's slice of the base output, updated by phase B next
        BaseGemm g = gemm;
        if (g.amx) g.xp = xp;
        const Ahead mine = g_own_bt ? own_ahead(pr, pl, tables, T, stack_ahead) : Ahead{};
        if (!mine.ranges.empty()) g.own = &mine;
        split_gemm(h, nh, T, D, o0, o1, [&](int64_t a, int64_t b) { g(gx, gy, T, D, O, a, b); });
      }
      clk.lap(MS_GEMM);
      phase_b_slice(pr, pl, U.get(), yv, T, bf16, sel, w, k, o0, o1);
      clk.lap(MS_PHASE_B);
    }
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
// which run_pair does not, and with four adapters few of a slot's LoRAs are picked) - so the pair ran up to 4 rows.
// 37th session: its two GEMMs prefetch their own selected LoRAs' B^T rows as run's do (g_pair_own_bt; the pair up to 8
// rows, without -> with: 8 sequences 15.06 -> 14.90 ms with one adapter, 17.42 -> 17.07 with four; 1 and 4 unchanged
// within 0.1), and with that the pair runs up to 8 rows (scripts/ab_steps.py, the pair against the two calls, three
// runs in both orders): 5 sequences 10.72 -> 10.41 / 13.24 -> 13.16 ms (one / four adapters), 6 sequences 14.30 ->
// 14.03 / 16.15 -> 16.02, 8 sequences 13.97 -> 13.81, 14.08 -> 13.82 and 17.81 -> 17.56 with one, 15.08 -> 15.03,
// 16.67 -> 16.38 and 19.00 -> 18.55 with four; at 12 mixed (one adapter 23.97 -> 24.21, four 25.68 -> 25.12).
int64_t g_fuse_pair_below = 9;
bool g_pair_own_bt = true;  // (A/B runs: _pair_own_bt)
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
#ifdef REMIX_AMX
  const bool amx_a = amx_phase_a(pa, bf16) && amx_phase_a(pb, bf16);
#endif
  const bool stack_ahead = t_stack_ahead;  // (thread-local: read on the calling thread)
  const Routing *const tables_a = ra, *const tables_b = rb;  // (for own_ahead, as in run)
  if (ra && route_trivially(*ra, T, sela, wa)) ra = nullptr;
  if (rb && route_trivially(*rb, T, selb, wb)) rb = nullptr;
  const Split sp = split_for(P);
#pragma omp parallel num_threads(P)
  {
    const auto [h, nh] = region_thread();
    // stage 1: the items (module, token), gate's tokens first, a share to each thread
    const auto [i0, i1] = share_range(2 * T, h, nh, sp);
    const auto route = [&](const Routing* rt, int64_t t0, int64_t t1, int64_t* sel, float* w) {
      if (!rt || t1 <= t0) return;
      if (bf16) route_rows(xb, 0, D, t0, t1, *rt, sel, w);
      else route_rows(X, 0, D, t0, t1, *rt, sel, w);
    };
    route(ra, std::min(i0, T), std::min(i1, T), sela, wa);
    route(rb, std::max(i0, T) - T, std::max(i1, T) - T, selb, wb);
    if (ra || rb) {  // (the same for every thread)
#pragma omp barrier
    }
    // every thread sorts the (few) pairs itself: same input, same order; phase A over both modules' blocks in turn
    const Pairs pra(sela, wa, T, k, pa.N), prb(selb, wb, T, k, pb.N);
    const int64_t na = pra.num_blocks(), nt = na + prb.num_blocks();
    const uint32_t* xp = nullptr;  // x packed once for the tiles: both modules' phase A, then both GEMMs (AMX)
#ifdef REMIX_AMX
    if (ga.amx || (amx_a && nt > 0)) xp = amx_pack_here(xh, T, D);
#endif
    if (nt > 0) {  // the same for every thread: all of them meet the barrier, or none
#ifdef REMIX_AMX
      if (amx_a) {
        phase_a_amx(pra, pa, xp, T, h, nh, Ua.get(), nullptr, sp);
        phase_a_amx(prb, pb, xp, T, h, nh, Ub.get(), nullptr, sp);
      } else
#endif
      {
        const auto [b0, b1] = share_range(nt, h, nh, sp);
        if (std::min(b1, na) > b0) phase_a(pra, b0, std::min(b1, na), X, xh, pa, Ua.get());
        if (b1 > std::max(b0, na)) phase_a(prb, std::max(b0, na) - na, b1 - na, X, xh, pb, Ub.get());
      }
#pragma omp barrier
    }
    const auto [o0, o1] = out_slice(O, h, nh, sp);
    // this thread's slices of both base outputs, each updated by its phase B next (each GEMM prefetching its own
    // selected LoRAs' B^T rows, as run's calls below OWN_BT_BELOW rows, where g_pair_own_bt)
    BaseGemm g1 = ga, g2 = gb;
    const Ahead own_a = g_own_bt && g_pair_own_bt ? own_ahead(pra, pa, tables_a, T, stack_ahead) : Ahead{};
    const Ahead own_b = g_own_bt && g_pair_own_bt ? own_ahead(prb, pb, tables_b, T, stack_ahead) : Ahead{};
    if (!own_a.ranges.empty()) g1.own = &own_a;
    if (!own_b.ranges.empty()) g2.own = &own_b;
    if (g1.amx) g1.xp = xp;
    if (g2.amx) g2.xp = xp;
    split_gemm(h, nh, T, D, o0, o1, [&](int64_t a, int64_t b) { g1(xv, ya, T, D, O, a, b); });
    phase_b_slice(pra, pa, Ua.get(), ya, T, bf16, sela, wa, k, o0, o1);
    split_gemm(h, nh, T, D, o0, o1, [&](int64_t a, int64_t b) { g2(xv, yb, T, D, O, a, b); });
    phase_b_slice(prb, pb, Ub.get(), yb, T, bf16, selb, wb, k, o0, o1);
    silu_mul_cols(ya, yb, T, O, o0, o1, bf16);
  }
}

}  // namespace
