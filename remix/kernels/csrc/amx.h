// The bfloat16 base GEMM on AMX tiles (Intel Sapphire Rapids and later; compiled where the build has AMX-BF16).
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "gemm.h"

namespace {

#ifdef __AVX512F__
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
#endif

#ifdef REMIX_AMX
// ---- bfloat16 GEMM on AMX tiles (Intel Sapphire Rapids and later): the base GEMM of a bfloat16 model where the CPU has
// AMX-BF16. Y^T = W X^T tile by tile, so W's rows load into tiles as they lie in memory (no packed copy of the weights):
// a W tile is 16 rows x 32 inputs, an X tile 16 pairs of inputs x 16 tokens (VNNI: each 32-bit element a pair of
// bfloat16 of one token), packed from X on every call (~1-5 us at a decode step's size). TDPBF16PS adds the products of
// each pair into float32 (Intel SDM: round to nearest even, denormals flushed; the SDM writes it as a sequential sum, but
// the hardware here rounds otherwise - 35 % of random outputs match that order, 43 % the exact sum rounded once: 44th
// session), one 32-input block after another: one order per output whatever the token count or split, so a row's
// outputs are bit-identical alone or in any batch. The float32 tile is transposed in registers, the bias added, one
// rounding to bfloat16 (vcvtneps2bf16).
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

// X [T, D] bfloat16 -> tiles of 16 pairs x 16 tokens (tokens past T zero), tile (kb, tb) at Xp + (kb TB + tb) 256: the
// two token blocks a step of the kernel reads lie side by side.
// rows (optional): packed row t is X's row rows[t] (a gather), else row t.
void amx_pack_x(const uint16_t* X, int64_t T, int64_t D, uint32_t* Xp, const int64_t* rows = nullptr) {
  const int64_t KB = D / 32, TB = (T + 15) / 16;
  for (int64_t tb = 0; tb < TB; ++tb)
    for (int64_t kb = 0; kb < KB; ++kb) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t t = tb * 16 + i;
        r[i] = t < T ? _mm512_loadu_si512(X + (rows ? rows[t] : t) * D + kb * 32) : _mm512_setzero_si512();
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

// The ReMix delta's steps of a fused block (amx_gemm's dl): after W's, the same tiles += the block's rows of B^T's
// transpose (b0, b1: 16 rows each, NRP columns) x the packed dense U of the token blocks (up: packed as X is), for each
// block of 32 of U's columns that any token of the block pair uses (nz[ku]).
struct AmxDelta {
  const uint16_t* btt;  // [O, NRP] bfloat16: B^T's transpose, columns past the pools' N r zero
  int64_t NRP;  // a multiple of 32
  const uint32_t* up;  // U [T, NRP] rounded to bfloat16, packed by amx_pack_x
  const char* nz;  // [KU x ceil(TB / 2)]: whether token blocks 2 j, 2 j + 1 use U's columns [32 ku, 32 ku + 32)
};

// One 32-input step of a block: tiles 0-3 += the 16-row tiles a0 (and a1) at a row stride of lda bytes x the packed
// token block xb (and the next one, xb + 256): 0 = a0 x xb, 1 = a1 x xb, 2 = a0 x xb', 3 = a1 x xb'.
template <bool TWO_T, bool TWO_W>
inline void amx_step(const uint16_t* a0, const uint16_t* a1, int64_t lda, const uint32_t* xb) {
  _tile_loadd(4, a0, lda);
  if constexpr (TWO_W) _tile_loadd(5, a1, lda);
  _tile_loadd(6, xb, 64);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (TWO_W) _tile_dpbf16ps(1, 5, 6);
  if constexpr (TWO_T) {
    _tile_loadd(7, xb + 256, 64);
    _tile_dpbf16ps(2, 4, 7);
    if constexpr (TWO_W) _tile_dpbf16ps(3, 5, 7);
  }
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
                      const uint16_t* pf, int64_t npf, const AmxDelta* dl = nullptr, int64_t o = 0, int64_t tb = 0) {
  _tile_zero(0);
  if constexpr (TWO_W) _tile_zero(1);
  if constexpr (TWO_T) { _tile_zero(2); _tile_zero(3); }
  for (int64_t kb = 0; kb < KB; ++kb) {
    for (int64_t p = 0; p < npf; ++p) _mm_prefetch(reinterpret_cast<const char*>(pf + p * D + kb * 32), _MM_HINT_T1);
    amx_step<TWO_T, TWO_W>(w0 + kb * 32, w1 + kb * 32, D * 2, xp + kb * TB * 256);
  }
  if (!dl) return;
  const int64_t KU = dl->NRP / 32, pairs = (TB + 1) / 2;
  const uint16_t* b0 = dl->btt + o * dl->NRP;
  for (int64_t ku = 0; ku < KU; ++ku)
    if (dl->nz[ku * pairs + tb / 2])
      amx_step<TWO_T, TWO_W>(b0 + ku * 32, b0 + 16 * dl->NRP + ku * 32, dl->NRP * 2, dl->up + (ku * TB + tb) * 256);
}
// amx_block for one or two token blocks (two_t) and W tiles (two_w) chosen at run time.
inline void amx_block_any(bool two_t, bool two_w, const uint16_t* w0, const uint16_t* w1, const uint32_t* xp, int64_t KB,
                          int64_t TB, int64_t D, const uint16_t* pf, int64_t npf, const AmxDelta* dl = nullptr,
                          int64_t o = 0, int64_t tb = 0) {
  if (two_t && two_w) amx_block<true, true>(w0, w1, xp, KB, TB, D, pf, npf, dl, o, tb);
  else if (two_t) amx_block<true, false>(w0, w1, xp, KB, TB, D, pf, npf, dl, o, tb);
  else if (two_w) amx_block<false, true>(w0, w1, xp, KB, TB, D, pf, npf, dl, o, tb);
  else amx_block<false, false>(w0, w1, xp, KB, TB, D, pf, npf, dl, o, tb);
}

// Y[:, o0:o1) = X W[o0:o1)^T (+ bias) on this thread, o0 and o1 multiples of 16 (amx_shape), bfloat16 throughout: blocks
// of 32 rows of W, each against the tokens 32 at a time (beyond 32 tokens the block is read again, from L2); up to 16
// tokens, blocks of 16 rows (one W tile a step: half the rows streaming at once, each output's tile and its order of
// sums the same). All linears of a decode step, both block heights in turn in one process (twenty-fourth session's
// Intel VM, medians of 15 rounds): 16 rows 0.95 / 0.92 / 0.97 / 1.00 of 32 rows' time at 1 / 4 / 8 / 16 tokens (12.5
// -> 12.0 ms at one), a one-sequence decode step 15.4 -> 14.5 ms, at eight 0.98; from 17 tokens (two token blocks,
// where each W tile serves both) 0.96-1.01, not taken.
// X [T, D] packed (amx_pack_x) into this thread's buffer (each thread packs all of X for itself: no barrier), kept
// between calls; valid until this thread's next call.
// rows: as amx_pack_x's (T rows gathered), or null.
const uint32_t* amx_pack_here(const uint16_t* X, int64_t T, int64_t D, const int64_t* rows = nullptr) {
  const int64_t need = (D / 32) * ((T + 15) / 16) * 256;
  thread_local Scratch packed;
  thread_local int64_t packed_cap = 0;
  if (need > packed_cap) { packed = scratch(need); packed_cap = need; }
  uint32_t* xp = reinterpret_cast<uint32_t*>(packed.get());
  amx_pack_x(X, T, D, xp, rows);
  return xp;
}

// xp: X already packed by this thread (amx_pack_here, e.g. for phase A on tiles), or null: packed here.
// dl (a fused call's ReMix delta, run_fused): its steps added to each tile before the rounding.
void amx_gemm(const uint16_t* X, int64_t T, int64_t D, const uint16_t* W, const uint16_t* bias, uint16_t* Y, int64_t O,
              int64_t o0, int64_t o1, const uint32_t* xp = nullptr, const AmxDelta* dl = nullptr) {
  const int64_t KB = D / 32, TB = (T + 15) / 16;
  if (!xp) xp = amx_pack_here(X, T, D);
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
      amx_block_any(tb + 1 < TB, two, w0, w1, xb, KB, TB, D, pf, npf, dl, o, tb);
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

// ---- phase A on AMX tiles: U[p, :] = scale[p] * A[i] @ x[rows[p]] for every pair p of a bfloat16 call with bfloat16
// pools, as U^T = A X^T over the selected LoRAs' rows of A (loaded into tiles as they lie, 16 rows x 32 inputs, like W
// in amx_gemm) against X packed as amx_gemm packs it - so a call that runs both packs X once. Each tile of up to 16
// rows of A (one LoRA of rank <= 16, or two side by side where the first has its full rank r and 2 r <= 16; a rank
// above 16 in tiles of 16 rows) runs against every block of 16 tokens holding a token of its LoRAs' pairs: the tiles
// compute a LoRA's dot with every token of such a block (tens of ns a tile step), where the vdpbf16ps kernel ran one
// 512-bit instruction per 32 products of the pairs alone. One order per dot (TDPBF16PS: each pair of products into the
// float32 sum, 32-input block after block), whatever the tokens, their blocks or the thread: a token's U is the same
// alone or in any batch. Products exact, sums in float32, as the vdpbf16ps kernel (whose order differs).
// Measured (39th session, Intel VM of family 6 model 207; scripts/ab_modules.py: 90 bound FFN modules of the default
// base in bfloat16, n 8, k 2, r 8, the two paths in turn round by round, medians of 40-80 rounds, against their bare
// GEMMs): the adapter's cost at 32 rows, one adapter, 3.14 -> 2.69 ms and 3.17 -> 2.87 (four adapters 6.42 -> 6.25 in
// one run, 6.02 -> 6.69 in a noisier one); at 1 and 8 rows within +-0.07 ms either way. In the engine (scripts/
// ab_steps.py, steps alternating): the FFN projections of a 32-sequence step 16.38 -> 15.74 ms (one adapter) and
// 15.20 -> 14.92 (four), 8 and 1 sequences unchanged (10.80 -> 10.73, 9.51 -> 9.54). The pools' A rows are what
// it waits on: profiled, phase A's share of a pass fell by half, not by the tiles' 10x. From 64 rows (the token
// path) a tile of tokens of several adapters is packed by adapter (pos): with four adapters round-robin, the tiles
// against every block ran 128 / 512-row calls at 58.5 -> 61.1 / 158.4 -> 177.3 ms (90 modules) against vdpbf16ps; packed
// by adapter 43.4 -> 43.1 / 100.5 -> 96.4; contiguous runs of an adapter (prefill) 41.0 -> 39.7 at 128 rows; one
// adapter at 256 / 512 rows 54.0 -> 52.8 / 85.2 -> 83.7 (the VM's spells differ between these runs).
// g_amx_phase_a: off for A/B runs and tests (_amx_phase_a).
bool g_amx_phase_a = true;
// (Where phase A reads a bfloat16 x as it is - phase_a_reads_bf16: bfloat16 pools, g_phase_a_dot on - and D is whole
// blocks of 32 inputs; the choice depends on neither T nor the tokens, so every call of a module takes the same path.)
inline bool amx_phase_a(const Pools& pl, bool x_bf16) {
  return g_amx_phase_a && x_bf16 && phase_a_reads_bf16(pl) && pl.D % 32 == 0 && amx_ready();
}

// The row tiles of A over the LoRAs pr selects (the same list on every thread): rows [row0, row0 + m) covering LoRAs
// [i0, i1).
struct ATile { int64_t row0, m, i0, i1; };
inline std::vector<ATile> amx_a_tiles(const Pairs& pr, const Pools& pl) {
  std::vector<ATile> tiles;
  const int64_t r = pl.r;
  for (int64_t i = 0; i < pl.N; ++i) {
    const int64_t rk = pl.rank_of(i);
    if (pr.start[i + 1] == pr.start[i] || rk == 0) continue;  // (a rank-0 LoRA's U is never read)
    if (rk > 16) {
      for (int64_t c0 = 0; c0 < rk; c0 += 16) tiles.push_back({i * r + c0, std::min<int64_t>(16, rk - c0), i, i + 1});
      continue;
    }
    if (!tiles.empty()) {  // beside a full-rank neighbour alone in its tile: one tile of both
      ATile& last = tiles.back();
      if (last.i1 == i && last.i1 - last.i0 == 1 && last.m == r && r + rk <= 16) {
        last.m += rk;
        last.i1 = i + 1;
        continue;
      }
    }
    tiles.push_back({i * r, rk, i, i + 1});
  }
  return tiles;
}

// Phase A of this thread's share (h of nh) of the row tiles; xp: T rows of x packed (amx_pack_here) - the pairs' rows
// (tokens) in order, or where pos is given, token t at packed row pos[t] (a call's tokens gathered by adapter, so that
// an adapter's tiles meet only the blocks of its own tokens).
// Two row tiles of one height at a time where there are (tiles 0-1 and 6-7 accumulating, 2 and 5 holding A's rows):
// four independent sums a step, as amx_gemm's blocks, where one tile's two sums each waited on the last tile
// product; each output's products and order are the same (bit-identical, tested). 43rd session, Intel VM, 90 bound
// FFN modules (scripts/ab_modules.py, alternating, medians of 16-20 rounds): one adapter 256 / 512 rows 35.10 /
// 54.75 -> 34.39 / 53.47 ms and 60.75 -> 58.48 at 512 in a slower spell (bare 26.87 / 40.56), phase A's module clock
// at 512 rows 66.8 -> 55.4 us a thread; four adapters 512 rows 62.58 -> 61.37 and 56.98 -> 56.71, 256 rows 35.48 ->
// 36.14; 8 / 32 / 128 rows within 0.2 ms either way. g_phase_a_pair off: one at a time (A/B runs and tests).
bool g_phase_a_pair = true;
void phase_a_amx(const Pairs& pr, const Pools& pl, const uint32_t* xp, int64_t T, int64_t h, int64_t nh, float* U,
                 const int64_t* pos = nullptr, const Split& sp = Split{}) {
  const std::vector<ATile> tiles = amx_a_tiles(pr, pl);
  const int64_t nt = static_cast<int64_t>(tiles.size());
  const auto [u0, u1] = share_range(nt, h, nh, sp);  // (this thread's row tiles, at the split's shares)
  if (u1 <= u0) return;
  const int64_t D = pl.D, r = pl.r, KB = D / 32, TB = (T + 15) / 16;
  const uint16_t* A = static_cast<const uint16_t*>(pl.a);
  std::vector<char> need(2 * TB);
  alignas(64) float c[4][256];
  int64_t configured = 0;
  // each pair's rows of U from the float32 tile cb (U^T of token block tb + b, rows [row0, row0 + m)): a LoRA's pairs
  // lie in token order (pos keeps it), so each tile's LoRAs walk theirs once, block after block - each block had
  // scanned all of its LoRAs' pairs (43rd session, 90 modules alternating: one adapter 128 / 512 rows 21.53 / 52.09 ->
  // 20.22 / 50.93 ms, four 512 rows 59.04 -> 56.68; the same values written)
  // (a cursor set for each of the two tiles: the two row tiles of one LoRA of rank 32 share its pairs)
  std::vector<int64_t> curs[2] = {std::vector<int64_t>(pl.N), std::vector<int64_t>(pl.N)};
  const auto block_of = [&](int64_t p) { return (pos ? pos[pr.rows[p]] : pr.rows[p]) / 16; };
  const auto extract = [&](const ATile& tl, int which, int64_t tb, int b, const float* cb) {
    for (int64_t i = tl.i0; i < tl.i1; ++i) {
      const int64_t c0 = std::max<int64_t>(0, tl.row0 - i * r), c1 = std::min(pl.rank_of(i), tl.row0 + tl.m - i * r);
      int64_t& p = curs[which][i];
      while (p < pr.start[i + 1] && block_of(p) < tb + b) ++p;
      for (; p < pr.start[i + 1] && block_of(p) == tb + b; ++p) {
        const int64_t t = pos ? pos[pr.rows[p]] : pr.rows[p];
        const float* col = cb + (i * r - tl.row0) * 16 + t % 16;
        for (int64_t cc = c0; cc < c1; ++cc) U[p * r + cc] = col[cc * 16] * pr.scale[p];
      }
    }
  };
  for (int64_t u = u0; u < u1;) {
    const ATile& tl = tiles[u];
    // two row tiles of the same height at once where there are (four sums in flight: a tile product's latency no
    // longer holds up the next, as in amx_gemm's blocks); each tile's sums are the same either way
    const bool two = g_phase_a_pair && u + 1 < u1 && tiles[u + 1].m == tl.m;
    const ATile* t2 = two ? &tiles[u + 1] : nullptr;
    if (tl.m != configured) {  // tiles 0-1 (6-7): U^T of two token blocks; 2 (5): A's rows; 3-4: two blocks of packed X
      TileConfig cfg;
      for (int i = 0; i < 8; ++i) {
        const bool mrows = i < 3 || i >= 5;
        cfg.rows[i] = mrows ? static_cast<uint8_t>(tl.m) : 16;
        cfg.colsb[i] = 64;
      }
      _tile_loadconfig(&cfg);
      configured = tl.m;
    }
    // the token blocks each tile's pairs are in (need[which * TB + block]), and its cursors at its LoRAs' first pairs
    std::fill(need.begin(), need.end(), 0);
    const auto start = [&](const ATile& t, int which) {
      for (int64_t p = pr.start[t.i0]; p < pr.start[t.i1]; ++p) need[which * TB + block_of(p)] = 1;
      for (int64_t i = t.i0; i < t.i1; ++i) curs[which][i] = pr.start[i];
    };
    start(tl, 0);
    if (two) start(*t2, 1);
    const uint16_t* a = A + tl.row0 * D;
    const uint16_t* a2 = two ? A + t2->row0 * D : a;
    const int64_t un = u + (two ? 2 : 1);
    const ATile* next = un < u1 ? &tiles[un] : nullptr;  // its rows prefetched (into L2) during the first pass
    bool first = true;
    for (int64_t tb = 0; tb < TB; tb += 2) {
      const bool n0 = need[tb], n1 = tb + 1 < TB && need[tb + 1];
      const bool m0 = two && need[TB + tb], m1 = two && tb + 1 < TB && need[TB + tb + 1];
      if (!n0 && !n1 && !m0 && !m1) continue;
      _tile_zero(0);
      _tile_zero(1);
      if (two) {
        _tile_zero(6);
        _tile_zero(7);
      }
      for (int64_t kb = 0; kb < KB; ++kb) {
        if (first && next)
          for (int64_t q = 0; q < next->m; ++q)
            _mm_prefetch(reinterpret_cast<const char*>(A + (next->row0 + q) * D + kb * 32), _MM_HINT_T1);
        const uint32_t* xb = xp + (kb * TB + tb) * 256;
        if (n0 || m0) _tile_loadd(3, xb, 64);
        if (n1 || m1) _tile_loadd(4, xb + 256, 64);
        if (n0 || n1) _tile_loadd(2, a + kb * 32, D * 2);
        if (m0 || m1) _tile_loadd(5, a2 + kb * 32, D * 2);
        if (n0) _tile_dpbf16ps(0, 2, 3);
        if (n1) _tile_dpbf16ps(1, 2, 4);
        if (m0) _tile_dpbf16ps(6, 5, 3);
        if (m1) _tile_dpbf16ps(7, 5, 4);
      }
      first = false;
      if (n0) { _tile_stored(0, c[0], 64); extract(tl, 0, tb, 0, c[0]); }
      if (n1) { _tile_stored(1, c[1], 64); extract(tl, 0, tb, 1, c[1]); }
      if (m0) { _tile_stored(6, c[2], 64); extract(*t2, 1, tb, 0, c[2]); }
      if (m1) { _tile_stored(7, c[3], 64); extract(*t2, 1, tb, 1, c[3]); }
    }
    u = un;
  }
  _tile_release();
}
#endif  // REMIX_AMX

}  // namespace
