"""python -m loadtests: load-test an OpenAI-compatible server and report latency, throughput and goodput.

    python -m loadtests --url http://127.0.0.1:8000 --rate 2 --num-requests 100 --adapters demo --json run.json --plots plots/
    python -m loadtests --compare before.json after.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

from loadtests.generator import (
    HelpFormatter, input_problems, make_prompts, parse_bool, request_fields, run_load, server_problems, to_json,
)
from loadtests.report import compare, plots, summarize, table


def parse_slo(text: str) -> dict[str, float]:
    """'ttft=2,itl=0.5' (seconds) -> {'ttft': 2.0, 'itl': 0.5}."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in ("ttft", "itl", "tpot", "e2e"):
            raise argparse.ArgumentTypeError(f"unknown SLO {key!r} (ttft, itl, tpot, e2e)")
        out[key] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (the only target)")
    p.add_argument("--api-key", default=None, help="Bearer key")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: mean arrivals per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals: 1 = Poisson, <1 burstier")
    p.add_argument("--num-requests", type=int, default=100, help="upper bound on requests sent")
    p.add_argument("--duration", type=float, default=300.0, help="upper bound on seconds spent sending")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--prompt-words", type=int, default=60, help="mean prompt length in words (built-in prompts)")
    p.add_argument("--prompt-spread", type=float, default=0.5, help="prompt length varies uniformly by +- this share")
    p.add_argument("--shared-prefix-words", type=int, default=0,
                   help="open every built-in prompt with the same this many words (a system prompt: exercises the "
                        "server's prefix cache; the report gives the share of prompt tokens it served)")
    p.add_argument("--prompts-file", help="JSONL of {prompt} or {messages} to use instead; a row's other fields "
                                          "(response_format, guided_regex, temperature, ...) go with its prompt")
    p.add_argument("--output-tokens", type=int, default=64, help="mean max_tokens per request (ignore_eos is set)")
    p.add_argument("--output-spread", type=float, default=0.0, help="max_tokens varies uniformly by +- this share")
    p.add_argument("--temperature", type=float, default=0.0, help="every request's temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="every request's top_p")
    p.add_argument("--adapters", default="demo", help="comma-separated model names to spread requests over")
    p.add_argument("--adapter-mode", choices=("random", "round-robin", "zipf"), default="round-robin",
                   help="how requests take the names of --adapters: in turn, uniformly at random, or zipf (the j-th "
                        "name with probability proportional to 1 / j^--zipf-exponent: a few popular adapters and a "
                        "long tail, as many-adapter servers see)")
    p.add_argument("--zipf-exponent", type=float, default=1.0, help="with --adapter-mode zipf: how steeply popularity "
                                                                    "falls along --adapters (0: uniform)")
    p.add_argument("--stream", type=parse_bool, default=True, help="stream the responses (true / false)")
    p.add_argument("--slo", type=parse_slo, default={}, help="goodput thresholds in seconds, e.g. ttft=2,itl=0.5")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, arrivals and adapter choices")
    p.add_argument("--json", help="write the summary and every request here")
    p.add_argument("--plots", help="write latency_cdf.png and throughput.png into this folder")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print the deltas of two runs and exit")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    problems = input_problems(args)
    adapters = [a for a in args.adapters.split(",") if a]
    if not problems:
        problems = server_problems(args.url, args.api_key, adapters)
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        return 2
    if args.rate is None and args.concurrency is None:
        args.concurrency = 1
    rng = random.Random(args.seed)
    prompts = make_prompts(args.num_requests, args.prompt_words, args.prompt_spread, rng, args.prompts_file,
                           args.shared_prefix_words)

    live = sys.stderr.isatty()  # a terminal: one line rewritten in place; a log or a pipe: a line every 5 s
    next_line = [0.0]

    def progress(results, elapsed):
        if args.quiet or (not live and elapsed < next_line[0]):
            return
        next_line[0] = elapsed + 5.0
        done = sum(r.end is not None or bool(r.error) for r in results)
        errors = sum(bool(r.error) or (r.status not in (0, 200)) for r in results)
        line = f"{elapsed:7.1f}s sent {len(results)} done {done} errors {errors}"
        print(f"\r{line}" if live else line, end="" if live else "\n", file=sys.stderr, flush=True)

    results, elapsed = asyncio.run(run_load(
        args.url, args.api_key, args.rate, args.concurrency, args.num_requests, args.duration, prompts,
        (args.output_tokens, args.output_spread), adapters, args.adapter_mode, args.stream, args.burstiness, args.seed, args.timeout, progress,
        request_fields(args.prompts_file), {"temperature": args.temperature, "top_p": args.top_p}, args.zipf_exponent))
    if not args.quiet and live:
        print(file=sys.stderr)
    summary = summarize(results, elapsed, args.slo)
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("compare",)}
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "requests": to_json(results)}, indent=1))
    if args.plots:
        title = f"rate {args.rate or '-'} conc {args.concurrency or '-'} ({len(results)} requests)"
        for path in plots(results, Path(args.plots), title):
            print(f"wrote {path}")
    if not summary["completed"]:  # (a load test of which nothing completed failed, whatever its tables say)
        print(f"error: none of the {summary['requests']} requests completed ({summary['errors'] or 'no answers'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
