"""python -m training.fit: finetune a frozen base with ReMix pools (RLOO-trained routers) or a baseline.

With no arguments it trains the demo adapter (ReMix n=8 k=2 r=8 on SmolLM2-135M-Instruct, built-in
task mixture) into runs/demo/adapter. ``--help`` lists every field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import remix
from remix import routing
from remix.inject import NoTargets
from remix.kernels import tune_cpu_allocator
from training import distributed, rloo
from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig, load_config
from training.data import DataError, collate, train_and_heldout
from training.evaluate import evaluate, load_training_base, usage_heatmap
from training.tasks import TASKS

log = logging.getLogger("training.fit")


def make_optimizer(cfg: TrainConfig, layers: dict) -> torch.optim.Optimizer:
    pools = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    routers = [layer.router for layer in layers.values() if layer.router is not None]
    groups = [{"params": pools, "lr": cfg.lr}] + ([{"params": routers, "lr": cfg.router_lr}] if routers else [])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, total: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_positions(step: int, micro: int, cfg: TrainConfig, rank: int = 0, world: int = 1) -> list[int]:
    """Positions in the example stream of this rank's share of one micro-batch (a contiguous slice)."""
    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    share = cfg.batch_size // world
    return list(range(start + rank * share, start + (rank + 1) * share))


def example_at(pos: int, cfg: TrainConfig, n_examples: int) -> int:
    """The example at a stream position: a seeded permutation per epoch, so a resumed run sees the same order."""
    epoch, offset = divmod(pos, n_examples)
    return int(np.random.default_rng([cfg.seed, epoch]).permutation(n_examples)[offset])


def train_step(cfg: TrainConfig, model, layers: dict, batch: dict) -> dict:
    """Forward + backward of one micro-batch; returns the logged numbers (gradients are accumulated)."""
    B = batch["input_ids"].shape[0]
    layer_list = list(layers.values())
    if cfg.router == "remix":
        M = cfg.samples
        losses, tokens = rloo.completion_losses(model, rloo.replicate(batch, M))  # [M*B], selection-major
        losses = losses.view(M, B)
        log_q = rloo.sequence_log_q(layer_list, rloo.replicate(batch, M)["attention_mask"]).view(M, B)
        sft = losses.mean()
        surrogate = rloo.rloo_surrogate(losses, log_q)
        objective = sft + surrogate
        extra = {"loss_std_over_selections": float(losses.detach().std(0).mean())}
    else:
        losses, tokens = rloo.completion_losses(model, batch)
        sft = losses.mean()
        objective, extra = sft, {}
        if cfg.router == "softmax-topk" and cfg.load_balance_coef > 0:
            aux = torch.stack([layer.aux_loss for layer in layer_list]).mean()
            objective = objective + cfg.load_balance_coef * aux
            extra["load_balance_loss"] = float(aux.detach())
    (objective / cfg.grad_accum).backward()
    weights = [layer.last_weights for layer in layer_list if layer.last_weights is not None and layer.last_weights.dim() == 2]
    if weights:  # learned-weight routers: how many LoRAs really carry the routing weight (collapse -> ~1)
        mask = batch["attention_mask"].reshape(-1).bool()
        extra["train_ess"] = float(sum(routing.ess(w)[mask].mean() for w in weights) / len(weights))
    rows = cfg.samples if cfg.router == "remix" else 1
    return {"loss": float(sft.detach()), "tokens": tokens * rows,
            "seq_tokens": int(batch["attention_mask"].sum()) * rows, **extra}


def base_scores(metrics_path: Path) -> dict | None:
    """The frozen base's held-out scores, from the run log's step-0 evaluation (written by this run or, resumed, by
    its first attempt), as the summary's ``base`` gives them; None where the log has none."""
    if not metrics_path.exists():
        return None
    rows = map(json.loads, filter(str.strip, metrics_path.read_text().splitlines()))
    row = next((r for r in rows if r.get("step") == 0 and "eval_loss" in r), None)
    if row is None:
        return None
    tasks = {k[len("eval_"):-len("_exact_match")]: v for k, v in row.items()
             if k.startswith("eval_") and k.endswith("_exact_match") and k != "eval_exact_match"}
    return {"eval_loss": row["eval_loss"], "eval_exact_match": row["eval_exact_match"], "tasks_exact_match": tasks}


class _Lines:
    """A stream for tqdm that writes each status it draws as a line of its own (tqdm redraws one line with carriage
    returns, which a log file or a pipe keeps as one endless line)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def run(cfg: TrainConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tune_cpu_allocator()
    rank, world = distributed.setup(cfg.device)
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    lead = rank == 0
    run_dir = Path(cfg.output)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output {run_dir}: cannot create the run directory ({e.strerror})") from None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, tokenizer, base_dtype = load_training_base(cfg.base, cfg.dtype, cfg.device, cfg.max_seq_len)
    train, heldout = train_and_heldout(cfg.data, cfg.eval_data, tokenizer, cfg.max_seq_len, cfg.train_size,
                                       cfg.eval_size, cfg.seed, cfg.chat, cfg.eval_split)
    if lead and not cfg.eval_data and cfg.data not in TASKS:
        if heldout:
            log.warning("evaluating on %d of the rows of %s, held out of training (--eval-split %g; --eval-data FILE "
                        "evaluates on a file of its own)", len(heldout), cfg.data, cfg.eval_split)
        else:
            log.warning("no held-out set: only the training loss is logged (--eval-data FILE.jsonl, or --eval-split "
                        "with enough rows: %g of %s's rows is none)", cfg.eval_split, cfg.data)
    try:
        layers = remix.inject(model, cfg.mixture())
    except NoTargets as e:
        raise ConfigError(f"--targets: {e}") from None
    for layer in layers.values():  # float32 master weights whatever the base's dtype (a bfloat16 base: mixed precision)
        layer.pools_to(torch.float32)
    noises = []
    for i, layer in enumerate(layers.values()):
        if layer.kind == "remix":  # routing draws that do not depend on how the batch is split across ranks
            layer.noise = distributed.SplitInvariantNoise(cfg.seed, i, layer.n, cfg.max_seq_len)
            noises.append(layer.noise)
    model.train()
    total = cfg.steps or max(1, int(cfg.epochs * len(train) / (cfg.batch_size * cfg.grad_accum)))
    optimizer = make_optimizer(cfg, layers)
    scheduler = make_scheduler(cfg, optimizer, total)
    training_meta = {"config": dataclasses.asdict(cfg), "train_examples": len(train),
                     "base_dtype": str(base_dtype).removeprefix("torch.")}  # (auto resolved: what evaluate loads)
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        start = load_checkpoint(ckpt, layers, optimizer, scheduler, dataclasses.asdict(cfg))
        log.warning("resumed from %s (step %d)", ckpt, start)
        if metrics_path.exists():  # drop what was logged after the checkpoint: the curve continues from it
            rows = [line for line in metrics_path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get("step", 0) <= start]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    elif metrics_path.exists() and lead:
        metrics_path.unlink()
    logf = metrics_path.open("a") if lead else None

    def emit(record: dict) -> None:
        if logf is not None:
            logf.write(json.dumps(record) + "\n")
            logf.flush()

    def do_eval(step: int) -> dict | None:
        if not heldout or not lead:
            return None
        res = evaluate(model, tokenizer, layers, heldout, cfg.eval_max_new_tokens)
        emit({"step": step, "eval_loss": res["loss"], "eval_exact_match": res["exact_match"],
              **{f"eval_{t}_{k}": v for t, r in res["tasks"].items() for k, v in r.items() if k != "count"}})
        return res

    if cfg.eval_base and start == 0:
        do_eval(0)  # the frozen base: fresh pools (B = 0) add nothing; the summary reads it back from the log
    progress = None
    if cfg.progress and lead:
        from tqdm import tqdm

        if sys.stderr.isatty():  # a terminal: one bar redrawn in place
            progress = tqdm(total=total, initial=start, desc=f"train {cfg.router}", dynamic_ncols=True, file=sys.stderr)
        else:  # a log file or a pipe (nohup, docker logs, CI): the same status as a line of its own every 30 s
            progress = tqdm(total=total, initial=start, desc=f"train {cfg.router}", file=_Lines(sys.stderr), ncols=100,
                            mininterval=30)
    result = None
    for step in range(start, total):
        t0 = time.perf_counter()
        stats: dict = {}
        for micro in range(cfg.grad_accum):
            positions = batch_positions(step, micro, cfg, rank, world)
            batch = collate([train[example_at(p, cfg, len(train))] for p in positions], tokenizer.pad_token_id)
            batch = {k: v.to(cfg.device) for k, v in batch.items()}
            for noise in noises:
                noise.set(step, micro, positions, cfg.samples, batch["input_ids"].shape[1])
            for key, value in train_step(cfg, model, layers, batch).items():
                stats[key] = stats.get(key, 0) + value / (1 if key.endswith("tokens") else cfg.grad_accum)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        distributed.average_gradients(params, world)
        stats = {k: distributed.all_mean(v, world) * (world if k.endswith("tokens") else 1) for k, v in stats.items()}
        if cfg.max_grad_norm > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, **stats, "lr": scheduler.get_last_lr()[0], "step_time_s": elapsed,
                  "tokens_per_s": stats["seq_tokens"] / elapsed}
        emit(record)
        if progress is not None:
            progress.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            progress.update(1)
        done = step + 1
        if os.environ.get("REMIX_TEST_CRASH_AT_STEP") == str(done):  # tests: a hard kill, no cleanup at all
            logf.flush()
            os._exit(9)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            do_eval(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < total and lead:
            save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg.keep_checkpoints, training_meta)
    if progress is not None:
        progress.close()
    result = do_eval(total)
    if not lead:
        distributed.cleanup()
        return {"rank": rank}
    adapter_dir = remix.save_adapter(model, run_dir / "adapter", training={**training_meta, "steps": total, "world_size": world})
    save_checkpoint(run_dir, total, model, optimizer, scheduler, cfg.keep_checkpoints, training_meta)
    summary = {"adapter": str(adapter_dir), "steps": total, "router": cfg.router}
    if result is not None:
        names = list(layers)
        for task, usage in result["usage"].items():
            usage_heatmap(usage, names, run_dir / f"usage_{task}.png", f"{cfg.router}: LoRA usage on {task}")
        summary.update({"eval_loss": result["loss"], "eval_exact_match": result["exact_match"],
                        "tasks": result["tasks"], "samples": result["samples"]})
    if cfg.eval_base and (base := base_scores(metrics_path)) is not None:
        summary["base"] = base
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.router == "lora":
        from training.export import export_peft

        export_peft(model, run_dir / "peft_adapter", cfg.base)
    logf.close()
    distributed.cleanup()
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(argv)
        summary = run(cfg)
    except (ConfigError, DataError, remix.AdapterError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "rank" not in summary:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("tasks", "samples")}))
        print(closing_line(summary, cfg.base), file=sys.stderr)
    return 0


def closing_line(summary: dict, base: str) -> str:
    """What the run made, how it scored against the base, and the command that serves it (stderr: stdout keeps the
    summary's JSON line for scripts)."""
    adapter = Path(summary["adapter"])
    scores = ""
    if "eval_loss" in summary:
        bare = summary.get("base") or {}  # (the frozen base's scores, where it was evaluated first)
        loss = (f"{bare['eval_loss']:.3f} -> " if "eval_loss" in bare else "") + f"{summary['eval_loss']:.3f}"
        match = (f"{100 * bare['eval_exact_match']:.1f} % -> " if "eval_exact_match" in bare else "") + \
            f"{100 * summary['eval_exact_match']:.1f} %"
        scores = f"; held-out loss {loss}, exact match {match}" + (" (base -> adapter)" if bare else "")
    name = adapter.parent.name if adapter.name == "adapter" else adapter.name
    flags = "" if base == TrainConfig.base else f" --base {base}"
    return f"done: the adapter is in {adapter}{scores}. Serve it: python -m server{flags} --adapter {name}={adapter}"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
