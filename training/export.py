"""Export a plain-LoRA run to peft's file layout (vLLM and peft load it). A ReMix adapter cannot be
merged or exported this way: its router must run per token, so it is served by this project's server."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from remix.inject import wrapped_layers


def export_peft(model, path: str | Path, base_name: str) -> Path:
    layers = wrapped_layers(model)
    if not layers or any(layer.kind != "lora" for layer in layers.values()):
        raise ValueError("only router 'lora' adapters can be exported to peft; ReMix needs its router at inference")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[0].detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[0].detach().contiguous().cpu()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": first.r, "lora_alpha": first.config.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "use_rslora": first.config.omega == "rslora", "fan_in_fan_out": False, "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
