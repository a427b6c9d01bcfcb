"""A/B of compiled-kernel switches that change no value, the variant alternating step by step within one run.

    python scripts/ab_steps.py --concurrency 8,32 --adapters 1,4 --runs 3 \
        --variant 'off=ext._ahead_from(0, 0.0)' --variant 'on=ext._ahead_from(16, 0.0)'

On a shared VM whole runs in turn drift apart by 10-20 %; here the engine serves one set of requests and every decode
step runs the next variant (each ``--variant NAME=STATEMENT`` is Python run with ``ext``, the compiled module, before
the step), so a slow spell lands on all of them. Only switches that leave every value unchanged may be compared so
(the requests run on whatever each step computed). Prints, per concurrency and adapter count, the median full-batch
decode step and the median time of its FFN projections (the decode stack's clock; --ops picks other kinds) for each
variant; the first variant's statement runs again at the end. Default base in bfloat16 (or --dtype), prompts of 128
tokens (--long-prompts 8:1500: the first 8 requests of each level 1,500 tokens, so a step's rows have mixed lengths,
the long ones together). --stages: each variant's ReMix module calls timed stage by stage as well (the kernels' module
clock in the timed steps: route, the barriers, phase A, the GEMM slice, phase B, us a call per thread, and the calls
it counted a step; its reads add a little to every variant alike), which tells a change that moves time from one stage
into another from one that saves it. The clock does not count a routed gate and up run as one pair (steps of fewer
than 9 rows, `_fuse_pair_below`): there the stages are the down projections' alone (30 calls a step, not 90). --peft: every request on server.bench's peft LoRA (rank 16 on q / k / v / o and the FFN) instead:

    python scripts/ab_steps.py --peft --concurrency 1,8 --ops qkv \
        --variant 'three=ext._qkv_gather(False)' --variant 'fused=ext._qkv_gather(True)'

--threads N sets torch's threads for the run (1: every op on the stepping thread alone, the single-threaded path).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import remix
from remix.kernels import cpu_ext, tune_cpu_allocator
from server.bench import make_adapter, make_peft_adapter, prompts_of
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--adapters", default="1", help="comma-separated: ReMix adapters mixed in the batch (0: bare base)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="runs of the requests at each setting (steps alternate within)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--variant", action="append", required=True, help="NAME=STATEMENT (at least two)")
    ap.add_argument("--peft", action="store_true", help="requests on a peft LoRA (q / k / v / o + FFN), not --adapters")
    ap.add_argument("--ops", default="gate,up,down", help=f"the stack's ops whose time is printed: {','.join(cpu_ext.STACK_OPS)}")
    ap.add_argument("--stages", action="store_true",
                    help="also time each ReMix module call's stages (cpu_ext.module_clock) in the timed steps: per "
                         "variant and thread, us a call")
    ap.add_argument("--long-prompts", default="", metavar="N:TOKENS",
                    help="the first N requests of each level get prompts of TOKENS tokens (the rest 128): rows of "
                         "mixed lengths, the long ones together")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the run (0: torch's default, the CPUs): 1 times the single-threaded path")
    args = ap.parse_args(argv)
    if args.threads < 0:
        ap.error(f"--threads: 0 (torch's default) or more, got {args.threads}")
    long_n, long_len = 0, 128
    if args.long_prompts:
        try:
            long_n, long_len = (int(v) for v in args.long_prompts.split(":"))
        except ValueError:
            ap.error(f"--long-prompts: N:TOKENS (two integers), got {args.long_prompts!r}")
        if long_n < 0 or long_len < 1:
            ap.error(f"--long-prompts: N >= 0 and TOKENS >= 1, got {args.long_prompts!r}")
    variants = dict(v.split("=", 1) for v in args.variant)
    if len(variants) < 2:
        ap.error("--variant: give at least two")
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    ext = cpu_ext.load()
    if ext is None:
        ap.error("the compiled CPU kernels are not built here")
    model, tok = remix.load_base("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp(prefix="remix-ab-"))
    paths = [make_adapter(model, tmp / f"a{i}", seed=i) for i in range(4)]
    if args.peft:
        make_peft_adapter(remix.load_base("smollm2-135m-instruct")[0], tmp / "peft")
    ops_shown = args.ops.split(",")
    if not set(ops_shown) <= set(cpu_ext.STACK_OPS):
        ap.error(f"--ops: pick from {', '.join(cpu_ext.STACK_OPS)}")
    model.to(dtype=getattr(torch, args.dtype))
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = Engine(model, tok, EngineConfig(max_model_len=max(128, long_len) + args.new_tokens + 8, max_num_seqs=max(levels),
                                             max_queue=1024, max_batched_tokens=512, prefix_caching=False))
    for i, p in enumerate(paths):
        engine.load_adapter(f"a{i}", str(p))
    if args.peft:
        engine.load_adapter("peft", str(tmp / "peft"))
    engine.warm_up()
    names = list(variants)
    for count in ([1] if args.peft else [int(a) for a in args.adapters.split(",")]):
        adapters = ["peft"] if args.peft else [None] if count == 0 else [f"a{i}" for i in range(count)]
        for c in levels:
            n_long = min(long_n, c)
            prompts = prompts_of(tok, n_long, long_len) + prompts_of(tok, c - n_long, 128)
            step = {v: [] for v in names}
            ffn = {v: [] for v in names}
            stages = {v: [] for v in names}  # per variant: per thread {stage: ms} summed over the timed steps
            calls = {v: 0 for v in names}
            for run in range(args.runs):
                for i, p in enumerate(prompts):
                    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
                    engine.submit(GenerationRequest(f"ab-{time.monotonic_ns()}-{i}", p, params, adapters[i % len(adapters)]),
                                  lambda e: None)
                cpu_ext.stack_clock(True)
                n = run
                while engine.has_work():
                    v = names[n % len(names)]
                    n += 1
                    exec(variants[v], {"ext": ext})
                    if args.stages:
                        cpu_ext.module_clock(True)
                    t0 = time.perf_counter()
                    engine.step()
                    dt = time.perf_counter() - t0
                    ops, runs = cpu_ext.stack_clock(True)
                    threads, ncalls = cpu_ext.module_clock(False) if args.stages else ([], 0)
                    if engine.last_step["prefill_tokens"] == 0 and engine.last_step["decode_rows"] == c and runs == 1:
                        step[v].append(1000 * dt)
                        ffn[v].append(sum(ops.get(k, 0.0) for k in ops_shown))
                        add_stages(stages[v], threads)
                        calls[v] += ncalls
                cpu_ext.stack_clock(False)
            print(f"c={c} adapters={'peft' if args.peft else count} steps a variant={len(step[names[0]])}  " + "  ".join(
                f"{v}: step {statistics.median(step[v]):.2f} ms, {'+'.join(ops_shown)} {statistics.median(ffn[v]):.2f}"
                for v in names), flush=True)
            if args.stages:
                for v in names:
                    print(f"  {v}: {calls[v] / max(1, len(step[v])):.0f} module calls counted a step", flush=True)
                    for h, per in enumerate(stages[v]):
                        print(f"  {v} thread {h}: " + " | ".join(
                            f"{k} {1000 * ms / max(1, calls[v]):.1f}" for k, ms in per.items()) + " us a call", flush=True)
    exec(variants[names[0]], {"ext": ext})


def add_stages(total: list[dict[str, float]], threads: list[dict[str, float]]) -> None:
    """Adds one step's module clock (per thread {stage: ms}, cpu_ext.module_clock) into ``total``."""
    for h, per in enumerate(threads):
        if h == len(total):
            total.append(dict.fromkeys(per, 0.0))
        for k, ms in per.items():
            total[h][k] += ms


if __name__ == "__main__":
    main()
