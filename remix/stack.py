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


@dataclass
class _Slab:
    """The compiled path's storage on one module: room for ``capacity`` LoRAs at rank ``r`` (every LoRA's rows padded to
    it), the first N of them every loaded slot's pool in :attr:`PoolStack.order` with no gap between them. The kernel
    is given that live prefix (views), so it never sees the room; a load writes only its own pool's rows there and an
    unload moves at most one pool (or the pools after it), instead of copying every loaded adapter again."""

    router: torch.Tensor  # [capacity, D] float32
    a: torch.Tensor  # [capacity * r, D] in the pool dtype
    bt: torch.Tensor  # [capacity * r, O]
    r: int

    @property
    def capacity(self) -> int:
        return self.router.shape[0]


class PoolStack:
    """The adapters loaded on one module, by slot id. Mutated only between steps (by the engine).

    ``order``: the slots in the order of their LoRAs' global ids, shared by the compiled path's stack, the torch path's
    and the selection counters. A new slot goes last; a removed one's place is taken by the last slot where that has as
    many LoRAs (one pool moved), else the slots after it close up.
    """

    def __init__(self) -> None:
        self.slots: dict[int, SlotWeights] = {}
        self.order: list[int] = []
        self.fused: StackedPools | None = None  # torch path: mixed small batches, CUDA graphs
        self.cpu: StackedPools | None = None  # compiled CPU kernel (views of the slab's live rows)
        self._slab: _Slab | None = None
        self._raw: dict[int, tuple] = {}  # slot -> (A, B, router, model dtype) as given
        self._torch_ready = False
        self.reserve = 0  # LoRAs the compiled path's slab makes room for at once (the engine: max adapters x n)
        # every slot's selection counters in one buffer (by global id, then one spare entry that absorbs the "no LoRA"
        # ids of the torch path); each SlotWeights.counts is a view of its range
        self.counts = torch.zeros(1, dtype=torch.int64)

    def add(self, slot: int, A: torch.Tensor, B: torch.Tensor, router: torch.Tensor, k: int, omega: float,
            dtype: torch.dtype | None = None, reserve: int = 0, rows: tuple | None = None) -> None:
        """A [n, r, D], B [n, O, r], router [n, D]; ``dtype``: the model's (default A's), for the torch path;
        ``reserve``: LoRAs to make room for in the compiled path's slab when it is (re)allocated; ``rows``: what
        :meth:`kernel_rows` gives for these pools (laid out beforehand, e.g. off the engine's thread), else made here.

        Pass the pools in float32 even for a lower-precision model: each path rounds its own copy once (the
        compiled CPU path keeps a bfloat16 model's A and B in bfloat16 - what ``remix.load_adapter`` gives that
        model's layers too - and every router in float32; the torch path converts to ``dtype``). The
        torch path's layouts are built on first use, so a CPU serving through the compiled kernel holds
        only the adapter's tensors and one stacked copy.
        """
        if slot in self._raw:
            self.remove(slot)
        n = A.shape[0]
        old = self.offsets()
        self.slots[slot] = SlotWeights(None, None, n, k, omega, torch.zeros(n, dtype=torch.int64, device=A.device))
        self._raw[slot] = (A, B, router, dtype or A.dtype)
        self.order.append(slot)
        self.reserve = max(self.reserve, reserve)
        self._changed(old, new=slot, rows=rows)

    def remove(self, slot: int) -> None:
        if slot not in self._raw:
            return
        old = self.offsets()
        i, last = self.order.index(slot), self.order[-1]
        if last != slot and self.slots[last].n == self.slots[slot].n:
            self.order[i] = last  # (the last pool takes its place: one pool moved)
            self.order.pop()
        else:
            self.order.pop(i)  # (the pools after it close up)
        self.slots.pop(slot)
        self._raw.pop(slot)
        self._changed(old)

    def make_room(self, loras: int) -> None:
        """Room for ``loras`` LoRAs in the compiled path's slab from now on (copying what it holds once, where it has
        less): the loads that follow, up to that many, write only their own pools."""
        self.reserve = max(self.reserve, loras)
        if self._slab is not None and self._slab.capacity < loras:
            self._changed(self.offsets())  # (the slab made again at the reserve: every pool copied, none converted)

    def offsets(self) -> dict[int, int]:
        """slot -> the global id of its first LoRA (in :attr:`order`)."""
        out, at = {}, 0
        for s in self.order:
            out[s], at = at, at + self.slots[s].n
        return out

    def _changed(self, old: dict[int, int], new: int | None = None, rows: tuple | None = None) -> None:
        global _generation
        _generation += 1
        device = self._raw[self.order[0]][0].device if self.order else self.counts.device
        self.counts = torch.cat([self.slots[s].counts.to(device) for s in self.order]
                                + [torch.zeros(1, dtype=torch.int64, device=device)])  # keep what was counted so far
        off = 0
        for s in self.order:
            w = self.slots[s]
            w.counts = self.counts[off : off + w.n]
            off += w.n
        self._update_cpu(old, new, rows)
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
        self.fused = self._stack_all(dtype)
        self.fused.pa = torch.cat([self.fused.router, self.fused.a], 0).contiguous()
        if dtype != torch.float32:  # route on float32 logits, as DESIGN §1 requires
            self.fused.router32 = torch.cat([self._raw[s][2].float() for s in self.order]).contiguous()

    @staticmethod
    def kernel_rows(A: torch.Tensor, B: torch.Tensor, router: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The rows the compiled path's slab keeps of one pool for a model of ``dtype``, at the pool's own rank: its
        router (float32), A and B^T in the kernel's pool dtype, [n, D], [n*r, D], [n*r, O]; None where that path
        does not apply (not a CPU, the kernels not built)."""
        if A.device.type != "cpu" or cpu_ext.load() is None:
            return None
        pool = cpu_ext.pool_dtype(dtype)
        return (router.to(torch.float32).contiguous(), flatten_a(A.to(pool)).contiguous(),
                flatten_b_t(B.to(pool)).contiguous())

    def _rows(self, slot: int, dtype: torch.dtype, r: int,
              given: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One slot's router (float32), A and B^T rows in ``dtype`` padded to rank ``r``: [n, D], [n*r, D], [n*r, O]
        (from ``given``, its :meth:`kernel_rows`, where they are in ``dtype``)."""
        A, B, router, _ = self._raw[slot]
        n, own = A.shape[0], A.shape[1]
        if given is not None and given[1].dtype == dtype:
            if own == r:
                return given
            a, bt = given[1].view(n, own, -1), given[2].view(n, own, -1)
            return given[0], flatten_a(F.pad(a, (0, 0, 0, r - own))), flatten_a(F.pad(bt, (0, 0, 0, r - own)))
        pad = r - own
        return (router.to(torch.float32), flatten_a(F.pad(A.to(dtype), (0, 0, 0, pad))),
                flatten_b_t(F.pad(B.to(dtype), (0, pad))))

    def _update_cpu(self, old: dict[int, int], new: int | None, rows: tuple | None) -> None:
        """Bring the compiled path's slab to :attr:`order`: the new slot's rows written after the others, a removed
        slot's place filled by moving the pools after it; a new slab (every pool copied, or converted where the padded
        rank or the dtype changed) only where the room runs out or is less than the reserve, the padded rank changes,
        or 3/4 of the room is unused. A and B in the kernel's pool dtype (bfloat16 for a bfloat16 model); routers float32 (DESIGN §1).

        (Every load and unload had stacked every loaded pool again: a decoding request's longest gap between tokens
        while an adapter loaded was 0.26-0.27 s with eight adapters loaded and 0.59-0.70 s with 24, against 0.06 and
        0.08 s now, its median gap 0.03 s: scripts/ab_adapter_load.py --preload 7 / 23.)"""
        if not self._raw or next(iter(self._raw.values()))[0].device.type != "cpu" or cpu_ext.load() is None:
            self._slab, self.cpu = None, None
            return
        dtype = cpu_ext.pool_dtype(next(iter(self._raw.values()))[3])
        r = max(A.shape[1] for A, *_ in self._raw.values())
        offsets = self.offsets()
        need = sum(self.slots[s].n for s in self.order)
        slab = self._slab
        keep = slab is not None and slab.a.dtype == dtype and slab.r == r  # its rows are valid as they stand
        cap = slab.capacity if slab is not None else 0
        if not keep or need > cap or cap < self.reserve or cap > max(self.reserve, 4 * need):
            # room: twice the last where it ran out, twice what is used where 3/4 lay unused, else what is needed -
            # and never less than the reserve (pages of it that are never written take no memory)
            size = max(need, self.reserve, (2 * cap if need > cap else 2 * need) if keep else 0)
            A0, B0, _, _ = next(iter(self._raw.values()))
            D, O, device = A0.shape[2], B0.shape[1], A0.device
            fresh = _Slab(torch.empty(size, D, device=device), torch.empty(size * r, D, dtype=dtype, device=device),
                          torch.empty(size * r, O, dtype=dtype, device=device), r)
            for s in self.order:
                if keep and s in old and s != new:  # (copied as it stands: the values a conversion gives)
                    self._put(fresh, offsets[s], *self._take(slab, old[s], self.slots[s].n))
                else:
                    self._put(fresh, offsets[s], *self._rows(s, dtype, r, rows if s == new else None))
            self._slab = slab = fresh
        else:
            for s in self.order:  # (in place: those that moved, then the new one)
                if s == new:
                    self._put(slab, offsets[s], *self._rows(s, dtype, r, rows))
                elif old[s] != offsets[s]:
                    self._put(slab, offsets[s], *(t.clone() for t in self._take(slab, old[s], self.slots[s].n)))
        view = self._layout(offsets, dtype, r, compact=False)
        view.router, view.a, view.bt = slab.router[:need], slab.a[: need * r], slab.bt[: need * r]
        view.counts = self.counts[:-1]  # [N], contiguous: the kernel adds each selection into it
        self.cpu = view

    @staticmethod
    def _take(slab: _Slab, off: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return slab.router[off : off + n], slab.a[off * slab.r : (off + n) * slab.r], slab.bt[off * slab.r : (off + n) * slab.r]

    @staticmethod
    def _put(slab: _Slab, off: int, router: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
        n = router.shape[0]
        slab.router[off : off + n].copy_(router)
        slab.a[off * slab.r : (off + n) * slab.r].copy_(a)
        slab.bt[off * slab.r : (off + n) * slab.r].copy_(bt)

    def _layout(self, offsets: dict[int, int], dtype: torch.dtype, r: int, compact: bool) -> StackedPools:
        """A :class:`StackedPools` of :attr:`order` without its tensors: the routing tables by slot id, the global
        offsets, each LoRA's rank (None where all are r), and, ``compact``, each row's LoRA."""
        ids = self.order
        device = self._raw[ids[0]][0].device
        ranks = [self._raw[s][0].shape[1] for s in ids for _ in range(self.slots[s].n)]
        size = max(ids) + 1
        col = lambda f, kind=torch.int64: torch.tensor(  # noqa: E731
            [f(s) if s in self.slots else 0 for s in range(size)], dtype=kind, device=device)
        kmax = max(self.slots[s].k for s in ids)
        empty = torch.empty(0)
        return StackedPools(
            router=empty, a=empty, bt=empty, r=r, kmax=kmax,
            tables=(col(lambda s: offsets[s]), col(lambda s: self.slots[s].n), col(lambda s: self.slots[s].k),
                    col(lambda s: self.slots[s].omega, torch.float32)),
            offsets=dict(offsets),
            ranks=None if min(ranks) == r else torch.tensor(ranks, dtype=torch.int64, device=device),
            cols=None if not compact or min(ranks) == r else torch.repeat_interleave(
                torch.arange(len(ranks), device=device), torch.tensor(ranks, device=device)),
            layout=(dtype, device, len(ranks), kmax,
                    *((s, offsets[s], self.slots[s].n, self.slots[s].k, self.slots[s].omega) for s in ids)),
        )

    def _stack_all(self, dtype: torch.dtype) -> StackedPools:
        """The torch path's stack: every slot's pool in ``dtype`` (routers too), in :attr:`order`, each LoRA's rows at
        its own rank, LoRA after LoRA (``cols``: the LoRA of each row; None where every rank is the same)."""
        routers, As, Bs = [], [], []
        for s in self.order:
            A, B, router, _ = self._raw[s]
            routers.append(router.to(dtype))
            As.append(flatten_a(A.to(dtype)))  # [n * r_s, D]
            Bs.append(flatten_b_t(B.to(dtype)))  # [n * r_s, O]
        f = self._layout(self.offsets(), dtype, max(A.shape[1] for A, *_ in self._raw.values()), compact=True)
        f.router, f.a, f.bt = torch.cat(routers).contiguous(), torch.cat(As).contiguous(), torch.cat(Bs).contiguous()
        return f


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
