"""The engine against Hugging Face: same greedy text, same logits with adapters, batch-invariance, cancellation."""

import pytest
import torch

import remix
from remix.kernels import cpu_ext
from remix.kernels.cpu_alloc import HUGE_PAGE, huge_pages_available
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from tests.helpers import serve_together, write_adapter

PROMPTS = ["The quick brown fox", "Hello, my name is", "1 2 3 4", "Once upon a time, in a land far away, there"]


def lively_tiny(seed=0, device="cpu"):
    """A tiny model with larger weights, so greedy decoding does not collapse to one repeated byte."""
    model, tok = remix.tiny_model(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.to(device), tok


def make_adapter(model, path, seed, n=4, k=2, r=4):
    return write_adapter(model, path, seed, n, k, r)


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0, **kw)


def tokens_of(events):
    return [t for e in events for t in e.token_ids]


def logprobs_of(events):
    return [lp for e in events for (_, lp, _) in e.logprobs]


def assert_batch_equals_alone(engine, prompts, max_tokens, adapter_of=lambda i: None):
    """Every greedy request's tokens are the same served alone and submitted together (the engine then idle)."""
    alone = [tokens_of(collect(engine, GenerationRequest(f"one{i}", p, greedy(max_tokens), adapter=adapter_of(i))))
             for i, p in enumerate(prompts)]
    together = serve_together(engine, [GenerationRequest(f"many{i}", p, greedy(max_tokens), adapter=adapter_of(i))
                                       for i, p in enumerate(prompts)])
    assert [tokens_of(together[f"many{i}"]) for i in range(len(prompts))] == alone
    assert engine.stats()["slots_used"] == 0


def hf_greedy(model, ids, max_new):
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_logprobs(model, ids, new):
    """log p of each generated token under a plain forward of prompt + generation."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + new], device=model.device)).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(new)]


@pytest.fixture
def engine_and_model(device):
    model, tok = lively_tiny(device=device)
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=8, max_prefill_chunk=16, max_batched_tokens=40))
    return engine, model, tok


def test_greedy_equals_hf_generate(engine_and_model):
    engine, model, tok = engine_and_model
    reference_model, _ = lively_tiny(device=model.device)
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt).input_ids
        events = collect(engine, GenerationRequest(f"r{i}", ids, greedy(20)))
        want = hf_greedy(reference_model, ids, 20)
        assert tokens_of(events) == want
        assert len(set(want)) > 3  # a lively model: the comparison means something
    assert engine.stats()["slots_used"] == 0


def test_adapter_logits_equal_plain_forward_with_load_adapter(tmp_path, device):
    model, tok = lively_tiny(device=device)
    path = make_adapter(lively_tiny()[0], tmp_path / "a", seed=1)
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=4, max_prefill_chunk=8))
    engine.load_adapter("a", str(path))
    reference, _ = lively_tiny(device=device)
    remix.load_adapter(reference, path)
    for i, prompt in enumerate(PROMPTS[:3]):
        ids = tok(prompt).input_ids
        events = collect(engine, GenerationRequest(f"r{i}", ids, greedy(12), adapter="a"))
        new = tokens_of(events)
        assert new == hf_greedy(reference, ids, 12)
        # tolerance: float32 through 2 layers; the same kernels, different batching of the GEMMs
        torch.testing.assert_close(torch.tensor(logprobs_of(events)), torch.tensor(hf_logprobs(reference, ids, new)),
                                   atol=1e-4, rtol=1e-4)


def test_mixed_batch_of_three_adapters_and_base_equals_alone(tmp_path, device):
    model, tok = lively_tiny(device=device)
    cfg = EngineConfig(max_model_len=160, max_num_seqs=8, max_prefill_chunk=8, max_batched_tokens=24)
    engine = Engine(model, tok, cfg)
    for i, name in enumerate("abc"):
        engine.load_adapter(name, str(make_adapter(lively_tiny()[0], tmp_path / name, seed=i + 10, n=4 + i, k=1 + i % 2)))
    adapters = ["a", "b", "c", None, "a", None]
    prompts = [tok(p + " and more").input_ids for p in PROMPTS + PROMPTS[:2]]
    alone = []
    for i, (adapter, ids) in enumerate(zip(adapters, prompts)):
        events = collect(engine, GenerationRequest(f"alone{i}", ids, greedy(10), adapter=adapter, trace=True))
        alone.append((tokens_of(events), logprobs_of(events), events[-1].routing))
    results = {i: [] for i in range(len(prompts))}
    for i, (adapter, ids) in enumerate(zip(adapters, prompts)):
        engine.submit(GenerationRequest(f"mixed{i}", ids, greedy(10), adapter=adapter, trace=True), results[i].append)
    while engine.has_work():
        engine.step()
    for i in range(len(prompts)):
        toks, lps, routing = alone[i]
        assert tokens_of(results[i]) == toks
        torch.testing.assert_close(torch.tensor(logprobs_of(results[i])), torch.tensor(lps), atol=1e-4, rtol=1e-4)
        assert results[i][-1].routing == routing  # identical selections, counted per request
        if adapters[i] is not None:
            assert routing  # the adapter's requests were traced


def test_joining_and_cancelled_requests_do_not_change_others(engine_and_model):
    engine, model, tok = engine_and_model
    ids = tok(PROMPTS[3]).input_ids
    alone = collect(engine, GenerationRequest("alone", ids, greedy(24)))
    events = []
    engine.submit(GenerationRequest("main", ids, greedy(24)), events.append)
    others = []
    for step in range(40):
        if step == 3:
            engine.submit(GenerationRequest("joiner", tok(PROMPTS[0]).input_ids, greedy(30)), others.append)
        if step == 5:
            engine.submit(GenerationRequest("victim", tok(PROMPTS[1]).input_ids, greedy(30)), others.append)
        if step == 9:
            engine.cancel("victim")
        engine.step()
    while engine.has_work():
        engine.step()
    assert tokens_of(events) == tokens_of(alone)
    torch.testing.assert_close(torch.tensor(logprobs_of(events)), torch.tensor(logprobs_of(alone)), atol=1e-4, rtol=1e-4)
    assert [e.finish_reason for e in others if e.finished and e.request_id == "victim"] == ["cancelled"]


def test_seeded_sampling_is_batch_invariant(engine_and_model):
    engine, model, tok = engine_and_model
    params = dict(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    ids = tok(PROMPTS[0]).input_ids
    alone = tokens_of(collect(engine, GenerationRequest("s1", ids, SamplingParams(**params))))
    again = tokens_of(collect(engine, GenerationRequest("s2", ids, SamplingParams(**params))))
    assert alone == again
    batch = {}
    for i, prompt in enumerate(PROMPTS):
        p = dict(params, seed=1234 if i == 0 else i)
        batch[i] = []
        engine.submit(GenerationRequest(f"b{i}", tok(prompt).input_ids, SamplingParams(**p)), batch[i].append)
    while engine.has_work():
        engine.step()
    assert tokens_of(batch[0]) == alone
    other_seed = tokens_of(collect(engine, GenerationRequest("s3", ids, SamplingParams(**dict(params, seed=99)))))
    assert other_seed != alone


def test_n_sequences_and_stop_strings(engine_and_model):
    engine, model, tok = engine_and_model
    ids = tok(PROMPTS[1]).input_ids
    full = tok.decode(tokens_of(collect(engine, GenerationRequest("f", ids, greedy(20)))))
    stop = full[5:7]
    events = collect(engine, GenerationRequest("s", ids, SamplingParams(max_tokens=20, temperature=0.0, n=2, stop=[stop])))
    for index in (0, 1):
        mine = [e for e in events if e.index == index]
        text = "".join(e.text for e in mine)
        assert text == full[: full.find(stop)] and mine[-1].finish_reason == "stop"


def test_cancelling_100_requests_leaves_no_cache(engine_and_model):
    engine, model, tok = engine_and_model
    engine.config.max_queue = 200
    final = {}
    for i in range(100):
        engine.submit(GenerationRequest(f"c{i}", tok(PROMPTS[i % 4]).input_ids, greedy(50)),
                      lambda e: final.setdefault(e.request_id, e) if e.finished else None)
    for _ in range(5):
        engine.step()
    assert engine.stats()["slots_used"] > 0 and engine.stats()["waiting"] > 0
    for i in range(100):
        engine.cancel(f"c{i}")
    engine.step()
    stats = engine.stats()
    assert stats["slots_used"] == 0 and stats["kv_tokens_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert not engine.requests
    # every request ends with a final event, the running ones and those still waiting alike
    assert sorted(final) == sorted(f"c{i}" for i in range(100))
    assert {e.finish_reason for e in final.values()} == {"cancelled"}


def test_a_kv_budget_below_the_slots_asked_for_is_said_at_start(caplog):
    """--kv-memory-gb caps --max-num-seqs: the engine says so (and how to change it) instead of running fewer
    sequences at once without a word."""
    model, tok = lively_tiny()
    with caplog.at_level("WARNING", logger="server.engine.engine"):
        engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=8, max_prefill_chunk=16,
                                                 kv_budget_bytes=1 << 16))
    assert engine.num_slots < 8
    assert f"holds {engine.num_slots} sequences of 64 + 16 tokens, not the 8 asked for" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="server.engine.engine"):
        Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=8, max_prefill_chunk=16))
    assert "KV cache budget" not in caplog.text


def test_input_errors(engine_and_model):
    from server.engine import EngineError, QueueFull, UnknownAdapter

    engine, model, tok = engine_and_model
    with pytest.raises(EngineError, match="maximum context length") as e:  # (the engine's context: 160 tokens)
        engine.submit(GenerationRequest("x", [1] * 150, greedy(20)), lambda e: None)
    assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")  # (the two together)
    with pytest.raises(EngineError, match="maximum context length") as e:
        engine.submit(GenerationRequest("x", [1] * 170, greedy(20)), lambda e: None)
    assert (e.value.param, e.value.code) == ("prompt", "context_length_exceeded")  # (the prompt alone)
    with pytest.raises(UnknownAdapter):
        engine.submit(GenerationRequest("y", [1, 2], greedy(2), adapter="nope"), lambda e: None)
    with pytest.raises(EngineError, match="token ids"):
        engine.submit(GenerationRequest("z", [99999], greedy(2)), lambda e: None)
    # sampling values no step could use are refused at submit, every one named (through the Python API they had
    # reached the sampler and failed the step, and with it every running request), and nothing is queued
    with pytest.raises(EngineError) as e:
        engine.submit(GenerationRequest("s", [1, 2], SamplingParams(max_tokens=2, temperature=-1.0, top_p=0.0, n=0,
                                                                    presence_penalty=float("nan"))), lambda e: None)
    assert e.value.param == "temperature" and str(e.value) == (
        "temperature must be a finite number >= 0, got -1.0; top_p must be in (0, 1], got 0.0; n must be >= 1, got 0; "
        "presence_penalty must be finite, got nan")
    for kw in (dict(top_k=-1), dict(min_p=1.5), dict(seed=-1), dict(logprobs=-1), dict(repetition_penalty=0.0),
               dict(logit_bias={3: float("inf")}), dict(stop=[""]), dict(stop="ab"),
               dict(logprobs=model.config.vocab_size + 1), dict(prompt_logprobs=10**6, echo=True)):
        with pytest.raises(EngineError, match=f"^{next(iter(kw))} must be"):
            engine.submit(GenerationRequest("s", [1, 2], SamplingParams(max_tokens=2, **kw)), lambda e: None)
    assert not engine.has_work()
    engine.config.max_queue = 1
    engine.submit(GenerationRequest("q1", [1, 2], greedy(2)), lambda e: None)
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest("q2", [1, 2], greedy(2)), lambda e: None)


def test_threaded_engine_and_live_adapter_unload(tmp_path, device):
    import threading

    model, tok = lively_tiny(device=device)
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=4))
    engine.start()
    try:
        engine.load_adapter("a", str(make_adapter(lively_tiny()[0], tmp_path / "a", seed=3)))
        done = threading.Event()
        events = []

        def on_event(e):
            events.append(e)
            if e.finished:
                done.set()

        engine.submit(GenerationRequest("t", tok(PROMPTS[0]).input_ids, greedy(30), adapter="a"), on_event)
        engine.unload_adapter("a")  # the running request finishes first
        assert done.wait(30)
        assert events[-1].finish_reason == "length" and len(tokens_of(events)) == 30
        deadline = __import__("time").time() + 5
        while "a" in engine.registry.adapters and __import__("time").time() < deadline:
            __import__("time").sleep(0.01)
        assert "a" not in engine.registry.adapters
    finally:
        engine.stop()


def test_engine_loop_on_the_callers_thread(tmp_path):
    """run_here (what python -m server and server.batch use: the engine on the thread that loaded the model, requests
    from another): every step runs on the calling thread; another thread submits, loads an adapter through call()
    and gets the greedy tokens a step-by-step run gives; until() ends the loop, and so does stop() from elsewhere."""
    import threading

    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=4))
    path = str(make_adapter(lively_tiny()[0], tmp_path / "a", seed=3))
    ids = tok(PROMPTS[1]).input_ids
    engine.load_adapter("a", path)
    want = tokens_of(collect(engine, GenerationRequest("want", ids, greedy(20), adapter="a")))
    engine.unload_adapter("a")
    stepped_on, step = set(), engine.step

    def counted_step():
        stepped_on.add(threading.current_thread())
        step()

    engine.step = counted_step
    events, done, counts = [], threading.Event(), {}
    threads = torch.get_num_threads()

    def client():
        engine.load_adapter("a", path)  # read here, installed by the loop between steps (call())
        counts["client"] = torch.get_num_threads()  # this thread's parallel regions: its own alone from now on
        engine.submit(GenerationRequest("got", ids, greedy(20), adapter="a"),
                      lambda e: (events.append(e), e.finished and done.set()))
        done.wait(30)

    side = threading.Thread(target=client)
    side.start()
    engine.run_here(until=lambda: not side.is_alive())
    side.join()
    assert tokens_of(events) == want and events[-1].finish_reason == "length"
    assert stepped_on == {threading.current_thread()}
    # the adapter was read off the loop's thread, which opened its regions alone (no OpenMP pool of its own to slow
    # the steps: cpu_ext.single_threaded_here); the loop's thread keeps its team
    assert torch.get_num_threads() == threads
    if cpu_ext._omp_set_num_threads() is not None:
        assert counts["client"] == 1
    assert engine._thread is None and not engine.has_work()

    looping = threading.Event()
    stopper = threading.Thread(target=lambda: (looping.wait(30), engine.stop()))
    stopper.start()
    engine.run_here(until=lambda: looping.set())  # (None: go on) returns once stop() has run on the other thread
    stopper.join()
    assert looping.is_set()


def test_the_servers_worker_threads_open_their_regions_alone():
    """The event loop's executor (asyncio.to_thread: tokenizing, grammars, adapter reads) in python -m server and
    server.batch: each worker runs its torch ops on itself alone, the caller's threads keep theirs."""
    from server.app import worker_threads

    threads = torch.get_num_threads()
    with worker_threads() as pool:
        inside = pool.submit(torch.get_num_threads).result()
        assert pool.submit(lambda: torch.ones(1 << 20).sum().item()).result() == 1 << 20  # (a parallel-sized op)
    assert torch.get_num_threads() == threads
    if cpu_ext._omp_set_num_threads() is not None:
        assert inside == 1


def test_adapters_coming_and_going_keep_every_output(tmp_path):
    """Loads and unloads in any order leave every adapter's greedy text as it was (a pool moved to fill a gap is the
    same pool); a load takes the lowest free slot, and with --max-adapters the modules' stacks made room for that many
    at the first load, so later loads write into it instead of stacking every loaded pool again."""
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=4, max_adapters=3))
    paths = {name: str(make_adapter(lively_tiny()[0], tmp_path / name, seed=seed))
             for name, seed in [("a", 3), ("b", 4), ("c", 5), ("d", 6)]}
    ids = tok(PROMPTS[3]).input_ids

    def text(name):
        return tokens_of(collect(engine, GenerationRequest(f"{name}{len(engine.registry.adapters)}", ids, greedy(12),
                                                           adapter=name)))

    want = {}
    for name in "abcd":  # each alone first
        engine.load_adapter(name, paths[name])
        want[name] = text(name)
        engine.unload_adapter(name)
    assert len({tuple(t) for t in want.values()}) == 4  # four different adapters: the comparisons mean something
    stack = next(iter(engine.runner.stacked.values())).stack
    for name in "abc":
        engine.load_adapter(name, paths[name])
    room = stack._slab.a.data_ptr() if stack._slab is not None else None
    if room is not None:
        assert stack._slab.capacity == 3 * 4  # three adapters of four LoRAs
    engine.unload_adapter("a")  # c's pool moves into a's place
    engine.load_adapter("d", paths["d"])
    assert {n: a.slot for n, a in engine.registry.adapters.items()} == {"b": 1, "c": 2, "d": 0}
    engine.unload_adapter("b")
    engine.load_adapter("a", paths["a"])
    assert {n: a.slot for n, a in engine.registry.adapters.items()} == {"c": 2, "d": 0, "a": 1}
    for name in "cda":
        assert text(name) == want[name], name
    if room is not None:
        assert stack._slab.a.data_ptr() == room


def test_queued_requests_of_an_unloading_adapter(tmp_path):
    """A request still waiting when its adapter is unloaded runs first (each of its n choices), then the adapter goes;
    one whose adapter is gone when its turn comes ends with an error event for each choice (the HTTP layer waits for
    all of them), and the engine goes on."""
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=2))
    path = str(make_adapter(lively_tiny()[0], tmp_path / "a", seed=3))
    for drop in (False, True):
        engine.load_adapter("a", path)
        busy, queued = [], []
        engine.submit(GenerationRequest(f"busy{drop}", tok(PROMPTS[0]).input_ids, greedy(8, n=2)), busy.append)
        engine.submit(GenerationRequest(f"q{drop}", tok(PROMPTS[1]).input_ids,
                                        SamplingParams(max_tokens=4, temperature=0.9, seed=1, n=2), adapter="a"),
                      queued.append)
        engine.step()  # the first request takes both slots; the second waits
        engine.unload_adapter("a")
        assert "a" in engine.registry.adapters  # a waiting request still names it
        if drop:
            engine.registry.remove("a")  # gone before the waiting request's turn
        while engine.has_work():
            engine.step()
        final = sorted((e.index, e.finish_reason, e.error) for e in queued if e.finished)
        if drop:
            assert final == [(0, "error", "adapter was unloaded"), (1, "error", "adapter was unloaded")]
        else:
            assert final == [(0, "length", None), (1, "length", None)]
        assert "a" not in engine.registry.adapters
        assert [e.finish_reason for e in busy if e.finished] == ["length", "length"]


@pytest.mark.slow
def test_default_base_greedy_equals_hf(default_base):
    model, tok = remix.load_base()
    engine = Engine(model, tok, EngineConfig(max_model_len=256, max_num_seqs=4))
    reference, _ = default_base
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    results = {}
    for i, p in enumerate(prompts):
        results[i] = []
        engine.submit(GenerationRequest(f"d{i}", tok(p).input_ids, greedy(16)), results[i].append)
    while engine.has_work():
        engine.step()
    for i, p in enumerate(prompts):
        ids = tok(p).input_ids
        assert tokens_of(results[i]) == hf_greedy(reference, ids, 16)
    if huge_pages_available():  # the weights (q/k/v fused included) and each of K and V in one huge-page block
        runner = engine.runner
        fused = [t for f in runner.lean.qkv if f is not None for t in f[:2] if t is not None]
        assert len({t.untyped_storage().data_ptr() for t in [*model.parameters(), *fused]}) == 1
        assert runner.cache.k[0].data_ptr() % HUGE_PAGE == 0 and runner.cache.v[0].data_ptr() % HUGE_PAGE == 0
        assert len({k.untyped_storage().data_ptr() for k in runner.cache.k}) == 1


def test_bfloat16_engine_follows_float32_with_adapters(tmp_path, device):
    """--dtype bfloat16: weights and activations in bfloat16, routing and deltas in float32 inside the kernel.
    The first tokens' log-probabilities stay within bfloat16 error of the float32 engine's, and a mixed batch
    still equals each request alone (the batch-invariance contract does not depend on the dtype)."""
    path = make_adapter(lively_tiny()[0], tmp_path / "a", seed=3)
    engines = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = lively_tiny(device=device)
        model.to(dtype)
        engines[dtype] = Engine(model, tok, EngineConfig(max_model_len=96, max_num_seqs=4, max_prefill_chunk=8))
        engines[dtype].load_adapter("a", path)
    ids = tok(PROMPTS[0]).input_ids
    runs = {d: collect(e, GenerationRequest(f"{d}", ids, greedy(4), adapter="a")) for d, e in engines.items()}
    first32, first16 = logprobs_of(runs[torch.float32])[0], logprobs_of(runs[torch.bfloat16])[0]
    assert abs(first32 - first16) < 0.1 + 0.05 * abs(first32)
    assert_batch_equals_alone(engines[torch.bfloat16], [tok(p).input_ids for p in PROMPTS], 6,
                              lambda i: "a" if i % 2 else None)


def test_greedy_sampling_takes_the_lowest_id_on_ties():
    """Greedy rows take the first maximum, whether every row is greedy or only some are."""
    from server.engine.sampler import SamplingParams, sample

    logits = torch.zeros(3, 10)
    logits[0, [2, 7]] = 5.0
    logits[1, [4, 9]] = 1.0
    logits[2, 6] = 3.0
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy] * 3, [None] * 3).tolist() == [2, 4, 6]
    seeded = SamplingParams(temperature=1.0, seed=1)
    out = sample(logits, [greedy, seeded, greedy], [None, torch.Generator().manual_seed(1), None])
    assert out[0] == 2 and out[2] == 6 and 0 <= out[1] < 10


def test_bfloat16_logits_sample_as_their_float32_widening():
    """The runner hands the sampler logits in the model's dtype: greedy, temperature, top-k and top-p rows and the
    log-probabilities of bfloat16 logits are those of the same logits widened to float32 (exact), draw for draw."""
    from server.engine.sampler import SamplingParams, sample, token_logprobs

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 500, generator=g) * 4).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.3, top_k=20, seed=2), SamplingParams(temperature=1.0, top_p=0.8, seed=3),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=5, top_p=0.5, seed=4)]
    draws = {}
    for dtype in (torch.bfloat16, torch.float32):
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        draws[dtype] = [sample(logits.to(dtype), params, gens).tolist() for _ in range(300)]  # 300 steps per stream
    assert draws[torch.bfloat16] == draws[torch.float32]
    tokens = torch.tensor(draws[torch.float32][0])
    assert token_logprobs(logits, tokens, 3) == token_logprobs(logits.float(), tokens, 3)


def test_a_one_token_prompt_chunk_takes_the_prefill_path_alone_too(tmp_path):
    """Regression (found on another CPU): a prompt whose last chunk is one token used to run that chunk through the
    decode step's attention when it was alone in its step, but through SDPA beside a longer chunk; the two round
    differently, so its first token's log-probability (bfloat16: by ~0.03) depended on its batch-mates. Now only
    the engine's decode steps take the decode paths, and alone equals batched exactly."""
    path = make_adapter(lively_tiny()[0], tmp_path / "a", seed=3)
    model, tok = lively_tiny()
    model.to(torch.bfloat16)
    engine = Engine(model, tok, EngineConfig(max_model_len=96, max_num_seqs=4, max_prefill_chunk=8))
    engine.load_adapter("a", path)
    ids = tok(PROMPTS[1]).input_ids
    assert len(ids) % 8 == 1  # its last prefill chunk is a single token
    alone = collect(engine, GenerationRequest("alone", ids, greedy(3), adapter="a"))
    sinks = {"mate": [], "main": []}
    engine.submit(GenerationRequest("mate", tok(PROMPTS[3]).input_ids, greedy(3), adapter="a"), sinks["mate"].append)
    engine.submit(GenerationRequest("main", ids, greedy(3), adapter="a"), sinks["main"].append)
    while engine.has_work():
        engine.step()
    assert logprobs_of(sinks["main"]) == logprobs_of(alone) and tokens_of(sinks["main"]) == tokens_of(alone)


def test_greedy_sampling_uses_the_first_maximum():
    """Greedy rows take the first maximum, by the compiled argmax on CPU or by torch where the kernels are off."""
    from remix.kernels import cpu_ext
    from server.engine.sampler import SamplingParams, first_argmax, sample

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    logits[0, 10] = logits[0, 900] = 9.0
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(sample(logits, [greedy] * 6, [None] * 6), logits.max(-1).indices)
    assert first_argmax(logits)[0] == 10
    with cpu_ext.disabled():  # the torch fallback picks the same
        assert torch.equal(first_argmax(logits), logits.max(-1).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_prefill_attention_follows_sdpa(tmp_path, dtype):
    """Prefill chunks through the compiled attention (each prompt token over its own slot, the kernel decode tokens
    use) against SDPA with the mask (LeanForward.prefill_kernel off): the same greedy tokens, log-probabilities within
    float32 order (bfloat16: its rounding), prompts in chunks of 8 with an adapter and without."""
    model, tok = lively_tiny()
    model.to(dtype)
    engine = Engine(model, tok, EngineConfig(max_model_len=96, max_num_seqs=4, max_prefill_chunk=8))
    engine.load_adapter("a", make_adapter(lively_tiny()[0], tmp_path / "a", seed=5))
    runs = {}
    for kernel in (True, False):
        engine.runner.lean.prefill_kernel = kernel
        runs[kernel] = [collect(engine, GenerationRequest(f"{kernel}{i}", tok(p + " and then some more").input_ids,
                                                          greedy(8), adapter="a" if i % 2 else None))
                        for i, p in enumerate(PROMPTS)]
    tol = 1e-4 if dtype == torch.float32 else 0.05
    for a, b in zip(runs[True], runs[False]):
        assert tokens_of(a)[:4] == tokens_of(b)[:4]
        same = next((j for j, (x, y) in enumerate(zip(tokens_of(a), tokens_of(b))) if x != y), 8)
        torch.testing.assert_close(torch.tensor(logprobs_of(a)[:same]), torch.tensor(logprobs_of(b)[:same]),
                                   atol=tol, rtol=tol)


def test_priority_orders_admission_then_arrival():
    """vLLM's priority: waiting requests are admitted lowest value first, in arrival order among equals; running
    ones are not preempted. One slot, so admission order is finishing order."""
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=1))
    done = []
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def submit(rid, priority):
        engine.submit(GenerationRequest(rid, [1, 2, 3], params, priority=priority),
                      lambda ev: done.append(ev.request_id) if ev.finished else None)

    submit("running", 9)
    engine.step()  # admitted before the others arrive
    for rid, priority in (("a", 0), ("b", -1), ("c", 0), ("d", 5), ("e", -1)):
        submit(rid, priority)
    while engine.has_work():
        engine.step()
    assert done == ["running", "b", "e", "a", "c", "d"]
