"""Long prompts: time to first token with prompt tokens' attention by tiles of tokens (bfloat16: AMX tiles, or AVX512-BF16
vectors; float32: vectors), against the same engine with its prompt tokens on the decode kernel and against HF
generate, in one run.

    python -m server.bench_prompt --json out.json [--prompt-tokens 512,1024,2048,4096] [--concurrency 1]
                                  [--new-tokens 16] [--repeats 2] [--dtype auto|bfloat16|float32] [--form vectors]

On the default base (no adapter), for each prompt length: two engines of the server's default configuration, one with
prompt tokens' attention by tiles of tokens (``tiles``, the default: for a bfloat16 model on AMX tiles where the CPU
has AMX-BF16, else on AVX512-BF16 vectors; for a float32 model on AVX-512 or AVX2 vectors) and one with every token's
attention on the decode kernel (``decode_kernel``: the compiled kernels' ``_prompt_tiles`` switched off before each of
its steps), serve the same ``--concurrency`` greedy requests of that many prompt tokens and ``--new-tokens`` new
tokens, stepped in turn (a slow spell of the machine lands on both); each engine's times are its own steps'.
``--repeats`` rounds after an uncounted first one; per round each engine's mean time to first token (submission to
the step that emits it) and new tokens per second, the best round reported, the ratios taken within each round
(median over rounds). The peer, HF generate on the same weights (SDPA, a static batch of the same prompts):
``max_new_tokens=1`` (its first token: the whole prompts' forward) and the whole generation, the faster of two calls.

Prints and writes, per length, ``tiles_over_decode_kernel_ttft`` (below 1: the tiles are faster), ``hf_over_tiles_ttft``
(above 1: the engine's first token comes sooner than HF generate's) and ``tiles_over_hf_tokens_per_s``, and checks that
the two engines' greedy replies agree (the share of identical replies and of new tokens before the first difference:
in bfloat16 the two kernels round a prompt's attention differently, so a near-tie may fall the other way; in float32
they compute the same bits, so every reply must agree).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import remix
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.settings import HelpFormatter
from server.bench import (TEXT, add_output_args, best_of_rounds, common_prefix, hf_first_and_all, serve_in_turn,
                          write_outputs)
from server.cli import DTYPES, resolve_dtype
from server.engine import Engine, EngineConfig, SamplingParams

NAMES = ("tiles", "decode_kernel")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m server.bench_prompt", description=__doc__, formatter_class=HelpFormatter)
    add_output_args(ap)
    ap.add_argument("--prompt-tokens", default="512,1024,2048,4096", help="comma-separated prompt lengths, one table row each")
    ap.add_argument("--concurrency", type=int, default=1, help="requests of that length served together")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated for every request")
    ap.add_argument("--repeats", type=int, default=2, help="counted rounds (after one uncounted)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as the server picks it)")
    ap.add_argument("--form", default="default", choices=("default", "vectors"),
                    help="the prompt kernel's form: as the server takes it (AMX tiles where the CPU has them), or its "
                         "AVX512-BF16 vectors even there (what a CPU without AMX runs)")
    args = ap.parse_args(argv)
    try:
        lengths = [int(n) for n in args.prompt_tokens.split(",")]
    except ValueError:
        ap.error("--prompt-tokens: comma-separated whole numbers")
    if not lengths or min(lengths) < 1:
        ap.error("--prompt-tokens: each length must be at least 1")
    for name in ("concurrency", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    tune_cpu_allocator()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    ext = cpu_ext.load()
    dname = str(dtype).removeprefix("torch.")
    if ext is None or not hasattr(ext, "_prompt_dtypes") or dname not in ext._prompt_dtypes():
        ap.error(f"the compiled kernels here have no prompt kernel for {dname} (bfloat16: AVX512-BF16; float32: AVX-512 "
                 "or AVX2 + FMA; or no kernels): nothing to compare")
    if args.form == "vectors" and dname == "float32":
        ap.error("--form vectors: float32's prompt kernel has no other form")
    model, tok = remix.load_base(args.base, dtype=dtype)  # the HF peer
    C, N = args.concurrency, args.new_tokens
    greedy = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    max_len = max(lengths) + N + 8
    engines = {name: Engine(remix.load_base(args.base, dtype=dtype)[0], tok, EngineConfig(
        max_model_len=max_len, max_num_seqs=C, max_queue=1024, prefix_caching=False)) for name in NAMES}
    ext._prompt_amx(args.form == "default")
    switch = {"tiles": lambda: ext._prompt_tiles(True), "decode_kernel": lambda: ext._prompt_tiles(False)}
    ids = tok(TEXT * (max(lengths) // 20 + 2 * C + 2)).input_ids
    results = []
    try:
        for L in lengths:
            prompts = [ids[i * 7 : i * 7 + L] for i in range(C)]  # distinct prompts of exactly L tokens
            rounds, agree = [], []
            for r in range(args.repeats + 1):
                got = serve_in_turn(engines, {name: prompts for name in NAMES}, greedy, adapter=None,
                                    before_step=switch)
                agree += [common_prefix(a, b) / len(a) for a, b in zip(got["tiles"]["tokens"],
                                                                        got["decode_kernel"]["tokens"])]
                if r:
                    rounds.append({name: {"ttft_s": got[name]["ttft_s"], "tokens_per_s": C * N / got[name]["wall_s"]}
                                   for name in NAMES})
                print(f"{L} tokens, round {r}{'' if r else ' (cold, not counted)'}: " + "  ".join(
                    f"{name} ttft {1000 * got[name]['ttft_s']:.0f} ms, {C * N / got[name]['wall_s']:.1f} tok/s"
                    for name in NAMES), flush=True)
            hf_first, hf_all = hf_first_and_all(model, prompts, N)
            print(f"{L} tokens, HF generate: first token {1000 * hf_first:.0f} ms, {C * N / hf_all:.1f} tok/s", flush=True)
            row = best_of_rounds(rounds, NAMES)
            row["hf_generate"] = {"ttft_s": hf_first, "tokens_per_s": C * N / hf_all}
            row["prompt_tokens"] = L
            row["tiles_over_decode_kernel_ttft"] = statistics.median(
                x["tiles"]["ttft_s"] / x["decode_kernel"]["ttft_s"] for x in rounds)
            row["hf_over_tiles_ttft"] = hf_first / row["tiles"]["ttft_s"]
            row["tiles_over_hf_tokens_per_s"] = row["tiles"]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"]
            row["identical_replies"] = sum(a == 1 for a in agree) / len(agree)
            row["common_prefix_share"] = sum(agree) / len(agree)
            results.append(row)
            print(f"{L} tokens: tiles over decode kernel (ttft) {row['tiles_over_decode_kernel_ttft']:.3f}, "
                  f"HF over tiles (ttft) {row['hf_over_tiles_ttft']:.2f}x, tiles over HF (tok/s) "
                  f"{row['tiles_over_hf_tokens_per_s']:.2f}x, identical replies {row['identical_replies']:.2f}", flush=True)
    finally:
        ext._prompt_tiles(True)
        ext._prompt_amx(True)
    form = "amx" if args.form == "default" and dname == "bfloat16" and cpu_ext.amx_bf16() else "vectors"
    out = {"cpu": cpu_ext.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "base": args.base,
           "dtype": dname, "form": form, "concurrency": C, "new_tokens": N, "repeats": args.repeats, "results": results}
    write_outputs(args, out, markdown)
    return out


def markdown(out: dict) -> str:
    lines = ["| prompt tokens | time to first token: engine (prompt tiles) | engine (decode kernel) | HF generate "
             "| tiles over decode kernel | HF over tiles | tok/s: engine / HF | identical replies |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {r['prompt_tokens']} | {1000 * r['tiles']['ttft_s']:.0f} ms | "
                     f"{1000 * r['decode_kernel']['ttft_s']:.0f} ms | {1000 * r['hf_generate']['ttft_s']:.0f} ms | "
                     f"{r['tiles_over_decode_kernel_ttft']:.3f} | {r['hf_over_tiles_ttft']:.2f}x | "
                     f"{r['tiles']['tokens_per_s']:.1f} / {r['hf_generate']['tokens_per_s']:.1f} | "
                     f"{r['identical_replies']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
