"""Atomic checkpoints (adapter + optimizer + scheduler + RNG states + step) and resume."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from remix import save_adapter
from remix.adapter import WEIGHTS_FILE, read_config
from training.config import ConfigError


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, keep: int, training: dict) -> Path:
    """Write checkpoints/step-XXXXXXX atomically; keep the newest ``keep``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_adapter(model, tmp / "adapter", training={**training, "step": step})
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
    return found[-1] if found else None


# The settings that shape the adapter or its optimizer's state: a run resumes only with the checkpoint's own
RESUME_FIXED = ("base", "router", "n", "k", "r", "omega", "alpha", "targets", "load_balance_coef", "optimizer")


def load_checkpoint(path: Path, layers: dict, optimizer, scheduler, config: dict) -> int:
    """Restore adapter weights, optimizer, scheduler and RNG; return the step to continue from. ``config`` is this
    run's settings (training.fit's TrainConfig fields): a ConfigError lists every setting of RESUME_FIXED the checkpoint
    was trained with otherwise (and, for a checkpoint that records no settings, every tensor that does not fit)."""
    saved = (read_config(path / "adapter").get("training") or {}).get("config") or {}
    problems = [f"{k}: the checkpoint has {saved[k]!r}, this run {config[k]!r}" for k in RESUME_FIXED
                if k in saved and saved[k] != config[k]]
    tensors = load_file(str(path / "adapter" / WEIGHTS_FILE))
    if not problems:
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B", "router"):
                mine = getattr(layer, part)
                if mine is None:  # (a router-less layer: plain LoRA)
                    continue
                theirs = tensors.get(f"{name}.{part}")
                if theirs is None or tuple(theirs.shape) != tuple(mine.shape):
                    problems.append(f"{name}.{part}: the checkpoint has "
                                    f"{'none' if theirs is None else list(theirs.shape)}, this run {list(mine.shape)}")
    if problems:
        raise ConfigError(f"--resume: the checkpoint {path} was trained with other settings (resume with its own, or "
                          "start a new --output):\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
            if layer.router is not None:
                layer.router.copy_(tensors[f"{name}.router"])
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])
