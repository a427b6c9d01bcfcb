"""Per-token LoRA gather kernels: a plain reference and the fast path the layers use."""

from remix.kernels.cpu_alloc import tune_cpu_allocator
from remix.kernels.reference import lora_gather_reference
from remix.kernels.torch_ops import (
    flatten_a,
    flatten_b_t,
    lora_gather,
    lora_gather_grouped,
    masked_lora_delta,
    scale_chunks,
    selection_mask,
    topk_masked_u,
    topk_masked_u_multi,
    topk_masked_u_torch,
)

__all__ = [
    "flatten_a",
    "flatten_b_t",
    "lora_gather",
    "lora_gather_grouped",
    "lora_gather_reference",
    "masked_lora_delta",
    "scale_chunks",
    "selection_mask",
    "topk_masked_u",
    "topk_masked_u_multi",
    "topk_masked_u_torch",
    "tune_cpu_allocator",
]
