"""A failure inside a step ends the requests it belongs to, and only those: a sequence whose sampling or emitting
fails ends alone, a failed forward ends that forward's sequences; the others' tokens are what they are alone (seeded
draws included), nothing leaks, the engine goes on, and the HTTP layer answers the failed request with an error
(500 / an error chunk in a stream / response.failed), never a 200 whose text stops short."""

import json

import pytest
import torch

import server.engine.engine as engine_module
from server.engine import INTERNAL_ERROR, Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from tests.helpers import serve_together
from tests.test_engine import PROMPTS, lively_tiny, tokens_of


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def seeded(n):
    return SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)


@pytest.fixture
def setup():
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=8, max_prefill_chunk=16,
                                             max_batched_tokens=40))
    ids = [tok(p).input_ids for p in PROMPTS]
    alone = {"g": tokens_of(collect(engine, GenerationRequest("g0", ids[0], greedy(12)))),
             "s": tokens_of(collect(engine, GenerationRequest("s0", ids[1], seeded(12))))}
    return engine, ids, alone


def finals(events):
    return [e for e in events if e.finished]


def check_others_and_engine(engine, ids, alone, out):
    """The greedy and the seeded request got their alone-tokens; nothing is held; a new request still runs."""
    assert tokens_of(out["g"]) == alone["g"] and finals(out["g"])[0].finish_reason == "length"
    assert tokens_of(out["s"]) == alone["s"] and finals(out["s"])[0].finish_reason == "length"
    stats = engine.stats()
    assert stats["slots_used"] == 0 and stats["running"] == 0 and stats["kv_tokens_used"] == 0 and not engine.requests
    assert tokens_of(collect(engine, GenerationRequest("after", ids[0], greedy(12)))) == alone["g"]


def assert_failed(events, produced_at_most):
    (last,) = finals(events)
    assert (last.finish_reason, last.error_code) == ("error", INTERNAL_ERROR) and last.error
    assert len(tokens_of(events)) <= produced_at_most


def test_sampling_that_fails_for_one_row_ends_that_request_alone(setup, monkeypatch):
    """Sampling the step's rows together raises because of one request (after drawing every row's uniform: the
    seeded row's generator has moved); each row is then sampled alone from its generator's state before the try, so
    the seeded request's draws, and tokens, are those it gets alone; the culprit's row fails alone and ends it."""
    engine, ids, alone = setup
    real = engine_module.sample
    bad = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={5: 1.0})
    calls = {"together": 0}

    def sample(logits, params, generators, history=None):
        out = real(logits, params, generators, history)  # (every generator drew)
        if any(p is bad for p in params):
            calls["together"] += len(params) > 1
            raise RuntimeError("a planted sampling failure")
        return out

    monkeypatch.setattr(engine_module, "sample", sample)
    out = serve_together(engine, [GenerationRequest("g", ids[0], greedy(12)), GenerationRequest("s", ids[1], seeded(12)),
                                  GenerationRequest("bad", ids[2], bad)])
    assert calls["together"] >= 1  # the failure did happen with batch-mates
    assert_failed(out["bad"], 0)
    check_others_and_engine(engine, ids, alone, out)


def test_emitting_that_fails_for_one_sequence_ends_it_alone(setup, monkeypatch):
    """Detokenizing / stop strings raise for one sequence at its fourth token: it ends with an error after the three
    it had; its batch-mates (one of them its own sibling of n = 2) go on."""
    engine, ids, alone = setup
    real = engine_module.update_text

    def update_text(seq, *args):
        if seq.request.request_id == "bad" and seq.index == 1 and len(seq.output_ids) == 4:
            raise RuntimeError("a planted emit failure")
        return real(seq, *args)

    monkeypatch.setattr(engine_module, "update_text", update_text)
    bad = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=2)
    out = serve_together(engine, [GenerationRequest("g", ids[0], greedy(12)), GenerationRequest("s", ids[1], seeded(12)),
                                  GenerationRequest("bad", ids[2], bad)])
    sibling = [e for e in out["bad"] if e.index == 0]
    failed = [e for e in out["bad"] if e.index == 1]
    assert finals(sibling)[0].finish_reason == "length" and len(tokens_of(sibling)) == 12
    assert_failed(failed, 3)
    assert len(tokens_of(failed)) == 3
    check_others_and_engine(engine, ids, alone, out)


@pytest.mark.parametrize("phase", ["prompt", "decode"])
def test_a_failed_forward_ends_that_forwards_sequences_only(setup, monkeypatch, phase):
    """The greedy and the seeded request decode; a third request joins, and the step's prefill forward (phase
    "prompt": the newcomer's) or its decode forward (the two decoding, while the newcomer's prefill goes on) raises
    once. Only that forward's requests end with an error."""
    engine, ids, alone = setup
    real = engine.runner.forward
    armed = {"on": False}

    def forward(*args, **kw):
        if armed["on"] and bool(kw.get("prompt")) == (phase == "prompt"):
            armed["on"] = False
            raise RuntimeError("a planted forward failure")
        return real(*args, **kw)

    monkeypatch.setattr(engine.runner, "forward", forward)
    out = {"g": [], "s": [], "late": []}
    engine.submit(GenerationRequest("g", ids[0], greedy(12)), out["g"].append)
    engine.submit(GenerationRequest("s", ids[1], seeded(12)), out["s"].append)
    for _ in range(4):
        engine.step()
    engine.submit(GenerationRequest("late", ids[3], greedy(12)), out["late"].append)
    armed["on"] = True
    while engine.has_work():
        engine.step()
    assert not armed["on"]
    if phase == "prompt":
        assert_failed(out["late"], 0)
        check_others_and_engine(engine, ids, alone, out)
    else:
        assert_failed(out["g"], 12)
        assert_failed(out["s"], 12)
        assert len(tokens_of(out["late"])) == 12 and finals(out["late"])[0].finish_reason == "length"
        assert tokens_of(out["late"]) == tokens_of(collect(engine, GenerationRequest("late2", ids[3], greedy(12))))
        assert engine.stats()["slots_used"] == 0


def test_a_final_event_is_sent_once_even_where_releasing_fails(setup, monkeypatch):
    """Releasing a finished sequence raises (the bookkeeping is what broke): it still gets its one final event, and
    the step's other sequences go on."""
    engine, ids, alone = setup
    real = engine._release

    def release(seq):
        real(seq)
        if seq.request.request_id == "bad":
            raise RuntimeError("a planted release failure")

    monkeypatch.setattr(engine, "_release", release)
    out = serve_together(engine, [GenerationRequest("g", ids[0], greedy(12)), GenerationRequest("s", ids[1], seeded(12)),
                                  GenerationRequest("bad", ids[2], greedy(5))])
    assert [e.finish_reason for e in finals(out["bad"])] == ["length"] and len(tokens_of(out["bad"])) == 5
    check_others_and_engine(engine, ids, alone, out)


@pytest.fixture
def client(monkeypatch):
    """The app over a running tiny engine whose emitting fails for any request asking for exactly 7 tokens."""
    from fastapi.testclient import TestClient

    from server.app import ServerState, create_app

    real = engine_module.update_text

    def update_text(seq, *args):
        if seq.params.max_tokens == 7 and len(seq.output_ids) == 3:
            raise RuntimeError("a planted emit failure")
        return real(seq, *args)

    monkeypatch.setattr(engine_module, "update_text", update_text)
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=128, max_num_seqs=4))
    engine.start()
    with TestClient(create_app(ServerState(engine=engine, base_name="tiny"))) as c:
        yield c
    engine.stop()


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "The quick brown fox"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 7}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_a_failed_generation_is_an_error_response_not_a_short_200(client, path, body):
    body = {"model": "tiny", "max_tokens": 7, "temperature": 0, **body}
    if path == "/v1/responses":
        body.pop("max_tokens")
    r = client.post(path, json=body)
    assert r.status_code == 500, r.text
    if path == "/v1/messages":  # (Anthropic's shape)
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    else:
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == INTERNAL_ERROR
    ok = client.post(path, json={**body, **({"max_output_tokens": 8} if path == "/v1/responses" else {"max_tokens": 8})})
    assert ok.status_code == 200, ok.text


def test_a_failed_stream_ends_with_an_error_chunk(client):
    """Chat and completions streams: the chunks sent so far, then an OpenAI error object (which OpenAI's clients
    raise) and [DONE]; a Responses stream ends with response.failed, its error OpenAI's {code, message}."""
    for path, body in [("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 7}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
                                                 "n": 2})]:
        with client.stream("POST", path, json={"model": "tiny", "temperature": 0, "stream": True, **body}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][len("data: "):])["error"]
        assert error["type"] == "server_error" and error["code"] == INTERNAL_ERROR
        assert all("choices" in json.loads(line[len("data: "):]) for line in lines[:-2])
    with client.stream("POST", "/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 7,
                                                      "temperature": 0, "stream": True}) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == INTERNAL_ERROR
    assert not any(e["type"] == "response.completed" for e in events)
    with client.stream("POST", "/v1/messages", json={"model": "tiny", "max_tokens": 7, "temperature": 0, "stream": True,
                                                     "messages": [{"role": "user", "content": "hi"}]}) as r:
        lines = [line for line in r.iter_lines() if line.startswith(("event: ", "data: "))]
    assert lines[-2] == "event: error" and json.loads(lines[-1][len("data: "):])["error"]["type"] == "api_error"
    assert "event: message_start" in lines and "event: message_stop" not in lines


def test_the_openai_client_raises_on_a_failed_stream(client):
    """OpenAI's own client, over the app: a failed non-streamed request raises InternalServerError, a failed stream
    raises APIError at the error chunk."""
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="x", http_client=client, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        api.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, temperature=0)
    with pytest.raises(openai.APIError):
        for _ in api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=7,
                                             temperature=0, stream=True):
            pass


@pytest.mark.parametrize("code,status,kind", [(INTERNAL_ERROR, 500, "server_error"),
                                              ("engine_stopped", 503, "service_unavailable"),
                                              ("model_not_found", 404, "not_found_error")])
def test_each_failure_code_is_its_http_error(code, status, kind):
    """The engine's codes for an accepted request that failed (INTERNAL_ERROR, ENGINE_STOPPED, ADAPTER_GONE) map to
    500, 503 (restart the server) and 404 (the adapter was removed before the request started)."""
    from server.app import APIError
    from server.engine import ADAPTER_GONE, ENGINE_STOPPED, Event

    assert (ENGINE_STOPPED, ADAPTER_GONE) == ("engine_stopped", "model_not_found")
    e = APIError.failed(Event("r", 0, [], "", [], True, "error", error="why", error_code=code), "mine")
    assert (e.status, e.type, e.code) == (status, kind, code)
    assert ("'mine'" in e.message) if code == ADAPTER_GONE else ("why" in e.message)


def test_a_draft_check_that_fails_ends_its_sequence_alone(monkeypatch):
    """With speculative decoding: emitting fails for one sequence while its draft is checked; it ends alone, and its
    batch-mate (drafting too) gets the tokens it gets alone."""
    import remix

    model, tok = remix.tiny_model(seed=0)  # (the plain tiny model loops: drafts are taken)
    engine = Engine(model, tok, EngineConfig(max_model_len=128, max_num_seqs=4, num_speculative_tokens=4,
                                             speculative_schedule="constant"))
    ids = [tok("a b c a b c a b c a b").input_ids, tok(PROMPTS[0]).input_ids]
    alone = tokens_of(collect(engine, GenerationRequest("alone", ids[0], greedy(30))))
    real_check, real_text = engine._check_draft, engine_module.update_text
    checking, failed = [], []

    def check_draft(s, *args):
        checking.append(s)
        try:
            return real_check(s, *args)
        except Exception:
            failed.append(s.request.request_id)
            raise
        finally:
            checking.pop()

    def update_text(seq, *args):
        if seq.request.request_id == "bad" and checking and len(seq.output_ids) >= 8:
            raise RuntimeError("a planted failure inside a draft check")
        return real_text(seq, *args)

    monkeypatch.setattr(engine, "_check_draft", check_draft)
    monkeypatch.setattr(engine_module, "update_text", update_text)
    out = serve_together(engine, [GenerationRequest("good", ids[0], greedy(30)),
                                  GenerationRequest("bad", ids[1], greedy(30))])
    assert failed == ["bad"] and engine.stats()["spec_accepted_tokens"] > 0
    assert_failed(out["bad"], 29)
    assert tokens_of(out["good"]) == alone and finals(out["good"])[0].finish_reason == "length"
    assert engine.stats()["slots_used"] == 0 and not engine.requests


@pytest.mark.parametrize("where", ["emit", "forward"])
def test_the_prefix_cache_is_forgotten_only_after_a_failed_forward(setup, monkeypatch, where):
    """A sequence that fails after its forward (emitting) leaves the prefix cache as it was: a later prompt still
    takes its cached prefix. A forward that fails may have written anywhere: then the cache forgets."""
    engine, ids, alone = setup
    long = ids[3] * 3  # (several 16-token blocks)
    first = collect(engine, GenerationRequest("warm", long, greedy(4)))
    real_text, real_forward = engine_module.update_text, engine.runner.forward

    def update_text(seq, *args):
        if seq.request.request_id == "bad" and where == "emit":
            raise RuntimeError("a planted emit failure")
        return real_text(seq, *args)

    def forward(*args, **kw):
        if where == "forward" and any(s is not None and s.request.request_id == "bad" for s in engine.slot_seq):
            raise RuntimeError("a planted forward failure")
        return real_forward(*args, **kw)

    monkeypatch.setattr(engine_module, "update_text", update_text)
    monkeypatch.setattr(engine.runner, "forward", forward)
    assert_failed(collect(engine, GenerationRequest("bad", ids[2], greedy(4))), 0)
    again = collect(engine, GenerationRequest("again", long, greedy(4)))
    assert tokens_of(again) == tokens_of(first)
    cached = finals(again)[0].cached_tokens
    assert (cached >= 32) if where == "emit" else (cached == 0), cached


def test_a_request_whose_admission_fails_ends_alone(setup, monkeypatch, tmp_path):
    """Seating a request's second sequence fails (its prefix match or cache copy): both its choices end with an
    error, the one seated gives back its slot and its adapter reference, the running requests go on as alone."""
    from tests.helpers import write_adapter

    engine, ids, alone = setup
    engine.load_adapter("ad", write_adapter(lively_tiny()[0], tmp_path / "ad", 3))
    real = engine._seat
    seated = []

    def seat(seq, free):
        if seq.request.request_id == "bad" and seq.index == 1:
            raise RuntimeError("a planted admission failure")
        seated.append(seq.request.request_id)
        return real(seq, free)

    monkeypatch.setattr(engine, "_seat", seat)
    out = {"g": [], "s": [], "bad": []}
    engine.submit(GenerationRequest("g", ids[0], greedy(12)), out["g"].append)
    engine.submit(GenerationRequest("s", ids[1], seeded(12)), out["s"].append)
    engine.step()
    bad = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=2)
    engine.submit(GenerationRequest("bad", ids[2], bad, adapter="ad"), out["bad"].append)
    while engine.has_work():
        engine.step()
    assert seated.count("bad") == 1  # (its first sequence was seated before the second failed)
    assert sorted((e.index, e.finish_reason, e.error_code) for e in out["bad"]) == [
        (0, "error", INTERNAL_ERROR), (1, "error", INTERNAL_ERROR)]
    assert engine.registry.adapters["ad"].active == 0
    check_others_and_engine(engine, ids, alone, out)
