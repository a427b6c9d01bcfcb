"""The attention of prompt tokens by tiles of tokens (remix/kernels/csrc/attention_prompt.h: bfloat16 prefill chunks
on AMX tiles where the CPU has AMX-BF16, else on AVX512-BF16 vectors; float32 prefill chunks on AVX-512 or AVX2
vectors): the float64 reference's values within the decode kernel's error, each token's output its own whatever shares
its call, the decode kernel wherever it must stay (switch off, batch-invariant mode, checked drafts), and an engine
whose prompts give the same tokens and log-probabilities in any split into chunks."""

import math

import pytest
import torch

import remix
from remix.kernels import cpu_ext
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams


def tiles_or_skip(form: str = "default", dtype: str = "bfloat16"):
    """The compiled module where the prompt kernel runs here for ``dtype`` in ``form`` ("amx", "vectors" or whichever
    is the default; float32 has vectors only), with that form switched on (tests put the default back), else a
    skip."""
    ext = cpu_ext.load()
    if ext is None or not hasattr(ext, "_prompt_dtypes") or dtype not in ext._prompt_dtypes():
        pytest.skip(f"no prompt kernel for {dtype} here (bfloat16: AVX512-BF16; float32: AVX-512 or AVX2 + FMA): "
                    "prompt tokens take the decode kernel")
    if form == "amx" and not cpu_ext.amx_bf16():
        pytest.skip("no AMX-BF16 here")
    ext._prompt_amx(form != "vectors")
    ext._prompt_tiles_calls()  # (reset)
    return ext


@pytest.fixture(autouse=True)
def default_form():
    yield
    ext = cpu_ext.load()
    if ext is not None and hasattr(ext, "_prompt_amx"):
        ext._prompt_amx(True)
        ext._prompt_tiles(True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def reference(qk, K, V, slots, lens, H):
    """float64 attention of each row over its slot's first lens positions: [T, Hkv, nrep, Dh]."""
    T, Hkv, Dh = qk.shape[0], K.shape[1], K.shape[3]
    nrep = H // Hkv
    out = torch.empty(T, Hkv, nrep, Dh, dtype=torch.float64)
    for t in range(T):
        for g in range(Hkv):
            k, v = K[slots[t], g, : lens[t]].double(), V[slots[t], g, : lens[t]].double()
            for r in range(nrep):
                out[t, g, r] = torch.softmax(k @ qk[t, g * nrep + r].double() / math.sqrt(Dh), 0) @ v
    return out


def case(Dh, H, Hkv, seed=0, dtype=torch.bfloat16):
    """Three cache rows, the rows' tokens as prefill chunks lay them out: row 1's positions 0-36 (lengths across the
    16- and 32-position blocks), row 3's 100-170, one token of row 0 at 250; past each row's last position the cache
    holds NaN, which no output may read."""
    g = torch.Generator().manual_seed(seed)
    S, P = 4, 300
    K = torch.randn(S, Hkv, P, Dh, generator=g).to(dtype)
    V = torch.randn(S, Hkv, P, Dh, generator=g).to(dtype)
    rows = [(1, p) for p in range(37)] + [(3, p) for p in range(100, 171)] + [(0, 250)]
    for s in range(S):
        last = max([p for r, p in rows if r == s], default=-1)
        K[s, :, last + 1 :] = float("nan")
        V[s, :, last + 1 :] = float("nan")
    slots = torch.tensor([s for s, _ in rows])
    lens = torch.tensor([p + 1 for _, p in rows])
    qk = (torch.randn(len(rows), H + 2 * Hkv, Dh, generator=g) * 2).to(dtype)
    return qk, K, V, slots, lens


# (dtype, form): bfloat16 on AMX tiles and on AVX512-BF16 vectors; float32 on vectors (AVX-512 or AVX2)
FORMS = [("bfloat16", "amx"), ("bfloat16", "vectors"), ("float32", "vectors")]


@pytest.mark.parametrize("dtype,form", FORMS)
@pytest.mark.parametrize("Dh,H,Hkv", [(64, 9, 3), (32, 8, 2), (128, 4, 4), (64, 8, 1), (64, 5, 1), (16, 8, 2)])
def test_prompt_tiles_match_the_reference_and_give_each_row_its_own_output(Dh, H, Hkv, dtype, form):
    if Dh == 16 and dtype == "bfloat16":
        pytest.skip("bfloat16 takes head widths of whole AMX steps (32 dimensions); 16 keeps the decode kernel")
    ext = tiles_or_skip(form, dtype)
    qk, K, V, slots, lens = case(Dh, H, Hkv, dtype=getattr(torch, dtype))
    scale = 1 / math.sqrt(Dh)
    tiles = ext.slot_attention(qk, K, V, slots, lens, H, scale, prompt=True)
    assert ext._prompt_tiles_calls() == 1
    decode = ext.slot_attention(qk, K, V, slots, lens, H, scale, prompt=False)
    assert ext._prompt_tiles_calls() == 0
    want = reference(qk, K, V, slots, lens, H)
    err_tiles, err_decode = (tiles.double() - want).abs(), (decode.double() - want).abs()
    assert bool(torch.isfinite(tiles).all())
    if dtype == "bfloat16":
        # the decode kernel's error (weights and output rounded to bfloat16), within a tenth, mean and worst
        assert float(err_tiles.mean()) <= 1.1 * float(err_decode.mean()) + 1e-6
        assert float(err_tiles.max()) <= 1.1 * float(err_decode.max()) + 1e-6
        torch.testing.assert_close(tiles.double(), want, atol=2e-2, rtol=2e-2)
    else:
        # float32: the decode kernel's arithmetic on vectors of positions - its outputs, bit for bit
        assert torch.equal(bits(tiles), bits(decode))
        torch.testing.assert_close(tiles.double(), want, atol=1e-5, rtol=1e-5)
    # a row's output is its own: alone, in other chunks, with the rows in another order
    T = qk.shape[0]
    for lo, hi in ((0, 37), (37, 108), (108, 109), (5, 6), (30, 40), (100, 109)):
        part = ext.slot_attention(qk[lo:hi], K, V, slots[lo:hi], lens[lo:hi], H, scale, prompt=True)
        assert torch.equal(bits(part), bits(tiles[lo:hi])), (lo, hi)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    shuffled = ext.slot_attention(qk[perm], K, V, slots[perm], lens[perm], H, scale, prompt=True)
    assert torch.equal(bits(shuffled), bits(tiles[perm]))


@pytest.mark.parametrize("dtype,form", FORMS)
def test_the_decode_kernel_stays_where_it_must(dtype, form):
    """Switched off, prompt rows take the decode kernel, bit for bit. In batch-invariant mode (a prompt's positions must
    then be what a decode step computes, since the prefix cache holds generated positions too) bfloat16 prompt rows
    take the decode kernel; float32's prompt kernel computes the decode kernel's bits, so it stays on there."""
    ext = tiles_or_skip(form, dtype)
    qk, K, V, slots, lens = case(64, 9, 3, seed=2, dtype=getattr(torch, dtype))
    decode = ext.slot_attention(qk, K, V, slots, lens, 9, 0.125, prompt=False)
    was = ext._prompt_tiles(False)
    try:
        assert torch.equal(bits(ext.slot_attention(qk, K, V, slots, lens, 9, 0.125, prompt=True)), bits(decode))
    finally:
        ext._prompt_tiles(was)
    assert ext._prompt_tiles_calls() == 0
    inv = cpu_ext.set_batch_invariant(True)
    try:
        assert torch.equal(bits(ext.slot_attention(qk, K, V, slots, lens, 9, 0.125, prompt=True)), bits(decode))
    finally:
        cpu_ext.set_batch_invariant(inv)
    assert ext._prompt_tiles_calls() == (1 if dtype == "float32" else 0)


@pytest.mark.parametrize("Dh", [16, 32, 64, 128])
def test_float32_prompt_kernel_gives_the_decode_kernels_bits_for_every_group_size(Dh):
    """Every query-head group size (1-8 query heads a key/value head, so tiles of 16 down to 2 tokens and 12-16 rows),
    lengths across its vector blocks, a NaN cache past the rows' positions: the decode kernel's outputs bit for bit."""
    ext = tiles_or_skip("vectors", "float32")
    for nrep in range(1, 9):
        qk, K, V, slots, lens = case(Dh, 2 * nrep, 2, seed=10 + nrep, dtype=torch.float32)
        scale = Dh**-0.5
        tiles = ext.slot_attention(qk, K, V, slots, lens, 2 * nrep, scale, prompt=True)
        assert ext._prompt_tiles_calls() == 1
        decode = ext.slot_attention(qk, K, V, slots, lens, 2 * nrep, scale, prompt=False)
        assert torch.equal(bits(tiles), bits(decode)), nrep


def head_dim_64_model(dtype: str = "bfloat16"):
    """A tiny Llama whose heads are 64 wide (the kernel's shapes: 4 query heads over 2 key/value heads)."""
    model, tok = remix.tiny_model(seed=3, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                  num_key_value_heads=2)
    return model.to(getattr(torch, dtype)), tok


def run_all(engine, prompts, params, tag):
    sinks = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(f"{tag}{i}", p, params), sinks[i].append)
    while engine.has_work():
        engine.step()
    return [([t for e in sinks[i] for t in e.token_ids], [lp for e in sinks[i] for lp in e.logprobs])
            for i in range(len(prompts))]


@pytest.mark.parametrize("dtype,form", FORMS)
def test_an_engine_prompt_gives_the_same_tokens_in_any_split_into_chunks(dtype, form):
    """Prompts of 150-230 tokens prefilled in one step, in chunks of 16 and of 50 tokens, and alone against together:
    the same greedy tokens and log-probabilities (the prompt kernel serves the prefill; the decode steps that follow
    do not take it). float32 steps stay under 256 rows, and bfloat16 ones without AMX under 128
    (``DOT_BF16_BELOW``): from there their linears take oneDNN's or MKL's GEMM, whose rows round by the call's size
    (bfloat16's AMX GEMM gives a row the same outputs at any size)."""
    ext = tiles_or_skip(form, dtype)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (150, 230, 181)]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
    results = []
    if dtype == "bfloat16" and cpu_ext.amx_bf16():
        whole, budget = 256, 512
    else:
        whole = budget = (ext.DOT_BF16_BELOW if dtype == "bfloat16" else 256) - 1
    for chunk, together in ((whole, True), (16, True), (50, True), (whole, False)):
        model, tok = head_dim_64_model(dtype)
        e = Engine(model, tok, EngineConfig(max_model_len=300, max_num_seqs=4, max_prefill_chunk=chunk,
                                            max_batched_tokens=budget, prefix_caching=False))
        if together:
            results.append(run_all(e, prompts, params, "t"))
        else:
            results.append([run_all(e, [p], params, f"a{i}")[0] for i, p in enumerate(prompts)])
        assert ext._prompt_tiles_calls() > 0
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_checked_drafts_keep_the_decode_kernel(dtype):
    """Speculative decoding checks a draft as a prefill chunk; its tokens are generated tokens, so their attention is
    the decode kernel's (the output is the output without speculation, bit for bit): no prompt-tile call after the
    prompt is in."""
    ext = tiles_or_skip(dtype=dtype)
    model, tok = head_dim_64_model(dtype)
    e = Engine(model, tok, EngineConfig(max_model_len=300, max_num_seqs=2, num_speculative_tokens=4,
                                        prefix_caching=False))
    prompt = [5, 6, 7, 8, 9, 10] * 12  # a loop: prompt lookup drafts from it
    events = []
    e.submit(GenerationRequest("spec", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)),
             events.append)
    e.step()  # the prompt (72 tokens: one chunk)
    assert ext._prompt_tiles_calls() > 0
    while e.has_work():
        e.step()
    assert sum(len(ev.token_ids) for ev in events) == 24 and events[-1].finished
    assert e.spec_totals["steps"] > 0 and ext._prompt_tiles_calls() == 0
