"""The server as its clients see it: ``python -m server`` over HTTP against its own engine stepped in process.

    python -m server.bench_live --json out.json [--concurrency 1,8,32] [--new-tokens 128] [--prompt-tokens 128]
                                [--repeats 2] [--dtype auto|bfloat16|float32] [--stream] [--base ...]

server.bench and the other benches time the engine stepped by the process that loaded the model. This one starts the
real server (a subprocess: uvicorn, the OpenAI layer, the engine loop as ``python -m server`` runs it) with
server.bench's adapter (n = 8, k = 2, r = 8 on every FFN projection), and at each concurrency sends that many greedy
completions at once (prompts of ``--prompt-tokens`` token ids, ``--new-tokens`` new tokens, ``ignore_eos``, prefix
caching off in both; whole answers, or with ``--stream`` a chunk a token) and times them from the first request sent
to the last answer; the client runs in this process, on the same CPUs, and its CPU share is written. The peer is
the same engine in this process serving the same requests, stepped back to back on the thread that loaded the model,
timed the same way. The two take turns (``--repeats`` rounds each, the best kept), so a slow spell lands on both.
It prints and writes ``live_over_engine``: tokens/s through HTTP over tokens/s of the bare loop (goal >= 0.90 at each
concurrency: the HTTP layer, JSON and the engine's hand-off to it may cost a tenth, not more). The engine ran 1.6-1.8x
slower in the server than in these loops until the 57th session (its loop on a thread of its own: see
``Engine.run_here``), which no other bench could see. Where there is a /proc (Linux) it also writes what the server
spent a generated token, median over the live rounds: its HTTP thread's CPU (``http_thread_us_per_token``: the OpenAI
layer, JSON, uvicorn and the hand-off from the engine, which takes it from the CPUs the steps use) and all its threads'
(``server_cpu_ms_per_token``). These move far less with the VM's spells than the rates do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import remix
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.settings import HelpFormatter
from server.bench import add_output_args, make_adapter, prompts_of, write_outputs
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

GOAL = 0.90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, adapter: Path, max_model_len: int, max_seqs: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--base", args.base, "--adapter", f"bench={adapter}", "--port", str(port),
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_seqs), "--dtype", args.dtype,
           "--prefix-caching", "off", "--log-level", "warning"]
    # its output to a file: a pipe nobody reads while the rounds run would block the server once 64 KB were written
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            output.seek(0)
            raise SystemExit(f"error: the server exited: {output.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("error: the server did not come up in 10 minutes")


async def live_round(url: str, prompts: list[list[int]], new_tokens: int, stream: bool = False
                     ) -> tuple[float, list[list[int]], float]:
    """Seconds from the first request sent to the last answer, each request's generated token ids (``stream``:
    server-sent events, a chunk a token, read as they come), and the CPUs this process (the client alone then) used
    over that time."""
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=len(prompts) + 1)) as client:
        async def one(p):
            body = {"model": "bench", "prompt": p, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "stream": stream}
            if not stream:
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                return r.json()["choices"][0]["token_ids"]
            ids = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        ids += choices[0].get("token_ids") or []
            return ids

        start, cpu = time.perf_counter(), time.process_time()
        outs = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
        return wall, outs, (time.process_time() - cpu) / wall


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of process ``pid``'s threads, summed by the name the OS shows (the server names its HTTP
    thread ``remix-http``): /proc's nanosecond ``schedstat`` where there is one, else ``stat``'s clock ticks. Empty
    where there is no /proc."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for tid in (os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []):
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            name = (task / "comm").read_text().strip()
            try:
                seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
            except (OSError, IndexError, ValueError):
                fields = (task / "stat").read_text().rpartition(")")[2].split()
                seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except OSError:  # (a thread that ended between the listing and the read)
            continue
        out[name] = out.get(name, 0.0) + seconds
    return out


def engine_round(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """The same requests on the in-process engine, stepped back to back on this thread."""
    tokens = {i: [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(f"b{i}-{time.monotonic_ns()}", list(p), params, "bench"),
                      lambda e, i=i: tokens[i].extend(e.token_ids))
    while engine.has_work():
        engine.step()
    return time.perf_counter() - start, [tokens[i] for i in range(len(prompts))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of each contender at each concurrency (best kept)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    ap.add_argument("--stream", action="store_true", help="the live requests stream (server-sent events, a chunk a "
                                                         "token), as chat clients do")
    add_output_args(ap)
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 1 or args.repeats < 1 or args.new_tokens < 1 or args.prompt_tokens < 1:
        ap.error("--concurrency, --repeats, --new-tokens and --prompt-tokens must be >= 1")
    tune_cpu_allocator()
    from server.cli import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    model, tok = remix.load_base(args.base, dtype=dtype)
    tmp = Path(tempfile.mkdtemp(prefix="remix-live-"))
    adapter = make_adapter(model, tmp / "bench", seed=0)
    max_len, max_seqs = args.prompt_tokens + args.new_tokens + 16, max(levels)
    engine = Engine(model, tok, EngineConfig(max_model_len=max_len, max_num_seqs=max_seqs, max_queue=4 * max_seqs,
                                             prefix_caching=False))
    engine.load_adapter("bench", str(adapter))
    engine.warm_up()
    proc, url = start_server(args, adapter, max_len, max_seqs)
    out = {"config": {"base": args.base, "dtype": str(dtype).removeprefix("torch."),
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "stream": args.stream, "threads": torch.get_num_threads(),
                      "cpu": cpu_ext.cpu_model(), "torch": torch.__version__},
           "goal": {"live_over_engine": f">= {GOAL}"}, "results": {}}
    try:
        warm = prompts_of(tok, 2, args.prompt_tokens)
        asyncio.run(live_round(url, warm, 4, args.stream))
        engine_round(engine, warm, 4)
        for c in levels:
            prompts = prompts_of(tok, c, args.prompt_tokens)
            live, local, same, client, http_cpu, server_cpu = [], [], [], [], [], []
            for _ in range(args.repeats):  # in turn
                before = thread_cpu(proc.pid)
                t_live, got, client_cpu = asyncio.run(live_round(url, prompts, args.new_tokens, args.stream))
                after = thread_cpu(proc.pid)
                client.append(client_cpu)
                if before:  # the server's CPU a generated token: its HTTP thread's, all its threads'
                    tokens = c * args.new_tokens
                    http_cpu.append((after.get("remix-http", 0.0) - before.get("remix-http", 0.0)) / tokens)
                    server_cpu.append((sum(after.values()) - sum(before.values())) / tokens)
                t_engine, want = engine_round(engine, prompts, args.new_tokens)
                live.append(c * args.new_tokens / t_live)
                local.append(c * args.new_tokens / t_engine)
                same.append(sum(a == b for a, b in zip(got, want)) / c)
            ratio = max(live) / max(local)
            out["results"][str(c)] = {"live_tokens_per_s": round(max(live), 2),
                                      "engine_tokens_per_s": round(max(local), 2),
                                      "runs_live": [round(v, 2) for v in live],
                                      "runs_engine": [round(v, 2) for v in local],
                                      "live_over_engine": round(ratio, 3),
                                      "identical_replies": round(statistics.mean(same), 3),
                                      "client_cpu_share": round(statistics.mean(client), 3)}
            cost = ""
            if http_cpu:
                out["results"][str(c)].update(http_thread_us_per_token=round(statistics.median(http_cpu) * 1e6, 1),
                                              server_cpu_ms_per_token=round(statistics.median(server_cpu) * 1e3, 3))
                cost = (f"; the server's HTTP thread took {statistics.median(http_cpu) * 1e6:.1f} us of CPU a token, "
                        f"all its threads {statistics.median(server_cpu) * 1e3:.2f} ms")
            print(f"concurrency {c}: live server {max(live):.1f} tok/s, engine loop {max(local):.1f} tok/s, "
                  f"live_over_engine {ratio:.3f} ({'met' if ratio >= GOAL else 'missed'}: goal >= {GOAL}); "
                  f"identical greedy replies {statistics.mean(same):.0%}; the client used "
                  f"{statistics.mean(client):.2f} of a CPU beside the server{cost}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    write_outputs(args, out, markdown)
    return out


def markdown(out: dict) -> str:
    lines = ["| concurrency | live server (HTTP), tok/s | engine loop in process, tok/s | live over engine (goal >= "
             f"{GOAL}) | identical greedy replies | HTTP thread's CPU a token, us | server's CPU a token, ms |",
             "|---|---|---|---|---|---|---|"]
    for c, r in out["results"].items():
        mark = "**" if r["live_over_engine"] >= GOAL else ""
        lines.append(f"| {c} | {r['live_tokens_per_s']:.1f} | {r['engine_tokens_per_s']:.1f} | "
                     f"{mark}{r['live_over_engine']:.3f}{mark} | {r['identical_replies']:.0%} | "
                     f"{r.get('http_thread_us_per_token', '')} | {r.get('server_cpu_ms_per_token', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
