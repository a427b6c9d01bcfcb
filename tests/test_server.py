"""A live server (uvicorn on a free local port, tiny base) driven by the official openai client."""

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import remix
from tests.helpers import LiveServer, drop_streams, wait_idle, write_adapter

KEY = "test-key"


def make_adapter(path, seed=0, n=4, k=2, r=4):
    return write_adapter(remix.tiny_model()[0], path, seed, n, k, r)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_adapter(root / "alpha", 1), "beta": make_adapter(root / "beta", 2, n=6, k=3)}


@pytest.fixture(scope="module")
def server(adapters):
    srv = LiveServer(["--adapter", f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}",
                      "--api-key", KEY, "--max-model-len", "256", "--max-num-seqs", "8",
                      "--allowed-origins", "http://app.example"])
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completion(client):
    r = client.completions.create(model="alpha", prompt="Hello there", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == "alpha" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len("Hello there".encode()) and 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openais_platform_fields_are_accepted_and_checked(client, server):
    """store, metadata, service_tier, prompt_cache_key and safety_identifier, which OpenAI's SDK and agent frameworks
    send, are accepted on chat (not used: the same text as without them); metadata is held to OpenAI's limits
    there and on the Responses endpoint."""
    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="alpha", messages=messages, max_tokens=6, temperature=0)
    r = client.chat.completions.create(model="alpha", messages=messages, max_tokens=6, temperature=0, store=True,
                                       metadata={"team": "search"}, service_tier="auto", prompt_cache_key="sys-v1",
                                       safety_identifier="user-123")
    assert r.choices[0].message.content == plain.choices[0].message.content
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in (("/v1/chat/completions", {"messages": messages}), ("/v1/responses", {"input": "hi"})):
        for metadata in ({str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
            bad = httpx.post(server.url + path, json={"model": "alpha", "metadata": metadata, **body}, headers=headers)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata", bad.text
    bad = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                     json={"model": "alpha", "messages": messages, "service_tier": "fastest"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "service_tier", bad.text


def test_penalties_and_logit_bias(client):
    """OpenAI's logit_bias (token ids as strings) and penalties reach the sampler: +100 forces a token, on both
    endpoints; the penalties are accepted in OpenAI's range (their arithmetic: tests/test_penalties.py)."""
    tok = remix.tiny_model()[1]
    forced = tok.convert_tokens_to_ids(tok.tokenize("q"))[0]
    r = client.completions.create(model="alpha", prompt="Hello there", max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "q" * 4
    c = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0.8, seed=3, logit_bias={str(forced): 100}, presence_penalty=-1.0,
                                       frequency_penalty=0.5, extra_body={"ignore_eos": True, "repetition_penalty": 1.2})
    assert c.choices[0].message.content == "q" * 3
    # vLLM's min_tokens and stop_token_ids: the forced token is banned for two tokens, then ends the completion
    r = client.completions.create(model="alpha", prompt="Hello there", max_tokens=8, temperature=0,
                                  logit_bias={str(forced): 100},
                                  extra_body={"ignore_eos": True, "min_tokens": 2, "stop_token_ids": [forced]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3 and "q" not in r.choices[0].text


def test_structured_output(server, client):
    """OpenAI's response_format (json_schema, json_object) and vLLM's guided_choice / guided_regex over HTTP."""
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    c = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                       temperature=0.8, seed=1,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
    doc = json.loads(c.choices[0].message.content)
    assert set(doc) == {"n", "ok"} and isinstance(doc["n"], int) and isinstance(doc["ok"], bool)
    r = client.completions.create(model="beta", prompt="x", max_tokens=20, temperature=1.0, seed=2, n=3,
                                  extra_body={"guided_choice": ["red", "green"]})
    assert {ch.text for ch in r.choices} <= {"red", "green"} and all(ch.finish_reason == "stop" for ch in r.choices)
    r = client.completions.create(model="alpha", prompt="x", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": "[a-c]{4}!"})
    assert re.fullmatch("[a-c]{4}!", r.choices[0].text)
    obj = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                         temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")
    # vLLM's structured_outputs (since v0.12) and its older guided_json / guided_grammar, as its clients send them
    c = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                       temperature=0.8, seed=3, extra_body={"structured_outputs": {"json": schema}})
    assert set(json.loads(c.choices[0].message.content)) == {"n", "ok"}
    r = client.completions.create(model="alpha", prompt="x", max_tokens=40, temperature=0.8, seed=4,
                                  extra_body={"guided_json": json.dumps(schema)})
    assert set(json.loads(r.choices[0].text)) == {"n", "ok"}
    for extra in ({"structured_outputs": {"grammar": 'root ::= "v" [0-9] "." [0-9]'}},
                  {"structured_outputs": {"grammar": 'start: "v" /[0-9]/ "." /[0-9]/'}},
                  {"guided_grammar": 'root ::= "v" [0-9] "." [0-9]'},
                  {"structured_outputs": {"regex": "v[0-9][.][0-9]"}}):
        r = client.completions.create(model="beta", prompt="x", max_tokens=20, temperature=1.0, seed=5, extra_body=extra)
        assert re.fullmatch(r"v[0-9]\.[0-9]", r.choices[0].text) and r.choices[0].finish_reason == "stop", extra
    r = client.completions.create(model="alpha", prompt="x", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert r.choices[0].text in ("up", "down")
    for body, param in (({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
                         "response_format"),
                        ({"response_format": {"type": "json_schema"}}, "response_format"),
                        ({"guided_regex": "(unclosed"}, "guided_regex"),
                        ({"guided_choice": []}, "guided_choice"),
                        ({"guided_choice": ["a"], "guided_regex": "a"}, None),
                        ({"structured_outputs": {"grammar": 'root ::= "a" missing'}}, "structured_outputs.grammar"),
                        ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs.json"),
                        ({"structured_outputs": {"json": "{nope"}}, "structured_outputs.json"),
                        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
                        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
                         "structured_outputs.whitespace_pattern"),
                        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
                        ({"structured_outputs": {"regex": "a", "typo": 1}}, "structured_outputs.typo"),
                        ({"guided_json": "[1]"}, "guided_json"),
                        ({"guided_grammar": "start: ("}, "guided_grammar")):
        bad = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": "alpha", "prompt": "x", **body})
        assert bad.status_code == 400, bad.text
        if param:
            assert (bad.json()["error"]["param"] or "").startswith(param), bad.json()


def test_vllm_sampling_and_output_extras(server, client):
    """vLLM's include_stop_str_in_output, skip_special_tokens, allowed_token_ids, bad_words, truncate_prompt_tokens /
    truncation_side, return_tokens_as_token_ids and return_token_ids (streamed and not), as its clients send them."""
    def complete(**extra):
        kw = {k: extra.pop(k) for k in ("prompt", "max_tokens", "logprobs", "echo", "stop") if k in extra}
        kw.setdefault("prompt", "Hello there")
        return client.completions.create(model="alpha", temperature=0, **{"max_tokens": 12, **kw}, extra_body=extra)

    plain = complete(return_token_ids=True, ignore_eos=True)
    ids, text = plain.choices[0].token_ids, plain.choices[0].text
    assert len(ids) == 12 and plain.choices[0].prompt_token_ids == list(b"Hello there")
    # the stop string that ended the text stays in it
    stop = text[3:5]
    cut = complete(stop=[stop], ignore_eos=True)
    kept = complete(stop=[stop], ignore_eos=True, include_stop_str_in_output=True)
    assert cut.choices[0].text == text[: text.find(stop)] and kept.choices[0].text == text[: text.find(stop) + 2]
    # special tokens' text: left out by default, kept with skip_special_tokens false
    special = complete(allowed_token_ids=[257], ignore_eos=True, max_tokens=2, return_token_ids=True)
    assert special.choices[0].token_ids == [257, 257] and special.choices[0].text == ""
    shown = complete(allowed_token_ids=[257], ignore_eos=True, max_tokens=2, skip_special_tokens=False)
    assert shown.choices[0].text == "<|im_start|>" * 2
    # only allowed ids, greedy and sampled
    allowed = sorted({ids[0], ids[1], 120, 121})
    r = client.completions.create(model="beta", prompt="x", max_tokens=16, temperature=1.2, seed=3,
                                  extra_body={"allowed_token_ids": allowed, "return_token_ids": True, "ignore_eos": True})
    assert set(r.choices[0].token_ids) <= set(allowed)
    # a bad word is never completed (its first token may come; the one after it may not follow)
    word = bytes(ids[:2]).decode("latin-1")  # (the tiny tokenizer: a token a byte)
    banned = complete(bad_words=[word], ignore_eos=True, return_token_ids=True).choices[0].token_ids
    assert banned[0] == ids[0] and all(banned[j:j + 2] != ids[:2] for j in range(len(banned) - 1))
    # truncation: the last (or first) k prompt tokens; echo shows the prompt as computed
    t = complete(prompt="abcdefghij", truncate_prompt_tokens=4, echo=True, max_tokens=2, return_token_ids=True)
    assert t.usage.prompt_tokens == 4 and t.choices[0].prompt_token_ids == list(b"ghij")
    assert t.choices[0].text.startswith("ghij")
    right = complete(prompt="abcdefghij", truncate_prompt_tokens=4, truncation_side="right", max_tokens=1,
                     return_token_ids=True)
    assert right.choices[0].prompt_token_ids == list(b"abcd")
    huge = "word " * 60_000  # past any context's characters: refused, unless truncated
    assert complete(prompt=huge, truncate_prompt_tokens=-1, max_tokens=6).usage.prompt_tokens == 250
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": huge}], max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 100, "return_token_ids": True})
    assert chat.usage.prompt_tokens == 100 and len(chat.model_extra["prompt_token_ids"]) == 100
    # logprobs naming tokens by id
    lp = complete(logprobs=2, return_tokens_as_token_ids=True, return_token_ids=True).choices[0]
    assert lp.logprobs.tokens == [f"token_id:{i}" for i in lp.token_ids]
    assert all(all(k.startswith("token_id:") for k in top) for top in lp.logprobs.top_logprobs)
    offsets = []  # streamed: text_offset still counts the text (a token's id names it, not its length)
    for chunk in client.completions.create(model="alpha", prompt="Hello there", max_tokens=12, temperature=0, logprobs=2,
                                           stream=True, extra_body={"return_tokens_as_token_ids": True}):
        offsets += chunk.choices[0].logprobs.text_offset if chunk.choices and chunk.choices[0].logprobs else []
    assert offsets == lp.logprobs.text_offset == complete(logprobs=2).choices[0].logprobs.text_offset
    c = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=1,
                                       extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    assert [e.token for e in c.choices[0].logprobs.content] == [f"token_id:{i}" for i in c.choices[0].token_ids]
    # streamed: the prompt's ids once, the generated ones add up to the whole
    for chat_mode in (False, True):
        kw = dict(model="alpha", max_tokens=12, temperature=0, stream=True,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
        stream = (client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw) if chat_mode
                  else client.completions.create(prompt="Hello there", **kw))
        got, prompts = [], []
        for chunk in stream:
            for ch in chunk.choices:
                got += ch.model_extra["token_ids"]
                if not chat_mode and ch.model_extra.get("prompt_token_ids") is not None:
                    prompts.append(ch.model_extra["prompt_token_ids"])
            if chat_mode and chunk.model_extra.get("prompt_token_ids") is not None:
                prompts.append(chunk.model_extra["prompt_token_ids"])
        assert len(got) == 12 and len(prompts) == 1
        if not chat_mode:
            assert got == ids and prompts == [list(b"Hello there")]
    # cache_salt: the prefix cache shared only among requests of one salt
    opening = "salted opening " * 5
    cached = [complete(prompt=opening + tail, max_tokens=1, cache_salt=salt).usage.prompt_tokens_details.cached_tokens
              for tail, salt in (("one", "s1"), ("two", "s1"), ("three", "s2"), ("four", None))]
    assert cached[0] == 0 and cached[1] >= 64 and cached[2] == 0 and cached[3] == 0
    # refused, naming the field
    auth = {"Authorization": f"Bearer {KEY}"}
    for body, param in (({"truncate_prompt_tokens": 257}, "truncate_prompt_tokens"),
                        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                        ({"allowed_token_ids": []}, "allowed_token_ids"),
                        ({"allowed_token_ids": [100_000]}, "allowed_token_ids"),
                        ({"allowed_token_ids": [5], "guided_regex": "a+"}, "allowed_token_ids"),
                        ({"bad_words": [" "]}, "bad_words"),
                        ({"truncation_side": "middle"}, "truncation_side"),
                        ({"cache_salt": ""}, "cache_salt")):
        bad = httpx.post(server.url + "/v1/completions", headers=auth, json={"model": "alpha", "prompt": "x", **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (body, bad.text)
    assert httpx.post(server.url + "/v1/completions", headers=auth,
                      json={"model": "alpha", "prompt": huge}).json()["error"]["code"] == "context_length_exceeded"


def test_tokenize_and_detokenize(server, client):
    """vLLM's /tokenize and /detokenize: the same ids the completion and chat endpoints count as prompt tokens."""
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/tokenize", json={"model": "alpha", "prompt": "Hello there"}, headers=auth).json()
    done = client.completions.create(model="alpha", prompt="Hello there", max_tokens=1, temperature=0)
    assert r["count"] == len(r["tokens"]) == done.usage.prompt_tokens and r["max_model_len"] == 256
    assert len(r["token_strs"]) == r["count"]
    back = httpx.post(server.url + "/detokenize", json={"model": "alpha", "tokens": r["tokens"]}, headers=auth).json()
    assert back == {"prompt": "Hello there"}
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}, headers=auth).json()
    used = client.chat.completions.create(model="alpha", messages=messages, max_tokens=1, temperature=0)
    assert chat["count"] == used.usage.prompt_tokens
    for path, body, param in (("/tokenize", {"prompt": "x", "messages": messages}, None),
                              ("/tokenize", {}, None),
                              ("/tokenize", {"model": "nope", "prompt": "x"}, "model"),
                              ("/detokenize", {"tokens": [-1]}, "tokens")):
        bad = httpx.post(server.url + path, json=body, headers=auth)
        assert bad.status_code in (400, 404) and "error" in bad.json(), bad.text
        if param:
            assert bad.json()["error"]["param"] == param
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401  # behind the API key


def test_health_reports_where_the_model_runs(server):
    """--device defaults to auto: the first CUDA device where torch sees one (this suite then serves from it), else the CPU."""
    import torch

    from server.cli import resolve_dtype

    health = httpx.get(server.url + "/health", timeout=10).json()  # --dtype defaults to auto too
    assert health["status"] == "ok" and health["dtype"] == str(resolve_dtype("auto")).removeprefix("torch.")
    assert health["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_prompt_forms(server, client):
    r = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    r = client.completions.create(model="tiny", prompt=[104, 105], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 2
    r = client.completions.create(model="tiny", prompt=[[104, 105], [106]], max_tokens=2, temperature=0)
    assert len(r.choices) == 2
    # null is OpenAI's "not given" for every optional field (clients such as LangChain's send it): the default applies
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": "one", "max_tokens": None, "ignore_eos": True,
                                          "temperature": None, "n": None, "echo": None, "stream": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 2, "top_p": None, "logprobs": None, "stream": None,
                                               "parallel_tool_calls": None, "presence_penalty": None})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    r = _post(server, "/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 2, "stream": None,
                                        "store": None, "top_k": None})
    assert r.status_code == 200 and r.json()["object"] == "response", r.text
    r = _post(server, "/v1/completions", {"model": None, "prompt": "one"})  # a required field's null still fails
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_streaming_with_usage(client):
    stream = client.completions.create(model="beta", prompt="Stream me", max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    whole = client.completions.create(model="beta", prompt="Stream me", max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_min_p_samples_only_the_likely_tokens(client):
    """min_p 1.0 keeps only the most likely token (and its ties): at temperature 1 the same text as greedy."""
    greedy = client.completions.create(model="alpha", prompt="Hello", max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    for seed in (1, 2):
        r = client.completions.create(model="alpha", prompt="Hello", max_tokens=8, temperature=1.0, seed=seed,
                                      extra_body={"min_p": 1.0, "ignore_eos": True})
        assert r.choices[0].text == greedy


def test_continuous_usage_stats_count_as_they_go(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far; the last equals the final."""
    chunks = list(client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Count"}], max_tokens=6, temperature=0.7, n=2, seed=1,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))
    final = chunks[-1].usage
    assert not chunks[-1].choices and final.completion_tokens == 12  # the usage chunk: 2 choices x 6 tokens
    progress = [c.usage.completion_tokens for c in chunks[:-1]]
    assert all(c.usage is not None and c.usage.prompt_tokens == final.prompt_tokens for c in chunks)
    assert progress == sorted(progress) and progress[-1] == 12 and progress[0] <= 2
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


def test_n2_logprobs_echo(client):
    r = client.completions.create(model="alpha", prompt="abc", max_tokens=5, temperature=0, n=2, logprobs=3, echo=True,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.text.startswith("abc")
        lp = c.logprobs
        # with echo, OpenAI's legacy form: the prompt's tokens first (the very first without a log-probability)
        assert lp.tokens[:3] == ["a", "b", "c"] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == 8 and len(lp.token_logprobs) == 8 and all(len(t) == 3 for t in lp.top_logprobs[1:])
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        assert lp.text_offset[:4] == [0, 1, 2, 3]
        assert max(lp.top_logprobs[3].values()) >= lp.token_logprobs[3] - 1e-6  # greedy picks the top token
    assert r.choices[0].text == r.choices[1].text  # greedy: both sequences agree


def test_best_of_returns_the_n_best_by_mean_token_logprob(client):
    """best_of 4, n 2: the same four seeded sequences as n 4 are generated, and the two of highest mean log-probability
    per token come back, best first, as choices 0 and 1; usage counts all four. Streaming it or best_of < n: 400."""
    kw = dict(model="beta", prompt="random", max_tokens=8, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    four = client.completions.create(n=4, logprobs=0, **kw)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in four.choices]
    order = sorted(range(4), key=lambda i: (-means[i], i))
    assert len(set(c.text for c in four.choices)) > 1  # (sampled: the sequences differ, so the ranking is tested)
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert [c.text for c in best.choices] == [four.choices[i].text for i in order[:2]]
    assert best.usage.completion_tokens == four.usage.completion_tokens == 32
    shown = client.completions.create(n=1, best_of=4, logprobs=1, **kw).choices
    assert len(shown) == 1 and shown[0].text == four.choices[order[0]].text and len(shown[0].logprobs.tokens) == 8
    for bad in ({"best_of": 3, "stream": True}, {"best_of": 1, "n": 2}):
        r = httpx.post(client.base_url.join("completions").__str__(), headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "beta", "prompt": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text


def test_stop(client):
    full = client.completions.create(model="alpha", prompt="xyz", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:6]
    r = client.completions.create(model="alpha", prompt="xyz", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kw = dict(model="beta", prompt="random", max_tokens=12, temperature=1.0, top_p=0.95, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c


def test_chat_and_chat_stream(client):
    msgs = [{"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="alpha", messages=msgs, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_models(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "alpha", "beta"}
    beta = models["beta"].model_dump()
    assert beta["parent"] == "tiny" and beta["adapter"]["n"] == 6 and beta["adapter"]["k"] == 3 and beta["adapter"]["r"] == 4
    assert client.models.retrieve("beta").model_dump() == beta  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_request_ids_and_cors(server):
    """X-Request-Id: the client's echoed, else a fresh one per response (streams too); CORS for --allowed-origins."""
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(server.url + "/v1/models", headers={**auth, "X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    ids = {httpx.get(server.url + "/health").headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    with httpx.stream("POST", server.url + "/v1/completions", headers={**auth, "X-Request-Id": "s-1"},
                      json={"model": "alpha", "prompt": "hi", "max_tokens": 2, "stream": True}) as s:
        assert s.headers["x-request-id"] == "s-1" and s.read().endswith(b"data: [DONE]\n\n")
    pre = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(server.url + "/v1/models", headers={**auth, "Origin": "http://app.example"})
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(server.url + "/v1/models", headers={**auth, "Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers


def _post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers={**headers, "content-type": "application/json"}, timeout=30)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("body,param", [
    ({"model": "alpha", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "alpha", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "n": 100}, "n"),
    ({"model": "alpha", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "alpha", "prompt": "x", "bogus": 1}, "bogus"),
    ({"model": "alpha", "prompt": ""}, "prompt"),
    ({"model": "alpha", "prompt": [[99999]]}, "prompt"),
    ({"model": "alpha", "prompt": "x" * 200, "max_tokens": 100}, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "stop": ["a"] * 20}, "stop"),
    ({"model": "alpha", "prompt": "x", "priority": 10**7}, "priority"),
    ({"prompt": "x"}, "model"),
    ({"model": "alpha", "prompt": "x", "n": 9}, "n"),  # more than the server's 8 slots
    ({"model": "alpha", "prompt": "x", "n": 2, "best_of": 9}, "best_of"),
])
def test_bad_input_is_400_with_param(server, body, param):
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].startswith(param), err
    assert _post(server, "/v1/completions", {"model": "alpha", "prompt": "ok", "max_tokens": 2, "priority": -3}).status_code == 200


def test_prompts_encoded_on_worker_threads_at_once_all_answer(server):
    """Prompts are encoded off the event loop, on worker threads (/tokenize on a copy of the tokenizer): many at
    once, mixed, every one answers 200 (a fast tokenizer shared by threads can fail with "Already borrowed")."""
    from concurrent.futures import ThreadPoolExecutor

    words = ["alpha", "beta", "émigré", "中文", "x" * 9]

    def one(i):
        text = " ".join(words[(i + j) % len(words)] for j in range(4 + i % 12))  # (under the 256-token context)
        path, body = [("/tokenize", {"prompt": text}),
                      ("/tokenize", {"messages": [{"role": "user", "content": text}]}),
                      ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": text}], "max_tokens": 1}),
                      ("/v1/completions", {"model": "beta", "prompt": [text, text[::-1]], "max_tokens": 1})][i % 4]
        return _post(server, path, body).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes == [200] * 64, [(i, c) for i, c in enumerate(codes) if c != 200]


@pytest.mark.parametrize("path,body,param", [
    # the server's context is 256 tokens; the tiny model's tokenizer takes a byte a token
    ("/v1/completions", {"model": "alpha", "prompt": "x" * 300, "max_tokens": 4}, "prompt"),  # the prompt alone
    ("/v1/completions", {"model": "alpha", "prompt": "x" * 200, "max_tokens": 100}, "max_tokens"),  # with max_tokens
    ("/v1/completions", {"model": "alpha", "prompt": "x" * 5_000_000}, "prompt"),  # refused before it is tokenized
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 4},
     "messages"),  # (it had blamed max_tokens, with a plain invalid_request code)
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "system", "content": "x" * 2_500_000},
                                                             {"role": "user", "content": [{"type": "text", "text": "y" * 2_500_000}]}]},
     "messages"),  # refused before the template and the tokenizer see it (a 10 MB chat had held the event loop ~4 s)
    ("/v1/responses", {"model": "alpha", "input": "x" * 300, "max_output_tokens": 4}, "input"),
])
def test_a_prompt_past_the_context_is_400_context_length_exceeded(server, path, body, param):
    """OpenAI's code for it, naming what is too long: the prompt (messages, input) where it alone does not fit,
    max_tokens where the two together do not."""
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, "context_length_exceeded"), err
    assert "256 tokens" in err["message"], err


@pytest.mark.slow
def test_the_prompt_bound_never_refuses_a_prompt_that_fits(default_base):
    """prompt_char_bound's premise: a token's string is at least as long as the text it decodes to, so a text of
    more characters than max_model_len of the longest token cannot fit - checked on texts of every kind of character
    for the tiny model's byte tokenizer and the default base's byte-level BPE."""
    from server.app import prompt_char_bound
    from remix.models.tiny import tiny_tokenizer

    texts = ["plain words and more words " * 40, "ünïcödé " * 50, "中文的文本" * 60, "\U0001F600 emoji " * 30,
             " " * 500, "\n\n\t" * 100, "x" * 1000, "def f(x):\n    return x ** 2\n" * 20]
    for tok in (tiny_tokenizer(), default_base[1]):
        bound = prompt_char_bound(tok, 1)  # the longest token's characters
        for text in texts:
            ids = tok(text, add_special_tokens=False).input_ids
            assert len(text) <= bound * len(ids), (text[:20], len(text), bound, len(ids))
        assert prompt_char_bound(tok, 256) == 256 * bound


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "alpha", "prompt": "\ud800 x"}, "prompt"),
    ("/v1/completions", {"model": "alpha", "prompt": ["ok", "x\udc00"]}, "prompt.1"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "stop": ["\udfff"]}, "stop.0"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "messages.0.content.0.text"),
    ("/v1/responses", {"model": "alpha", "input": "\ud800"}, "input"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
])
def test_a_lone_surrogate_is_400_naming_where(server, path, body, param):
    """JSON's \\u escapes can carry half of a surrogate pair, which no tokenizer encodes (it was a 500)."""
    r = _post(server, path, None, raw=json.dumps(body))  # (json.dumps escapes it as \ud800, as a client would send it)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: not valid Unicode: it holds a lone surrogate")
    ok = {"model": "alpha", "messages": [{"role": "user", "content": "\U0001F600"}], "max_tokens": 1}
    assert _post(server, "/v1/chat/completions", None, raw=json.dumps(ok)).status_code == 200  # (sent as a whole pair)


def test_malformed_json_auth_and_unknown_model(server):
    r = _post(server, "/v1/completions", None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = _post(server, "/v1/completions", {"model": "alpha", "prompt": "x"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = _post(server, "/v1/completions", {"model": "alpha", "prompt": "x"}, key="wrong")
    assert r.status_code == 401
    body = {"model": "alpha", "prompt": "x", "max_tokens": 1}
    for header, status in ((f"bearer {KEY}", 200), (f"BEARER  {KEY}", 200),  # the scheme in any case (RFC 9110)
                           (f"Basic {KEY}", 401), (KEY, 401), (f"Bearer {KEY}x", 401), (f"Bearer {KEY[:-1]}", 401)):
        r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": header}, timeout=30)
        assert r.status_code == status, (header, r.text)
    r = _post(server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def _selections(server):
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "remix_lora_selections":
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = (s.labels["adapter"], s.labels["layer"], s.labels["module"])
                    out[key] = out.get(key, 0) + s.value
    return out, text


def test_metrics_count_k_selections_per_token(server, client):
    before, _ = _selections(server)
    r = client.completions.create(model="beta", prompt="count me", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    after, text = _selections(server)
    tokens = r.usage.prompt_tokens + r.usage.completion_tokens - 1  # the last sampled token is never fed back
    beta = {key: after[key] - before.get(key, 0) for key in after if key[0] == "beta"}
    assert len(beta) == 6  # 2 layers x gate/up/down
    assert all(delta == 3 * tokens for delta in beta.values()), beta  # k = 3
    assert all(after[key] == before.get(key, 0) for key in after if key[0] == "alpha")
    for name in ("remix_time_to_first_token_seconds", "remix_inter_token_latency_seconds", "remix_e2e_request_latency_seconds",
                 "remix_requests_running", "remix_requests_waiting", "remix_kv_cache_usage_ratio",
                 "remix_prompt_tokens_total", "remix_generation_tokens_total", "remix_requests_finished_total",
                 "remix_effective_loras"):
        assert name in text, name


def test_effective_loras_after_counters_start_again():
    """Between two scrapes an adapter's counters start again (another adapter loaded under its name): the layer's
    effective number of LoRAs comes from the new counts, not from differences of which some are negative."""
    import math

    from server.metrics import RoutingCollector

    scrapes = iter([{"x": {"model.layers.0.mlp.up_proj": [10, 10, 0, 0]}},
                    {"x": {"model.layers.0.mlp.up_proj": [12, 2, 4, 4]}}])

    class Stub:
        class registry:
            selection_counts = staticmethod(lambda: next(scrapes))

    collector = RoutingCollector(Stub(), window_s=60.0)
    list(collector.collect())
    families = {f.name: f for f in collector.collect()}
    (sample,) = families["remix_effective_loras"].samples
    shares = [c / 22 for c in (12, 2, 4, 4)]
    assert sample.value == pytest.approx(math.exp(-sum(p * math.log(p) for p in shares)), rel=1e-5)


def test_prefix_cache_in_usage_and_metrics(server, client):
    """A prompt sent again takes its whole blocks from the cache: OpenAI's usage.prompt_tokens_details.cached_tokens
    says how many, the same text comes back, and the prefix cache counters grow."""
    prompt = "A long opening that every request of this app sends first, then a question:"  # 78 bytes: 4 blocks
    first = client.completions.create(model="alpha", prompt=prompt, max_tokens=6, temperature=0)
    again = client.completions.create(model="alpha", prompt=prompt, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == len(prompt.encode())
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 64 and again.choices[0].text == first.choices[0].text
    counters = {f.name: f.samples[0].value for f in text_string_to_metric_families(
        httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text)
        if f.name.startswith("remix_prefix_cache")}
    assert counters["remix_prefix_cache_tokens"] >= 64 and counters["remix_prefix_cache_hits"] >= 1
    assert counters["remix_prefix_cache_queries"] >= 2


def test_dropped_streams_free_everything(server):
    drop_streams(server.url, 50, lambda i: {"model": "alpha", "prompt": f"stream {i}", "max_tokens": 200, "stream": True,
                                            "ignore_eos": True}, headers={"Authorization": f"Bearer {KEY}"})
    h = wait_idle(server.url)
    assert (h["running"], h["waiting"], h["slots_used"], h["kv_tokens_used"]) == (0, 0, 0, 0), h


def _inbox_run(eager: bool, disconnect_after: float | None, events: int, gap: float):
    """An _Inbox fed ``events`` events (the last one finished) from another thread every ``gap`` s, read on an event
    loop by a reader whose client goes away ``disconnect_after`` s in (None: never). Returns what the reader got (or
    "disconnected" and when) and how many times the engine's thread woke the loop."""
    from types import SimpleNamespace

    from server.app import _Disconnected, _Inbox

    async def main():
        loop = asyncio.get_running_loop()
        inbox = _Inbox(loop, eager=eager)
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(1), real(*a))[1]
        start = time.monotonic()

        class Request:
            async def is_disconnected(self):
                return disconnect_after is not None and time.monotonic() - start > disconnect_after

        stop = threading.Event()  # (the reader has gone: the engine cancels, as the app does)

        def engine():
            for n in range(events):
                if stop.wait(gap):
                    return
                inbox.put(n % 2, SimpleNamespace(n=n, finished=n == events - 1, error=None))

        feeder = threading.Thread(target=engine, daemon=True)
        feeder.start()
        got = []
        try:
            while not got or not got[-1][1].finished:
                i, ev, at = await inbox.get(Request())
                assert start <= at <= time.monotonic()
                got.append((i, ev))
        except _Disconnected:
            return "disconnected", time.monotonic() - start, len(wakes)
        finally:
            inbox.close()
            stop.set()
            feeder.join()
        return [(i, ev.n) for i, ev in got], len(wakes)

    return asyncio.run(main())


def test_an_inbox_hands_over_every_event_in_order_and_wakes_the_loop_once_for_a_whole_answer():
    got, wakes = _inbox_run(eager=False, disconnect_after=None, events=40, gap=0.002)
    assert got == [(n % 2, n) for n in range(40)]
    assert wakes == 1  # (the finished event; the ones before it wait in the inbox)
    got, wakes = _inbox_run(eager=True, disconnect_after=None, events=40, gap=0.002)
    assert got == [(n % 2, n) for n in range(40)]
    assert 1 <= wakes <= 40  # streamed: a wake-up for each event the loop had not yet been woken for


def test_a_whole_answer_notices_its_client_gone_while_tokens_still_come():
    # Tokens every 10 ms for 10 s and a client gone after 0.2 s: the reader looks every 0.5 s (the queue it replaced
    # waited for a 0.5 s gap between tokens that never came, so a hung-up client's answer ran to its end).
    for eager in (False, True):
        what, when, _ = _inbox_run(eager=eager, disconnect_after=0.2, events=1000, gap=0.01)
        assert what == "disconnected" and when < 1.5, (eager, when)


def test_live_adapter_load_and_unload(server, client, tmp_path):
    path = make_adapter(tmp_path / "gamma", 5)
    r = _post(server, "/v1/adapters", {"name": "gamma", "path": path})
    assert r.status_code == 200, r.text
    assert client.completions.create(model="gamma", prompt="hi", max_tokens=2).choices
    # a broken adapter is refused with every problem listed, and serving goes on
    (Path(path) / "adapter_model.safetensors").write_bytes(b"truncated")
    r = _post(server, "/v1/adapters", {"name": "broken", "path": path})
    assert r.status_code == 400 and "not a readable safetensors file" in r.json()["error"]["message"]
    r = _post(server, "/v1/adapters", {"name": "nowhere", "path": str(tmp_path / "missing")})
    assert r.status_code == 400
    # a name taken by the base model or a loaded adapter is refused, naming the field, before anything loads
    for name, said in (("tiny", "'tiny' is the base model's name"), ("gamma", "an adapter named 'gamma' is already loaded")):
        r = _post(server, "/v1/adapters", {"name": name, "path": path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name" and said in r.json()["error"]["message"]
    assert [m.id for m in client.models.list().data].count("tiny") == 1
    assert httpx.delete(server.url + "/v1/adapters/gamma", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert _post(server, "/v1/completions", {"model": "gamma", "prompt": "x"}).status_code == 404
    assert httpx.delete(server.url + "/v1/adapters/gamma").status_code == 401


def test_vllm_lora_endpoints_load_a_peft_adapter(server, client, tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, with a LoRA as peft saves it."""
    from tests.test_peft_format import write_peft

    pytest.importorskip("peft")
    write_peft(tmp_path / "p", seed=2)
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(tmp_path / "p")})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' added successfully.", r.text
    card = [m for m in client.models.list().data if m.id == "sql"][0]
    assert card.model_extra["adapter"]["format"] == "peft" and card.model_extra["adapter"]["router"] == "lora"
    scores = {m: client.completions.create(model=m, prompt="Hello", max_tokens=4, temperature=0, logprobs=0)
              .choices[0].logprobs.token_logprobs for m in ("sql", "tiny")}
    assert scores["sql"] != scores["tiny"]  # the adapter is applied
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(tmp_path / "p"), "load_inplace": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "load_inplace"
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path / "none")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(tmp_path / "p")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = _post(server, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert r.status_code == 200 and "removed" in r.text
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "sql"}).status_code == 404


def test_https_with_a_certificate_and_key(tmp_path):
    """--ssl-certfile / --ssl-keyfile: the server speaks TLS (a client that trusts the certificate completes a request;
    plain HTTP to the same port gets no answer)."""
    import ssl

    from tests.test_cli import self_signed

    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=cert)
    srv = LiveServer(["--ssl-certfile", cert, "--ssl-keyfile", key], verify=trust, log_level="info")
    try:
        # ignore_eos: the request samples (OpenAI's default temperature, no seed), and the tiny model's EOS, one token
        # of 272, had ended it after one token in one CI run
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3,
                                                          "ignore_eos": True}, verify=trust, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        with pytest.raises(httpx.HTTPError):  # (TLS only on this port)
            httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5)
        assert srv.url.startswith("https://") and f"on {srv.url}" in srv.output()
    finally:
        srv.stop()


def test_readme_curl_examples(server):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"<!-- curl-test -->\s*```bash\n(.*?)```", readme, re.S)
    assert blocks, "README has no curl examples marked for testing"
    for block in blocks:
        cmd = block.replace("\\\n", " ").strip().replace("http://localhost:8000", server.url)
        cmd = cmd.replace("$REMIX_API_KEY", KEY).replace("demo", "alpha")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        if out.stdout.strip().startswith("{"):
            assert json.loads(out.stdout).get("error") is None, out.stdout  # (a response object has "error": null)


def test_sigterm_drains_then_exits_zero(adapters):
    srv = LiveServer(["--adapter", f"alpha={adapters['alpha']}", "--drain-timeout", "30"])
    results = {}

    def long_request():
        r = httpx.post(srv.url + "/v1/completions", json={"model": "alpha", "prompt": "long", "max_tokens": 150,
                                                          "ignore_eos": True}, timeout=60)
        results["inflight"] = (r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None)

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.5)
    srv.proc.terminate()
    time.sleep(0.3)
    try:
        late = httpx.post(srv.url + "/v1/completions", json={"model": "alpha", "prompt": "late"}, timeout=5)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    except httpx.ConnectError:
        pass  # the drain finished before the late request arrived
    t.join(60)
    assert results["inflight"] == (200, 150)
    assert srv.proc.wait(60) == 0


def test_an_engine_thread_that_dies_fails_its_requests_and_health_says_so():
    """An error outside the step's own handler ends the engine thread: every waiting and running request ends with an
    error (none hangs), new ones are a 503 engine_stopped, and /health answers 503 so an orchestrator restarts it."""
    import threading

    from fastapi.testclient import TestClient

    from server.app import ServerState, create_app
    from server.engine import Engine, EngineConfig, EngineStopped, GenerationRequest, SamplingParams

    model, tok = remix.tiny_model()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=1, max_queue=4))
    state = ServerState(engine=engine, base_name="tiny")
    client = TestClient(create_app(state))
    ended = {}
    done = threading.Event()

    def on_event(e):
        if e.finished:
            ended[e.request_id] = (e.finish_reason, e.error)
            if len(ended) == 2:
                done.set()

    for rid in ("a", "b"):  # one runs (one slot), one waits
        engine.submit(GenerationRequest(rid, [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True)), on_event)
    real_step = engine.step
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 3:  # a few steps in, the thread's own bookkeeping breaks
            engine.has_work = None  # (the loop calls it outside the step's handler: a TypeError ends the thread)
        real_step()

    engine.step = step
    engine.start()
    assert done.wait(30), ended
    assert ended == {"a": ("error", "the engine stopped"), "b": ("error", "the engine stopped")}
    assert engine.stopped_by.startswith("TypeError")
    with pytest.raises(EngineStopped):
        engine.submit(GenerationRequest("c", [1], SamplingParams(max_tokens=2)), lambda e: None)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "engine_stopped" and r.json()["engine"] == "stopped"


def test_max_adapters_caps_what_loads(adapters, tmp_path):
    """--max-adapters: a load past it is a 400 naming the limit (nothing read), an unload makes room again, and a
    start with more adapters than it allows stops with a message."""
    from fastapi.testclient import TestClient

    from server.app import ServerState, create_app
    from server.engine import Engine, EngineConfig, EngineError

    model, tok = remix.tiny_model()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2, max_adapters=1))
    client = TestClient(create_app(ServerState(engine=engine, base_name="tiny")))
    assert client.post("/v1/adapters", json={"name": "a", "path": str(adapters["alpha"])}).status_code == 200
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["beta"])})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_limit", r.text
    assert "(--max-adapters 1)" in r.json()["error"]["message"] and r.json()["error"]["param"] == "lora_name"
    with pytest.raises(EngineError, match=r"^1 adapters are loaded.*\(--max-adapters 1\)") as e:  # (the Python API)
        engine.load_adapter("b", str(adapters["beta"]))
    assert e.value.code == "adapter_limit" and "b" not in engine.registry.adapters
    assert client.delete("/v1/adapters/a").status_code == 200
    assert client.post("/v1/adapters", json={"name": "b", "path": str(adapters["beta"])}).status_code == 200
    out = subprocess.run([sys.executable, "-m", "server", "--base", "tiny", "--max-adapters", "1", "--adapter",
                          f"a={adapters['alpha']}", "--adapter", f"b={adapters['beta']}"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "2 adapters to serve (--adapter, --adapter-dir), but --max-adapters is 1" in out.stderr


def test_queue_full_is_429_and_draining_is_503():
    from fastapi.testclient import TestClient

    from server.app import ServerState, create_app
    from server.engine import Engine, EngineConfig

    model, tok = remix.tiny_model()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2, max_queue=1))
    state = ServerState(engine=engine, base_name="tiny")
    client = TestClient(create_app(state))
    engine.submit(__import__("server.engine", fromlist=["x"]).GenerationRequest("hold", [1, 2], __import__(
        "server.engine", fromlist=["x"]).SamplingParams(max_tokens=2)), lambda e: None)  # the queue (size 1) is now full
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "1"  # (OpenAI's clients wait that long before they retry)
    # more prompts in one request than the queue holds could never be taken: a 400, not a 429 to retry
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["x", "y"], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "at most 1 prompts here (the server's --max-queue), got 2" in r.json()["error"]["message"]
    assert client.get("/ping").json() == {"status": "ok"} and client.post("/ping").status_code == 200
    assert client.get("/version").json() == {"version": remix.__version__}
    state.draining = True
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert client.get("/health").status_code == 503 and client.get("/ping").status_code == 503


def test_a_server_on_the_8bit_kv_cache(adapters):
    """--kv-cache-dtype int8 end to end: /health says so, completions and streamed chat with an adapter answer, the KV
    gauges are exported. (CPU only: elsewhere the flag is refused before anything loads.)"""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the 8-bit cache is CPU-only; --device auto would pick CUDA")
    srv = LiveServer(["--adapter", f"alpha={adapters['alpha']}", "--kv-cache-dtype", "int8", "--max-model-len", "128",
                      "--max-num-seqs", "4"])
    try:
        assert httpx.get(srv.url + "/health", timeout=10).json()["kv_cache_dtype"] == "int8"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model="alpha", prompt="Hello there", max_tokens=6, temperature=0)
        assert 1 <= r.usage.completion_tokens <= 6
        chunks = list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=5, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert "remix_kv_cache_slots " in metrics and "remix_kv_cache_usage_ratio" in metrics
    finally:
        assert srv.stop() == 0


def test_a_server_with_speculative_decoding(adapters):
    """--num-speculative-tokens end to end: greedy completions (streamed and not) are those of the server without it
    (the module's server; same flags otherwise), /health and /metrics count the drafts."""
    srv = LiveServer(["--adapter", f"alpha={adapters['alpha']}", "--num-speculative-tokens", "4",
                      "--max-model-len", "256", "--max-num-seqs", "8"])
    plain = LiveServer(["--adapter", f"alpha={adapters['alpha']}", "--max-model-len", "256", "--max-num-seqs", "8"])
    try:
        body = {"model": "alpha", "prompt": "a b c a b c a b c a b", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "logprobs": 1}
        got, want = (httpx.post(s.url + "/v1/completions", json=body, timeout=60).json() for s in (srv, plain))
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["choices"][0]["logprobs"]["token_logprobs"] == want["choices"][0]["logprobs"]["token_logprobs"]
        assert got["usage"]["completion_tokens"] == 24
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="alpha", prompt=body["prompt"], max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert streamed == want["choices"][0]["text"]
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert health["spec_draft_tokens"] >= health["spec_accepted_tokens"] > 0
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert re.search(r"^remix_spec_decode_accepted_tokens_total [1-9]", metrics, re.M)
        assert "remix_spec_decode_draft_tokens_total" not in httpx.get(plain.url + "/metrics", timeout=10).text
    finally:
        assert srv.stop() == 0 and plain.stop() == 0


def test_metrics_export_the_engines_huge_page_shares():
    """remix_huge_pages_ratio{block}: one series a block the engine measured (Engine.huge_pages, /health's
    *_on_huge_pages), none where it measured nothing (the tiny model's blocks hold no 2 MiB page), in the Prometheus
    text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import EngineCollector

    class Stub:
        def __init__(self, huge_pages, thread_shares=None):
            self.huge_pages, self.thread_shares = huge_pages, thread_shares

        def stats(self):
            return {"running": 0, "waiting": 0, "kv_usage": 0.0, "slots_used": 0, "slots": 4, "adapters_loaded": 0,
                    "adapters_giving_way": 0, "adapter_loads_on_demand": 0, "adapter_evictions": 0}

    registry = CollectorRegistry()
    registry.register(EngineCollector(Stub({"weights": 1.0, "kv_cache": 0.25}, [0.6, 0.4])))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {s.labels["block"]: s.value for s in families["remix_huge_pages_ratio"].samples}
    assert samples == {"weights": 1.0, "kv_cache": 0.25}
    shares = {s.labels["thread"]: s.value for s in families["remix_cpu_thread_share"].samples}
    assert shares == {"0": 0.6, "1": 0.4}
    bare = CollectorRegistry()
    bare.register(EngineCollector(Stub({})))
    text = generate_latest(bare).decode()
    assert "remix_huge_pages_ratio" not in text and "remix_cpu_thread_share" not in text


def test_health_and_metrics_report_the_cpu_threads_shares():
    """A CPU engine's stats (/health) give cpu_thread_shares, each thread's share of the compiled kernels' split work:
    one a thread, summing to 1, even until one thread measures slower for two windows in a row (shares fixed here by
    the kernels' test hook); the same values as Engine.thread_shares, which /metrics exports."""
    import torch

    from remix.kernels import cpu_ext
    from server.engine import Engine, EngineConfig

    ext = cpu_ext.load()
    if ext is None:
        pytest.skip("the compiled CPU kernels are not built here")
    model, tok = remix.tiny_model()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2))
    n = max(1, torch.get_num_threads())
    try:
        ext._split_fixed([])
        assert engine.stats()["cpu_thread_shares"] == pytest.approx([1 / n] * n, abs=1e-4)
        if n >= 2:
            ext._split_fixed([0.75] + [0.25 / (n - 1)] * (n - 1))
            assert engine.stats()["cpu_thread_shares"] == pytest.approx(engine.thread_shares)
            assert engine.thread_shares[0] == pytest.approx(0.75, abs=1e-3) and sum(engine.thread_shares) == pytest.approx(1, abs=1e-3)
    finally:
        ext._split_fixed([])


def test_request_bodies_past_the_limit_are_a_413_before_they_are_read():
    """--max-request-mb: a body whose Content-Length passes the limit is refused unread; one sent without a length
    (chunked) is read up to the limit and refused there; smaller ones, with or without a length, are served."""
    from fastapi.testclient import TestClient

    from server.app import ServerState, create_app
    from server.engine import Engine, EngineConfig

    model, tok = remix.tiny_model()
    engine = Engine(model, tok, EngineConfig(max_model_len=64, max_num_seqs=2))
    state = ServerState(engine=engine, base_name="tiny", max_body_bytes=2000)
    client = TestClient(create_app(state))
    engine.start()
    try:
        big = json.dumps({"model": "tiny", "prompt": "x" * 5000, "max_tokens": 2}).encode()
        small = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2}).encode()
        headers = {"content-type": "application/json"}
        r = client.post("/v1/completions", content=big, headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert r.json()["error"]["message"] == (f"the request body is {len(big) / (1 << 20):.3g} MB, over this server's "
                                                "limit of 0.00190735 MB (--max-request-mb)") and "X-Request-Id" in r.headers
        assert r.headers["connection"] == "close"  # (the rest of the body is not read)

        def pieces(body):  # (no Content-Length: sent chunked)
            for i in range(0, len(body), 700):
                yield body[i : i + 700]

        r = client.post("/v1/completions", content=pieces(big), headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert r.json()["error"]["message"].startswith("the request body passed this server's limit")
        for body in (small, pieces(small)):
            assert client.post("/v1/completions", content=body, headers=headers).status_code == 200
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics").text
        assert re.search(r'remix_http_errors_total\{status="413"\} 2\.0', metrics), metrics[:2000]
    finally:
        engine.stop()
