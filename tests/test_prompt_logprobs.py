"""Prompt log-probabilities (completions with echo + logprobs, max_tokens 0 to score a prompt alone): every prompt
token's log p and top-N under a plain forward, across prefill chunks, with an adapter, and over HTTP."""

import json
import math

import httpx
import pytest
import torch

import remix
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, collect
from tests.helpers import LiveServer, write_adapter
from tests.test_engine import PROMPTS, lively_tiny, tokens_of


def plain_prompt_logprobs(model, ids):
    """log_softmax of a plain forward: position j - 1's distribution scores token j."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logp


@pytest.mark.parametrize("adapter", [False, True])
def test_prompt_logprobs_equal_a_plain_forward_across_chunks(tmp_path, adapter):
    model, tok = lively_tiny()
    # chunks of 8 tokens and at most 12 a step: a 40-token prompt takes several steps, beside another request
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=4, max_prefill_chunk=8, max_batched_tokens=12))
    reference, _ = lively_tiny()
    name = None
    if adapter:
        path = write_adapter(lively_tiny()[0], tmp_path / "a", seed=3, n=4, k=2, r=4)
        engine.load_adapter("a", str(path))
        remix.load_adapter(reference, path)
        name = "a"
    ids = tok(" ".join(PROMPTS)).input_ids[:40]
    assert len(ids) == 40
    other = []
    engine.submit(GenerationRequest("other", tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=6, temperature=0.0)),
                  other.append)
    events = collect(engine, GenerationRequest("p", ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                                        prompt_logprobs=2), adapter=name))
    first = events[0].prompt_logprobs
    assert all(e.prompt_logprobs is None for e in events[1:]) and len(tokens_of(events)) == 3
    assert [t for t, _, _ in first] == ids and first[0][1:] == (None, None)
    logp = plain_prompt_logprobs(reference, ids)
    # tolerance: float32 through 2 layers, the same kernels batched differently (as the engine's logits tests)
    got = torch.tensor([lp for _, lp, _ in first[1:]])
    want = torch.stack([logp[j - 1, ids[j]] for j in range(1, len(ids))])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for j in range(1, len(ids)):
        values, top = torch.topk(logp[j - 1], 2)
        assert [a for a, _ in first[j][2]] == top.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in first[j][2]]), values, atol=1e-4, rtol=1e-4)
    assert events[0].prompt_ranks is None  # (asked for only by vLLM's prompt_logprobs)
    ranked = collect(engine, GenerationRequest("r", ids, SamplingParams(max_tokens=1, prompt_logprobs=2,
                                                                        prompt_ranks=True), adapter=name))[0]
    want_ranks = [None] + [int((logp[j - 1] > logp[j - 1, ids[j]]).sum()) + 1 for j in range(1, len(ids))]
    assert ranked.prompt_ranks == want_ranks and [lp for _, lp, _ in ranked.prompt_logprobs] == [lp for _, lp, _ in first]
    assert len(set(want_ranks[1:])) > 5  # (the ranks vary: the check means something)
    # max_tokens 0: the prompt alone, scored the same; nothing generated
    events = collect(engine, GenerationRequest("z", ids, SamplingParams(max_tokens=0, prompt_logprobs=0), adapter=name))
    assert len(events) == 1 and events[0].finished and events[0].finish_reason == "length" and not events[0].token_ids
    assert events[0].completion_tokens == 0 and events[0].prompt_tokens == 40
    assert [lp for _, lp, _ in events[0].prompt_logprobs] == [lp for _, lp, _ in first]
    assert all(alts == [] for _, _, alts in events[0].prompt_logprobs[1:])
    while engine.has_work():
        engine.step()
    assert engine.stats()["slots_used"] == 0


def test_prompt_logprobs_skip_the_prefix_cache():
    """A prompt whose K/V the prefix cache holds is still computed whole when its log-probabilities are wanted."""
    model, tok = lively_tiny()
    engine = Engine(model, tok, EngineConfig(max_model_len=160, max_num_seqs=4, max_prefill_chunk=64))
    ids = tok(" ".join(PROMPTS)).input_ids[:48]
    collect(engine, GenerationRequest("warm", ids, SamplingParams(max_tokens=1, temperature=0.0)))
    events = collect(engine, GenerationRequest("p", ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)))
    assert events[-1].cached_tokens == 0 and len(events[0].prompt_logprobs) == 48
    assert collect(engine, GenerationRequest("again", ids, SamplingParams(max_tokens=1, temperature=0.0)))[-1].cached_tokens > 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_adapter(remix.tiny_model()[0], tmp_path_factory.mktemp("a") / "alpha", 1, 4, 2, 4)
    srv = LiveServer(["--adapter", f"alpha={path}", "--max-model-len", "128", "--max-num-seqs", "4"])
    yield srv
    srv.stop()


def test_echo_logprobs_score_the_prompt_over_http(server):
    """What evaluation harnesses send to score a continuation: echo + logprobs with max_tokens 0 (and 1)."""
    prompt = "The capital of France is Paris"
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 0,
                                                         "echo": True, "logprobs": 1, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
    n = r.json()["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == prompt and lp["text_offset"][0] == 0
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 and math.isfinite(v) for v in lp["token_logprobs"][1:])
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])
    # one generated token more: the prompt's entries are the same, then the new token's
    r1 = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 1,
                                                          "echo": True, "logprobs": 1, "temperature": 0}, timeout=60).json()
    lp1 = r1["choices"][0]["logprobs"]
    assert lp1["token_logprobs"][:n] == lp["token_logprobs"] and len(lp1["tokens"]) == n + 1
    assert r1["choices"][0]["text"].startswith(prompt)
    # streamed: the prompt's entries come in the first chunk
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "alpha", "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 0, "stream": True}) as s:
        chunks = [line[6:] for line in s.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    first = json.loads(chunks[0])["choices"][0]
    assert first["text"].startswith(prompt) and len(first["logprobs"]["tokens"]) >= n
    # text_offset runs on across the chunks, as in the whole response
    streamed = [json.loads(c)["choices"][0]["logprobs"] for c in chunks]
    offsets = [o for lp in streamed if lp for o in lp["text_offset"]]
    tokens = [t for lp in streamed if lp for t in lp["tokens"]]
    assert len(tokens) == n + 2 and offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_vllm_prompt_logprobs_over_http(server):
    """vLLM's prompt_logprobs N: per prompt token (None for the first) its log p and rank and the top N, each with its
    rank and text - on a completion's choice, or on a chat response - and the choices' own logprobs untouched."""
    prompt = "The capital of France is Paris"
    body = {"model": "alpha", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    scored = httpx.post(server.url + "/v1/completions", json={**body, "echo": True, "logprobs": 2}, timeout=60).json()
    lps = scored["choices"][0]["logprobs"]
    r = httpx.post(server.url + "/v1/completions", json={**body, "prompt_logprobs": 2, "logprobs": 1,
                                                         "return_token_ids": True}, timeout=60).json()
    choice = r["choices"][0]
    plp, ids = choice["prompt_logprobs"], choice["prompt_token_ids"]
    assert plp[0] is None and len(plp) == len(ids) == r["usage"]["prompt_tokens"]
    assert len(choice["logprobs"]["tokens"]) == 2  # (no prompt entries mixed into the choice's logprobs)
    for j in range(1, len(ids)):
        mine = plp[j][str(ids[j])]
        assert math.isclose(mine["logprob"], lps["token_logprobs"][j], abs_tol=1e-6) and mine["rank"] >= 1
        ranked = sorted((v["rank"], v["logprob"]) for v in plp[j].values())  # (the token's own, where not top 2)
        assert [rank for rank, _ in ranked][:2] == [1, 2] and ranked[0][1] >= ranked[1][1] and len(ranked) <= 3
        assert (mine["rank"] == 1) == (max(lps["top_logprobs"][j].values()) == lps["token_logprobs"][j])
        assert mine["decoded_token"] == lps["tokens"][j]
    # chat: on the response, once; streamed, with the first chunk
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 1}
    c = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert len(c["prompt_logprobs"]) == c["usage"]["prompt_tokens"] and c["prompt_logprobs"][0] is None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert [i for i, ch in enumerate(chunks) if "prompt_logprobs" in ch] == [0]
    assert chunks[0]["prompt_logprobs"] == c["prompt_logprobs"]
