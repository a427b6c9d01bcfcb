"""Speculative decoding by prompt lookup (server.engine.speculative): the n-gram index, and an engine that checks
drafts giving exactly the output without them - greedy and seeded sampling: tokens, log-probabilities, text and finish
reasons - alone, in mixed batches with adapters, under every stop condition, and with the prefix cache."""

import copy
import importlib.util

import pytest
import torch

import remix
from remix.kernels import cpu_ext
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from server.engine.speculative import DraftPolicy, DraftStats, NgramIndex
from server.metrics import EngineCollector
from tests.helpers import serve_together
from tests.test_engine import PROMPTS, lively_tiny, logprobs_of, make_adapter, tokens_of


def test_ngram_index_proposes_what_followed_the_longest_earlier_match():
    idx = NgramIndex(1, 3, [1, 2, 3, 4, 1, 2])
    # the tail [1, 2]: (4, 1, 2) never occurred before; (1, 2) did, at 0-1, followed by 3, 4, 1
    assert idx.propose(3) == [3, 4, 1]
    # one more token: the 3-gram (1, 2, 3) now matches (longest first), followed by 4, 1, 2
    assert idx.propose(3, [3]) == [4, 1, 2]
    assert idx.propose(3, [9]) == [] and idx.tokens == [1, 2, 3, 4, 1, 2, 3, 9]  # 9 never occurred before
    assert idx.propose(0) == []
    # the latest occurrence where k tokens follow it: (7, 8) at 0-1 and 3-4; the latest is followed by 5, 6, 7
    assert NgramIndex(2, 2, [7, 8, 0, 7, 8, 5, 6, 7, 8]).propose(3) == [5, 6, 7]
    # a loop: the latest occurrence of (5, 5) is followed by one token only, the earliest by the rest of the run
    assert NgramIndex(2, 2, [5, 5, 5, 5]).propose(3) == [5, 5]
    assert NgramIndex(2, 2, [1, 2]).propose(3) == []  # nothing before the tail itself
    # fed in pieces, the same index as fed at once
    pieces = NgramIndex(2, 3, [7, 8, 0])
    for t in (7, 8, 5, 6, 7):
        pieces.propose(2, [t])
    whole = NgramIndex(2, 3, [7, 8, 0, 7, 8, 5, 6, 7, 8])
    assert pieces.propose(3, [8]) == whole.propose(3) == [5, 6, 7]
    assert (pieces.latest, pieces.earliest) == (whole.latest, whole.earliest)
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(3, 2)


def test_draft_policy_weighs_a_draft_token_against_a_steps_token():
    policy = DraftPolicy(refresh=3, probe_every=4)
    assert policy.ratio(4) is None  # no step of 4 rows timed yet: this one runs without drafts, timed
    policy.observe_step(4, 0, 0.010)  # 10 ms for 4 tokens: 2.5 ms a token
    assert policy.ratio(4) == 0.0  # no step with drafts yet: drafts cost nothing known, so whole drafts
    policy.observe_step(4, 8, 0.014)  # 8 draft tokens cost 4 ms: 0.5 ms each
    assert policy.ratio(4) == policy.ratio(4) == pytest.approx(0.5 / 2.5)
    assert policy.ratio(4) is None  # refresh = 3 steps since t(4) was taken: one without drafts, to keep it current
    policy.observe_step(4, 0, 0.010)
    assert policy.ratio(4) == pytest.approx(0.2) and policy.ratio(1) is None  # each row count timed on its own
    # the largest j with rate^j >= 0.2: rate 0.6 (the prior) -> 3 (0.216); 0.9 -> 15, capped at k; 0.25 -> 1
    assert DraftStats().rate == pytest.approx(0.6) and policy.length(DraftStats(), 0.2, 8) == 3
    assert policy.length(DraftStats(9, 10), 0.2, 8) == 8 and policy.length(DraftStats(1, 4), 0.2, 8) == 1
    # a sequence whose drafts fail drafts nothing, but checks one token every probe_every steps
    stats = DraftStats(1, 10)
    assert [policy.length(stats, 0.2, 8) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    assert policy.length(stats, 0.0, 8) == 8  # free drafts: the whole draft whatever the rate
    assert policy.length(DraftStats(), 1.5, 8) == 0  # a draft token costs more than a step's token
    # checks move the rate: a draft taken whole counts its tokens only, one cut short its first rejected token too
    stats = DraftStats()
    policy.observe_check(stats, 4, 4)
    assert (stats.taken, stats.checked) == pytest.approx((0.8 * 1.2 + 4, 0.8 * 2 + 4))
    policy.observe_check(stats, 4, 1)
    assert (stats.taken, stats.checked) == pytest.approx((0.8 * (0.96 + 4) + 1, 0.8 * 5.6 + 2))
    constant = DraftPolicy(constant=True)
    assert constant.ratio(4) == 0.0 and constant.length(DraftStats(0, 10), constant.ratio(4), 6) == 6


def engines(model, tok, k=4, schedule="constant", **cfg):
    """The model served by an engine without speculation and a copy of it by one with it (k draft tokens; by default
    the constant schedule: every matching draft checked, whatever it costs on the tiny models here)."""
    base = {"max_model_len": 128, "max_num_seqs": 4, **cfg}
    return (Engine(model, tok, EngineConfig(**base)),
            Engine(copy.deepcopy(model), tok, EngineConfig(**base, num_speculative_tokens=k, speculative_schedule=schedule)))


def run_together(engine, requests):
    """Submit all, step until done; per request (tokens, log-probabilities, text, finish reason)."""
    events = serve_together(engine, requests)
    assert engine.stats()["slots_used"] == 0
    return {rid: (tokens_of(ev), logprobs_of(ev), "".join(e.text for e in ev), ev[-1].finish_reason)
            for rid, ev in events.items()}


def needs_kernels():
    if cpu_ext.load() is None:
        pytest.skip("the compiled CPU kernels are not built here (without them prefill and decode round differently)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lively", [True, False])
def test_speculation_gives_the_plain_greedy_output(dtype, lively):
    """Alone, prompt by prompt: the same tokens and log-probabilities (bit for bit: every token is computed alike in
    a decode step and in a checked chunk), and drafts were accepted. The plain tiny model falls into loops (drafts
    accepted whole); the lively one wanders (most drafts rejected)."""
    needs_kernels()
    if not cpu_ext.dot_gemm(dtype):  # e.g. bfloat16 without AVX512-BF16: ATen's GEMM rounds by shape
        pytest.skip(f"no batch-invariant base GEMM for {dtype} in this build")
    model, tok = lively_tiny() if lively else remix.tiny_model(seed=0)
    model.to(dtype)
    plain, spec = engines(model, tok)
    for i, p in enumerate(PROMPTS + ["a b c a b c a b c a b"]):
        ids = tok(p).input_ids
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
        want = collect(plain, GenerationRequest(f"p{i}", ids, params))
        got = collect(spec, GenerationRequest(f"s{i}", ids, params))
        assert tokens_of(got) == tokens_of(want) and len(tokens_of(got)) == 40
        assert [e.logprobs for e in got] == [e.logprobs for e in want]
        assert "".join(e.text for e in got) == "".join(e.text for e in want)
    totals = spec.stats()
    assert totals["spec_accepted_tokens"] > 0 and totals["spec_draft_tokens"] >= totals["spec_accepted_tokens"]
    if not lively:  # loops: nearly every draft token is the model's own, so far fewer steps than tokens
        assert totals["spec_accepted_tokens"] > 0.8 * totals["spec_draft_tokens"]
        assert totals["spec_steps"] < 0.5 * 40 * 5


def test_mixed_batch_with_adapters_and_sampled_requests(tmp_path):
    """Four requests in one batch - greedy on an adapter, greedy on the base, seeded sampling (drafts checked by its
    own draws) and greedy with a repetition penalty (no drafts) - each gets what it gets without speculation; a fifth
    running sequence (more than speculative_max_seqs) turns drafting off for those steps."""
    needs_kernels()
    model, tok = remix.tiny_model(seed=0)
    path = make_adapter(remix.tiny_model(seed=0)[0], tmp_path / "a", seed=3)
    plain, spec = engines(model, tok, max_batched_tokens=64)
    for e in (plain, spec):
        e.load_adapter("a", path)

    def requests(tag, extra=()):
        greedy = dict(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=1)
        reqs = [GenerationRequest(f"{tag}0", tok(PROMPTS[0]).input_ids, SamplingParams(**greedy), adapter="a"),
                GenerationRequest(f"{tag}1", tok(PROMPTS[1]).input_ids, SamplingParams(**greedy)),
                GenerationRequest(f"{tag}2", tok(PROMPTS[2]).input_ids,
                                  SamplingParams(max_tokens=30, temperature=0.8, seed=7, ignore_eos=True), adapter="a"),
                GenerationRequest(f"{tag}3", tok(PROMPTS[3]).input_ids, SamplingParams(**greedy, repetition_penalty=1.3))]
        return reqs + list(extra)

    want = run_together(plain, requests("x"))
    got = run_together(spec, requests("x"))
    assert got == want
    assert spec.spec_totals["accepted_tokens"] > 0
    # five running sequences: no drafts while all five decode (speculative_max_seqs 4), then the same as above
    fifth = GenerationRequest("y4", tok("Once").input_ids, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    five_plain, five_spec = engines(remix.tiny_model(seed=0)[0], tok, max_num_seqs=5, max_batched_tokens=64,
                                    speculative_max_seqs=4)
    for e in (five_plain, five_spec):
        e.load_adapter("a", path)
    steps = []
    original = five_spec._propose
    five_spec._propose = lambda seqs: steps.append((len(seqs), original(seqs))) or steps[-1][1]
    assert run_together(five_spec, requests("y", [fifth])) == run_together(five_plain, requests("y", [fifth]))
    assert all(d is None for n, d in steps if n == 5) and any(n == 5 for n, _ in steps)
    assert any(d is not None and any(d) for n, d in steps if n == 1)  # the long one alone: drafting again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_sequences_get_their_seeds_tokens(dtype):
    """Seeded sampling (temperature, top-k, top-p, min-p) with drafts: each position's token is the sampler's with the
    sequence's own generator, one draw a token emitted, so the tokens and log-probabilities are those without
    speculation - alone and three seeds together in one batch - and a low temperature on a looping model accepts most
    drafts."""
    needs_kernels()
    model, tok = lively_tiny(3)  # at a low temperature it settles into repeating one token after "a b c a b c a b"
    model.to(dtype)
    plain, spec = engines(model, tok)
    settings = [dict(temperature=0.3), dict(temperature=0.9, top_p=0.9, top_k=40), dict(temperature=1.2, min_p=0.05)]

    def requests(tag):
        return [GenerationRequest(f"{tag}{i}", tok(p).input_ids, SamplingParams(
            max_tokens=32, seed=1 + i, ignore_eos=True, logprobs=1, **kw))
            for i, (p, kw) in enumerate(zip(["a b c a b c a b", PROMPTS[0], PROMPTS[2]], settings))]

    want = run_together(plain, requests("t"))
    assert run_together(spec, requests("t")) == want  # together
    for r in requests("t"):  # alone
        got = collect(spec, r)
        assert (tokens_of(got), logprobs_of(got)) == want[r.request_id][:2]
    assert spec.spec_totals["accepted_tokens"] > 10


def test_adjusted_sequences_take_drafts_with_their_history_at_each_position():
    """Penalties, logit bias, min_tokens and a grammar adjust each position's logits from the tokens before it: with
    drafts the sampler sees, at every checked position, the history a decode step there would see - the same tokens,
    log-probabilities and finish reasons as without speculation, greedy and seeded, in one batch."""
    needs_kernels()
    model, tok = lively_tiny(3)
    plain, spec = engines(model, tok)
    ids = tok("a b c a b c a b").input_ids
    cases = [dict(temperature=0.0, repetition_penalty=1.05), dict(temperature=0.3, seed=4, frequency_penalty=0.2),
             dict(temperature=0.0, min_tokens=20, logit_bias={168: 1.5})]
    if importlib.util.find_spec("xgrammar") is not None:  # (structured output's optional dependency)
        cases.append(dict(temperature=0.0, grammar=("regex", r"(xy){3,30}", "guided_regex")))

    def requests(tag):
        return [GenerationRequest(f"{tag}{i}", ids, SamplingParams(max_tokens=30, logprobs=1, **kw))
                for i, kw in enumerate(cases)]

    want = run_together(plain, requests("a"))
    assert run_together(spec, requests("a")) == want
    assert spec.spec_totals["accepted_tokens"] > 0


@pytest.mark.parametrize("case", ["max_tokens", "stop_string", "stop_token", "eos"])
def test_stop_conditions_inside_a_draft(case):
    """A stop condition met inside a checked draft ends the sequence right there, as without drafts: the same tokens,
    text and finish reason. The plain tiny model repeats one token (drafts accepted whole; max_tokens, a stop string
    of nine of it end it inside an accepted draft); the lively one (seed 3) repeats token 216
    fourteen times, then 168 (a stop token or EOS there: the token that rejects a draft of 216s)."""
    needs_kernels()
    lively = case in ("stop_token", "eos")
    model, tok = lively_tiny(3) if lively else remix.tiny_model(seed=0)
    ids = tok("a b c a b c a b c a b").input_ids
    kw = dict(temperature=0.0, ignore_eos=True, max_tokens=40)
    plain, spec = engines(model, tok)
    loop = tokens_of(collect(plain, GenerationRequest("probe", ids, SamplingParams(**kw))))
    if case == "max_tokens":
        kw["max_tokens"] = 7
    elif case == "stop_string":
        kw["stop"] = [tok.decode(loop[:9])]
    elif lively:
        assert loop[:15] == [216] * 14 + [168]
        if case == "stop_token":
            kw["stop_token_ids"] = [168]
        else:
            kw["ignore_eos"] = False
            for e in (plain, spec):
                e.eos_ids = {168}
    want = run_together(plain, [GenerationRequest("w", ids, SamplingParams(**kw))])["w"]
    got = run_together(spec, [GenerationRequest("w", ids, SamplingParams(**kw))])["w"]
    assert got == want
    assert spec.spec_totals["accepted_tokens"] > 0
    assert len(want[0]) < 40 and want[3] == ("length" if case == "max_tokens" else "stop")


def test_prefix_cache_after_rejected_drafts_holds_only_accepted_positions():
    """A finished sequence's keys and values go to the prefix cache up to its computed tokens only: a later prompt
    that extends its prompt and output (taking those blocks) gets the same output as computed from scratch."""
    needs_kernels()
    model, tok = lively_tiny()
    plain = Engine(model, tok, EngineConfig(max_model_len=256, max_num_seqs=2, prefix_caching=False))
    spec = Engine(model, tok, EngineConfig(max_model_len=256, max_num_seqs=2, num_speculative_tokens=6,
                                           speculative_schedule="constant"))
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = tok(PROMPTS[0]).input_ids
    first = collect(spec, GenerationRequest("a", ids, params))
    assert spec.spec_totals["draft_tokens"] > spec.spec_totals["accepted_tokens"] > 0  # some rejected
    longer = ids + tokens_of(first) + tok(" and").input_ids
    got = collect(spec, GenerationRequest("b", longer, params))
    assert got[-1].cached_tokens >= 16
    want = collect(plain, GenerationRequest("b", longer, params))
    assert tokens_of(got) == tokens_of(want) and logprobs_of(got) == logprobs_of(want)


def test_drafts_stay_within_the_step_token_budget():
    """num_speculative_tokens above what max_batched_tokens leaves: each step's decode rows and drafts together stay
    within the budget, and the output is still the one without drafts."""
    needs_kernels()
    model, tok = remix.tiny_model(seed=0)
    plain, spec = engines(model, tok, k=50, max_batched_tokens=24, max_num_seqs=2)
    sizes = []
    original = spec._run_verify
    spec._run_verify = lambda seqs, drafts: sizes.append(len(seqs) + sum(map(len, drafts))) or original(seqs, drafts)
    reqs = lambda tag: [GenerationRequest(f"{tag}{i}", tok(p).input_ids, SamplingParams(  # noqa: E731
        max_tokens=60, temperature=0.0, ignore_eos=True)) for i, p in enumerate(["a b c a b c", "1 2 3 4"])]
    assert run_together(spec, reqs("b")) == run_together(plain, reqs("b"))
    assert sizes and max(sizes) <= 24 and spec.spec_totals["accepted_tokens"] > 0


def test_counters_and_settings():
    model, tok = remix.tiny_model(seed=0)
    assert "spec_draft_tokens" not in Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2)).stats()
    spec = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2, num_speculative_tokens=3))
    collect(spec, GenerationRequest("r", tok("a b c a b c a b").input_ids,
                                    SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)))
    names = {m.name: m.samples[0].value for m in EngineCollector(spec).collect()}
    s = spec.stats()
    assert names["remix_spec_decode_draft_tokens"] == s["spec_draft_tokens"] > 0
    assert names["remix_spec_decode_accepted_tokens"] == s["spec_accepted_tokens"]
    assert names["remix_spec_decode_steps"] == s["spec_steps"] > 0
    assert s["spec_schedule"] == "cost" and s["spec_draft_token_cost_ms"] >= 0 and s["spec_check_cost_ms"] >= 0
    fixed, per_token = spec.draft_policy.costs()
    assert names["remix_spec_decode_draft_token_cost_seconds"] == pytest.approx(per_token, abs=1e-7)
    assert names["remix_spec_decode_check_cost_seconds"] == pytest.approx(fixed, abs=1e-7)
    for bad in (dict(num_speculative_tokens=-1), dict(num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2),
                dict(speculative_max_seqs=0), dict(speculative_schedule="heuristic")):
        with pytest.raises(ValueError):
            Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2, **bad))
