"""Held-out evaluation: loss, exact match by greedy generation (deterministic top-k routing), and
routing diagnostics per module and task family (selection entropy, effective LoRAs, ESS, heatmaps)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from remix import routing
from training.data import Example, collate
from training.rloo import completion_losses
from training.tasks import exact_match


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def heldout_loss(model, examples: list[Example], pad_id: int, batch_size: int = 16) -> float:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        losses, _ = completion_losses(model, batch)
        total += float(losses.sum())
        count += len(chunk)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy completions of token-id prompts (left-padded batch), decoded up to EOS."""
    pad = tokenizer.pad_token_id
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[L:], skip_special_tokens=True) for row in out.cpu()]


def evaluate(model, tokenizer, layers: dict, examples: list[Example], max_new_tokens: int = 12,
             batch_size: int = 16) -> dict:
    """Loss, exact match and routing statistics, overall and per task family."""
    was_training = model.training
    model.eval()
    for layer in layers.values():
        layer.record = True
    by_task: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    result: dict = {"tasks": {}, "usage": {}}
    correct_all, samples = 0, []
    for task, items in sorted(by_task.items()):
        for layer in layers.values():
            layer.reset_stats()
        correct = 0
        for chunk in _batches(items, batch_size):
            preds = generate(model, tokenizer, [ex.prompt_ids for ex in chunk], max_new_tokens)
            for ex, pred in zip(chunk, preds):
                ok = exact_match(pred, ex.reference)
                correct += ok
                if len(samples) < 6:
                    samples.append({"task": task, "reference": ex.reference, "prediction": pred.strip(), "correct": ok})
        correct_all += correct
        usage = torch.stack([layer.usage.to("cpu", copy=True) for layer in layers.values()])  # [modules, n], a CPU copy
        effective = [routing.selection_entropy(u)[1] for u in usage]
        ess = [layer.mean_ess() for layer in layers.values()]
        result["tasks"][task] = {
            "exact_match": correct / len(items), "count": len(items),
            "effective_loras_mean": sum(effective) / len(effective),
            "ess_mean": sum(ess) / len(ess),
        }
        result["usage"][task] = usage
    for layer in layers.values():
        layer.record = False
        layer.reset_stats()
    result["loss"] = heldout_loss(model, examples, tokenizer.pad_token_id, batch_size)
    result["exact_match"] = correct_all / len(examples)
    result["samples"] = samples
    model.train(was_training)
    return result


def per_module_effective(usage: torch.Tensor) -> list[float]:
    return [routing.selection_entropy(u)[1] for u in usage]


def usage_heatmap(usage: torch.Tensor, names: list[str], path: Path, title: str) -> None:
    """PNG of the selection share of each LoRA (columns) in each wrapped module (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = usage.cpu()
    share = usage.double() / usage.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(4 + 0.3 * usage.shape[1], 2 + 0.12 * usage.shape[0]))
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("LoRA")
    ax.set_ylabel("module")
    step = max(1, len(names) // 30)
    ax.set_yticks(range(0, len(names), step))
    ax.set_yticklabels([names[i].replace("model.layers.", "L").replace(".mlp.", ".") for i in range(0, len(names), step)],
                       fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of selections")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
