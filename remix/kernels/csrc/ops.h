// The operators Python calls for a module or an attention: gather_, route_gather_, linear, ModuleCall (a module's
// arguments bound once), decode_attention, slot_attention and their 8-bit forms, with their argument checks.
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "module.h"
#include "attention_q8.h"
#include "attention_prompt.h"

// y[t] += sum_j weight[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t]), in place (idx -1 = none). Returns y.
torch::Tensor gather_(torch::Tensor x, torch::Tensor y, torch::Tensor a, torch::Tensor bt, torch::Tensor idx,
                      torch::Tensor weight, int64_t r) {
  check_pools(x, y, a, bt, r);
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.dim() == 2 && idx.size(0) == x.size(0), "idx must be int64 [T, k]");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.sizes() == idx.sizes(), "weight must be float32 [T, k]");
  auto ic = idx.contiguous(); auto wc = weight.contiguous();
  const int64_t N = a.size(0) / r;
  TORCH_CHECK(ic.numel() == 0 || (ic.max().item<int64_t>() < N && ic.min().item<int64_t>() >= -1), "idx out of range");
  const Pools pl{a.data_ptr(), bt.data_ptr(), r, N, x.size(1), y.size(1), a.scalar_type() == torch::kBFloat16};
  run(x, y, pl, nullptr, const_cast<int64_t*>(ic.data_ptr<int64_t>()), const_cast<float*>(wc.data_ptr<float>()), ic.size(1));  // read only without routing
  return y;
}

// Whether a bound call can take this slot map (empty, or int64 [T] contiguous) and counts (empty, or int64 [N]
// contiguous) on raw pointers; and the selections ip [n] (-1: none) added into counts where given.
inline bool call_args_fit(const torch::Tensor& slots, int64_t T, const torch::Tensor& counts, int64_t N) {
  return (slots.numel() == 0 || (slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == T)) &&
         (counts.numel() == 0 || (counts.scalar_type() == torch::kInt64 && counts.is_contiguous() && counts.numel() == N));
}
inline void add_counts(const torch::Tensor& counts, const int64_t* ip, int64_t n) {
  if (counts.numel() == 0) return;
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e) if (ip[e] >= 0) cp[ip[e]] += 1;
}

// Every slot's table entry fits a pool of N LoRAs (no pool, or up to 64 LoRAs inside it with 1 <= k <= min(n, kmax)),
// else an error naming the first that does not.
void check_slot_tables(const int64_t* op, const int64_t* np, const int64_t* kp, int64_t S, int64_t N, int64_t kmax) {
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(np[s] == 0 || (np[s] <= 64 && op[s] >= 0 && op[s] + np[s] <= N && kp[s] >= 1 && kp[s] <= np[s] &&
                               kp[s] <= kmax),
                message("slot %lld: bad offset / n / k", s));
}

// Each LoRA's own rank (Pools::rank) from ranks (int64 [N], each in [0, r]), or null where ranks is empty (all r).
const int64_t* checked_ranks(const torch::Tensor& ranks, int64_t N, int64_t r) {
  if (!ranks.defined() || ranks.numel() == 0) return nullptr;
  TORCH_CHECK(ranks.device().is_cpu() && ranks.scalar_type() == torch::kInt64 && ranks.is_contiguous() && ranks.numel() == N,
              "ranks must be a contiguous CPU int64 [N] tensor (one per LoRA) or empty");
  const int64_t* rp = ranks.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] <= r, message("ranks[%lld] = %lld: not in [0, r]", i, rp[i]));
  return rp;
}

// Route every token within its slot's pool (top-k of float32 router logits, ties to the lower index, constant
// weight omega) and add its delta into y in place. slot_of_token empty = every token is slot 0; slot -1, or a
// slot with n = 0, gets no delta. Returns idx [T, kmax] (global ids, -1 padded); adds each selection to counts
// [N] when counts is non-empty.
torch::Tensor route_gather_into(torch::Tensor x, torch::Tensor y, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                                torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k,
                                torch::Tensor slot_omega, int64_t r, int64_t kmax, torch::Tensor counts, torch::Tensor idx,
                                const BaseGemm& gemm = {nullptr, nullptr}, const torch::Tensor& ranks = {}) {
  check_pools(x, y, a, bt, r);
  const int64_t T = x.size(0), D = x.size(1), N = a.size(0) / r;
  TORCH_CHECK(router.scalar_type() == torch::kFloat32 && router.is_contiguous() && router.size(0) == N && router.size(1) == D,
              "router must be contiguous float32 [N, D]");
  TORCH_CHECK(kmax >= 1 && kmax <= 64, "kmax must be in [1, 64]");
  auto off = slot_off.contiguous(); auto nn = slot_n.contiguous(); auto kk = slot_k.contiguous(); auto om = slot_omega.contiguous();
  TORCH_CHECK(off.scalar_type() == torch::kInt64 && nn.scalar_type() == torch::kInt64 && kk.scalar_type() == torch::kInt64 &&
              om.scalar_type() == torch::kFloat32, "slot tables: int64 off / n / k, float32 omega");
  const int64_t S = off.numel();
  TORCH_CHECK(nn.numel() == S && kk.numel() == S && om.numel() == S, "slot tables must have one entry per slot");
  const int64_t *op = off.data_ptr<int64_t>(), *np = nn.data_ptr<int64_t>(), *kp = kk.data_ptr<int64_t>();
  check_slot_tables(op, np, kp, S, N, kmax);
  auto sot = slot_of_token.contiguous();
  const bool one = sot.numel() == 0;
  TORCH_CHECK(one || (sot.scalar_type() == torch::kInt64 && sot.numel() == T), "slot_of_token must be int64 [T] or empty");
  TORCH_CHECK(!one || S >= 1, "slot tables are empty");
  TORCH_CHECK(counts.numel() == 0 || (counts.scalar_type() == torch::kInt64 && counts.is_contiguous() && counts.numel() == N),
              "counts must be int64 [N] or empty");
  if (!idx.defined()) idx = torch::empty({T, kmax}, x.options().dtype(torch::kInt64));
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.is_contiguous() && idx.numel() == T * kmax, "idx must be int64 [T, kmax]");
  int64_t* ip = idx.data_ptr<int64_t>();
  std::fill_n(ip, T * kmax, int64_t{-1});  // not idx.fill_: a dispatched op, ~1.7 us a call at decode sizes
  std::vector<float> weight(T * kmax, 0.f);
  const Routing rt{router.data_ptr<float>(), one ? nullptr : sot.data_ptr<int64_t>(), op, np, kp, om.data_ptr<float>(), S, kmax};
  Pools pl{a.data_ptr(), bt.data_ptr(), r, N, D, y.size(1), a.scalar_type() == torch::kBFloat16};
  pl.rank = checked_ranks(ranks, N, r);
  run(x, y, pl, &rt, ip, weight.data(), kmax, gemm);
  add_counts(counts, ip, T * kmax);
  return idx;
}

torch::Tensor route_gather_(torch::Tensor x, torch::Tensor y, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                            torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k,
                            torch::Tensor slot_omega, int64_t r, int64_t kmax, torch::Tensor counts) {
  return route_gather_into(x, y, router, a, bt, slot_of_token, slot_off, slot_n, slot_k, slot_omega, r, kmax, counts, {});
}
torch::Tensor route_gather_ranks_(torch::Tensor x, torch::Tensor y, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                                  torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n,
                                  torch::Tensor slot_k, torch::Tensor slot_omega, int64_t r, int64_t kmax,
                                  torch::Tensor counts, torch::Tensor ranks) {
  return route_gather_into(x, y, router, a, bt, slot_of_token, slot_off, slot_n, slot_k, slot_omega, r, kmax, counts, {},
                           {nullptr, nullptr}, ranks);
}

// The whole module in one call: y = x @ weight^T (+ bias), then route_gather_ into it; x: [..., D]; returns
// (y [..., O], idx [T, kmax]). float32 (contiguous weight): the GEMM runs inside the gather's parallel region (BaseGemm),
// otherwise ATen's linear computes y first. Saves the Python-level call of the base layer and a second crossing.
bool g_proj_skip = true;
// ModuleCall::routed's call on the bound tensors' raw pointers (ModuleCall::Raw); off: every call through
// linear_route_gather's checked path (tests, A/B runs: _module_call_raw).
bool g_raw_call = true;
// Whether any of `rows` tokens (slots sp, or slot 0 for every token when sp is null) has a pool in a call's slot
// tables (n: LoRAs a slot), by routed_slot's rule (slot_routes).
inline bool routes_any(const int64_t* np, int64_t S, const int64_t* sp, int64_t rows) {
  for (int64_t t = 0; t < rows; ++t)
    if (slot_routes(np, S, sp ? sp[t] : 0)) return true;
  return false;
}
inline bool routes_any(const torch::Tensor& n, const int64_t* sp, int64_t rows) {
  if (n.scalar_type() != torch::kInt64 || !n.is_contiguous()) return true;  // (route_gather_into then checks them)
  return routes_any(n.data_ptr<int64_t>(), n.numel(), sp, rows);
}

torch::Tensor linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, const Ahead* ahead = nullptr);

// A module call with no token to route (a step of bare-base requests, or of adapters on other modules) runs its base
// weight by linear(): the same kernel, sums and output slices as the call's own base GEMM, so the same y,
// without the call's routing stage and barrier. (Its counts and last selections are left as they are: the call would
// add nothing to the counts.) Bare-base decode steps of the default base in bfloat16 with one adapter loaded (on the
// FFN), this and the call in turn in one process (26th session's Intel VM, medians of 8 rounds, both orders): the FFN
// projections 8.54 -> 7.64 and 8.72 -> 8.02 ms a step at 8 sequences, 9.91 -> 9.21 and 10.43 -> 9.59 at 32 (the call
// alone, 90 cycled copies outside the engine, had timed as the plain GEMM: the cost is in situ). The decode stack does
// the like for q / k / v with a LoRA on them (DecodeStack::Layer): a peft adapter on all seven linears loaded beside a
// ReMix one, its q / k / v had cost steps without it 1.93 -> 2.97 ms at 8 sequences and 2.09 -> 3.64 at 32; with the
// one GEMM 1.71 / 2.14.
// Here in the call (it first sat in the decode stack's projections) the same A/B: 9.27 -> 8.44 and 10.52 -> 9.63 ms
// (one run). g_proj_skip: off for A/B runs (_proj_skip).
std::tuple<torch::Tensor, torch::Tensor> linear_route_gather(
    torch::Tensor x, torch::Tensor weight, torch::Tensor bias, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
    torch::Tensor slot_of_token, torch::Tensor slot_off, torch::Tensor slot_n, torch::Tensor slot_k, torch::Tensor slot_omega,
    int64_t r, int64_t kmax, torch::Tensor counts, torch::Tensor idx,
    const torch::Tensor& ranks = {}) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), "x [..., D] and weight [O, D] disagree");
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  if (!idx.defined()) idx = torch::empty({x2.size(0), kmax}, x.options().dtype(torch::kInt64));
  const int64_t T = x2.size(0);
  const auto sot = slot_of_token.contiguous();
  if (g_proj_skip && kmax >= 1 && idx.scalar_type() == torch::kInt64 && idx.is_contiguous() && idx.numel() == T * kmax &&
      (sot.numel() == 0 || (sot.scalar_type() == torch::kInt64 && sot.numel() == T)) &&
      !routes_any(slot_n, sot.numel() ? sot.data_ptr<int64_t>() : nullptr, T)) {
    std::fill_n(idx.data_ptr<int64_t>(), T * kmax, int64_t{-1});
    return {linear(x, weight, bias), idx};
  }
  BaseGemm gemm = base_gemm_for(x2, weight, bias);  // on: the base GEMM runs inside the kernel's parallel region
#ifdef REMIX_AMX
  torch::Tensor btt, rtt;  // (run_fused: the delta inside the AMX GEMM; B^T's transpose and the routers made for this call)
  if (x2.scalar_type() == torch::kBFloat16 && weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() &&
      a.scalar_type() == torch::kBFloat16 && bt.scalar_type() == torch::kBFloat16 && a.dim() == 2 && bt.dim() == 2 &&
      a.is_contiguous() && bt.is_contiguous() && r >= 1 && a.size(0) % r == 0 && a.size(1) == x2.size(1) &&
      bt.size(0) == a.size(0) && bt.size(1) == weight.size(0) && router.dim() == 2 &&
      router.scalar_type() == torch::kFloat32 && router.size(0) == a.size(0) / r &&
      (!bias.numel() || (bias.scalar_type() == torch::kBFloat16 && bias.is_contiguous() && bias.numel() == weight.size(0)))) {
    Pools pl{a.data_ptr(), bt.data_ptr(), r, a.size(0) / r, x2.size(1), weight.size(0), true};
    if (fuse_applies(pl, true, T)) {
      btt = fused_btt(bt, pl);
      rtt = fused_routers(router);
      gemm = BaseGemm::fused(weight.data_ptr(), bias.numel() ? bias.data_ptr() : nullptr,
                             static_cast<const uint16_t*>(btt.data_ptr()), static_cast<const uint16_t*>(rtt.data_ptr()));
    }
  }
#endif
  auto y = gemm.on() ? torch::empty({x2.size(0), weight.size(0)}, x2.options()) : other_linear(x2, weight, bias).contiguous();
  route_gather_into(x2, y, router, a, bt, slot_of_token, slot_off, slot_n, slot_k, slot_omega, r, kmax, counts, idx, gemm,
                    ranks);
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return {y.view(shape), idx};
}


// The base layer alone, y = x W^T (+ bias), by the fused path's GEMM (BaseGemm on the same output slices) where it
// applies, else ATen's linear: the base GEMM the kernel bench measures the ReMix module against.
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, const Ahead* ahead) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), "x [..., D] and weight [O, D] disagree");
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  BaseGemm gemm = base_gemm_for(x2, weight, bias);
  gemm.ahead = ahead;
  if (!gemm.on()) {
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return other_linear(x2, weight, bias).view(shape);
  }
  const int64_t T = x2.size(0), D = x2.size(1), O = weight.size(0);
  auto y = torch::empty({T, O}, x2.options());
  const void* X = x2.data_ptr();
  void* Y = y.data_ptr();
  const int64_t P = region_threads((O + 2 * L - 1) / (2 * L));
  if (P <= 1) {
    gemm(X, Y, T, D, O, 0, O);
  } else {
    const Split sp = split_for(P);
#pragma omp parallel num_threads(P)
    {
      const auto [h, nh] = region_thread();
      const auto [o0, o1] = out_slice(O, h, nh, sp);
      split_gemm(h, nh, T, D, o0, o1, [&](int64_t a, int64_t b) { gemm(X, Y, T, D, O, a, b); });
    }
  }
  auto shape = x.sizes().vec();
  shape.back() = O;
  return y.view(shape);
}

// One module's arguments bound once, so a forward crosses into C++ with x alone (each argument pybind converts costs
// time on every call of every module) and the checks that decide whether the call applies run here, not in Python.
// module(x) returns (y, idx), or None when it does not apply: x not a CPU float32/bfloat16 tensor, autograd needed
// (grad mode on and x or a watched tensor requires grad), or a watched tensor (the parameters the bound copies were
// made from, the base's weight) changed in place or was given new storage since binding. module.routed(x, slots,
// counts) is the serving form: every token routed within its slot's pool, selections counted.
// inference tensors keep no version counter (they cannot be changed outside inference mode anyway)
inline int64_t version(const torch::Tensor& t) { return t.is_inference() ? 0 : static_cast<int64_t>(t._version()); }

struct ModuleCall {
  torch::Tensor weight, bias, router, a, bt, off, n, k, omega;
  int64_t r, kmax;
  std::vector<torch::Tensor> watched;
  std::vector<std::pair<int64_t, const void*>> seen;  // (version, data pointer) of each watched tensor at binding
  torch::Tensor ranks;  // int64 [N]: each LoRA's own rank where the stack pads some (Pools::rank), else empty

  bool applies(const torch::Tensor& x) const {
    if (!x.device().is_cpu() || (x.scalar_type() != torch::kFloat32 && x.scalar_type() != torch::kBFloat16)) return false;
    const bool grad = at::GradMode::is_enabled();
    if (grad && x.requires_grad()) return false;
    for (size_t i = 0; i < watched.size(); ++i) {
      const auto& t = watched[i];
      if ((grad && t.requires_grad()) || version(t) != seen[i].first || t.data_ptr() != seen[i].second)
        return false;
    }
    return true;
  }
  // idx goes into one buffer per module, overwritten by the next call: a fresh small tensor that the layer keeps
  // (last_idx) while y is freed splits y's freed block in glibc's heap, and every next y then lands in memory the
  // caches have not seen (measured: +10 % on a 512-token module)
  mutable torch::Tensor idx_buf;

  // The bound tensors as raw pointers and sizes, taken once at binding where they pass every check route_gather_into
  // and base_gemm_for would make of them (ok), so that a call reads none of their headers (a TensorImpl and a
  // StorageImpl each, nine tensors, cold at every call of a decode step: ~30 cache lines), copies no handle (an atomic
  // on each, twice: linear_route_gather and route_gather_into take them by value) and dispatches no reshape or view.
  // They stay valid: router, a, bt and the slot tables are never changed in place (a pool stack is replaced when an
  // adapter comes or goes, and bound again; a layer's own binding watches the parameters they alias), and the base's
  // weight and bias are watched - applies(), which every caller asks first, declines a call once one changed. Only
  // the tables' entries are checked again at each call. The sums are those of the checked path (the same run()).
  // The decode stack's FFN projections a step (default base, bfloat16, one adapter; this and the checked path in turn
  // in one process, medians of 10 rounds, both orders; 28th session's Intel VM): 9.71 -> 9.03 and 9.80 -> 9.14 ms at
  // one sequence, 10.69 -> 9.95 and 10.63 -> 10.03 at 8, 14.29 -> 13.59 and 14.24 -> 13.47 at 32 (~7 us a call).
  struct Raw {
    bool ok = false;
    at::ScalarType dt = torch::kFloat32;  // the weight's (x must match it)
    const void *w = nullptr, *b = nullptr;
    Pools pl{nullptr, nullptr, 0, 0, 0, 0};
    const float *router = nullptr, *omega = nullptr;
    const int64_t *off = nullptr, *n = nullptr, *k = nullptr;
    int64_t S = 0;
  } raw;
  void bind_raw() {
    const int64_t O = weight.size(0), D = weight.dim() == 2 ? weight.size(1) : -1, lim = int64_t{1} << 30;
#ifdef REMIX_DOT_BF16
    const bool dt_ok = weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16;
#else
    const bool dt_ok = weight.scalar_type() == torch::kFloat32;
#endif
    const auto tab = [&](const torch::Tensor& t, at::ScalarType st) {
      return t.device().is_cpu() && t.scalar_type() == st && t.is_contiguous() && t.dim() == 1 && t.numel() == off.numel();
    };
    raw.ok = dt_ok && weight.dim() == 2 && weight.device().is_cpu() && weight.is_contiguous() && O < lim && D < lim &&
             (!bias.numel() || (bias.scalar_type() == weight.scalar_type() && bias.is_contiguous() && bias.numel() == O)) &&
             kmax >= 1 && kmax <= 64 && r >= 1 && r <= 256 && a.dim() == 2 && bt.dim() == 2 && a.device().is_cpu() &&
             bt.device().is_cpu() && (a.scalar_type() == torch::kFloat32 || a.scalar_type() == torch::kBFloat16) &&
             bt.scalar_type() == a.scalar_type() && a.is_contiguous() && bt.is_contiguous() && a.size(0) % r == 0 &&
             a.size(1) == D && bt.size(0) == a.size(0) && bt.size(1) == O && router.device().is_cpu() &&
             router.scalar_type() == torch::kFloat32 && router.is_contiguous() && router.dim() == 2 &&
             router.size(0) == a.size(0) / r && router.size(1) == D && off.numel() >= 1 && tab(off, torch::kInt64) &&
             tab(n, torch::kInt64) && tab(k, torch::kInt64) && tab(omega, torch::kFloat32);
    if (!raw.ok) return;
    raw.dt = weight.scalar_type();
    raw.w = weight.data_ptr();
    raw.b = bias.numel() ? bias.data_ptr() : nullptr;
    raw.pl = Pools{a.data_ptr(), bt.data_ptr(), r, a.size(0) / r, D, O, a.scalar_type() == torch::kBFloat16};
    raw.pl.rank = ranks.defined() ? ranks.data_ptr<int64_t>() : nullptr;  // (checked at construction)
    raw.router = router.data_ptr<float>();
    raw.omega = omega.data_ptr<float>();
    raw.off = off.data_ptr<int64_t>();
    raw.n = n.data_ptr<int64_t>();
    raw.k = k.data_ptr<int64_t>();
    raw.S = off.numel();
  }
  // base_gemm_for's decision from the bound weight's facts (x has the weight's dtype and is a contiguous CPU tensor)
  BaseGemm raw_gemm(int64_t T) const { return gemm_for_rows(raw.w, raw.b, raw.dt == torch::kBFloat16, T, raw.pl.D, raw.pl.O); }

  // The Ahead of this call's pools for the slots worth prefetching whole (tokens[s]: the step's tokens of slot s; null:
  // slot 0 alone) - those whose tokens pick at least as many LoRAs as they have (g_ahead_cover) -, or an empty one where
  // the bound pools are not raw-ready or no such slot has a pool.
  Ahead ahead_for(const std::vector<int64_t>* tokens) const {
    Ahead ah;
    if (!raw.ok) return ah;
    for (int64_t s = 0; s < raw.S; ++s) {
      const int64_t count = tokens ? (s < static_cast<int64_t>(tokens->size()) ? (*tokens)[s] : 0) : s == 0;
      if (count > 0 && raw.n[s] > 0 && raw.off[s] >= 0 && raw.off[s] + raw.n[s] <= raw.pl.N &&
          (!tokens || whole_slot(count, raw.k[s], raw.n[s])))
        ah.ranges.emplace_back(raw.off[s], raw.off[s] + raw.n[s]);
    }
    if (ah.ranges.empty()) return ah;
    std::sort(ah.ranges.begin(), ah.ranges.end());
    ah.router = raw.router;
    ah.pl = raw.pl;
    return ah;
  }

  // idx_buf sized for T rows (kept while the row count stays), its data
  int64_t* idx_of(int64_t T) const {
    if (!idx_buf.defined() || idx_buf.size(0) != T) idx_buf = torch::empty({T, kmax}, torch::kInt64);
    return idx_buf.data_ptr<int64_t>();
  }

  // Whether a call on x [..., D] (T tokens) with this slot map and counts can take the raw pointers (raw_run).
  bool raw_fits(const torch::Tensor& x, int64_t T, const torch::Tensor& slot_of_token, const torch::Tensor& counts) const {
    const Raw& R = raw;
    return R.ok && g_raw_call && x.dim() >= 1 && x.size(-1) == R.pl.D && x.scalar_type() == R.dt && x.device().is_cpu() &&
           x.is_contiguous() && call_args_fit(slot_of_token, T, counts, R.pl.N);
  }
  // run() on the raw pointers: x's T tokens routed (slot map sp, or null) and gathered into y (after the base GEMM where
  // gemm is on), their selections into idx_buf (sized by idx_of) and counts.
  void raw_run(const torch::Tensor& x, const torch::Tensor& y, int64_t T, const int64_t* sp, const torch::Tensor& counts,
               const BaseGemm& gemm) const {
    const Raw& R = raw;
    check_slot_tables(R.off, R.n, R.k, R.S, R.pl.N, kmax);
    int64_t* const ip = idx_buf.data_ptr<int64_t>();
    std::fill_n(ip, T * kmax, int64_t{-1});
    std::vector<float> w(T * kmax, 0.f);
    const Routing rt{R.router, sp, R.off, R.n, R.k, R.omega, R.S, kmax};
    run(x.data_ptr(), y.data_ptr(), T, R.dt == torch::kBFloat16, R.pl, &rt, ip, w.data(), kmax, gemm);
    add_counts(counts, ip, T * kmax);
  }
#ifdef REMIX_AMX
  // B^T's transpose for run_fused ([O, fuse_cols] bfloat16, zero columns past N r), made at the first fused call: the
  // pools it copies are never changed in place (a new stack is bound anew)
  mutable torch::Tensor btt_buf;
  const uint16_t* btt() const {
    if (!btt_buf.defined()) btt_buf = fused_btt(bt, raw.pl);
    return static_cast<const uint16_t*>(btt_buf.data_ptr());
  }
  mutable torch::Tensor rtt_buf;  // the routers for run_fused's tiles (fused_routers), made with btt_buf
  const uint16_t* rtt() const {
    if (!rtt_buf.defined()) rtt_buf = fused_routers(router);
    return static_cast<const uint16_t*>(rtt_buf.data_ptr());
  }
#endif
  static const int64_t* slots_of(const torch::Tensor& slot_of_token) {
    return slot_of_token.numel() ? slot_of_token.data_ptr<int64_t>() : nullptr;
  }

  std::tuple<torch::Tensor, torch::Tensor> routed(torch::Tensor x, torch::Tensor slot_of_token, torch::Tensor counts,
                                                  const Ahead* ahead = nullptr) const {
    const int64_t T = x.dim() ? x.numel() / std::max<int64_t>(1, x.size(-1)) : 0;
    int64_t* const ip = idx_of(T);  // (the checked path below fills the same buffer)
    if (raw_fits(x, T, slot_of_token, counts)) {
      BaseGemm gemm = raw_gemm(T);
      gemm.ahead = ahead;
      const int64_t* sp = slots_of(slot_of_token);
      if (g_proj_skip && !routes_any(raw.n, raw.S, sp, T)) {  // as linear_route_gather: the base GEMM alone
        std::fill_n(ip, T * kmax, int64_t{-1});
        return {linear(x, weight, bias, ahead), idx_buf};
      }
#ifdef REMIX_AMX
      if (fuse_applies(raw.pl, raw.dt == torch::kBFloat16, T)) gemm = BaseGemm::fused(raw.w, raw.b, btt(), rtt());
#endif
      if (gemm.on()) {  // (otherwise a GEMM outside the kernel: linear_route_gather below, as before)
        auto shape = x.sizes().vec();
        shape.back() = raw.pl.O;
        auto y = torch::empty(shape, x.options());
        raw_run(x, y, T, sp, counts, gemm);
        return {y, idx_buf};
      }
    }
    return linear_route_gather(x, weight, bias, router, a, bt, slot_of_token, off, n, k, omega, r, kmax, counts, idx_buf,
                               ranks);
  }

  // routed()'s routing, sums and counts into a y that already holds the base output (contiguous, [T, O], x's dtype), in
  // place, without the GEMM: the decode stack's q / k / v under a LoRA, whose base outputs come from the layer's one
  // [q; k; v] GEMM (a token's delta is the same whatever computed its base output, and run() without a GEMM routes and
  // gathers with the same sums).
  void gather_into(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& slot_of_token,
                   const torch::Tensor& counts) const {
    const int64_t T = x.dim() ? x.numel() / std::max<int64_t>(1, x.size(-1)) : 0;
    idx_of(T);
    if (raw_fits(x, T, slot_of_token, counts) && y.scalar_type() == raw.dt && y.is_contiguous() && y.numel() == T * raw.pl.O) {
      raw_run(x, y, T, slots_of(slot_of_token), counts, {nullptr, nullptr});
      return;
    }
    route_gather_into(x.reshape({T, x.size(-1)}), y.view({T, -1}), router, a, bt, slot_of_token, off, n, k, omega, r,
                      kmax, counts, idx_buf, {nullptr, nullptr}, ranks);
  }

  // This call (an FFN's gate) and `up` on the same x: act = silu(gate(x)) * up(x), each module's selections counted
  // and left in its idx_buf as routed() leaves them, by run_pair in one region; an undefined tensor where that does not
  // apply (the caller then makes the two calls and silu_mul_, which give the same values). up_ahead: what up's GEMM
  // prefetches (the next routed module's pools).
  torch::Tensor routed_pair(const ModuleCall& up, const torch::Tensor& x, const torch::Tensor& slot_of_token,
                            const torch::Tensor& counts, const torch::Tensor& up_counts, const Ahead* up_ahead) const {
    const Raw &A = raw, &B = up.raw;
    if (!g_raw_call || !A.ok || !B.ok || A.dt != B.dt || kmax != up.kmax || x.dim() < 1 ||
        x.scalar_type() != A.dt || !x.device().is_cpu() || !x.is_contiguous() || x.size(-1) != A.pl.D ||
        B.pl.D != A.pl.D || B.pl.O != A.pl.O)
      return {};
    const int64_t T = x.numel() / A.pl.D;
    const bool bf16 = A.dt == torch::kBFloat16;
    if (T < 1 || T >= SPLIT_POOLS_BELOW || region_threads((A.pl.O + 2 * L - 1) / (2 * L)) <= 1 ||
        (bf16 && (!phase_a_reads_bf16(A.pl) || !phase_a_reads_bf16(B.pl))))
      return {};
    if (!call_args_fit(slot_of_token, T, counts, A.pl.N) || !call_args_fit(slot_of_token, T, up_counts, B.pl.N)) return {};
    BaseGemm ga = raw_gemm(T), gb = up.raw_gemm(T);
    if (!ga.on() || !gb.on()) return {};
    gb.ahead = up_ahead;
    const int64_t* sp = slot_of_token.numel() ? slot_of_token.data_ptr<int64_t>() : nullptr;
    const bool route_a = !g_proj_skip || routes_any(A.n, A.S, sp, T), route_b = !g_proj_skip || routes_any(B.n, B.S, sp, T);
    if (route_a) check_slot_tables(A.off, A.n, A.k, A.S, A.pl.N, kmax);
    if (route_b) check_slot_tables(B.off, B.n, B.k, B.S, B.pl.N, kmax);
    int64_t *ia = idx_of(T), *ib = up.idx_of(T);
    std::fill_n(ia, T * kmax, int64_t{-1});
    std::fill_n(ib, T * kmax, int64_t{-1});
    std::vector<float> wa(T * kmax, 0.f), wb(T * kmax, 0.f);
    const Routing ra{A.router, sp, A.off, A.n, A.k, A.omega, A.S, kmax}, rb{B.router, sp, B.off, B.n, B.k, B.omega, B.S, kmax};
    auto shape = x.sizes().vec();
    shape.back() = A.pl.O;
    auto ya = torch::empty(shape, x.options()), yb = torch::empty(shape, x.options());
    run_pair(x.data_ptr(), ya.data_ptr(), yb.data_ptr(), T, bf16, A.pl, B.pl, route_a ? &ra : nullptr,
             route_b ? &rb : nullptr, ia, wa.data(), ib, wb.data(), kmax, ga, gb);
    add_counts(counts, ia, T * kmax);
    add_counts(up_counts, ib, T * kmax);
    return ya;
  }
};


// Calls f(float{}) or f(c10::BFloat16{}) by dtype: the element type of the float32 / bfloat16 ops below.
template <typename F>
void by_dtype(at::ScalarType t, F&& f) {
  TORCH_CHECK(t == torch::kFloat32 || t == torch::kBFloat16, "float32 or bfloat16 only");
  if (t == torch::kFloat32) f(float{});
  else f(c10::BFloat16{});
}

// Calls f(std::integral_constant<int, Dh>{}) for a head width of 16, 32, 64 or 128 (any other: 128; check_decode
// admits only these): the attentions' kernels are templates on it.
template <typename F>
void by_head_dim(int64_t Dh, F&& f) {
  if (Dh == 16) f(std::integral_constant<int, 16>{});
  else if (Dh == 32) f(std::integral_constant<int, 32>{});
  else if (Dh == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

// Attention of one decode token per row over a slot cache: row i (cache row row0 + i) attends to its first lens[i]
// positions. qk: [b, >= Hq, Dh] (its first Hq heads are the queries, head stride Dh, as the fused q/k/v output gives
// them); K, V: [S, Hkv, P, Dh] contiguous; query head h reads key/value head h / (Hq / Hkv), as repeat_kv maps them.
// Returns [b, Hkv, Hq / Hkv, Dh] in qk's dtype (float32 or bfloat16; arithmetic in float32), the layout SDPA returns
// for the GQA-packed query. Dh must be 16, 32, 64 or 128.
// The checks both decode attentions share; returns lens' data.
const int64_t* check_decode(const torch::Tensor& qk, const torch::Tensor& K, const torch::Tensor& V, int64_t row0,
                            const torch::Tensor& ln, int64_t Hq, const torch::Tensor& slots) {
  TORCH_CHECK(qk.device().is_cpu() && qk.dim() == 3 && K.dim() == 4 && V.sizes() == K.sizes() && K.is_contiguous() &&
              V.is_contiguous() && K.device().is_cpu() && V.device().is_cpu(),
              "qk must be a CPU [b, heads, Dh] tensor, K and V contiguous CPU [S, Hkv, P, Dh] tensors");
  TORCH_CHECK(qk.scalar_type() == torch::kFloat32 || qk.scalar_type() == torch::kBFloat16, "qk must be float32 or bfloat16");
  const int64_t b = qk.size(0), Hkv = K.size(1), P = K.size(2), Dh = K.size(3);
  TORCH_CHECK(Dh == 16 || Dh == 32 || Dh == 64 || Dh == 128, message("head dim must be 16, 32, 64 or 128, got %lld", Dh));
  TORCH_CHECK(qk.size(2) == Dh && qk.stride(2) == 1 && qk.stride(1) == Dh && qk.size(1) >= Hq, "qk must be [b, >= Hq, Dh] with heads Dh apart");
  TORCH_CHECK(Hq >= Hkv && Hq % Hkv == 0 && Hq / Hkv <= MAX_GROUP, message("query heads must be 1 to %lld times the key/value heads", MAX_GROUP));
  if (slots.defined()) {
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == b, "slots must be int64 [b]");
    const int64_t* sp = slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; ++i)
      TORCH_CHECK(sp[i] >= 0 && sp[i] < K.size(0), message("slots[%lld] = %lld out of the cache's %lld", i, sp[i], K.size(0)));
  } else {
    TORCH_CHECK(row0 >= 0 && row0 + b <= K.size(0), "rows out of the cache");
  }
  TORCH_CHECK(ln.scalar_type() == torch::kInt64 && ln.numel() == b, "lens must be int64 [b]");
  const int64_t* lp = ln.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i)
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= P, message("lens[%lld] = %lld out of [1, %lld]", i, lp[i], P));
  return lp;
}

// prompt (with slots): the rows are prompt tokens, which take the prompt kernel where it applies (bfloat16 with
// AVX512-BF16: prompt_attention, on AMX tiles or vectors; float32 with AVX-512 or AVX2 + FMA: prompt_attention_f32).
torch::Tensor attention_at(torch::Tensor qk, torch::Tensor K, torch::Tensor V, int64_t row0, torch::Tensor slots,
                           torch::Tensor lens, int64_t Hq, double scale, bool prompt = false) {
  auto ln = lens.contiguous();
  const int64_t* lp = check_decode(qk, K, V, row0, ln, Hq, slots);
  TORCH_CHECK(qk.scalar_type() == K.scalar_type() && K.scalar_type() == V.scalar_type(), "qk, K and V must share float32 or bfloat16");
  const int64_t b = qk.size(0), Hkv = K.size(1), P = K.size(2), Dh = K.size(3), nrep = Hq / Hkv;
  auto out = torch::empty({b, Hkv, nrep, Dh}, qk.options());
#ifdef REMIX_DOT_BF16
  if (prompt && slots.defined() && qk.scalar_type() == torch::kBFloat16 && prompt_tiles_apply(Dh)) {
    const auto u16 = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    by_head_dim(Dh, [&](auto dh) {
      if constexpr (dh() >= 32)  // (prompt_tiles_apply admits 32, 64 and 128 only: whole AMX steps)
        prompt_attention_any<dh()>(u16(qk), qk.stride(0), u16(K), u16(V), Hkv, P, lp, slots.data_ptr<int64_t>(), b,
                                   nrep, static_cast<float>(scale),
                                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
    });
    return out;
  }
#endif
#ifdef REMIX_PROMPT_F32
  if (prompt && slots.defined() && qk.scalar_type() == torch::kFloat32 && prompt_tiles_apply(Dh, /*bf16=*/false)) {
    by_head_dim(Dh, [&](auto dh) {
      prompt_attention_f32<dh()>(qk.data_ptr<float>(), qk.stride(0), K.data_ptr<float>(), V.data_ptr<float>(), Hkv, P,
                                 lp, slots.data_ptr<int64_t>(), b, nrep, static_cast<float>(scale), out.data_ptr<float>());
    });
    return out;
  }
#endif
  by_dtype(qk.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    by_head_dim(Dh, [&](auto dh) {
      decode_attention_impl<T, dh()>(qk.data_ptr<T>(), qk.stride(0), K.data_ptr<T>(), V.data_ptr<T>(), row0, Hkv, P, lp, b,
                                     nrep, static_cast<float>(scale), out.data_ptr<T>(),
                                     slots.defined() ? slots.data_ptr<int64_t>() : nullptr);
    });
  });
  return out;
}

torch::Tensor decode_attention(torch::Tensor qk, torch::Tensor K, torch::Tensor V, int64_t row0, torch::Tensor lens,
                               int64_t Hq, double scale) {
  return attention_at(qk, K, V, row0, torch::Tensor(), lens, Hq, scale);
}

// decode_attention with each query row i reading cache row slots[i] (int64 [b]): a prefill chunk's tokens, several to
// a slot, each over its own first lens[i] positions (its position + 1) - the same kernel and order as a decode token's;
// with prompt (the rows are prompt tokens, not checked drafts), the prompt kernel instead where it applies (attention_at).
torch::Tensor slot_attention(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor slots, torch::Tensor lens,
                             int64_t Hq, double scale, bool prompt) {
  return attention_at(qk, K, V, 0, slots.contiguous(), lens, Hq, scale, prompt);
}

// decode_attention over an 8-bit cache: V int8 [S, Hkv, P, Dh], K int8 in blocks [S, Hkv, P / 16, Dh / 2, 16, 2], Ks,
// Vs their float32 scales [S, Hkv, P]; qk and the output float32 or bfloat16. The integer path where the build has
// AVX512-VNNI and Dh is 32, 64 or 128, else the float path.
torch::Tensor attention_at_q8(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor Ks, torch::Tensor Vs,
                              int64_t row0, torch::Tensor slots, torch::Tensor lens, int64_t Hq, double scale) {
  auto ln = lens.contiguous();
  const int64_t* lp = check_decode(qk, V, V, row0, ln, Hq, slots);
  TORCH_CHECK(K.scalar_type() == torch::kChar && V.scalar_type() == torch::kChar, "K and V must be int8");
  TORCH_CHECK(K.dim() == 6 && K.is_contiguous() && K.size(0) == V.size(0) && K.size(1) == V.size(1) &&
              K.size(2) * KB == V.size(2) && K.size(3) * 2 == V.size(3) && K.size(4) == KB && K.size(5) == 2,
              "K must be a contiguous int8 [S, Hkv, P / 16, Dh / 2, 16, 2] tensor (blocks of 16 positions) beside V [S, Hkv, P, Dh]");
  TORCH_CHECK(Ks.scalar_type() == torch::kFloat32 && Vs.scalar_type() == torch::kFloat32 && Ks.is_contiguous() &&
              Vs.is_contiguous() && Ks.sizes() == V.sizes().slice(0, 3) && Vs.sizes() == Ks.sizes(),
              "Ks and Vs must be contiguous float32 [S, Hkv, P]");
  const int64_t b = qk.size(0), Hkv = V.size(1), P = V.size(2), Dh = V.size(3), nrep = Hq / Hkv;
  auto out = torch::empty({b, Hkv, nrep, Dh}, qk.options());
  by_dtype(qk.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    by_head_dim(Dh, [&](auto dh) {
      decode_attention_q8_impl<T, dh()>(qk.data_ptr<T>(), qk.stride(0), K.data_ptr<int8_t>(), V.data_ptr<int8_t>(),
                                        Ks.data_ptr<float>(), Vs.data_ptr<float>(), row0, Hkv, P, lp, b, nrep,
                                        static_cast<float>(scale), out.data_ptr<T>(),
                                        slots.defined() ? slots.data_ptr<int64_t>() : nullptr);
    });
  });
  return out;
}

torch::Tensor decode_attention_q8(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor Ks, torch::Tensor Vs,
                                  int64_t row0, torch::Tensor lens, int64_t Hq, double scale) {
  return attention_at_q8(qk, K, V, Ks, Vs, row0, torch::Tensor(), lens, Hq, scale);
}

torch::Tensor slot_attention_q8(torch::Tensor qk, torch::Tensor K, torch::Tensor V, torch::Tensor Ks, torch::Tensor Vs,
                                torch::Tensor slots, torch::Tensor lens, int64_t Hq, double scale) {
  return attention_at_q8(qk, K, V, Ks, Vs, 0, slots.contiguous(), lens, Hq, scale);
}
