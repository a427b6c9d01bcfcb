"""Optional C++ op for the CPU inference path: top-k routing and masking of one module, fused.

On this class of CPU a torch op costs ~5-15 us of dispatch, and the routing + masking of one module
is ~8 of them: at T = 32 that doubles the module's time. This op does it in one pass per token:

    for t in range(T):
        J = the k largest of pu[t, :n], best first, ties to the lower index
        for i in range(n):
            um[t, i*r:(i+1)*r] = omega * pu[t, n + i*r : n + (i+1)*r] if i in J else 0
        idx[t] = J

It is compiled once on first use with torch's JIT extension loader (~30 s, cached under
``~/.cache/torch_extensions``). If there is no compiler, or ``REMIX_DISABLE_EXT=1``, :func:`load`
returns None and callers use the equivalent torch ops (:func:`remix.kernels.torch_ops.topk_masked_u`).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

std::vector<torch::Tensor> topk_masked_u(torch::Tensor pu, int64_t n, int64_t k, double omega) {
  TORCH_CHECK(pu.dim() == 2 && pu.scalar_type() == torch::kFloat32 && pu.device().is_cpu() && pu.stride(1) == 1,
              "pu must be a CPU float32 [T, n + n*r] tensor with contiguous rows");
  TORCH_CHECK(n >= 1 && n <= 64 && k >= 1 && k <= n && (pu.size(1) - n) % n == 0, "bad n / k for pu's width");
  const int64_t T = pu.size(0), nr = pu.size(1) - n, r = nr / n, ld = pu.stride(0);
  auto um = torch::empty({T, nr}, pu.options());
  auto idx = torch::empty({T, k}, pu.options().dtype(torch::kInt64));
  const float* src = pu.data_ptr<float>();
  float* dst = um.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const float w = static_cast<float>(omega);
  at::parallel_for(0, T, 128, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = src + t * ld;
      float* out = dst + t * nr;
      int64_t* sel = ip + t * k;
      uint64_t taken = 0;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        float value = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          if ((taken >> i) & 1ull) continue;
          if (best < 0 || row[i] > value) { best = i; value = row[i]; }  // strict >: ties keep the lower index
        }
        taken |= 1ull << best;
        sel[j] = best;
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* u = row + n + i * r;
        float* o = out + i * r;
        if ((taken >> i) & 1ull) { for (int64_t c = 0; c < r; ++c) o[c] = w * u[c]; }
        else { for (int64_t c = 0; c < r; ++c) o[c] = 0.f; }
      }
    }
  });
  return {um, idx};
}

// Mixed batches: every token routes within its own adapter's segment of one stacked pool.
// pu: [T, N + N*r] (all slots' router logits, then all slots' A x), slot_of_token [T] (-1 = none),
// slot_off / slot_n / slot_k [S] int64, slot_omega [S] float32. Returns um [T, N*r], idx [T, kmax] global ids (-1 pad).
std::vector<torch::Tensor> topk_masked_u_multi(torch::Tensor pu, int64_t N, torch::Tensor slot_of_token,
                                               torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k,
                                               torch::Tensor slot_omega, int64_t kmax) {
  TORCH_CHECK(pu.dim() == 2 && pu.scalar_type() == torch::kFloat32 && pu.device().is_cpu() && pu.stride(1) == 1,
              "pu must be a CPU float32 [T, N + N*r] tensor with contiguous rows");
  TORCH_CHECK((pu.size(1) - N) % N == 0, "pu's width must be N + N*r");
  const int64_t T = pu.size(0), nr = pu.size(1) - N, r = nr / N, ld = pu.stride(0);
  auto um = torch::zeros({T, nr}, pu.options());
  auto idx = torch::full({T, kmax}, -1, pu.options().dtype(torch::kInt64));
  auto sot = slot_of_token.contiguous(); auto off = slot_off.contiguous(); auto nn = slot_n.contiguous();
  auto kk = slot_k.contiguous(); auto om = slot_omega.contiguous();
  const int64_t* sp = sot.data_ptr<int64_t>(); const int64_t* op = off.data_ptr<int64_t>();
  const int64_t* np = nn.data_ptr<int64_t>(); const int64_t* kp = kk.data_ptr<int64_t>(); const float* wp = om.data_ptr<float>();
  const int64_t S = off.size(0);
  const float* src = pu.data_ptr<float>(); float* dst = um.data_ptr<float>(); int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, T, 128, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = sp[t];
      if (s < 0 || s >= S) continue;
      const int64_t o = op[s], n = np[s], k = kp[s];
      const float w = wp[s];
      const float* row = src + t * ld;
      uint64_t taken = 0;
      for (int64_t j = 0; j < k && j < kmax; ++j) {
        int64_t best = -1;
        float value = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          if ((taken >> i) & 1ull) continue;
          if (best < 0 || row[o + i] > value) { best = i; value = row[o + i]; }
        }
        taken |= 1ull << best;
        ip[t * kmax + j] = o + best;
        const float* u = row + N + (o + best) * r;
        float* out = dst + t * nr + (o + best) * r;
        for (int64_t c = 0; c < r; ++c) out[c] = w * u[c];
      }
    }
  });
  return {um, idx};
}
"""

_lock = threading.Lock()
_state: dict = {}


def load():
    """The compiled module, or None when disabled or unbuildable (then a warning is logged once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("REMIX_DISABLE_EXT", "") not in ("", "0"):
            log.info("REMIX_DISABLE_EXT is set: using the torch-ops routing path")
        else:
            try:
                from torch.utils.cpp_extension import load_inline

                module = load_inline(
                    "remix_cpu_ops_v2", cpp_sources=[SOURCE], functions=["topk_masked_u", "topk_masked_u_multi"], extra_cflags=["-O3"]
                )
            except Exception as e:  # no compiler, no ninja, read-only cache...: fall back, loudly
                log.warning("could not build the C++ routing op (%s); using torch ops, which are slower on CPU", e)
        _state["module"] = module
        return module


def available() -> bool:
    return load() is not None
