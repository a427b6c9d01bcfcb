// DecodeStack: every decoder layer of a decode step in one call (the same ops, order and values as the lean
// forward's Python loop).
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "ops.h"
#include "layer_ops.h"

// ---- the decoder layers of one decode step in one call (the engine's lean forward on CPU, see server/engine/fastpath.py)
// The same calls, in the same order and on the same tensors, as the Python loop of LeanForward for a decode step:
// add_rms_norm_, the fused q/k/v linear, rotary_, kv_write_ of K and V, decode_attention, o_proj, add_rms_norm_,
// silu(gate) * up in place, down_proj - so the result is bit-identical to it; what goes is ~10 Python-level calls a layer
// (~3 ms a 32-sequence step of the default base, ~2.5 ms of a one-sequence step of ~25 ms).
// A projection is either a ModuleCall (a ReMix layer: base GEMM, routing and gather, with its slot map and counts)
// or a plain linear (weight, bias) run by linear() above.
struct Proj {
  pybind11::object owner;  // the ModuleCall's Python object (kept alive), or None
  const ModuleCall* call = nullptr;
  torch::Tensor w, b, counts;
  torch::Tensor operator()(const torch::Tensor& x, const torch::Tensor& slots, const Ahead* ahead = nullptr) const {
    return call ? std::get<0>(call->routed(x, slots, counts, ahead)) : linear(x, w, b, ahead);
  }
};

// The decode stack's clock (server.bench's "where a decode step goes"): the nanoseconds DecodeStack::run spent in each
// kind of op since the last read (stack_clock), and the runs they cover. Off unless switched on; on, a run reads the
// clock ~12 times a layer (~0.3 us a layer here), each op's time taken from the end of the op before it.
constexpr int STACK_OPS = 10;  // the kinds, in the order of STACK_OPS in remix/kernels/cpu_ext.py
enum StackOp { OP_NORMS, OP_QKV, OP_ROTARY, OP_KV_WRITE, OP_ATTENTION, OP_O_PROJ, OP_GATE, OP_UP, OP_ACT, OP_DOWN };
bool g_stack_clock = false;
bool g_qkv_gather = true;  // DecodeStack::qkv_of
double g_stack_ns[STACK_OPS];
int64_t g_stack_runs = 0;
struct StackClock {
  const bool on = g_stack_clock;
  std::chrono::steady_clock::time_point t = on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  void lap(StackOp op) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    g_stack_ns[op] += std::chrono::duration<double, std::nano>(now - t).count();
    t = now;
  }
};

struct DecodeStack {
  struct Layer {
    // wqkv: the base [q; k; v] weight (its rows the three base weights); undefined: q, k and v run as three projections
    // (some wrapped). Both given (a LoRA on q / k / v, base weights still those rows): wqkv where no token of the call
    // routes in q, k or v (any_routed), the projections where one does - the same base outputs either way (the
    // compiled GEMM's sums do not depend on the other outputs of the call)
    torch::Tensor in_w, post_w, wqkv, bqkv;
    double in_eps, post_eps;
    Proj q, k, v, o, gate, up, down;
  };
  // Whether any of the b tokens has a pool in one of L's wrapped q / k / v projections.
  static bool any_routed(const Layer& L, const int64_t* sp, int64_t b) {
    for (const Proj* p : {&L.q, &L.k, &L.v})
      if (p->call && routes_any(p->call->n, sp, b)) return true;
    return false;
  }
  // Layer L's q / k / v outputs [b, (H + 2 Hkv) Dh]: the one [q; k; v] GEMM where no token routes in them; where
  // some do, in steps of one row (QKV_GATHER_BELOW) where that GEMM is the compiled one (its outputs' sums do not depend
  // on the other outputs), the same GEMM, then each routed projection's gather into its columns (gather_into: a gather
  // of one token opens no parallel region); else the three projections in turn. The same values either way.
  // g_qkv_gather off: the three in turn wherever a token routes (A/B runs and tests: _qkv_gather). Measured (36th
  // session, Zen 4 VM, default base in bfloat16, steps alternating; scripts/ab_steps.py --peft --ops qkv, which also
  // loads four ReMix adapters on the FFN): one sequence 1.83 -> 1.77 ms of q / k / v a step; with the peft LoRA alone
  // loaded 2.09 -> 1.69. From two rows the outcome hung on what else was loaded: the gathers on the calling thread were
  // faster with the peft LoRA alone (8 / 32 sequences 2.75 -> 2.62, 6.70 -> 6.53) and slower beside the four ReMix
  // adapters (2.02 -> 2.30, 5.17 -> 5.85); as two-thread regions, slower at 8 either way (2.57 -> 2.81).
  static constexpr int64_t QKV_GATHER_BELOW = 2;
  torch::Tensor qkv_of(const Layer& L, const torch::Tensor& x, const torch::Tensor& slots, const int64_t* sp, int64_t b) const {
    const bool fused = L.wqkv.defined();
    if (fused && !any_routed(L, sp, b)) return linear(x, L.wqkv, L.bqkv);
    if (!fused || !g_qkv_gather || b >= QKV_GATHER_BELOW || !base_gemm_for(x.reshape({-1, x.size(-1)}), L.wqkv, L.bqkv).on())
      return torch::cat({L.q(x, slots), L.k(x, slots), L.v(x, slots)}, -1);
    auto qkv = linear(x, L.wqkv, L.bqkv);
    int64_t c0 = 0;
    for (const Proj* p : {&L.q, &L.k, &L.v}) {
      const int64_t c1 = c0 + (p == &L.q ? H : Hkv) * Dh;
      if (p->call && routes_any(p->call->n, sp, b)) {
        auto cols = qkv.slice(-1, c0, c1);
        auto y = cols.contiguous();
        p->call->gather_into(x, y, slots, p->counts);
        cols.copy_(y);
      }
      c0 = c1;
    }
    return qkv;
  }
  std::vector<Layer> layers;
  int64_t H, Hkv, Dh;
  double scaling;

  // None when a ReMix call does not apply to h (see ModuleCall::applies), else (h, the last sublayer's output not
  // yet added into h); h [b, 1, D] is updated in place, as the Python loop does.
  // Ks, Vs: an 8-bit cache's scales, one per layer (K and V int8), or empty.
  // cache_rows (int64 [b], or empty): row i is a token of cache row cache_rows[i] at position pos[i] (attending to its
  // first lens[i] positions) - the tokens of prefill chunks or checked drafts, several to a row, as the Python loop's
  // slot_attention and kv writes take them; empty: a decode step, row i of cache row row0 + i. prompt (with cache_rows):
  // those tokens are prompt tokens (slot_attention's prompt).
  pybind11::object run(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, const std::vector<torch::Tensor>& K,
                       const std::vector<torch::Tensor>& V, int64_t row0, torch::Tensor pos, torch::Tensor lens,
                       torch::Tensor slots, const std::vector<torch::Tensor>& Ks, const std::vector<torch::Tensor>& Vs,
                       torch::Tensor cache_rows, bool prompt) const {
    TORCH_CHECK(K.size() == layers.size() && V.size() == layers.size(), "one K and one V cache per layer");
    const bool q8 = !Ks.empty();
    TORCH_CHECK(!q8 || (Ks.size() == layers.size() && Vs.size() == layers.size()), "one K and one V scale tensor per layer");
    TORCH_CHECK(h.dim() == 3 && h.size(1) == 1, "h must be [b, 1, D]: one decode token per row");
    for (const auto& L : layers)
      for (const Proj* p : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
        if (p->call && !p->call->applies(h)) return pybind11::none();
    const int64_t b = h.size(0);
    const bool by_rows = cache_rows.defined() && cache_rows.numel() > 0;
    if (by_rows) {
      cache_rows = cache_rows.contiguous();
      TORCH_CHECK(cache_rows.scalar_type() == torch::kInt64 && cache_rows.numel() == b, "cache_rows must be int64 [b]");
      row0 = 0;
    }
    torch::Tensor pending = torch::empty({0}, h.options());
    const torch::Tensor slots_c = slots.numel() ? slots.contiguous() : slots;
    TORCH_CHECK(!slots_c.numel() || (slots_c.scalar_type() == torch::kInt64 && slots_c.numel() == b), "slots must be int64 [b] or empty");
    const int64_t* sp = slots_c.numel() ? slots_c.data_ptr<int64_t>() : nullptr;
    // without the GIL (nothing below touches Python): a step holds it ~25-80 ms here, and the server's HTTP threads
    // (streaming, /metrics, new requests) must not wait a whole step for it, as they did not between the Python loop's ops
    // the slots in this step, and each routed projection's Ahead for them (prefetched during the GEMM before it)
    const bool ahead_on = g_ahead_from > 0 && b >= g_ahead_from;
    std::vector<Ahead> aheads;  // per layer: gate, up, down
    if (ahead_on) {
      aheads.resize(3 * layers.size());
      int64_t S = 0;  // the slot tables' longest
      for (const auto& L : layers)
        for (const Proj* p : {&L.gate, &L.up, &L.down})
          if (p->call) S = std::max(S, p->call->raw.S);
      std::vector<int64_t> used(S, 0);  // tokens a slot (a slot past every table routes nowhere)
      for (int64_t t = 0; sp && t < b; ++t)
        if (sp[t] >= 0 && sp[t] < S) ++used[sp[t]];
      for (size_t i = 0; i < layers.size(); ++i) {
        const Proj* ps[3] = {&layers[i].gate, &layers[i].up, &layers[i].down};
        for (int j = 0; j < 3; ++j)
          if (ps[j]->call) aheads[3 * i + j] = ps[j]->call->ahead_for(sp ? &used : nullptr);
      }
    }
    auto ahead_of = [&](size_t i, int j) -> const Ahead* {
      if (!ahead_on) return nullptr;
      const Ahead& ah = aheads[3 * i + j];
      return ah.ranges.empty() ? nullptr : &ah;
    };
    {
    pybind11::gil_scoped_release nogil;
    struct StackAhead {  // t_stack_ahead for the layers below, off again however they end
      explicit StackAhead(bool on) { t_stack_ahead = on; }
      ~StackAhead() { t_stack_ahead = false; }
    } stack_ahead(ahead_on);
    StackClock clock;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& L = layers[i];
      auto x = add_rms_norm_(h, pending, L.in_w, L.in_eps);
      clock.lap(OP_NORMS);
      auto qkv = qkv_of(L, x, slots, sp, b).view({b, 1, H + 2 * Hkv, Dh});
      clock.lap(OP_QKV);
      rotary_(qkv.view({-1, H + 2 * Hkv, Dh}).slice(1, 0, H + Hkv), cos, sin);
      clock.lap(OP_ROTARY);
      const auto k = qkv.slice(2, H, H + Hkv).transpose(1, 2), v = qkv.slice(2, H + Hkv, H + 2 * Hkv).transpose(1, 2);
      const auto qk = qkv.select(1, 0).slice(1, 0, H + Hkv);
      torch::Tensor o;
      const torch::Tensor at_rows = by_rows ? cache_rows : torch::Tensor();
      if (q8) {
        kv_write_q8_(K[i], Ks[i], k, row0, pos, at_rows);
        kv_write_q8_(V[i], Vs[i], v, row0, pos, at_rows);
        clock.lap(OP_KV_WRITE);
        o = attention_at_q8(qk, K[i], V[i], Ks[i], Vs[i], row0, at_rows, lens, H, scaling);
      } else {
        kv_write_(K[i], k, row0, pos, at_rows);
        kv_write_(V[i], v, row0, pos, at_rows);
        clock.lap(OP_KV_WRITE);
        o = attention_at(qk, K[i], V[i], row0, at_rows, lens, H, scaling, prompt && by_rows);
      }
      o = o.reshape({b, H, 1, Dh}).transpose(1, 2).reshape({b, 1, H * Dh});
      clock.lap(OP_ATTENTION);
      pending = L.o(o, slots, ahead_of(i, 0));
      clock.lap(OP_O_PROJ);
      x = add_rms_norm_(h, pending, L.post_w, L.post_eps);
      clock.lap(OP_NORMS);
      // a routed gate, up and silu(gate) * up in one region in steps of few rows (run_pair: the same values), its
      // time on the clock's gate
      auto act = L.gate.call && L.up.call && b < g_fuse_pair_below
                     ? L.gate.call->routed_pair(*L.up.call, x, slots, L.gate.counts, L.up.counts, ahead_of(i, 2))
                     : torch::Tensor();
      if (act.defined()) {
        clock.lap(OP_GATE);
      } else {
        act = L.gate(x, slots, ahead_of(i, 1));
        clock.lap(OP_GATE);
        auto up = L.up(x, slots, ahead_of(i, 2));
        clock.lap(OP_UP);
        silu_mul_(act, up);
        clock.lap(OP_ACT);
      }
      pending = L.down(act, slots);
      clock.lap(OP_DOWN);
    }
    if (clock.on) ++g_stack_runs;
    }  // the GIL again
    return pybind11::cast(std::make_tuple(h, pending));
  }
};

// A projection from Python: (ModuleCall, counts) or (weight, bias or None).
Proj to_proj(const pybind11::tuple& t) {
  TORCH_CHECK(t.size() == 2, "a projection is (ModuleCall, counts) or (weight, bias)");
  Proj p;
  if (pybind11::isinstance<ModuleCall>(t[0])) {
    p.owner = t[0];
    p.call = &t[0].cast<const ModuleCall&>();
    p.counts = t[1].cast<torch::Tensor>();
  } else {
    p.owner = pybind11::none();
    p.w = t[0].cast<torch::Tensor>();
    p.b = t[1].is_none() ? torch::empty({0}, p.w.options()) : t[1].cast<torch::Tensor>();
  }
  return p;
}
