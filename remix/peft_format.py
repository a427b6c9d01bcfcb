"""Plain LoRA adapters in peft's layout (what ``PeftModel.save_pretrained`` writes, what vLLM and LoRAX load),
read as this project's adapters: router ``lora``, a pool of one LoRA that every token selects (n = k = 1).

peft's files: ``adapter_config.json`` with ``"peft_type": "LORA"`` and ``adapter_model.safetensors`` holding, for every
adapted linear ``M`` (its dotted name in the base model), ``base_model.model.M.lora_A.weight [r, d_in]`` and
``base_model.model.M.lora_B.weight [d_out, r]`` (some writers keep the adapter's name: ``lora_A.default.weight``).
peft computes ``W x + scaling * B (A x)`` with ``scaling = lora_alpha / r`` (``use_rslora``: ``/ sqrt(r)``); here
``omega = scaling`` and the gather kernel computes the same sum.

Anything that would change that forward (DoRA, trained biases, modules saved whole, LoRA on embeddings, per-module
scalings that differ, ...) is reported as a problem rather than dropped; :func:`convert` reports every one at once.
Modules of different ranks with one scaling are padded with zero rows of A and columns of B to the largest rank:
a zero rank adds an exact zero.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")

# peft config fields that change the forward when set (value considered "unset": None, False, {}, [] or the default)
_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vectors are not served",
    "lora_bias": "trained biases on lora_B are not served",
    "modules_to_save": "modules saved whole (e.g. a new head) are not served",
    "fan_in_fan_out": "Conv1D (GPT-2 style) weights are not served: only nn.Linear modules",
    "layer_replication": "replicated layers are not served",
    "target_parameters": "LoRA on parameters (not nn.Linear modules) is not served",
    "trainable_token_indices": "trained token embeddings are not served",
    "alora_invocation_tokens": "activated LoRA (switched on by invocation tokens) is not served",
    "use_qalora": "QA-LoRA's pooled inputs are not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "arrow_config": "Arrow routing is not served",
}


def is_peft_config(config: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` is peft's (it names a ``peft_type``)."""
    return "peft_type" in config


def _set(value: Any) -> bool:
    return value not in (None, False, {}, [], "", "none")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule (``peft.utils.other.get_pattern_key``): the first key that matches the end of the module's name
    at a dot boundary, as a regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def convert(config: dict[str, Any], tensors: dict[str, torch.Tensor] | None
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """peft's ``adapter_config.json`` and tensors (None: the weights file could not be read, reported elsewhere) ->
    this project's config and tensors (float32), and every problem.

    The config returned has no ``modules`` dimension check against a base model: the caller checks ``modules``
    ({name: [d_in, d_out]}) as for any adapter. Its ``base_model`` has peft's name and no fingerprint (peft records
    none), so the base cannot be verified.
    """
    problems: list[str] = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type: only LORA adapters are served, got {config.get('peft_type')!r}")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        problems.append(f"task_type: {task!r}; only causal language models (CAUSAL_LM) are served")
    for key, why in _UNSUPPORTED.items():
        if _set(config.get(key)):
            problems.append(f"{key}: {config[key]!r} - {why}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias: {config['bias']!r} - trained biases are not served (only 'none')")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    for key, value in (("r", r_default), ("lora_alpha", alpha_default)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key}: must be a positive number, got {value!r}")
    rslora = bool(config.get("use_rslora", False))

    parts: dict[str, dict[str, torch.Tensor]] = {}
    names = set()
    for key, t in (tensors or {}).items():
        m = _KEY.match(key.removeprefix(PREFIX))
        if m is None:
            why = ("a saved copy of a base weight (peft writes one when a LoRA targets a tied lm_head or embedding), "
                   "which would replace the base's" if key.endswith("base_layer.weight") else
                   "not a LoRA A or B weight (only plain LoRA on linear modules is served)")
            problems.append(f"tensor {key}: {why}")
            continue
        names.add(m["name"])
        if m["part"] in parts.get(m["module"], {}):
            problems.append(f"tensor {key}: a second {m['part']} for module {m['module']}")
        parts.setdefault(m["module"], {})[m["part"]] = t
    if len(names) > 1:
        problems.append(f"tensors: several adapters in one file ({', '.join(sorted(str(n) for n in names))}); "
                        "save each adapter on its own")
    if not parts and tensors is not None:
        problems.append("tensors: no LoRA weights found")

    modules: dict[str, list[int]] = {}
    ranks: dict[str, int] = {}
    scalings: dict[str, float] = {}
    for module in sorted(parts):
        A, B = parts[module].get("lora_A"), parts[module].get("lora_B")
        if A is None or B is None:
            problems.append(f"module {module}: has {'lora_A' if A is not None else 'lora_B'} but no "
                            f"{'lora_B' if A is not None else 'lora_A'}")
            continue
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            problems.append(f"module {module}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not "
                            "[r, d_in] and [d_out, r] of one rank")
            continue
        r = int(A.shape[0])
        want_r = _pattern_value(config.get("rank_pattern"), module, r_default)
        if want_r != r:
            problems.append(f"module {module}: rank {r} in the weights, {want_r} in the config")
        alpha = _pattern_value(config.get("alpha_pattern"), module, alpha_default)
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0 and r > 0:
            scalings[module] = alpha / (math.sqrt(r) if rslora else r)
        modules[module] = [int(A.shape[1]), int(B.shape[0])]
        ranks[module] = r
    if len(set(scalings.values())) > 1:
        by = ", ".join(f"{m}: {s:g}" for m, s in scalings.items())
        problems.append(f"rank_pattern / alpha_pattern: the modules' scalings (lora_alpha / r) differ ({by}); one "
                        "scaling per adapter is served")

    r_max = max(ranks.values(), default=1)
    out: dict[str, torch.Tensor] = {}
    if not problems:
        for module, (d_in, d_out) in modules.items():
            A = parts[module]["lora_A"].float()
            B = parts[module]["lora_B"].float()
            if ranks[module] < r_max:  # zero rows of A / columns of B: an exact zero
                A = torch.cat([A, A.new_zeros(r_max - ranks[module], d_in)])
                B = torch.cat([B, B.new_zeros(d_out, r_max - ranks[module])], 1)
            out[f"{module}.lora_A"] = A.unsqueeze(0).contiguous()
            out[f"{module}.lora_B"] = B.unsqueeze(0).contiguous()
    omega = next(iter(scalings.values()), 1.0)
    converted = {
        "format": "remix-adapter",
        "format_version": 1,
        "base_model": {"name": config.get("base_model_name_or_path"), "fingerprint": None},
        "router": "lora", "n": 1, "k": 1, "r": r_max,
        "omega": omega, "alpha": float(alpha_default) if isinstance(alpha_default, (int, float)) else 0.0,
        "omega_value": omega,
        "targets": sorted({m.rsplit(".", 1)[-1] for m in modules}) or ["-"],
        "modules": modules,
        "dtype": "float32",
        "training": {"converted_from": "peft", "peft_version": config.get("peft_version"), "use_rslora": rslora},
    }
    return converted, out, problems
