"""Per-token LoRA gather kernels.

* :func:`lora_gather_reference` (reference.py): the contract as a plain loop; every other path is tested against it.
* :mod:`remix.kernels.cpu_ext`: the compiled CPU kernels the layers use at inference (``route_gather_``: top-k
  routing and the gather of only the selected LoRAs, any mix of adapters, float32 or bfloat16 activations;
  ``gather_``: the contract with given ids and weights).
* torch_ops.py: the same maths in torch ops (``lora_gather`` is differentiable and serves training; the
  ``topk_masked_u*`` helpers serve inference on CUDA or where no compiler is available).
"""

from remix.kernels.cpu_alloc import tune_cpu_allocator
from remix.kernels.reference import lora_gather_reference
from remix.kernels.torch_ops import (
    flatten_a,
    flatten_b_t,
    lora_gather,
    lora_gather_grouped,
    masked_lora_delta,
    multi_routing_plan,
    route_with_plan,
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
    "multi_routing_plan",
    "route_with_plan",
    "scale_chunks",
    "selection_mask",
    "topk_masked_u",
    "topk_masked_u_multi",
    "topk_masked_u_torch",
    "tune_cpu_allocator",
]
