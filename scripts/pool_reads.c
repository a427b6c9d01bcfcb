#define _POSIX_C_SOURCE 199309L
// What one core's reads of a ReMix pool cost here, and whether phase B's FMAs hide them (docs/BENCHMARKS.md, 48th
// session). A float32 576 -> 1536 module at 32 rows: one thread's phase B reads its slice of B^T (64 rows of 1536, the
// slice 768 wide: 196 KB) and runs 64 (token, LoRA) pairs' updates of y over it (axpy_lora's loop: 32 outputs a step,
// the LoRA's 8 rows of B in registers, each pair's y read, updated and written).
//   gcc -O3 -march=native scripts/pool_reads.c -o /tmp/pool_reads && /tmp/pool_reads [copies, default 3000]
// Reads of the slice, one copy after another from a set of `copies` (3000: ~1.2 GB, from memory; 60: ~24 MB, from the
// last-level cache; 4: from L2), in three orders: the pools' layout read as phase B reads it (LoRA by LoRA, 8 rows at a
// time, each row 6 KB from the next), the same with the slice's rows adjacent, and the 8 rows of a LoRA interleaved by
// 32 floats (the whole slice one linear stream). Then phase B itself with B^T from memory (y in cache, as after the
// GEMM) and from L2, from memory with the kernel's prefetch at four distances and after a pass that reads the slice
// first (49th session), and phase A of a 1536 -> 576 module for one LoRA (its 8 rows of A, 48 KB, against its ~8 tokens'
// x: dots4x4's blocks of 4 tokens x 4 rows) with A from memory and from L2.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define L 16
#define NR 64      // N x r rows of B^T (n 8, r 8)
#define O 1536     // a row of B^T
#define SL 768     // one thread's slice of the outputs
#define T 32       // tokens
#define K 2        // selections a token
typedef float vf __attribute__((vector_size(L * sizeof(float)), aligned(sizeof(float))));
static inline vf load(const float* p) { return *(const vf*)p; }
static inline void store(float* p, vf v) { *(vf*)p = v; }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static volatile float sink;

// one read of a slice in order `how` (0 the pools' layout as phase B reads it, 1 rows adjacent, 2 interleaved by 32:
// linear); every layout holds the same 196 KB
static void read_slice(const float* B, int how) {
  vf a = {0}, b = {0};
  for (int i = 0; i < NR / 8; ++i)
    for (int o = 0; o < SL; o += 2 * L)
      for (int c = 0; c < 8; ++c) {
        const float* p = how == 0 ? B + (i * 8 + c) * O + o : how == 1 ? B + (i * 8 + c) * SL + o
                                  : B + (i * SL + o) * 8 + c * 32;
        a += load(p);
        b += load(p + L);
      }
  sink = a[0] + b[1];
}

// phase B over the slice: pairs sorted by LoRA (start[i] .. start[i + 1]), rows[p] the pair's token, U[p * 8 + c]
static int64_t start[NR / 8 + 1], rows[T * K];
static float U[T * K * 8];
// pf: each row's line(s) that many floats ahead asked for at each step (axpy_lora's prefetch_rows_ahead: 64, 256
// bytes), or 0: none
static void phase_b(float* Y, const float* B, int pf) {
  for (int i = 0; i < NR / 8; ++i)
    for (int o = 0; o < SL; o += 2 * L) {
      vf b0[8], b1[8];
      for (int c = 0; c < 8; ++c) { b0[c] = load(B + (i * 8 + c) * O + o); b1[c] = load(B + (i * 8 + c) * O + o + L); }
      if (pf)
        for (int c = 0; c < 8; ++c) {
          __builtin_prefetch(B + (i * 8 + c) * O + o + pf, 0, 3);
          __builtin_prefetch(B + (i * 8 + c) * O + o + pf + L, 0, 3);
        }
      for (int64_t p = start[i]; p < start[i + 1]; ++p) {
        float* y = Y + rows[p] * O + o;
        const float* u = U + p * 8;
        vf y0 = load(y), y1 = load(y + L);
        for (int c = 0; c < 8; ++c) { y0 += u[c] * b0[c]; y1 += u[c] * b1[c]; }
        store(y, y0);
        store(y + L, y1);
      }
    }
}

// phase A for one LoRA: h[t][c] = A[c] . x[t] for 8 tokens and the LoRA's 8 rows of D = 1536 (A: 48 KB), in dots4x4's
// blocks of 4 tokens x 4 rows (16 sums a block, each row load serving four tokens)
#define D 1536
static float X[8][D] __attribute__((aligned(64))), H[8][8];
static void phase_a(const float* A) {
  for (int t0 = 0; t0 < 8; t0 += 4)
    for (int c0 = 0; c0 < 8; c0 += 4) {
      vf acc[4][4];
      for (int q = 0; q < 4; ++q) for (int c = 0; c < 4; ++c) acc[q][c] = (vf){0};
      for (int d = 0; d < D; d += L) {
        vf a[4];
        for (int c = 0; c < 4; ++c) a[c] = load(A + (c0 + c) * D + d);
        for (int q = 0; q < 4; ++q) {
          const vf x = load(X[t0 + q] + d);
          for (int c = 0; c < 4; ++c) acc[q][c] += a[c] * x;
        }
      }
      for (int q = 0; q < 4; ++q)
        for (int c = 0; c < 4; ++c) {
          float sum = 0.f;
          for (int l = 0; l < L; ++l) sum += acc[q][c][l];
          H[t0 + q][c0 + c] = sum;
        }
    }
}

int main(int argc, char** argv) {
  const long copies = argc > 1 ? atol(argv[1]) : 3000;
  const size_t each = (size_t)NR * O;  // floats of one copy of B^T (the slice is half of it)
  float* big = aligned_alloc(64, copies * each * sizeof(float));
  float* Y = aligned_alloc(64, (size_t)T * O * sizeof(float));
  if (!big || !Y) { fprintf(stderr, "out of memory\n"); return 1; }
  for (size_t i = 0; i < copies * each; ++i) big[i] = (float)(i % 97) * 1e-3f;
  for (int i = 0; i < T * O; ++i) Y[i] = 0.f;
  srand(1);  // each token two distinct LoRAs of 8, sorted by LoRA as the kernel's pairs are
  int sel[T][K], count[NR / 8] = {0};
  for (int t = 0; t < T; ++t) {
    sel[t][0] = rand() % 8;
    do sel[t][1] = rand() % 8; while (sel[t][1] == sel[t][0]);
    ++count[sel[t][0]], ++count[sel[t][1]];
  }
  for (int i = 0; i < NR / 8; ++i) start[i + 1] = start[i] + count[i];
  int64_t fill[NR / 8];
  memcpy(fill, start, sizeof fill);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < K; ++j) {
      const int64_t p = fill[sel[t][j]]++;
      rows[p] = t;
      for (int c = 0; c < 8; ++c) U[p * 8 + c] = (float)((t + c) % 7) * 1e-2f;
    }
  const char* orders[] = {"the pools' layout", "rows adjacent", "interleaved by 32"};
  const long sets[] = {copies, 60, 4};
  const char* where[] = {"memory", "last-level cache", "L2"};
  for (int s = 0; s < 3; ++s) {
    const long n = sets[s] < copies ? sets[s] : copies, passes = (copies + n - 1) / n;
    for (int how = 0; how < 3; ++how) {
      for (long j = 0; j < n; ++j) read_slice(big + j * each, how);  // warm the set (the memory set: a full pass)
      const double t0 = now();
      for (long q = 0; q < passes; ++q)
        for (long j = 0; j < n; ++j) read_slice(big + j * each, how);
      const double us = (now() - t0) / (passes * n) * 1e6;
      printf("read, %-18s from %-16s %7.2f us  %5.1f GB/s\n", orders[how], where[s], us, SL * NR * 4.0 / us * 1e-3);
    }
  }
  for (int s = 0; s < 3; s += 2) {  // phase B: B^T from memory, then from L2; y in cache either way
    const long n = sets[s] < copies ? sets[s] : copies, passes = (copies + n - 1) / n;
    for (long j = 0; j < n; ++j) phase_b(Y, big + j * each, 0);
    const double t0 = now();
    for (long q = 0; q < passes; ++q)
      for (long j = 0; j < n; ++j) phase_b(Y, big + j * each, 0);
    printf("phase B, B^T from %-16s %7.2f us\n", where[s], (now() - t0) / (passes * n) * 1e6);
  }
  // phase B from memory with the prefetch at a few distances (the kernel's: 64 floats), and after a pass that reads
  // the slice (read_slice) - whether the reads overlap the FMAs once asked for ahead or made beforehand
  const int dists[] = {32, 64, 128, 256};
  for (int d = 0; d < 4; ++d) {
    const double t0 = now();
    for (long j = 0; j < copies; ++j) phase_b(Y, big + j * each, dists[d]);
    printf("phase B + prefetch %3d floats ahead, B^T from memory %7.2f us\n", dists[d], (now() - t0) / copies * 1e6);
  }
  {
    const double t0 = now();
    for (long j = 0; j < copies; ++j) {
      read_slice(big + j * each, 0);
      phase_b(Y, big + j * each, 0);
    }
    printf("a read pass, then phase B, B^T from memory %7.2f us\n", (now() - t0) / copies * 1e6);
  }
  for (int t = 0; t < 8; ++t) for (int d = 0; d < D; ++d) X[t][d] = (float)((t + d) % 5) * 0.1f;
  const long lora_rows = 8 * D, loras = copies * each / lora_rows;  // the copies' memory cut into LoRAs' 8 rows of A
  for (int s = 0; s < 3; s += 2) {  // phase A: A from memory (every LoRA of the set once), then from L2 (16 LoRAs)
    const long n = s == 0 ? loras : 16, passes = (loras + n - 1) / n;
    for (long j = 0; j < n; ++j) phase_a(big + j * lora_rows);
    const double t0 = now();
    for (long q = 0; q < passes; ++q)
      for (long j = 0; j < n; ++j) phase_a(big + j * lora_rows);
    printf("phase A, A from %-18s %7.2f us a LoRA\n", where[s], (now() - t0) / (passes * n) * 1e6);
    sink = H[1][2];
  }
  sink = Y[0];
  return 0;
}
