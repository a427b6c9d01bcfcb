// What reading a small cold region costs on this machine: the read pattern of a decode step's ReMix pools (a router,
// the A of a few LoRAs, a thread's slice of B), 90 regions in turn with a 2 MB stream read between two of them as a
// GEMM's weights are, each pattern's fastest of 6 passes. docs/BENCHMARKS.md, twenty-eighth session.
//   gcc -O2 -mavx512f scripts/cold_reads.c -o /tmp/cold_reads && for b in 18432 73728 98304; do /tmp/cold_reads $b; done
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <x86intrin.h>
#define NMOD 90
static inline uint64_t tsc(){ unsigned a; return __rdtscp(&a); }
// read region r of `bytes` as `ns` interleaved streams (rows of bytes/ns), prefetch distance pd bytes ahead (0 none)
__m512 rd(const char* r, size_t bytes, int ns, int pd) {
  __m512 acc = _mm512_setzero_ps();
  size_t row = bytes / ns;
  for (size_t off = 0; off < row; off += 64) {
    for (int s = 0; s < ns; ++s) {
      const char* p = r + s * row + off;
      if (pd && off + pd < row) _mm_prefetch(p + pd, _MM_HINT_T0);
      acc = _mm512_add_ps(acc, _mm512_loadu_ps((const float*)p));
    }
  }
  return acc;
}
__m512 bulk(const char* r, size_t bytes) {  // prefetch everything first, then read
  for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(r + o, _MM_HINT_T1);
  __m512 acc = _mm512_setzero_ps();
  for (size_t o = 0; o < bytes; o += 64) acc = _mm512_add_ps(acc, _mm512_loadu_ps((const float*)(r + o)));
  return acc;
}
int main(int argc, char** argv) {
  size_t bytes = atol(argv[1]); size_t wbytes = 2 << 20;
  char* pools = aligned_alloc(4096, NMOD * bytes); memset(pools, 1, NMOD * bytes);
  char* w = aligned_alloc(4096, (size_t)NMOD * wbytes); memset(w, 1, (size_t)NMOD * wbytes);
  int cfg[][2] = {{1,0},{4,0},{8,0},{4,256},{4,1024},{8,512},{1,1024},{1,4096},{-1,0}};
  int nc = sizeof cfg / sizeof cfg[0];
  double best[16]; for (int i = 0; i < nc; ++i) best[i] = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 6; ++rep)
    for (int c = 0; c < nc; ++c) {
      uint64_t tot = 0;
      for (int m = 0; m < NMOD; ++m) {
        __m512 a = rd(w + (size_t)m * wbytes, wbytes, 16, 512);  // the 'GEMM' stream between
        sink += a[0];
        uint64_t t0 = tsc();
        __m512 b = cfg[c][0] < 0 ? bulk(pools + m * bytes, bytes) : rd(pools + m * bytes, bytes, cfg[c][0], cfg[c][1]);
        tot += tsc() - t0; sink += b[0];
      }
      double us = tot / 2.6e3 / NMOD; if (us < best[c]) best[c] = us;
    }
  for (int c = 0; c < nc; ++c) printf("streams %2d pd %5d: %6.2f us  %5.1f GB/s\n", cfg[c][0], cfg[c][1], best[c], bytes / best[c] / 1e3);
}
