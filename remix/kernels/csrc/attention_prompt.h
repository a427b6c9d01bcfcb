// Prompt tokens' attention: a prefill chunk's tokens, several of one cache row at a time - bfloat16 on AMX tiles where
// the CPU has AMX-BF16, else on AVX512-BF16 vectors of positions; float32 on vectors of positions (AVX-512 or AVX2).
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "amx.h"
#include "attention.h"

namespace {

// The decode kernels (attend_group, attend_group_bf16) take one token's query heads at a time: ~8 vector instructions
// for each query head and position it attends to, so a prompt's attention grows with its length squared - a
// 2048-token prompt of the default base spent 1.55 of its 2.0 s to the first token there in bfloat16, where Hugging
// Face's whole forward (SDPA) took 0.98 s, and 2.0 of its 4.2 s in float32, where Hugging Face's took 2.75.
// Here the tokens of one cache row are taken 16 / nrep at a time (a query tile: 16 rows of (token, query head) of one
// key/value head) against K (and, in bfloat16, V) packed once per cache row and key/value head for a thread.
// bfloat16 (prompt_attention, REMIX_DOT_BF16): K's 16 x 16 blocks of dimension pairs transposed, V's rows paired
// position by position. On AMX (prompt_scores_amx / prompt_values_amx) each tile's scores and weighted values are tile
// products: scores = Q K^T, 16 positions a tile product per 32 dimensions; then P V, 32 positions a step into one
// float32 tile per 16 dimensions. Without AMX (prompt_scores_vec / prompt_values_vec) the same products on vectors of
// 16 positions (scores: each query's dimension pairs broadcast against K's transposed pairs) and of 16 dimensions (P V:
// each row's weight pair broadcast against V's paired rows), each K and V vector read once for a group of rows. Either
// way the weights are the decode kernel's (each row's scores times scale, its max, exp and their float32 sum by
// softmax_pass over its own positions, the weights rounded to bfloat16), and the output is divided by the sum and
// rounded once. One order per row: a row's scores and weighted values are its own, and past its length its weights
// are zeros (products +-0 that add nothing), so a token's output does not depend on which tokens share its tile,
// chunk or step. It is not the decode kernel's order (float32 sums in another order), so only prompt tokens take it
// (runner.forward's prompt steps): a checked draft's tokens (speculative decoding) and every generated token keep the
// decode kernel, as does batch-invariant mode, where a prompt's positions must read what a decode step would have
// computed (the prefix cache holds generated positions too).
// float32 (prompt_attention_f32, REMIX_PROMPT_F32): the decode kernel's arithmetic, value for value, on vectors of
// positions instead of vectors of dimensions - its scores' lane sums and their tree (scores_tree), its softmax_pass,
// its P V (one chain of fused multiply-adds over the positions per output, from the cache's own V rows), its
// division - so every output is the decode kernel's bit for bit (tested), in both builds, and it needs none of the
// bfloat16 kernel's exceptions: batch-invariant mode takes it too (checked drafts stay on the decode path, where a few
// rows gain nothing).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define REMIX_PROMPT_F32 1
#endif
#if defined(REMIX_DOT_BF16) || defined(REMIX_PROMPT_F32)
bool g_prompt_tiles = true;  // A/B runs and tests: _prompt_tiles (off: prompt tokens take the decode kernel)
bool g_prompt_amx = true;  // A/B runs and tests: _prompt_amx (off: the vector form on a CPU with AMX too)
std::atomic<int64_t> g_prompt_tiles_calls{0};  // calls taken (tests: _prompt_tiles_calls)

static_assert(MAX_GROUP <= 16, "a query tile holds every query head of a key/value head (check_decode's limit)");
// bfloat16: head widths of whole AMX steps (32 dimensions), not in batch-invariant mode; float32: every width
// check_decode admits, in every mode (the decode kernel's bits).
inline bool prompt_tiles_apply(int64_t Dh, bool bf16 = true) {
  if (!bf16) return g_prompt_tiles;
  return g_prompt_tiles && !g_batch_invariant && (Dh == 32 || Dh == 64 || Dh == 128);
}

// The work of a prompt call: tiles of 16 / nrep consecutive rows of one cache row (a run of rows of one slot), each
// for every key/value head.
struct PromptTile { int64_t t0, t1, g; };
inline std::vector<PromptTile> prompt_tiles_of(const int64_t* slots, int64_t T, int64_t Hkv, int64_t nrep) {
  const int64_t TQ = 16 / nrep;
  std::vector<PromptTile> tiles;
  for (int64_t t0 = 0; t0 < T;) {
    int64_t t1 = t0 + 1;
    while (t1 < T && slots[t1] == slots[t0]) ++t1;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t a = t0; a < t1; a += TQ) tiles.push_back({a, std::min(t1, a + TQ), g});
    t0 = t1;
  }
  return tiles;
}

// One query tile as a thread takes it: its cache row, rows R (tokens x nrep), each row's length (0 past R), the longest.
struct TileRows { const PromptTile& tl; int64_t slot, R, len[16], lmax; };

// Thread h of nh's share of a prompt call's tiles, in turn (a row's later tiles are the longer ones). Before a tile whose
// cache row and key/value head this thread has not packed far enough, pack(slot, g, n) with n the longest its next
// tiles on this thread of that row and head need (their last rows, as positions rise along a run; where they do not, a
// later tile packs again); then tile(rows).
template <typename Pack, typename Tile>
inline void for_thread_tiles(const std::vector<PromptTile>& tiles, const int64_t* slots, const int64_t* lens,
                             int64_t nrep, int64_t P, int64_t h, int64_t nh, Pack&& pack, Tile&& tile) {
  const int64_t nt = static_cast<int64_t>(tiles.size());
  int64_t packed_slot = -1, packed_g = -1, packed_n = 0;
  for (int64_t w = h; w < nt; w += nh) {
    TileRows tr{tiles[w], slots[tiles[w].t0], (tiles[w].t1 - tiles[w].t0) * nrep, {}, 0};
    const int64_t g = tr.tl.g;
    for (int64_t rr = 0; rr < 16; ++rr) {
      tr.len[rr] = rr < tr.R ? lens[tr.tl.t0 + rr / nrep] : 0;
      tr.lmax = std::max(tr.lmax, tr.len[rr]);
    }
    if (tr.slot != packed_slot || g != packed_g || tr.lmax > packed_n) {
      int64_t need = tr.lmax;
      for (int64_t u = w + nh; u < nt && slots[tiles[u].t0] == tr.slot && tiles[u].g == g; u += nh)
        need = std::max(need, lens[tiles[u].t1 - 1]);
      need = std::min(need, P);
      pack(tr.slot, g, need);
      packed_slot = tr.slot, packed_g = g, packed_n = need;
    }
    tile(tr);
  }
}

#endif  // REMIX_DOT_BF16 || REMIX_PROMPT_F32

#ifdef REMIX_DOT_BF16
// One thread's packed K and V of one cache row and key/value head, positions [0, n): K as kb blocks of 16 positions x
// KS steps of 32 dimensions, each a B tile of 16 dimension pairs x 16 positions (VNNI); V as blocks of 32 positions x
// NS slices of 16 dimensions, each a B tile of 16 position pairs x 16 dimensions. Positions from n on are zeros.
template <int DH>
struct PackedKV {
  static constexpr int KS = DH / 32, NS = DH / 16;
  std::vector<uint32_t> k, v;
  void pack(const uint16_t* K, const uint16_t* V, int64_t n) {
    const int64_t nk = (n + 15) / 16, nv = (n + 31) / 32;
    if (static_cast<int64_t>(k.size()) < nk * KS * 256) k.resize(nk * KS * 256);
    if (static_cast<int64_t>(v.size()) < nv * NS * 256) v.resize(nv * NS * 256);
    for (int64_t b = 0; b < nk; ++b)
      for (int s = 0; s < KS; ++s) {
        __m512i r[16];
        for (int j = 0; j < 16; ++j)
          r[j] = b * 16 + j < n ? _mm512_loadu_si512(K + (b * 16 + j) * DH + s * 32) : _mm512_setzero_si512();
        transpose16(r);  // r[i] lane j: dimension pair i of position j
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(k.data() + (b * KS + s) * 256 + i * 16, r[i]);
      }
    for (int64_t b = 0; b < nv; ++b)
      for (int s = 0; s < NS; ++s)
        for (int i = 0; i < 16; ++i) {
          const int64_t p0 = b * 32 + 2 * i, p1 = p0 + 1;
          const auto row = [&](int64_t p) {
            return p < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(V + p * DH + s * 16)))
                         : _mm512_setzero_si512();
          };
          _mm512_storeu_si512(v.data() + (b * NS + s) * 256 + i * 16,
                              _mm512_or_si512(row(p0), _mm512_slli_epi32(row(p1), 16)));
        }
  }
};

#ifdef REMIX_AMX
// A query tile's scores on AMX (qb: its 16 rows of DH bfloat16), 16 positions a block, each block's sums in a fresh
// tile (tiles 0 and 1: two blocks at a time, each step of 32 dimensions of the query tile in tile 4 serving both), into
// sc (rows `wide` apart).
template <int DH>
void prompt_scores_amx(const uint16_t* qb, const PackedKV<DH>& kv, int64_t nk, float* sc, int64_t wide) {
  constexpr int KS = DH / 32;
  for (int64_t b = 0; b < nk; b += 2) {
    const bool two = b + 1 < nk;
    _tile_zero(0);
    if (two) _tile_zero(1);
    for (int s = 0; s < KS; ++s) {
      const uint32_t* k0 = kv.k.data() + (b * KS + s) * 256;
      _tile_loadd(4, qb + s * 32, DH * 2);
      _tile_loadd(5, k0, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (two) {
        _tile_loadd(6, k0 + KS * 256, 64);  // the next block's
        _tile_dpbf16ps(1, 4, 6);
      }
    }
    _tile_stored(0, sc + b * 16, wide * 4);
    if (two) _tile_stored(1, sc + (b + 1) * 16, wide * 4);
  }
}

// A query tile's P V on AMX (pw: its 16 rows of bfloat16 weights, `wide` apart, nv blocks of 32 positions): 32
// positions a step, 16 dimensions a tile (up to four at once), into ob [DH / 16][16 rows][16].
template <int DH>
void prompt_values_amx(const uint16_t* pw, const PackedKV<DH>& kv, int64_t nv, int64_t wide, float (*ob)[256]) {
  constexpr int NS = DH / 16;
  for (int s0 = 0; s0 < NS; s0 += 4) {
    const int ns = std::min(4, NS - s0);
    _tile_zero(0);
    if (ns > 1) _tile_zero(1);
    if (ns > 2) _tile_zero(2);
    if (ns > 3) _tile_zero(3);
    for (int64_t b = 0; b < nv; ++b) {
      _tile_loadd(4, pw + b * 32, wide * 2);
      const uint32_t* vb = kv.v.data() + (b * NS + s0) * 256;
      _tile_loadd(5, vb, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (ns > 1) { _tile_loadd(6, vb + 256, 64); _tile_dpbf16ps(1, 4, 6); }
      if (ns > 2) { _tile_loadd(7, vb + 512, 64); _tile_dpbf16ps(2, 4, 7); }
      if (ns > 3) { _tile_loadd(5, vb + 768, 64); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, ob[s0], 64);
    if (ns > 1) _tile_stored(1, ob[s0 + 1], 64);
    if (ns > 2) _tile_stored(2, ob[s0 + 2], 64);
    if (ns > 3) _tile_stored(3, ob[s0 + 3], 64);
  }
}
#endif  // REMIX_AMX

// The same scores on vectors: for each block of 16 positions, each row's dimension pairs broadcast against K's
// transposed pairs (vdpbf16ps, a pair's two products into each position's lane), rows eight at a time so that each K
// vector serves eight independent sums. All eight rows are summed (qb's rows past R are zeros; only R are stored): with
// a test of the row count inside the loop GCC had kept the eight sums on the stack, a store after every vdpbf16ps - a
// 512-token chunk at positions 1536-2048 took 14.0 ms there.
template <int DH>
void prompt_scores_vec(const uint16_t* qb, int64_t R, const PackedKV<DH>& kv, int64_t nk, float* sc, int64_t wide) {
  constexpr int KS = DH / 32;
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const int64_t nr = std::min<int64_t>(8, R - r0);
    for (int64_t b = 0; b < nk; ++b) {
      __m512 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
      for (int s = 0; s < KS; ++s) {
        const uint32_t* kt = kv.k.data() + (b * KS + s) * 256;
        for (int i = 0; i < 16; ++i) {
          const __m512bh kp = (__m512bh)_mm512_loadu_si512(kt + i * 16);
          for (int j = 0; j < 8; ++j) {
            uint32_t pair;
            std::memcpy(&pair, qb + (r0 + j) * DH + s * 32 + 2 * i, 4);
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)), kp);
          }
        }
      }
      for (int64_t j = 0; j < nr; ++j) _mm512_storeu_ps(sc + (r0 + j) * wide + b * 16, acc[j]);
    }
  }
}

// The same P V on vectors: rows RG at a time, each position pair's V vectors (16 dimensions a vector) read once for
// them, each row's weight pair broadcast.
template <int DH>
void prompt_values_vec(const uint16_t* pw, int64_t R, const PackedKV<DH>& kv, int64_t nv, int64_t wide, float (*ob)[256]) {
  constexpr int NS = DH / 16, RG = NS >= 8 ? 2 : NS >= 4 ? 4 : 8;  // RG x NS accumulators (at most 32)
  for (int64_t r0 = 0; r0 < R; r0 += RG) {
    const int64_t nr = std::min<int64_t>(RG, R - r0);
    __m512 acc[RG][NS];
    for (int j = 0; j < RG; ++j) for (int s = 0; s < NS; ++s) acc[j][s] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nv; ++b)
      for (int i = 0; i < 16; ++i) {  // positions 32 b + 2 i and + 1
        __m512bh vp[NS];
        for (int s = 0; s < NS; ++s) vp[s] = (__m512bh)_mm512_loadu_si512(kv.v.data() + (b * NS + s) * 256 + i * 16);
        for (int j = 0; j < RG; ++j) {
          if (j >= nr) break;
          uint32_t pair;
          std::memcpy(&pair, pw + (r0 + j) * wide + b * 32 + 2 * i, 4);
          const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
          for (int s = 0; s < NS; ++s) acc[j][s] = _mm512_dpbf16_ps(acc[j][s], p, vp[s]);
        }
      }
    for (int64_t j = 0; j < nr; ++j)
      for (int s = 0; s < NS; ++s) _mm512_storeu_ps(ob[s] + (r0 + j) * 16, acc[j][s]);
  }
}

// out [T, Hkv, nrep, DH] bfloat16 = attention of query rows q (row t at q + t q_row, its Hkv nrep heads DH apart) over
// K, V [S, Hkv, P, DH] bfloat16: row t reads cache row slots[t]'s first lens[t] positions (as slot_attention). AMX: on
// tiles (prompt_scores_amx / prompt_values_amx), else on vectors.
template <int DH, bool AMX>
void prompt_attention(const uint16_t* q, int64_t q_row, const uint16_t* K, const uint16_t* V, int64_t Hkv, int64_t P,
                      const int64_t* lens, const int64_t* slots, int64_t T, int64_t nrep, float scale, uint16_t* out) {
  constexpr int NS = DH / 16;
  const std::vector<PromptTile> tiles = prompt_tiles_of(slots, T, Hkv, nrep);
  const int64_t nt = static_cast<int64_t>(tiles.size());
  g_prompt_tiles_calls.fetch_add(1, std::memory_order_relaxed);
  if (nt == 0) return;
#pragma omp parallel num_threads(region_threads(nt))
  {
    const auto [h, nh] = region_thread();
#ifdef REMIX_AMX
    if constexpr (AMX) {
      TileConfig cfg;
      for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
      _tile_loadconfig(&cfg);
    }
#endif
    // a thread's buffers, kept between calls (every element read is written first in the call)
    thread_local PackedKV<DH> kv;
    thread_local std::vector<float> sc;  // scores, a row per tile row
    thread_local std::vector<uint16_t> pw;  // weights (bfloat16), a row per tile row
    const int64_t wide = (P + 31) / 32 * 32;
    if (static_cast<int64_t>(sc.size()) < 16 * wide) sc.resize(16 * wide);
    if (static_cast<int64_t>(pw.size()) < 16 * wide) pw.resize(16 * wide);
    alignas(64) uint16_t qb[16 * DH];
    alignas(64) float ob[NS][256];
    alignas(64) float row_out[DH];
    const auto pack = [&](int64_t slot, int64_t g, int64_t n) {
      kv.pack(K + (slot * Hkv + g) * P * DH, V + (slot * Hkv + g) * P * DH, n);
    };
    for_thread_tiles(tiles, slots, lens, nrep, P, h, nh, pack, [&](const TileRows& tr) {
      const PromptTile& tl = tr.tl;
      const int64_t g = tl.g, R = tr.R, lmax = tr.lmax;
      const int64_t* len = tr.len;
      for (int64_t rr = 0; rr < 16; ++rr) {
        if (rr < R) std::memcpy(qb + rr * DH, q + (tl.t0 + rr / nrep) * q_row + (g * nrep + rr % nrep) * DH, DH * 2);
        else std::memset(qb + rr * DH, 0, DH * 2);
      }
      const int64_t nk = (lmax + 15) / 16, nv = (lmax + 31) / 32;
#ifdef REMIX_AMX
      if constexpr (AMX) prompt_scores_amx<DH>(qb, kv, nk, sc.data(), wide);
      else
#endif
      prompt_scores_vec<DH>(qb, R, kv, nk, sc.data(), wide);
      // weights: each row as the decode kernel takes its scores (its own length, max, exp, sum), rounded to bfloat16;
      // zeros past its length up to the tile's last block
      float inv[16];
      for (int64_t rr = 0; rr < R; ++rr) {
        float* sr = sc.data() + rr * wide;
        uint16_t* pr = pw.data() + rr * wide;
        const int64_t padded = (len[rr] + L - 1) / L * L;
        inv[rr] = softmax_pass<true>(sr, len[rr], padded, [&](int64_t t, vf e) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + t), (__m256i)_mm512_cvtneps_pbh((__m512)e));
        }, scale);
        std::memset(pr + len[rr], 0, (nv * 32 - len[rr]) * 2);
      }
#ifdef REMIX_AMX
      if constexpr (AMX) {
        for (int64_t rr = R; rr < 16; ++rr) std::memset(pw.data() + rr * wide, 0, nv * 32 * 2);
        prompt_values_amx<DH>(pw.data(), kv, nv, wide, ob);
      } else
#endif
      prompt_values_vec<DH>(pw.data(), R, kv, nv, wide, ob);
      for (int64_t rr = 0; rr < R; ++rr) {
        for (int s = 0; s < NS; ++s) store(row_out + s * 16, load(ob[s] + rr * 16) * inv[rr]);
        const int64_t t = tl.t0 + rr / nrep;
        narrow(row_out, out + ((t * Hkv + g) * nrep + rr % nrep) * DH, DH);
      }
    });
#ifdef REMIX_AMX
    if constexpr (AMX) _tile_release();
#endif
  }
}

// The form: AMX tiles where the build and the OS have them (and _prompt_amx is on), else vectors.
template <int DH>
inline void prompt_attention_any(const uint16_t* q, int64_t q_row, const uint16_t* K, const uint16_t* V, int64_t Hkv,
                                 int64_t P, const int64_t* lens, const int64_t* slots, int64_t T, int64_t nrep,
                                 float scale, uint16_t* out) {
#ifdef REMIX_AMX
  if (g_prompt_amx && amx_ready())
    return prompt_attention<DH, true>(q, q_row, K, V, Hkv, P, lens, slots, T, nrep, scale, out);
#endif
  prompt_attention<DH, false>(q, q_row, K, V, Hkv, P, lens, slots, T, nrep, scale, out);
}
#endif  // REMIX_DOT_BF16

#ifdef REMIX_PROMPT_F32
// The float32 prompt kernel's native vectors: W lanes of float32 (AVX-512: 16, AVX2: 8).
struct PromptVec {
#ifdef __AVX512F__
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // a product GCC may not fuse into a later add (its _mm512_mul_ps is plain vector arithmetic, which it contracts)
  static V product(V a, V b) { V r = _mm512_mul_ps(a, b); asm("" : "+v"(r)); return r; }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static constexpr int ACC = 24, CW = 4;  // P V's accumulators: RG rows x CW (at most) vectors
#else
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V product(V a, V b) { V r = _mm256_mul_ps(a, b); asm("" : "+x"(r)); return r; }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static constexpr int ACC = 12, CW = 2;
#endif
};

// One thread's K of one cache row and key/value head transposed, positions [0, n) rounded up to whole pairs of blocks
// of W positions: block b's dimension d at k[(b DH + d) W, + W), zeros from n on.
template <int DH>
struct PackedKT {
  static constexpr int W = PromptVec::W;
  std::vector<float> k;
  int64_t blocks = 0;  // (even)
  void pack(const float* K, int64_t n) {
    blocks = (n + 2 * W - 1) / (2 * W) * 2;
    if (static_cast<int64_t>(k.size()) < blocks * DH * W) k.resize(blocks * DH * W);
    for (int64_t b = 0; b < blocks; ++b) {
      float* kb = k.data() + b * DH * W;
      for (int j = 0; j < W; ++j) {
        const int64_t p = b * W + j;
        if (p < n) {
          const float* row = K + p * DH;
          for (int d = 0; d < DH; ++d) kb[d * W + j] = row[d];
        } else {
          for (int d = 0; d < DH; ++d) kb[d * W + j] = 0.f;
        }
      }
    }
  }
};

// A group of RB query rows' scores over KB blocks of W positions from k0 (kt's block b), into sc (rows `wide` apart; nr
// of the RB rows stored), each exactly as the decode kernel (attend_group) sums it: lane l of 16 sums the dimensions
// d = l mod 16 in order (a product, then fused multiply-adds), then reduce16's pairwise tree over the 16 lanes (h_i =
// a_i + a_i+8, g_i = h_i + h_i+4, f_i = g_i + g_i+2, f_0 + f_1). Here a vector holds W positions and each lane's sum
// is a vector of its own, so the tree is vector adds: each K vector serves the RB rows, each broadcast query value the
// KB blocks, and each lane's sum goes to L1 as it is made (a_i, then h_i = a_i + a_i+8 over it: one lane's sums of
// the RB x KB rows and blocks live in registers), the tree's upper levels from there at the end.
template <int DH, int RB, int KB>
__attribute__((always_inline)) inline void scores_tree(const float* q, const float* k0, float* sc, int64_t wide,
                                                        int64_t nr, int64_t b) {
  using PV = PromptVec;
  using Acc = PV::V[RB][KB];
  constexpr int W = PV::W, NV = DH / L;
  const auto lane = [&](int l, Acc& a) __attribute__((always_inline)) {
    for (int c = 0; c < NV; ++c) {
      const int d = c * L + l;
      PV::V kv[KB];
      for (int kb = 0; kb < KB; ++kb) kv[kb] = PV::load(k0 + (kb * DH + d) * W);
      for (int j = 0; j < RB; ++j) {
        const PV::V qv = PV::set1(q[j * DH + d]);
        for (int kb = 0; kb < KB; ++kb) a[j][kb] = c == 0 ? PV::product(qv, kv[kb]) : PV::fma(qv, kv[kb], a[j][kb]);
      }
    }
  };
  alignas(64) float hb[8][RB][KB][W];
  for (int i = 0; i < 8; ++i) {
    Acc x;
    lane(i, x);
    for (int j = 0; j < RB; ++j) for (int kb = 0; kb < KB; ++kb) PV::store(hb[i][j][kb], x[j][kb]);
    lane(i + 8, x);
    for (int j = 0; j < RB; ++j)
      for (int kb = 0; kb < KB; ++kb) PV::store(hb[i][j][kb], PV::add(PV::load(hb[i][j][kb]), x[j][kb]));
  }
  for (int64_t j = 0; j < nr; ++j)
    for (int kb = 0; kb < KB; ++kb) {
      const auto hv = [&](int i) { return PV::load(hb[i][j][kb]); };
      const PV::V f0 = PV::add(PV::add(hv(0), hv(4)), PV::add(hv(2), hv(6)));
      const PV::V f1 = PV::add(PV::add(hv(1), hv(5)), PV::add(hv(3), hv(7)));
      PV::store(sc + j * wide + (b + kb) * W, PV::add(f0, f1));
    }
}

// A query tile's scores (qs: its R rows of DH float32, already times scale, zero rows after them up to a whole group)
// over blocks [0, nb) of kt (nb even), into sc (rows `wide` apart), by scores_tree: 5 rows x 2 blocks where the rows
// come in fives (nrep 3 or 5: 15 rows), else 4 x 2. A 512-token chunk of the default base at positions 1536-2048 (the
// whole attention call, float32, the 45th session's Intel VM, variants in turn): AVX-512 5 x 2 10.2 ms (8 x 2 11.3);
// with two lanes' sums live (a_i and a_i+8, then h_i) 5 x 2 10.4, 4 x 2 10.9, 8 x 1 10.2, 3 x 2 16.5; with all five
// of the tree's running sums in registers (no stores) 2 x 2 17.7, 5 x 1 13.4; the decode kernel 25.7. The AVX2 build
// (16 registers; on the same VM): 5 x 2 18.7, 4 x 2 19.4; two lanes live 6 x 2 21.8 and, with its P V at 4 columns x 2
// rows (below), 3 x 2 29.6; the decode kernel 30.9.
template <int DH, int RB, int KB>
void prompt_scores_rows(const float* qs, int64_t R, const PackedKT<DH>& kt, int64_t nb, float* sc, int64_t wide) {
  constexpr int W = PromptVec::W;
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int64_t nr = std::min<int64_t>(RB, R - r0);
    for (int64_t b = 0; b < nb; b += KB)
      scores_tree<DH, RB, KB>(qs + r0 * DH, kt.k.data() + b * DH * W, sc + r0 * wide, wide, nr, b);
  }
}
constexpr int PROMPT_QS_PAD = 4;  // zero query rows after a tile's (the most a group below leaves unfilled)
template <int DH>
void prompt_scores_f32(const float* qs, int64_t R, const PackedKT<DH>& kt, int64_t nb, float* sc, int64_t wide) {
  if (R % 5 == 0) return prompt_scores_rows<DH, 5, 2>(qs, R, kt, nb, sc, wide);
  prompt_scores_rows<DH, 4, 2>(qs, R, kt, nb, sc, wide);
}

// A query tile's P V (pw: its R rows of float32 weights, `wide` apart, zeros past each row's length) over V's rows
// [0, n) (DH float32 each, as the cache holds them): RG rows x CW vectors of dimensions at a time, each V vector read
// once for the RG rows, each weight broadcast; every output one fused multiply-add chain over the positions in order;
// times inv[row] into ob [R][DH]. AVX-512: up to 4 vectors x 6 rows; AVX2: 2 x 6 (4 x 2 had left it load-bound, a
// V load and a broadcast for every two FMAs: the call above 26.2 against 22.2 ms with the 3 x 2 scores).
template <int DH>
void prompt_values_f32(const float* pw, int64_t R, const float* V, int64_t n, int64_t wide, const float* inv, float* ob) {
  using PV = PromptVec;
  constexpr int W = PV::W, NV = DH / W, CW = NV < PV::CW ? NV : PV::CW;
  constexpr int RG = PV::ACC / CW < 16 ? PV::ACC / CW : 16;
  static_assert(DH % W == 0 && NV % CW == 0, "the P V pass's column blocks must tile the head");
  for (int c0 = 0; c0 < NV; c0 += CW)
    for (int64_t r0 = 0; r0 < R; r0 += RG) {
      const int64_t nr = std::min<int64_t>(RG, R - r0);
      PV::V acc[RG][CW];
      for (int j = 0; j < RG; ++j) for (int c = 0; c < CW; ++c) acc[j][c] = PV::zero();
      const float* w = pw + r0 * wide;
      for (int64_t u = 0; u < n; ++u) {
        PV::V vv[CW];
        for (int c = 0; c < CW; ++c) vv[c] = PV::load(V + u * DH + (c0 + c) * W);
        for (int j = 0; j < RG; ++j) {
          if (j >= nr) break;
          const PV::V p = PV::set1(w[j * wide + u]);
          for (int c = 0; c < CW; ++c) acc[j][c] = PV::fma(p, vv[c], acc[j][c]);
        }
      }
      for (int64_t j = 0; j < nr; ++j)
        for (int c = 0; c < CW; ++c)
          PV::store(ob + (r0 + j) * DH + (c0 + c) * W, PV::mul(acc[j][c], PV::set1(inv[r0 + j])));
    }
}

// out [T, Hkv, nrep, DH] float32 = attention of query rows q (row t at q + t q_row, its Hkv nrep heads DH apart) over
// K, V [S, Hkv, P, DH] float32: row t reads cache row slots[t]'s first lens[t] positions (as slot_attention).
template <int DH>
void prompt_attention_f32(const float* q, int64_t q_row, const float* K, const float* V, int64_t Hkv, int64_t P,
                          const int64_t* lens, const int64_t* slots, int64_t T, int64_t nrep, float scale, float* out) {
  using PV = PromptVec;
  constexpr int W = PV::W;
  const std::vector<PromptTile> tiles = prompt_tiles_of(slots, T, Hkv, nrep);
  const int64_t nt = static_cast<int64_t>(tiles.size());
  g_prompt_tiles_calls.fetch_add(1, std::memory_order_relaxed);
  if (nt == 0) return;
#pragma omp parallel num_threads(region_threads(nt))
  {
    const auto [h, nh] = region_thread();
    // a thread's buffers, kept between calls (every element read is written first in the call)
    thread_local PackedKT<DH> kt;
    thread_local std::vector<float> sc;  // scores, then weights: a row per tile row
    const int64_t wide = (P + 31) / 32 * 32;
    if (static_cast<int64_t>(sc.size()) < 16 * wide) sc.resize(16 * wide);
    alignas(64) float qs[(16 + PROMPT_QS_PAD) * DH];  // the tile's rows times scale, zeros past them
    alignas(64) float ob[16 * DH];
    const auto pack = [&](int64_t slot, int64_t g, int64_t n) { kt.pack(K + (slot * Hkv + g) * P * DH, n); };
    for_thread_tiles(tiles, slots, lens, nrep, P, h, nh, pack, [&](const TileRows& tr) {
      const PromptTile& tl = tr.tl;
      const int64_t slot = tr.slot, g = tl.g, R = tr.R, lmax = tr.lmax;
      const int64_t* len = tr.len;
      for (int64_t rr = 0; rr < 16 + PROMPT_QS_PAD; ++rr) {
        float* qr = qs + rr * DH;
        if (rr < R) {
          const float* src = q + (tl.t0 + rr / nrep) * q_row + (g * nrep + rr % nrep) * DH;
          for (int d = 0; d < DH; ++d) qr[d] = src[d] * scale;  // the decode kernel's q * scale
        } else {
          std::memset(qr, 0, DH * sizeof(float));
        }
      }
      const int64_t nb = (lmax + 2 * W - 1) / (2 * W) * 2;
      prompt_scores_f32<DH>(qs, R, kt, nb, sc.data(), wide);
      // weights: each row's softmax over its own positions as the decode kernel takes it; zeros past its length
      float inv[16];
      for (int64_t rr = 0; rr < R; ++rr) {
        float* sr = sc.data() + rr * wide;
        const int64_t padded = (len[rr] + L - 1) / L * L;
#ifdef __AVX512F__
        inv[rr] = softmax_pass(sr, len[rr], padded, [&](int64_t t, vf e) { store(sr + t, e); });
#else
        inv[rr] = softmax_pass8(sr, len[rr], padded);
#endif
        if (lmax > len[rr]) std::memset(sr + len[rr], 0, (lmax - len[rr]) * sizeof(float));
      }
      prompt_values_f32<DH>(sc.data(), R, V + (slot * Hkv + g) * P * DH, lmax, wide, inv, ob);
      for (int64_t rr = 0; rr < R; ++rr) {
        const int64_t t = tl.t0 + rr / nrep;
        std::memcpy(out + ((t * Hkv + g) * nrep + rr % nrep) * DH, ob + rr * DH, DH * sizeof(float));
      }
    });
  }
}

#endif  // REMIX_PROMPT_F32

}  // namespace
