"""python -m loadtests.capacity: find the sustainable request rate of a running server, then load it at 0.5x, 1x
and 2x of that rate, recording latency, throughput, refusals (429), the queue and the server's memory.

    python -m server --max-queue 16 &            # a small queue, so overload is refused quickly
    python -m loadtests.capacity --url http://127.0.0.1:8000 --adapters demo --server-pid $! --out runs/capacity

Sustainable = the highest rate of a geometric sweep at which every request is answered (no 429, no error) and the
p90 time-to-first-token stays under --ttft-slo (queueing shows up there first). Every run is bounded by
--run-seconds and targets only --url.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtests.generator import HelpFormatter, input_problems, make_prompts, run_load, server_problems
from loadtests.report import plots, summarize, table


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Samples the server's RSS and its waiting queue (from /health) every 0.5 s during a run."""

    def __init__(self, url: str, pid: int | None):
        super().__init__(daemon=True)
        self.url, self.pid, self.samples, self.stop_flag = url, pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            waiting = None
            try:
                waiting = httpx.get(self.url + "/health", timeout=2).json().get("waiting")
            except (httpx.HTTPError, ValueError):
                pass
            self.samples.append({"t": time.time(), "rss_mb": rss_mb(self.pid) if self.pid else None, "waiting": waiting})
            self.stop_flag.wait(0.5)


def one_run(args, rate: float, seconds: float, tag: str, out: Path | None) -> dict:
    sampler = Sampler(args.url, args.server_pid)
    sampler.start()
    n = max(4, int(rate * seconds))
    prompts = make_prompts(n, args.prompt_words, 0.3, random.Random(args.seed), None)
    results, elapsed = asyncio.run(run_load(args.url, args.api_key, rate, None, n, seconds, prompts, args.output_tokens,
                                            args.adapters.split(","), "round-robin", True, 1.0, args.seed, args.timeout,
                                            sampling={"temperature": args.temperature, "top_p": args.top_p}))
    sampler.stop_flag.set()
    sampler.join(5)
    summary = summarize(results, elapsed, {"ttft": args.ttft_slo})
    rss = [s["rss_mb"] for s in sampler.samples if s["rss_mb"] is not None]
    waiting = [s["waiting"] for s in sampler.samples if s["waiting"] is not None]
    refused = [r for r in results if r.status == 429]
    summary.update({"offered_rate": rate, "rss_mb_start": rss[0] if rss else None, "rss_mb_max": max(rss) if rss else None,
                    "rss_mb_end": rss[-1] if rss else None, "max_waiting": max(waiting) if waiting else None,
                    "refused_429": len(refused),
                    "refusal_latency_p99_s": sorted(r.end - r.start for r in refused)[int(0.99 * (len(refused) - 1))]
                    if refused and all(r.end is not None for r in refused) else None})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{tag}.json").write_text(json.dumps({"summary": summary}, indent=1))
        plots(results, out / tag, f"{tag}: {rate:.2f} req/s offered")
    return summary


def sustainable(s: dict, slo: float) -> bool:
    other_errors = {k: v for k, v in s["errors"].items() if k != "429"}
    p90 = s["ttft_s"]["p90"]
    # every request sent was answered (no 429, no other error) and queueing stayed under the TTFT SLO; the
    # throughput over the run's wall time is not used: it includes the drain of the last requests
    return not other_errors and not s["errors"].get("429") and s["completed"] == s["requests"] and p90 is not None and p90 <= slo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.capacity", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (the only target)")
    ap.add_argument("--api-key", help="Bearer key")
    ap.add_argument("--adapters", default="demo", help="comma-separated model names to spread requests over")
    ap.add_argument("--server-pid", type=int, help="to sample the server's memory (RSS) during each run")
    ap.add_argument("--start-rate", type=float, default=0.25, help="the sweep's first rate, requests a second")
    ap.add_argument("--growth", type=float, default=1.5, help="rate multiplier between sweep points (> 1)")
    ap.add_argument("--max-rate", type=float, default=64.0, help="the sweep stops here")
    ap.add_argument("--sweep-seconds", type=float, default=30.0, help="seconds of load at each sweep point")
    ap.add_argument("--run-seconds", type=float, default=60.0, help="seconds of load at 0.5x, 1x and 2x the sustainable rate")
    ap.add_argument("--ttft-slo", type=float, default=2.0, help="p90 time to first token a sustainable rate keeps under, seconds")
    ap.add_argument("--prompt-words", type=int, default=40, help="mean prompt length in words")
    ap.add_argument("--output-tokens", type=int, default=32, help="max_tokens per request (ignore_eos is set)")
    ap.add_argument("--temperature", type=float, default=0.0, help="every request's temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="every request's top_p")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals")
    ap.add_argument("--out", default="runs/capacity", help="folder for the report, JSON and plots")
    args = ap.parse_args(argv)
    problems = input_problems(args)
    if not args.growth > 1:  # (at 1 or less the sweep would never reach --max-rate)
        problems.append(f"--growth must be > 1, got {args.growth}")
    if not args.max_rate >= args.start_rate:
        problems.append(f"--max-rate must be at least --start-rate ({args.start_rate}), got {args.max_rate}")
    if not problems:
        problems = server_problems(args.url, args.api_key, [a for a in args.adapters.split(",") if a])
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        return 2
    out = Path(args.out)
    best, rate, sweep = None, args.start_rate, []
    while rate <= args.max_rate:
        s = one_run(args, rate, args.sweep_seconds, f"sweep_{rate:.3g}", None)
        ok = sustainable(s, args.ttft_slo)
        sweep.append({"rate": rate, "throughput": s["request_throughput"], "ttft_p90": s["ttft_s"]["p90"], "ok": ok})
        print(f"sweep {rate:6.2f} req/s -> {s['request_throughput']:5.2f} req/s, TTFT p90 "
              f"{s['ttft_s']['p90'] or float('nan'):.2f}s, errors {s['errors']}: {'ok' if ok else 'over'}", flush=True)
        if not ok:
            break
        best = rate
        rate *= args.growth
    if best is None:
        print("error: even the start rate is not sustainable; lower --start-rate", file=sys.stderr)
        return 1
    report = {"sustainable_rate": best, "sweep": sweep, "runs": {}}
    for factor in (0.5, 1.0, 2.0):
        tag = f"x{factor:g}"
        s = one_run(args, best * factor, args.run_seconds, tag, out)
        report["runs"][tag] = s
        print(f"\n== {tag}: {best * factor:.2f} req/s offered ==\n{table(s)}\n429 refused {s['refused_429']} "
              f"(p99 refusal latency {s['refusal_latency_p99_s']}), max waiting {s['max_waiting']}, "
              f"RSS {s['rss_mb_start']} -> {s['rss_mb_max']} -> {s['rss_mb_end']} MB", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(report, indent=1))
    lines = ["| load | offered req/s | done req/s | tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | 429 | other errors | max waiting | RSS start / max (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for tag, s in report["runs"].items():
        f = lambda v, k=1: "-" if v is None else f"{v * k:.2f}"  # noqa: E731
        errs = {k: v for k, v in s["errors"].items() if k != "429"}
        lines.append(f"| {tag} | {s['offered_rate']:.2f} | {s['request_throughput']:.2f} | {s['token_throughput']:.1f} | "
                     f"{f(s['ttft_s']['p50'])} / {f(s['ttft_s']['p99'])} | {f(s['itl_s']['p50'], 1000)} / {f(s['itl_s']['p99'], 1000)} | "
                     f"{s['refused_429']} | {errs or 0} | {s['max_waiting']} | {f(s['rss_mb_start'])} / {f(s['rss_mb_max'])} |")
    (out / "capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
