// Vector exp (vexp_of: Cephes' expf on any float vector type) and the int32 / 8-lane vector types: softmax in the
// attention, sampling and silu use them.
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "common.h"

namespace {

typedef int32_t vi __attribute__((vector_size(L * sizeof(int32_t))));

// exp(x) for x <= 0 (scores minus their maximum): Cephes' expf reduction and polynomial (~1 ulp), 2^n by exponent add.
// On any vector type V of floats (VI: its int32 twin): vf, and on AVX2 builds the 8-lane vf8, which GCC compiles to
// AVX2's own registers - a 16-lane vector's compares and selects it lowered to scalar code there (vcmpss / vblendvps
// lane by lane). Each lane's arithmetic is the same either way, so are its values.
template <typename V, typename VI>
__attribute__((always_inline)) inline V vexp_of(V x) {
  const V lo = V{} - 87.f;
  x = x < lo ? lo : x;
  const V magic = V{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V e = p * r * r + r + 1.f;
  VI bits;
  std::memcpy(&bits, &e, sizeof e);
  bits += __builtin_convertvector(n, VI) << 23;
  std::memcpy(&e, &bits, sizeof e);
  return e;
}
__attribute__((always_inline)) inline vf vexp(vf x) { return vexp_of<vf, vi>(x); }
typedef float vf8 __attribute__((vector_size(8 * sizeof(float)), aligned(sizeof(float))));  // unaligned loads allowed
typedef int32_t vi8 __attribute__((vector_size(8 * sizeof(int32_t))));
inline vf8 load_8(const float* p) { return *reinterpret_cast<const vf8*>(p); }
inline void store_8(float* p, vf8 v) { *reinterpret_cast<vf8*>(p) = v; }

}  // namespace
