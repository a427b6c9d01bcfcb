"""The 8-bit KV cache (--kv-cache-dtype int8): its quantizer, the compiled write and decode attention against torch
references, and the engine on it (close to the full-precision cache, batch-invariant, twice the slots a budget)."""

import pytest
import torch
import torch.nn.functional as F

from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from server.engine.cache import SlotKVCache, dequantize_kv, from_key_blocks, quantize_kv, to_key_blocks
from tests.test_engine import (PROMPTS, assert_batch_equals_alone, greedy, lively_tiny, logprobs_of, make_adapter,
                               tokens_of)
from tests.test_kernels import _compiled


def test_quantize_kv_worked_example_and_error_bound():
    # row [1, -2, 0.5, 0]: s = 2 / 127; x / s = [63.5, -127, 31.75, 0] -> [64 (a tie: to even), -127, 32, 0]
    codes, scale = quantize_kv(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert codes.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0]]
    assert scale.tolist() == [torch.tensor(2.0 / 127).item(), 0.0]  # an all-zero row: scale 0, codes 0, back to zeros
    x = torch.randn(500, 64) * torch.rand(500, 1) * 10
    codes, scale = quantize_kv(x.bfloat16())
    back = dequantize_kv(codes, scale, torch.float32)
    # each value within half a step (s / 2) of its bfloat16 input, plus the product's float32 rounding
    err = (back - x.bfloat16().float()).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())
    assert int(codes.abs().max()) == 127 and bool((codes.abs().amax(-1) == 127).all())  # every row uses the full range


def test_key_blocks_layout():
    # position p's dimension pair e sits at [p // 16, e, p % 16]: p = 17, dims (4, 5) -> block 1, pair 2, lane 1
    codes = torch.arange(32 * 8).reshape(32, 8)  # value = 8 * p + d
    blocks = to_key_blocks(codes)
    assert blocks.shape == (2, 4, 16, 2) and blocks[1, 2, 1].tolist() == [8 * 17 + 4, 8 * 17 + 5]
    assert torch.equal(from_key_blocks(blocks), codes)


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [1, 5])
def test_compiled_kv_write_q8_is_bit_identical_to_quantize_kv(dtype, q, blocked):
    """kv_write_q8_ stores exactly quantize_kv's codes and scales where index_put_ would put them (strided input, as
    the lean forward hands it; V's rows or K's blocks), and touches nothing else; bad input is refused with a
    message."""
    ext = _compiled()
    torch.manual_seed(q)
    S, H, P, Dh, b, row0 = 6, 3, 32, 64, 3, 2
    cache = torch.randint(-127, 128, (S, H, P, Dh), dtype=torch.int8)
    scales = torch.rand(S, H, P)
    fresh = (torch.randn(b, q, 2 * H, Dh) * 3).to(dtype)[:, :, H:].transpose(1, 2)  # [b, H, q, Dh], not contiguous
    fresh[0, 0, 0] = 0  # an all-zero row
    pos = torch.stack([torch.randperm(P)[:q] for _ in range(b)])
    want_c, want_s = cache.clone(), scales.clone()
    codes, scale = quantize_kv(fresh)
    rows = torch.arange(b)[:, None].expand(b, q)
    want_c[row0 : row0 + b].transpose(1, 2).index_put_((rows, pos), codes.transpose(1, 2))
    want_s[row0 : row0 + b].transpose(1, 2).index_put_((rows, pos), scale.transpose(1, 2))
    if blocked:
        cache, want_c = to_key_blocks(cache), to_key_blocks(want_c)
    ext.kv_write_q8_(cache, scales, fresh, row0, pos)
    assert torch.equal(cache, want_c) and torch.equal(scales, want_s)
    with pytest.raises(RuntimeError, match="out of"):
        ext.kv_write_q8_(cache, scales, fresh, row0, pos + P)
    with pytest.raises(RuntimeError, match="rows out of the cache"):
        ext.kv_write_q8_(cache, scales, fresh, S - 1, pos)
    with pytest.raises(RuntimeError, match="int8"):
        ext.kv_write_q8_(cache.float(), scales, fresh, row0, pos)
    with pytest.raises(RuntimeError, match="scales"):
        ext.kv_write_q8_(cache, scales[:, :, :-1].contiguous(), fresh, row0, pos)


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Dh,Hkv,nrep", [(64, 3, 3), (64, 2, 1), (128, 1, 8), (16, 2, 2), (32, 1, 3)])
def test_compiled_decode_attention_q8_matches_sdpa_on_the_dequantized_cache(dtype, Dh, Hkv, nrep, integer):
    """decode_attention_q8 computes attention over s * c (the values the cache stands for) as SDPA over the
    dequantized float32 K and V does: the float path up to float32 order (and one rounding of a bfloat16 output), the
    integer path (AVX512-VNNI, the default where the CPU has it; head dims that are multiples of 32) also with its
    query and weights on 16 bits (each within 1/65534 of its head's largest: ~3e-4 here, against the cache's own
    rounding of ~0.4 % of each row's largest value). Each row's output bit-identical alone and in the batch; one
    position gives its dequantized value."""
    ext = _compiled()
    if not ext._attention_q8_int(integer) and integer:
        pytest.skip("no AVX512-VNNI in this build: the float path only")
    try:
        _attention_q8_case(ext, dtype, Dh, Hkv, nrep, integer and Dh % 32 == 0)
    finally:
        ext._attention_q8_int(True)


def _attention_q8_case(ext, dtype, Dh, Hkv, nrep, integer):
    torch.manual_seed(Dh + Hkv + nrep)
    S, P, b, row0, Hq = 7, 70, 5, 2, Hkv * nrep
    K8, Ks = quantize_kv(torch.randn(S, Hkv, P, Dh))
    P = 80  # whole key blocks: positions 70-79 hold codes never read
    K8 = to_key_blocks(torch.cat([K8, torch.randint(-127, 128, (S, Hkv, P - 70, Dh), dtype=torch.int8)], 2))
    Ks = torch.cat([Ks, torch.rand(S, Hkv, P - 70)], 2)
    V8, Vs = quantize_kv(torch.randn(S, Hkv, P, Dh) * 2)
    qk = (torch.randn(b, Hq + 2 * Hkv, Dh) * 2).to(dtype)
    lens = torch.tensor([1, 70, 17, 33, 16])
    got = ext.decode_attention_q8(qk, K8, V8, Ks, Vs, row0, lens, Hq, Dh**-0.5)
    span = int(lens.max())
    mask = (torch.arange(span)[None, :] < lens[:, None])[:, None, None, :]
    K, V = dequantize_kv(from_key_blocks(K8), Ks, torch.float32), dequantize_kv(V8, Vs, torch.float32)
    want = F.scaled_dot_product_attention(qk[:, :Hq].reshape(b, Hkv, nrep, Dh).float(), K[row0 : row0 + b, :, :span],
                                          V[row0 : row0 + b, :, :span], attn_mask=mask, scale=Dh**-0.5)
    assert got.shape == (b, Hkv, nrep, Dh) and got.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 8e-3, "rtol": 4e-3}
    if integer:
        tol = {"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 5e-3}
    torch.testing.assert_close(got.float(), want, **tol)
    # one position: its value (s * c, rounded once; on the integer path its weight is exactly 32767 steps of 1 / 32767)
    torch.testing.assert_close(got[0, 0, 0].float(), V[row0, 0, 0].to(dtype).float(), atol=0,
                               rtol=2e-7 if dtype == torch.float32 else 0)
    for i in range(b):
        alone = ext.decode_attention_q8(qk[i : i + 1].contiguous(), K8, V8, Ks, Vs, row0 + i, lens[i : i + 1], Hq,
                                        Dh**-0.5)
        assert torch.equal(alone[0], got[i])
    with pytest.raises(RuntimeError, match="int8"):
        ext.decode_attention_q8(qk, K, V, Ks, Vs, row0, lens, Hq, Dh**-0.5)
    with pytest.raises(RuntimeError, match="blocks of 16"):
        ext.decode_attention_q8(qk, from_key_blocks(K8), V8, Ks, Vs, row0, lens, Hq, Dh**-0.5)
    with pytest.raises(RuntimeError, match="Ks and Vs"):
        ext.decode_attention_q8(qk, K8, V8, Ks.double(), Vs, row0, lens, Hq, Dh**-0.5)


def test_slot_cache_int8_round_trip_move_and_swap():
    """The torch path (no compiled kernels: another device, or the extension missing) writes what the compiled one
    writes; read() gives the dequantized values; move and swap carry the scales with the codes."""
    torch.manual_seed(0)
    caches = [SlotKVCache(2, 4, 12, 2, 16, 4, torch.float32, "cpu", kv_dtype=torch.int8) for _ in range(2)]
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    for c in caches:
        c.prepare(1, torch.arange(5)[None, :].expand(2, 5) + 2, 7)
    caches[0].write(k, v, 1)  # contiguous rows: the compiled kv_write_q8_
    wide = torch.zeros(2, 2, 5, 32)
    wide[..., ::2] = k
    caches[1].write(wide[..., ::2], v.clone(), 1)  # the same keys with a strided last dim: quantize_kv and index_put_
    for name in ("k", "v", "ks", "vs"):
        assert torch.equal(getattr(caches[0], name)[1], getattr(caches[1], name)[1])
    got_k, got_v = caches[0].read(1)
    assert got_k.shape == (2, 2, 7, 16) and got_k.dtype == torch.float32
    torch.testing.assert_close(got_k[:, :, 2:7], k, atol=float(k.abs().max()) / 254 * 1.01, rtol=0)
    before = caches[0].read(1)
    caches[0].move(1, 0, 7)
    caches[0].prepare(0, torch.arange(5)[None, :].expand(2, 5) + 2, 7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(caches[0].read(1), before))  # slot 1 -> 0
    caches[0].swap(0, 3, 7)
    caches[0].prepare(2, torch.arange(5)[None, :].expand(2, 5) + 2, 7)
    assert all(torch.equal(a[1], b[0]) for a, b in zip(caches[0].read(1), before))  # slot 0 <-> 3
    assert SlotKVCache.bytes_per_token(30, 3, 64, torch.bfloat16, torch.int8) * 2 < \
        SlotKVCache.bytes_per_token(30, 3, 64, torch.bfloat16) * 1.07  # (64 + 4) / 128 of bfloat16's bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_engine_follows_the_full_cache_and_stays_batch_invariant(tmp_path, dtype):
    """An engine on an 8-bit cache: its log-probabilities stay close to the full-precision engine's (the cache's
    rounding only), the compiled decode path agrees with SDPA over the dequantized cache (--decoder exact), and a
    mixed batch with an adapter gives every request what it gets alone. The same budget holds twice the slots."""
    path = make_adapter(lively_tiny()[0], tmp_path / "a", seed=4)
    engines = {}
    for name, kv, decoder in (("full", "auto", "lean"), ("int8", "int8", "lean"), ("int8_exact", "int8", "exact")):
        model, tok = lively_tiny()
        model.to(dtype)
        engines[name] = Engine(model, tok, EngineConfig(max_model_len=96, max_num_seqs=8, max_prefill_chunk=8,
                                                        kv_cache_dtype=kv, decoder=decoder))
        engines[name].load_adapter("a", path)
    assert engines["int8"].runner.cache.k[0].dtype == torch.int8
    assert engines["int8"].stats()["kv_cache_dtype"] == "int8"
    prompts = [tok(p).input_ids for p in PROMPTS]
    for i, ids in enumerate(prompts):
        adapter = "a" if i % 2 else None
        full = collect(engines["full"], GenerationRequest(f"f{i}", ids, greedy(12), adapter=adapter))
        lp = {}
        for name in ("int8", "int8_exact"):
            ev = collect(engines[name], GenerationRequest(f"{name}{i}", ids, greedy(12), adapter=adapter))
            lp[name + "_seq"], lp[name + "_tokens"] = logprobs_of(ev), tokens_of(ev)
        assert lp["int8_tokens"][:4] == tokens_of(full)[:4]
        lean = engines["int8"].runner.lean
        assert lean._stack[1] is not None  # the decode steps ran in the compiled DecodeStack ...
        lean.stack_enabled = False  # ... which is bit-identical to the Python loop over the same kernels
        ev = collect(engines["int8"], GenerationRequest(f"loop{i}", ids, greedy(12), adapter=adapter))
        lean.stack_enabled = True
        assert tokens_of(ev) == lp["int8_tokens"] and logprobs_of(ev) == lp["int8_seq"]
        # int8 vs the full cache: the keys' and values' rounding (~0.4 % of each row's largest value) through 2 layers
        torch.testing.assert_close(torch.tensor(lp["int8_seq"][:4]), torch.tensor(logprobs_of(full)[:4]),
                                   atol=0.05, rtol=0.05)
        # compiled int8 attention vs SDPA over the dequantized cache: float32 order (bfloat16: its rounding)
        # (bfloat16: SDPA reads K and V rounded to bfloat16, the kernel s * c as is), over the tokens both chose alike
        # (bfloat16: the first four tokens; further on the two contexts' roundings have compounded through this
        # model's large logits - one case 0.2 apart at the tenth token - and the end-to-end check is the tokens above)
        same = next((j for j, (a, b) in enumerate(zip(lp["int8_tokens"], lp["int8_exact_tokens"])) if a != b), 12)
        assert same >= (12 if dtype == torch.float32 else 4)
        same = same if dtype == torch.float32 else 4
        tol = 1e-4 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(torch.tensor(lp["int8_seq"][:same]), torch.tensor(lp["int8_exact_seq"][:same]),
                                   atol=tol, rtol=tol)
    assert_batch_equals_alone(engines["int8"], prompts, 8, lambda i: "a" if i % 2 else None)


def test_int8_cache_doubles_the_slots_of_a_budget_and_refuses_bad_settings():
    model, tok = lively_tiny()
    mc = model.config
    head_dim = mc.hidden_size // mc.num_attention_heads
    per_token = SlotKVCache.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, head_dim, torch.float32)
    per_slot = per_token * (64 + 8)
    budget = per_slot * 3
    full = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=32, max_prefill_chunk=8,
                                           kv_budget_bytes=budget))
    small = Engine(lively_tiny()[0], tok, EngineConfig(max_model_len=64, max_num_seqs=32, max_prefill_chunk=8,
                                                       kv_budget_bytes=budget, kv_cache_dtype="int8"))
    # float32 rows of 4 * head_dim bytes against head_dim + 4: (4 * 16) / (16 + 4) = 3.2x the slots here
    assert full.num_slots == 3 and small.num_slots == 3 * 4 * head_dim // (head_dim + 4)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(lively_tiny()[0], tok, EngineConfig(kv_cache_dtype="fp8"))


def test_int8_cache_under_hf_modules_equals_the_exact_decoder():
    """--decoder hf (HF's attention modules through the cache's update) reads the same dequantized K and V as the
    exact decoder: the same tokens, log-probabilities equal within float32 rounding."""
    out = {}
    for decoder in ("hf", "exact"):
        model, tok = lively_tiny()
        engine = Engine(model, tok, EngineConfig(max_model_len=96, max_num_seqs=4, max_prefill_chunk=8,
                                                 kv_cache_dtype="int8", decoder=decoder))
        assert engine.runner.decoder == decoder
        out[decoder] = [collect(engine, GenerationRequest(f"{decoder}{i}", tok(p).input_ids, greedy(10)))
                        for i, p in enumerate(PROMPTS[:3])]
    for a, b in zip(out["hf"], out["exact"]):
        assert tokens_of(a) == tokens_of(b)
        torch.testing.assert_close(torch.tensor(logprobs_of(a)), torch.tensor(logprobs_of(b)), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_default_base_on_the_int8_cache_follows_the_full_cache(default_base):
    """The embedded SmolLM2-135M-Instruct in bfloat16 (the server's default on such CPUs) on an 8-bit cache against the
    bfloat16 cache: the first token's five most likely candidates keep their log-probabilities within 0.4, and on
    confident text the greedy tokens are the same (a near-tie can flip: the chat answer's first token is one - "The"
    and "L'" 0.25 apart on the bfloat16 cache, 0.08 in float32, tied on the 8-bit cache - so the chat prompt is held to
    the log-probabilities only). The logits are bfloat16, in steps of 0.125 at these magnitudes (16-32), so the two
    caches' log-probabilities move by whole steps: 0.25 had been the bound, and on an Intel VM with AMX (whose base
    GEMMs round otherwise than AVX512-BF16's) two of the chat prompt's candidates moved by 0.258 (two steps and the
    normaliser's change); 0.4 allows three steps."""
    import remix

    engines = {}
    for kv in ("auto", "int8"):
        model, tok = remix.load_base(dtype=torch.bfloat16)
        engines[kv] = Engine(model, tok, EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_dtype=kv))
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompts = ["The capital of France is", "def fibonacci(n):", chat]
    first, text = {}, {}
    for kv, engine in engines.items():
        first[kv] = [collect(engine, GenerationRequest(f"{kv}f{i}", tok(p).input_ids, SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=5)))[0].logprobs[0][2] for i, p in enumerate(prompts)]
        text[kv] = [tokens_of(collect(engine, GenerationRequest(f"{kv}{i}", tok(p).input_ids, greedy(12))))
                    for i, p in enumerate(prompts[:2])]
    for full, small in zip(first["auto"], first["int8"]):
        full, small = dict(full), dict(small)
        common = set(full) & set(small)
        assert len(common) >= 4 and all(abs(full[t] - small[t]) < 0.4 for t in common)
    assert text["int8"] == text["auto"]
    assert "Paris" in tok.decode(text["int8"][0])
