"""Fast per-token LoRA gather in plain torch ops (CPU and CUDA).

Legend: T = tokens, N = LoRAs in the stack, r = rank, k = LoRAs per token, D = d_in, O = d_out.

Gathering each token's own A and B (``A[idx]``) moves k·r·(D+O) numbers per token and runs as
many tiny GEMVs; on the FFN shapes of SmolLM2 that is 20-70x slower than a dense LoRA. Instead we
run the whole stack densely and zero what was not selected:

    u     = x @ A_flat^T                    [T, N*r]   one GEMM over every pool
    mask  = scatter(weights at idx)         [T, N]     per-token weight of each LoRA (0 if unselected)
    delta = (u * mask per r-chunk) @ B_flat^T  [T, O]  one GEMM, fused into the output by addmm

It does k/N of the work usefully, but in two GEMMs of good shape, and a token's result depends
only on its own row (no cross-token reduction), so batch-mates cannot change it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def flatten_a(A: torch.Tensor) -> torch.Tensor:
    """[N, r, D] -> [N*r, D] (a view when A is contiguous)."""
    return A.reshape(A.shape[0] * A.shape[1], A.shape[2])


def flatten_b_t(B: torch.Tensor) -> torch.Tensor:
    """[N, O, r] -> [N*r, O], row i*r + c holding B[i][:, c], ready for ``um @ B_flat_t``."""
    return B.transpose(1, 2).reshape(B.shape[0] * B.shape[2], B.shape[1])


def selection_mask(idx: torch.Tensor, weight: torch.Tensor | float, num_loras: int) -> torch.Tensor:
    """Dense per-token weight of every LoRA: mask[t, i] = sum_j w[t, j] * (idx[t, j] == i).

    idx: [T, k] (-1 = none); weight: float, [T] or [T, k]. Returns [T, N] float32. -1 entries are
    scattered into a spare column that is then dropped, so no branch is needed.
    """
    T, k = idx.shape
    w = torch.as_tensor(weight, dtype=torch.float32, device=idx.device)
    if w.dim() == 1:
        w = w[:, None]
    w = w.expand(T, k)
    safe = torch.where(idx >= 0, idx, num_loras)
    mask = torch.zeros(T, num_loras + 1, dtype=torch.float32, device=idx.device)
    return mask.scatter_add_(1, safe, w)[:, :num_loras]


def scale_chunks(u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u [T, N*r] with each LoRA's r-chunk scaled by mask [T, N] (0 drops it)."""
    T, N = mask.shape
    return (u.reshape(T, N, -1) * mask.to(u.dtype).unsqueeze(-1)).reshape(T, -1)


def masked_lora_delta(
    u: torch.Tensor, mask: torch.Tensor, b_flat_t: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Second half of the gather: ``out + (u * mask) @ B_flat^T``.

    u: [T, N*r] = x @ A_flat^T; mask: [T, N]; b_flat_t: [N*r, O]. Returns a new [T, O] tensor.
    """
    um = scale_chunks(u, mask)
    if out is None:
        return um @ b_flat_t
    return torch.addmm(out, um, b_flat_t)


def topk_masked_u(pu: torch.Tensor, n: int, k: int, omega: float, logits: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Route and mask in one call, for inference: pu = [router logits | every pool's A x].

    Semantics::

        for t in range(T):
            J = top-k(pu[t, :n])                      # best first, ties to the lower index
            um[t, i*r:(i+1)*r] = omega * pu[t, n + i*r : n + (i+1)*r] if i in J else 0
            idx[t] = J

    pu: [T, n + n*r] -> (um [T, n*r], idx [T, k] int64); ``logits`` [T, n], when given, route instead of
    ``pu[:, :n]``. The torch path of the layers (CUDA, or a CPU without the compiled kernels of
    :mod:`remix.kernels.cpu_ext`).
    """
    return topk_masked_u_torch(pu, n, k, omega, logits)


def topk_masked_u_multi(pu: torch.Tensor, num_loras: int, slot_of_token: torch.Tensor, slot_off: torch.Tensor,
                        slot_n: torch.Tensor, slot_k: torch.Tensor, slot_omega: torch.Tensor, kmax: int,
                        logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_masked_u` for a batch mixing adapters stacked into one pool of N LoRAs (global ids).

    Semantics::

        for t in range(T):
            s = slot_of_token[t]                      # -1 (or a slot with n = 0): no LoRA, um[t] = 0
            o, n, k = slot_off[s], slot_n[s], slot_k[s]
            J = o + top-k(pu[t, o:o+n])                # global ids, ties to the lower index
            um[t, i*r:(i+1)*r] = slot_omega[s] * pu[t, N + i*r : N + (i+1)*r] if i in J else 0
            idx[t, :k] = J; idx[t, k:] = -1

    pu: [T, N + N*r]; the slot tables are indexed by slot id and live on pu's device. ``logits`` [T, N], when given,
    replaces ``pu[:, :N]`` for the routing (float32 logits of a lower-precision model). Returns (um [T, N*r],
    idx [T, kmax]). Vectorised over tokens and slots, with no host synchronisation (so a CUDA graph can hold it).
    The part that depends only on the tokens' slots (:func:`multi_routing_plan`) is the same for every module with
    the same adapters, so serving computes it once a step and calls :func:`route_with_plan` per module.
    """
    plan = multi_routing_plan(slot_of_token, (slot_off, slot_n, slot_k, slot_omega), num_loras, kmax, pu.dtype)
    um, sel = route_with_plan(pu, num_loras, plan, logits)
    return um, torch.where(sel < num_loras, sel, -1)


def multi_routing_plan(slot_of_token: torch.Tensor, tables: tuple, num_loras: int, kmax: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What routing a mixed batch needs from its tokens' slots alone: (bias [T, N] float32: 0 inside the token's
    slot's range, -inf outside; keep [T, kmax] bool: the first k_s ranks; weight [T, kmax] in ``dtype``: omega_s)."""
    slot_off, slot_n, slot_k, slot_omega = tables
    T, N = slot_of_token.shape[0], num_loras
    valid = (slot_of_token >= 0) & (slot_of_token < slot_n.numel())
    s = torch.where(valid, slot_of_token, 0)
    o = slot_off[s]
    n = torch.where(valid, slot_n[s], 0)
    k = torch.where(valid, slot_k[s], 0)
    cols = torch.arange(N, device=slot_of_token.device)
    inside = (cols >= o[:, None]) & (cols < (o + n)[:, None])  # [T, N]
    bias = torch.zeros(T, N, dtype=torch.float32, device=slot_of_token.device).masked_fill_(~inside, float("-inf"))
    keep = torch.arange(kmax, device=slot_of_token.device)[None, :] < k[:, None]  # k <= n: kept ranks lie inside
    weight = slot_omega[s].to(dtype)[:, None].expand(T, kmax).contiguous()
    return bias, keep, weight


def route_with_plan(pu: torch.Tensor, num_loras: int, plan: tuple, logits: torch.Tensor | None = None,
                    cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's routing and masking of a mixed batch, given the step's :func:`multi_routing_plan`: logits outside
    a token's range become -inf, a stable descending sort keeps the lower index on ties. Returns (um [T, N*r],
    sel [T, kmax]: global ids, ``num_loras`` where a rank is not used). ``cols``: the LoRA of each of pu's A columns
    where the pools are stacked at their own ranks (then um is [T, sum of ranks]; the same products, no padding)."""
    bias, keep, weight = plan
    N = num_loras
    scores = (pu[:, :N] if logits is None else logits).float() + bias
    kmax = keep.shape[1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :kmax]
    sel = torch.where(keep, order, N)
    mask = torch.zeros(pu.shape[0], N + 1, dtype=pu.dtype, device=pu.device).scatter_(1, sel, weight)
    if cols is not None:
        return pu[:, N:] * mask.index_select(1, cols), sel
    return scale_chunks(pu[:, N:], mask[:, :N]), sel


def topk_masked_u_torch(pu: torch.Tensor, n: int, k: int, omega: float, logits: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_masked_u` in plain torch ops (any device and dtype; logits compared in float32). ``logits`` [T, n],
    when given, replace ``pu[:, :n]`` for the routing (float32 logits of a lower-precision model).

    Five kernels besides the slicing (sort, zeros, scatter, a cast where pu is not float32, the multiply): on CUDA an
    eager prefill step launches them for every module. omega goes through float32 first, as the fused path's float32
    table of weights does, so a token's weight is the same bits whichever path serves it."""
    from remix.routing import topk_lower_index

    T = pu.shape[0]
    idx = topk_lower_index((pu[:, :n] if logits is None else logits).float(), k)
    mask = torch.zeros(T, n, dtype=pu.dtype, device=pu.device).scatter_(1, idx, float(np.float32(omega)))
    return scale_chunks(pu[:, n:], mask), idx


def lora_gather(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast equivalent of :func:`remix.kernels.reference.lora_gather_reference` (plus ``out``).

    Semantics::

        for t in range(T):
            for j in range(k):
                if idx[t, j] != -1:
                    out[t] += w[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t])

    Differentiable in x, A, B and weight. Cost grows with N, so for many stacked adapters use
    :func:`lora_gather_grouped`, which runs this per adapter on that adapter's tokens.
    """
    u = F.linear(x, flatten_a(A))
    return masked_lora_delta(u, selection_mask(idx, weight, A.shape[0]), flatten_b_t(B), out)


def lora_gather_grouped(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | float,
    group: torch.Tensor,
    ranges: list[tuple[int, int]],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`lora_gather` for a stack of several adapters, run per adapter.

    group: [T] adapter slot of each token (-1 = none: the token gets no delta); ranges[g] = (start,
    end) of slot g's LoRAs in the stack; every id of a token of slot g lies in [start, end) or is -1.
    Loops over the slots present in the batch (a handful), never over tokens.
    """
    T, k = idx.shape
    result = torch.zeros(T, B.shape[1], dtype=x.dtype, device=x.device) if out is None else out.clone()
    w = torch.as_tensor(weight, dtype=torch.float32, device=x.device)
    w = (w[:, None] if w.dim() == 1 else w).expand(T, k)
    for g in torch.unique(group[group >= 0]).tolist():
        start, end = ranges[g]
        rows = (group == g).nonzero().squeeze(1)
        local = idx.index_select(0, rows)
        local = torch.where(local >= 0, local - start, local)
        delta = lora_gather(x.index_select(0, rows), A[start:end], B[start:end], local, w.index_select(0, rows))
        result.index_add_(0, rows, delta)
    return result
