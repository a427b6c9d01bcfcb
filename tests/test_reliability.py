"""Bad input, abuse and failures: every case is a clear 4xx, nothing leaks, and the server keeps serving."""

import threading
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings

import remix
from tests.helpers import LiveServer, drop_streams, wait_idle
from tests.test_server import make_adapter


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    srv = LiveServer(["--adapter", f"alpha={make_adapter(root / 'alpha', 1)}", "--max-model-len", "128",
                      "--max-num-seqs", "8", "--max-queue", "64"])
    yield srv
    srv.stop()


def test_fuzz_against_own_openapi_schema_no_5xx(server):
    """schemathesis generates >= 1,000 requests (valid and invalid) from /openapi.json; none may get a 5xx."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    count, server_errors, adapter_calls = 0, [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = 40 if operation.path in ("/health", "/metrics", "/v1/models") else 250

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=operation.as_strategy())
        def check(case):
            nonlocal count
            response = case.call(base_url=server.url, timeout=30)
            count += 1
            if response.status_code >= 500:
                server_errors.append((case.method, case.path, response.status_code, response.text[:200]))
            if "adapter" in case.path and response.status_code < 300:  # (what changed the adapters, for a failure)
                adapter_calls.append((case.method, case.formatted_path, case.body, response.status_code))

        check()
    assert count >= 1000, count
    assert not server_errors, server_errors[:5]
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, (r.text, adapter_calls, server.output()[-4000:])


def post(server, body=None, raw=None, path="/v1/completions", headers=None):
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json", **(headers or {})}, timeout=30)
    return httpx.post(server.url + path, json=body, timeout=30)


@pytest.mark.parametrize("raw,param", [
    (b'{"model": "alpha", "prompt": "\xff\xfe bad utf-8"}', None),
    (b'{"model": "alpha", "prompt": ', None),
    (b'[1, 2, 3]', None),
])
def test_undecodable_bodies(server, raw, param):
    r = post(server, raw=raw)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert post(server, {"model": "alpha", "prompt": "fine", "max_tokens": 2}).status_code == 200


def test_wrong_urls_methods_and_bodies_say_what_would_work(server):
    r = httpx.post(server.url + "/completions", json={"model": "alpha", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", r.text
    assert "Invalid URL (POST /completions)" in r.json()["error"]["message"]
    assert "POST /v1/completions" in r.json()["error"]["message"]  # (the route it most likely meant)
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and "/v1" not in r.json()["error"]["message"] and "openapi.json" in r.text
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
    assert r.json()["error"] == {"message": "GET /v1/chat/completions is not allowed: this path takes POST",
                                 "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}
    for content, ctype, said in ((b"hello", "text/plain", "sent as Content-Type: application/json (this one is "
                                  "'text/plain')"), (b"null", "application/json", "must be a JSON object, not null"),
                                 (b"", "application/json", "must be a JSON object (it is empty)"),
                                 (b'"text"', "application/json", "must be a JSON object, not str")):
        r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": ctype})
        assert r.status_code == 400 and said in r.json()["error"]["message"], (content, r.text)


@pytest.mark.parametrize("body,param", [
    ({"model": "alpha", "prompt": 42}, "prompt"),
    ({"model": "alpha", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "n": 0}, "n"),
    ({"model": "alpha", "prompt": "x", "n": 10**6}, "n"),
    ({"model": "alpha", "prompt": "x", "logprobs": -1}, "logprobs"),
    ({"model": "alpha", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "alpha", "prompt": "x", "stop": 7}, "stop"),
    ({"model": "alpha", "prompt": [-1, 5]}, "prompt"),
    ({"model": "alpha", "prompt": "x" * 2_000_000}, "prompt"),
    ({"model": "alpha", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "alpha", "prompt": "x", "seed": -3}, "seed"),
    ({"model": "alpha", "prompt": "x", "min_p": 1.5}, "min_p"),
    ({"model": "alpha", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "alpha", "prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": "alpha", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "alpha", "prompt": "x", "logit_bias": {"the": 1}}, "logit_bias"),
    ({"model": "alpha", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "alpha", "prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"model": "alpha", "prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"model": "alpha", "prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"model": "alpha", "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"model": "alpha", "prompt": "x", "stream_options": {"include_usage": "maybe"}}, "stream_options"),
    ({"model": 3, "prompt": "x"}, "model"),
])
def test_each_bad_field_is_named(server, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()
    assert post(server, {"model": "alpha", "prompt": "fine", "max_tokens": 2}).status_code == 200


def test_chat_bad_input(server):
    for body, param in (({"model": "alpha", "messages": []}, "messages"),
                        ({"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
                        ({"model": "alpha", "messages": [{"role": "user"}]}, "messages")):
        r = post(server, body, path="/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text


def test_100_aborted_streams_leave_nothing(server):
    drop_streams(server.url, 100, lambda i: {"model": "alpha" if i % 2 else "tiny", "prompt": f"abort {i}",
                                             "max_tokens": 100, "stream": True, "ignore_eos": True},
                 keep_lines=lambda i: 1 + i % 3)
    h = wait_idle(server.url)
    assert (h["running"], h["waiting"], h["slots_used"], h["kv_tokens_used"]) == (0, 0, 0, 0), h
    # a client going away is not the server's error: no traceback for it (they once filled the log, a traceback a
    # dropped stream, when the look at the client every 0.5 s found it gone mid-stream)
    assert "unhandled error" not in server.output() and "Traceback" not in server.output(), server.output()[-3000:]


def test_bad_adapters_refused_while_traffic_continues(server, tmp_path):
    stop = threading.Event()
    statuses = []

    def traffic():
        while not stop.is_set():
            statuses.append(post(server, {"model": "alpha", "prompt": "steady", "max_tokens": 3}).status_code)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        truncated = Path(make_adapter(tmp_path / "truncated", 3))
        data = (truncated / "adapter_model.safetensors").read_bytes()
        (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
        other_base, _ = remix.tiny_model(seed=9)
        remix.inject(other_base, remix.MixtureConfig(n=4, k=2, r=4))
        mismatched = remix.save_adapter(other_base, tmp_path / "mismatched")
        pickled = Path(make_adapter(tmp_path / "pickled", 4))
        torch.save({"weights": torch.zeros(3)}, pickled / "adapter_model.safetensors")
        expected = {"truncated": "not a readable safetensors file", "mismatched": "different weights",
                    "pickled": "not a readable safetensors file"}
        for name, path in (("truncated", truncated), ("mismatched", mismatched), ("pickled", pickled)):
            r = post(server, {"name": name, "path": str(path)}, path="/v1/adapters")
            assert r.status_code == 400 and expected[name] in r.json()["error"]["message"], r.text
    finally:
        stop.set()
        t.join(30)
    assert statuses and all(s == 200 for s in statuses), statuses[:10]
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"tiny", "alpha"}
