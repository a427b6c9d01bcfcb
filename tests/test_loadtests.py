"""The load generator and the capacity procedure against a live tiny server (loopback only, bounded)."""

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import LiveServer
from tests.test_server import make_adapter


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt")
    srv = LiveServer(["--adapter", f"a={make_adapter(root / 'a', 1)}", "--adapter", f"b={make_adapter(root / 'b', 2)}",
                      "--max-model-len", "128", "--max-num-seqs", "4", "--max-queue", "4"])
    yield srv
    srv.stop()


def run(args):
    return subprocess.run([sys.executable, "-m", "loadtests", *args], capture_output=True, text=True, timeout=300)


def test_open_loop_run_writes_json_plots_and_table(server, tmp_path):
    out = run(["--url", server.url, "--rate", "20", "--num-requests", "30", "--duration", "20", "--adapters", "a,b,tiny",
               "--output-tokens", "8", "--output-spread", "0.5", "--prompt-words", "10", "--slo", "ttft=5,itl=1", "--json", str(tmp_path / "r.json"),
               "--plots", str(tmp_path / "plots"), "--quiet"])
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    s = data["summary"]
    assert s["requests"] == 30 and s["completed"] + sum(s["errors"].values()) == 30
    assert s["completed"] > 0 and s["ttft_s"]["p50"] > 0 and s["itl_s"]["count"] > 0 and s["token_throughput"] > 0
    assert set(s["errors"]) <= {"429"}  # a 4-deep queue may refuse some of a 20 req/s burst, nothing else
    assert {r["adapter"] for r in data["requests"]} == {"a", "b", "tiny"}
    assert (tmp_path / "plots" / "latency_cdf.png").is_file() and (tmp_path / "plots" / "throughput.png").is_file()
    assert "ttft" in out.stdout and "p99" in out.stdout


def test_closed_loop_and_compare(server, tmp_path):
    for name, conc, sampling in (("a", "1", []), ("b", "3", ["--temperature", "0.8", "--top-p", "0.9", "--quiet"])):
        out = run(["--url", server.url, "--concurrency", conc, "--num-requests", "6", "--adapters", "a", *sampling,
                   "--output-tokens", "6", "--prompt-words", "8", "--stream", "false", "--json", str(tmp_path / f"{name}.json")])
        assert out.returncode == 0, out.stderr
        # stderr is a pipe here, not a terminal: progress comes as whole lines (no carriage returns piling up on one)
        assert "\r" not in out.stderr
        assert bool(re.search(r"^ *\d+\.\ds sent \d+ done \d+ errors 0$", out.stderr, re.M)) == (name == "a"), out.stderr
        summary = json.loads((tmp_path / f"{name}.json").read_text())["summary"]
        assert summary["completed"] == 6
        assert (summary["config"]["temperature"], summary["config"]["top_p"]) == ((0.8, 0.9) if sampling else (0.0, 1.0))
    out = run(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert out.returncode == 0 and "request_throughput" in out.stdout and "B/A" in out.stdout


def test_a_shared_opening_is_served_by_the_prefix_cache(server, tmp_path):
    """Every prompt opens with the same 10 words (~70 bytes: four whole 16-token blocks of the tiny byte tokenizer):
    after the first request the server's prefix cache serves most of each prompt, and the report says how much."""
    out = run(["--url", server.url, "--concurrency", "2", "--num-requests", "8", "--adapters", "a", "--output-tokens",
               "4", "--prompt-words", "2", "--prompt-spread", "0", "--shared-prefix-words", "10",
               "--json", str(tmp_path / "p.json"), "--quiet"])
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["summary"]["cached_prompt_share"] > 0.4 and "prefix cache" in out.stdout
    assert sum(r["cached_tokens"] > 0 for r in data["requests"]) >= 6
    bad = run(["--url", server.url, "--shared-prefix-words", "-1"])
    assert bad.returncode == 2 and "--shared-prefix-words" in bad.stderr


def test_capacity_procedure(server, tmp_path):
    out = subprocess.run([sys.executable, "-m", "loadtests.capacity", "--url", server.url, "--adapters", "a",
                          "--server-pid", str(server.proc.pid), "--start-rate", "2", "--growth", "4", "--max-rate", "40",
                          "--sweep-seconds", "2", "--run-seconds", "2", "--output-tokens", "6", "--prompt-words", "8",
                          "--out", str(tmp_path / "cap")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert report["sustainable_rate"] >= 2 and set(report["runs"]) == {"x0.5", "x1", "x2"}
    x2 = report["runs"]["x2"]
    assert x2["max_waiting"] is None or x2["max_waiting"] <= 4  # the queue never exceeds its bound
    assert x2["rss_mb_max"] is not None
    assert (tmp_path / "cap" / "capacity.md").read_text().count("|") > 20


def test_zipf_adapters_fall_off_as_one_over_rank():
    """--adapter-mode zipf: over 30,000 picks, the j-th of four names comes up with probability (1/j) / H where
    H = 1 + 1/2 + 1/3 + 1/4 = 25/12, i.e. 0.48, 0.24, 0.16, 0.12 (each within 0.01: ~4 standard errors of the largest
    share, sqrt(0.48 * 0.52 / 30000) = 0.0029); exponent 0 is uniform; round-robin and random as before."""
    import collections
    import random

    from loadtests.generator import adapter_picker

    names = ["a", "b", "c", "d"]
    for exponent, want in ((1.0, [12 / 25, 6 / 25, 4 / 25, 3 / 25]), (0.0, [0.25] * 4)):
        pick = adapter_picker(names, "zipf", random.Random(0), exponent)
        counts = collections.Counter(pick(i) for i in range(30000))
        for name, p in zip(names, want):
            assert abs(counts[name] / 30000 - p) < 0.01, (exponent, name, counts)
    assert [adapter_picker(names, "round-robin", random.Random(0))(i) for i in range(6)] == names + names[:2]
    rng = random.Random(5)
    assert adapter_picker(names, "random", random.Random(5))(0) == rng.choice(names)
    with pytest.raises(ValueError, match="round-robin, random or zipf"):
        adapter_picker(names, "popular", random.Random(0))


def test_bad_arguments():
    assert run(["--url", "ftp://x", "--num-requests", "1"]).returncode == 2
    assert run(["--url", "http://127.0.0.1:9", "--num-requests", "0"]).returncode == 2
    # every bad flag named at once, before any request is sent (a concurrency of 0 had meant 1)
    res = run(["--url", "http://127.0.0.1:9", "--concurrency", "0", "--prompt-spread", "2", "--top-p", "0",
               "--timeout", "0", "--adapters", ",", "--zipf-exponent", "-1"])
    assert res.returncode == 2 and "sent" not in res.stderr
    for line in ("--timeout must be > 0, got 0.0", "--concurrency must be at least 1, got 0",
                 "--prompt-spread must be in [0, 1], got 2.0", "--top-p must be in (0, 1], got 0.0",
                 "--adapters names no model", "--zipf-exponent must be >= 0, got -1.0"):
        assert line in res.stderr
    # the capacity procedure takes the same checks, and refuses a sweep that would never end
    res = subprocess.run([sys.executable, "-m", "loadtests.capacity", "--growth", "1", "--start-rate", "0", "--top-p", "2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "sweep" not in res.stdout
    for line in ("--start-rate must be > 0, got 0.0", "--top-p must be in (0, 1], got 2.0", "--growth must be > 1, got 1.0"):
        assert line in res.stderr


def test_a_server_that_is_not_there_or_lacks_the_adapter_is_said_before_any_load(server):
    res = run(["--url", "http://127.0.0.1:9", "--num-requests", "2"])  # (port 9: nothing listens)
    assert res.returncode == 2 and "sent" not in res.stderr, res.stderr
    assert "--url http://127.0.0.1:9: the server does not answer (ConnectError" in res.stderr
    res = run(["--url", server.url, "--num-requests", "2", "--adapters", "a,nope,b"])
    assert res.returncode == 2 and "sent" not in res.stderr, res.stderr
    assert f"--adapters: 'nope' not served by {server.url} (it serves a, b, tiny)" in res.stderr
    res = subprocess.run([sys.executable, "-m", "loadtests.capacity", "--url", server.url, "--adapters", "zz"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "'zz' not served" in res.stderr and "sweep" not in res.stdout
    # a run of which nothing completed failed (here every request times out), whatever its tables print
    res = run(["--url", server.url, "--num-requests", "2", "--adapters", "a", "--timeout", "0.0001", "--quiet"])
    assert res.returncode == 1 and "error: none of the 2 requests completed" in res.stderr, res.stderr


def test_a_prompts_files_own_fields_go_with_its_prompts(server, tmp_path):
    """A row's fields beyond its prompt (here structured output) are sent with it: the constrained answers end long
    before max_tokens, which ignore_eos would otherwise reach; the generator's own fields cannot be overridden."""
    pytest.importorskip("xgrammar")
    rows = [{"prompt": "Answer:", "guided_choice": ["yes", "no"]},
            {"messages": [{"role": "user", "content": "Three digits:"}], "guided_regex": "[0-9]{3}", "max_tokens": 1}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = run(["--url", server.url, "--concurrency", "2", "--num-requests", "6", "--adapters", "a", "--output-tokens",
               "12", "--prompts-file", str(tmp_path / "p.jsonl"), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert out.returncode == 0, out.stderr
    reqs = json.loads((tmp_path / "r.json").read_text())["requests"]
    assert len(reqs) == 6 and all(r["status"] == 200 and 1 <= r["completion_tokens"] <= 4 for r in reqs), reqs
    assert all(r["completion_tokens"] >= 3 for r in reqs[1::2])  # three digits: the row's max_tokens 1 was not sent


def test_a_stream_that_fails_after_its_200_counts_as_an_error():
    """The server ends a stream that fails with its error object before [DONE]: the load generator counts that
    request as failed, under the error's code (not as a completed 200)."""
    import asyncio

    import httpx

    from loadtests.generator import Result, one_request
    from loadtests.report import summarize

    error = {"message": "internal error while generating", "type": "server_error", "param": None,
             "code": "internal_error"}
    sse = (f'data: {json.dumps({"choices": [{"index": 0, "text": "a"}]})}\n\n'
           f'data: {json.dumps({"error": error})}\n\ndata: [DONE]\n\n')
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=sse,
                                                                   headers={"content-type": "text/event-stream"}))

    async def go():
        result = Result(0.0, "a", 3)
        async with httpx.AsyncClient(transport=transport) as client:
            await one_request(client, "http://x/v1/completions", {}, {"stream": True}, result, 0.0, True)
        return result

    result = asyncio.run(go())
    assert result.status == 200 and not result.ok and result.error.startswith("internal_error: internal error")
    assert summarize([result], 1.0, {})["errors"] == {"internal_error": 1}
