"""A stack of adapters of several ranks: padded to the largest against each LoRA at its own rank, in one run.

    python scripts/ab_ranks.py [--rounds 15]

A ReMix pool (n 8, k 2, r 8) beside a plain LoRA of rank 16 (n 1, k 1) on the default base's FFN shapes, every token on
the ReMix adapter. Two measurements, each variant timed in turn in every round (medians printed, with their ratio):
  compiled  90 bound module calls (base GEMM, routing, gather; bfloat16) bound without ranks (the kernel reads the
            padded zeros) and with ``ranks`` (it skips them), at 8 and 32 rows; outputs checked equal
  torch     one module's fused torch path (the CUDA / no-kernels path; float32) over four such ReMix adapters and the
            LoRA: the stack padded to rank 16 against the compact one (``StackedPools.cols``), at 8 / 32 / 128 tokens;
            the largest difference of the outputs printed (the GEMMs' inner dimensions differ, so their sums' order)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from remix.config import MixtureConfig
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.layer import ReMixLinear
from remix.stack import RoutingContext, StackedLinear, _fused_forward

SHAPES = [(576, 1536), (576, 1536), (1536, 576)]  # gate, up, down


def in_turn(fns: dict, rounds: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for rnd in range(rounds):
        for name in (list(fns) if rnd % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def compiled(rounds: int) -> None:
    dtype, mods = torch.bfloat16, []
    tables = (torch.tensor([0, 8]), torch.tensor([8, 1]), torch.tensor([2, 1]), torch.tensor([1.0, 1.0]))
    ranks = torch.tensor([8] * 8 + [16])
    for i in range(90):
        D, O = SHAPES[i % 3]
        base = nn.Linear(D, O, bias=False).to(dtype)
        a, bt = torch.zeros(9, 16, D), torch.zeros(9, 16, O)  # padded to 16: the ReMix LoRAs' rows 8-15 are zero
        a[:8, :8], bt[:8, :8], a[8], bt[8] = (torch.randn(8, 8, D) * 0.05, torch.randn(8, 8, O) * 0.05,
                                              torch.randn(16, D) * 0.05, torch.randn(16, O) * 0.05)
        a, bt = a.reshape(-1, D).to(dtype).contiguous(), bt.reshape(-1, O).to(dtype).contiguous()
        router = torch.randn(9, D)
        mods.append((cpu_ext.bind_module(base, router, a, bt, tables, 16, 2),
                     cpu_ext.bind_module(base, router, a, bt, tables, 16, 2, ranks=ranks), D))
    none = torch.empty(0, dtype=torch.int64)
    for T in (8, 32):
        xs = {D: torch.randn(T, D).to(dtype) for D in (576, 1536)}
        slots = torch.zeros(T, dtype=torch.int64)
        with torch.inference_mode():
            assert all(torch.equal(p.routed(xs[D], slots, none)[0], o.routed(xs[D], slots, none)[0]) for p, o, D in mods)
            got = in_turn({k: (lambda j=j: [m[j].routed(xs[m[2]], slots, none) for m in mods])
                           for k, j in (("padded", 0), ("own ranks", 1))}, rounds)
        print(f"compiled, 90 modules, {T} rows: padded {1000 * got['padded']:.2f} ms, own ranks "
              f"{1000 * got['own ranks']:.2f} ms ({got['own ranks'] / got['padded']:.2f}x)", flush=True)


def torch_path(rounds: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(576, 1536, bias=False)
    stacked = StackedLinear(base)
    for slot, cfg in enumerate([MixtureConfig(n=8, k=2, r=8)] * 4 + [MixtureConfig(n=1, k=1, r=16)]):
        layer = ReMixLinear(base, cfg).eval()
        nn.init.normal_(layer.lora_B, std=0.02)
        layer.requires_grad_(False)
        stacked.stack.add(slot, layer.lora_A, layer.lora_B, layer.router, layer.k, layer.omega)
    with cpu_ext.disabled():
        stacked.stack.ensure_torch()
    compact = stacked.stack.fused
    padded = stacked.stack._stack_all(torch.float32)
    padded.pa = torch.cat([padded.router, padded.a], 0).contiguous()
    for T in (8, 32, 128):
        x, y0 = torch.randn(T, 576), torch.randn(T, 1536)
        ctx = RoutingContext.ungrouped(torch.arange(T) % 5, count=False)
        outs = {}

        def run(name, f):
            def go():
                stacked.stack.fused = f
                ctx.plans.clear()
                outs[name] = _fused_forward(x, y0.clone(), stacked.stack, ctx, "m")
            return go

        with torch.inference_mode():
            got = in_turn({"padded": run("padded", padded), "compact": run("compact", compact)}, rounds * 2)
        diff = float((outs["padded"] - outs["compact"]).abs().max())
        print(f"torch path, one module, {T} tokens ({padded.a.shape[0]} against {compact.a.shape[0]} rows): padded "
              f"{1e6 * got['padded']:.0f} us, compact {1e6 * got['compact']:.0f} us "
              f"({got['compact'] / got['padded']:.2f}x), outputs within {diff:.1e}", flush=True)
    stacked.stack.fused = compact


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    tune_cpu_allocator()
    if cpu_ext.load() is not None:
        compiled(args.rounds)
    else:
        print("compiled kernels not built here: the compiled measurement is skipped")
    torch_path(args.rounds)


if __name__ == "__main__":
    main()
