"""Open-loop (Poisson / gamma arrivals) or closed-loop (fixed concurrency) load against an OpenAI-style server.

Every loop is bounded by --num-requests and --duration, and talks only to the --url given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx

WORDS = ("river valley farmer trader bridge mill story road winter summer harvest market lantern harbor "
         "mountain forest village letter journey garden").split()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help for the load tools: remix.settings.HelpFormatter's rule. A copy, as parse_bool below is of
    remix.settings.flag_bool: importing anything under remix imports the package, and with it torch and transformers
    (3.3 s against the load tools' 0.2 s to start, for a client that talks only HTTP)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if not action.option_strings or d is None or d is False or d is argparse.SUPPRESS or d in ("", [], {}) \
                or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


def parse_bool(text: str) -> bool:
    """true / false (also yes / no, on / off, 1 / 0); anything else is an argparse error naming the flag (see above)."""
    if text.lower() in ("1", "true", "on", "yes"):
        return True
    if text.lower() in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass
class Result:
    """One request as the client saw it (times in seconds from the start of the run)."""

    start: float
    adapter: str
    prompt_words: int
    status: int = 0
    error: str = ""
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens: prompt tokens the server's prefix cache served

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def tpot(self) -> float | None:
        if self.ttft is None or self.end is None or self.completion_tokens < 2:
            return None
        return (self.end - self.start - self.ttft) / (self.completion_tokens - 1)


def make_prompts(count: int, mean_words: int, spread: float, rng: random.Random, file: str | None,
                 shared_prefix_words: int = 0) -> list[str]:
    """Prompts of random words (mean_words +- spread), each opened by the same ``shared_prefix_words`` words (an app's
    system prompt: what a server's prefix cache serves), or the prompts of a JSONL file."""
    if file:
        rows = [json.loads(line) for line in open(file) if line.strip()]
        texts = [r["prompt"] if "prompt" in r else r["messages"][-1]["content"] for r in rows]
        return [texts[i % len(texts)] for i in range(count)]
    out = []
    shared = [rng.choice(WORDS) for _ in range(shared_prefix_words)]
    for _ in range(count):
        n = max(1, int(rng.uniform(mean_words * (1 - spread), mean_words * (1 + spread))))
        out.append(" ".join(shared + [rng.choice(WORDS) for _ in range(n)]))
    return out


# fields a prompts file may not set: the generator's own (what is measured must stay what it reports)
OWN_FIELDS = {"model", "prompt", "messages", "stream", "stream_options", "max_tokens"}


def request_fields(file: str | None) -> list[dict]:
    """The other fields of each JSONL row of a prompts file (e.g. response_format, guided_regex, temperature, seed),
    sent with that row's prompt, in the same rotation; [] without a file."""
    if not file:
        return []
    rows = [json.loads(line) for line in open(file) if line.strip()]
    return [{k: v for k, v in r.items() if k not in OWN_FIELDS} for r in rows]


def usage_of(result: Result, usage: dict) -> None:
    result.completion_tokens = usage["completion_tokens"]
    result.prompt_tokens = usage.get("prompt_tokens", 0)
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, body: dict, result: Result, t0: float,
                      stream: bool) -> None:
    try:
        if stream:
            async with client.stream("POST", url, json=body, headers=headers) as r:
                result.status = r.status_code
                if r.status_code != 200:
                    await r.aread()
                    result.error = r.text[:200]
                    result.end = time.perf_counter() - t0  # how fast the refusal came
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter() - t0
                    if chunk.get("error"):  # the stream failed after its 200 (the server's error object, then [DONE])
                        err = chunk["error"]
                        result.error = f"{err.get('code') or err.get('type') or 'error'}: {err.get('message')}"[:200]
                        break
                    if chunk.get("usage"):
                        usage_of(result, chunk["usage"])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        if result.ttft is None:
                            result.ttft = now - result.start
                        result.token_times.append(now)
        else:
            r = await client.post(url, json=body, headers=headers)
            result.status = r.status_code
            if r.status_code != 200:
                result.error = r.text[:200]
                result.end = time.perf_counter() - t0
                return
            usage_of(result, r.json()["usage"])  # no TTFT without streaming
        result.end = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]


def adapter_picker(adapters: list[str], mode: str, rng: random.Random, zipf_exponent: float = 1.0):
    """The model of request i: ``round-robin``, uniformly ``random``, or ``zipf``: the j-th name (from 1) with
    probability proportional to 1 / j^zipf_exponent - a few popular adapters and a long tail, the traffic S-LoRA's and
    Punica's many-adapter evaluations draw (a server loading adapters on demand then swaps the tail in and out)."""
    if mode == "round-robin":
        return lambda i: adapters[i % len(adapters)]
    if mode == "random":
        return lambda i: rng.choice(adapters)
    if mode != "zipf":
        raise ValueError(f"adapter mode {mode!r}: round-robin, random or zipf")
    weights = [1.0 / (j + 1) ** zipf_exponent for j in range(len(adapters))]
    return lambda i: rng.choices(adapters, weights)[0]


async def run_load(url: str, api_key: str | None, rate: float | None, concurrency: int | None, num_requests: int,
                   duration: float, prompts: list[str], output_tokens: int | tuple[int, float], adapters: list[str], adapter_mode: str,
                   stream: bool, burstiness: float, seed: int, timeout: float, progress=None,
                   fields: list[dict] | None = None, sampling: dict | None = None,
                   zipf_exponent: float = 1.0) -> tuple[list[Result], float]:
    """sampling: the requests' temperature / top_p (default greedy); a prompts file's fields override it per row."""
    rng = random.Random(seed)
    pick = adapter_picker(adapters, adapter_mode, rng, zipf_exponent)
    mean_out, spread = output_tokens if isinstance(output_tokens, tuple) else (output_tokens, 0.0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/completions"
    results: list[Result] = []
    limits = httpx.Limits(max_connections=max(64, concurrency or 0), max_keepalive_connections=64)
    t0 = time.perf_counter()
    tasks = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        sem = asyncio.Semaphore(concurrency) if concurrency else None

        async def launch(i: int) -> None:
            adapter = pick(i)
            max_tokens = max(1, round(rng.uniform(mean_out * (1 - spread), mean_out * (1 + spread))))
            body = {"model": adapter, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": stream, **(sampling or {})}
            if fields:  # a prompts file's own fields for this prompt (temperature, response_format, ...)
                body.update(fields[i % len(prompts) % len(fields)])
            if stream:
                body["stream_options"] = {"include_usage": True}
            res = Result(start=time.perf_counter() - t0, adapter=adapter, prompt_words=len(body["prompt"].split()))
            results.append(res)
            if sem is None:
                await one_request(client, endpoint, headers, body, res, t0, stream)
            else:
                async with sem:
                    res.start = time.perf_counter() - t0
                    await one_request(client, endpoint, headers, body, res, t0, stream)
            if progress:
                progress(results, time.perf_counter() - t0)

        for i in range(num_requests):
            if time.perf_counter() - t0 >= duration:
                break
            if rate:
                # gamma inter-arrivals with mean 1/rate; shape = burstiness (1 = Poisson, < 1 = burstier)
                await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))
            elif sem is not None:
                while sem.locked():
                    await asyncio.sleep(0.001)
            tasks.append(asyncio.create_task(launch(i)))
        remaining = max(0.0, duration + timeout - (time.perf_counter() - t0))
        if tasks:
            await asyncio.wait(tasks, timeout=remaining)
        for t in tasks:
            t.cancel()
    return results, time.perf_counter() - t0


def to_json(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]


def input_problems(args: argparse.Namespace) -> list[str]:
    """Every bad flag of a load run, each naming its flag (empty: the run can start). Flags the command does not
    have are skipped (the capacity procedure shares these checks)."""
    out = []
    given = lambda name: getattr(args, name, None) is not None  # noqa: E731
    if urlparse(args.url).scheme not in ("http", "https"):
        out.append(f"--url must be http(s)://host:port, got {args.url!r}")
    for name in ("rate", "burstiness", "duration", "timeout", "start_rate", "sweep_seconds", "run_seconds", "ttft_slo"):
        if given(name) and not getattr(args, name) > 0:
            out.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("concurrency", "num_requests", "prompt_words", "output_tokens"):
        if given(name) and getattr(args, name) < 1:
            out.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("prompt_spread", "output_spread"):
        if given(name) and not 0 <= getattr(args, name) <= 1:
            out.append(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if given("shared_prefix_words") and args.shared_prefix_words < 0:
        out.append(f"--shared-prefix-words must be >= 0, got {args.shared_prefix_words}")
    if not args.temperature >= 0:
        out.append(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        out.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if not any(args.adapters.split(",")):
        out.append("--adapters names no model")
    if given("zipf_exponent") and not args.zipf_exponent >= 0:
        out.append(f"--zipf-exponent must be >= 0, got {args.zipf_exponent}")
    return out


def server_problems(url: str, api_key: str | None, adapters: list[str], timeout: float = 10.0) -> list[str]:
    """Before any load is sent: the server answers at ``url``, takes the key, and serves every name in ``adapters``
    (by its /v1/models). Each problem names its flag; a server without /v1/models is not second-guessed. (Without
    this, a wrong --url or adapter name ran the whole load into connection errors or 404s and printed empty tables.)"""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        return [f"--url {url}: the server does not answer ({type(e).__name__}: {e or 'no reply'}); is it running there?"]
    if r.status_code == 401:
        return [f"--api-key: the server at {url} wants {'another' if api_key else 'an'} API key (401)"]
    if r.status_code != 200:
        return []
    try:
        served = {m["id"] for m in r.json()["data"]}
    except (ValueError, KeyError, TypeError):
        return []
    missing = [a for a in adapters if a not in served]
    return [f"--adapters: {', '.join(map(repr, missing))} not served by {url} (it serves {', '.join(sorted(served))})"] \
        if missing else []
