"""Outputs of the compiled float32 kernels on fixed inputs, to compare two builds of them bit for bit.

    python -m tests.kernel_outputs save out.pt                                      # this build's
    python scripts/as_march.py haswell -m tests.kernel_outputs compare out.pt       # the AVX2 build's against them

The kernels' AVX2 paths (builds without AVX-512) keep every 16-lane sum as two 8-lane halves in the same order, so an
AVX2 build must give the AVX-512 build's outputs exactly: the base GEMM (linear, batch-invariant mode so every size
takes the dot-product kernel), a routed module call (routing, phase A, phase B and the GEMM fused), the decode
attention and the FFN's activation, and the engine end to end on the tiny model (engine_outputs). `compare` prints every mismatch and exits 1 if there is one (tests/test_avx2_build.py runs it)."""

from __future__ import annotations

import sys

import torch

from remix.kernels import cpu_ext
from server.engine.cache import quantize_kv, to_key_blocks


def outputs() -> dict[str, torch.Tensor]:
    ext = cpu_ext.load()
    if ext is None:
        raise SystemExit("the compiled kernels did not build")
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    was = ext._batch_invariant(True)
    try:
        with torch.inference_mode():
            # D a multiple of 16 or not (the tail), O not a multiple of the tiles, 1 to 300 rows (every tile remainder).
            # (Every tail of D is an explicit FMA a step in the kernels: GCC vectorises a scalar `s += a * b` loop as
            # rounded products plus a remainder of FMAs, split by the build's vector width.)
            for D, O in [(576, 1536), (1536, 576), (64, 96), (100, 37), (33, 70)]:
                W, b = torch.randn(O, D, generator=g), torch.randn(O, generator=g)
                for T in (1, 2, 3, 5, 8, 15, 16, 17, 32, 300):
                    x = torch.randn(T, D, generator=g)
                    out[f"linear {D}->{O} T={T}"] = cpu_ext.linear(x, W, b)
                    out[f"linear {D}->{O} T={T} no bias"] = cpu_ext.linear(x, W)
            # a routed module: two adapters of n = 8 (k = 2, r = 8) and a slot with none, as the engine binds them
            n, r = 8, 8
            for D, O in [(576, 1536), (1536, 576), (64, 96), (100, 37), (33, 70)]:
                base = torch.nn.Linear(D, O, bias=False)
                with torch.no_grad():
                    base.weight.copy_(torch.randn(O, D, generator=g) * D**-0.5)
                router = torch.randn(2 * n, D, generator=g)
                a, bt = torch.randn(2 * n * r, D, generator=g), torch.randn(2 * n * r, O, generator=g) * 0.1
                tables = (torch.tensor([0, n]), torch.tensor([n, n]), torch.tensor([2, 2]), torch.tensor([0.5, 2.0]))
                call = cpu_ext.bind_module(base, router, a, bt, tables, r, 2)
                for T in (1, 4, 8, 32, 130):
                    x = torch.randn(T, D, generator=g)
                    slots = torch.tensor([(0, 1, -1)[t % 3] for t in range(T)])
                    y, idx = call.routed(x, slots, torch.empty(0, dtype=torch.int64))
                    out[f"module {D}->{O} T={T}"], out[f"module {D}->{O} T={T} idx"] = y, idx
            # decode attention (the default base's 3 key/value heads of 64, 3 queries each, and other group sizes and
            # head widths), lengths not multiples of 16; slot attention (rows reading given cache rows); bfloat16 on
            # the widening path (the AVX-512 build's vdpbf16ps path rounds the weights to bfloat16 and has no AVX2
            # counterpart; switched back on in the finally below)
            ext._attention_bf16_dot(False)
            for Hkv, nrep, Dh in [(3, 3, 64), (2, 1, 64), (1, 8, 128), (4, 2, 64), (1, 3, 32), (1, 5, 64), (2, 2, 16)]:
                S, P, Hq = 6, 70, Hkv * nrep
                K, V = torch.randn(S, Hkv, P, Dh, generator=g), torch.randn(S, Hkv, P, Dh, generator=g)
                qk = torch.randn(5, Hq + 2 * Hkv, Dh, generator=g) * 2
                lens = torch.tensor([1, 70, 17, 33, 16])
                out[f"decode attention {Hkv}x{nrep}x{Dh}"] = ext.decode_attention(qk, K, V, 1, lens, Hq, Dh**-0.5)
                slots = torch.tensor([5, 0, 0, 3, 1])
                out[f"slot attention {Hkv}x{nrep}x{Dh}"] = ext.slot_attention(qk, K, V, slots, lens, Hq, Dh**-0.5)
                # prompt tokens' float32 kernel: a score's fused multiply-add chain is the same on 8 lanes as on 16
                prompt_slots, prompt_lens = torch.tensor([0, 0, 0, 2, 2]), torch.tensor([68, 69, 70, 16, 17])
                out[f"prompt attention {Hkv}x{nrep}x{Dh}"] = ext.slot_attention(qk, K, V, prompt_slots, prompt_lens, Hq,
                                                                                Dh**-0.5, prompt=True)
                h = torch.bfloat16
                out[f"decode attention bfloat16 {Hkv}x{nrep}x{Dh}"] = ext.decode_attention(qk.to(h), K.to(h), V.to(h), 1, lens, Hq, Dh**-0.5)
            # the 8-bit KV cache's attention on its float path (an AVX-512 build with AVX512-VNNI takes integer dot
            # products by default, which an AVX2 build has no counterpart of)
            ext._attention_q8_int(False)  # (no-op without the integer path; back on in the finally below)
            for Hkv, nrep, Dh in [(3, 3, 64), (1, 8, 128), (2, 2, 16)]:
                S, P, Hq = 6, 80, Hkv * nrep
                K8, Ks = quantize_kv(torch.randn(S, Hkv, P, Dh, generator=g))
                V8, Vs = quantize_kv(torch.randn(S, Hkv, P, Dh, generator=g) * 2)
                qk = torch.randn(5, Hq + 2 * Hkv, Dh, generator=g) * 2
                lens = torch.tensor([1, 70, 17, 33, 16])
                out[f"decode attention int8 cache {Hkv}x{nrep}x{Dh}"] = ext.decode_attention_q8(
                    qk, to_key_blocks(K8), V8, Ks, Vs, 1, lens, Hq, Dh**-0.5)
            # silu(g) * u (the FFN's activation) over widths with and without a tail, values from -100 to 100
            for n in (1536, 100, 7):
                gate = torch.randn(3, n, generator=g) * torch.tensor([1.0, 10.0, 100.0])[:, None]
                out[f"silu_mul {n}"] = ext.silu_mul_(gate.contiguous(), torch.randn(3, n, generator=g))
                gate_h = gate.to(torch.bfloat16).contiguous()
                out[f"silu_mul bfloat16 {n}"] = ext.silu_mul_(gate_h, torch.randn(3, n, generator=g).to(torch.bfloat16))
            # a sublayer's residual add + RMSNorm and the rotary embedding in place (widths with and without a tail;
            # float32 and bfloat16)
            for dt in (torch.float32, torch.bfloat16):
                for D in (576, 100, 33):
                    h, delta = torch.randn(5, D, generator=g).to(dt), torch.randn(5, D, generator=g).to(dt)
                    w = (torch.rand(D, generator=g) + 0.5).to(dt)
                    out[f"add_rms_norm {dt} {D}"] = ext.add_rms_norm_(h, delta, w, 1e-5)
                    out[f"add_rms_norm {dt} {D} residual"] = h
                for Dh in (64, 16):
                    qkv = torch.randn(5, 9 + 2 * 3, Dh, generator=g).to(dt)
                    ang = torch.rand(5, Dh // 2, generator=g) * 6
                    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(dt), torch.cat([-ang.sin(), ang.sin()], -1).to(dt)
                    ext.rotary_(qkv[:, :12], cos, sin)
                    out[f"rotary {dt} {Dh}"] = qkv
            # greedy sampling's argmax over a vocabulary (ties and a NaN row included)
            logits = torch.randn(6, 49152, generator=g).round(decimals=1)
            logits[2, 100] = float("nan")
            out["argmax_rows"] = ext.argmax_rows(logits)
            # sampling: temperature alone, with top-k, top-p, min-p, and under a grammar's bitmask
            x = torch.randn(8, 49152, generator=g) * 3
            rows, n8 = torch.arange(8), torch.full((8,), 0.8)
            top_k = torch.tensor([0, 0, 50, 0, 0, 7, 0, 1])
            top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.95, 0.99, 1.0])
            u = torch.rand(8, generator=g, dtype=torch.float64)
            out["sample_rows"] = ext.sample_rows(x, rows, n8, top_k, top_p, u)
            out["sample_rows min_p"] = ext.sample_rows(x, rows, n8, top_k, top_p, u, min_p=torch.full((8,), 0.05))
            bits = torch.randint(-2**31, 2**31 - 1, (8, 49152 // 32), generator=g, dtype=torch.int64).to(torch.int32)
            out["sample_rows masked"] = ext.sample_rows(x, rows, n8, top_k, top_p, u, bits, 49152 - 5)
        out.update(engine_outputs())
    finally:  # (the engine's batch-invariant runner sets the mode at each forward and leaves it: restored here too)
        ext._batch_invariant(was)
        ext._attention_bf16_dot(True)
        ext._attention_q8_int(True)
    return out


def engine_outputs() -> dict[str, torch.Tensor]:
    """The engine end to end on the compiled kernels (the tiny Llama in float32, `batch_invariant` so prefill takes
    the compiled GEMM too): greedy requests of two ReMix adapters and of the bare base and a seeded sampled one,
    served together; their tokens and log-probabilities (with the top two alternatives)."""
    import tempfile
    from pathlib import Path

    import remix
    from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from tests.helpers import serve_together, write_adapter

    model, tok = remix.tiny_model(seed=3)
    with torch.no_grad():  # larger weights, so greedy decoding does not collapse to one repeated byte
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter(model, Path(tmp) / f"a{i}", seed=i) for i in range(2)]
        engine = Engine(model, tok, EngineConfig(max_model_len=96, max_num_seqs=4, max_prefill_chunk=16,
                                                 max_batched_tokens=40, batch_invariant=True))
        for i, path in enumerate(paths):
            engine.load_adapter(f"a{i}", path)
    prompts = ["The quick brown fox", "Hello, my name is", "1 2 3 4", "Once upon a time, in a land far away, there"]
    greedy = dict(max_tokens=24, ignore_eos=True, logprobs=2)
    params = [SamplingParams(temperature=0.0, **greedy)] * 3 + [SamplingParams(temperature=0.8, top_p=0.9, seed=7, **greedy)]
    reqs = [GenerationRequest(f"r{i}", tok(p).input_ids, params[i], adapter=(None, "a0", "a1", "a0")[i]) for i, p in enumerate(prompts)]
    events = serve_together(engine, reqs)
    out = {}
    for r in reqs:
        evs = events[r.request_id]
        out[f"engine {r.request_id} tokens"] = torch.tensor([t for e in evs for t in e.token_ids])
        out[f"engine {r.request_id} logprobs"] = torch.tensor(
            [[lp] + [x for pair in top for x in pair] for e in evs for (_, lp, top) in e.logprobs], dtype=torch.float64)
    return out


def compare(path: str) -> list[str]:
    """The names whose outputs here differ from those saved at path (or are missing), with the largest difference."""
    want, got = torch.load(path), outputs()
    bad = []
    for name, w in want.items():
        h = got.get(name)
        if h is None or h.shape != w.shape or not torch.equal(h, w):
            diff = (h.double() - w.double()).abs().max().item() if h is not None and h.shape == w.shape else "shape"
            bad.append(f"{name}: {diff}")
    return bad


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "compare"):
        print(__doc__.splitlines()[0] + "\nusage: python -m tests.kernel_outputs save|compare PATH", file=sys.stderr)
        return 2
    if argv[0] == "save":
        torch.save(outputs(), argv[1])
        return 0
    bad = compare(argv[1])
    for line in bad:
        print("MISMATCH", line)
    print(f"{len(bad)} mismatches in {len(torch.load(argv[1]))} outputs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
