"""Batch-invariant mode (``--batch-invariant on``) against the default engine, in one run: what it costs, what it buys.

    python -m server.bench_invariant --json out.json [--dtype auto|bfloat16|float32] [--repeats 3]

On the default base with one ReMix adapter (n=8, k=2, r=8 on every FFN projection), two engines that differ only in
``batch_invariant`` (prefix caching off in both: every round computes its prompts) serve the same greedy requests at
the same time, stepped in turn (a slow spell of the machine lands on both), ``--repeats`` rounds of two workloads:

  prefill  8 requests of 512-token prompts, 16 new tokens: mostly prefill steps of 512 rows, where the default engine
           takes oneDNN's GEMM (bfloat16 from 128 rows, float32 from 256 on AMD) and the batch-invariant one the
           compiled dot-product kernel
  decode   32 requests of 128-token prompts, 128 new tokens (server.bench's shape): mostly decode steps of 32 rows,
           the same kernel in both

Per workload: tokens/s of each engine (sums of its own steps' times), the ratio within each round (median over
rounds). What it buys: each prefill request served alone and in the batch of 8 - the share of requests whose tokens
and log-probabilities are identical both ways, per engine (1.0 for the batch-invariant engine by construction; the
default engine's share is what a user of it sees).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import remix
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.settings import HelpFormatter
from server.bench import TEXT, add_output_args, make_adapter, serve_in_turn, write_outputs
from server.cli import DTYPES, resolve_dtype
from server.engine import Engine, EngineConfig, SamplingParams
from server.engine.engine import batch_invariant_unsupported

NAMES = ("invariant", "default")
WORKLOADS = {"prefill": (8, 512, 16), "decode": (32, 128, 128)}  # requests, prompt tokens, new tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m server.bench_invariant", description=__doc__, formatter_class=HelpFormatter)
    add_output_args(ap)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of each workload (both engines in each)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as the server picks it)")
    ap.add_argument("--workloads", default="prefill=8x512x16,decode=32x128x128",
                    help="name=REQUESTSxPROMPTxNEW, comma-separated (the first is also served alone for agreement)")
    args = ap.parse_args(argv)
    try:
        workloads = {w.split("=")[0]: tuple(int(v) for v in w.split("=")[1].split("x")) for w in args.workloads.split(",")}
        assert all(len(v) == 3 and min(v) >= 1 for v in workloads.values())
    except (IndexError, ValueError, AssertionError):
        ap.error(f"--workloads: name=REQUESTSxPROMPTxNEW, comma-separated, got {args.workloads!r}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    tune_cpu_allocator()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    why = batch_invariant_unsupported(torch.device("cpu"), dtype, "lean")
    if why:
        raise SystemExit(f"error: batch-invariant mode: {why}")
    model, tok = remix.load_base(args.base)
    adapter = make_adapter(model, Path(tempfile.mkdtemp(prefix="remix-bench-inv-")) / "a0", seed=0)
    del model
    longest = max(p + n for _, p, n in workloads.values())
    engines = {}
    for name in NAMES:
        copy, _ = remix.load_base(args.base, dtype=dtype)
        engines[name] = Engine(copy, tok, EngineConfig(
            max_model_len=longest + 8, max_num_seqs=max(c for c, _, _ in workloads.values()), max_queue=1024,
            max_batched_tokens=512, prefix_caching=False, batch_invariant=name == "invariant"))
        engines[name].load_adapter("a0", str(adapter))
    ids = tok(TEXT * (longest // 10 + 40)).input_ids
    out = {"cpu": cpu_ext.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "base": args.base, "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats, "workloads": {}}
    for w, (count, length, new) in workloads.items():
        prompts = [ids[7 * i : 7 * i + length] for i in range(count)]  # distinct prompts
        rounds = []
        for r in range(args.repeats):
            got = serve_in_turn(engines, {name: prompts for name in NAMES},
                                SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
            rounds.append({name: count * new / got[name]["wall_s"] for name in NAMES})
            print(f"{w} round {r}: " + "  ".join(f"{n} {rounds[-1][n]:.1f} tok/s" for n in NAMES), flush=True)
        out["workloads"][w] = {
            "requests": count, "prompt_tokens": length, "new_tokens": new,
            **{name: {"tokens_per_s": max(x[name] for x in rounds), "runs": [x[name] for x in rounds]} for name in NAMES},
            "invariant_over_default_tokens_per_s": statistics.median(x["invariant"] / x["default"] for x in rounds)}
    w, (count, length, new) = next(iter(workloads.items()))
    prompts = [ids[7 * i : 7 * i + length] for i in range(count)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=0)
    batch = serve_in_turn(engines, {name: prompts for name in NAMES}, params)
    same = {name: 0 for name in NAMES}
    for i, p in enumerate(prompts):
        alone = serve_in_turn(engines, {name: [p] for name in NAMES}, params)
        for name in NAMES:
            same[name] += (alone[name]["tokens"][0], alone[name]["logprobs"][0]) == \
                (batch[name]["tokens"][i], batch[name]["logprobs"][i])
    agreement = {name: same[name] / count for name in NAMES}
    out["alone_equals_batch"] = agreement
    for w, r in out["workloads"].items():
        print(f"{w:8s} invariant_over_default_tokens_per_s {r['invariant_over_default_tokens_per_s']:.2f}")
    print("requests identical alone and in the batch (tokens and log-probs): " +
          ", ".join(f"{n} {v:.2f}" for n, v in agreement.items()))
    write_outputs(args, out, markdown)
    return out


def markdown(out: dict) -> str:
    rows = ["| workload | tok/s, default | tok/s, batch-invariant | ratio (median of rounds) |", "|---|---|---|---|"]
    for w, r in out["workloads"].items():
        rows.append(f"| {w} ({r['requests']} x {r['prompt_tokens']}-token prompts, {r['new_tokens']} new) | "
                    f"{r['default']['tokens_per_s']:.1f} | {r['invariant']['tokens_per_s']:.1f} | "
                    f"{r['invariant_over_default_tokens_per_s']:.2f} |")
    a = out["alone_equals_batch"]
    rows += ["", f"Requests whose tokens and log-probabilities are identical served alone and in the batch "
                 f"({out['dtype']}): default {a['default']:.0%}, batch-invariant {a['invariant']:.0%}."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
