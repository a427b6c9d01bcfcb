"""Where one compiled module call's time goes, stage by stage and thread by thread (the kernels' module clock).

    python scripts/module_stages.py --rows 8,32,512 --adapters 1,4 [--dtype bfloat16|float32] [--rounds 20]
        [--shape ffn|576x1536|1536x576] [--layers 30]

Binds the 90 FFN module calls of scripts/ab_modules.py (the default base's shapes, random pools of n 8, k 2, r 8 per
adapter; --shape one shape alone, --layers fewer calls, which then stay in cache), runs ``--rounds`` passes over them
with the module clock on (``cpu_ext.module_clock``) and prints, per row count and adapter count, each stage's time in
microseconds a module for each thread (route, the barrier after it, the pairs' sort and x's packing, phase A, the
barrier after it, the thread's slice of the base GEMM where the call runs it, phase B), their sum, and a pass's wall
time per module with the adapter and bare (the same calls with no token routed: their base GEMMs alone), and the
threads' shares of the split work at the end (``cpu_ext.thread_shares``: even unless one thread measured slower; a
thread's stage times are over all its calls, those before the shares moved included). Below 64 rows
the threads split each stage; from 64 each routes and gathers its own tokens; bfloat16 from 128 rows on AMX runs fused
(the delta inside the GEMM's tiles: "gemm" is that GEMM, "phase_b" the delta's packing), elsewhere from 128 rows
oneDNN's GEMM before the call, outside the clock ("gemm" 0).
Only time is read: the clock changes no value.
"""

from __future__ import annotations

import statistics

import torch

from ab_modules import bind_ffn_modules, module_args, pass_ms, slots_of
from remix.kernels import cpu_ext


def main(argv=None) -> None:
    ap = module_args(__doc__, "8,32,512", 20)
    args = ap.parse_args(argv)
    if cpu_ext.load() is None:
        ap.error("the compiled CPU kernels are not built here")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print("us a module, thread by thread: " + " | ".join(cpu_ext.MODULE_STAGES) + " | sum", flush=True)
    with torch.inference_mode():
        for nad in (int(a) for a in args.adapters.split(",")):
            calls = bind_ffn_modules(nad, dtype, args.shape, args.layers)
            for T in (int(t) for t in args.rows.split(",")):
                xs = {d: torch.randn(T, d).to(dtype) for d in (576, 1536)}
                routed, bare = slots_of(T, nad, args.mix), torch.full((T,), -1, dtype=torch.int64)
                for _ in range(2):  # warm-up
                    pass_ms(calls, xs, routed)
                cpu_ext.module_clock(True)
                walls, bares = [], []
                for _ in range(args.rounds):  # the bare pass between, with the clock on (it counts no call)
                    walls.append(pass_ms(calls, xs, routed))
                    bares.append(pass_ms(calls, xs, bare))
                threads, n = cpu_ext.module_clock(False)
                print(f"adapters={nad} rows={T} ({n} calls): pass {statistics.median(walls):.2f} ms, bare "
                      f"{statistics.median(bares):.2f} ms; a module {1e3 * statistics.median(walls) / len(calls):.1f} "
                      f"us, bare {1e3 * statistics.median(bares) / len(calls):.1f}", flush=True)
                for h, stages in enumerate(threads):
                    us = [1e3 * stages[s] / max(1, n) for s in cpu_ext.MODULE_STAGES]
                    print(f"  thread {h}: " + " | ".join(f"{s} {u:.1f}" for s, u in zip(cpu_ext.MODULE_STAGES, us))
                          + f" | sum {sum(us):.1f}", flush=True)
                print(f"  threads' shares at the end: {cpu_ext.thread_shares()}", flush=True)


if __name__ == "__main__":
    main()
