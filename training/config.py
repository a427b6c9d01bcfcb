"""Training configuration: typed dataclass defaults < ``--config file.yaml`` < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from remix.config import DEFAULT_TARGETS, ROUTERS, MixtureConfig
from remix.models import DTYPES
from remix.settings import flag_bool, typed_fields
from training.tasks import TASK_DEFAULTS, TASKS


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- model and adapter ---------------------------------------------------------------------
    base: str = _f("smollm2-135m-instruct", "base model: smollm2-135m-instruct, tiny, a local HF directory or a .gguf file")
    router: str = _f("remix", f"router kind: {', '.join(ROUTERS)}")
    n: int = _f(8, "LoRAs per pool (forced to 1 for router 'lora')")
    k: int = _f(2, "LoRAs selected per token")
    r: int = _f(8, "rank of each LoRA (use k*r with router 'lora' for the rank-kr baseline)")
    samples: int = _f(4, "M: RLOO selections per example (remix only; >= 2)")
    omega: str = _f("lora", "constant weight: 'lora' = alpha/(k r), 'rslora' = alpha/sqrt(k r), or a number")
    alpha: float = _f(2.0, "LoRA alpha")
    targets: list = _f(list(DEFAULT_TARGETS), "module-name suffixes (or re:regex) to wrap")
    load_balance_coef: float = _f(0.0, "softmax-topk only: Mixtral load-balancing loss weight (0 = off)")
    # --- data --------------------------------------------------------------------------------------
    data: str = _f("mixture", "training data: a built-in task (facts, arithmetic, strings, mixture; tools) or a JSONL file")
    eval_data: str = _f("", "held-out data: a JSONL file; default: the built-in task's test split")
    train_size: int = _f(2000, "examples generated for a built-in task")
    eval_size: int = _f(96, "held-out examples evaluated")
    eval_split: float = _f(0.05, "share of a JSONL --data file's rows held out for evaluation (not trained on; at "
                                 "most --eval-size) when no --eval-data is given; 0 = none")
    max_seq_len: int = _f(128, "tokens per example (longer ones are cut); at most the base's trained context")
    chat: bool = _f(True, "format rows with the tokenizer's chat template (loss on assistant tokens only)")
    # --- optimisation --------------------------------------------------------------------------------
    steps: int = _f(100, "optimizer steps (0: use epochs)")
    epochs: float = _f(0.0, "passes over the training data when steps is 0")
    batch_size: int = _f(8, "examples per micro-batch (before the M-fold replication)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(2e-3, "learning rate of the LoRA pools")
    router_lr: float = _f(2e-3, "learning rate of the routers")
    optimizer: str = _f("adamw", "adamw or sgd")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: str = _f("cosine", "learning-rate schedule: constant, linear or cosine (after warmup)")
    warmup_steps: int = _f(10, "linear warmup steps")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)")
    seed: int = _f(0, "seed of data order, initialisation and routing samples")
    # --- evaluation, checkpoints, output --------------------------------------------------------------
    eval_every: int = _f(50, "evaluate every N steps (0 = only at the end)")
    eval_base: bool = _f(True, "evaluate the frozen base first (step 0: fresh pools, B = 0, add nothing), so the "
                               "summary shows what the adapter changed")
    save_every: int = _f(25, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept")
    eval_max_new_tokens: int = _f(12, "greedy tokens generated per held-out prompt for exact match")
    output: str = _f("runs/demo", "run directory: adapter/, checkpoints/, metrics.jsonl, usage_*.png, summary.json")
    resume: bool = _f(False, "continue from the latest checkpoint in the run directory")
    threads: int = _f(0, "torch threads (0 = torch's default)")
    device: str = _f("cpu", "cpu or cuda")
    dtype: str = _f("auto", "the frozen base's dtype: float32, bfloat16, or auto (bfloat16 on CUDA and on CPUs with "
                            "AMX-BF16 or AVX512-BF16, as the server's --dtype auto; float32 elsewhere). The pools and "
                            "routers train in float32 either way, and the adapter is saved in float32")
    progress: bool = _f(True, "show a progress bar")

    def problems(self) -> list[str]:
        out = MixtureConfig(router=self.router, n=1 if self.router == "lora" else self.n, k=self.k, r=self.r, omega=self.omega_value, alpha=self.alpha,
                            targets=self.targets, load_balance_coef=self.load_balance_coef).problems()
        out = [f"--{p}" for p in out]
        if self.router == "remix" and self.samples < 2:
            out.append(f"--samples: RLOO needs at least 2 selections per example, got {self.samples}")
        for name in ("batch_size", "grad_accum", "max_seq_len", "train_size", "eval_size"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.eval_split < 1.0:
            out.append(f"--eval-split: must be in [0, 1), got {self.eval_split}")
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            out.append("--steps: must be > 0, or 0 with --epochs > 0")
        for name in ("lr", "router_lr"):
            if not getattr(self, name) > 0:
                out.append(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "sgd"):
            out.append(f"--optimizer: must be adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            out.append(f"--schedule: must be constant, linear or cosine, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            out.append(f"--dtype: must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            out.append(f"--device: must be cpu or cuda, got {self.device!r}")
        elif self.device == "cuda":
            import torch  # (only here: the config stays light to load)

            if not torch.cuda.is_available():
                out.append("--device cuda: no CUDA device here (or this torch was built without CUDA)")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            out.append(f"--output: {self.output} is a file, not a run directory")
        for name in ("data", "eval_data"):  # checked before any model loads
            value = getattr(self, name)
            if value and value not in TASKS and not Path(value).is_file():
                out.append(f"--{name.replace('_', '-')}: {value!r} is neither a built-in task ({', '.join(TASKS)}) nor a "
                           "file")
        return out

    @property
    def omega_value(self) -> str | float:
        try:
            return float(self.omega)
        except ValueError:
            return self.omega

    def mixture(self) -> MixtureConfig:
        return MixtureConfig(router=self.router, n=1 if self.router == "lora" else self.n, k=self.k, r=self.r,
                             omega=self.omega_value, alpha=self.alpha, targets=list(self.targets),
                             load_balance_coef=self.load_balance_coef).validate()


class ConfigError(ValueError):
    pass


def _kind(f: dataclasses.Field) -> type:
    return f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool, "list": list}[f.type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Finetune a frozen base model with ReMix pools (or a baseline) and write an adapter directory. "
        "Precedence: defaults < --config file.yaml < flags. With no arguments it trains the demo adapter.",
        formatter_class=argparse.HelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of fields (same names as the flags, with underscores)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(flag, type=flag_bool, default=None, nargs="?", const=True, metavar="BOOL",
                                help=f"{f.metadata['help']} (default: {default}; the flag alone: on)")
        elif kind is list:
            parser.add_argument(flag, type=lambda s: [t for t in s.split(",") if t], default=None, metavar="A,B",
                                help=f"{f.metadata['help']} (default: {','.join(default)})")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default: {default})")
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags; raises ConfigError naming every bad field."""
    args = build_parser().parse_args(argv)
    values: dict = {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if args.config:
        path = Path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of field: value")
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - names)
        if unknown:
            raise ConfigError(f"--config {path}: unknown field(s) {', '.join(unknown)}")
        typed, bad = typed_fields(loaded, {f.name: _kind(f) for f in dataclasses.fields(TrainConfig)},
                                  "a list of names (or a,b)")
        if bad:
            raise ConfigError(f"--config {path}:\n  - " + "\n  - ".join(bad))
        values.update(typed)
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    for name, value in TASK_DEFAULTS.get(values.get("data", TrainConfig.data), {}).items():
        values.setdefault(name, value)  # a built-in task's own defaults, under the file's and the flags' values
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    problems = cfg.problems()
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
    return cfg
