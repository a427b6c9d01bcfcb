"""Where a CUDA engine step goes: for the next session with a GPU (the device tool), one call.

    python3 scripts/gpu/step_profile.py --base .smol --random-weights --out $OUT   # on the GPU machine
    (carry .whl and .smol from scripts/gpu/prepare.sh; install the wheels first, as scripts/gpu/check.sh does)

The H200 run of the twenty-fifth session (docs/BENCHMARKS.md, "On a GPU") left two questions this answers in one run:

1. Prefill with an adapter: one adapter over the bare engine was 0.77-0.87 at 32 sequences while their decode steps
   were equal, and prefill steps run eagerly. Here: the wall time of a 32-prompt prefill (prompts of 128 tokens) for
   the bare base, one adapter and four mixed, at --max-batched-tokens 512 (the default) and 2048 - if prefill is bound
   by launches, the larger budget (fewer, larger steps) shrinks the adapter's share.
2. The decode step: ~6-8 ms of graph replay against ~1 ms of GEMMs, and equal with or without an adapter (so not the
   adapter's kernel count). Here: the wall time of decode steps at 1 / 8 / 32 sequences and a torch.profiler table of
   one 32-sequence decode step and one prefill step, bare and with one adapter (the top ops by device time and by
   host time), written to --out (profile_{decode,prefill}_{base,one}.txt) and summarised on stdout.

Runs on the CPU too (--device cpu: a smoke test of the script; the profiles then hold CPU time only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


import remix
from server.bench import make_adapter, prompts_of, synchronize
from server.cli import resolve_device, resolve_dtype
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams


def engine_for(model, tok, paths, budget: int, max_len: int) -> Engine:
    engine = Engine(model, tok, EngineConfig(max_model_len=max_len, max_num_seqs=32, max_queue=1024,
                                             max_batched_tokens=budget, prefix_caching=False))
    for i, path in enumerate(paths):
        engine.load_adapter(f"a{i}", str(path))
    engine.warm_up()
    return engine


def submit(engine: Engine, prompts, adapters, new_tokens: int) -> None:
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(f"p{time.monotonic_ns()}-{i}", p,
                                        SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                                        adapters[i % len(adapters)]), lambda e: None)


def timed_step(engine: Engine, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    engine.step()
    synchronize(device)
    return time.perf_counter() - t0


def prefill_then_decode(engine: Engine, device, prompts, adapters, decode_steps: int) -> tuple[float, int, float]:
    """Seconds until every prompt is prefilled (steps that carry prefill tokens), their number, the median decode step."""
    submit(engine, prompts, adapters, decode_steps + 4)
    prefill, steps, decode = 0.0, 0, []
    while engine.has_work():
        dt = timed_step(engine, device)
        if engine.last_step["prefill_tokens"] > 0:
            prefill += dt
            steps += 1
        elif engine.last_step["decode_rows"] == len(prompts):
            decode.append(dt)
    return prefill, steps, statistics.median(decode) if decode else float("nan")


def profile_table(engine: Engine, device, prompts, adapters, phase: str) -> str:
    """torch.profiler's tables of one step: the first after submitting the prompts (phase "prefill") or one with every
    sequence decoding ("decode")."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    submit(engine, prompts, adapters, 8)
    if phase == "decode":
        while engine.has_work() and not (engine.last_step["prefill_tokens"] == 0 and
                                         engine.last_step["decode_rows"] == len(prompts)):
            engine.step()
    synchronize(device)
    with profile(activities=activities) as prof:
        engine.step()
        synchronize(device)
    step = dict(engine.last_step)
    while engine.has_work():
        engine.step()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    return (f"{phase} step {step}, sorted by {key}\n" + events.table(sort_by=key, row_limit=40) +
            "\nsorted by self_cpu_time_total\n" + events.table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=remix.DEFAULT_BASE)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=".")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--random-weights", action="store_true", help="--base is a directory with a configuration and a "
                    "tokenizer only (scripts/gpu/prepare.sh's .smol): random weights of its shapes")
    args = ap.parse_args(argv)
    if args.random_weights:
        from random_base import random_base  # (this script's folder is on sys.path)

        args.base = random_base(args.base, tempfile.mkdtemp(prefix="remix-random-base-"))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok = remix.load_base(args.base)
    tmp = Path(tempfile.mkdtemp(prefix="remix-profile-"))
    paths = [make_adapter(model, tmp / f"a{i}", seed=i) for i in range(4)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = {"base": [None], "one": ["a0"], "four": ["a0", "a1", "a2", "a3"]}
    prompts = prompts_of(tok, args.prompts, 128)
    for budget in (512, 2048):
        model = remix.load_base(args.base)[0].to(device=device, dtype=dtype)  # a fresh copy: the engine wraps its modules
        engine = engine_for(model, tok, paths, budget, 128 + args.decode_steps + 16)
        submit(engine, prompts[:2], [None, "a0"], 4)  # warm-up
        while engine.has_work():
            engine.step()
        for name, adapters in variants.items():
            prefill, steps, decode = prefill_then_decode(engine, device, prompts, adapters, args.decode_steps)
            print(f"budget {budget:5d}  {name:5s}  prefill {1e3 * prefill:8.1f} ms in {steps:2d} steps "
                  f"({1e3 * prefill / max(steps, 1):6.1f} a step)  decode step {1e3 * decode:6.2f} ms", flush=True)
        if budget == 512:
            for c in (1, 8):
                for name in ("base", "one"):
                    _, _, decode = prefill_then_decode(engine, device, prompts[:c], variants[name], args.decode_steps)
                    print(f"budget {budget:5d}  {name:5s}  {c:2d} sequences: decode step {1e3 * decode:6.2f} ms", flush=True)
            for phase in ("decode", "prefill"):
                for name in ("base", "one"):
                    table = profile_table(engine, device, prompts, variants[name], phase)
                    (out / f"profile_{phase}_{name}.txt").write_text(table)
                    print(f"== {phase}, {name}: top ops\n" + "\n".join(table.splitlines()[:14]), flush=True)
        del engine, model


if __name__ == "__main__":
    main()
