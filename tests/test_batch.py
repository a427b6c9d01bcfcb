"""python -m server.batch: a file of requests in OpenAI's batch format, run in process through the server's app."""

import asyncio
import io
import json

import pytest
from fastapi.testclient import TestClient

import remix
import server.batch as batch
from server.app import create_app
from server.cli import build_state, load_settings
from tests.helpers import write_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return write_adapter(remix.tiny_model()[0], tmp_path_factory.mktemp("batch") / "alpha", seed=3)


def app_of(adapter, *flags):
    state = build_state(load_settings(["--base", "tiny", "--adapter", f"alpha={adapter}", "--max-model-len", "256",
                                       "--dtype", "float32", *flags]))
    state.engine.start()
    return state, create_app(state)


def line(cid, url, body, **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **extra})


def run(app, lines, concurrency, api_key=None):
    out = io.StringIO()
    tally = asyncio.run(batch.run_batch(app, iter(lines), out, concurrency, api_key, progress=False))
    return [json.loads(s) for s in out.getvalue().splitlines()], tally


def test_every_line_answers_in_order_and_batched_equals_alone(adapter):
    """Sixteen greedy requests of both kinds, on the adapter and the bare base, in flight together (concurrency 16):
    each result is in its line's place and its body is what the same app answers to the request sent alone (float32:
    the compiled path's rows do not depend on their batch-mates, so log-probabilities too are equal)."""
    state, app = app_of(adapter)
    try:
        lines, expected = [], []
        for i in range(16):
            model = "alpha" if i % 3 else "tiny"
            if i % 2:
                url, body = "/v1/completions", {"model": model, "prompt": f"Tell me {i}", "max_tokens": 4 + i % 5,
                                                "temperature": 0, "logprobs": 2}
            else:
                url, body = "/v1/chat/completions", {"model": model, "max_tokens": 6, "temperature": 0,
                                                     "messages": [{"role": "user", "content": f"question {i}"}]}
            lines.append(line(f"q{i}", url, body))
            expected.append((url, body))
        results, tally = run(app, lines, concurrency=16)
        assert [r["custom_id"] for r in results] == [f"q{i}" for i in range(16)]
        with TestClient(app) as client:
            for r, (url, body) in zip(results, expected):
                alone = client.post(url, json=body).json()
                assert r["error"] is None and r["response"]["status_code"] == 200 and r["response"]["request_id"]
                got = r["response"]["body"]
                assert got["model"] == body["model"]
                assert got["choices"] == alone["choices"]
                # (usage's cached_tokens differ: alone, the prompt is in the prefix cache the batch left)
                for count in ("prompt_tokens", "completion_tokens"):
                    assert got["usage"][count] == alone["usage"][count]
                assert r["id"].startswith("batch_req_")
        assert tally.status == {200: 16}
        assert tally.completion_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    finally:
        state.engine.stop(drain_timeout=1.0)


def test_bad_lines_and_refused_requests_are_written_and_the_batch_goes_on(adapter):
    """A line that is no request gets response null and an error naming its line; a request the app refuses gets
    its status and the app's OpenAI-shaped error body; each stays in its place and none stops the rest."""
    state, app = app_of(adapter)
    ok = {"model": "alpha", "prompt": "Hi", "max_tokens": 3, "temperature": 0}
    lines = [
        line("a", "/v1/completions", ok),
        "not json",
        "",  # blank lines are skipped, not answered
        json.dumps(["a list"]),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": ok}),  # no custom_id
        line("a", "/v1/completions", ok),  # a repeated custom_id
        line("get", "/v1/completions", ok, method="GET"),
        line("emb", "/v1/embeddings", {"model": "alpha", "input": "x"}),
        line("stream", "/v1/completions", {**ok, "stream": True}),
        line("nobody", "/v1/completions", "text"),
        line("extra", "/v1/completions", ok, priority=1),
        line("temp", "/v1/completions", {**ok, "temperature": -1}),
        line("model", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        line("msg", "/v1/messages", {"model": "alpha", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}),
        line("count", "/v1/messages/count_tokens", {"model": "alpha", "messages": [{"role": "user", "content": "xy"}]}),
        line("resp", "/v1/responses", {"model": "alpha", "input": "x", "max_output_tokens": 3}),
        line("tok", "/tokenize", {"model": "alpha", "prompt": "abc"}),
        line("last", "/v1/completions", ok),
    ]
    try:
        results, tally = run(app, lines, concurrency=4)
    finally:
        state.engine.stop(drain_timeout=1.0)
    by = [(r["custom_id"], (r["response"] or {}).get("status_code"), (r["error"] or {}).get("code"),
           (r["error"] or {}).get("line")) for r in results]
    assert by == [
        ("a", 200, None, None),
        (None, None, "invalid_json", 2),
        (None, None, "invalid_request", 4),
        (None, None, "invalid_request", 5),
        ("a", None, "duplicate_custom_id", 6),
        ("get", None, "invalid_request", 7),
        ("emb", None, "invalid_url", 8),
        ("stream", None, "invalid_request", 9),
        ("nobody", None, "invalid_request", 10),
        ("extra", None, "invalid_request", 11),
        ("temp", 400, None, None),
        ("model", 404, None, None),
        ("msg", 200, None, None),
        ("count", 200, None, None),
        ("resp", 200, None, None),
        ("tok", 200, None, None),
        ("last", 200, None, None),
    ]
    errors = {r["custom_id"]: r for r in results}
    assert errors["temp"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["model"]["response"]["body"]["error"]["type"] == "not_found_error"
    assert "priority" in errors["extra"]["error"]["message"]
    assert errors["msg"]["response"]["body"]["type"] == "message"
    assert errors["count"]["response"]["body"]["input_tokens"] > 0
    assert errors["tok"]["response"]["body"]["tokens"] == [97, 98, 99]  # the tiny tokenizer: a token a byte
    assert tally.status == {200: 6, 400: 1, 404: 1, "bad line": 9}


def test_a_full_queue_is_tried_again_not_written_as_a_429(adapter, monkeypatch):
    """One sequence running and one waiting at most, six requests in flight: the others are refused with a 429
    (counted by the app's metrics) and tried again until each has its answer."""
    monkeypatch.setattr(batch, "RETRY_S", 0.05)
    state, app = app_of(adapter, "--max-num-seqs", "1", "--max-queue", "1")
    try:
        lines = [line(f"q{i}", "/v1/completions", {"model": "alpha", "prompt": f"p{i}", "max_tokens": 24,
                                                    "temperature": 0, "ignore_eos": True}) for i in range(6)]
        results, tally = run(app, lines, concurrency=6)
        refused = state.metrics.http_errors.labels("429")._value.get()
    finally:
        state.engine.stop(drain_timeout=1.0)
    assert refused > 0  # (without it the test would show nothing)
    assert [r["response"]["status_code"] for r in results] == [200] * 6
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 24 for r in results)


def test_the_api_key_is_sent(adapter):
    """With --api-key the app requires it; the batch sends it, so its requests are not refused with a 401."""
    state, app = app_of(adapter, "--api-key", "sekret")
    try:
        body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
        results, _ = run(app, [line("k", "/v1/completions", body)], 1, api_key="sekret")
        refused, _ = run(app, [line("k", "/v1/completions", body)], 1)
    finally:
        state.engine.stop(drain_timeout=1.0)
    assert results[0]["response"]["status_code"] == 200
    assert refused[0]["response"]["status_code"] == 401


def test_cli_end_to_end(adapter, tmp_path, capsys):
    """The command itself: files in and out, the server's flags, a summary on stderr; flag errors name the flag."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line("one", "/v1/completions", {"model": "alpha", "prompt": "Hi", "max_tokens": 3}) + "\n"
                   + line("two", "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "x"}]}) + "\n"
                   + "{oops\n")
    # (no --threads: main() would set this test process's torch threads, which later tests count on)
    flags = ["--base", "tiny", "--adapter", f"alpha={adapter}", "--log-level", "warning", "--progress", "off"]
    assert batch.main(["-i", str(src), "-o", str(dst), *flags]) == 0
    results = [json.loads(s) for s in dst.read_text().splitlines()]
    assert [(r["custom_id"], (r["response"] or {}).get("status_code")) for r in results] == [
        ("one", 200), ("two", 200), (None, None)]
    err = capsys.readouterr().err
    assert "3 requests in" in err and "2 succeeded, failed: 1 x bad line" in err and str(dst) in err
    with pytest.raises(SystemExit, match="-i/--input-file .*no such file"):
        batch.main(["-i", str(tmp_path / "missing.jsonl"), "-o", str(dst), *flags])
    with pytest.raises(SystemExit, match="-o/--output-file is the input file"):
        batch.main(["-i", str(src), "-o", str(src), *flags])
    with pytest.raises(SystemExit, match="required"):
        batch.main(["-i", str(src), *flags])
    with pytest.raises(SystemExit, match="--max-num-seqs must be >= 1"):
        batch.main(["-i", str(src), "-o", str(dst), *flags, "--max-num-seqs", "0"])
    assert src.read_text().endswith("{oops\n")  # the input untouched


def test_ctrl_c_stops_the_batch_and_keeps_what_was_written(adapter, tmp_path):
    """SIGINT in the middle of a batch: the run ends with 130 between steps, not with a traceback or errors written
    for the requests it did not run, and every line written so far is a whole result."""
    import signal
    import subprocess
    import sys
    import time

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(line(f"q{i}", "/v1/completions", {"model": "alpha", "prompt": f"p{i}", "max_tokens": 200,
                                                            "ignore_eos": True}) + "\n" for i in range(64)))
    proc = subprocess.Popen([sys.executable, "-m", "server.batch", "-i", str(src), "-o", str(dst), "--base", "tiny",
                             "--adapter", f"alpha={adapter}", "--threads", "1", "--max-num-seqs", "2",
                             "--progress", "off", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (dst.exists() and dst.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    written = dst.read_text().splitlines()
    assert 1 <= len(written) < 64
    assert all(json.loads(s)["response"]["status_code"] == 200 for s in written)
