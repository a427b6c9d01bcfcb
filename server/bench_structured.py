"""Structured output's cost per decode step, xgrammar's mask application (the server's) against torch ops, in one run.

    python -m server.bench_structured --json out.json [--requests 8] [--new-tokens 64] [--repeats 3]

Three engines on the default base (no adapter, prefix caching off) serve the same greedy requests at the same time,
stepped in turn (a slow spell of the machine lands on all of them), ``--repeats`` rounds:

  plain          no constraint
  grammar        every request constrained by a regex that cannot complete within the tokens asked for (so every
                 request runs to max_tokens, as the plain ones do), its bitmask applied as the server applies it
                 (server/engine/grammar.py: xgrammar's CPU ``apply_token_bitmask_inplace``)
  grammar_torch  the same with the bitmask unpacked and applied by torch ops (the path for other devices)
  tools_auto     every request offered three functions (TOOLS) with tool_choice "auto": the
                 structural tag that lets text run free until a call opens (server/tools.py), as the server holds
                 every chat request with tools (the model writes text here: the cost of offering tools)

Per engine: the median full-batch decode step; per round the ratios grammar / plain, grammar / grammar_torch and
tools_auto / plain of those steps (the medians over rounds reported), and the cost per constrained sequence per step:
(grammar's step - plain's step) / requests (the same for tools_auto).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics

import torch

import remix
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.settings import HelpFormatter
from server import tools
from server.bench import add_output_args, prompts_of, serve_in_turn, write_outputs
from server.cli import DTYPES, resolve_dtype
from server.engine import Engine, EngineConfig, SamplingParams
from server.engine.grammar import Matcher
from server.protocol import ChatCompletionRequest

NAMES = ("plain", "grammar", "grammar_torch", "tools_auto")
CHARS = "[a-zA-Z0-9 ,.]"
PATTERN = CHARS + "{4000}"  # never complete within --new-tokens: every request runs to max_tokens
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {arg: {"type": "string"} for arg in args}, "required": list(args)}}}
    for name, args in (("get_weather", ("city",)), ("get_time", ("city",)), ("convert_currency", ("amount", "from", "to")))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m server.bench_structured", description=__doc__, formatter_class=HelpFormatter)
    add_output_args(ap)
    ap.add_argument("--requests", type=int, default=8, help="greedy requests served together")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="tokens of every prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated for every request")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (every engine in each)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as the server picks it)")
    args = ap.parse_args(argv)
    if min(args.requests, args.prompt_tokens, args.new_tokens, args.repeats) < 1:
        ap.error("--requests, --prompt-tokens, --new-tokens and --repeats must be at least 1")
    tune_cpu_allocator()
    cpu_ext.load()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    engines, tok = {}, None
    for name in NAMES:
        model, tok = remix.load_base(args.base, dtype=dtype)
        engines[name] = Engine(model, tok, EngineConfig(
            max_model_len=args.prompt_tokens + args.new_tokens + 8, max_num_seqs=args.requests, max_queue=4096,
            max_batched_tokens=max(512, args.prompt_tokens), prefix_caching=False))
        engines[name].warm_up()
    prompts = prompts_of(tok, args.requests, args.prompt_tokens)
    plain = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    params = {"plain": plain, **{n: dataclasses.replace(plain, grammar=("regex", PATTERN, "guided_regex"))
                                 for n in ("grammar", "grammar_torch")}}
    offered = ChatCompletionRequest(model=args.base, messages=[{"role": "user", "content": "-"}], tools=TOOLS)
    params["tools_auto"] = dataclasses.replace(plain, grammar=offered.to_sampling(args.new_tokens).grammar)
    apply = {"plain": Matcher.APPLY, "grammar": Matcher.APPLY, "grammar_torch": "torch", "tools_auto": Matcher.APPLY}
    default_apply = Matcher.APPLY
    before = {n: (lambda mode=apply[n]: setattr(Matcher, "APPLY", mode)) for n in NAMES}
    rounds = []
    try:
        for r in range(args.repeats):
            got = serve_in_turn(engines, {n: prompts for n in NAMES}, params, adapter=None, before_step=before)
            step = {n: got[n]["decode_step_s"] for n in NAMES}
            texts = {n: [tok.decode(t) for t in got[n]["tokens"]] for n in NAMES}
            rounds.append({"decode_step_ms": {n: 1000 * v for n, v in step.items()},
                           "grammar_over_plain": step["grammar"] / step["plain"],
                           "grammar_over_grammar_torch": step["grammar"] / step["grammar_torch"],
                           "us_per_constrained_sequence": 1e6 * (step["grammar"] - step["plain"]) / args.requests,
                           "tools_auto_over_plain": step["tools_auto"] / step["plain"],
                           "us_per_tools_sequence": 1e6 * (step["tools_auto"] - step["plain"]) / args.requests,
                           "tokens": {n: sum(len(t) for t in got[n]["tokens"]) for n in NAMES},
                           "constrained_texts_match": texts["grammar"] == texts["grammar_torch"]})
            print(f"round {r}: " + "  ".join(f"{n} {1000 * v:.2f} ms" for n, v in step.items())
                  + f"  grammar/plain {rounds[-1]['grammar_over_plain']:.3f}"
                  + f"  grammar/torch {rounds[-1]['grammar_over_grammar_torch']:.3f}"
                  + f"  tools_auto/plain {rounds[-1]['tools_auto_over_plain']:.3f}", flush=True)
    finally:
        Matcher.APPLY = default_apply
    sample = texts["grammar"][0]
    ratios = {key: statistics.median(r[key] for r in rounds)
              for key in ("grammar_over_plain", "grammar_over_grammar_torch", "us_per_constrained_sequence",
                          "tools_auto_over_plain", "us_per_tools_sequence")}
    out = {"config": {"base": args.base, "dtype": str(dtype).replace("torch.", ""), "requests": args.requests,
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "pattern": PATTERN, "cpu": cpu_ext.cpu_model()},
           "rounds": rounds, "ratios": ratios,
           "decode_step_ms": {n: statistics.median(r["decode_step_ms"][n] for r in rounds) for n in NAMES},
           "all_constrained_outputs_match_the_pattern": all(re.fullmatch(CHARS + "*", t) for t in texts["grammar"]),
           "tools_auto_calls": sum(tools.OPEN in t for t in texts["tools_auto"]),
           "sample": sample[:80]}
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    write_outputs(args, out, markdown)
    return out


def markdown(out: dict) -> str:
    c, s, q = out["config"], out["decode_step_ms"], out["ratios"]
    return (f"| decode step, {c['requests']} sequences | ms |\n|---|---|\n"
            f"| no constraint | {s['plain']:.2f} |\n| every sequence constrained (xgrammar's CPU apply: the server's) | "
            f"{s['grammar']:.2f} |\n| every sequence constrained (torch ops) | {s['grammar_torch']:.2f} |\n"
            f"| every sequence offered tools (tool_choice auto) | {s['tools_auto']:.2f} |\n\n"
            f"Constrained / unconstrained step {q['grammar_over_plain']:.3f}; xgrammar's apply / torch ops "
            f"{q['grammar_over_grammar_torch']:.3f}; {q['us_per_constrained_sequence']:.0f} µs per constrained sequence "
            f"per step; offered tools / unconstrained {q['tools_auto_over_plain']:.3f}, "
            f"{q['us_per_tools_sequence']:.0f} µs per sequence per step (medians over {c['repeats']} rounds).\n")


if __name__ == "__main__":
    main()
