"""A/B: how long a running request waits for its next token while an adapter loads and unloads.

    python scripts/ab_adapter_load.py [--preload N] [--rounds R]

"new": the adapter is read and checked on the caller's thread and the engine thread only stacks it, copying the slots
its last stack held; "old" (the 54th session's starting point, emulated here): the whole load on the engine thread,
every slot converted again. Both alternate in one process on the default base (bfloat16) with the demo adapter
(runs/demo/adapter) loaded ``1 + N`` times first; a greedy request decodes throughout. Prints, per mode and round, the
load's and the unload's wall time and the longest and the median gap between the request's tokens."""

import argparse
import statistics
import threading
import time

import torch

import remix
import remix.stack as stack_module
from remix.settings import HelpFormatter
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

ADAPTER = "runs/demo/adapter"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--preload", type=int, default=0, help="adapters loaded besides the one the request uses")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each mode")
    args = ap.parse_args()
    model, tok = remix.load_base("smollm2-135m-instruct", dtype=torch.bfloat16)
    engine = Engine(model, tok, EngineConfig(max_model_len=1024, max_num_seqs=4))
    for j in range(1 + args.preload):
        engine.load_adapter(f"pre{j}", ADAPTER)
    engine.start()
    new_rebuild, new_load = stack_module.PoolStack._rebuild_cpu, Engine.load_adapter

    def old_rebuild(self):
        self.cpu = None  # (no previous stack to copy from: every slot converted again)
        new_rebuild(self)

    def old_load(self, name, path, check_fingerprint=True):
        return self.call(self.registry.load, name, path, check_fingerprint)

    def measure(mode: str, i: int) -> tuple:
        stack_module.PoolStack._rebuild_cpu = new_rebuild if mode == "new" else old_rebuild
        Engine.load_adapter = new_load if mode == "new" else old_load
        times, done = [], threading.Event()

        def on_event(e):
            times.append(time.perf_counter())
            if e.finished:
                done.set()

        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        engine.submit(GenerationRequest(f"r{mode}{i}", tok("Tell me a story").input_ids, params, adapter="pre0"),
                      on_event)
        time.sleep(1.0)
        t = time.perf_counter()
        engine.load_adapter(f"x{mode}{i}", ADAPTER)
        load = time.perf_counter() - t
        time.sleep(0.5)
        t = time.perf_counter()
        engine.unload_adapter(f"x{mode}{i}")
        unload = time.perf_counter() - t
        time.sleep(0.5)
        engine.cancel(f"r{mode}{i}")
        done.wait(30)
        gaps = [b - a for a, b in zip(times, times[1:])]
        return load, unload, max(gaps), statistics.median(gaps)

    rows = {"old": [], "new": []}
    try:
        for i in range(args.rounds):
            for mode in ("old", "new"):
                rows[mode].append(measure(mode, i))
    finally:
        stack_module.PoolStack._rebuild_cpu, Engine.load_adapter = new_rebuild, new_load
        engine.stop()
    print(f"{1 + args.preload} adapters loaded before; seconds per round")
    for mode, r in rows.items():
        print(f"{mode}: load {[round(x[0], 3) for x in r]}  unload {[round(x[1], 3) for x in r]}  "
              f"longest token gap {[round(x[2], 3) for x in r]}  median gap {[round(x[3], 4) for x in r]}")


if __name__ == "__main__":
    main()
