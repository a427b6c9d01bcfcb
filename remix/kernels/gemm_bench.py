"""The weight GEMMs of one decode step, the compiled kernels' against ATen's, in one run.

    python -m remix.kernels.gemm_bench [--base smollm2-135m-instruct] [--dtype bfloat16] [--rows 1,8,32,64]
                                       [--batch-invariant] [--json out.json]

For each row count it runs every linear of the model once in model order (q/k/v fused as the engine fuses them, o,
gate, up, down per layer, then the LM head) - so the weights stream from memory as in a decode step - with
``cpu_ext.linear`` (the engine's base GEMM: the dot-product kernel, or AMX tiles for bfloat16 where the CPU has them)
and with ``F.linear`` (ATen: MKL / oneDNN), the two interleaved pass by pass, and prints the median time per
projection kind and in all, the GB/s of weights read, and ATen's time over ours. ``REMIX_DISABLE_AMX=1`` compares
the AVX512-BF16 kernel instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import remix
from remix.kernels import cpu_ext
from remix.settings import HelpFormatter


def groups_of(model) -> dict[str, list[torch.Tensor]]:
    """The weights of one decode step by projection kind, in model order (q/k/v concatenated, as the engine fuses them)."""
    out: dict[str, list[torch.Tensor]] = {}
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        out.setdefault("qkv", []).append(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).detach())
        out.setdefault("o", []).append(at.o_proj.weight.detach())
        for name in ("gate", "up", "down"):
            out.setdefault(name, []).append(getattr(mlp, f"{name}_proj").weight.detach())
    out["lm_head"] = [model.lm_head.weight.detach()]
    return out


def time_passes(groups: dict, rows: int, passes: int) -> dict[str, dict[str, float]]:
    """Median ms per kind for ours and ATen's, the two interleaved pass by pass (a pass: every kind in model order)."""
    dtype = next(iter(groups.values()))[0].dtype
    xs = {d: torch.randn(rows, d, dtype=dtype) for d in {w.shape[1] for ws in groups.values() for w in ws}}
    none = torch.empty(0, dtype=dtype)
    fns = {"ours": lambda x, w: cpu_ext.linear(x, w, none), "aten": lambda x, w: F.linear(x, w)}
    times = {who: {kind: [] for kind in groups} for who in fns}
    with torch.inference_mode():
        for p in range(passes + 1):  # the first pass warms up (kernel build, oneDNN primitives) and is dropped
            for who, fn in fns.items():
                for kind, ws in groups.items():
                    start = time.perf_counter()
                    for w in ws:
                        fn(xs[w.shape[1]], w)
                    if p:
                        times[who][kind].append((time.perf_counter() - start) * 1e3)
    return {who: {kind: statistics.median(v) for kind, v in per.items()} for who, per in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--base", default=remix.DEFAULT_BASE)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--rows", default="1,8,32,64", help="comma-separated row counts (decode batch sizes)")
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--batch-invariant", action="store_true",
                    help="ours at every row count, as the server's --batch-invariant runs it (else oneDNN's GEMM from "
                         "128 bfloat16 / 256 float32 rows, where both sides then time the same GEMM)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows: comma-separated integers, got {args.rows!r}")
    if any(r < 1 for r in rows) or args.passes < 1:
        ap.error("--rows and --passes must be positive")
    if cpu_ext.load() is None:
        ap.error("the compiled kernels are not available here (no compiler, or REMIX_DISABLE_EXT is set)")
    was = cpu_ext.set_batch_invariant(args.batch_invariant)
    try:
        return run(args, rows)
    finally:
        cpu_ext.set_batch_invariant(was)


def run(args, rows: list[int]) -> dict:
    model, _ = remix.load_base(args.base, dtype=getattr(torch, args.dtype))
    groups = groups_of(model)
    out = {"config": {"base": args.base, "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "batch_invariant": args.batch_invariant,
                      "amx_bf16": cpu_ext.amx_bf16(), "cpu": cpu_ext.cpu_model(), "torch": torch.__version__}, "results": []}
    for r in rows:
        t = time_passes(groups, r, args.passes)
        mb = {kind: sum(w.numel() * w.element_size() for w in ws) / 1e6 for kind, ws in groups.items()}
        total = {who: sum(v.values()) for who, v in t.items()}
        for kind in groups:
            print(f"rows {r:4d} {kind:8s} {mb[kind]:6.1f} MB  ours {t['ours'][kind]:7.2f} ms ({mb[kind] / t['ours'][kind]:5.1f} GB/s)"
                  f"  aten {t['aten'][kind]:7.2f} ms")
        ratio = total["aten"] / total["ours"]
        print(f"rows {r:4d} all      {sum(mb.values()):6.1f} MB  ours {total['ours']:7.2f} ms  aten {total['aten']:7.2f} ms"
              f"  aten_over_ours {ratio:.2f}")
        out["results"].append({"rows": r, "ms": t, "total_ms": total, "weights_mb": mb, "aten_over_ours": ratio})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
