"""Decode steps from CUDA graphs (server/engine/graphs.py): the padded, fixed-span, ungrouped step equals the eager one.

On the CPU the step body runs eagerly (``DecodeGraphs(eager=True)``: same padding rows, spans and fused routing, no
capture); on CUDA it is captured and replayed. Either way every request gets the tokens, log-probabilities (within
float tolerance: attention over a longer, masked span sums in another order) and selection counts of the plain
engine, whatever its batch-mates, and loading an adapter after a capture is seen by the next step.
"""

import pytest
import torch

from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine.graphs import DecodeGraphs, batch_sizes, spans
from tests.test_engine import PROMPTS, lively_tiny, logprobs_of, make_adapter, tokens_of


def test_buckets():
    assert batch_sizes(1) == [1] and batch_sizes(8) == [1, 2, 4, 8] and batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert spans(160) == [160] and spans(256) == [256] and spans(600) == [256, 512, 600]


def engine_on(device, graphs: str, adapters: dict):
    """graphs: "off" (plain eager steps), "eager" (the graph body without capture), "cuda" (captured graphs)."""
    model, tok = lively_tiny(device=device)
    engine = Engine(model, tok, EngineConfig(max_model_len=300, max_num_seqs=8, max_prefill_chunk=16, max_batched_tokens=64,
                                             cuda_graphs=graphs == "cuda"))
    if graphs == "eager":
        engine.runner.graphs = DecodeGraphs(engine.runner, eager=True)
    assert (engine.runner.graphs is not None) == (graphs != "off")
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine, tok


LONG = "A long prompt that is still being prefilled, chunk by chunk, while the others decode: " * 3


def serve(engine, tok, names, max_tokens=20):
    """The last request's long prompt is prefilled in chunks while the others decode, in the slot after theirs: the
    padding row of a decode step sits in that slot and must not touch its cache."""
    sinks = {}
    for i, (prompt, adapter) in enumerate(zip(PROMPTS + PROMPTS[:1] + [LONG], names)):
        sinks[i] = []
        params = SamplingParams(max_tokens=max_tokens + 3 * i, temperature=0.0, ignore_eos=True, logprobs=0)
        engine.submit(GenerationRequest(f"r{i}", tok(prompt).input_ids, params, adapter=adapter), sinks[i].append)
    while engine.has_work():
        engine.step()
    return [(tokens_of(s), logprobs_of(s)) for s in sinks.values()]


def counts_of(engine):
    return {name: [w.counts.cpu().clone() for w in m.stack.slots.values()] for name, m in engine.runner.stacked.items()}


def check_same(got, want):
    for (toks, lps), (want_toks, want_lps) in zip(got, want):
        assert toks == want_toks
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("graphs", ["eager", "eager-torch", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_graph_steps_equal_eager_steps(tmp_path, graphs):
    """eager-torch: the graph body on the CPU with the compiled kernels off, so every wrapped module takes the fused
    torch path that CUDA runs (its per-step routing plan shared by the modules)."""
    import contextlib

    from remix.kernels import cpu_ext

    device = "cuda" if graphs == "cuda" else "cpu"
    off = cpu_ext.disabled if graphs == "eager-torch" else contextlib.nullcontext
    graphs = "eager" if graphs == "eager-torch" else graphs
    paths = {n: make_adapter(lively_tiny()[0], tmp_path / n, seed=20 + i, n=4 + 2 * i, k=1 + i) for i, n in enumerate("ab")}
    names = ["a", None, "b", "a", None, "b"]  # 5 decode rows padded to 8 beside a prefill, then fewer as requests finish
    plain, tok = engine_on(device, "off", paths)
    fast, _ = engine_on(device, graphs, paths)
    fast.warm_up()  # CUDA: every (batch, span) bucket captured up front, as Engine.start does
    want = serve(plain, tok, names)
    with off():
        got = serve(fast, tok, names)
    check_same(got, want)
    for name, counts in counts_of(plain).items():  # padding rows count nothing
        assert all(torch.equal(a, b) for a, b in zip(counts, counts_of(fast)[name])), name
    if graphs == "cuda":
        g = fast.runner.graphs
        assert g.replays > 50 and g.captures == len(g.batches) * len(g.spans) == 4 * 2 and fast.stats()["cuda_graphs"]
        # an adapter loaded after the capture: the next steps use it (graphs dropped and captured again)
        captures = g.captures
        for engine in (plain, fast):
            engine.load_adapter("c", make_adapter(lively_tiny()[0], tmp_path / "c", seed=30))
        check_same(serve(fast, tok, ["c", "c", "a", None, "c", "b"]), serve(plain, tok, ["c", "c", "a", None, "c", "b"]))
        assert g.captures > captures


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_steps_in_bfloat16_and_long_spans(tmp_path):
    """bfloat16 routes on float32 logits in the fused path too; rows longer than the first span use the next one."""
    paths = {"a": make_adapter(lively_tiny()[0], tmp_path / "a", seed=5)}
    engines = []
    for graphs in ("off", "cuda"):
        model, tok = lively_tiny(device="cuda")
        model.to(torch.bfloat16)
        engine = Engine(model, tok, EngineConfig(max_model_len=300, max_num_seqs=4, max_prefill_chunk=16,
                                                 cuda_graphs=graphs == "cuda"))
        engine.load_adapter("a", paths["a"])
        engines.append(engine)
    long_prompt = tok(" ".join(["word"] * 60)).input_ids[:250]  # 250 + 40 > 256: crosses into the 300 span
    results = []
    for engine in engines:
        sinks = {i: [] for i in range(3)}
        for i, (ids, adapter) in enumerate([(long_prompt, "a"), (tok(PROMPTS[0]).input_ids, None),
                                            (tok(PROMPTS[1]).input_ids, "a")]):
            engine.submit(GenerationRequest(f"l{i}", ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                                         logprobs=0), adapter=adapter), sinks[i].append)
        while engine.has_work():
            engine.step()
        results.append([(tokens_of(s), logprobs_of(s)) for s in sinks.values()])
    assert engines[1].runner.graphs.captures >= 2  # two spans at least
    for (toks, lps), (want_toks, want_lps) in zip(results[1], results[0]):
        shared = next((i for i, (a, b) in enumerate(zip(toks, want_toks)) if a != b), len(toks))
        assert shared >= 10  # bfloat16: a near-tie may go another way after a while
        assert all(abs(a - b) < 0.1 for a, b in zip(lps[:shared], want_lps[:shared]))
