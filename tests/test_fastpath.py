"""The lean decoder forward (server/engine/fastpath.py) against Hugging Face's modules.

``decoder="exact"`` is compared exactly (``==`` on token ids and on float log-probabilities): it runs the same ATen
ops in the same order, and its rewrites (one GEMM over [q; k; v], the rotary sign folded into sin, the mask made
additive once) change no float. ``decoder="lean"`` (the default) adds the compiled decode attention, which sums in
another order: same tokens, log-probabilities within a stated tolerance. Engines over copies of one model serve the
same requests at once.
"""

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import remix
from remix.models import tiny_model, tiny_tokenizer
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine.fastpath import LeanForward, unsupported_reason
from tests.helpers import serve_together

SIZES = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=257, eos_token_id=258, pad_token_id=256)


def lively(model):
    """Larger weights, so greedy decoding does not settle on one repeated byte and the comparison covers many tokens."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


def tiny(arch: str, kv_heads: int = 2):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    if arch == "llama":
        model, _ = tiny_model(seed=0, num_key_value_heads=kv_heads)
    elif arch == "qwen2":  # q/k/v carry biases
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, num_key_value_heads=kv_heads))
    else:
        model = MistralForCausalLM(MistralConfig(**SIZES, num_key_value_heads=kv_heads, sliding_window=None))
    assert unsupported_reason(model, 160) is None, unsupported_reason(model, 160)
    return lively(model.float()), tok


def run_all(engine, requests):
    return {rid: ([t for e in evs for t in e.token_ids], [lp for e in evs for lp in e.logprobs])
            for rid, evs in serve_together(engine, requests).items()}


def engines_for(model, tok, adapters: dict[str, str], decoders=("exact", "hf")):
    cfg = dict(max_model_len=160, max_num_seqs=8, max_prefill_chunk=16, max_batched_tokens=40)
    engines = []
    for decoder in decoders:
        engine = Engine(copy.deepcopy(model), tok, EngineConfig(**cfg, decoder=decoder))
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        assert (engine.runner.lean is None) == (decoder == "hf")
        engines.append(engine)
    return engines


def requests_for(tok, adapters):
    prompts = ["The quick brown fox", "Hello, my name is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", "Once"]
    out = []
    for i, p in enumerate(prompts):  # greedy and seeded sampling, every adapter and the bare base in one batch
        params = SamplingParams(max_tokens=24, temperature=0.0 if i % 2 == 0 else 0.9, seed=i, ignore_eos=True, logprobs=3)
        out.append(GenerationRequest(f"r{i}", tok(p).input_ids, params, adapters[i % len(adapters)]))
    return out


def two_adapters(model, tmp_path) -> dict[str, str]:
    """Random adapters: a0 on the FFN (the default targets), a1 on q, v, o and down (so q/k/v cannot be fused)."""
    return random_adapters(model, tmp_path, [None, ["q_proj", "v_proj", "o_proj", "down_proj"]])


def random_adapters(model, tmp_path, target_lists) -> dict[str, str]:
    """Adapter a<i> on target_lists[i] (None: the default targets), with random B and routers, written to tmp_path."""
    paths = {}
    for i, targets in enumerate(target_lists):
        cfg = remix.MixtureConfig(n=4, k=2, r=4, **({"targets": targets} if targets else {}))
        layers = remix.inject(model, cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
                layer.router.copy_(torch.randn(layer.router.shape, generator=g))
        remix.save_adapter(model, tmp_path / f"a{i}")
        remix.unwrap(model)
        paths[f"a{i}"] = str(tmp_path / f"a{i}")
    return paths


@pytest.mark.parametrize("arch,kv_heads,dtype", [("llama", 2, torch.float32), ("llama", 4, torch.float32),
                                                 ("qwen2", 2, torch.float32), ("mistral", 1, torch.float32),
                                                 ("llama", 2, torch.bfloat16), ("qwen2", 2, torch.bfloat16)])
def test_exact_decoder_is_bit_identical_to_hf_modules(tmp_path, monkeypatch, arch, kv_heads, dtype, device):
    """On CUDA the default decoder (``lean``: there, this forward with SDPA, decode steps replayed from CUDA graphs) is
    compared instead, within float tolerance: cuBLAS picks its kernels by shape, so the one [q; k; v] GEMM and a
    graph's padded batch do not round like HF's three GEMMs at the batch's own size."""
    model, tok = tiny(arch, kv_heads)
    steps = []
    lean_call = LeanForward.__call__
    monkeypatch.setattr(LeanForward, "__call__", lambda self, *a, **kw: steps.append(1) or lean_call(self, *a, **kw))
    paths = two_adapters(model, tmp_path)
    model.to(device=device, dtype=dtype)  # adapters are written in float32 and served on a model of either dtype
    lean, hf = engines_for(model, tok, paths, decoders=("exact" if device.type == "cpu" else "lean", "hf"))
    got, want = run_all(lean, requests_for(tok, [None, "a0", "a1", "a0"])), run_all(hf, requests_for(tok, [None, "a0", "a1", "a0"]))
    if device.type == "cpu":
        assert got == want
    else:
        assert_close_runs(got, want, dtype)
    assert len(steps) > 24 or (device.type == "cuda" and len(steps) >= 8)  # every eager step took the lean forward
    assert all(len(toks) == 24 for toks, _ in got.values())
    # exact keeps HF's three q/k/v GEMMs; lean fuses them where no adapter wraps a projection
    assert all(f is None for f in lean.runner.lean.qkv) == (device.type == "cpu")
    assert type(lean.runner.model.model.layers[0].self_attn.q_proj) is not torch.nn.Linear


def assert_close_runs(got, want, dtype, min_shared=2):
    """float32: the same tokens, log-probabilities within 1e-4 and the same top alternatives. bfloat16: a near-tied or
    sampled token may go another way after an ulp's difference, so log-probabilities within 0.1 while both generate
    the same tokens, and at least ``min_shared`` tokens shared."""
    for rid, (tokens, logprobs) in want.items():
        if dtype == torch.float32:
            assert got[rid][0] == tokens
        shared = next((i for i, (a, b) in enumerate(zip(got[rid][0], tokens)) if a != b), len(tokens))
        assert shared >= min_shared
        for (tok_a, lp_a, top_a), (tok_b, lp_b, top_b) in list(zip(got[rid][1], logprobs))[:shared]:
            assert tok_a == tok_b and abs(lp_a - lp_b) <= (1e-4 if dtype == torch.float32 else 0.1)
            if dtype == torch.float32:  # bfloat16 alternatives within an ulp of each other may swap places
                assert [t for t, _ in top_a] == [t for t, _ in top_b]


@pytest.mark.parametrize("arch,kv_heads,dtype", [("llama", 2, torch.float32), ("qwen2", 1, torch.float32),
                                                 ("llama", 2, torch.bfloat16)])
def test_lean_decoder_with_compiled_matches_hf_modules(tmp_path, monkeypatch, arch, kv_heads, dtype):
    """The default decoder: every decode step's attention runs the compiled kernel. float32: the same tokens as HF's
    modules and log-probabilities within 1e-4 (the attention sums in another order, ~1e-7 relative). bfloat16: the
    kernel sums in another order than SDPA (and, without AVX512-BF16, keeps the softmax weights in float32 where SDPA
    rounds them to bfloat16), so the two differ by about a bfloat16 ulp per layer and a sampled or near-tied token may go another way: log-probabilities within 0.1
    for as long as both generate the same tokens, and at least the first two tokens shared (the first decode step's
    attention included)."""
    from remix.kernels import cpu_ext

    ext = cpu_ext.load()
    if ext is None:
        pytest.skip("the compiled CPU kernels are not built here")
    calls = []
    kernel = ext.decode_attention
    monkeypatch.setattr(ext, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    model, tok = tiny(arch, kv_heads)
    paths = two_adapters(model, tmp_path)
    model.to(dtype)
    lean, hf = engines_for(model, tok, paths, decoders=("lean", "hf"))
    lean.runner.lean.stack_enabled = False  # the Python loop, whose calls are seen here (the stack = the loop: below)
    got, want = run_all(lean, requests_for(tok, [None, "a0", "a1", "a0"])), run_all(hf, requests_for(tok, [None, "a0", "a1", "a0"]))
    assert len(calls) >= 2 * 23  # two layers, every decode step
    assert_close_runs(got, want, dtype)
    # lean fuses q/k/v into one GEMM; a layer whose projections an adapter wraps computes them separately
    assert lean.runner.lean.qkv[0] is not None and type(lean.runner.model.model.layers[0].self_attn.q_proj) is not torch.nn.Linear


def test_fused_qkv_weights_are_views_and_the_hf_path_is_unchanged():
    model, tok = tiny("qwen2")
    ids = torch.tensor([tok("Hello there").input_ids])
    with torch.no_grad():
        before = model(ids).logits
    lean = LeanForward(model)
    at = model.model.layers[0].self_attn
    w, b, _ = lean.qkv[0]
    assert at.q_proj.weight.data_ptr() == w.data_ptr() and at.v_proj.bias.data_ptr() == b[-at.v_proj.out_features :].data_ptr()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_hooks_send_the_step_through_hf_modules():
    model, _ = tiny("llama")
    lean = LeanForward(model)
    assert lean.applies()
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not lean.applies()
    handle.remove()
    assert lean.applies()


@pytest.mark.parametrize("change,needle", [
    (lambda c: setattr(c, "_attn_implementation", "eager"), "attention implementation"),
    (lambda c: setattr(c, "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope type"),
    (lambda c: setattr(c, "hidden_act", "gelu"), "activation"),
    (lambda c: setattr(c, "model_type", "gpt2"), "model type"),
])
def test_unsupported_models_keep_hf_modules(change, needle):
    model, tok = tiny("llama")
    change(model.config)
    reason = unsupported_reason(model, 160)
    assert reason is not None and needle in reason
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=2))
    assert engine.runner.lean is None
    stats = engine.stats()  # what /health reports: the mode in effect and why the requested one did not apply
    assert stats["decoder"] == "hf" and needle in stats["decoder_fallback"]


def test_mistral_sliding_window_shorter_than_the_context_keeps_hf_modules():
    model = MistralForCausalLM(MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=64))
    assert "sliding window" in unsupported_reason(model, 160)
    assert unsupported_reason(model, 64) is None


def test_exact_decoder_follows_transformers_without_gqa_packing(tmp_path, monkeypatch):
    """Earlier transformers 5.x repeat K/V for a single query instead of packing its GQA heads (seen with 5.17: the
    exact decoder then differed in the last bits on GQA models). With packing off on both sides (HF made to take its
    repeat_kv branch), exact is again bit-identical."""
    import server.engine.fastpath as fastpath
    from transformers.integrations import sdpa_attention

    monkeypatch.setattr(fastpath, "HF_PACKS_GQA", False)
    monkeypatch.setattr(sdpa_attention, "is_torchdynamo_compiling", lambda: True)  # HF's branch: repeat_kv
    model, tok = tiny("llama", 2)
    paths = two_adapters(model, tmp_path)
    exact, hf = engines_for(model, tok, paths)
    assert run_all(exact, requests_for(tok, [None, "a0", "a1", "a0"])) == run_all(hf, requests_for(tok, [None, "a0", "a1", "a0"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_of_uneven_chunks_runs_on_its_real_tokens_only(tmp_path, monkeypatch, dtype):
    """Lean decoder, compiled path: a prefill step whose chunks differ in length runs its per-token ops (embedding,
    norms, rotary, linears, adapters) on the real tokens only - the step's ReMix layers see as many rows as there are
    prompt tokens - and the requests get what the same engine made to pad gives them: tokens, log-probabilities and
    per-request routing counts (float32 on the dot-product GEMM, whose rows do not depend on the row count: equal;
    otherwise within float tolerance)."""
    from remix.kernels import cpu_ext

    if cpu_ext.load() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    model, tok = tiny("llama", 2)
    paths = two_adapters(model, tmp_path)
    model.to(dtype)
    packed, padded = engines_for(model, tok, paths, decoders=("lean", "lean"))
    monkeypatch.setattr(padded.runner.lean, "packs", lambda *a: False)
    packed_rows = []
    call = LeanForward.__call__

    def spy(self, tokens, *a, **kw):
        if kw.get("rows") is not None:
            assert kw["rows"].numel() < tokens.numel()
            packed_rows.append(kw["rows"].numel())
        return call(self, tokens, *a, **kw)

    monkeypatch.setattr(LeanForward, "__call__", spy)

    def traced(engine):
        reqs = requests_for(tok, [None, "a0", "a1", "a0"])
        for r in reqs:
            r.trace = True
        events = {r.request_id: [] for r in reqs}
        for r in reqs:
            engine.submit(r, events[r.request_id].append)
        while engine.has_work():
            engine.step()
        out = {}
        for rid, evs in events.items():
            routing = next((e.routing for e in reversed(evs) if getattr(e, "routing", None)), None)
            out[rid] = ([t for e in evs for t in e.token_ids], [lp for e in evs for lp in e.logprobs], routing)
        return out

    got = traced(packed)
    assert packed_rows, "no prefill step was packed"
    want = traced(padded)
    for rid in want:  # r0 is on the bare base: no routing to count; the others' counts are there and equal
        if rid == "r0":
            assert got[rid][2] is None and want[rid][2] is None
        else:
            assert want[rid][2] and got[rid][2] == want[rid][2], rid
    if dtype == torch.float32 and cpu_ext.dot_gemm():
        assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}
    else:
        assert_close_runs({k: v[:2] for k, v in got.items()}, {k: v[:2] for k, v in want.items()}, dtype)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16)])
def test_compiled_decode_stack_is_bit_identical_to_the_python_loop(tmp_path, monkeypatch, arch, dtype):
    """Decode steps through ``DecodeStack`` (every decoder layer in one C++ call) give exactly what the lean forward's
    Python loop gives - the same kernels in the same order: tokens, log-probabilities and every LoRA's selection
    count, with a ReMix adapter on the FFN, another on o_proj and down_proj, and the bare base in one batch; then
    again with a third adapter on q and v (q/k/v no longer one GEMM: three projections in turn, in both). A routing
    trace sends the step through the Python loop instead. With that adapter loaded, steps whose tokens do not route in
    q / k / v run the base's one [q; k; v] GEMM in the stack, three projections in the loop: still the same numbers."""
    from remix.kernels import cpu_ext

    if cpu_ext.load() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    model, tok = tiny(arch, 2)
    paths = random_adapters(model, tmp_path, [None, ["o_proj", "down_proj"]])
    model.to(dtype)
    stacked, loop = engines_for(model, tok, paths, decoders=("lean", "lean"))
    loop.runner.lean.stack_enabled = False
    used = []
    build = LeanForward._decode_stack
    monkeypatch.setattr(LeanForward, "_decode_stack", lambda self, ext: used.append(build(self, ext)) or used[-1])
    got = run_all(stacked, requests_for(tok, [None, "a0", "a1", "a0"]))
    assert len(used) >= 20 and all(s is not None for s in used)
    assert len({id(s) for s in used}) == 1  # built once, reused by every decode step
    want = run_all(loop, requests_for(tok, [None, "a0", "a1", "a0"]))
    assert got == want and all(len(toks) == 24 for toks, _ in got.values())
    for name, layer in stacked.runner.stacked.items():
        assert torch.equal(layer.stack.counts, loop.runner.stacked[name].stack.counts), name
    # an adapter on q and v (and o, down) beside the others: q/k/v run as three projections, in the stack too
    qv = two_adapters(model.float(), tmp_path / "qv")["a1"]
    model.to(dtype)
    for engine in (stacked, loop):
        engine.load_adapter("qv", qv)
    used.clear()
    mixed = [None, "qv", "a0", "qv", "a1"]
    got = run_all(stacked, requests_for(tok, mixed))
    assert used and all(s is not None for s in used) and len({id(s) for s in used}) == 1
    assert type(stacked.runner.model.model.layers[0].self_attn.q_proj) is not torch.nn.Linear
    assert got == run_all(loop, requests_for(tok, mixed))
    for name, layer in stacked.runner.stacked.items():
        assert torch.equal(layer.stack.counts, loop.runner.stacked[name].stack.counts), name
    assert any(".q_proj" in name and layer.stack.counts.sum() > 0 for name, layer in stacked.runner.stacked.items())
    # with it loaded, steps where no token routes in q / k / v run the base's one [q; k; v] GEMM in the stack (the loop
    # keeps three projections): the same numbers
    key = stacked.runner.lean._stack[0]  # per layer: norms (4 items), the one q/k/v weight and bias, q, k, v, ...
    assert key[4] is not None and key[6] is not None
    without = [None, "a0", "a1", "a0"]
    assert run_all(stacked, requests_for(tok, without)) == run_all(loop, requests_for(tok, without))
    # a routing trace: the Python loop
    used.clear()
    traced = requests_for(tok, [None, "a0", "qv"])
    for r in traced:
        r.trace = True
    run_all(stacked, traced)
    assert used and all(s is None for s in used)


def test_decode_stack_is_checked_again_only_after_an_assignment_or_a_pool_change(tmp_path, monkeypatch):
    """The decode stack's full check (walking every layer's modules) runs on the first decode step and again only after a
    module or parameter assignment, an adapter load or a change of counting - and after an assignment the step uses the
    new objects: a new norm weight and a new o_proj give exactly what the Python loop gives with the same changes."""
    from remix.kernels import cpu_ext

    if cpu_ext.load() is None:
        pytest.skip("the compiled CPU kernels are not built here")
    model, tok = tiny("llama", 2)
    paths = random_adapters(model, tmp_path, [None])
    stacked, loop = engines_for(model, tok, paths, decoders=("lean", "lean"))
    loop.runner.lean.stack_enabled = False
    checks = []
    full = LeanForward._checked_stack
    monkeypatch.setattr(LeanForward, "_checked_stack", lambda self, ext, ctx: checks.append(1) or full(self, ext, ctx))
    before = run_all(stacked, requests_for(tok, [None, "a0"]))
    assert before == run_all(loop, requests_for(tok, [None, "a0"]))
    assert len(checks) == 1  # every decode step after the first reused its answer
    for engine in (stacked, loop):  # a pool change: checked again
        engine.load_adapter("b", paths["a0"])
    checks.clear()
    assert run_all(stacked, requests_for(tok, ["b", None])) == run_all(loop, requests_for(tok, ["b", None]))
    assert len(checks) == 1
    for engine in (stacked, loop):  # the same changes in both, by plain assignment
        layer = engine.runner.model.model.layers[1]
        layer.input_layernorm.weight = torch.nn.Parameter(layer.input_layernorm.weight * 1.5, requires_grad=False)
        o = layer.self_attn.o_proj
        new_o = torch.nn.Linear(o.in_features, o.out_features, bias=False)
        with torch.no_grad():
            new_o.weight.copy_(o.weight.flip(0))
        layer.self_attn.o_proj = new_o.requires_grad_(False)
    checks.clear()
    got = run_all(stacked, requests_for(tok, [None, "a0"]))
    assert len(checks) == 1
    assert got == run_all(loop, requests_for(tok, [None, "a0"]))
    assert got != before  # the changes matter: a stale stack could not have matched the loop


def switch_engine(tmp_path, dtype):
    """(the compiled kernels, an engine, its tokenizer) for A/B tests of a kernel switch that changes no value: the tiny
    Llama in ``dtype`` with a0 on the default targets and a1 on o / down only; skips without the compiled kernels.
    Every run prefills alike (no prefix cache), so two runs of the same requests can be compared token for token."""
    from remix.kernels import cpu_ext

    ext = cpu_ext.load()
    if ext is None:
        pytest.skip("the compiled CPU kernels are not built here")
    model, tok = tiny("llama", 2)
    paths = random_adapters(model, tmp_path, [None, ["o_proj", "down_proj"]])
    model.to(dtype)
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=8, max_prefill_chunk=16,
                                             max_batched_tokens=40, prefix_caching=False))
    for name, path in paths.items():
        engine.load_adapter(name, path)
    return ext, engine, tok


def zero_counts(engine) -> None:
    for layer in engine.runner.stacked.values():
        layer.stack.counts.zero_()


def counts_of(engine) -> dict:
    return {name: layer.stack.counts.clone() for name, layer in engine.runner.stacked.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefetching_the_next_modules_pools_changes_no_value(tmp_path, dtype):
    """The decode stack prefetches, during each GEMM before a routed module, that module's pools (Ahead in cpu_ext), whole
    for the slots whose tokens pick at least as many LoRAs as they have (_ahead_cover), and a small call its own
    selected LoRAs' B^T rows during its own GEMM (_own_bt): only where lines are cached changes, so tokens,
    log-probabilities and selection counts are the same with them from one row, from the default, and never, with every
    slot prefetched, none, and the own rows from the GEMM's first block or never - with one adapter, two, and the bare
    base in the batch."""
    from remix.kernels import cpu_ext

    ext, engine, tok = switch_engine(tmp_path, dtype)
    runs = []
    was = ext._ahead_from(16, 0.0), ext._ahead_cover(1.0), ext._own_bt(True, 0.75)  # (defaults differ by CPU vendor)
    try:
        for rows, start, cover, own in ((0, 0.5, 1.0, None), (1, 0.0, 0.0, 0.0), (16, 0.0, 1.0, 0.75), (4, 0.5, 1.0, 0.75),
                                        (2, 0.9, 50.0, 0.0), (4, 0.0, 0.0, None)):
            ext._ahead_from(rows, start)
            ext._ahead_cover(cover)
            ext._own_bt(own is not None, 0.75 if own is None else own)
            zero_counts(engine)
            cpu_ext.stack_clock(True)
            got = run_all(engine, requests_for(tok, [None, "a0", "a1", "a0", "a1"]))
            assert cpu_ext.stack_clock(False)[1] > 0  # decode steps ran in the compiled stack, where the prefetch is
            runs.append((got, counts_of(engine)))
    finally:
        cpu_ext.stack_clock(False)
        ext._ahead_from(*was[0])
        ext._ahead_cover(was[1])
        ext._own_bt(*was[2])
    assert all(len(toks) == 24 for toks, _ in runs[0][0].values())
    for got, counts in runs[1:]:
        assert got == runs[0][0]
        assert all(torch.equal(counts[name], runs[0][1][name]) for name in counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_and_act_in_one_region_change_no_value(tmp_path, dtype):
    """In decode steps of few rows the stack runs a routed FFN's gate, up and silu(gate) * up in one parallel region
    (run_pair in cpu_ext): tokens, log-probabilities and selection counts are those of the two calls and silu_mul_ -
    with an adapter on the FFN, one on o / down only (its tokens route nowhere in gate and up) and the bare base mixed
    in, in steps of one to five rows. The stack clock shows the fused path ran (no time on 'up' or 'act') or did not."""
    from remix.kernels import cpu_ext

    ext, engine, tok = switch_engine(tmp_path, dtype)
    # bfloat16 modules run in the compiled kernels (and so in one region) only with AVX512-BF16; elsewhere (an AVX2
    # build) every step takes the two calls, which must still give the same values
    fusable = dtype == torch.float32 or cpu_ext.dot_gemm(torch.bfloat16)
    runs, was = {}, ext._fuse_pair_below(64)
    try:
        for below in (64, 0):  # every decode step here fused, then none
            ext._fuse_pair_below(below)
            zero_counts(engine)
            cpu_ext.stack_clock(True)
            got = run_all(engine, requests_for(tok, [None, "a0", "a1", "a0", None]))
            ops, timed = cpu_ext.stack_clock(False)
            assert timed > 0  # decode steps ran in the compiled stack
            fused = below and fusable
            assert (ops["up"] == 0 and ops["act"] == 0) if fused else (ops["up"] > 0 and ops["act"] > 0)
            runs[below] = (got, counts_of(engine))
    finally:
        cpu_ext.stack_clock(False)
        ext._fuse_pair_below(was)
    assert all(len(toks) == 24 for toks, _ in runs[64][0].values())
    assert runs[64][0] == runs[0][0]
    counts = runs[64][1]
    assert any(int(c.sum()) > 0 for name, c in counts.items() if "gate_proj" in name)
    assert all(torch.equal(counts[name], runs[0][1][name]) for name in counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_lora_routing_shortcuts_change_no_value(tmp_path, dtype):
    """A plain LoRA (peft's, n = k = 1 in every projection) needs no routing: its one LoRA is every token's top 1, so
    its router's dot products are skipped (_single_route), and a small call whose tokens all sit in such slots takes
    its selections without the routing stage and its barrier (_trivial_route; run and, below _fuse_pair_below's 9 rows, run_pair). Tokens,
    log-probabilities and every LoRA's selection counts are those of the routed calls: the peft LoRA alone in steps of
    one to four rows, then beside the ReMix adapters and the bare base."""
    pytest.importorskip("peft")
    from server.bench import make_peft_adapter

    ext, engine, tok = switch_engine(tmp_path, dtype)
    make_peft_adapter(tiny("llama", 2)[0], tmp_path / "p", 0, 0.5, r=4, lora_alpha=8,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert engine.load_adapter("p", str(tmp_path / "p")).info["format"] == "peft"
    runs = {}
    try:
        for skip, trivial in ((True, True), (True, False), (False, False)):
            ext._single_route(skip)
            ext._trivial_route(trivial)
            zero_counts(engine)
            got = run_all(engine, requests_for(tok, ["p"]))
            got.update({f"m{k}": v for k, v in run_all(engine, requests_for(tok, ["p", "a0", None, "a1"])).items()})
            runs[skip, trivial] = (got, counts_of(engine))
    finally:
        ext._single_route(True)
        ext._trivial_route(True)
    first = runs[True, True]
    assert all(len(toks) == 24 for toks, _ in first[0].values())
    assert any(".gate_proj" in name and int(c.sum()) > 0 for name, c in first[1].items())
    for got, counts in list(runs.values())[1:]:
        assert got == first[0]
        assert all(torch.equal(counts[name], first[1][name]) for name in counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_as_one_gemm_then_gathers_changes_no_value(tmp_path, dtype):
    """In decode steps of one row the stack computes a LoRA-wrapped layer's q / k / v as the base's one [q; k; v] GEMM,
    then each routed projection's gather into its columns (_qkv_gather): tokens, log-probabilities and every LoRA's
    selection counts equal those of the three calls - one request at a time on an adapter on q and v (and o, down),
    on the FFN adapter and on the bare base, then all of them in one batch (the three calls, either way); and the
    stack against the Python loop (which always runs the three)."""
    ext, engine, tok = switch_engine(tmp_path, dtype)
    model, _ = tiny("llama", 2)  # the engine's base, unwrapped (the factory is seeded)
    engine.load_adapter("qv", two_adapters(model, tmp_path / "qv")["a1"])
    assert engine.runner.lean is not None and engine.runner.lean.qkv[0] is not None
    mixed = [None, "qv", "a0", "qv", "a1"]
    runs = {}
    try:
        for on in (True, False):
            ext._qkv_gather(on)
            zero_counts(engine)
            got = {adapter: run_all(engine, requests_for(tok, [adapter])[:1])["r0"] for adapter in ("qv", "a0", None)}
            got["mixed"] = run_all(engine, requests_for(tok, mixed))
            runs[on] = (got, counts_of(engine))
    finally:
        ext._qkv_gather(True)
    assert all(len(toks) == 24 for toks, _ in runs[True][0]["mixed"].values()) and len(runs[True][0]["qv"][0]) == 24
    assert runs[True][0] == runs[False][0]
    counts = runs[True][1]
    assert any(".q_proj" in name and int(c.sum()) > 0 for name, c in counts.items())
    assert all(torch.equal(counts[name], runs[False][1][name]) for name in counts)
    engine.runner.lean.stack_enabled = False  # the Python loop: three projections
    assert run_all(engine, requests_for(tok, ["qv"])[:1])["r0"] == runs[True][0]["qv"]
    assert run_all(engine, requests_for(tok, mixed)) == runs[True][0]["mixed"]
