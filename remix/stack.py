"""Serving mode: many adapters' pools stacked on one module, routed per token by a shared context.

Legend: T = tokens in the step, D = d_in, O = d_out, n_s / k_s / r_s = slot s's pool size, k and rank.

The engine loads each adapter into a *slot* of every wrapped module's :class:`PoolStack` and, before
each forward step, publishes a :class:`RoutingContext`: which slot every token of the flattened
batch belongs to (-1 = bare base). The step's grouping (token rows per slot) is computed once in the
context and shared by all modules, so a module does, per slot present in the batch:

    pu    = x[rows] @ [P_s; A_s]^T          router logits and every pool's A x, one GEMM
    J     = top-k(pu[:, :n_s])              ties to the lower index
    y[rows] += (pu[:, n_s:] masked to J, times ω_s) @ B_s^T

and counts the selections into preallocated per-slot buffers (one bincount, no Python loop over
tokens). A token's result depends only on its own row and its adapter, never on its batch-mates.

On a CPU with the compiled kernels (:mod:`remix.kernels.cpu_ext`) every slot's pool is also kept in
one stack (:class:`StackedPools`: global LoRA ids, ranks zero-padded to the largest; A and B in float32, or in
bfloat16 for a bfloat16 model; routers in float32) and the whole step, whatever its mix of adapters, is one
call that routes each token within its adapter's pool and adds only the selected LoRAs, counting selections as
it goes.

Elsewhere (CUDA) a mixed batch takes the fused torch path: one GEMM over every slot's [router; A], routing vectorised
over tokens and adapters with the per-token tables made once a step and shared by all modules
(:meth:`RoutingContext.plan_for`), one GEMM over every B, counters added by ``index_add_``: no host synchronisation,
so a CUDA graph can capture it (:meth:`RoutingContext.ungrouped`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from remix.kernels import cpu_ext, flatten_a, flatten_b_t, multi_routing_plan, route_with_plan, topk_masked_u


@dataclass
class SlotWeights:
    """One adapter's pool on one module, laid out for the grouped kernel."""

    pa: torch.Tensor | None  # [n + n*r, D]: router rows, then each LoRA's A rows (torch path; built on first use)
    b_flat_t: torch.Tensor | None  # [n*r, O]
    n: int
    k: int
    omega: float
    counts: torch.Tensor  # [n] int64, selections since load (read by the metrics exporter)
    router32: torch.Tensor | None = None  # float32 router when the pool is stored in lower precision


@dataclass
class StackedPools:
    """Every slot's pool in one stack: global LoRA ids, ranks zero-padded to the largest (r).

    Two users: the compiled CPU kernel (float32 router, A and B in float32 or bfloat16, any batch; ``counts`` is the
    storage every slot's ``counts`` views) and the torch path's mixed small batches (model dtype; ``pa`` = [router;
    a]).
    """

    router: torch.Tensor  # [N, D]
    a: torch.Tensor  # [N*r, D]
    bt: torch.Tensor  # [N*r, O]
    r: int
    kmax: int
    tables: tuple  # (slot_off, slot_n, slot_k: int64 [S], slot_omega: float32 [S]) by slot id; n = 0 where no adapter
    counts: torch.Tensor | None = None  # [N] view of the PoolStack's counters (the compiled kernel adds into it)
    pa: torch.Tensor | None = None
    router32: torch.Tensor | None = None  # [N, D] float32 router when the pools are in a lower precision (torch path)
    offsets: dict = field(default_factory=dict)  # slot -> first global id, as Python ints (no device reads)
    layout: tuple = ()  # (dtype, device, N, kmax, (slot, offset, n, k, omega)...): modules with equal layouts route alike
    ranks: torch.Tensor | None = None  # int64 [N]: each LoRA's own rank where some are padded (the CPU kernel skips the
    # padding), None where every slot has rank r
    cols: torch.Tensor | None = None  # int64 [rows of a]: each row's LoRA, in a compact stack of several ranks (torch
    # path: a and bt hold each LoRA's own rows only), else None (r rows a LoRA)

    @property
    def num_loras(self) -> int:
        return self.router.shape[0]


class PoolStack:
    """The adapters loaded on one module, by slot id. Mutated only between steps (by the engine)."""

    def __init__(self) -> None:
        self.slots: dict[int, SlotWeights] = {}
        self.fused: StackedPools | None = None  # torch path: mixed small batches, CUDA graphs
        self.cpu: StackedPools | None = None  # compiled CPU kernel
        self._raw: dict[int, tuple] = {}  # slot -> (A, B, router, model dtype) as given
        self._torch_ready = False
        # every slot's selection counters in one buffer (slots in ascending id, then one spare entry that absorbs the
        # "no LoRA" ids of the torch path); each SlotWeights.counts is a view of its range
        self.counts = torch.zeros(1, dtype=torch.int64)

    def add(self, slot: int, A: torch.Tensor, B: torch.Tensor, router: torch.Tensor, k: int, omega: float,
            dtype: torch.dtype | None = None) -> None:
        """A [n, r, D], B [n, O, r], router [n, D]; ``dtype``: the model's (default A's), for the torch path.

        Pass the pools in float32 even for a lower-precision model: each path rounds its own copy once (the
        compiled CPU path keeps a bfloat16 model's A and B in bfloat16 - what ``remix.load_adapter`` gives that
        model's layers too - and every router in float32; the torch path converts to ``dtype``). The
        torch path's layouts are built on first use, so a CPU serving through the compiled kernel holds
        only the adapter's tensors and one stacked copy.
        """
        n = A.shape[0]
        self.slots[slot] = SlotWeights(None, None, n, k, omega, torch.zeros(n, dtype=torch.int64, device=A.device))
        self._raw[slot] = (A, B, router, dtype or A.dtype)
        self._rebuild()

    def remove(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self._raw.pop(slot, None)
        self._rebuild()

    def _rebuild(self) -> None:
        global _generation
        _generation += 1
        ids = sorted(self._raw)
        device = self._raw[ids[0]][0].device if ids else self.counts.device
        self.counts = torch.cat([self.slots[s].counts.to(device) for s in ids]
                                + [torch.zeros(1, dtype=torch.int64, device=device)])  # keep what was counted so far
        off = 0
        for s in ids:
            w = self.slots[s]
            w.counts = self.counts[off : off + w.n]
            off += w.n
        self._rebuild_cpu()
        self.fused, self._torch_ready = None, False

    def ensure_torch(self) -> None:
        """Build the torch path's layouts (per slot, and the fused stack of a mixed batch) if they are stale."""
        if self._torch_ready:
            return
        for s, (A, B, router, dtype) in self._raw.items():
            w = self.slots[s]
            w.pa = torch.cat([router.to(dtype), flatten_a(A).to(dtype)], 0).contiguous()
            w.b_flat_t = flatten_b_t(B).to(dtype).contiguous()
            w.router32 = router.float().contiguous() if dtype != torch.float32 else None
        self._torch_ready = True
        if not self._raw:
            return
        dtype = next(iter(self._raw.values()))[3]
        self.fused = self._stack_all(dtype, compact=True)
        self.fused.pa = torch.cat([self.fused.router, self.fused.a], 0).contiguous()
        if dtype != torch.float32:  # route on float32 logits, as DESIGN §1 requires
            self.fused.router32 = torch.cat([self._raw[s][2].float() for s in sorted(self._raw)]).contiguous()

    def _rebuild_cpu(self) -> None:
        if not self._raw or next(iter(self._raw.values()))[0].device.type != "cpu" or cpu_ext.load() is None:
            self.cpu = None
            return
        # A and B in the kernel's pool dtype (bfloat16 for a bfloat16 model); routers float32 (DESIGN §1). The slots
        # the last stack held are copied from it as they are, so an adapter's load or unload converts its own pools
        # only (converting every loaded one again had held a running request's next token 0.52-0.56 s with eight
        # adapters loaded, against 0.19-0.23 s now: scripts/ab_adapter_load.py --preload 7)
        previous, self.cpu = self.cpu, None
        self.cpu = self._stack_all(cpu_ext.pool_dtype(next(iter(self._raw.values()))[3]), router_dtype=torch.float32,
                                   previous=previous)
        self.cpu.counts = self.counts[:-1]  # [N], contiguous: the kernel adds each selection into it

    def _stack_all(self, dtype: torch.dtype, router_dtype: torch.dtype | None = None, compact: bool = False,
                   previous: StackedPools | None = None) -> StackedPools:
        """Every slot's pool in ``dtype`` (its router in ``router_dtype``, default the same), stacked by ascending slot
        id, ranks padded to the largest - or, ``compact`` (the torch path's GEMMs), each LoRA's rows at its own rank,
        LoRA after LoRA (``cols``: the LoRA of each row; None where every rank is the same, the layouts then equal).
        ``previous``: a stack built the same way (dtypes, padded rank); the slots it holds are copied from it (the
        same values a conversion gives) and only the others converted."""
        ids = sorted(self._raw)
        r_max = max(self._raw[s][0].shape[1] for s in ids)
        reuse = (previous is not None and not compact and previous.r == r_max and previous.a.dtype == dtype
                 and previous.router.dtype == (router_dtype or dtype))
        routers, As, Bs, off, total, ranks = [], [], [], {}, 0, []
        for s in ids:
            A, B, router, _ = self._raw[s]
            off[s], total = total, total + A.shape[0]
            ranks += [A.shape[1]] * A.shape[0]
            if reuse and s in previous.offsets:  # (rows r_max a LoRA there too)
                o, n = previous.offsets[s], A.shape[0]
                routers.append(previous.router[o : o + n])
                As.append(previous.a[o * r_max : (o + n) * r_max])
                Bs.append(previous.bt[o * r_max : (o + n) * r_max])
                continue
            routers.append(router.to(router_dtype or dtype))
            pad = 0 if compact else r_max - A.shape[1]
            As.append(flatten_a(F.pad(A.to(dtype), (0, 0, 0, pad))))  # [n * (r_max or r), D]
            Bs.append(flatten_b_t(F.pad(B.to(dtype), (0, pad))))  # [n * (r_max or r), O]
        device = As[0].device
        size = max(ids) + 1
        col = lambda f, kind=torch.int64: torch.tensor(  # noqa: E731
            [f(s) if s in self.slots else 0 for s in range(size)], dtype=kind, device=device)
        return StackedPools(
            router=torch.cat(routers).contiguous(), a=torch.cat(As).contiguous(),
            bt=torch.cat(Bs).contiguous(), r=r_max, kmax=max(self.slots[s].k for s in ids),
            tables=(col(lambda s: off[s]), col(lambda s: self.slots[s].n), col(lambda s: self.slots[s].k),
                    col(lambda s: self.slots[s].omega, torch.float32)),
            offsets=off,
            ranks=None if min(ranks) == r_max else torch.tensor(ranks, dtype=torch.int64, device=device),
            cols=None if not compact or min(ranks) == r_max else torch.repeat_interleave(
                torch.arange(total, device=device), torch.tensor(ranks, device=device)),
            layout=(dtype, device, total, max(self.slots[s].k for s in ids),
                    *((s, off[s], self.slots[s].n, self.slots[s].k, self.slots[s].omega) for s in ids)),
        )


@dataclass
class RoutingContext:
    """Per-step routing published by the engine and read by every module in serving mode.

    ``slots``: [T] adapter slot of each token of the flattened batch (-1 = no adapter). The grouping
    (``groups``: slot -> row indices, or None when every token has that slot) is computed once here.
    ``groups=None`` (:meth:`ungrouped`): no grouping, which would read the slots on the host; every module takes
    the fused path over all its pools (the form a CUDA graph captures).
    ``trace``: when a list, each module appends (module name, slot, rows, idx) for per-request traces.
    """

    slots: torch.Tensor
    groups: dict[int, torch.Tensor | None] | None = field(default_factory=dict)
    count: bool = True
    trace: list | None = None
    plans: dict = field(default_factory=dict)  # StackedPools.layout -> this step's multi_routing_plan (shared by modules)
    increments: dict = field(default_factory=dict)  # (n, device) -> n ones for the counters (see :meth:`ones`)

    def ones(self, n: int, device: torch.device) -> torch.Tensor:
        """n int64 ones on device (index_add_'s increments for the counters), made once a step for every module."""
        t = self.increments.get((n, device))
        if t is None:
            t = self.increments[(n, device)] = torch.ones(n, dtype=torch.int64, device=device)
        return t

    def plan_for(self, f: "StackedPools") -> tuple:
        """The fused path's per-token routing tables for pools of this layout, made by the first module that asks."""
        plan = self.plans.get(f.layout)
        if plan is None:
            bias, keep, weight = multi_routing_plan(self.slots, f.tables, f.num_loras, f.kmax, f.pa.dtype)
            plan = self.plans[f.layout] = (bias, keep, weight, self.ones(keep.numel(), self.slots.device))
        return plan

    @classmethod
    def build(cls, slots: torch.Tensor, count: bool = True, trace: bool = False) -> "RoutingContext":
        present = torch.unique(slots).tolist()
        if len(present) == 1:
            groups = {present[0]: None} if present[0] >= 0 else {}
        else:
            groups = {s: (slots == s).nonzero().squeeze(1) for s in present if s >= 0}
        return cls(slots=slots, groups=groups, count=count, trace=[] if trace else None)

    @classmethod
    def ungrouped(cls, slots: torch.Tensor, count: bool = True) -> "RoutingContext":
        return cls(slots=slots, groups=None, count=count)


_local = threading.local()
_generation = 0  # bumped whenever any PoolStack's pools change (their tensors are rebuilt)


def generation() -> int:
    """A number that changes whenever an adapter is added to or removed from any module: whoever holds on to the
    pools' tensors (a captured CUDA graph) must let go when it changes."""
    return _generation


def set_context(ctx: RoutingContext | None) -> None:
    """Publish the routing context of the next forward step (thread-local: one engine per thread)."""
    _local.ctx = ctx


def get_context() -> RoutingContext | None:
    return getattr(_local, "ctx", None)


def stacked_forward(
    x: torch.Tensor, y: torch.Tensor, stack: PoolStack, ctx: RoutingContext | None, name: str = ""
) -> torch.Tensor:
    """Add every token's adapter delta to the base output ``y`` ([T, O]). x: [T, D]."""
    if ctx is None:
        return y
    if stack.cpu is not None and (ext := cpu_ext.for_input(x)) is not None:
        return _cpu_forward(ext, x, y, stack, ctx, name)
    stack.ensure_torch()
    if ctx.groups is None:
        return y if stack.fused is None else _fused_forward(x, y, stack, ctx, name)
    mixed = len(ctx.groups) > 1 or any(rows is not None for rows in ctx.groups.values())
    # the fused path for small mixed batches, and on CUDA for any mixed batch (the per-slot path's row gathers and
    # scatters cost more there than the GEMMs over the other adapters' pools)
    if mixed and stack.fused is not None and (x.shape[0] <= FUSED_MAX_TOKENS or x.is_cuda):
        return _fused_forward(x, y, stack, ctx, name)
    for slot, rows in ctx.groups.items():
        w = stack.slots.get(slot)
        if w is None:
            continue
        xs = x if rows is None else x.index_select(0, rows)
        pu = F.linear(xs, w.pa)  # [t, n + n*r]
        # low-precision pools route on float32 logits, as DESIGN §1 requires
        logits = None if w.router32 is None else F.linear(xs.float(), w.router32)
        um, idx = topk_masked_u(pu, w.n, w.k, w.omega, logits)
        if ctx.count:  # index_add_, not bincount: no host synchronisation on CUDA
            w.counts.index_add_(0, idx.flatten(), ctx.ones(idx.numel(), idx.device))
        if ctx.trace is not None:
            ctx.trace.append((name, slot, rows, idx))
        if rows is None:
            y = torch.addmm(y, um, w.b_flat_t)
        else:
            y.index_add_(0, rows, um @ w.b_flat_t)
    return y


FUSED_MAX_TOKENS = 128  # small mixed batches (decode): one pass over all pools beats a pass per adapter


def _fused_forward(x: torch.Tensor, y: torch.Tensor, stack: PoolStack, ctx: RoutingContext, name: str) -> torch.Tensor:
    """A mixed batch in three ops (all pools' router+A GEMM, per-token routing within its adapter, B GEMM) and
    the counting, with no host synchronisation."""
    f = stack.fused
    pu = F.linear(x, f.pa)  # [T, N + N*r_max]
    logits = None if f.router32 is None else F.linear(x.float(), f.router32)
    *plan, ones = ctx.plan_for(f)
    um, sel = route_with_plan(pu, f.num_loras, plan, logits, cols=f.cols)
    if ctx.count:  # unused ranks (id N) land in the spare last counter
        stack.counts.index_add_(0, sel.flatten(), ones)
    if ctx.trace is not None:
        _trace_global(ctx, stack, torch.where(sel < f.num_loras, sel, -1), f.offsets, name)
    return torch.addmm(y, um, f.bt)


def _cpu_forward(ext, x: torch.Tensor, y: torch.Tensor, stack: PoolStack, ctx: RoutingContext, name: str) -> torch.Tensor:
    """Any batch, one call: route each token in its adapter's pool and add its selected LoRAs into y in place."""
    c = stack.cpu
    y = y.contiguous()
    idx = ext.route_gather_(x.contiguous(), y, c.router, c.a, c.bt, ctx.slots, *c.tables, c.r, c.kmax,
                            c.counts if ctx.count else cpu_ext.NONE, cpu_ext.NONE if c.ranks is None else c.ranks)
    _trace_global(ctx, stack, idx, c.offsets, name)
    return y


def _trace_global(ctx: RoutingContext, stack: PoolStack, idx: torch.Tensor, offsets: dict, name: str) -> None:
    """Append each slot's selections (global ids turned back into its own) to the step's trace, if one is kept."""
    if ctx.trace is None or ctx.groups is None:
        return
    for slot, rows in ctx.groups.items():
        w = stack.slots.get(slot)
        if w is not None:
            mine = idx if rows is None else idx.index_select(0, rows)
            ctx.trace.append((name, slot, rows, mine[:, : w.k] - offsets[slot]))


class StackedLinear(torch.nn.Module):
    """The ReMix layer in serving mode: a frozen linear plus a :class:`PoolStack` of adapters,
    routed by the current :class:`RoutingContext` (no context, or slot -1: the bare base)."""

    def __init__(self, base: torch.nn.Linear, name: str = ""):
        super().__init__()
        self.base, self.name, self.stack = base, name, PoolStack()
        self._bound: tuple = (None, (None, None, None), None)  # (stack.cpu, cpu_ext.base_key(base), compiled call) as last bound
        self.in_features, self.out_features = base.in_features, base.out_features

    def bound_call(self):
        """The compiled whole-module call (``cpu_ext.bind_module``) for this layer's base and CPU pool stack, bound
        again when either changed; None where it cannot stand in (no CPU stack, hooks on the base, the compiled path
        disabled or unavailable)."""
        cpu = self.stack.cpu
        if cpu is None:
            return None
        base = self._modules["base"]
        stack_of, key, call = self._bound
        if stack_of is not cpu or not cpu_ext.bound_applies(base, key):
            if not cpu_ext.bound_applies(base, cpu_ext.base_key(base)):
                return None  # hooks on the base, or disabled: the base runs as a module
            # a new stack (adapter loaded / unloaded) or new base tensors: bind again
            call = cpu_ext.bind_module(base, cpu.router, cpu.a, cpu.bt, cpu.tables, cpu.r, cpu.kmax, ranks=cpu.ranks)
            self.__dict__["_bound"] = (cpu, cpu_ext.base_key(base), call)
        return call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        cpu = self.stack.cpu
        if ctx is not None and cpu is not None:
            call = self.bound_call()
            if call is not None:
                # base GEMM, routing and gather in one crossing into C++ (None: it does not apply, e.g. not a CPU tensor)
                out = call.routed(x, ctx.slots, cpu.counts if ctx.count else cpu_ext.NONE)
                if out is not None:
                    if ctx.trace is not None:
                        _trace_global(ctx, self.stack, out[1], cpu.offsets, self.name)
                    return out[0]
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = stacked_forward(x2, self.base(x2), self.stack, ctx, self.name)
        return y.view(*shape, self.out_features)
