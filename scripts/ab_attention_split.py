"""The decode attention's rows split between threads by their lengths against a split by count, alternating.

    python scripts/ab_attention_split.py [--layers 24] [--rounds 12] [--dtype bfloat16]

A decode step's attention runs one item per (row, key/value head) and gives each thread a share of the items. By count
(the split before the 48th session), a thread that holds the step's long rows works while the other waits; by length
(each item its row's length plus a fixed cost, ``_attention_by_length``), the threads get equal positions. Times
``--layers`` layers of the default base's attention shape (32 rows, 3 key/value heads of 64, 3 query heads each;
each layer its own cache, so K and V come from memory as in a step) for a few length mixes, both splits in turn, and
prints the medians and their ratio. The outputs are the same either way (each item's sums do not depend on its
thread; tests/test_kernels.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from remix.kernels import cpu_ext

CASES = {  # a step's rows' lengths (32 rows)
    "equal (32 x 600)": [600] * 32,
    "long rows together (8 x 2000, 24 x 100)": [2000] * 8 + [100] * 24,
    "long rows spread (8 x 2000, 24 x 100)": ([2000] + [100] * 3) * 8,
    "one long row (1 x 2000, 31 x 64)": [2000] + [64] * 31,
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args(argv)
    ext = cpu_ext.load()
    if ext is None:
        ap.error("the compiled CPU kernels are not built here")
    dtype = getattr(torch, args.dtype)
    S, P, Hkv, nrep, Dh = 32, 2048, 3, 3, 64
    Hq = Hkv * nrep
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(S, Hkv, P, Dh, generator=g).to(dtype), torch.randn(S, Hkv, P, Dh, generator=g).to(dtype))
              for _ in range(args.layers)]
    qk = torch.randn(S, Hq + 2 * Hkv, Dh, generator=g).to(dtype)
    print(f"{args.layers} layers of {S} rows, {Hkv} key/value heads of {Dh}, {nrep} query heads each, {args.dtype}; "
          f"threads {torch.get_num_threads()}", flush=True)
    was = ext._attention_by_length(True)
    try:
        for name, lengths in CASES.items():
            lens = torch.tensor(lengths)
            times: dict[bool, list[float]] = {False: [], True: []}
            for r in range(args.rounds):
                for by_length in ((False, True) if r % 2 == 0 else (True, False)):
                    ext._attention_by_length(by_length)
                    t0 = time.perf_counter()
                    for K, V in caches:
                        ext.decode_attention(qk, K, V, 0, lens, Hq, Dh**-0.5)
                    times[by_length].append(1e3 * (time.perf_counter() - t0))
            count, length = statistics.median(times[False]), statistics.median(times[True])
            print(f"{name:42s} by count {count:7.2f} ms  by length {length:7.2f} ms  length / count {length / count:.2f}",
                  flush=True)
    finally:
        ext._attention_by_length(was)


if __name__ == "__main__":
    main()
