"""Speculative decoding by prompt lookup (``--num-speculative-tokens``) against the same engine without it and against
HF generate with its own prompt lookup (``prompt_lookup_num_tokens``), in one run.

    python -m server.bench_spec --json out.json [--markdown out.md] [--num-speculative-tokens 8] [--speculative-schedule cost]
                                [--new-tokens 128] [--prompts 4] [--concurrency 4] [--repeats 2] [--dtype auto]
                                [--temperature 0]

On the default base, greedy (or sampled: ``--temperature``), with EOS (each reply as long as the model makes it, up to ``--new-tokens``). Two
workloads of ``--prompts`` chat requests each:

  edit  "add type hints to this function and return the whole function", the function one of this project's own
        (remix/routing.py, remix/config.py, ...): a reply that repeats most of its prompt, where prompt lookup pays
  free  open-ended writing ("write a short story about ..."): drafts rarely match, what speculation costs there

Contenders, one request at a time (concurrency 1): HF generate (greedy), HF generate with
``prompt_lookup_num_tokens`` (the peer: the same method in the library people run), the engine, the engine with
speculation; and with ``--concurrency`` requests submitted together, the engine without and with it. Every contender
serves its prompts ``--repeats`` times (the engine's in alternation with each other) and its fastest run is reported.

It prints and writes tokens/s per contender and workload, the ratios (``engine_spec_over_engine``,
``engine_spec_over_hf_prompt_lookup``, ``engine_spec_over_hf_generate``), the share of draft tokens accepted and of
tokens per checked step, and whether the replies with speculation are those without it (they must be: the
same tokens, greedy or for the same seed, counted per request).
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch

import remix
import remix.adapter
import remix.config
import remix.layer
import remix.routing
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.settings import HelpFormatter
from server.bench import add_output_args, common_prefix, write_outputs
from server.cli import DTYPES, resolve_dtype
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine.speculative import SCHEDULES

FREE = ["Write a short story about a robot who learns to paint.",
        "Explain why the sky is blue to a ten-year-old.",
        "Write a letter to a friend describing your favourite city.",
        "Describe a day in the life of a lighthouse keeper.",
        "Write a poem about the sea at night.",
        "Give advice to someone starting to learn the piano.",
        "Describe how bread is made, from the field to the table.",
        "Write a short dialogue between a cat and a dog about breakfast."]


def functions(count: int, max_chars: int = 900) -> list[str]:
    """``count`` top-level functions of this project's source, short enough for the prompt (deterministic order)."""
    out = []
    for module in (remix.routing, remix.config, remix.adapter, remix.layer):
        for chunk in inspect.getsource(module).split("\ndef ")[1:]:
            body = "def " + chunk.split("\n\n\n")[0]
            if 200 <= len(body) <= max_chars:
                out.append(body)
    return out[:count]


def chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int, k: int, together: bool,
               temperature: float = 0.0) -> dict:
    """Serve the prompts (one after another, or all submitted together) with k draft tokens (0: off); sampled
    (temperature > 0) with request i seeded i."""
    engine.config.num_speculative_tokens = k
    before = dict(engine.spec_totals)
    tokens = [[] for _ in prompts]
    start = time.perf_counter()
    for batch in ([list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]):
        for i in batch:
            params = SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=i)
            engine.submit(GenerationRequest(f"spec-{k}-{time.monotonic_ns()}-{i}", prompts[i], params),
                          lambda ev, i=i: tokens[i].extend(ev.token_ids))
        while engine.has_work():
            engine.step()
    wall = time.perf_counter() - start
    spec = {key: engine.spec_totals[key] - before[key] for key in before}
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": sum(map(len, tokens)) / wall, **spec}


def run_hf(model, prompts: list[list[int]], new_tokens: int, lookup: int, eos, temperature: float = 0.0) -> dict:
    """HF generate, one prompt at a time (greedy, or sampled at ``temperature`` with top_k off; ``lookup`` > 0:
    prompt_lookup_num_tokens), after one untimed 4-token warm-up."""
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    extra.update({"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False})
    tokens = []
    with torch.inference_mode():
        ids = torch.tensor([prompts[0]])
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0,
                       eos_token_id=eos, **extra)
        start = time.perf_counter()
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 pad_token_id=0, eos_token_id=eos, **extra)
            tokens.append(out[0, len(p):].tolist())
        wall = time.perf_counter() - start
    # HF keeps the EOS token it stopped on; the engine does too (the token is generated, not emitted as text)
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": sum(map(len, tokens)) / wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m server.bench_spec", description=__doc__, formatter_class=HelpFormatter)
    add_output_args(ap)
    ap.add_argument("--num-speculative-tokens", type=int, default=8, help="draft tokens a step (the server's flag)")
    ap.add_argument("--prompt-lookup-min", type=int, default=2, help="the shortest n-gram that proposes a draft")
    ap.add_argument("--prompt-lookup-max", type=int, default=4, help="the longest n-gram that proposes a draft")
    ap.add_argument("--speculative-schedule", default="cost", choices=SCHEDULES,
                    help="how long each draft is (the server's --speculative-schedule)")
    ap.add_argument("--new-tokens", type=int, default=128, help="the most tokens generated for a request")
    ap.add_argument("--prompts", type=int, default=4, help="requests per workload")
    ap.add_argument("--concurrency", type=int, default=4, help="requests submitted together (engines only; 0: skip)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each engine contender (alternating)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as the server picks it)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above 0 every contender samples (the engine's requests seeded, so its replies with "
                         "and without speculation must still be the same)")
    args = ap.parse_args(argv)
    if args.temperature < 0:
        ap.error("--temperature must be >= 0")
    if args.num_speculative_tokens < 1 or args.prompts < 1 or args.repeats < 1 or args.concurrency < 0:
        ap.error("--num-speculative-tokens, --prompts and --repeats must be >= 1, --concurrency >= 0")
    if not 1 <= args.prompt_lookup_min <= args.prompt_lookup_max:
        ap.error("--prompt-lookup-min / --prompt-lookup-max: need 1 <= min <= max")
    tune_cpu_allocator()
    cpu_ext.load()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    model, tok = remix.load_base(args.base, dtype=dtype)
    hf_model, _ = remix.load_base(args.base, dtype=dtype)
    k, N = args.num_speculative_tokens, args.new_tokens
    workloads = {
        "edit": [chat_ids(tok, "Add type hints to this Python function and return the whole function:\n```python\n"
                          f"{f}\n```") for f in functions(args.prompts)],
        "free": [chat_ids(tok, FREE[i % len(FREE)]) for i in range(args.prompts)],
    }
    C = min(args.concurrency, args.prompts)
    engine = Engine(model, tok, EngineConfig(
        max_model_len=max(len(p) for ps in workloads.values() for p in ps) + N + 8, max_num_seqs=max(C, 1),
        prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max,
        speculative_max_seqs=max(C, 1), speculative_schedule=args.speculative_schedule,
        prefix_caching=False))  # every run computes its prompts
    eos = sorted(engine.eos_ids)
    results: dict = {}
    for name, prompts in workloads.items():
        r: dict = {}
        run_engine(engine, prompts[:1], 8, 0, False)  # warm-up (first use of every kernel), untimed
        runs: dict = {}
        for _ in range(args.repeats):
            for label, kk, together in (("engine", 0, False), ("engine_spec", k, False)) + (
                    (("engine_c", 0, True), ("engine_spec_c", k, True)) if C > 1 else ()):
                got = run_engine(engine, prompts[:C] if together else prompts, N, kk, together, args.temperature)
                runs.setdefault(label, []).append(got)
                print(f"{name:4s} {label:14s} {got['tokens_per_s']:7.1f} tok/s"
                      + (f"  drafts {got['draft_tokens']}, accepted {got['accepted_tokens']}" if kk else ""), flush=True)
        for label, rs in runs.items():
            best = max(rs, key=lambda x: x["tokens_per_s"])
            r[label] = {**best, "runs_tokens_per_s": [round(x["tokens_per_s"], 2) for x in rs]}
        for label, lookup in (("hf_generate", 0), ("hf_prompt_lookup", k)):
            rs = []
            for _ in range(args.repeats):
                rs.append(run_hf(hf_model, prompts, N, lookup, eos, args.temperature))
                print(f"{name:4s} {label:14s} {rs[-1]['tokens_per_s']:7.1f} tok/s", flush=True)
            r[label] = {**max(rs, key=lambda x: x["tokens_per_s"]),
                        "runs_tokens_per_s": [round(x["tokens_per_s"], 2) for x in rs]}
        spec = r["engine_spec"]
        pairs = list(zip(r["engine"]["tokens"], spec["tokens"]))
        r["identical_with_and_without"] = sum(a == b for a, b in pairs) / len(pairs)
        if C > 1:
            pc = list(zip(r["engine_c"]["tokens"], r["engine_spec_c"]["tokens"]))
            r["identical_with_and_without_c"] = sum(a == b for a, b in pc) / len(pc)
            r["engine_spec_over_engine_c"] = r["engine_spec_c"]["tokens_per_s"] / r["engine_c"]["tokens_per_s"]
        r["accepted_share"] = spec["accepted_tokens"] / max(1, spec["draft_tokens"])
        r["tokens_per_checked_step"] = (spec["accepted_tokens"] + spec["steps"]) / max(1, spec["steps"])
        r["engine_spec_over_engine"] = spec["tokens_per_s"] / r["engine"]["tokens_per_s"]
        r["engine_spec_over_hf_prompt_lookup"] = spec["tokens_per_s"] / r["hf_prompt_lookup"]["tokens_per_s"]
        r["engine_spec_over_hf_generate"] = spec["tokens_per_s"] / r["hf_generate"]["tokens_per_s"]
        r["hf_lookup_over_hf_generate"] = r["hf_prompt_lookup"]["tokens_per_s"] / r["hf_generate"]["tokens_per_s"]
        r["engine_vs_hf_common_prefix_share"] = sum(
            common_prefix(a, b) / max(1, len(b)) for a, b in zip(r["engine"]["tokens"], r["hf_generate"]["tokens"])) / len(prompts)
        r["mean_new_tokens"] = sum(map(len, spec["tokens"])) / len(prompts)
        for label in list(r):
            if isinstance(r[label], dict):
                r[label].pop("tokens", None)
        results[name] = r
        for key in ("engine_spec_over_engine", "engine_spec_over_hf_prompt_lookup", "engine_spec_over_hf_generate",
                    "hf_lookup_over_hf_generate", "accepted_share", "tokens_per_checked_step",
                    "identical_with_and_without") + (("engine_spec_over_engine_c", "identical_with_and_without_c")
                                                     if C > 1 else ()):
            print(f"{name:4s} {key:36s} {r[key]:.2f}")
    out = {"cpu": cpu_ext.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "base": args.base,
           "dtype": str(dtype).removeprefix("torch."), "num_speculative_tokens": k,
           "speculative_schedule": args.speculative_schedule, "temperature": args.temperature,
           "prompt_lookup": [args.prompt_lookup_min, args.prompt_lookup_max], "new_tokens": N, "prompts": args.prompts,
           "concurrency": C, "repeats": args.repeats, "results": results}
    write_outputs(args, out, markdown)
    return out


def markdown(out: dict) -> str:
    C = out["concurrency"]
    rows = ["| workload | HF generate | HF + prompt lookup | engine | engine + prompt lookup | spec / engine | "
            "spec / HF lookup | drafts accepted | tokens a checked step | same replies |"
            + (f" engine at {C} | spec at {C} | spec / engine at {C} |" if C > 1 else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if C > 1 else "")]
    for name, r in out["results"].items():
        row = (f"| {name} (mean {r['mean_new_tokens']:.0f} new tokens) | {r['hf_generate']['tokens_per_s']:.1f} | "
               f"{r['hf_prompt_lookup']['tokens_per_s']:.1f} | {r['engine']['tokens_per_s']:.1f} | "
               f"{r['engine_spec']['tokens_per_s']:.1f} | {r['engine_spec_over_engine']:.2f} | "
               f"{r['engine_spec_over_hf_prompt_lookup']:.2f} | {r['accepted_share']:.0%} | "
               f"{r['tokens_per_checked_step']:.2f} | {r['identical_with_and_without']:.0%} |")
        if C > 1:
            row += (f" {r['engine_c']['tokens_per_s']:.1f} | {r['engine_spec_c']['tokens_per_s']:.1f} | "
                    f"{r['engine_spec_over_engine_c']:.2f} |")
        rows.append(row)
    rows.append("")
    mode = f"sampled at temperature {out['temperature']} (the engine's requests seeded)" if out["temperature"] else "greedy"
    rows.append(f"Tokens/s, {mode}, {out['dtype']}, up to {out['num_speculative_tokens']} draft tokens "
                f"({out.get('speculative_schedule', 'cost')} schedule) from n-grams of "
                f"{out['prompt_lookup'][0]}-{out['prompt_lookup'][1]} (HF: up to {out['num_speculative_tokens']}, "
                f"its n-grams of 1-2); one request at a time unless marked.")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
