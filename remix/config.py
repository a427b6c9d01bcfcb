"""The adapter hyper-parameters shared by training, the adapter format and serving."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ROUTERS = ("remix", "softmax-topk", "dense", "lora")
OMEGA_MODES = ("lora", "rslora")
DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MixtureConfig:
    """How one adapter mixes LoRAs; every field is stored in ``adapter_config.json``."""

    router: str = "remix"  # remix | softmax-topk (MixLoRA) | dense (MoLoRA) | lora (plain LoRA)
    n: int = 8  # LoRAs in each module's pool (1 for router "lora")
    k: int = 2  # LoRAs selected per token (remix, softmax-topk)
    r: int = 8  # rank of each LoRA
    omega: str | float = "lora"  # "lora": alpha/(k*r), "rslora": alpha/sqrt(k*r), or a number
    alpha: float = 2.0  # LoRA alpha (the paper uses 2)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module-name suffixes or re:regex
    load_balance_coef: float = 0.0  # softmax-topk only: weight of the Mixtral load-balancing loss

    def problems(self) -> list[str]:
        """Every invalid field, as readable sentences (empty when valid)."""
        out = []
        if self.router not in ROUTERS:
            out.append(f"router: {self.router!r} is not one of {', '.join(ROUTERS)}")
        for name in ("n", "k", "r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name}: must be a positive integer, got {value!r}")
        if not out and self.router in ("remix", "softmax-topk") and self.k > self.n:
            out.append(f"k: must be <= n ({self.n}), got {self.k}")
        if not out and self.router == "lora" and self.n != 1:
            out.append(f"n: router 'lora' has a single LoRA, so n must be 1, got {self.n}")
        if isinstance(self.omega, str):
            if self.omega not in OMEGA_MODES:
                out.append(f"omega: {self.omega!r} is not 'lora', 'rslora' or a number")
        elif not isinstance(self.omega, (int, float)) or isinstance(self.omega, bool) or not math.isfinite(self.omega):
            out.append(f"omega: must be 'lora', 'rslora' or a finite number, got {self.omega!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            out.append(f"alpha: must be a finite number, got {self.alpha!r}")
        if not isinstance(self.targets, (list, tuple)) or not self.targets or not all(
            isinstance(t, str) and t for t in self.targets
        ):
            out.append(f"targets: must be a non-empty list of module-name suffixes or 're:' regexes, got {self.targets!r}")
        if not isinstance(self.load_balance_coef, (int, float)) or self.load_balance_coef < 0:
            out.append(f"load_balance_coef: must be >= 0, got {self.load_balance_coef!r}")
        return out

    def validate(self) -> "MixtureConfig":
        problems = self.problems()
        if problems:
            raise ValueError("invalid adapter config:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def active(self) -> int:
        """LoRAs that carry the constant weight for one token (k for remix; 1 for weighted routers)."""
        return self.k if self.router == "remix" else 1

    def omega_value(self) -> float:
        """The constant ω of DESIGN §1. Weighted routers use alpha/r (their weights sum to 1)."""
        if not isinstance(self.omega, str):
            return float(self.omega)
        denom = self.active * self.r
        return self.alpha / (denom if self.omega == "lora" else math.sqrt(denom))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MixtureConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in d.items() if key in known})
