"""Held-out evaluation: loss, exact match by greedy generation (deterministic top-k routing), and
routing diagnostics per module and task family (selection entropy, effective LoRAs, ESS, heatmaps).

    python -m training.evaluate ADAPTER [--data TASK | --eval-data FILE.jsonl] [--json out.json]

scores a saved adapter and its frozen base on the held-out set training.fit evaluated it on (the adapter's own training
settings: its task, seed, held-out size and lengths), or on another task or JSONL file, and prints them side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

import remix
from remix import routing
from remix.adapter import read_config
from remix.models import DTYPES, resolve_dtype, trained_context
from remix.settings import HelpFormatter, flag_bool
from training.config import TrainConfig
from training.data import DataError, Example, collate, heldout_examples
from training.rloo import completion_losses
from training.tasks import TASK_DEFAULTS, exact_match


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
        result["tasks"][task] = {"exact_match": correct / len(items), "count": len(items)}
        if not layers:  # the bare base: nothing routed
            continue
        usage = torch.stack([layer.usage.to("cpu", copy=True) for layer in layers.values()])  # [modules, n], a CPU copy
        effective = [routing.selection_entropy(u)[1] for u in usage]
        ess = [layer.mean_ess() for layer in layers.values()]
        result["tasks"][task].update(effective_loras_mean=sum(effective) / len(effective), ess_mean=sum(ess) / len(ess))
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


def load_training_base(spec: str, dtype_name: str, device: str, max_seq_len: int):
    """The frozen base as training.fit trains around it and training.evaluate scores with it: in ``dtype_name``
    (float32, bfloat16 or auto), with eager attention for bfloat16 on CPU (torch's CPU flash attention's bfloat16
    backward took a fifth of a training step, 4x its float32 one; eager attention runs on the GEMMs), so evaluate
    reproduces fit's scores exactly. Examples of ``max_seq_len`` tokens must fit the context the base was trained for
    (DataError otherwise: positions it never learnt, as the server refuses such a --max-model-len). Returns (model,
    tokenizer, dtype)."""
    dtype = resolve_dtype(dtype_name, device)
    model, tokenizer = remix.load_base(spec, dtype=dtype, device=device)
    context = trained_context(model.config)
    if context is not None and max_seq_len > context:
        raise DataError(f"--max-seq-len {max_seq_len} is past the context {spec} was trained for ({context} "
                        f"positions); give at most {context}")
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        model.set_attn_implementation("eager")
    return model, tokenizer, dtype


# ---- python -m training.evaluate

SETTINGS = ("data", "eval_data", "eval_size", "eval_split", "seed", "max_seq_len", "eval_max_new_tokens", "chat")


def settings_for(trained: dict, explicit: dict) -> dict:
    """The held-out set's settings: the flags given, then (unless they name other data than the adapter was trained
    on) the adapter's training settings, then the named task's own defaults, then training.fit's defaults."""
    out = {name: getattr(TrainConfig, name) for name in SETTINGS}
    if trained and "eval_split" not in trained:  # trained before --eval-split existed: on all of its file's rows
        trained = {**trained, "eval_split": 0.0}
    same_data = all(explicit.get(name, trained.get(name)) == trained.get(name) for name in ("data", "eval_data"))
    if same_data:
        out.update({name: trained[name] for name in SETTINGS if name in trained})
    else:  # (other data than it was trained on: nothing of it was held out, so --eval-split holds nothing out)
        out.update({k: v for k, v in TASK_DEFAULTS.get(explicit.get("data", out["data"]), {}).items() if k in SETTINGS})
        out["eval_split"] = 0.0
    out.update(explicit)
    return out


def _scores(res: dict) -> dict:
    return {"eval_loss": res["loss"], "eval_exact_match": res["exact_match"],
            "tasks": {t: {k: v for k, v in r.items() if k != "count"} for t, r in res["tasks"].items()},
            "samples": res["samples"]}


def table(out: dict) -> str:
    """Base and adapter side by side: held-out loss, exact match, exact match per task family."""
    rows = [(name, out[name]) for name in ("base", "adapter") if name in out]
    tasks = sorted(rows[-1][1]["tasks"])
    head = ["", "loss", "exact match", *tasks]
    lines = [head] + [[name, f"{r['eval_loss']:.3f}", f"{100 * r['eval_exact_match']:.1f} %",
                       *(f"{100 * r['tasks'][t]['exact_match']:.1f} %" for t in tasks)] for name, r in rows]
    width = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, width)))
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("adapter", help="an adapter directory (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--base", default=None, help="the base model (default: the one the adapter was trained on)")
    defaults = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in SETTINGS:
        kind = flag_bool if name == "chat" else type(defaults[name].default)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                        help=f"{defaults[name].metadata['help']} (default: the adapter's training setting)")
    ap.add_argument("--skip-base", action="store_true", help="score the adapter only")
    ap.add_argument("--json", default=None, help="also write the scores (and a few samples) here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="the base's dtype (default: the one the adapter was trained with, float32 for an adapter "
                         "that does not say); the pools stay float32, as training.fit trains them")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = read_config(args.adapter)
        trained = (config.get("training") or {}).get("config") or {}
        setting = settings_for(trained, {n: getattr(args, n) for n in SETTINGS if getattr(args, n) is not None})
        # (the held-out set's fields and the device, checked as training.fit checks them; the others keep valid defaults)
        problems = TrainConfig(**setting, device=args.device).problems()
        if problems:  # (a setting from the adapter's training, e.g. a data file not on this machine: name it with a flag)
            raise DataError("invalid evaluation settings (flags, else the adapter's training settings):\n  - "
                            + "\n  - ".join(problems))
        base = args.base or trained.get("base") or (config.get("base_model") or {}).get("name")
        if not base:
            raise DataError("the adapter does not name its base model: give --base")
        model, tokenizer, dtype = load_training_base(
            base, args.dtype or (config.get("training") or {}).get("base_dtype") or "float32", args.device,
            setting["max_seq_len"])
        heldout = heldout_examples(setting["data"], setting["eval_data"], tokenizer, setting["max_seq_len"],
                                   setting["eval_size"], setting["seed"], setting["chat"], setting["eval_split"])
        if not heldout:
            raise DataError(f"--data {setting['data']} has no built-in test split and none was held out of it "
                            f"(--eval-split {setting['eval_split']:g}): give --eval-data FILE.jsonl")
        out = {"adapter_path": str(args.adapter), "base_model": base, "examples": len(heldout), "settings": setting,
               "dtype": str(dtype).removeprefix("torch.")}
        if not args.skip_base:  # first: load_adapter wraps the model's modules in place
            out["base"] = _scores(evaluate(model, tokenizer, {}, heldout, setting["eval_max_new_tokens"]))
        layers = remix.load_adapter(model, args.adapter, pools_dtype=torch.float32)
        out["adapter"] = _scores(evaluate(model, tokenizer, layers, heldout, setting["eval_max_new_tokens"]))
    except (remix.AdapterError, DataError, FileNotFoundError) as e:  # (load_base: FileNotFoundError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out['examples']} held-out examples ({setting['eval_data'] or setting['data']}, seed {setting['seed']}), "
          f"base {base}:")
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
