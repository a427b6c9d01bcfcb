"""Does a decode step run faster right after the same engine's step? (The reason bench_engines_in_turn keeps one order.)

    python scripts/back_to_back.py --concurrency 1,8 --runs 3

Two engines on the default base in bfloat16 (each its own copy of the weights): the bare base, and one ReMix adapter.
Both serve the same greedy requests (128-token prompts, 128 new tokens), stepped in the pattern base, base, adapter,
adapter, ... so that each engine's steps alternate between following the other engine's step and following its own.
Prints, per engine, the median full-batch decode step of each kind. With the order of `server.bench`'s contenders
reversed every sweep, the first and last contenders had followed themselves on half their steps and the middle ones
never (thirtieth session, Zen 4 VM, one sequence, three runs: base 9.992 / 10.469 / 10.131 ms after the other and
9.954 / 10.346 / 10.029 after itself, the adapter 10.902 / 11.181 / 10.886 and 10.793 / 11.201 / 10.808; at 8
sequences 18.351 / 18.349 and 20.069 / 20.138).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import remix
from remix.kernels import cpu_ext, tune_cpu_allocator
from server.bench import make_adapter, prompts_of
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    tune_cpu_allocator()
    cpu_ext.load()
    model, tok = remix.load_base("smollm2-135m-instruct")
    path = make_adapter(model, Path(tempfile.mkdtemp(prefix="remix-b2b-")) / "a0", seed=0)
    model.to(dtype=torch.bfloat16)
    levels = [int(c) for c in args.concurrency.split(",")]
    engines = {}
    for name, weights in (("base", model), ("adapter", copy.deepcopy(model))):
        engine = Engine(weights, tok, EngineConfig(max_model_len=128 + 128 + 8, max_num_seqs=max(levels), max_queue=1024,
                                                    max_batched_tokens=512, prefix_caching=False))
        if name == "adapter":
            engine.load_adapter("a0", str(path))
        engine.warm_up()
        engines[name] = engine
    pattern = ["base", "base", "adapter", "adapter"]
    for c in levels:
        prompts = prompts_of(tok, c, 128)
        got = {(n, k): [] for n in engines for k in ("after the other", "after itself")}
        for run in range(args.runs):
            for name, engine in engines.items():
                for i, p in enumerate(prompts):
                    params = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0.0)
                    engine.submit(GenerationRequest(f"b2b-{name}-{run}-{i}", p, params, None if name == "base" else "a0"),
                                  lambda e: None)
            prev, j = None, 0
            while any(e.has_work() for e in engines.values()):
                name = pattern[j % len(pattern)]
                j += 1
                engine = engines[name]
                if not engine.has_work():
                    continue
                t0 = time.perf_counter()
                engine.step()
                dt = time.perf_counter() - t0
                if engine.last_step["prefill_tokens"] == 0 and engine.last_step["decode_rows"] == c:
                    got[(name, "after itself" if prev == name else "after the other")].append(1000 * dt)
                prev = name
        for name in engines:
            a, b = got[(name, "after the other")], got[(name, "after itself")]
            print(f"c={c} {name}: after the other {statistics.median(a):.3f} ms ({len(a)} steps), after itself "
                  f"{statistics.median(b):.3f} ms ({len(b)} steps)", flush=True)


if __name__ == "__main__":
    main()
