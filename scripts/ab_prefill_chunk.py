"""A/B of the engine's prefill chunk (``max_prefill_chunk``, the server's ``--max-prefill-chunk``): one long prompt's
time to first token with each chunk size, the engines stepped in turn within one run.

    python scripts/ab_prefill_chunk.py --prompt-tokens 2048 --chunks 256,512 [--dtype float32] [--rounds 4]

One engine of the default base per chunk size (otherwise the server's defaults, no prefix cache), each serving the
same greedy request of ``--prompt-tokens`` tokens and one new token, stepped in turn (``server.bench.serve_in_turn``:
a slow spell of the VM lands on all of them). ``--rounds`` rounds after an uncounted first one; prints every round's
time to first token per chunk size, their medians, and each size's median over the first size's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import remix
from remix.kernels import tune_cpu_allocator
from server.bench import TEXT, serve_in_turn
from server.cli import DTYPES, resolve_dtype
from server.engine import Engine, EngineConfig, SamplingParams


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--chunks", default="256,512", help="comma-separated chunk sizes (the first is the reference)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's dtype (auto: as the server picks it)")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds (after one uncounted)")
    args = ap.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        ap.error("--chunks: comma-separated whole numbers")
    if min(chunks) < 1 or args.prompt_tokens < 1 or args.rounds < 1:
        ap.error("--chunks, --prompt-tokens and --rounds must be at least 1")
    tune_cpu_allocator()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    model, tok = remix.load_base(args.base, dtype=dtype)  # the first engine's weights (each engine has its own)
    engines = {c: Engine(model if i == 0 else remix.load_base(args.base, dtype=dtype)[0], tok, EngineConfig(
        max_model_len=args.prompt_tokens + 8, max_num_seqs=1, prefix_caching=False, max_prefill_chunk=c))
        for i, c in enumerate(chunks)}
    per_text = len(tok(TEXT).input_ids)
    ids = tok(TEXT * (args.prompt_tokens // per_text + 2)).input_ids[: args.prompt_tokens]
    assert len(ids) == args.prompt_tokens, (len(ids), args.prompt_tokens)
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ttft = {c: [] for c in chunks}
    for r in range(args.rounds + 1):
        got = serve_in_turn(engines, {c: [ids] for c in chunks}, greedy, adapter=None)
        if r:
            for c in chunks:
                ttft[c].append(got[c]["ttft_s"])
        print(f"round {r}{'' if r else ' (cold, not counted)'}: " + "  ".join(
            f"chunk {c} {1000 * got[c]['ttft_s']:.0f} ms" for c in chunks), flush=True)
    med = {c: statistics.median(ttft[c]) for c in chunks}
    ref = chunks[0]
    for c in chunks:
        print(f"chunk {c}: time to first token {1000 * med[c]:.0f} ms (median), {med[c] / med[ref]:.3f} of chunk {ref}'s")
    return {"dtype": str(dtype).removeprefix("torch."), "prompt_tokens": args.prompt_tokens,
            "ttft_s": {str(c): ttft[c] for c in chunks}}


if __name__ == "__main__":
    main()
