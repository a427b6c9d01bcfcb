"""ReMix: mixtures of LoRAs with reinforcement-trained routers (arXiv 2603.10160).

The library: routing maths, the Mixture-of-LoRAs layers, the per-token gather kernels, injection
into Hugging Face models, the adapter format and base-model loading. It imports nothing from the
``training`` or ``server`` packages.
"""

from remix.adapter import AdapterError, load_adapter, save_adapter, validate_adapter
from remix.config import MixtureConfig
from remix.inject import inject, unwrap, wrapped_layers
from remix.layer import MixtureOfLoRAsLinear, ReMixLinear
from remix.models import DEFAULT_BASE, BaseModelError, load_base, tiny_model

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE",
    "AdapterError",
    "BaseModelError",
    "MixtureConfig",
    "MixtureOfLoRAsLinear",
    "ReMixLinear",
    "inject",
    "load_adapter",
    "load_base",
    "save_adapter",
    "tiny_model",
    "unwrap",
    "validate_adapter",
    "wrapped_layers",
]
