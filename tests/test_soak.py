"""A randomized differential test of the engine: many requests with mixed sampling controls, adapters, shared
prompt prefixes, staggered arrivals and cancellations, served by one engine with every step-sharing feature on
(continuous batching, chunked prefill under a small token budget, the prefix cache, speculative decoding), and each
surviving request compared with the same request served alone by a plain engine (no prefix cache, no speculation).
What a request gets must not depend on what shares its steps: the same tokens, log-probabilities, text and finish
reason, bit for bit (the compiled CPU kernels compute every row alike in any batch below the sizes where a step's
GEMM leaves them - the token budget here keeps every step below them)."""

import copy
import importlib.util
import random

import pytest
import torch

import remix
from remix.kernels import cpu_ext
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from tests.helpers import write_adapter
from tests.test_engine import PROMPTS, lively_tiny, logprobs_of, tokens_of
from tests.test_speculative import needs_kernels

GRAMMARS = importlib.util.find_spec("xgrammar") is not None
WORDS = "the a cat dog sat on mat and ran to far away 1 2 3 4 it was once upon time in land there".split()


def workload(rng: random.Random, tok, count: int) -> list[tuple[int, GenerationRequest, int | None]]:
    """``count`` (arrival step, request, cancel step or None) drawn from ``rng``."""
    system = " ".join(rng.choice(WORDS) for _ in range(14))  # a shared prefix (prefix cache hits)
    out = []
    for i in range(count):
        shape = rng.random()
        if shape < 0.35:
            text = system + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        elif shape < 0.55:
            text = " ".join(rng.choice(WORDS[:6]) for _ in range(rng.randint(8, 30)))  # repetitive: drafts match
        else:
            text = rng.choice(PROMPTS) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 5)))
        kw: dict = {"max_tokens": rng.randint(1, 40), "ignore_eos": rng.random() < 0.7,
                    "logprobs": rng.choice([None, 0, 2])}
        if rng.random() < 0.5:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=rng.choice([0.6, 1.0, 1.3]), seed=rng.randint(0, 10_000),
                      top_k=rng.choice([0, 0, 5]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]),
                      n=rng.choice([1, 1, 2]))
        if rng.random() < 0.2:
            kw[rng.choice(["repetition_penalty", "presence_penalty", "frequency_penalty"])] = 1.3
        if rng.random() < 0.1:
            kw["logit_bias"] = {rng.randrange(tok.vocab_size): rng.choice([-100.0, 5.0])}
        if rng.random() < 0.15:
            kw["stop"] = [rng.choice(["e", " t", "a "])]
        if rng.random() < 0.1:
            kw["stop_token_ids"] = [rng.randrange(tok.vocab_size)]
        if rng.random() < 0.1:
            kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
        if GRAMMARS and rng.random() < 0.1:
            kw["grammar"] = rng.choice([("regex", r"(ab|c ){2,20}", "guided_regex"),
                                        ("choice", ["yes", "no", "the cat sat"], "guided_choice")])
        req = GenerationRequest(f"r{i}", tok(text).input_ids, SamplingParams(**kw),
                                adapter=rng.choice([None, "a", "b"]), priority=rng.choice([0, 0, 0, -1, 1]))
        arrival = rng.randint(0, 80)
        cancel = arrival + rng.randint(0, 12) if rng.random() < 0.15 else None
        out.append((arrival, req, cancel))
    return out


def outcome(events):
    """Per choice index: (tokens, log-probabilities, text, finish reason)."""
    by_index: dict = {}
    for e in events:
        by_index.setdefault(e.index, []).append(e)
    return {i: (tokens_of(ev), logprobs_of(ev), "".join(e.text for e in ev), ev[-1].finish_reason)
            for i, ev in sorted(by_index.items())}


@pytest.mark.parametrize("seed,dtype,kv,schedule", [(0, torch.float32, "auto", "constant"),
                                                    (1, torch.float32, "auto", "constant"),
                                                    (2, torch.bfloat16, "auto", "constant"),
                                                    (3, torch.bfloat16, "auto", "cost"),
                                                    (4, torch.float32, "int8", "cost"),
                                                    (5, torch.bfloat16, "int8", "constant")])
def test_requests_get_what_they_get_alone(tmp_path, seed, dtype, kv, schedule):
    """Seeds 0, 2, 4: the lively tiny model (drafts mostly rejected); 1, 3, 5: the plain one (loops: drafts taken).
    The constant schedule checks every draft that matches; the cost schedule (the default) drafts what its timings
    say pays. The busy engine's steps stay under 48 rows, where the default mode computes every row as batch-invariant
    mode does; the reference engine runs in batch-invariant mode, since alone it prefills up to 256 rows a step, and
    from 128 rows the default mode takes the faster GEMMs that round by shape (oneDNN's; bfloat16 on AMX: the ReMix
    delta inside the GEMM's tiles, rounded once)."""
    needs_kernels()
    if not cpu_ext.dot_gemm(dtype):  # e.g. bfloat16 without AVX512-BF16: ATen's GEMM rounds by shape
        pytest.skip(f"no batch-invariant base GEMM for {dtype} in this build")
    model, tok = lively_tiny(seed=0) if seed % 2 == 0 else remix.tiny_model(seed=0)
    adapters = {name: write_adapter(copy.deepcopy(model), tmp_path / name, seed=s) for name, s in (("a", 3), ("b", 4))}
    model.to(dtype)
    base = {"max_model_len": 256, "max_num_seqs": 6, "kv_cache_dtype": kv}
    busy = Engine(model, tok, EngineConfig(**base, max_batched_tokens=48, max_prefill_chunk=24,
                                           num_speculative_tokens=6, speculative_max_seqs=6,
                                           speculative_schedule=schedule))
    alone = Engine(copy.deepcopy(model), tok, EngineConfig(**base, prefix_caching=False, batch_invariant=True))
    for e in (busy, alone):
        for name, path in adapters.items():
            e.load_adapter(name, path)
    rng = random.Random(seed)
    work = workload(rng, tok, 40)
    events = {req.request_id: [] for _, req, _ in work}
    step = 0
    while step <= 80 or busy.has_work():
        for arrival, req, cancel in work:
            if arrival == step:
                busy.submit(copy.deepcopy(req), events[req.request_id].append)
            if cancel == step:
                busy.cancel(req.request_id)
        busy.step()
        step += 1
        assert step < 5000, "the busy engine did not finish"
    assert busy.stats()["slots_used"] == 0 and busy.stats()["running"] == 0
    stats = busy.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["spec_steps"] >= (20 if schedule == "constant" else 1)
    assert stats["spec_accepted_tokens"] > 0

    compared = cancelled = 0
    for _, req, cancel in work:
        got = outcome(events[req.request_id])
        assert len(got) == req.params.n and None not in {g[3] for g in got.values()}  # every choice ended
        reasons = {g[3] for g in got.values()}
        if "cancelled" in reasons:
            assert cancel is not None
            cancelled += 1
            continue
        want = outcome(collect(alone, copy.deepcopy(req)))
        assert got == want, req
        compared += 1
    assert compared >= 25 and cancelled >= 1 and alone.stats()["slots_used"] == 0
