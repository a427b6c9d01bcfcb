"""Routing maths shared by every router: probabilities, sampling, log Q(J), top-k, ESS.

Legend: T = tokens (any leading shape), n = LoRAs in a pool, k = LoRAs selected per token.

Everything here is computed in float32 whatever the input dtype, as DESIGN §1 requires.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Router logits ``P x`` in float32. x: [..., d_in], router: [n, d_in] -> [..., n]."""
    return F.linear(x.float(), router.float())


def router_probs(logits: torch.Tensor) -> torch.Tensor:
    """q = softmax(P x) in float32. [..., n] -> [..., n]."""
    return torch.softmax(logits.float(), dim=-1)


def topk_lower_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest scores per row, best first; equal scores go to the lower index.

    A stable descending sort keeps equal elements in index order, which gives the tie rule
    exactly (``torch.topk`` makes no promise about ties). [..., n] -> [..., k] (int64).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def plackett_luce_log_prob(log_probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log Q(J) of the ordered selection ``idx`` drawn without replacement from ``exp(log_probs)``.

        log Q(J) = sum_j [ log q_{i_j} - log(1 - sum_{j' < j} q_{i_j'}) ]

    ``1 - sum_{j'<j} q`` is computed as the log-sum-exp of the not-yet-chosen entries, which stays
    exact when q is peaked (``log1p(-cumsum)`` loses everything there).
    log_probs: [..., n] normalised log-probabilities; idx: [..., k] -> [...].
    """
    log_probs = log_probs.float()
    remaining = log_probs
    total = torch.zeros(log_probs.shape[:-1], dtype=torch.float32, device=log_probs.device)
    for j in range(idx.shape[-1]):  # k is small (1..8); vectorised over every token
        chosen = idx[..., j : j + 1]
        total = total + remaining.gather(-1, chosen).squeeze(-1) - torch.logsumexp(remaining, dim=-1)
        remaining = remaining.scatter(-1, chosen, float("-inf"))
    return total


def sample_without_replacement(
    logits: torch.Tensor, k: int, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw k distinct indices per row from softmax(logits), in draw order, and their log Q(J).

    Gumbel-top-k: the order of ``log q + Gumbel`` is distributed exactly as sequential sampling
    without replacement (Kool et al. 2019), so one sort replaces k dependent draws.
    logits: [..., n] -> (idx [..., k] int64, log_q [...] float32, differentiable w.r.t. logits).
    ``uniform`` ([..., n] in (0, 1)) replaces the random draw, for callers that need split-invariant noise.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if uniform is None:
        uniform = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float32)
    u = uniform.to(device=log_probs.device, dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny, max=1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    idx = torch.topk(log_probs.detach() + gumbel, k, dim=-1).indices
    return idx, plackett_luce_log_prob(log_probs, idx)


def ess(weights: torch.Tensor) -> torch.Tensor:
    """Effective support size ||w||_1^2 / ||w||_2^2 per row. [..., n] -> [...].

    Equal weights on k entries give exactly k; one dominating entry gives ~1 (routing collapse).
    """
    w = weights.float().abs()
    return w.sum(-1) ** 2 / (w * w).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)


def selection_entropy(counts: torch.Tensor) -> tuple[float, float]:
    """Entropy (nats) of a selection-frequency histogram and its effective number ``exp(H)``.

    counts: [n] how often each LoRA was selected. All mass on one LoRA gives (0, 1); uniform use of
    n LoRAs gives (log n, n). An empty histogram gives (0, 0).
    """
    c = counts.double().flatten()
    total = c.sum()
    if total <= 0:
        return 0.0, 0.0
    p = c[c > 0] / total
    h = float(-(p * p.log()).sum())
    return h, math.exp(h)
