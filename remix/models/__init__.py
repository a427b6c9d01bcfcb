"""Base models: load_base(spec) for HF directories, GGUF files and the embedded default; tiny test models."""

from remix.models.loading import (
    DEFAULT_BASE, DTYPES, BaseModelError, base_name, cache_dir, convert_gguf, embedded_gguf, fingerprint, load_base,
    resolve_dtype, trained_context,
)
from remix.models.tiny import tiny_model, tiny_tokenizer

__all__ = [
    "DEFAULT_BASE",
    "DTYPES",
    "BaseModelError",
    "base_name",
    "cache_dir",
    "convert_gguf",
    "embedded_gguf",
    "fingerprint",
    "load_base",
    "resolve_dtype",
    "tiny_model",
    "tiny_tokenizer",
    "trained_context",
]
