"""The 8-bit KV cache (``--kv-cache-dtype int8``) against the model-dtype cache, in one run: speed, capacity, agreement.

    python -m server.bench_kv --json out.json [--prompt-tokens 128,1024] [--new-tokens 128] [--concurrency 32]
                              [--dtype auto|bfloat16|float32] [--repeats 3]

On the default base with one ReMix adapter (n=8, k=2, r=8 on every FFN projection), two engines that differ only in
their cache (``auto``: the model's dtype, the peer; ``int8``) serve the same greedy requests (prompts of each length,
``--new-tokens`` new tokens, prefill included) at the same time, stepped in turn (so a slow spell of the machine lands
on both), ``--repeats`` rounds. Per prompt length it reports each engine's tokens/s (over its own steps' time) and
median full-batch decode step, the fastest round's, and their ratios within each round (the median over rounds), and
how far the int8 engine's output follows the peer's: the share of each request's new tokens before the first that
differs (greedy: one flipped near-tie changes everything after it, so this is a strict measure) and the largest
difference of a chosen token's log-probability over those common tokens. Capacity: KV cache tokens per GiB of each
(what ``--kv-memory-gb`` buys). CPU only (the 8-bit cache's kernels are CPU kernels).
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
from server.bench import add_output_args, common_prefix, make_adapter, prompts_of, serve_in_turn, write_outputs
from server.cli import DTYPES, resolve_dtype
from server.engine import Engine, EngineConfig, SamplingParams
from server.engine.cache import SlotKVCache


def greedy(new_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def agreement(got: dict[str, dict]) -> dict:
    """How far the int8 engine's greedy outputs follow the model-dtype engine's on the same requests: the mean share of
    new tokens before the first difference, the share of requests with identical outputs, and the largest |log p|
    difference of the chosen tokens over the common prefixes (there both engines read the same tokens and chose the
    same one)."""
    shares, identical, worst = [], 0, 0.0
    for ta, la, tb, lb in zip(got["auto"]["tokens"], got["auto"]["logprobs"], got["int8"]["tokens"], got["int8"]["logprobs"]):
        same = common_prefix(ta, tb)
        shares.append(same / len(ta))
        identical += same == len(ta)
        worst = max([worst] + [abs(a - b) for a, b in zip(la[:same], lb[:same])])
    return {"common_prefix_share": sum(shares) / len(shares), "identical_requests": identical / len(shares),
            "max_abs_logprob_diff": worst}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m server.bench_kv", description=__doc__, formatter_class=HelpFormatter)
    add_output_args(ap)
    ap.add_argument("--prompt-tokens", default="128,1024", help="comma-separated prompt lengths, one table row each")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated for every request")
    ap.add_argument("--concurrency", type=int, default=32, help="requests served together")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per prompt length (both engines in each)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as the server picks it)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.concurrency < 1 or args.new_tokens < 1:
        ap.error("--repeats, --concurrency and --new-tokens must be at least 1")
    try:
        lengths = [int(x) for x in args.prompt_tokens.split(",")]
    except ValueError:
        ap.error(f"--prompt-tokens: a comma-separated list of integers, got {args.prompt_tokens!r}")
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    tune_cpu_allocator()
    cpu_ext.load()
    model, tok = remix.load_base(args.base)
    adapter = make_adapter(model, Path(tempfile.mkdtemp(prefix="remix-bench-kv-")) / "a0", seed=0)
    max_len = max(lengths) + args.new_tokens + 8
    engines = {}
    for kv in ("auto", "int8"):
        copy, _ = remix.load_base(args.base, dtype=dtype)
        config = EngineConfig(max_model_len=max_len, max_num_seqs=args.concurrency, max_queue=1024,
                              max_batched_tokens=512, kv_cache_dtype=kv,
                              prefix_caching=False)  # every round computes its prompts (the same ones each round)
        engines[kv] = Engine(copy, tok, config)
        engines[kv].load_adapter("a0", str(adapter))
    del model
    mc = engines["auto"].runner.model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    per_token = {kv: SlotKVCache.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, head_dim, dtype,
                                                 torch.int8 if kv == "int8" else None) for kv in engines}
    results = {}
    for length in lengths:
        prompts = prompts_of(tok, args.concurrency, length)
        tokens = args.concurrency * args.new_tokens
        each = lambda ps: {kv: ps for kv in engines}  # noqa: E731 - both engines serve the same requests
        serve_in_turn(engines, each(prompts_of(tok, 2, length)), greedy(4))  # warm-up: loads the kernels, the cache
        runs: dict[str, list] = {kv: [] for kv in engines}
        for rep in range(args.repeats):
            for kv, got in serve_in_turn(engines, each(prompts), greedy(args.new_tokens)).items():
                wall, step = got["wall_s"], got["decode_step_s"]
                runs[kv].append((wall, step))
                print(f"prompt {length:<5} kv {kv:5s} {tokens / wall:8.1f} tok/s  step {1000 * step:7.1f} ms  "
                      f"(run {rep + 1})", flush=True)
        row = {kv: {"tokens_per_s": tokens / min(w for w, _ in got), "decode_step_ms": 1000 * min(s for _, s in got),
                    "runs_tokens_per_s": [round(tokens / w, 2) for w, _ in got],
                    "runs_decode_step_ms": [round(1000 * s, 2) for _, s in got]} for kv, got in runs.items()}
        # the ratios within each round (both engines stepped in turn), their median over the rounds
        row["int8_over_auto_tokens_per_s"] = statistics.median(a[0] / b[0] for a, b in zip(runs["auto"], runs["int8"]))
        row["int8_over_auto_decode_step"] = statistics.median(b[1] / a[1] for a, b in zip(runs["auto"], runs["int8"]))
        # greedy outputs of both on the same requests (submitted together, as served), with the chosen tokens' log p
        row["agreement"] = agreement(serve_in_turn(engines, each(prompts), greedy(args.new_tokens, logprobs=0)))
        print(f"prompt {length:<5} int8/auto: tok/s {row['int8_over_auto_tokens_per_s']:.3f}  decode step "
              f"{row['int8_over_auto_decode_step']:.3f}  agreement {row['agreement']}", flush=True)
        results[length] = row
    out = {"config": {"base": args.base, "dtype": str(dtype).removeprefix("torch."), "concurrency": args.concurrency,
                      "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "cpu": cpu_ext.cpu_model()},
           "kv_tokens_per_gib": {kv: (1 << 30) // b for kv, b in per_token.items()},
           "results": results}
    print(f"KV cache tokens per GiB: {out['kv_tokens_per_gib']}")
    write_outputs(args, out, markdown)
    return out


def markdown(out: dict) -> str:
    c = out["config"]
    lines = [f"| prompt tokens | tok/s, {c['dtype']} cache | tok/s, int8 cache | ratio (median of rounds) | "
             f"decode step, {c['dtype']} | decode step, int8 | ratio (median of rounds) | "
             "new tokens before the first difference | identical requests | max abs log-prob diff |", "|" + "---|" * 10]
    for length, r in out["results"].items():
        a = r["agreement"]
        lines.append(f"| {length} | {r['auto']['tokens_per_s']:.1f} | {r['int8']['tokens_per_s']:.1f} | "
                     f"{r['int8_over_auto_tokens_per_s']:.2f} | {r['auto']['decode_step_ms']:.1f} ms | "
                     f"{r['int8']['decode_step_ms']:.1f} ms | {r['int8_over_auto_decode_step']:.2f} | "
                     f"{100 * a['common_prefix_share']:.0f} % | {100 * a['identical_requests']:.0f} % | "
                     f"{a['max_abs_logprob_diff']:.3f} |")
    t = out["kv_tokens_per_gib"]
    lines += ["", f"KV cache tokens per GiB: {t['auto']:,} ({c['dtype']}) against {t['int8']:,} (int8), "
                  f"{t['int8'] / t['auto']:.2f}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
