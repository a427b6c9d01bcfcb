"""A/B of compiled-kernel switches on one decode step's routed FFN modules alone, the variants alternating round by round.

    python scripts/ab_modules.py --rows 1,8,32 --adapters 1,4 --rounds 40 \
        --variant 'dot=ext._amx_phase_a(False)' --variant 'amx=ext._amx_phase_a(True)'

Binds 90 module calls of the default base's FFN shapes (576 -> 1536 twice and 1536 -> 576 per layer, 30 layers; or
--shape one of them alone, --layers fewer layers: with a few the calls' weights and pools stay in cache) in
bfloat16 (or --dtype), each with its own random pools (n 8, k 2, r 8 per adapter; --adapters mixed round-robin over
the rows), and times a pass over all of them (``ModuleCall.routed``: base GEMM, routing and gather) for each variant
in turn, the order reversed every other round, plus ``bare``: the same calls with no token routed (their base GEMMs
alone, the peer the adapter's cost is measured against). Prints the median pass per variant. Outside the engine:
no decode stack, so none of its prefetching of the next module's pools. Each ``--variant NAME=STATEMENT`` is Python
run with ``ext`` (the compiled module) before its pass; the first variant's statement runs again at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from remix.kernels import cpu_ext


SHAPES = {"ffn": [(576, 1536), (576, 1536), (1536, 576)], "576x1536": [(576, 1536)], "1536x576": [(1536, 576)]}


def bind_ffn_modules(nad: int, dtype: torch.dtype, shape: str = "ffn", layers: int = 30) -> list:
    """Compiled module calls of the default base's FFN shapes, per layer 576 -> 1536 twice and 1536 -> 576 (``shape``
    "ffn"; or one of them alone), ``layers`` layers (90 calls at the default), each with its own random base weight and
    pools of ``nad`` adapters (n 8, k 2, r 8, omega 0.5): [(call, d_in)]."""
    calls = []
    for D, O in SHAPES[shape] * layers:
        base = torch.nn.Linear(D, O, bias=False).to(dtype)
        N = 8 * nad
        router = torch.randn(N, D) * 0.05
        a = (torch.randn(N * 8, D) * 0.05).to(cpu_ext.pool_dtype(dtype))
        bt = (torch.randn(N * 8, O) * 0.05).to(cpu_ext.pool_dtype(dtype))
        tables = (torch.arange(nad) * 8, torch.full((nad,), 8), torch.full((nad,), 2), torch.full((nad,), 0.5))
        calls.append((cpu_ext.bind_module(base, router, a, bt, tables, 8, 2), D))
    return calls


def slots_of(T: int, nad: int, mix: str = "runs") -> torch.Tensor:
    """Each row's adapter: round-robin below 64 rows (a decode step), from 64 each adapter a contiguous run of rows
    (the engine packs each sequence's prompt tokens together); mix "round-robin": round-robin at every row count (a
    decode step of 64 or more sequences)."""
    return torch.arange(T) % nad if T < 64 or mix == "round-robin" else torch.arange(T) * nad // T


NONE = torch.empty(0, dtype=torch.int64)  # (no routing counts kept)


def pass_ms(calls, xs: dict, slots: torch.Tensor) -> float:
    """One pass over the bound calls (``ModuleCall.routed``, x of each call's d_in from ``xs``), in ms."""
    t0 = time.perf_counter()
    for call, D in calls:
        call.routed(xs[D], slots, NONE)
    return 1e3 * (time.perf_counter() - t0)


def _at_least_one(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def module_args(doc: str, rows: str, rounds: int) -> argparse.ArgumentParser:
    """The options the module scripts share: --rows, --adapters, --rounds, --dtype, --mix, --shape, --layers."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=rows)
    ap.add_argument("--adapters", default="1,4")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--mix", default="runs", choices=("runs", "round-robin"),
                    help="how calls of 64 rows or more mix the adapters: contiguous runs (prefill) or round-robin")
    ap.add_argument("--shape", default="ffn", choices=tuple(SHAPES),
                    help="the calls' shapes: a layer's three FFN projections, or one shape alone")
    ap.add_argument("--layers", type=_at_least_one, default=30,
                    help="layers of calls (30: the default base's, weights from memory; a few: from cache)")
    return ap


def main(argv=None) -> None:
    ap = module_args(__doc__, "1,8,32", 40)
    ap.add_argument("--variant", action="append", required=True, help="NAME=STATEMENT (at least two)")
    args = ap.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variant)
    if len(variants) < 2 or "bare" in variants:
        ap.error("--variant: give at least two, none named bare")
    ext = cpu_ext.load()
    if ext is None:
        ap.error("the compiled CPU kernels are not built here")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    for nad in (int(a) for a in args.adapters.split(",")):
        calls = bind_ffn_modules(nad, dtype, args.shape, args.layers)
        for T in (int(t) for t in args.rows.split(",")):
            xs = {d: torch.randn(T, d).to(dtype) for d in (576, 1536)}
            routed = slots_of(T, nad, args.mix)
            bare = torch.full((T,), -1, dtype=torch.int64)
            names = [*variants, "bare"]
            times = {v: [] for v in names}
            with torch.inference_mode():
                for rnd in range(args.rounds):
                    for v in names if rnd % 2 == 0 else names[::-1]:
                        if v != "bare":
                            exec(variants[v], {"ext": ext})
                        times[v].append(pass_ms(calls, xs, bare if v == "bare" else routed))
            print(f"adapters={nad} rows={T}  " + "  ".join(f"{v} {statistics.median(times[v]):.3f} ms" for v in names),
                  flush=True)
    exec(next(iter(variants.values())), {"ext": ext})


if __name__ == "__main__":
    main()
