"""Plain reference for the per-token LoRA gather. Slow on purpose: it is the definition."""

from __future__ import annotations

import torch


def lora_gather_reference(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor | float
) -> torch.Tensor:
    """Per-token sum of the selected LoRAs' outputs.

    Semantics (this *is* the implementation)::

        for t in range(T):
            for j in range(k):
                i = idx[t, j]
                if i == -1:            # -1 means "no LoRA"
                    continue
                delta[t] += w[t, j] * B[i] @ (A[i] @ x[t])

    x: [T, d_in]; A: [N, r, d_in]; B: [N, d_out, r] (N = LoRAs of every stacked adapter, ids are
    global); idx: [T, k] int; weight: a float, [T] (one ω per token) or [T, k]. Ranks padded with
    zero rows of A / zero columns of B contribute nothing. Returns delta: [T, d_out] in x's dtype,
    accumulated in float32 (float64 for float64 inputs).
    """
    T, k = idx.shape
    w = torch.as_tensor(weight, dtype=torch.float32, device=x.device)
    w = (w[:, None] if w.dim() == 1 else w).expand(T, k)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    delta = torch.zeros(T, B.shape[1], dtype=acc, device=x.device)
    for t in range(T):
        for j in range(k):
            i = int(idx[t, j])
            if i == -1:
                continue
            delta[t] += w[t, j].to(acc) * (B[i].to(acc) @ (A[i].to(acc) @ x[t].to(acc)))
    return delta.to(x.dtype)
