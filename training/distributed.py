"""Data-parallel training with torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

Each rank takes an equal share of every global batch; gradients of the adapter parameters are averaged
across ranks after each step (what DistributedDataParallel does, done explicitly because only the pools
and routers train and the loss runs the model's parts directly). The routing draws come from
:class:`SplitInvariantNoise`, seeded per (step, micro-batch, global example, module), so N ranks draw exactly
what one process draws for the same global batch, and the parameters agree within float tolerance.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if world > 1 and device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank() if world > 1 else 0), world


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    if world <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def all_mean(value: float, world: int) -> float:
    if world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / world


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class SplitInvariantNoise:
    """Uniform draws for one module's routing, a function of (seed, step, micro, example id, module) only.

    Rows are laid out as the replicated batch is: selection-major, then example, then position.
    """

    def __init__(self, seed: int, module_index: int, n: int, max_len: int):
        self.seed, self.module_index, self.n, self.max_len = seed, module_index, n, max_len
        self.example_ids: list[int] = []
        self.samples, self.length, self.step, self.micro = 1, 0, 0, 0

    def set(self, step: int, micro: int, example_ids: list[int], samples: int, length: int) -> None:
        self.step, self.micro, self.example_ids, self.samples, self.length = step, micro, example_ids, samples, length

    def __call__(self, rows: int) -> torch.Tensor:
        per_example = []
        for ex in self.example_ids:
            g = torch.Generator().manual_seed(hash((self.seed, self.step, self.micro, ex, self.module_index)) & (2**62 - 1))
            per_example.append(torch.rand(self.samples, self.max_len, self.n, generator=g)[:, : self.length])
        u = torch.stack(per_example, 1)  # [M, B, L, n]
        if u.shape[0] * u.shape[1] * u.shape[2] != rows:
            raise RuntimeError(f"noise for {tuple(u.shape[:3])} rows does not match the {rows} routed rows")
        return u.reshape(rows, self.n)
