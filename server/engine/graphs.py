"""Decode steps replayed from CUDA graphs.

Legend: b = decode rows this step, B = b rounded up to a captured batch size, P = positions per cache slot, S = the
attention span captured (a bucket >= every row's length), V = vocabulary.

On a GPU a decode step of a small model is bound by kernel launches, not by arithmetic: a step of the default base
with an adapter is a few thousand small kernels (a few microseconds of GPU time each) behind ~10 us of Python and launch
each - eager, 38 ms a step on an H100 at one sequence, against ~3 ms of GEMM work. A CUDA graph records one step's
kernels once and replays them with one launch, so the GPU runs them back to back (~6 ms a step there).

What a replay needs is the same shapes and the same memory every time, and no reads back to the host inside:

* the rows: decode rows always sit in slots [0, b) (the engine keeps them there); the step runs B >= b rows, and each
  padding row is a token at position P of its slot - the cache's spare positions, which attention never reads - with
  no adapter (slot -1), so it writes nothing that anyone sees and counts nothing (its "no LoRA" lands in the spare
  counter);
* the span: attention reads positions [0, S) of every slot, S the smallest captured span >= the longest row; each row's
  additive mask (0 up to its own position, -inf after) is made inside the graph from the positions buffer;
* the routing: :meth:`remix.stack.RoutingContext.ungrouped` (no grouping by adapter, which would read the slots on the
  host): every wrapped module takes the fused path over all its pools, vectorised over tokens and adapters.

Inputs go in by copying into static buffers (tokens, positions, adapter slots), the output is a static [B, V] logits
buffer. One graph per (B, S), all in one memory pool, captured when the engine starts (:meth:`capture_all`, from
``Engine.warm_up``) or on first use, and all dropped with their pool when the adapters' pools change (loading or
unloading an adapter builds new pool tensors, which a graph would not see).

Where this does not apply (not CUDA, prefill, a traced request, HF's modules running the decoder stack, a decode
batch not starting at slot 0) the runner runs the step eagerly as before. ``eager=True`` runs the same padded,
fixed-span, ungrouped step without capturing it: the tests use it on the CPU to check the padding and masking.
"""

from __future__ import annotations

import torch

from remix import stack as stack_mod
from remix.stack import RoutingContext, set_context
from server.engine.cache import attention_mask

MIN_SPAN = 256  # the smallest captured attention span; larger ones double up to the cache's positions


def batch_sizes(max_rows: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every multiple of 8, and max_rows itself."""
    sizes = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8)) + [max_rows]
    return sorted(set(sizes))


def spans(positions: int) -> list[int]:
    out, s = [], MIN_SPAN
    while s < positions:
        out.append(s)
        s *= 2
    return out + [positions]


class DecodeGraphs:
    def __init__(self, runner, eager: bool = False):
        self.runner = runner
        self.eager = eager
        cache = runner.cache
        self.positions = cache.positions  # P: the first spare position (padding rows write there)
        self.batches = batch_sizes(cache.slots)
        self.spans = spans(cache.positions)
        device = runner.device
        B = self.batches[-1]
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = torch.full((B, 1), self.positions, dtype=torch.long, device=device)
        self.slots = torch.full((B,), -1, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple] = {}  # (B, S) -> (graph, logits [B, V])
        self.pool = None
        self.generation = stack_mod.generation()
        self.captures = 0
        self.replays = 0

    def bucket(self, b: int, span: int) -> tuple[int, int] | None:
        B = next((x for x in self.batches if x >= b), None)
        S = next((x for x in self.spans if x >= span), None)
        return None if B is None or S is None else (B, S)

    def _body(self, B: int, S: int, count: bool = True) -> torch.Tensor:
        """One decode step over the static buffers' first B rows, attending to S positions: logits [B, V] (float32)."""
        runner = self.runner
        tokens, positions = self.tokens[:B], self.pos[:B]
        runner.cache.prepare(0, positions, S)
        # the engine's mask (each row sees its positions <= its own; the lean forward makes it additive): inside the graph
        mask = attention_mask(positions[:, 0], torch.ones(B, dtype=torch.long, device=positions.device), 1, S)
        set_context(RoutingContext.ungrouped(self.slots[:B], count=count))
        try:
            hidden = runner.lean(tokens, positions, mask, runner.cache)
        finally:
            set_context(None)
        return runner.lean.head(hidden[:, 0].contiguous()).float()

    def run(self, tokens: torch.Tensor, starts: torch.Tensor, adapter_slots: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        """Logits [b, V] of one decode step: row i is token tokens[i] at position starts[i] of slot i with adapter slot
        adapter_slots[i] (CPU tensors, b rows)."""
        B, S = key
        b = tokens.shape[0]
        self.tokens[:b, 0].copy_(tokens.view(-1), non_blocking=True)
        self.pos[:b, 0].copy_(starts, non_blocking=True)
        self.slots[:b].copy_(adapter_slots, non_blocking=True)
        self._pad(b, B)
        if self.eager:
            return self._body(B, S)[:b]
        self._drop_if_stale()
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(B, S)
        entry[0].replay()
        self.replays += 1
        return entry[1][:b]

    def capture_all(self) -> int:
        """Capture every (batch, span) bucket now (the engine does this when it starts, so no request waits for a
        capture); returns how many were captured. Each capture's warm-up runs padding rows only (they write the
        cache's spare positions)."""
        if self.eager:
            return 0
        self._drop_if_stale()
        before = self.captures
        for B in self.batches:
            for S in self.spans:
                if (B, S) not in self.graphs:
                    self._pad(0, B)
                    self.graphs[(B, S)] = self._capture(B, S)
        return self.captures - before

    def _pad(self, b: int, B: int) -> None:
        """Rows [b, B) of the static buffers become padding: token 0 at the spare position P, no adapter."""
        self.tokens[b:B].zero_()
        self.pos[b:B].fill_(self.positions)
        self.slots[b:B].fill_(-1)

    def _drop_if_stale(self) -> None:
        """Drop every graph once any adapter's pools were rebuilt (the graphs hold the old tensors' addresses), and
        their memory pool with them: capturing into a pool whose graphs are all gone trips an internal assert of
        PyTorch's caching allocator (seen with torch 2.11 on an H100), so the next capture starts a fresh pool."""
        if stack_mod.generation() != self.generation:
            self.graphs.clear()
            self.pool = None
            self.generation = stack_mod.generation()

    def _capture(self, B: int, S: int) -> tuple:
        """Warm up once on a side stream (builds lazy layouts; counts nothing), then record the step."""
        stream = torch.cuda.Stream(device=self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            self._body(B, S, count=False)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: the HTTP thread may read counters on the GPU (/metrics) while the engine thread captures after
        # an adapter change; in the default "global" mode any such call from another thread fails the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._body(B, S)
        self.captures += 1
        return graph, logits
