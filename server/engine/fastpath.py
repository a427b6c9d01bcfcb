"""A lean forward of Llama-family decoder stacks over the slot cache: the same ATen ops as Hugging Face's modules,
in the same order, without their Python plumbing.

Legend: b = rows, q = query tokens per row, H / Hkv = attention / key-value heads, Dh = head dim, D = hidden size.

At batch 1 a decode step of the default base spends about a third of its time outside the weight GEMMs, most of it in
Python: per layer, HF's modules pass keyword arguments through five calls, build the rotary tables, dispatch the
attention interface and run ``rotate_half`` as slice/neg/cat. This forward keeps every arithmetic op of
``LlamaModel`` (RMSNorm in float32 as HF writes it, SDPA with the same mask, GQA packing and scale) and changes only
what cannot change a bit:

* q, k and v run as three GEMMs (``exact``) or, by default, one GEMM over their concatenated rows (the three weights
  become views of one [H*Dh + 2*Hkv*Dh, D] tensor, so no memory is added and the modules still work as before): each
  output element is the same dot product, which MKL on this project's CPU sums the same way at either width, but no
  BLAS promises that (cuBLAS picks kernels by shape), so the ``exact`` mode keeps HF's three;
* a single query's GQA heads are packed for SDPA exactly when the installed transformers does so (``HF_PACKS_GQA``);
* the rotary embedding runs once over q and k together as ``x * cos + roll(x, Dh/2) * sin_signed`` (``sin_signed`` =
  sin with its first half negated: ``-x2 * s`` and ``x2 * -s`` are the same float), four ops instead of ten;
* plain linears run as ``F.linear`` (no module call); wrapped ones (``StackedLinear``) are called as modules, so
  routing, counting and traces are unchanged.

With ``compiled=False`` (``--decoder exact``) the result is bit-identical to the HF module path on CPU (tests
compare both on every supported architecture, prefill and decode, float32 and bfloat16, with and without adapters).
By default (``--decoder lean``, ``compiled=True``), on CPU with the compiled kernels, three things run compiled instead
(:mod:`remix.kernels.cpu_ext`): the attention (``decode_attention`` for the engine's decode steps, given ``lens``, which
the runner passes for decode steps only; ``slot_attention``, the same kernel, for every real token of a prefill chunk,
each over its own slot's positions up to its own - so a prompt token and a generated token at one position are
computed alike, whatever shares the step; 0.83-0.88 of SDPA's prefill time at 32 prompts of 128 tokens, 0.68-0.79 at 4
of 1,024, one adapter, bfloat16; ``prefill_kernel`` off: SDPA with the mask); each row over its own slot's first ``len``
positions, no mask; float32 within ~1e-7 relative of SDPA; bfloat16 with AVX512-BF16
and head sizes of 32, 64 or 128 rounds the softmax weights to bfloat16 before multiplying V, as SDPA does, and sums in
another order; other bfloat16 keeps the weights in float32); and in every step each residual add with the RMSNorm after it
(``add_rms_norm_``) and the rotary embedding in place on the q/k/v output (``rotary_``), one call each instead of 4-7
ATen ops, with HF's roundings in bfloat16 and float32 sums in another order than ATen's. At one sequence that is most
of a step's dispatch: 35.7 -> 30.0 ms a float32 decode step. They run at every step size (rows split among threads
from 17 rows on), because a row's result must not depend on the step it lands in: an earlier version used them only in
steps of up to 32 tokens and ATen's ops above, so a request's bfloat16 numbers (and now and then a token) depended on
how many tokens its batch-mates brought to the step. ``silu(gate) * up`` is one compiled op too (``silu_mul_``), in place
on the gate's output: in a bfloat16 decode step on the twenty-fifth session's Intel VM ATen's two ops took 0.39 / 0.79 /
1.48 ms at 1 / 8 / 32 sequences, this one 0.10 / 0.33 / 0.97 (an earlier VM's float32 ATen ops had been as fast as a
compiled version). The plain linears and the LM head take the compiled
kernels' GEMM too (``cpu_ext.linear``: their float32 dot-product kernel, whose rows do not depend on the batch, and
oneDNN (MKL on Intel CPUs) from 256 rows; bfloat16 their kernel below 128 rows), as the ReMix modules do inside their own call; and a
prefill step with padding runs its per-token ops on its real tokens only (``rows``; the attention alone sees [b, q]). A decode step
on that path runs all its decoder layers in one C++ call (``DecodeStack``: the same kernels in the same order, so
bit-identical to the Python loop below; 30.7 -> 27.6 ms a float32 step of the default base at one sequence, 42.1 ->
36.6 at eight, 76-78 -> 72-75 at 32) unless a routing trace is kept. Prefill steps (and the checked drafts of
speculative decoding) run through it too, each real token a row of its own (its slot's cache row, its position, the
same slot attention and K/V writes as the Python loop): one prompt of 16 / 128 tokens with an adapter, bfloat16, in
0.89 / 0.86 of the loop's time (one-off A/B in one process; four prompts of 128: 1.02, within noise).
Where an adapter wraps q, k or v (a LoRA on attention, as peft's default targets q_proj and v_proj), that layer's three
projections run in turn (plain ones by the compiled GEMM, wrapped ones by their ReMix call) and their outputs are
concatenated, in the Python loop and the stack alike - except the stack's steps of one row, which run the base's one
[q; k; v] GEMM and then each wrapped projection's gather into its columns (the same values; ``DecodeStack::qkv_of``).

It applies to ``llama``, ``mistral`` and ``qwen2`` models with default RoPE, SiLU, SDPA attention and full attention
in every layer; any other model or a forward hook on a decoder module makes the runner take the HF modules as before.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from remix.kernels import cpu_ext
from remix.stack import StackedLinear, generation, get_context

SUPPORTED = ("llama", "mistral", "qwen2")
# transformers packs a single query's GQA heads for SDPA (pack_gqa) since 5.2x; earlier 5.x versions repeat K/V for every
# step. The two sum in another order, so the exact decoder follows whichever the installed version does.
try:
    from transformers.integrations import sdpa_attention as _hf_sdpa

    HF_PACKS_GQA = hasattr(_hf_sdpa, "pack_gqa")
except ImportError:  # pragma: no cover
    HF_PACKS_GQA = False
DECODERS = ("lean", "exact", "hf")  # lean: this forward + the compiled ops; exact: ATen's ops and SDPA only; hf: HF's modules

# Module and parameter assignments anywhere in the process (torch's global registration hooks: setattr of a module or
# Parameter, register_module / register_parameter), counted: the decode stack's check of what it was built from runs
# again only after one of them, a pool change (remix.stack.generation) or a change of counting. Walking the 30 layers'
# modules every step had cost ~0.2 ms warm and ~0.6 ms right after a step's weights had flushed the caches.
_structure_changes = 0
_watching = False


def _count_structure_change(*_) -> None:
    global _structure_changes
    _structure_changes += 1


def _watch_structure() -> None:
    global _watching
    if not _watching:
        nn.modules.module.register_module_module_registration_hook(_count_structure_change)
        nn.modules.module.register_module_parameter_registration_hook(_count_structure_change)
        _watching = True


def unsupported_reason(model: nn.Module, max_len: int) -> str | None:
    """Why :class:`LeanForward` cannot stand in for this model's decoder stack (None: it can)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        return f"model type {cfg.model_type!r}"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} (sdpa only)"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)) and window < max_len:
        return f"sliding window {window} shorter than max_model_len {max_len}"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "layers other than full attention"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not a decoder stack of the Llama layout"
    if getattr(inner.rotary_emb, "attention_scaling", 1.0) != 1.0:
        return "scaled rotary embedding"
    for layer in inner.layers:
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if at is None or mlp is None or any(hasattr(at, n) for n in ("q_norm", "k_norm")):
            return "a decoder layer of another layout"
    return None


class LeanForward:
    """The decoder stack's forward for :class:`server.engine.runner.ModelRunner` (see the module docstring)."""

    def __init__(self, model: nn.Module, compiled: bool = True):
        self.model, self.inner = model, model.model
        inner = self.inner
        self.compiled = compiled
        self.stack_enabled = True  # decode steps through the compiled DecodeStack where it applies (tests compare both)
        self.prefill_kernel = True  # prefill tokens through the compiled attention where it applies (else SDPA)
        cfg = model.config
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.Dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        # one [q; k; v] GEMM per layer (lean), or HF's three (exact: bit-identity must not depend on the BLAS)
        self.qkv: list[tuple | None] = [self._fuse(layer.self_attn) if compiled else None for layer in inner.layers]
        # the forward (pre-)hook dicts of the modules whose hooks this forward would skip: registering a hook adds to
        # its module's dict in place, so ``any`` over the dicts (C-level truth tests, ~10 us) finds one; a Python
        # generator over the ~400 modules' attributes cost ~0.3 ms a step
        self._hook_dicts = [d for m in inner.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
        self._stack: tuple = ((), None)  # (the objects it was built from, the compiled DecodeStack)
        self._stack_seen: tuple = (None, None)  # ((structure changes, pool generation, counting), _decode_stack's answer)
        _watch_structure()
        scalings = {float(layer.self_attn.scaling) for layer in inner.layers}
        self._scaling = scalings.pop() if len(scalings) == 1 else None  # one for all layers, or no DecodeStack

    @staticmethod
    def _fuse(at: nn.Module) -> tuple | None:
        """One [q; k; v] weight (and bias) whose row ranges become the three projections' weights (views: no copy
        kept); returns (weight, bias, the three weight Parameters) or None when a projection is not a plain linear."""
        projs = (at.q_proj, at.k_proj, at.v_proj)
        if any(type(p) is not nn.Linear for p in projs) or len({p.bias is None for p in projs}) > 1:
            return None
        with torch.no_grad():
            w = torch.cat([p.weight for p in projs]).contiguous()
            b = None if projs[0].bias is None else torch.cat([p.bias for p in projs]).contiguous()
            o = 0
            for p in projs:
                n = p.out_features
                p.weight = nn.Parameter(w[o : o + n], requires_grad=False)
                if b is not None:
                    p.bias = nn.Parameter(b[o : o + n], requires_grad=False)
                o += n
        return w, b, tuple(p.weight for p in projs)

    def applies(self) -> bool:
        """False when any decoder module carries forward hooks (their callers expect the modules to run)."""
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        return not any(self._hook_dicts)

    def _fused_qkv(self, i: int, at: nn.Module, under_lora: bool = False) -> tuple | None:
        """Layer i's one [q; k; v] (weight, bias) while the three projections are still the plain linears whose weights
        are its views, else None (a projection was wrapped or replaced: they run as modules). ``under_lora``: a ReMix
        layer over such a linear counts too (a LoRA on q / k / v: the compiled decode stack then runs the one GEMM in
        steps where no token routes in them)."""
        fused = self.qkv[i]
        if fused is None:
            return None
        am = at._modules
        for name, w in zip(("q_proj", "k_proj", "v_proj"), fused[2]):
            p = am[name]
            if under_lora and type(p) is StackedLinear:
                p = p._modules["base"]
            if type(p) is not nn.Linear or p._parameters["weight"] is not w:
                return None
        return fused[0], fused[1]

    def _qkv(self, i: int, at: nn.Module, x: torch.Tensor, lean) -> torch.Tensor:
        fused = self._fused_qkv(i, at)
        if fused is not None:
            return self._gemm(x, *fused, lean)
        return torch.cat([self._linear(at.q_proj, x, lean), self._linear(at.k_proj, x, lean),
                          self._linear(at.v_proj, x, lean)], -1)

    @staticmethod
    def _gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lean) -> torch.Tensor:
        """x w^T (+ b): with the compiled kernels' GEMM (``lean``: ``cpu_ext.linear``, see there), else F.linear."""
        return F.linear(x, w, b) if lean is None else lean.linear(x, w, cpu_ext.NONE_F if b is None else b)

    def _linear(self, module: nn.Module, x: torch.Tensor, lean=None) -> torch.Tensor:
        """A plain linear by :meth:`_gemm`; anything else (a ReMix layer, a replaced module) runs as a module."""
        return self._gemm(x, module.weight, module.bias, lean) if type(module) is nn.Linear else module(x)

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """The LM head over the last hidden states [b, D] (the compiled GEMM where it applies, as in the layers)."""
        return self._linear(self.model.lm_head, last, cpu_ext.for_input(last) if self.compiled else None)

    def _decode_stack(self, ext):
        """The compiled decode stack (``ext.DecodeStack``: all decoder layers of a step in one call, the same
        kernels in the same order as the loop in :meth:`__call__`) for the modules as they are now, or None where a
        layer does not fit it: a projection that is neither a plain linear nor a ReMix layer with a compiled call,
        other attention scalings, or a step that keeps a routing trace. After any
        module or parameter assignment in the process (torch's registration hooks), pool change or change of counting,
        it lists the objects the stack is built from (norms, the q/k/v weight or projections, plain weights or the
        ReMix layers' bound calls and counters) and rebuilds it when any is not the one it was built from; otherwise the last answer
        stands (a step then spends ~4 us here, measured inside a step, instead of 0.2-0.6 ms). Not seen: writes straight into a module's
        ``_modules`` / ``_parameters`` dicts and a changed ``variance_epsilon`` (assign modules and parameters with
        setattr; a forward hook anywhere in the decoder sends the step through the modules, see :meth:`applies`)."""
        ctx = get_context()
        if ctx is None or ctx.trace is not None or self._scaling is None:
            return None
        seen = (_structure_changes, generation(), ctx.count)
        if seen == self._stack_seen[0]:  # nothing was assigned, no pool changed: the answer of the last full check
            return self._stack_seen[1]
        stack = self._checked_stack(ext, ctx)
        self._stack_seen = (seen, stack)
        return stack

    def _checked_stack(self, ext, ctx):
        """:meth:`_decode_stack`'s full check: the stack for the objects the layers hold now, built again where any differs."""
        # per layer (20): 2 norms (weight, eps), the fused q/k/v (weight, bias) or (None, None), then q, k, v (each
        # (None, None) where fused), o, gate, up, down, each (weight, bias) or (call, counts)
        key = []
        for i, layer in enumerate(self.inner.layers):
            lm = layer._modules
            am, mm = lm["self_attn"]._modules, lm["mlp"]._modules
            n1, n2 = lm["input_layernorm"], lm["post_attention_layernorm"]
            fused = self._fused_qkv(i, lm["self_attn"])
            key += (n1._parameters["weight"], n1.variance_epsilon, n2._parameters["weight"], n2.variance_epsilon)
            if fused is not None:
                key += (*fused, None, None, None, None, None, None)
            else:  # some of q/k/v wrapped (a LoRA on attention): three projections, their outputs concatenated,
                # with the base's one GEMM beside them where the base weights are still its rows
                key += self._fused_qkv(i, lm["self_attn"], under_lora=True) or (None, None)
            for m in ((am["o_proj"],) if fused is not None else (am["q_proj"], am["k_proj"], am["v_proj"], am["o_proj"])) + (
                    mm["gate_proj"], mm["up_proj"], mm["down_proj"]):
                if type(m) is nn.Linear:
                    key += (m._parameters["weight"], m._parameters["bias"])
                elif type(m) is StackedLinear and (call := m.bound_call()) is not None:
                    key += (call, m.stack.cpu.counts if ctx.count else cpu_ext.NONE)
                else:
                    return None
        old_key, stack = self._stack
        if len(key) != len(old_key) or not all(map(operator.is_, key, old_key)):
            n = len(key) // len(self.inner.layers)  # 20

            def layer_args(c):
                projs = list(zip(c[6::2], c[7::2]))  # q, k, v, o, gate, up, down
                qkv = None if c[6] is None else tuple(projs[:3])
                return (c[0], float(c[1]), c[2], float(c[3]), c[4], c[5], qkv, *projs[3:])

            layers = [layer_args(key[i : i + n]) for i in range(0, len(key), n)]
            stack = ext.DecodeStack(layers, self.H, self.Hkv, self.Dh, self._scaling)
            self._stack = (key, stack)
        return stack

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # LlamaRMSNorm.forward, op for op
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + norm.variance_epsilon)
        return norm.weight * h.to(dtype)

    def packs(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a forward in this dtype and device may run on its real tokens only (``rows``): the compiled path."""
        return self.compiled and device.type == "cpu" and cpu_ext.for_input(torch.empty(0, dtype=dtype)) is not None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache,
                 lens: torch.Tensor | None = None, rows: torch.Tensor | None = None, prompt: bool = False) -> torch.Tensor:
        """Hidden states [b, q, D] after the final norm; ``cache`` is the runner's prepared slot cache. ``lens`` (one
        query per row: row i attends to its first lens[i] positions, which is what ``mask`` says) lets the compiled
        decode attention stand in for SDPA.

        ``rows`` (where :meth:`packs`): the flat indices into [b * q] of the real tokens, in order. Every per-token op
        (embedding, norms, rotary, linears, adapters) then runs on those tokens only and the result is [len(rows), D];
        only the attention sees the padded [b, q] layout (padding rows' keys and values are zeros, masked out). A
        prefill step whose chunks differ in length would otherwise spend its GEMMs on padding (a step of chunks 11,
        128, 128, 128 and 106 tokens: 640 rows for 481 tokens).

        ``prompt``: prefill chunks of prompt tokens (not checked drafts): the compiled prefill attention takes its
        prompt kernel (``slot_attention``'s ``prompt``)."""
        inner, H, Hkv, Dh = self.inner, self.H, self.Hkv, self.Dh
        b, q = tokens.shape
        h = inner.embed_tokens(tokens if rows is None else tokens.reshape(-1)[rows])
        # the compiled ops (CPU float32 / bfloat16, kernels built): norm and rotary at every step size (a row's result
        # must not depend on the step's size), and the attention
        lean = cpu_ext.for_input(h) if self.compiled else None
        assert rows is None or (lean is not None and lens is None), "packed rows: the compiled path, prefill only"
        ext = pre = None
        if lean is not None and Dh in (16, 32, 64, 128) and H // Hkv <= 8:
            if lens is not None and q == 1:
                ext = lean  # one decode token per row: the compiled attention over the slot cache
            elif lens is None and self.prefill_kernel:
                pre = lean  # prefill: every real token through the same kernel, reading its row's slot
        if pre is not None:  # each real token's cache row and the positions it sees (its own and those before)
            flat = torch.arange(b * q) if rows is None else rows
            tok_slots = (flat // q + cache.storage(0)[2]).contiguous()
            tok_lens = (positions.reshape(-1)[flat] + 1).contiguous()
        # LlamaRotaryEmbedding.forward (default rope, scaling 1), then the sign of rotate_half folded into sin
        freqs = positions[..., None].float() * inner.rotary_emb.inv_freq.to(device=h.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)  # [b, q, Dh]
        half = Dh // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
        if lean is not None:
            cos, sin = cos.reshape(b * q, Dh), sin.reshape(b * q, Dh)
            if rows is not None:
                cos, sin = cos[rows], sin[rows]
        else:
            cos, sin = cos[:, :, None], sin[:, :, None]  # [b, q, 1, Dh]
        n_rep = H // Hkv
        if ext is None and pre is None and mask.dtype == torch.bool:  # what SDPA would make of it (0 / -inf), once
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        pending = None  # a sublayer's output not yet added into h: the compiled norm adds it in the same pass

        def norm(module: nn.Module) -> torch.Tensor:
            nonlocal h, pending
            if lean is not None:
                out = lean.add_rms_norm_(h, pending if pending is not None else cpu_ext.NONE_F, module.weight,
                                        module.variance_epsilon)
            else:
                if pending is not None:
                    h = h + pending
                out = self._rms(h, module)
            pending = None
            return out

        stack = None
        if self.stack_enabled and ((ext is not None and rows is None) or pre is not None):
            stack = self._decode_stack(ext or pre)
        if stack is not None:  # every decoder layer in one call (None back: a ReMix call does not apply to h)
            K, V, row0, pos, Ks, Vs = cache.decode_args()
            if ext is not None:  # a decode step: row i of cache row row0 + i
                out = stack.run(h, cos, sin, K, V, row0, pos, lens, get_context().slots, Ks, Vs)
            else:  # prefill chunks or checked drafts: each real token a row of its own, of its slot, at its position
                tok_pos = positions.reshape(-1)[flat].reshape(-1, 1)
                out = stack.run(h.view(-1, 1, h.shape[-1]), cos, sin, K, V, 0, tok_pos, tok_lens, get_context().slots,
                                Ks, Vs, tok_slots, prompt=prompt)
            if out is not None:
                h, pending = out[0].view(h.shape), out[1].view(h.shape)
                return norm(inner.norm)
        for i, layer in enumerate(inner.layers):
            at, mlp = layer.self_attn, layer.mlp
            x = norm(layer.input_layernorm)
            qkv = self._qkv(i, at, x, lean)
            if lean is not None:  # in place on the q and k heads of the q/k/v output
                lean.rotary_(qkv.view(-1, H + 2 * Hkv, Dh)[:, : H + Hkv], cos, sin)
                tokens_qk = qkv.view(-1, H + 2 * Hkv, Dh)  # the real tokens' (packed or not), for the compiled prefill
                if rows is not None:  # the attention's padded layout
                    qkv = qkv.new_zeros(b * q, qkv.shape[-1]).index_copy_(0, rows, qkv)
                qkv = qkv.view(b, q, H + 2 * Hkv, Dh)
                qk = qkv[:, :, : H + Hkv]
            else:
                qkv = qkv.view(b, q, H + 2 * Hkv, Dh)
                qk = qkv[:, :, : H + Hkv]
                qk = qk * cos + qk.roll(half, -1) * sin
            cache.write(qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv :].transpose(1, 2), i)
            qs = qk[:, :, :H].transpose(1, 2)  # [b, H, q, Dh]
            if ext is not None:  # one decode token per row, each over its own slot's first lens positions
                K, V, row0 = cache.storage(i)
                if cache.quantized:
                    o = ext.decode_attention_q8(qk[:, 0], K, V, *cache.scales(i), row0, lens, H, at.scaling)
                else:
                    o = ext.decode_attention(qk[:, 0], K, V, row0, lens, H, at.scaling)
            elif pre is not None:  # [T, Hkv, n_rep, Dh]: the real tokens in order, as o_proj takes them
                K, V, _ = cache.storage(i)
                if cache.quantized:
                    o = pre.slot_attention_q8(tokens_qk, K, V, *cache.scales(i), tok_slots, tok_lens, H, at.scaling)
                else:
                    o = pre.slot_attention(tokens_qk, K, V, tok_slots, tok_lens, H, at.scaling, prompt=prompt)
                o = o.reshape(-1, H * Dh) if rows is not None else o.reshape(b, q, H * Dh)
            else:
                k, v = cache.read(i)  # [b, Hkv, span, Dh]
                if n_rep > 1 and q == 1 and HF_PACKS_GQA:  # as transformers' sdpa_attention_forward: one query
                    # packs its group's heads
                    o = F.scaled_dot_product_attention(qs.reshape(b, Hkv, n_rep, Dh), k, v, attn_mask=mask,
                                                       scale=at.scaling)
                else:
                    if n_rep > 1:  # repeat_kv
                        k = k[:, :, None].expand(b, Hkv, n_rep, *k.shape[2:]).reshape(b, H, *k.shape[2:])
                        v = v[:, :, None].expand(b, Hkv, n_rep, *v.shape[2:]).reshape(b, H, *v.shape[2:])
                    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=at.scaling)
            if pre is None:
                o = o.reshape(b, H, q, Dh).transpose(1, 2).reshape(b, q, H * Dh)
                if rows is not None:
                    o = o.view(b * q, H * Dh)[rows]
            pending = self._linear(at.o_proj, o, lean)
            x = norm(layer.post_attention_layernorm)
            if lean is not None:  # in place on the gate's fresh output (no two fresh [T, I] tensors a layer), one compiled op
                act = lean.silu_mul_(self._linear(mlp.gate_proj, x, lean), self._linear(mlp.up_proj, x, lean))
            else:
                act = F.silu(self._linear(mlp.gate_proj, x, lean)) * self._linear(mlp.up_proj, x, lean)
            pending = self._linear(mlp.down_proj, act, lean)
        return norm(inner.norm)
