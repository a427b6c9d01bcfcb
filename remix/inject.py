"""Wrap the target linear modules of any Hugging Face causal LM with Mixture-of-LoRAs layers."""

from __future__ import annotations

import re

import torch.nn as nn

from remix.config import MixtureConfig
from remix.layer import MixtureOfLoRAsLinear, make_layer


def matches(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    """A target is a module-name suffix (``"gate_proj"`` matches ``model.layers.0.mlp.gate_proj``)
    or, with a ``re:`` prefix, a regex that must match the whole dotted name."""
    for target in targets:
        if target.startswith("re:"):
            if re.fullmatch(target[3:], name):
                return True
        elif name == target or name.endswith("." + target):
            return True
    return False


def find_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the ``nn.Linear`` modules that the targets select, in model order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, MixtureOfLoRAsLinear) and matches(name, targets)
    ]


class NoTargets(ValueError):
    """No linear module of the model matches the targets (the message names what their names end in)."""


def linear_suffixes(model: nn.Module) -> list[str]:
    """The last dotted part of every ``nn.Linear`` module's name, each once (what a suffix target can name)."""
    return sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(
    model: nn.Module, config: MixtureConfig, module_names: list[str] | None = None
) -> dict[str, MixtureOfLoRAsLinear]:
    """Freeze every base parameter and wrap the targeted linears. Returns {module name: layer}.

    ``module_names`` (e.g. from a saved adapter) overrides the target patterns. Raises if nothing
    matches or the model is already wrapped.
    """
    config.validate()
    if wrapped_layers(model):
        raise ValueError("model already has Mixture-of-LoRAs layers; call remix.unwrap(model) first")
    names = module_names if module_names is not None else find_targets(model, config.targets)
    hint = (f"the model's linear modules end in {', '.join(linear_suffixes(model))}; a 're:' target is a regex on the "
            "whole dotted name")
    if not names:
        raise NoTargets(f"no nn.Linear module matches targets {list(config.targets)} ({hint})")
    if module_names is None:  # (a target that selects nothing beside others that do is a typo, not a wish: a pool
        idle = [t for t in config.targets if not any(matches(n, [t]) for n in names)]  # silently left off)
        if idle:
            raise NoTargets(f"targets {idle} match no nn.Linear module (of targets {list(config.targets)}; {hint})")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(base).__name__}, not nn.Linear")
        layers[name] = make_layer(base, config)
        _set_module(model, name, layers[name])
    return layers


def wrapped_layers(model: nn.Module) -> dict[str, MixtureOfLoRAsLinear]:
    """{module name (as in the unwrapped model): layer} for every Mixture-of-LoRAs layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MixtureOfLoRAsLinear)}


def unwrap(model: nn.Module) -> nn.Module:
    """Put every original ``nn.Linear`` back (the base weights were never touched)."""
    for name, layer in wrapped_layers(model).items():
        _set_module(model, name, layer.base)
    return model
