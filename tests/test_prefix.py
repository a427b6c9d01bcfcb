"""Prefix caching: the index (block chains, verified matches, slots moved and swapped) and the engine with it on, whose
every output must equal the engine's with it off - bit for bit on the float32 compiled path, where no token's
computation depends on its step (see server.engine.prefix)."""

import pytest
import torch

import remix

from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from server.engine.prefix import BLOCK, PrefixIndex, chain
from tests.test_engine import greedy, lively_tiny, logprobs_of, make_adapter, tokens_of

CFG = dict(max_model_len=160, max_num_seqs=8, max_prefill_chunk=16, max_batched_tokens=40)


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = ids(100, 40)  # a shared opening: two whole blocks (32 tokens) and 8 more


# -- the index -------------------------------------------------------------------------------------------------------
def test_chain_covers_whole_blocks_per_adapter_and_extends():
    t = ids(0, 50)
    full = chain(t, -1)
    assert len(full) == 50 // BLOCK == 3
    assert chain(t, -1, upto=33) == full[:2]  # 33 tokens: two whole blocks
    assert chain(t, -1, start=full[:1]) == full  # extending a known start gives the same chain
    assert chain(t, 0) != full and chain(t, 0)[0] != full[0]  # another adapter: another chain from the first block
    other = t[:20] + [t[20] + 1] + t[21:]  # a change in block 1 changes block 1 and every block after it
    assert chain(other, -1)[0] == full[0] and all(a != b for a, b in zip(chain(other, -1)[1:], full[1:]))


def test_match_is_verified_capped_and_follows_moves_and_swaps():
    idx = PrefixIndex(4)
    p = ids(1, 48)
    idx.hold(2, p, [], -1, 48)
    h = chain(p, -1)
    assert idx.match(h, p, 47) == (2, 47)  # three blocks held, the last prompt token always computed
    assert idx.match(h, p, 20) == (2, 20)
    assert idx.match(h[:1], p[:16] + ids(2, 10), 25) == (2, 16)
    assert idx.match(chain(p, 0), p, 47) == (-1, 0)  # another adapter's keys and values are never used
    # a hash that matches over tokens that differ (a planted collision) is not a match
    idx.source[2] = (p[:20] + [999] + p[21:], [], -1)
    assert idx.match(h, p, 47) == (2, 16)
    idx.source[2] = (p, [], -1)
    # a sequence moved from slot 2 to 0: both hold the prefix; ties go to a preferred (free) slot, then the lowest
    idx.moved(2, 0)
    assert idx.match(h, p, 47) == (0, 47) and idx.match(h, p, 47, prefer=(2,)) == (2, 47)
    idx.hold(0, ids(3, 40), [], -1, 40, keep=0)  # slot 0 taken by another prompt: only slot 2 holds p
    assert idx.match(h, p, 47) == (2, 47)
    idx.swapped(2, 3)
    assert idx.match(h, p, 47) == (3, 47) and idx.blocks[2] == []
    # a running sequence's generated tokens extend its chain; what it held stays while its tokens only grow
    out = ids(4, 20)
    idx.hold(1, p[:40], out, -1, 40 + 19, keep=0)
    cont = p[:40] + out[:19]
    assert idx.match(chain(cont, -1), cont, 58) == (1, 48)
    idx.forget(-1)
    assert idx.index == {} and idx.match(h, p, 47) == (-1, 0)


def test_victim_is_an_empty_slot_else_the_least_recently_freed():
    idx = PrefixIndex(3)
    for s in (0, 1):
        idx.hold(s, ids(s, 20), [], -1, 20, keep=0)
    idx.release(1)
    idx.release(0)
    assert idx.victim([0, 1, 2]) == 2
    assert idx.victim([0, 1]) == 1  # freed first


# -- the engine ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return lively_tiny()


def engines(tiny, **kw):
    """The engine with and without prefix caching, each on its own copy of the model (an engine fuses its model's
    q/k/v projections: a second engine on the same modules would send the first one's layers down another path)."""
    return tuple(Engine(*lively_tiny(), EngineConfig(**{**CFG, **kw}, prefix_caching=on)) for on in (True, False))


def run(engine, rid, prompt, params=None, adapter=None, trace=False):
    events = collect(engine, GenerationRequest(rid, prompt, params or greedy(12), adapter=adapter, trace=trace))
    return tokens_of(events), logprobs_of(events), events[-1]


def test_a_shared_opening_and_a_chats_next_turn_are_reused_bit_for_bit(tiny):
    cached, plain = engines(tiny)
    prompts = [SYSTEM + ids(10 + i, 5 + i) for i in range(3)]
    got = [run(cached, f"a{i}", p) for i, p in enumerate(prompts)]
    want = [run(plain, f"a{i}", p) for i, p in enumerate(prompts)]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2].cached_tokens for g in got] == [0, 32, 32]  # the opening's two whole blocks
    assert [w[2].cached_tokens for w in want] == [0, 0, 0]
    # the next turn of chat 0: its prompt, its answer and a new message. 45 + 11 tokens were computed (the last
    # answer token never is): three whole blocks, and the chat's slot kept them while the others took the opening
    turn = prompts[0] + got[0][0] + ids(20, 6)
    t_cached, t_plain = run(cached, "t", turn), run(plain, "t", turn)
    assert t_cached[:2] == t_plain[:2] and t_cached[2].cached_tokens == 48
    # the same prompt again: all but its last token (it chooses the first new token)
    again = SYSTEM + ids(30, 8)  # 48 tokens
    run(cached, "x", again)
    assert run(cached, "y", again)[2].cached_tokens == 47 and run(cached, "y2", again)[:2] == run(plain, "y", again)[:2]
    s = cached.stats()
    # hits: a1, a2, the next turn, x (the opening), y and y2
    assert s["prefix_caching"] and s["prefix_cache_hits"] == 6 and s["prefix_cache_tokens"] == 32 * 3 + 48 + 47 * 2
    assert s["slots_used"] == 0 and "prefix_cache_hits" not in plain.stats()


def test_adapters_never_share_keys_and_values(tiny, tmp_path):
    model, _ = tiny
    path = make_adapter(model, tmp_path / "a", seed=1)
    cached, plain = engines(tiny)
    for e in (cached, plain):
        e.load_adapter("a", path)
    p = SYSTEM + ids(5, 7)
    base = run(cached, "b", p)
    first = run(cached, "a1", p, adapter="a")
    second = run(cached, "a2", p, adapter="a")
    assert first[2].cached_tokens == 0 and second[2].cached_tokens == 32  # the base's blocks are not the adapter's
    assert first[:2] == second[:2] == run(plain, "a", p, adapter="a")[:2] and base[:2] == run(plain, "b", p)[:2]
    # unloaded and loaded again under the same name: a new adapter, none of the old one's cache
    cached.unload_adapter("a")
    cached.step()
    cached.load_adapter("a", make_adapter(model, tmp_path / "a2", seed=2))
    plain.unload_adapter("a")
    plain.step()
    plain.load_adapter("a", str(tmp_path / "a2"))
    third = run(cached, "a3", p, adapter="a")
    assert third[2].cached_tokens == 0 and third[:2] == run(plain, "a3", p, adapter="a")[:2]


def test_a_cache_salt_shares_blocks_only_within_itself(tiny, tmp_path):
    """vLLM's cache_salt: requests of one salt reuse each other's prefixes; another salt, or none, computes its own
    (the same tokens either way); requests of different salts arriving together do not wait on each other's blocks;
    an unloaded adapter's salted blocks go with it."""
    model, _ = tiny
    cached, plain = engines(tiny)
    p = SYSTEM + ids(7, 9)

    def salted(engine, rid, salt, adapter=None):
        events = collect(engine, GenerationRequest(rid, p, greedy(12), adapter=adapter, cache_salt=salt))
        return tokens_of(events), logprobs_of(events), events[-1].cached_tokens

    want = run(plain, "w", p)[:2]
    first = salted(cached, "a1", "tenant-a")
    assert first[2] == 0 and first[:2] == want
    assert salted(cached, "a2", "tenant-a")[2] == 48  # (all but the last prompt token: three blocks)
    for rid, salt in (("b1", "tenant-b"), ("n1", None)):
        got = salted(cached, rid, salt)
        assert got[2] == 0 and got[:2] == want, rid
    assert salted(cached, "n2", None)[2] == 48 and salted(cached, "b2", "tenant-b")[2] == 48
    # together: each salt's first computes the opening; its second (alone: waits a step a block for the first) copies
    sinks = {rid: [] for rid in ("t1", "t2", "u1")}
    q = SYSTEM + ids(8, 30)
    for rid, salt in (("t1", "x"), ("u1", "y"), ("t2", "x")):
        cached.submit(GenerationRequest(rid, q, greedy(4), cache_salt=salt), sinks[rid].append)
    while cached.has_work():
        cached.step()
    assert [sinks[r][-1].cached_tokens for r in ("t1", "u1", "t2")] == [0, 0, 64]
    assert len({tuple(tokens_of(sinks[r])) for r in sinks}) == 1
    # an adapter's salted blocks go when it is unloaded
    cached.load_adapter("a", make_adapter(model, tmp_path / "a", seed=3))
    salted(cached, "s1", "tenant-a", adapter="a")
    assert salted(cached, "s2", "tenant-a", adapter="a")[2] == 48
    cached.unload_adapter("a")
    cached.step()
    cached.load_adapter("a", str(tmp_path / "a"))
    assert salted(cached, "s3", "tenant-a", adapter="a")[2] == 0


def test_requests_arriving_together_compute_their_opening_once(tiny):
    cached, plain = engines(tiny)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=7, n=3, logprobs=0)
    reqs = [(f"g{i}", SYSTEM + ids(40 + i, 3 + 2 * i), greedy(10)) for i in range(4)]
    reqs.append(("n3", SYSTEM + ids(50, 30), sampled))  # three sequences of one prompt (70 tokens)
    results = {}
    for engine in (cached, plain):
        sinks = {rid: [] for rid, _, _ in reqs}
        for rid, p, params in reqs:
            engine.submit(GenerationRequest(rid, p, params), sinks[rid].append)
        while engine.has_work():
            engine.step()
        results[engine is cached] = {rid: sorted((e.index, e.token_ids, [lp for _, lp, _ in e.logprobs], e.finished)
                                                 for e in ev) for rid, ev in sinks.items()}
        finals = {(rid, e.index): e.cached_tokens for rid, ev in sinks.items() for e in ev if e.finished}
        if engine is cached:
            # the first request computes the opening; the others wait a step and copy it; the n = 3 siblings copy
            # the whole blocks of their prompt (64 of 70 tokens) from the first of them
            assert finals[("g0", 0)] == 0 and all(finals[(f"g{i}", 0)] == 32 for i in range(1, 4))
            assert finals[("n3", 0)] == 32 and finals[("n3", 1)] == finals[("n3", 2)] == 64
        else:
            assert set(finals.values()) == {0}
        assert engine.stats()["slots_used"] == 0
    assert results[True] == results[False]


def test_traced_requests_compute_and_count_every_prompt_token(tiny):
    cached, plain = engines(tiny, max_num_seqs=1)  # one slot: every request overwrites the one before
    p = SYSTEM + ids(60, 9)
    run(cached, "warm", p)
    traced = run(cached, "t", p, trace=True)
    assert traced[2].cached_tokens == 0 and traced[:2] == run(plain, "t", p, trace=True)[:2]
    # a traced request's own computation is cached like any other; one that overwrote a prefix leaves none of it
    assert run(cached, "after", p)[2].cached_tokens == 48
    run(cached, "other", ids(61, 40), trace=True)
    last = run(cached, "last", p)
    assert last[2].cached_tokens == 0 and last[:2] == run(plain, "last", p)[:2]


def test_a_cancelled_prefill_leaves_what_it_computed(tiny):
    cached, plain = engines(tiny)
    p = SYSTEM + ids(70, 60)  # 100 tokens: several chunks of 16
    sink = []
    cached.submit(GenerationRequest("c", p, greedy(4)), sink.append)
    for _ in range(3):  # three chunks of 16: 48 tokens computed
        cached.step()
    cached.cancel("c")
    cached.step()
    assert sink[-1].finish_reason == "cancelled" and cached.stats()["slots_used"] == 0
    again = run(cached, "c2", p)
    assert again[2].cached_tokens == 48 and again[:2] == run(plain, "c2", p)[:2]


def test_an_int8_cache_reuses_its_codes(tiny):
    cached, plain = engines(tiny, kv_cache_dtype="int8")
    prompts = [SYSTEM + ids(80 + i, 11) for i in range(2)]
    got = [run(cached, f"q{i}", p) for i, p in enumerate(prompts)]
    assert got[1][2].cached_tokens == 32
    assert [g[:2] for g in got] == [run(plain, f"q{i}", p)[:2] for i, p in enumerate(prompts)]


def test_contents_survive_slots_being_rearranged(tiny):
    """Chats finish in slots that running sequences then move into: the finished chat's keys and values are swapped
    out of the way, not overwritten, and its next turn still finds them."""
    cached, plain = engines(tiny)
    chat = SYSTEM + ids(90, 10)
    sinks = {i: [] for i in range(4)}
    cached.submit(GenerationRequest("chat", chat, greedy(3)), sinks[0].append)  # finishes first, in slot 0
    for i in range(1, 4):
        cached.submit(GenerationRequest(f"long{i}", ids(91 + i, 20), greedy(30)), sinks[i].append)
    while cached.has_work():
        cached.step()
    answer = tokens_of(sinks[0])
    turn = chat + answer + ids(99, 4)
    got = run(cached, "turn", turn)
    assert got[2].cached_tokens == 48 and got[:2] == run(plain, "turn", turn)[:2]


def test_random_traffic_is_served_as_without_the_cache(tiny, tmp_path):
    """Waves of requests that share openings (and extend earlier chats) at random, over two adapters and the base,
    some cancelled mid-way, through few slots: every finished request's tokens and log-probs equal those of the engine
    without the cache, and the cache took a good share of the prompt tokens."""
    model, _ = tiny
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=10 + i) for i in range(2)]
    cached, plain = engines(tiny, max_num_seqs=4, max_batched_tokens=48)
    for e in (cached, plain):
        for i, path in enumerate(paths):
            e.load_adapter(f"a{i}", path)
    g = torch.Generator().manual_seed(5)
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    openings = [ids(200 + i, 32 + 16 * i) for i in range(3)]
    history: list[list[int]] = []
    outputs = {True: {}, False: {}}
    for wave in range(5):
        reqs = []
        for j in range(6):
            if history and pick(3) == 0:
                prompt = history[pick(len(history))] + ids(300 + 10 * wave + j, 1 + pick(20))  # a chat's next turn
            else:
                prompt = openings[pick(3)] + ids(400 + 10 * wave + j, 1 + pick(30))
            adapter = [None, "a0", "a1"][pick(3)]
            reqs.append((f"w{wave}r{j}", prompt[:150], adapter, 1 + pick(12), pick(5) == 0))
        for engine in (cached, plain):
            sinks = {rid: [] for rid, *_ in reqs}
            for rid, prompt, adapter, new, _ in reqs:
                engine.submit(GenerationRequest(rid, prompt, greedy(new), adapter=adapter), sinks[rid].append)
            for step in range(10**4):
                if not engine.has_work():
                    break
                if step == 3:
                    for rid, *_, cancel in reqs:
                        if cancel:
                            engine.cancel(rid)
                engine.step()
            outputs[engine is cached].update(
                {rid: (tokens_of(ev), logprobs_of(ev), ev[-1].finish_reason if ev else "cancelled")  # (dropped while queued)
                 for rid, ev in sinks.items()})
            assert engine.stats()["slots_used"] == 0
        for rid, prompt, adapter, new, cancel in reqs:
            got = outputs[True][rid]
            if not cancel and adapter is None:
                history.append(prompt + got[0])
    done = {rid for rid, out in outputs[False].items() if out[2] != "cancelled"}
    assert {rid: outputs[True][rid] for rid in done} == {rid: outputs[False][rid] for rid in done}
    s = cached.stats()
    assert s["prefix_cache_hits"] >= 8 and s["prefix_cache_tokens"] >= 300, s  # (seed 5: 10 of 27, 448 tokens)


# -- batch-invariant mode (--batch-invariant on): bit-for-bit in bfloat16 too ------------------------------------------
INVARIANT = True  # (False: the test below fails - oneDNN's prefill GEMMs round by step shape)


def test_batch_invariant_linear_rows_never_depend_on_the_call():
    from remix.kernels import cpu_ext

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        if not cpu_ext.dot_gemm(dtype):
            continue
        w, x = torch.randn(96, 64, generator=g).to(dtype), torch.randn(300, 64, generator=g).to(dtype)
        was = cpu_ext.set_batch_invariant(True)
        try:
            rows = torch.cat([cpu_ext.linear(x[i : i + 1], w) for i in range(300)])
            for T in (1, 127, 128, 255, 256, 300):  # across both limits (bfloat16 128, float32 256 rows)
                assert torch.equal(cpu_ext.linear(x[:T], w), rows[:T]), (dtype, T)
        finally:
            cpu_ext.set_batch_invariant(was)


def test_batch_invariant_bfloat16_engine_is_bit_for_bit_in_any_batch_and_with_the_prefix_cache(tmp_path):
    """bfloat16 with prefill steps below and far above 128 rows (from where oneDNN's GEMM would otherwise round them):
    a request gives the same tokens and log-probs alone, in a mixed batch, and with its prompt from the prefix cache."""
    from remix.kernels import cpu_ext

    if not cpu_ext.dot_gemm(torch.bfloat16):
        pytest.skip("no compiled bfloat16 dot-product GEMM on this CPU")
    def wide():  # inputs of 256 and 512: oneDNN splits such sums by the call's shape (64 wide, it did not)
        model, tok = remix.tiny_model(seed=1, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=2)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        return model, tok

    path = make_adapter(wide()[0], tmp_path / "a", seed=4)
    cfg = dict(max_model_len=400, max_num_seqs=4, max_prefill_chunk=256, max_batched_tokens=512,
               batch_invariant=INVARIANT)

    def engine(prefix):
        model, tok = wide()
        e = Engine(model.to(torch.bfloat16), tok, EngineConfig(**cfg, prefix_caching=prefix))
        e.load_adapter("a", path)
        return e

    cached, plain = engine(True), engine(False)
    opening = ids(500, 160)
    # alone, the short prompts are steps below 128 rows (the compiled kernel), in the batch part of a 512-row step
    prompts = [ids(501, 90), opening + ids(502, 20), ids(503, 70), opening + ids(504, 80)]
    adapter_of = lambda i: "a" if i % 2 else None  # noqa: E731
    alone = [run(plain, f"one{i}", p, greedy(6), adapter_of(i))[:2] for i, p in enumerate(prompts)]
    for e in (plain, cached):  # all at once: prefill steps of up to 512 rows mixing both adapters
        sinks = {i: [] for i in range(4)}
        for i, p in enumerate(prompts):
            e.submit(GenerationRequest(f"all{i}", p, greedy(6), adapter=adapter_of(i)), sinks[i].append)
        while e.has_work():
            e.step()
        assert [(tokens_of(sinks[i]), logprobs_of(sinks[i])) for i in range(4)] == alone
    again = [run(cached, f"again{i}", p, greedy(6), adapter_of(i)) for i, p in enumerate(prompts)]
    assert [a[:2] for a in again] == alone and all(a[2].cached_tokens >= 64 for a in again)
    assert cached.stats()["batch_invariant"] is INVARIANT


@pytest.mark.parametrize("decoder", ["exact", "hf"])
def test_other_decoders_read_the_reused_prefix_too(tiny, decoder):
    """SDPA over the slot cache (exact) and Hugging Face's modules (hf) start a prompt at its cached length as they
    continue any chunked prefill: the same tokens, log-probs within float rounding (ATen picks kernels by shape)."""
    cached, plain = engines(tiny, decoder=decoder)
    prompts = [SYSTEM + ids(700 + i, 9) for i in range(2)]
    got = [run(cached, f"d{i}", p) for i, p in enumerate(prompts)]
    want = [run(plain, f"d{i}", p) for i, p in enumerate(prompts)]
    assert got[1][2].cached_tokens == 32 and [g[0] for g in got] == [w[0] for w in want]
    assert all(abs(a - b) < 1e-4 for g, w in zip(got, want) for a, b in zip(g[1], w[1]))


def test_prefix_cache_on_every_device(device):
    """The same reuse where the engine runs on CUDA (CUDA graphs for the decode steps included): tokens equal to the
    engine without the cache, log-probs within float rounding (cuBLAS chooses kernels by shape)."""
    def on_device(prefix: bool) -> Engine:
        model, tok = lively_tiny()
        return Engine(model.to(device), tok, EngineConfig(**CFG, prefix_caching=prefix))

    cached, plain = on_device(True), on_device(False)
    prompts = [SYSTEM + ids(800 + i, 6) for i in range(3)]
    got = [run(cached, f"v{i}", p) for i, p in enumerate(prompts)]
    want = [run(plain, f"v{i}", p) for i, p in enumerate(prompts)]
    assert [g[2].cached_tokens for g in got] == [0, 32, 32] and [g[0] for g in got] == [w[0] for w in want]
    assert all(abs(a - b) < 1e-4 for g, w in zip(got, want) for a, b in zip(g[1], w[1]))
