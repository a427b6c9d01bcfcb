"""Optional C++ kernels for the CPU: the per-token top-k routing and LoRA gather of one module, fused.

On this class of CPU a torch op costs ~5-15 us of dispatch, and the dense-masked torch path (one GEMM
over every pool's A, a mask, one GEMM over every B) does n/k times the useful work in shapes that GEMM
libraries handle poorly (K = n*r = 64). These kernels compute only the selected LoRAs:

    route_gather_(x, y, ...)   for each token: logits = P_s x (float32), J = top-k (ties to the lower
                               index), y += omega_s * sum_{i in J} B_i (A_i x); returns J (global ids)
    gather_(x, y, a, bt, idx, w)   the kernel contract with given ids and weights (-1 = none)

blocked by LoRA so each weight load serves up to 4 tokens, with explicit SIMD (GCC/Clang vector types)
and torch's thread pool. Every token's sums run in the same order whoever shares the call, so a
token's result is bit-identical alone or in any batch. x and y may be float32 or bfloat16 (pools and
arithmetic stay float32; a bfloat16 y is rounded once).

Compiled once on first use with torch's JIT extension loader (~30 s, cached under
``~/.cache/torch_extensions`` in a directory named after this CPU's instruction-set flags, since it is
built with ``-march=native``). If there is no compiler, or ``REMIX_DISABLE_EXT=1``, :func:`load`
returns None and callers use the torch-ops path (:mod:`remix.kernels.torch_ops`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import threading

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int L = 16;  // lanes of one vector: a 512-bit register with AVX-512, split by the compiler otherwise
typedef float vf __attribute__((vector_size(L * sizeof(float)), aligned(sizeof(float))));  // unaligned loads allowed

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline float hsum(vf v) { float s = 0.f; for (int l = 0; l < L; ++l) s += v[l]; return s; }

// out[i] = dot(a + i*D, x) for i < R: R rows share each load of x.
template <int R>
inline void dot_rows(const float* __restrict x, const float* __restrict a, int64_t D, float* __restrict out) {
  vf acc[R];
  for (int i = 0; i < R; ++i) acc[i] = vf{} ;
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const vf xv = load(x + d);
    for (int i = 0; i < R; ++i) acc[i] += load(a + i * D + d) * xv;
  }
  for (int i = 0; i < R; ++i) {
    float s = hsum(acc[i]);
    for (int64_t e = d; e < D; ++e) s += a[i * D + e] * x[e];
    out[i] = s;
  }
}

inline void dots(const float* x, const float* a, int64_t rows, int64_t D, float* out) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) dot_rows<8>(x, a + i * D, D, out + i);
  for (; i + 4 <= rows; i += 4) dot_rows<4>(x, a + i * D, D, out + i);
  for (; i < rows; ++i) dot_rows<1>(x, a + i * D, D, out + i);
}

// Y[row of pair q][o0, o1) += sum_{c < CN} u_q[c] * b[c] for NB pairs of one LoRA (their sums interleaved, each
// in the same order as alone); returns where the vector part stopped (the caller finishes a partial chunk).
template <int CN, int NB>
inline int64_t axpy_block(float* Y, const float* b, int64_t O, const float* u, int64_t r, const int64_t* pairs,
                          int64_t k, int64_t o0, int64_t o1) {
  float* ys[NB];
  for (int q = 0; q < NB; ++q) ys[q] = Y + (pairs[q] / k) * O;
  int64_t o = o0;
  for (; o + L <= o1; o += L) {
    vf acc[NB];
    for (int q = 0; q < NB; ++q) acc[q] = load(ys[q] + o);
    for (int c = 0; c < CN; ++c) {
      const vf bv = load(b + c * O + o);
      for (int q = 0; q < NB; ++q) acc[q] += u[q * r + c] * bv;
    }
    for (int q = 0; q < NB; ++q) store(ys[q] + o, acc[q]);
  }
  return o;
}

template <int CN>
inline int64_t axpy_pairs(float* Y, const float* b, int64_t O, const float* u, int64_t r, const int64_t* pairs, int64_t nb,
                          int64_t k, int64_t o0, int64_t o1) {
  for (int64_t q = 1; q < nb; ++q)
    if (pairs[q] / k == pairs[q - 1] / k) {  // one token listing a LoRA twice (gather_ allows it): one pair at a time
      int64_t o = o1;
      for (int64_t p = 0; p < nb; ++p) o = axpy_block<CN, 1>(Y, b, O, u + p * r, r, pairs + p, k, o0, o1);
      return o;
    }
  switch (nb) {
    case 4: return axpy_block<CN, 4>(Y, b, O, u, r, pairs, k, o0, o1);
    case 3: return axpy_block<CN, 3>(Y, b, O, u, r, pairs, k, o0, o1);
    case 2: return axpy_block<CN, 2>(Y, b, O, u, r, pairs, k, o0, o1);
    default: return axpy_block<CN, 1>(Y, b, O, u, r, pairs, k, o0, o1);
  }
}

constexpr int TB = 4;  // tokens per register block

// The gather of the kernel contract, blocked by LoRA so each weight load serves several tokens:
//   phase A (parallel over blocks of up to TB pairs of one LoRA): U[t, j, :] = w[t, j] * A[sel[t, j]] @ x[t]
//   phase B (parallel over output slices): Y[t] += B[i] @ U[t, j] over t's selections, by ascending LoRA id
// Batches of 64+ tokens are first split by tokens across threads, each running both phases on its share.
// A token's arithmetic (the order of every sum) depends only on its own row and selection, never on
// which other tokens share the call, so batch-mates cannot change its result.
void gather_impl(const float* X, int64_t T, int64_t D, const float* a, const float* bt, int64_t r, int64_t N,
                 const int64_t* sel, const float* w, int64_t k, float* Y, int64_t O) {
  const int64_t pool = at::get_num_threads();
  if (T >= 64 && pool > 1 && !at::in_parallel_region()) {
    // large batches: each thread takes a contiguous share of the tokens and runs both phases on it alone (the
    // pools fit every core's L2; no barrier between the phases). Nested parallel_for calls below run inline.
    at::parallel_for(0, T, (T + pool - 1) / pool, [&](int64_t t0, int64_t t1) {
      gather_impl(X + t0 * D, t1 - t0, D, a, bt, r, N, sel + t0 * k, w + t0 * k, k, Y + t0 * O, O);
    });
    return;
  }
  std::vector<int64_t> start(N + 1, 0), order;  // counting sort of the (token, j) pairs by LoRA id
  for (int64_t e = 0; e < T * k; ++e) if (sel[e] >= 0 && w[e] != 0.f) ++start[sel[e] + 1];
  for (int64_t i = 0; i < N; ++i) start[i + 1] += start[i];
  order.resize(start[N]);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < T * k; ++e) if (sel[e] >= 0 && w[e] != 0.f) order[fill[sel[e]]++] = e;
  }
  if (order.empty()) return;
  std::vector<float> U(order.size() * r);  // U[p, c] for the p-th pair in LoRA order

  std::vector<int64_t> items;  // (LoRA, first pair) of every block of up to TB pairs: phase A's work list
  for (int64_t i = 0; i < N; ++i)
    for (int64_t p0 = start[i]; p0 < start[i + 1]; p0 += TB) { items.push_back(i); items.push_back(p0); }
  const int64_t n_items = static_cast<int64_t>(items.size()) / 2;
  at::parallel_for(0, n_items, 1, [&](int64_t it0, int64_t it1) {
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t i = items[2 * it], p0 = items[2 * it + 1];
      const float* Ai = a + i * r * D;
      const int64_t nb = std::min<int64_t>(TB, start[i + 1] - p0);
      const float* xs[TB];  // a short block repeats its last token (computed, never stored)
      for (int q = 0; q < TB; ++q) xs[q] = X + (order[p0 + std::min<int64_t>(q, nb - 1)] / k) * D;
      for (int64_t c0 = 0; c0 < r; c0 += 4) {
        const int64_t cn = std::min<int64_t>(4, r - c0);
        vf acc[TB][4];
        for (int q = 0; q < TB; ++q) for (int c = 0; c < 4; ++c) acc[q][c] = vf{};
        int64_t d = 0;
        for (; d + L <= D; d += L) {
          vf av[4];
          for (int c = 0; c < 4; ++c) av[c] = load(Ai + (c0 + std::min<int64_t>(c, cn - 1)) * D + d);
          for (int q = 0; q < TB; ++q) {
            const vf xv = load(xs[q] + d);
            for (int c = 0; c < 4; ++c) acc[q][c] += av[c] * xv;
          }
        }
        for (int64_t q = 0; q < nb; ++q)
          for (int64_t c = 0; c < cn; ++c) {
            const float* row = Ai + (c0 + c) * D;
            float s = hsum(acc[q][c]);
            for (int64_t e = d; e < D; ++e) s += row[e] * xs[q][e];
            U[(p0 + q) * r + c0 + c] = s * w[order[p0 + q]];
          }
      }
    }
  });

  const int64_t chunks = (O + L - 1) / L;  // output slices of L lanes (the last may be partial)
  // each thread takes one contiguous slice of the outputs and streams every selected LoRA's rows over it
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks / 4));
  at::parallel_for(0, threads, 1, [&](int64_t h0, int64_t h1) {
   for (int64_t h = h0; h < h1; ++h) {
    const int64_t o0 = (chunks * h / threads) * L, o1 = std::min(O, (chunks * (h + 1) / threads) * L);
    for (int64_t i = 0; i < N; ++i) {
      const float* Bi = bt + i * r * O;
      for (int64_t p0 = start[i]; p0 < start[i + 1]; p0 += TB) {
        const int64_t nb = std::min<int64_t>(TB, start[i + 1] - p0);
        for (int64_t c0 = 0; c0 < r; c0 += 8) {
          const int64_t cn = std::min<int64_t>(8, r - c0);
          int64_t o = o0;
          if (cn == 8) o = axpy_pairs<8>(Y, Bi + c0 * O, O, U.data() + p0 * r + c0, r, order.data() + p0, nb, k, o0, o1);
          else if (cn == 4) o = axpy_pairs<4>(Y, Bi + c0 * O, O, U.data() + p0 * r + c0, r, order.data() + p0, nb, k, o0, o1);
          for (; o < o1; ++o)
            for (int64_t q = 0; q < nb; ++q) {
              float* yq = Y + (order[p0 + q] / k) * O;
              const float* uq = U.data() + (p0 + q) * r + c0;
              float acc = yq[o];
              for (int64_t c = 0; c < cn; ++c) acc += uq[c] * Bi[(c0 + c) * O + o];
              yq[o] = acc;
            }
        }
      }
    }
   }
  });
}

void check_pools(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& a, const torch::Tensor& bt, int64_t r) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU [T, D] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == x.scalar_type() && y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0),
              "y must be a contiguous [T, O] tensor of x's dtype");
  TORCH_CHECK(a.scalar_type() == torch::kFloat32 && bt.scalar_type() == torch::kFloat32 && a.is_contiguous() && bt.is_contiguous(),
              "pools must be contiguous float32");
  TORCH_CHECK(r >= 1 && r <= 256 && a.size(0) % r == 0 && a.size(1) == x.size(1) && bt.size(0) == a.size(0) && bt.size(1) == y.size(1),
              "pool shapes: a [N*r, D], bt [N*r, O]");
}

// bfloat16 <-> float32 in branch-free integer code the compiler vectorises (c10's scalar conversions do not).
inline void widen(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) { uint32_t b = static_cast<uint32_t>(src[i]) << 16; std::memcpy(dst + i, &b, 4); }
}
inline void narrow(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {  // round to nearest even
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, src + i, 4);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = static_cast<uint16_t>(nan ? ((b >> 16) | 0x40u) : rounded);
  }
}

// x as float32 [T, D]: the tensor itself, or a converted copy.
torch::Tensor as_float32(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kFloat32) return x;
  auto out = torch::empty(x.sizes(), x.options().dtype(torch::kFloat32));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr());
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 16384, [&](int64_t i0, int64_t i1) { widen(src + i0, dst + i0, i1 - i0); });
  return out;
}

// Add the gather into y: in place for float32, through a float32 accumulator (one rounding) for bfloat16.
void gather_into(const torch::Tensor& x32, torch::Tensor& y, const torch::Tensor& a, const torch::Tensor& bt, int64_t r,
                 const int64_t* sel, const float* w, int64_t k) {
  const int64_t T = x32.size(0), D = x32.size(1), O = y.size(1), N = a.size(0) / r;
  if (y.scalar_type() == torch::kFloat32) {
    gather_impl(x32.data_ptr<float>(), T, D, a.data_ptr<float>(), bt.data_ptr<float>(), r, N, sel, w, k, y.data_ptr<float>(), O);
  } else {  // bfloat16: base output widened, deltas added in float32, one rounding back
    std::unique_ptr<float[]> acc(new float[T * O]);
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    at::parallel_for(0, T * O, 16384, [&](int64_t i0, int64_t i1) { widen(yp + i0, acc.get() + i0, i1 - i0); });
    gather_impl(x32.data_ptr<float>(), T, D, a.data_ptr<float>(), bt.data_ptr<float>(), r, N, sel, w, k, acc.get(), O);
    at::parallel_for(0, T * O, 16384, [&](int64_t i0, int64_t i1) { narrow(acc.get() + i0, yp + i0, i1 - i0); });
  }
}

}  // namespace

// y[t] += sum_j weight[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t]), in place (idx -1 = none). Returns y.
torch::Tensor gather_(torch::Tensor x, torch::Tensor y, torch::Tensor a, torch::Tensor bt, torch::Tensor idx,
                      torch::Tensor weight, int64_t r) {
  check_pools(x, y, a, bt, r);
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.dim() == 2 && idx.size(0) == x.size(0), "idx must be int64 [T, k]");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.sizes() == idx.sizes(), "weight must be float32 [T, k]");
  auto ic = idx.contiguous(); auto wc = weight.contiguous();
  const int64_t N = a.size(0) / r;
  TORCH_CHECK(ic.numel() == 0 || (ic.max().item<int64_t>() < N && ic.min().item<int64_t>() >= -1), "idx out of range");
  gather_into(as_float32(x), y, a, bt, r, ic.data_ptr<int64_t>(), wc.data_ptr<float>(), ic.size(1));
  return y;
}

// Route every token within its slot's pool (top-k of float32 router logits, ties to the lower index, constant
// weight omega) and add its delta into y in place. slot_of_token empty = every token is slot 0; slot -1, or a
// slot with n = 0, gets no delta. Returns idx [T, kmax] (global ids, -1 padded); adds each selection to counts
// [N] when counts is non-empty.
torch::Tensor route_gather_(torch::Tensor x, torch::Tensor y, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                            torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k,
                            torch::Tensor slot_omega, int64_t r, int64_t kmax, torch::Tensor counts) {
  check_pools(x, y, a, bt, r);
  const int64_t T = x.size(0), D = x.size(1), N = a.size(0) / r;
  TORCH_CHECK(router.scalar_type() == torch::kFloat32 && router.is_contiguous() && router.size(0) == N && router.size(1) == D,
              "router must be contiguous float32 [N, D]");
  TORCH_CHECK(kmax >= 1 && kmax <= 64, "kmax must be in [1, 64]");
  auto off = slot_off.contiguous(); auto nn = slot_n.contiguous(); auto kk = slot_k.contiguous(); auto om = slot_omega.contiguous();
  TORCH_CHECK(off.scalar_type() == torch::kInt64 && nn.scalar_type() == torch::kInt64 && kk.scalar_type() == torch::kInt64 &&
              om.scalar_type() == torch::kFloat32, "slot tables: int64 off / n / k, float32 omega");
  const int64_t S = off.numel();
  const int64_t *op = off.data_ptr<int64_t>(), *np = nn.data_ptr<int64_t>(), *kp = kk.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(np[s] == 0 || (np[s] <= 64 && op[s] >= 0 && op[s] + np[s] <= N && kp[s] >= 1 && kp[s] <= np[s] && kp[s] <= kmax),
                "slot ", s, ": bad offset / n / k");
  auto sot = slot_of_token.contiguous();
  const bool one = sot.numel() == 0;
  TORCH_CHECK(one || (sot.scalar_type() == torch::kInt64 && sot.numel() == T), "slot_of_token must be int64 [T] or empty");
  TORCH_CHECK(!one || S >= 1, "slot tables are empty");
  TORCH_CHECK(counts.numel() == 0 || (counts.scalar_type() == torch::kInt64 && counts.is_contiguous() && counts.numel() == N),
              "counts must be int64 [N] or empty");
  const int64_t* sp = one ? nullptr : sot.data_ptr<int64_t>();
  const float* wp = om.data_ptr<float>();
  auto x32 = as_float32(x);
  const float *xp = x32.data_ptr<float>(), *rp = router.data_ptr<float>();
  auto idx = torch::full({T, kmax}, -1, x.options().dtype(torch::kInt64));
  std::vector<float> weight(T * kmax, 0.f);
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    float logits[64];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = one ? 0 : sp[t];
      if (s < 0 || s >= S || np[s] == 0) continue;
      const int64_t o = op[s], n = np[s], k = kp[s];
      dots(xp + t * D, rp + o * D, n, D, logits);
      uint64_t taken = 0;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        float value = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          if ((taken >> i) & 1ull) continue;
          if (best < 0 || logits[i] > value) { best = i; value = logits[i]; }  // strict >: ties keep the lower index
        }
        taken |= 1ull << best;
        ip[t * kmax + j] = o + best;
        weight[t * kmax + j] = wp[s];
      }
    }
  });
  gather_into(x32, y, a, bt, r, ip, weight.data(), kmax);
  if (counts.numel() > 0) {
    int64_t* cp = counts.data_ptr<int64_t>();
    for (int64_t e = 0; e < T * kmax; ++e) if (ip[e] >= 0) cp[ip[e]] += 1;
  }
  return idx;
}
"""

_lock = threading.Lock()
_state: dict = {}
FUNCTIONS = ["gather_", "route_gather_"]
FLAG_SETS = [["-march=native", "-fopenmp"], ["-fopenmp"], []]  # without OpenMP, torch's parallel_for runs serially


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_tag() -> str:
    """A short hash of the machine and its instruction-set flags (the build uses -march=native)."""
    return hashlib.sha1((platform.machine() + " ".join(sorted(cpu_flags()))).encode()).hexdigest()[:8]


def load():
    """The compiled module, or None when disabled or unbuildable (then a warning is logged once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("REMIX_DISABLE_EXT", "") not in ("", "0"):
            log.info("REMIX_DISABLE_EXT is set: using the torch-ops path")
        else:
            from torch.utils.cpp_extension import load_inline

            errors = []
            for i, flags in enumerate(FLAG_SETS):  # the fastest build this compiler accepts
                try:
                    module = load_inline(
                        f"remix_cpu_ops_v3_{_cpu_tag()}_{i}", cpp_sources=[SOURCE], functions=FUNCTIONS,
                        extra_cflags=["-O3", *flags], extra_ldflags=[f for f in flags if f == "-fopenmp"],
                    )
                    if i:
                        log.warning("built the C++ kernels without %s (%s)", FLAG_SETS[0], errors[0])
                    break
                except Exception as e:  # no compiler, no ninja, no OpenMP, read-only cache...: try less, then fall back
                    errors.append(str(e).splitlines()[0][:300])
            else:
                log.warning("could not build the C++ kernels (%s); using torch ops, which are slower on CPU", errors[-1])
        _state["module"] = module
        return module


def available() -> bool:
    return load() is not None


_off = threading.local()


@contextlib.contextmanager
def disabled():
    """Within this block (this thread) the layers take the torch-ops path: for tests and benchmarks."""
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def for_input(x) -> object | None:
    """The compiled kernels when they apply to ``x`` (a CPU float32/bfloat16 tensor, no autograd needed), else None.

    On every module call of a forward, so kept to a few attribute reads.
    """
    if not x.is_cpu or x.dtype not in _DTYPES or getattr(_off, "on", False) or (x.requires_grad and torch.is_grad_enabled()):
        return None
    module = _state.get("module", _MISSING)
    return load() if module is _MISSING else module


_MISSING = object()
_DTYPES = (torch.float32, torch.bfloat16)
NONE = torch.empty(0, dtype=torch.int64)  # for route_gather_'s optional tensors: no slot map (all slot 0), no counts
