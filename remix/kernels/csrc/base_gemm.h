// BaseGemm: which GEMM a layer's base output takes (the compiled kernel, AMX, or oneDNN's / ATen's linear) and the
// call that runs it on one thread's slice of the outputs.
// Part of the kernels' one translation unit, remix_cpu.cpp (built by remix/kernels/cpu_ext.py): include it there only.
#pragma once
#include "amx.h"

namespace {

// The base layer's GEMM, fused into the kernel's parallel region: Y[:, o0:o1) = X W[o0:o1)^T (+ bias), each thread its
// own slice of the outputs - the slice its phase B then updates while it is still in its cache, and no second parallel
// region to start. With AVX-512 it is dot_gemm (24-25 accumulators in the 32 registers): on this project's 2-core AMD
// Zen 5 VM, all of the default base's linears at batch 1 / 8 / 32 take 0.39 / 0.52 / 0.52 of the time of ATen's
// linear (MKL, whose float32 GEMMs reach ~100-190 GFLOP/s there; its GEMV at batch 1 ~17 GB/s of the machine's ~44)
// - and every row's outputs are the same in any batch. With AVX2 + FMA and no AVX-512 it is dot_gemm too, in tiles
// that fit AVX2's 16 registers (dot_tile's AVX2 path: the same outputs bit for bit); without either, each thread calls
// MKL on its own slice of the outputs (shape-dependent roundings). bfloat16 (X, W, Y and bias all bfloat16) only where the CPU has
// AVX512-BF16 and below DOT_BF16_BELOW rows: dot_gemm in its bfloat16 form, float32 sums rounded once (as oneDNN's);
// elsewhere the caller takes ATen's.
struct BaseGemm {
  const void *w, *bias;  // w [O, D] contiguous; bias [O] or null; float32, or bfloat16 when bf16
  bool bf16 = false;
  bool amx = false;  // bfloat16 on AMX tiles (amx_gemm)
  const Ahead* ahead = nullptr;  // the next routed module's pools, prefetched while this GEMM runs (dot_gemm only)
  const Ahead* own = nullptr;  // this call's own selected LoRAs' B^T rows, prefetched over the GEMM's later blocks (g_own_bt)
  int64_t pf_end = 0;  // dot_gemm's prefetches of W run on to this output (0: the call's o1)
  const uint32_t* xp = nullptr;  // amx_gemm: X already packed by the calling thread (amx_pack_here), or null
  const uint16_t* btt = nullptr;  // where set: the call runs fused, the delta inside this AMX GEMM (run_fused)
  const uint16_t* rtt = nullptr;  // run_fused: the routers split for the tiles (fused_routers), or null
  bool on() const { return w != nullptr; }
  // the fused form's GEMM (run_fused): bfloat16 on AMX tiles with the delta's rows btt and the routers rtt
  static BaseGemm fused(const void* w, const void* bias, const uint16_t* btt, const uint16_t* rtt) {
    BaseGemm g{w, bias, true, true};
    g.btt = btt;
    g.rtt = rtt;
    return g;
  }
  void operator()(const void* Xv, void* Yv, int64_t T, int64_t D, int64_t O, int64_t o0, int64_t o1) const {
    if (o1 <= o0 || T == 0) return;
#ifdef REMIX_AMX
    if (amx)
      return amx_gemm(static_cast<const uint16_t*>(Xv), T, D, static_cast<const uint16_t*>(w),
                      static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(Yv), O, o0, o1, xp);
#endif
#ifdef REMIX_DOT_BF16
    if (bf16) return dot_gemm_any<uint16_t>(Xv, T, D, w, bias, Yv, O, o0, o1, ahead, own, pf_end);
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    dot_gemm_any<float>(Xv, T, D, w, bias, Yv, O, o0, o1, ahead, own, pf_end);
#else
    const auto* X = static_cast<const float*>(Xv);
    const auto* W = static_cast<const float*>(w);
    const auto* b = static_cast<const float*>(bias);
    auto* Y = static_cast<float*>(Yv);
    const int m = static_cast<int>(o1 - o0), n = static_cast<int>(T), k = static_cast<int>(D), ldc = static_cast<int>(O);
    const float one = 1.f;
    float beta = 0.f;
    if (b) {
      for (int64_t t = 0; t < T; ++t) std::memcpy(Y + t * O + o0, b + o0, (o1 - o0) * sizeof(float));
      beta = 1.f;
    }
    sgemm_("T", "N", &m, &n, &k, &one, W + o0 * D, &k, X, &k, &beta, Y + o0, &ldc);  // MKL runs one thread inside a region
#endif
  }
};

// The BaseGemm for y = x2 W^T (+ bias) where it applies (CPU, x, weight and bias all float32 - or all bfloat16 on a CPU
// with AVX512-BF16 -, contiguous weight, sizes that fit BLAS's int), else an off one: the caller takes ATen's linear.
// Rows from which bfloat16 takes ATen's (oneDNN) GEMM. On the 2-core Zen 5 VM (session of 2026-12-02), all of the
// default base's bfloat16 linears in turn (weights cold) at 16 / 24 / 32 / 64 / 128 rows took 0.62 / 0.62 / 0.77 / 0.84
// / 1.04 of oneDNN's time in the bfloat16 dot_gemm (with its prefetch of the next block of W; without it, oneDNN won
// from ~32 rows, and the split was at 16). Below 16 rows oneDNN also leaves the second thread idle, and a parallel
// region right after it waits for that thread to wake.
constexpr int64_t DOT_BF16_BELOW = 128;

// Rows from which float32 takes oneDNN's linear (mkldnn::_linear_pointwise with the plain weight, reordered by oneDNN
// on each call - no packed copy kept) instead of dot_gemm: on the 2-core Zen 5 VM, the default base's four linear
// shapes at 128 / 256 / 512 rows ran at 248-296 / 294-353 / 359-390 GFLOP/s there against dot_gemm's 210-264 /
// 253-263 / 240-267 (and ATen's own float32 linear, MKL, at ~150-190). Below, dot_gemm is as fast or faster: every
// decode step up to 255 sequences keeps a row's outputs independent of the batch; prefill steps of 256 tokens or
// more round as oneDNN does.
constexpr int64_t ONEDNN_F32_FROM = 256;

// Batch-invariant mode (the engine's --batch-invariant, set before each forward): the dot-product kernel at every row
// count, so a row's outputs never depend on how many rows share the call (prefill steps of any size included), at the
// cost of oneDNN's speed on large calls.
bool g_batch_invariant = false;

// The operator handle of mkldnn::_linear_pointwise, or null where this torch has none (then ATen's linear).
const c10::OperatorHandle* onednn_linear_op() {
  static const c10::OperatorHandle* op = []() -> const c10::OperatorHandle* {
    const auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return found.has_value() ? new c10::OperatorHandle(*found) : nullptr;
  }();
  return op;
}

// Whether float32 calls from ONEDNN_F32_FROM rows take oneDNN's linear (AMD and other CPUs) or ATen's (MKL's sgemm, on
// Intel CPUs, which MKL is tuned for). Measured per linear of the default base at 256 / 512 / 1024 rows: on the 2-core
// Intel Xeon (AMX) VM of 2026-12-02, oneDNN's took 0.89-1.26 / 1.06-1.13 / 1.06-1.17 of MKL's time; on the 2-core
// Zen 5 VM oneDNN ran at 359-390 GFLOP/s at 512 rows against MKL's 150-190 (MKL's AMD paths are generic).
bool onednn_f32_large() {
  static const bool use = onednn_linear_op() != nullptr && !intel_cpu();
  return use;
}

// Whether float32 calls from ONEDNN_F32_FROM rows leave the dot-product kernel: for oneDNN's linear, or MKL's on Intel.
bool large_f32_elsewhere() {
  static const bool elsewhere = onednn_linear_op() != nullptr || intel_cpu();
  return elsewhere;
}

#ifdef REMIX_AMX
// bfloat16 from DOT_BF16_BELOW rows on AMX: amx_gemm with each thread a share of the tokens (in tiles of TILE_BF16, all
// the outputs, as run_fused), not oneDNN's GEMM (g_amx_tokens; off: oneDNN's, for A/B runs). Each output's tile steps are amx_gemm's
// whatever the split, so a row's outputs are the same alone or in any batch, as below DOT_BF16_BELOW rows (the split
// was set where oneDNN overtook the AVX512-BF16 dot_gemm, before the AMX kernel). The default base's linears, the two
// in turn (42nd session, Intel VM, weights cycled, medians of 8 rounds), at 128 / 256 / 512 rows, this over oneDNN's:
// 576 -> 1536 0.83 / 0.94 / 0.99, 1536 -> 576 0.83 / 0.66 / 0.95, 576 -> 960 (q / k / v) 0.80 / 0.90 / 0.98, 576 ->
// 576 0.68 / 0.86 / 0.99, the LM head 0.90 / 1.05 / 0.93; the bare engine's prompt steps at 32 sequences (128-token
// prompts) 1.30-1.40 -> 1.10-1.15 s a run (steps in turn).
bool g_amx_tokens = true;
inline bool amx_tokens_apply(const torch::Tensor& x2, const torch::Tensor& weight, const torch::Tensor& bias) {
  return g_amx_tokens && x2.scalar_type() == torch::kBFloat16 && weight.scalar_type() == torch::kBFloat16 &&
         x2.device().is_cpu() && weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() &&
         x2.is_contiguous() && amx_shape(x2.size(1), weight.size(0)) && amx_ready() &&
         (!bias.numel() || (bias.scalar_type() == torch::kBFloat16 && bias.is_contiguous() && bias.numel() == weight.size(0)));
}
at::Tensor amx_linear_tokens(const torch::Tensor& x2, const torch::Tensor& weight, const torch::Tensor& bias) {
  const int64_t T = x2.size(0), D = x2.size(1), O = weight.size(0), TB = (T + 15) / 16;
  auto y = torch::empty({T, O}, x2.options());
  const auto* X = static_cast<const uint16_t*>(x2.data_ptr());
  const auto* W = static_cast<const uint16_t*>(weight.data_ptr());
  const auto* b = bias.numel() ? static_cast<const uint16_t*>(bias.data_ptr()) : nullptr;
  auto* Y = static_cast<uint16_t*>(y.data_ptr());
  const int64_t P = region_threads(TB);
#pragma omp parallel num_threads(P)
  {
    const auto [h, nh] = region_thread();
    const int64_t t0 = std::min(T, TB * h / nh * 16), t1 = std::min(T, TB * (h + 1) / nh * 16);
    for (int64_t c0 = t0; c0 < t1; c0 += TILE_BF16)
      amx_gemm(X + c0 * D, std::min<int64_t>(TILE_BF16, t1 - c0), D, W, b, Y + c0 * O, O, 0, O);
  }
  return y;
}
#endif

// y = x2 W^T (+ bias) where no BaseGemm applies: for float32 from ONEDNN_F32_FROM rows, oneDNN's linear where
// onednn_f32_large() (boxed call: no dependence on the operator's C++ signature), else ATen's linear (as nn.Linear).
at::Tensor other_linear(const torch::Tensor& x2, const torch::Tensor& weight, const torch::Tensor& bias) {
#ifdef REMIX_AMX
  if (amx_tokens_apply(x2, weight, bias)) return amx_linear_tokens(x2, weight, bias);
#endif
  if (onednn_f32_large() && x2.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32 && x2.size(0) >= ONEDNN_F32_FROM &&
      x2.device().is_cpu() && weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() && x2.is_contiguous() &&
      (!bias.numel() || (bias.scalar_type() == torch::kFloat32 && bias.dim() == 1 && bias.size(0) == weight.size(0)))) {
    torch::jit::Stack stack{x2, weight, bias.numel() ? c10::IValue(bias) : c10::IValue(), c10::IValue(std::string("none")),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
    onednn_linear_op()->callBoxed(&stack);
    return stack.at(0).toTensor();
  }
  return bias.numel() ? at::linear(x2, weight, bias) : at::linear(x2, weight);
}

// The compiled GEMM for T rows of a checked weight w [O, D] (bias or null), or an off one where oneDNN's (or MKL's) is
// faster: bfloat16 from DOT_BF16_BELOW rows, float32 from ONEDNN_F32_FROM (unless batch-invariant).
BaseGemm gemm_for_rows(const void* w, const void* bias, bool bf16, int64_t T, int64_t D, int64_t O) {
  if (!g_batch_invariant && ((bf16 && T >= DOT_BF16_BELOW) || (!bf16 && T >= ONEDNN_F32_FROM && large_f32_elsewhere())))
    return {nullptr, nullptr};
#ifdef REMIX_AMX
  const bool amx = bf16 && amx_shape(D, O) && amx_ready();
#else
  const bool amx = false;
  (void)D;
  (void)O;
#endif
  return {w, bias, bf16, amx};
}

BaseGemm base_gemm_for(const torch::Tensor& x2, const torch::Tensor& weight, const torch::Tensor& bias) {
  const int64_t O = weight.size(0), lim = int64_t{1} << 30;
  const auto dt = x2.scalar_type();
#ifdef REMIX_DOT_BF16
  const bool dtype_ok = dt == torch::kFloat32 || dt == torch::kBFloat16;
#else
  const bool dtype_ok = dt == torch::kFloat32;
#endif
  const bool ok = x2.device().is_cpu() && dtype_ok && weight.device().is_cpu() && weight.scalar_type() == dt &&
                  weight.is_contiguous() && (!bias.numel() || (bias.scalar_type() == dt && bias.is_contiguous() && bias.numel() == O)) &&
                  x2.size(0) < lim && x2.size(1) < lim && O < lim;
  if (!ok) return {nullptr, nullptr};
  return gemm_for_rows(weight.data_ptr(), bias.numel() ? bias.data_ptr() : nullptr, dt == torch::kBFloat16, x2.size(0),
                       x2.size(1), O);
}

}  // namespace
