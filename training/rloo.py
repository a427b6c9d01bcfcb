"""The RLOO objective of ReMix (DESIGN §1), as small pure functions.

Legend: M = selections per example, B = examples, L = sequence length, V = vocabulary.

For example b and selection m: L[m, b] = mean NLL over b's completion tokens under selection m,
and log Q[m, b] = log-probability of that selection summed over modules and non-padding tokens.

    router gradient  G_P = 1/(M-1) * sum_m (L[m,b] - mean_m L[:,b]) * grad log Q[m,b]   (per b, then averaged)
    LoRA gradient    grad of mean_{m,b} L[m,b]

Both come from one objective: ``mean(L) + surrogate`` where the surrogate multiplies log Q by the
detached leave-one-out advantage, and log Q is computed from P·stopgrad(x) in the layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.data import IGNORE


def completion_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Per-example mean NLL over labelled tokens ([N]) and the number of labelled tokens.

    Runs the LM head only at labelled positions: the 49k-word head is a fifth of the FLOPs of a
    135M model, and most positions are prompt.
    """
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    where = targets != IGNORE  # [N, L-1]
    rows = where.nonzero()[:, 0]
    logits = model.lm_head(hidden[:, :-1][where]).float()  # [labelled, V]
    nll = F.cross_entropy(logits, targets[where], reduction="none")
    per_example = torch.zeros(targets.shape[0], device=nll.device).index_add_(0, rows, nll)
    counts = where.sum(1).clamp_min(1)
    return per_example / counts, int(where.sum())


def sequence_log_q(layers, attention_mask: torch.Tensor) -> torch.Tensor:
    """log Q(J) of each row's whole selection: summed over modules and non-padding tokens. [N]."""
    mask = attention_mask.to(torch.float32)
    total = torch.zeros(mask.shape[0], device=mask.device)
    for layer in layers:
        total = total + (layer.last_log_q.view(mask.shape) * mask).sum(-1)
    return total


def rloo_surrogate(losses: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_m stopgrad(L[m,b] - mean_m L[:,b]) * log Q[m,b] / (M-1), averaged over b.

    losses, log_q: [M, B]. Its gradient is the RLOO estimate G_P (unbiased: each L's baseline is
    the mean of the *other* M-1 samples up to the factor M/(M-1) folded into 1/(M-1)).
    """
    M = losses.shape[0]
    if M < 2:
        raise ValueError("RLOO needs M >= 2 selections per example")
    advantage = (losses - losses.mean(0, keepdim=True)).detach()
    return (advantage * log_q).sum(0).mean() / (M - 1)


def replicate(batch: dict[str, torch.Tensor], M: int) -> dict[str, torch.Tensor]:
    """Repeat a batch M times along the batch axis, selection-major: row m*B + b is example b."""
    return {key: value.repeat(M, *([1] * (value.dim() - 1))) for key, value in batch.items()}
