"""A/B: how long a running request waits for its next token while an adapter loads and unloads.

    python scripts/ab_adapter_load.py [--preload N] [--rounds R]

"new": the adapter is read, checked and laid out on the caller's thread; the engine thread writes its pools into the
room each module's stack keeps (an unload moves at most the pools after it). Two earlier ways, emulated here:
"s54" (the 55th session's starting point): read and checked on the caller's thread, then on the engine thread its pools
converted and every module's stack made anew, copying every loaded adapter's pools; "s53" (the 54th session's
starting point): the whole load on the engine thread, every loaded adapter's pools converted again. The three alternate
in one process on the default base (bfloat16) with the demo adapter (runs/demo/adapter) loaded ``1 + N`` times first; a
greedy request decodes throughout. Each mode's measured load follows an unmeasured load and unload in that mode (so
the new way's stacks have the room an earlier load made, as a server has after its first run-time load or from its
--max-adapters). Prints, per mode and round, the load's and the unload's wall time and the longest
and the median gap between the request's tokens."""

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
    new_update, new_load, new_rows = (stack_module.PoolStack._update_cpu, Engine.load_adapter,
                                      stack_module.PoolStack.kernel_rows)
    no_rows = staticmethod(lambda A, B, router, dtype: None)  # (laid out on the engine thread, in _update_cpu)

    def s53_update(self, old, new, rows):
        self._slab = None  # (nothing kept: every pool converted again, into a stack just large enough)
        new_update(self, old, new, None)

    def s54_update(self, old, new, rows):
        new_update(self, old, new, None)  # (the new pool converted here, on the engine thread)
        slab = self._slab
        if slab is not None:  # every pool copied into a stack just large enough, as torch.cat made it
            n = self.cpu.num_loras
            self._slab = stack_module._Slab(slab.router[:n].clone(), slab.a[: n * slab.r].clone(),
                                            slab.bt[: n * slab.r].clone(), slab.r)
            self.cpu.router, self.cpu.a, self.cpu.bt = self._slab.router, self._slab.a, self._slab.bt

    def s53_load(self, name, path, check_fingerprint=True):
        return self.call(self.registry.load, name, path, check_fingerprint)

    modes = {"s53": (s53_update, s53_load, no_rows), "s54": (s54_update, new_load, no_rows),
             "new": (new_update, new_load, staticmethod(new_rows))}

    def measure(mode: str, i: int) -> tuple:
        stack_module.PoolStack._update_cpu, Engine.load_adapter, stack_module.PoolStack.kernel_rows = modes[mode]
        engine.load_adapter(f"w{mode}{i}", ADAPTER)  # (unmeasured: the stacks as this mode leaves them, room included)
        engine.unload_adapter(f"w{mode}{i}")
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

    rows = {mode: [] for mode in modes}
    try:
        for i in range(args.rounds):
            for mode in modes:
                rows[mode].append(measure(mode, i))
    finally:
        stack_module.PoolStack._update_cpu, Engine.load_adapter = new_update, new_load
        stack_module.PoolStack.kernel_rows = staticmethod(new_rows)
        engine.stop()
    print(f"{1 + args.preload} adapters loaded before; seconds per round")
    for mode, r in rows.items():
        print(f"{mode}: load {[round(x[0], 3) for x in r]}  unload {[round(x[1], 3) for x in r]}  "
              f"longest token gap {[round(x[2], 3) for x in r]}  median gap {[round(x[3], 4) for x in r]}")


if __name__ == "__main__":
    main()
