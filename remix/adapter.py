"""The adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensors, for every wrapped module ``M`` (its dotted name in the unwrapped base model):
    M.lora_A  [n, r, d_in]    M.lora_B  [n, d_out, r]    M.router  [n, d_in]  (not for router "lora")
Config: see :func:`build_config`. Loading checks everything and reports every problem at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from remix.config import MixtureConfig
from remix.inject import inject, wrapped_layers
from remix.layer import MixtureOfLoRAsLinear
from remix import peft_format
from remix.models.loading import base_name, fingerprint
from remix.peft_format import is_peft_config

FORMAT = "remix-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class AdapterError(ValueError):
    """An adapter that cannot be used; ``problems`` lists every reason."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"adapter {self.path} cannot be loaded ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))


def tensor_shapes(config: MixtureConfig, modules: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Expected {tensor name: shape} for modules {name: (d_in, d_out)}."""
    shapes = {}
    for name, (d_in, d_out) in modules.items():
        shapes[f"{name}.lora_A"] = (config.n, config.r, d_in)
        shapes[f"{name}.lora_B"] = (config.n, d_out, config.r)
        if config.router != "lora":
            shapes[f"{name}.router"] = (config.n, d_in)
    return shapes


def build_config(model: nn.Module, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` content for the adapter wrapped into ``model``."""
    layers = wrapped_layers(model)
    if not layers:
        raise ValueError("model has no Mixture-of-LoRAs layers to save")
    first = next(iter(layers.values()))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": {"name": base_name(model), "fingerprint": fingerprint(model)},
        **first.config.to_dict(),
        "omega_value": first.omega,
        "modules": {name: [layer.in_features, layer.out_features] for name, layer in layers.items()},
        "dtype": str(first.lora_A.dtype).removeprefix("torch."),
        "training": training or {},
    }


def _atomic_write_dir(path: Path, write) -> None:
    """Write into a temporary sibling directory, then swap it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = None
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: nn.Module, path: str | os.PathLike, training: dict[str, Any] | None = None) -> Path:
    """Write the adapter wrapped into ``model`` to directory ``path`` atomically. Never pickles."""
    path = Path(path)
    config = build_config(model, training)
    tensors = {}
    for name, layer in wrapped_layers(model).items():
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().cpu().contiguous()
        if layer.router is not None:
            tensors[f"{name}.router"] = layer.router.detach().cpu().contiguous()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    _atomic_write_dir(path, write)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse ``adapter_config.json``; raise AdapterError with the reason if it is missing or invalid."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(path, [f"{path} is not a directory"])
    if not file.is_file():
        raise AdapterError(path, [f"{CONFIG_FILE} is missing"])
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(path, [f"{CONFIG_FILE} is not valid JSON: {e}"]) from None
    if not isinstance(config, dict):
        raise AdapterError(path, [f"{CONFIG_FILE} must hold a JSON object"])
    return config


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of the weights file, and why it could not be read (never unpickles)."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            return {}, [f"{WEIGHTS_FILE} is missing; adapter_model.bin is a pickle, which is never loaded (it can run "
                        "code): save the adapter with safetensors (peft: save_pretrained(..., safe_serialization=True))"]
        return {}, [f"{WEIGHTS_FILE} is missing"]
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, []
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        return {}, [f"{WEIGHTS_FILE} is not a readable safetensors file (truncated, corrupt or another format): {e}"]


def _config_problems(config: dict[str, Any]) -> tuple[list[str], MixtureConfig | None]:
    problems = []
    if config.get("format") != FORMAT:
        problems.append(f"format: expected {FORMAT!r}, got {config.get('format')!r}")
    if config.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version: this version reads {FORMAT_VERSION}, got {config.get('format_version')!r}")
    for key in ("router", "n", "k", "r", "omega", "alpha", "targets", "modules", "dtype"):
        if key not in config:
            problems.append(f"{key}: missing from {CONFIG_FILE}")
    if config.get("dtype", "float32") not in _DTYPES:
        problems.append(f"dtype: {config.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
    modules = config.get("modules", {})
    if not isinstance(modules, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(d, int) for d in v) for v in modules.values()
    ):
        problems.append("modules: must map module names to [d_in, d_out]")
    mix = None
    if all(key in config for key in ("router", "n", "k", "r")):
        mix = MixtureConfig.from_dict(config)
        problems += mix.problems()
    return problems, (mix if not problems else None)


def validate_adapter(
    model: nn.Module, path: str | os.PathLike, check_fingerprint: bool = True, base_fingerprint: str | None = None
) -> tuple[dict[str, Any], MixtureConfig, dict[str, torch.Tensor]]:
    """Check an adapter directory against its config and against ``model``; return its parts.

    Every problem found (config fields, modules missing from the base or of the wrong size, a
    different base fingerprint, missing / unexpected tensors, wrong shapes or dtypes, an unreadable
    weights file) goes into one AdapterError. ``base_fingerprint``: ``fingerprint(model)`` where the caller holds it
    (a server: its frozen base's, taken once), else it is taken here where the adapter has one to check.
    """
    path = Path(path)
    config = read_config(path)
    tensors, file_problems = _read_tensors(path)
    if is_peft_config(config):  # peft's layout: converted to router "lora" (a pool of one LoRA)
        config, tensors, peft_problems = peft_format.convert(config, None if file_problems else tensors)
        file_problems += peft_problems
    problems, mix = _config_problems(config)
    modules = config.get("modules") if isinstance(config.get("modules"), dict) else {}
    # --- against the base model -------------------------------------------------------------
    for name, dims in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name}: not found in the base model")
            continue
        if isinstance(getattr(module, "base", None), nn.Linear):  # already wrapped (training or serving layer)
            module = module.base
        if not isinstance(module, nn.Linear):
            problems.append(f"module {name}: is a {type(module).__name__} in the base model, not nn.Linear")
        elif isinstance(dims, list) and list(dims) != [module.in_features, module.out_features]:
            problems.append(
                f"module {name}: adapter has [d_in, d_out] = {dims}, base model has "
                f"[{module.in_features}, {module.out_features}]"
            )
    expected_print = (config.get("base_model") or {}).get("fingerprint")
    actual_print = (base_fingerprint or fingerprint(model)) if check_fingerprint and expected_print else None
    if actual_print is not None and expected_print != actual_print:
        problems.append(
            f"base_model: trained on {config['base_model'].get('name')!r} with fingerprint {expected_print}, "
            f"but the loaded base has {actual_print} (different weights)"
        )
    problems += file_problems
    if mix is not None and modules and tensors:
        want = tensor_shapes(mix, {name: tuple(dims) for name, dims in modules.items()})
        dtype = _DTYPES.get(config["dtype"], torch.float32)
        for key in sorted(set(want) - set(tensors)):
            problems.append(f"tensor {key}: missing (expected shape {list(want[key])})")
        for key in sorted(set(tensors) - set(want)):
            problems.append(f"tensor {key}: unexpected (shape {list(tensors[key].shape)})")
        for key in sorted(set(want) & set(tensors)):
            t = tensors[key]
            if tuple(t.shape) != want[key]:
                problems.append(f"tensor {key}: shape {list(t.shape)}, expected {list(want[key])}")
            if t.dtype != dtype:
                problems.append(f"tensor {key}: dtype {str(t.dtype).removeprefix('torch.')}, expected {config['dtype']}")
            elif not torch.isfinite(t).all():
                problems.append(f"tensor {key}: contains NaN or infinite values")
    if problems:
        raise AdapterError(path, problems)
    return config, mix, tensors


def load_adapter(
    model: nn.Module, path: str | os.PathLike, check_fingerprint: bool = True, pools_dtype: torch.dtype | None = None
) -> dict[str, MixtureOfLoRAsLinear]:
    """Attach a saved adapter to a plain Hugging Face model (validated first); returns its layers.

    The layers are put in eval mode (deterministic top-k routing). ``remix.unwrap(model)`` removes them. The pools
    and routers take the base's dtype, or ``pools_dtype`` (float32 pools around a bfloat16 base, as training.fit
    trains them there).
    """
    config, mix, tensors = validate_adapter(model, path, check_fingerprint)
    layers = inject(model, mix, module_names=list(config["modules"]))
    for name, layer in layers.items():
        if pools_dtype is not None:
            layer.pools_to(pools_dtype)
        with torch.no_grad():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
            if layer.router is not None:
                layer.router.copy_(tensors[f"{name}.router"])
        layer.requires_grad_(False)
        layer.eval()
    return layers
