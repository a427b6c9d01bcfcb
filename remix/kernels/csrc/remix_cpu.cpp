// The CPU kernels' one translation unit: every part in csrc/ in order, then the Python module's bindings.
// remix/kernels/cpu_ext.py builds it on first use (torch's JIT extension loader, -O3 -march=native -fopenmp) and
// documents each operator; each part says what it holds.
// The parts are headers of this one file: ModuleCall and DecodeStack (global, for pybind11) hold types of their
// anonymous namespace, which GCC flags only where the class is defined in a header (-Wsubobject-linkage).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif
#include <utility>  // std::exchange (the switches below that return their setting before)

#include "common.h"
#include "gather.h"
#include "gemm.h"
#include "amx.h"
#include "base_gemm.h"
#include "module.h"
#include "vec_math.h"
#include "attention.h"
#include "attention_q8.h"
#include "attention_prompt.h"
#include "ops.h"
#include "sampling.h"
#include "layer_ops.h"
#include "decode_stack.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_norm_vec", [](bool on) { return std::exchange(g_norm_vec, on); },
        "A/B runs and tests: add_rms_norm_'s vector loops (default on; off: the scalar loops, the same values)");
  m.def("_rotary_vec", [](bool on) { return std::exchange(g_rotary_vec, on); },
        "A/B runs and tests: rotary_'s vector loop (default on; off: the scalar loop, the same values)");
  m.def("_proj_skip", [](bool on) { g_proj_skip = on; }, "A/B");
  m.def("_qkv_gather", [](bool on) { g_qkv_gather = on; },
        "tests and A/B runs: the decode stack's routed q / k / v as one GEMM then their gathers (default on)");
  m.def("_fuse_pair_below", [](int64_t rows) { return std::exchange(g_fuse_pair_below, rows); },
        "tests and A/B runs: decode steps of fewer rows run a routed gate, up and silu in one region (default 9); returns "
        "the setting before");
  m.def("_ahead_from", [](int64_t rows, double start) {
    return std::make_tuple(std::exchange(g_ahead_from, rows), std::exchange(g_ahead_start, start));
  }, "tests and A/B runs: decode steps from `rows` prefetch each routed module's pools during the GEMM before it, from "
     "the share `start` of its blocks (0: never); returns the setting before");
  m.def("_narrow_cvt", [](bool on) {
#ifdef __AVX512F__
    g_narrow_cvt = on;
#endif
  }, "A/B runs and tests: float32 -> bfloat16 rounding by vcvtneps2bf16 where no lane is special (default on)");
  m.def("_to_bf16", [](torch::Tensor x) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(), "contiguous CPU float32");
    auto out = torch::empty(x.sizes(), x.options().dtype(torch::kBFloat16));
    narrow(x.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), x.numel());
    return out;
  }, "tests: the kernels' float32 -> bfloat16 rounding (narrow) of a tensor");
  m.def("_route_units", [](bool on) { g_route_units = on; }, "A/B");
  m.def("_split_adapt", [](bool on) { return std::exchange(g_split_adapt, on); },
        "A/B runs and tests: output splits weighted by each thread's measured GEMM speed (default on; off: even, and the "
        "weights kept as they were for when it is on again). Returns the setting before");
  m.def("_split_fixed", [](std::vector<double> shares) {
    if (!shares.empty()) {  // (checked before any state changes: a bad call leaves the split as it was)
      TORCH_CHECK(shares.size() >= 2 && shares.size() <= MAX_SPLIT, "_split_fixed: 2 to ", MAX_SPLIT, " shares");
      double total = 0;
      for (const double v : shares) { TORCH_CHECK(v >= 0, "_split_fixed: shares must be >= 0"); total += v; }
      TORCH_CHECK(total > 0, "_split_fixed: shares must not all be 0");
    }
    for (auto& m : g_split_meter) { m.cycles.store(0); m.work.store(0); }
    g_split_team.store(0);
    g_split_last_n = -1;
    g_split_fixed = !shares.empty();
    if (!shares.empty()) split_store(shares.data(), static_cast<int64_t>(shares.size()));
  }, "tests: fixed shares of a team's outputs, one a thread (not updated), until called with [] (adaptive again, from even)");
  m.def("_attention_by_length", [](bool on) { return std::exchange(g_attn_by_length, on); },
        "A/B runs: the decode attention's items split by their rows' lengths (default on) or by count; returns the setting before");
  m.def("_split_drag", [](int64_t thread, int64_t extra) {
    g_split_drag_thread = thread;
    g_split_drag_extra = extra;
  }, "A/B runs: thread `thread` runs each of its GEMM slices `extra` more times (a slow vCPU's stand-in; -1: none)");
  m.def("_split_state", []() {
    const int64_t nh = g_split_team.load();
    std::vector<double> w;
    for (int64_t h = 0; h < nh; ++h) w.push_back(static_cast<double>(g_split_w[h].load()) / SPLIT_UNITS);
    return w;
  }, "tests and A/B runs: each thread's share of the outputs now ([]: even)");
  m.def("_split_feed", [](std::vector<double> ticks, std::vector<double> work) {
    TORCH_CHECK(ticks.size() == work.size() && ticks.size() >= 2 && ticks.size() <= MAX_SPLIT, "_split_feed: one tick and work count a thread");
    for (size_t h = 0; h < ticks.size(); ++h) {
      g_split_meter[h].cycles.fetch_add(static_cast<uint64_t>(ticks[h]));
      g_split_meter[h].work.fetch_add(static_cast<uint64_t>(work[h]));
    }
    return split_update(static_cast<int64_t>(ticks.size()));
  }, "tests: adds measurements to the threads' meters and updates the weights from them (as every SPLIT_EVERY regions); "
     "returns whether they were read");
  m.def("_pair_own_bt", [](bool on) { g_pair_own_bt = on; },
        "A/B runs: run_pair's GEMMs prefetch their own selected LoRAs' B^T rows (default on)");
  m.def("_chunk_b", [](int64_t cols, int64_t from) {
    return std::make_tuple(std::exchange(g_chunk_b, cols), std::exchange(g_chunk_b_from, from));
  }, "tests and A/B runs: float32 calls from `from` rows take GEMM and phase B in chunks of `cols` outputs (0: off); "
     "returns the setting before");
  m.def("_trivial_route", [](bool on) { g_trivial_route = on; },
        "tests and A/B runs: a small call whose tokens all sit in one-LoRA slots skips its routing stage (default on)");
  m.def("_single_route", [](bool skip) { g_skip_single = skip; },
        "tests and A/B runs: a one-LoRA slot's routing skipped (its LoRA every token's top 1; default on)");
  m.def("_module_call_raw", [](bool on) { g_raw_call = on; }, "tests and A/B runs: ModuleCall's call on raw pointers (default on)");
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta in place, then LlamaRMSNorm(h) * weight");
#if defined(REMIX_DOT_BF16) || defined(REMIX_PROMPT_F32)
  m.def("_prompt_tiles", [](bool on) { return std::exchange(g_prompt_tiles, on); },
        "A/B runs and tests: prompt tokens' attention by tiles of tokens (default: bfloat16 on AMX tiles, else vectors; "
        "float32 on vectors) or the decode kernel; returns the setting before");
  m.def("_prompt_dtypes", []() {
    std::vector<std::string> d;
#ifdef REMIX_PROMPT_F32
    d.push_back("float32");
#endif
#ifdef REMIX_DOT_BF16
    d.push_back("bfloat16");
#endif
    return d;
  }, "the dtypes whose prompt tokens take the prompt kernel in this build");
  m.def("_prompt_amx", [](bool on) { return std::exchange(g_prompt_amx, on); },
        "A/B runs and tests: the prompt kernel on AMX tiles where the CPU has them (default) or on vectors");
  m.def("_prompt_tiles_calls", []() { return g_prompt_tiles_calls.exchange(0); },
        "tests: how many attention calls of prompt tokens took the prompt kernel since the last call");
#endif
  m.def("_ahead_cover", [](double c) { return std::exchange(g_ahead_cover, c); },
        "A/B runs: prefetch a slot's pools from tokens x k >= c x n; returns the setting before");
  m.def("_own_bt", [](bool on, double start) {
    return std::make_tuple(std::exchange(g_own_bt, on), std::exchange(g_own_start, start));
  }, "A/B runs: a small call's own B^T rows prefetched during its GEMM, from this share of its blocks (default: off on "
     "Intel CPUs, else on; 0.75); returns the setting before");
  m.def("_pool_prefetch_pays", []() { return pool_prefetch_pays(); },
        "whether the pools' software prefetches are on by default on this CPU (off on Intel's)");
#ifdef REMIX_AMX
  m.def("_amx_tokens", [](bool on) { return std::exchange(g_amx_tokens, on); },
        "A/B runs and tests: bfloat16 linears from 128 rows on AMX tiles by token shares (default) or oneDNN's");
  m.def("_phase_a_pair", [](bool on) { return std::exchange(g_phase_a_pair, on); },
        "A/B runs and tests: phase A on tiles two row tiles at a time (default) or one");
  m.def("_route_lanes", [](bool on) { return std::exchange(g_route_lanes, on); },
        "A/B runs and tests: a fused call's top k for a token block's tokens of one slot at once (default) or one by one");
  m.def("_route_tiles_calls", []() { return g_route_tiles_calls.exchange(0); },
        "tests: how many token tiles of fused calls were routed on the AMX tiles since the last call");
  m.def("_fuse_route", [](bool on) { return std::exchange(g_fuse_route, on); },
        "A/B runs and tests: fused calls route on the tiles (default) or by route_rows");
  m.def("_fuse_from", [](int64_t rows) { return std::exchange(g_fuse_from, rows); },
        "A/B runs and tests: bfloat16 calls from this many rows take the delta inside the AMX GEMM (run_fused; 0: never)");
#endif
  m.def("_phase_a_prefetch", [](bool on) { g_pa_pf = on; }, "A/B runs: phase A's prefetch of the next rows of A (default on)");
  m.def("silu_mul_", &silu_mul_, "g = silu(g) * u in place (HF's roundings), float32 or bfloat16");
  m.def("rotary_", &rotary_, "x = x * cos + roll(x, Dh / 2) * sin_signed in place (HF's roundings)");
  m.def("decode_attention", &decode_attention, "one decode token per row attending to its own slot's first lens positions");
  m.def("kv_write_", &kv_write_, "cache[row0 + i (or rows[i]), h, pos[i, j]] = fresh[i, h, j] for a slot KV cache, in place",
        pybind11::arg("cache"), pybind11::arg("fresh"), pybind11::arg("row0"), pybind11::arg("pos"),
        pybind11::arg("rows") = torch::empty({0}, torch::kInt64));
  m.def("kv_write_q8_", &kv_write_q8_, "kv_write_ into an 8-bit cache and its scales (quantizing), in place",
        pybind11::arg("cache"), pybind11::arg("scales"), pybind11::arg("fresh"), pybind11::arg("row0"), pybind11::arg("pos"),
        pybind11::arg("rows") = torch::empty({0}, torch::kInt64));
  m.def("decode_attention_q8", &decode_attention_q8, "decode_attention over an 8-bit cache (int8 K, V and float32 scales)");
  m.def("slot_attention", &slot_attention, "decode_attention with query row i reading cache row slots[i] (prefill chunks; "
        "prompt: prompt tokens, through the prompt kernel where it applies)", pybind11::arg("qk"), pybind11::arg("K"), pybind11::arg("V"),
        pybind11::arg("slots"), pybind11::arg("lens"), pybind11::arg("Hq"), pybind11::arg("scale"),
        pybind11::arg("prompt") = false);
  m.def("slot_attention_q8", &slot_attention_q8, "slot_attention over an 8-bit cache");
  m.def("_attention_q8_int", [](bool on) {
#ifdef REMIX_Q8_VNNI
    g_attn_q8_int = on;
    return true;
#else
    return false;
#endif
  }, "A/B runs and tests: whether the 8-bit cache's attention takes integer dot products (AVX512-VNNI; default) or "
     "the float path; returns whether the integer path exists in this build");
  m.def("_attention_bf16_dot", [](bool on) { g_attn_dot = on; },
        "A/B runs and tests: whether bfloat16 decode attention takes vdpbf16ps (default) or the widening path");
  m.def("_attention_v_fma", [](bool on) { const bool was = g_attn_v_fma; g_attn_v_fma = on; return was; },
        "A/B runs and tests: whether the vdpbf16ps attention's V pass runs on FMAs (the same bits; default on Intel); "
        "returns the setting before");
  m.def("_phase_a_bf16_dot", [](bool on) { g_phase_a_dot = on; }, "A/B runs: bfloat16 phase A on vdpbf16ps or widened");
  m.def("_amx_phase_a", [](bool on) {
#ifdef REMIX_AMX
    return std::exchange(g_amx_phase_a, on) && amx_ready();
#else
    (void)on;
    return false;
#endif
  }, "tests and A/B runs: bfloat16 phase A on AMX tiles where the CPU has them (default on); returns whether it was on "
     "and could run here");
  m.def("stack_clock", [](bool on) {
    std::vector<double> ns(g_stack_ns, g_stack_ns + STACK_OPS);
    const int64_t runs = g_stack_runs;
    std::fill_n(g_stack_ns, STACK_OPS, 0.0);
    g_stack_runs = 0;
    g_stack_clock = on;
    return std::make_tuple(ns, runs);
  }, "the decode stack's time per kind of op (ns) and its runs since the last call; resets them, then switches the clock on or off");
  m.def("module_clock", [](bool on) {
    std::vector<std::vector<double>> ns(MODULE_CLOCK_THREADS, std::vector<double>(MODULE_STAGES));
    for (int h = 0; h < MODULE_CLOCK_THREADS; ++h)
      for (int st = 0; st < MODULE_STAGES; ++st) ns[h][st] = std::exchange(g_module_ns[h].ns[st], 0.0);
    const int64_t calls = std::exchange(g_module_calls, 0);
    g_module_clock = on;
    return std::make_tuple(ns, calls);
  }, "run()'s time per thread and stage (ns) and its calls since the last call; resets them, then switches the clock "
     "on or off");
  m.def("_batch_invariant", [](bool on) { return std::exchange(g_batch_invariant, on); },
        "batch-invariant mode: the base GEMM on the dot-product kernel (or AMX tiles) at every row count, not oneDNN's "
        "from DOT_BF16_BELOW (bfloat16) / ONEDNN_F32_FROM (float32) rows; returns the previous setting");
  m.def("argmax_rows", &argmax_rows, "the first index of each row's maximum (a NaN wins), as torch.max(dim).indices");
  m.def("sample_rows", &sample_rows, "one token per given row by temperature, top-k, top-p and a uniform draw u, as sampler.py's reference",
        pybind11::arg("logits"), pybind11::arg("rows"), pybind11::arg("temperature"), pybind11::arg("top_k"),
        pybind11::arg("top_p"), pybind11::arg("u"), pybind11::arg("mask") = torch::empty({0}, torch::kInt32), pybind11::arg("nbits") = 0,
        pybind11::arg("min_p") = torch::empty({0}, torch::kFloat32));
  m.def("masked_argmax_rows", &masked_argmax_rows, "argmax_rows of given rows with the tokens a bitmask leaves out as -inf");
  m.def("linear", [](torch::Tensor x, torch::Tensor w, torch::Tensor b) { return linear(x, w, b); }, "y = x W^T (+ bias): the fused path's base GEMM where it applies, else oneDNN's or ATen's linear");
#ifdef __AVX512F__
  m.attr("AVX512") = true;  // built with AVX-512 (the -march=native build on such a CPU; not the AVX2 build)
#else
  m.attr("AVX512") = false;
#endif
  m.attr("DOT_BF16_BELOW") = DOT_BF16_BELOW;
  m.attr("ONEDNN_F32_FROM") = large_f32_elsewhere() ? ONEDNN_F32_FROM : -1;  // -1: the dot-product kernel at every size
  m.attr("F32_LARGE_GEMM") = large_f32_elsewhere() ? (onednn_f32_large() ? "onednn" : "aten") : "dot";  // from that limit
  m.def("dot_gemm", [](bool bf16) {
#ifdef REMIX_DOT_BF16
    if (bf16) return true;  // below DOT_BF16_BELOW rows
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return !bf16;
#else
    return false;
#endif
  }, "True when the base GEMM of this dtype (float32, or bfloat16) is the dot-product kernel (a row's outputs the same "
     "in any batch); False: MKL (float32) or ATen (bfloat16)");
  m.def("amx_bf16", []() {
#ifdef REMIX_AMX
    return amx_ready();
#else
    return false;
#endif
  }, "True when bfloat16 base GEMMs of whole tiles (D % 32 == 0, O % 16 == 0) below DOT_BF16_BELOW rows run on AMX tiles");
  m.def("gather_", &gather_, "y += the kernel contract's gather for given ids and weights, in place");
  m.def("route_gather_", &route_gather_, "top-k routing per token within its slot's pool, then the gather, in place");
  m.def("route_gather_", &route_gather_ranks_, "the same with each LoRA's own rank (ranks: int64 [N]; padded rows skipped)");
  pybind11::class_<ModuleCall>(m, "ModuleCall", pybind11::module_local())
      .def(pybind11::init([](torch::Tensor weight, torch::Tensor bias, torch::Tensor router, torch::Tensor a, torch::Tensor bt,
                             torch::Tensor off, torch::Tensor n, torch::Tensor k, torch::Tensor omega, int64_t r, int64_t kmax,
                             std::vector<torch::Tensor> watched, torch::Tensor ranks) {
        ModuleCall c{weight, bias, router, a, bt, off, n, k, omega, r, kmax, watched, {}, {}};
        c.ranks = ranks.numel() ? ranks.contiguous() : torch::Tensor();
        if (c.ranks.defined()) checked_ranks(c.ranks, a.size(0) / std::max<int64_t>(1, r), r);  // a bad table fails here
        for (const auto& t : watched) c.seen.emplace_back(version(t), t.data_ptr());
        c.bind_raw();
        return c;
      }))
      .def("__call__", [](const ModuleCall& c, torch::Tensor x) -> pybind11::object {
        static const torch::Tensor none = torch::empty({0}, torch::kInt64);  // no slot map (all slot 0), no counts
        if (!c.applies(x)) return pybind11::none();
        return pybind11::cast(c.routed(x, none, none));
      })
      .def("routed", [](const ModuleCall& c, torch::Tensor x, torch::Tensor slots, torch::Tensor counts) -> pybind11::object {
        if (!c.applies(x)) return pybind11::none();
        return pybind11::cast(c.routed(x, slots, counts));
      });
  // layers: one (in_norm_weight, in_eps, post_norm_weight, post_eps, qkv_weight or None, qkv_bias or None,
  // (q, k, v) or None, o, gate, up, down) per decoder layer, each projection as to_proj takes it; (q, k, v) where
  // qkv_weight is None (they run in turn and their outputs are concatenated), or both (see DecodeStack::Layer)
  pybind11::class_<DecodeStack>(m, "DecodeStack", pybind11::module_local())
      .def(pybind11::init([](pybind11::list layers, int64_t H, int64_t Hkv, int64_t Dh, double scaling) {
        DecodeStack d{{}, H, Hkv, Dh, scaling};
        for (const auto& item : layers) {
          const auto t = item.cast<pybind11::tuple>();
          TORCH_CHECK(t.size() == 11, "a layer is 11 items: norms, the q/k/v weight and bias or projections, o, gate, up, down");
          DecodeStack::Layer L;
          L.in_w = t[0].cast<torch::Tensor>();
          L.in_eps = t[1].cast<double>();
          L.post_w = t[2].cast<torch::Tensor>();
          L.post_eps = t[3].cast<double>();
          TORCH_CHECK(!t[4].is_none() || !t[6].is_none(), "a layer has one q/k/v weight, three q/k/v projections or both");
          if (!t[4].is_none()) {
            L.wqkv = t[4].cast<torch::Tensor>();
            L.bqkv = t[5].is_none() ? torch::empty({0}, L.wqkv.options()) : t[5].cast<torch::Tensor>();
          }
          if (!t[6].is_none()) {
            const auto qkv = t[6].cast<pybind11::tuple>();
            TORCH_CHECK(qkv.size() == 3, "q/k/v projections: (q, k, v)");
            L.q = to_proj(qkv[0].cast<pybind11::tuple>());
            L.k = to_proj(qkv[1].cast<pybind11::tuple>());
            L.v = to_proj(qkv[2].cast<pybind11::tuple>());
          }
          L.o = to_proj(t[7].cast<pybind11::tuple>());
          L.gate = to_proj(t[8].cast<pybind11::tuple>());
          L.up = to_proj(t[9].cast<pybind11::tuple>());
          L.down = to_proj(t[10].cast<pybind11::tuple>());
          d.layers.push_back(std::move(L));
        }
        return d;
      }))
      .def("run", &DecodeStack::run, "the decoder layers of one decode step, or of tokens of given cache rows: (h, "
           "pending) or None (see the source)", pybind11::arg("h"), pybind11::arg("cos"), pybind11::arg("sin"),
           pybind11::arg("K"), pybind11::arg("V"), pybind11::arg("row0"), pybind11::arg("pos"), pybind11::arg("lens"),
           pybind11::arg("slots"), pybind11::arg("Ks"), pybind11::arg("Vs"), pybind11::arg("cache_rows") = torch::empty({0}, torch::kInt64),
           pybind11::arg("prompt") = false);
}
