"""python -m server.batch: run a file of requests in OpenAI's batch format through the server, offline.

    python -m server.batch -i requests.jsonl -o results.jsonl [any python -m server option]

Each input line is one request, as OpenAI's Batch API and vLLM's ``run-batch`` take them:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "demo", "messages": [...]}}

and each output line its result, in the input's order:

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "...", "body": {...}},
     "error": null}

The requests run through the same application as ``python -m server`` (the same validation, adapters, defaults and
error bodies), in this process and with no socket: the base and its adapters load once, and up to ``--concurrency``
requests are in flight at a time, so the engine batches them as it batches a live server's. A request the server
refuses (a 4xx) or fails (a 5xx) is written with its status code and OpenAI-shaped error body, as OpenAI writes them;
a line that is not a request at all (not JSON, no custom_id, a repeated custom_id, a method other than POST, a url
the batch does not run, ``"stream": true``) gets ``response: null`` and ``error: {"code", "message", "line"}``. Neither
stops the batch. A 429 (the waiting queue full, or no room for an on-demand adapter) is tried again after a pause.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

# the endpoints a batch line may name: those that answer one POST with one JSON body
URLS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
        "/tokenize", "/detokenize")
RETRIES_429 = 8  # tries again of a request refused with a 429 (its queue full), the pause doubling from RETRY_S
RETRY_S = 0.5

log = logging.getLogger("server.batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="this help, then python -m server's options")
    p.add_argument("-i", "--input-file", help="the requests, one JSON object a line (- for stdin)")
    p.add_argument("-o", "--output-file", help="where the results go, one a line in the input's order (- for stdout); "
                                               "written as they complete, so a stopped run keeps those before it")
    p.add_argument("--concurrency", type=int, default=0,
                   help="requests in flight at once (default 0: twice --max-num-seqs, at most --max-num-seqs + "
                        "--max-queue)")
    p.add_argument("--progress", default="on", help="on or off: a progress bar on stderr (default: on)")
    return p


class BadLine(Exception):
    """A line that is not a request this batch can run; the message says why, ``cid`` is its custom_id where it has
    one."""

    def __init__(self, code: str, message: str, cid: str | None = None):
        super().__init__(message)
        self.code, self.cid = code, cid


def parse_line(text: str, seen: set[str]) -> tuple[str, dict]:
    """(custom_id, the line as a dict) of one input line; raises BadLine."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine("invalid_json", f"the line is not valid JSON: {e}") from None
    if not isinstance(line, dict):
        raise BadLine("invalid_request", "the line must be a JSON object with custom_id, method, url and body")
    cid = line.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise BadLine("invalid_request", "custom_id: a non-empty string is required")
    if cid in seen:
        raise BadLine("duplicate_custom_id", f"custom_id {cid!r} was used by an earlier line; each must be unique", cid)
    seen.add(cid)
    problem, unknown = None, sorted(set(line) - {"custom_id", "method", "url", "body"})
    if line.get("method", "POST") != "POST":
        problem = "invalid_request", f"method: only POST is run, got {line.get('method')!r}"
    elif line.get("url") not in URLS:
        problem = "invalid_url", f"url: one of {', '.join(URLS)}, got {line.get('url')!r}"
    elif not isinstance(line.get("body"), dict):
        problem = "invalid_request", "body: the request, a JSON object, is required"
    elif line["body"].get("stream"):
        problem = "invalid_request", "body.stream: a batch answers each request whole; leave stream out"
    elif unknown:
        problem = "invalid_request", (f"unknown field(s) {', '.join(unknown)}: a line has custom_id, method, url "
                                      "and body")
    if problem is not None:
        raise BadLine(*problem, cid)
    return cid, line


def result_line(cid: str | None, status: int | None = None, request_id: str | None = None, body=None,
                error: dict | None = None) -> dict:
    response = None if status is None else {"status_code": status, "request_id": request_id, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid, "response": response, "error": error}


class OrderedWriter:
    """Writes results in the input's order, each as soon as every earlier one is written: a result that comes before
    an earlier one waits in memory (behind a long request, every later result of the batch can)."""

    def __init__(self, out):
        self.out, self.next, self.held = out, 0, {}

    def add(self, index: int, result: dict) -> None:
        self.held[index] = result
        while self.next in self.held:
            self.out.write(json.dumps(self.held.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1
        self.out.flush()


class Tally:
    def __init__(self):
        self.status, self.prompt_tokens, self.completion_tokens = Counter(), 0, 0

    def add(self, result: dict) -> None:
        response = result["response"]
        self.status["bad line" if response is None else response["status_code"]] += 1
        usage = (response or {}).get("body") or {}
        usage = usage.get("usage") if isinstance(usage, dict) else None
        if isinstance(usage, dict):  # OpenAI's (prompt / completion), or the Responses and Messages APIs' (input /
            # output)
            self.prompt_tokens += usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
            self.completion_tokens += usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0

    def summary(self, seconds: float) -> str:
        total = sum(self.status.values())
        ok = sum(n for s, n in self.status.items() if isinstance(s, int) and 200 <= s < 300)
        failed = ", ".join(f"{n} x {s}" for s, n in sorted(self.status.items(), key=lambda kv: str(kv[0]))
                           if not (isinstance(s, int) and 200 <= s < 300))
        rate = self.completion_tokens / seconds if seconds > 0 else 0.0
        return (f"{total} requests in {seconds:.1f} s: {ok} succeeded" + (f", failed: {failed}" if failed else "")
                + f"; {self.prompt_tokens} prompt and {self.completion_tokens} generated tokens "
                  f"({rate:.1f} generated tokens/s)")


async def run_one(client, line: dict, headers: dict) -> tuple[int, str | None, object]:
    """(status, request id, JSON body) of one request, tried again after a pause while it is refused with a 429."""
    pause = RETRY_S
    for attempt in range(RETRIES_429 + 1):
        r = await client.post(line["url"], json=line["body"], headers=headers)
        if r.status_code != 429 or attempt == RETRIES_429:
            break
        await asyncio.sleep(pause)
        pause = min(2 * pause, 8.0)
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text, "type": "server_error", "param": None, "code": None}}
    return r.status_code, r.headers.get("x-request-id"), body


async def run_batch(app, lines, out, concurrency: int, api_key: str | None, progress: bool,
                    total: int | None = None) -> Tally:
    """Runs every line of ``lines`` (an iterable of text) through ``app`` (server.app.create_app's) and writes the
    results to ``out`` in order; returns the tally. ``total``: the lines to expect, for the progress bar."""
    import httpx
    from tqdm import tqdm

    from server.app import worker_threads

    asyncio.get_running_loop().set_default_executor(worker_threads())  # (the app's lifespan sets it; no lifespan here)
    writer, tally, seen = OrderedWriter(out), Tally(), set()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(concurrency)
    bar = tqdm(total=total, unit="req", desc="batch", disable=not progress, file=sys.stderr)

    def done(index: int, result: dict) -> None:
        writer.add(index, result)
        tally.add(result)
        bar.update()

    async def one(index: int, cid: str, line: dict) -> None:
        try:
            status, rid, body = await run_one(client, line, headers)
            done(index, result_line(cid, status, rid, body))
        except Exception as e:  # (the app answers its own errors; this is the transport's or a bug's)
            log.exception("request %s failed", cid)
            done(index, result_line(cid, error={"code": "internal_error", "message": str(e) or type(e).__name__}))
        finally:
            slots.release()

    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 0))
    tasks = set()
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
        index, number, lines = 0, 0, iter(lines)
        while True:  # (read off the event loop: a pipe may keep it waiting while requests are in flight)
            text = await asyncio.to_thread(next, lines, None)
            if text is None:
                break
            number += 1
            if not text.strip():
                continue
            try:
                cid, line = parse_line(text, seen)
            except BadLine as e:
                done(index, result_line(e.cid, error={"code": e.code, "message": str(e), "line": number}))
                index += 1
                continue
            await slots.acquire()
            task = asyncio.create_task(one(index, cid, line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if tasks:
            await asyncio.gather(*tasks)
    bar.close()
    return tally


def main(argv: list[str] | None = None) -> int:
    from server.cli import build_parser as server_parser
    from server.cli import load_settings, prepare

    args, rest = build_parser().parse_known_args(argv)
    if args.help:
        build_parser().print_help()
        print("\npython -m server's options (--host and --port are not used):\n")
        print(server_parser().format_help().split("\n\n", 2)[-1])
        return 0
    if not args.input_file or not args.output_file:
        raise SystemExit("error: -i/--input-file and -o/--output-file are required (- for stdin / stdout)")
    if args.input_file != "-" and not Path(args.input_file).is_file():
        raise SystemExit(f"error: -i/--input-file {args.input_file}: no such file")
    if args.output_file != "-":
        parent = Path(args.output_file).resolve().parent
        if not parent.is_dir():
            raise SystemExit(f"error: -o/--output-file {args.output_file}: the folder {parent} does not exist")
        if args.input_file != "-" and Path(args.output_file).resolve() == Path(args.input_file).resolve():
            raise SystemExit("error: -o/--output-file is the input file; give another path")
    if args.progress not in ("on", "off"):
        raise SystemExit(f"error: --progress must be on or off, got {args.progress!r}")
    if args.concurrency < 0:
        raise SystemExit(f"error: --concurrency must be >= 0, got {args.concurrency}")
    settings = load_settings(rest)
    from remix.adapter import AdapterError
    from server.app import create_app

    try:
        state = prepare(settings)
    except (AdapterError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seqs = settings["max_num_seqs"]
    concurrency = args.concurrency or min(2 * seqs, seqs + settings["max_queue"])
    app = create_app(state)
    source = sys.stdin if args.input_file == "-" else open(args.input_file, encoding="utf-8")
    sink = nullcontext(sys.stdout) if args.output_file == "-" else open(args.output_file, "w", encoding="utf-8")
    outcome: dict = {}
    total = None
    if args.input_file != "-" and args.progress == "on":
        with open(args.input_file, encoding="utf-8") as f:
            total = sum(1 for line in f if line.strip())

    def requests() -> None:
        """The requests' side, on a thread of its own: the engine runs on this one (python -m server's split, for the
        reason Engine.run_here gives)."""
        try:
            with source, sink as out:
                outcome["tally"] = asyncio.run(run_batch(app, source, out, concurrency, state.api_key,
                                                         args.progress == "on", total))
        except BaseException as e:  # noqa: BLE001 - said below, on the main thread
            outcome["error"] = e

    interrupted = threading.Event()

    def interrupt(sig, frame) -> None:  # the first Ctrl-C / SIGTERM ends the run between steps; a second Ctrl-C at once
        interrupted.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.perf_counter()
    side = threading.Thread(target=requests, name="remix-batch", daemon=True)
    side.start()
    try:
        state.engine.run_here(until=lambda: interrupted.is_set() or not side.is_alive())
    finally:
        state.engine.stop(drain_timeout=0.0)
        for sig, handler in before.items():
            signal.signal(sig, handler)
    where = "stdout" if args.output_file == "-" else args.output_file
    if interrupted.is_set():
        print(f"interrupted: the results written to {where} so far are kept (each line whole)", file=sys.stderr)
        return 130
    side.join()
    if "error" in outcome:
        print(f"error: {type(outcome['error']).__name__}: {outcome['error']}", file=sys.stderr)
        return 1
    print(f"{outcome['tally'].summary(time.perf_counter() - started)}; results in {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
