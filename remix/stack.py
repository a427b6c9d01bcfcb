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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from remix import routing
from remix.kernels import flatten_a, flatten_b_t, selection_mask, topk_masked_u


@dataclass
class SlotWeights:
    """One adapter's pool on one module, laid out for the grouped kernel."""

    pa: torch.Tensor  # [n + n*r, D]: router rows, then each LoRA's A rows
    b_flat_t: torch.Tensor  # [n*r, O]
    n: int
    k: int
    omega: float
    counts: torch.Tensor  # [n] int64, selections since load (read by the metrics exporter)
    router32: torch.Tensor | None = None  # float32 router when the pool is stored in lower precision


class PoolStack:
    """The adapters loaded on one module, by slot id. Mutated only between steps (by the engine)."""

    def __init__(self) -> None:
        self.slots: dict[int, SlotWeights] = {}

    def add(self, slot: int, A: torch.Tensor, B: torch.Tensor, router: torch.Tensor, k: int, omega: float) -> None:
        """A [n, r, D], B [n, O, r], router [n, D]."""
        n = A.shape[0]
        pa = torch.cat([router.to(A.dtype), flatten_a(A)], 0).contiguous()
        self.slots[slot] = SlotWeights(
            pa, flatten_b_t(B).contiguous(), n, k, omega, torch.zeros(n, dtype=torch.int64, device=A.device),
            router.float().contiguous() if A.dtype != torch.float32 else None,
        )

    def remove(self, slot: int) -> None:
        self.slots.pop(slot, None)


@dataclass
class RoutingContext:
    """Per-step routing published by the engine and read by every module in serving mode.

    ``slots``: [T] adapter slot of each token of the flattened batch (-1 = no adapter). The grouping
    (``groups``: slot -> row indices, or None when every token has that slot) is computed once here.
    ``trace``: when a list, each module appends (module name, slot, rows, idx) for per-request traces.
    """

    slots: torch.Tensor
    groups: dict[int, torch.Tensor | None] = field(default_factory=dict)
    count: bool = True
    trace: list | None = None

    @classmethod
    def build(cls, slots: torch.Tensor, count: bool = True, trace: bool = False) -> "RoutingContext":
        present = torch.unique(slots).tolist()
        if len(present) == 1:
            groups = {present[0]: None} if present[0] >= 0 else {}
        else:
            groups = {s: (slots == s).nonzero().squeeze(1) for s in present if s >= 0}
        return cls(slots=slots, groups=groups, count=count, trace=[] if trace else None)


_local = threading.local()


def set_context(ctx: RoutingContext | None) -> None:
    """Publish the routing context of the next forward step (thread-local: one engine per thread)."""
    _local.ctx = ctx


def get_context() -> RoutingContext | None:
    return getattr(_local, "ctx", None)


def scale_chunks(u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u [T, n*r] with each r-chunk scaled by mask [T, n]."""
    T, n = mask.shape
    return (u.reshape(T, n, -1) * mask.to(u.dtype).unsqueeze(-1)).reshape(T, -1)


def stacked_forward(
    x: torch.Tensor, y: torch.Tensor, stack: PoolStack, ctx: RoutingContext | None, name: str = ""
) -> torch.Tensor:
    """Add every token's adapter delta to the base output ``y`` ([T, O]). x: [T, D]."""
    if ctx is None:
        return y
    for slot, rows in ctx.groups.items():
        w = stack.slots.get(slot)
        if w is None:
            continue
        xs = x if rows is None else x.index_select(0, rows)
        pu = F.linear(xs, w.pa)  # [t, n + n*r]
        if w.router32 is None:
            um, idx = topk_masked_u(pu, w.n, w.k, w.omega)
        else:  # low-precision pools: route on float32 logits, as DESIGN §1 requires
            idx = routing.topk_lower_index(F.linear(xs.float(), w.router32), w.k)
            um = scale_chunks(pu[:, w.n :], selection_mask(idx, w.omega, w.n))
        if ctx.count:
            w.counts += torch.bincount(idx.flatten(), minlength=w.n)
        if ctx.trace is not None:
            ctx.trace.append((name, slot, rows, idx))
        if rows is None:
            y = torch.addmm(y, um, w.b_flat_t)
        else:
            y.index_add_(0, rows, um @ w.b_flat_t)
    return y


class StackedLinear(torch.nn.Module):
    """The ReMix layer in serving mode: a frozen linear plus a :class:`PoolStack` of adapters,
    routed by the current :class:`RoutingContext` (no context, or slot -1: the bare base)."""

    def __init__(self, base: torch.nn.Linear, name: str = ""):
        super().__init__()
        self.base, self.name, self.stack = base, name, PoolStack()
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = stacked_forward(x2, self.base(x2), self.stack, get_context(), self.name)
        return y.view(*shape, self.out_features)
