"""python -m server: load the base and adapters, start the engine thread, serve HTTP.

Precedence: defaults < --config file.yaml < flags (< REMIX_API_KEY for the key when no flag is given).
With no arguments it serves the embedded default base plus the demo adapter (runs/demo/adapter) if present.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
import yaml

from remix.models import DTYPES, resolve_dtype, trained_context  # noqa: F401  (the benches import the first two here)
from remix.settings import typed_fields

DEMO_ADAPTER = Path("runs/demo/adapter")
log = logging.getLogger("server")

DEFAULT_MAX_MODEL_LEN = 2048  # (--max-model-len 0: the base's trained context up to this)

OPTIONS = [  # (flag, type, default, help)
    ("base", str, "smollm2-135m-instruct", "base model: smollm2-135m-instruct, tiny, a HF directory or a .gguf file"),
    ("adapter", list, [], "NAME=PATH of an adapter to serve (repeatable)"),
    ("adapter_dir", str, "", "serve every adapter directory found in this folder (named after its folder)"),
    ("lazy_adapters", str, "off", "on or off: on (with --adapter-dir): an adapter of the folder is loaded when a "
                                  "request first names it, not at start (the folder is read at each such request, so "
                                  "adapters added to it later are served too); with --max-adapters, the least "
                                  "recently used of those loaded this way that no request is using is unloaded to "
                                  "make room (where all are in use for a second, the least recently used takes no "
                                  "new requests until its running ones finish; a request that finds no room in 30 s "
                                  "gets a 429)"),
    ("host", str, "127.0.0.1", "address to bind"),
    ("port", int, 8000, "port to bind"),
    ("api_key", str, "", "require 'Authorization: Bearer KEY' (default: $REMIX_API_KEY; empty = no auth)"),
    ("served_name", str, "", "model name of the bare base in the API (default: the base spec)"),
    ("chat_template", str, "", "a Jinja chat template (a file, or the template itself) in place of the tokenizer's "
                               "(default: the tokenizer's); one that writes Hermes' <tool_call> format renders tools "
                               "itself"),
    ("max_model_len", int, 0, "prompt + generated tokens per sequence (0: the base's trained context, at most "
                              f"{DEFAULT_MAX_MODEL_LEN}; a length past the base's trained context is refused unless "
                              "REMIX_ALLOW_LONG_MAX_MODEL_LEN=1)"),
    ("max_num_seqs", int, 32, "sequences running at once (KV cache slots)"),
    ("max_queue", int, 256, "requests waiting for a slot before 429"),
    ("adapter_loading", str, "auto", "on, off or auto: whether /v1/adapters and vLLM's /v1/load_lora_adapter and "
                                     "/v1/unload_lora_adapter load and unload adapters while serving (from any "
                                     "directory this process can read). auto: on with --api-key or on a loopback "
                                     "--host, off on another address without a key (as vLLM keeps runtime LoRA "
                                     "loading off unless asked)"),
    ("max_request_mb", float, 64.0, "request bodies over this many MiB are refused with a 413 before they are read "
                                    "(0: no limit); a prompt that fits the context is far smaller"),
    ("max_adapters", int, 0, "the most adapters loaded at once, at start and through the API (0: no limit); a ReMix "
                             "adapter of the demo's shape holds ~27 MB (bfloat16 pools, float32 routers)"),
    ("max_batched_tokens", int, 512, "tokens per engine step (decode rows + prefill chunk)"),
    ("max_prefill_chunk", int, 512, "the most prompt tokens of one sequence a step computes (a long prompt takes "
                                    "several steps; each cache slot holds this many spare positions)"),
    ("kv_memory_gb", float, 4.0, "KV cache memory budget in GiB (caps the slots)"),
    ("kv_cache_dtype", str, "auto", "KV cache storage: auto (the model's dtype) or int8 (CPU: int8 values and a float32 "
                                    "scale per position and head - about twice the sequences or context in the same "
                                    "memory and a faster decode attention at long contexts; lossy, each value within "
                                    "max|row| / 254)"),
    ("prefix_caching", str, "on", "on or off: a new prompt takes the keys and values of its longest prefix (whole blocks "
                                  "of 16 tokens, same adapter) that a cache slot holds - a running sequence's or one "
                                  "that finished - instead of computing them; off: every prompt is computed in full"),
    ("batch_invariant", str, "off", "on or off: on (CPU, lean decoder): the base GEMMs run the compiled dot-product kernel "
                                    "at every size, so no token's result depends on what shares its step - prefill "
                                    "steps of any size included, in bfloat16 too - at the cost of oneDNN's speed on "
                                    "large prefill steps"),
    ("num_speculative_tokens", int, 0, "speculative decoding by prompt lookup: up to this many draft tokens a step for "
                                       "each sequence, taken from where its last n tokens occurred before in its "
                                       "prompt or output, and checked in one forward - the same tokens as without it "
                                       "(greedy, or sampled with its seed), "
                                       "several a step where the text repeats its context (code edits, extraction, "
                                       "quoting); 0 = off"),
    ("prompt_lookup_min", int, 2, "speculative decoding: the shortest n-gram that proposes a draft"),
    ("prompt_lookup_max", int, 4, "speculative decoding: the longest n-gram tried first"),
    ("speculative_max_seqs", int, 8, "speculative decoding: only in steps of at most this many decoding sequences "
                                     "(larger steps are bound by arithmetic, which drafts add to)"),
    ("speculative_schedule", str, "cost", "speculative decoding: cost (each sequence's draft only as long as its "
                                          "tokens are likely enough to be taken to be worth what a draft token costs "
                                          "in this engine's own timed steps) or constant (the whole draft wherever an "
                                          "n-gram matches)"),
    ("drain_timeout", float, 30.0, "seconds SIGTERM waits for in-flight requests before exiting"),
    ("device", str, "auto", "where the model runs: cpu, cuda, cuda:N or auto (cuda when a CUDA device is present)"),
    ("dtype", str, "auto", "weights and activations: auto (the default: bfloat16 on CUDA or a CPU with AMX-BF16 or "
                           "AVX512-BF16, float32 elsewhere), bfloat16 (half the memory; 1.3-2.5x the float32 throughput "
                           "on such CPUs; routers, routing and adapter deltas stay float32 inside the kernel) or float32"),
    ("decoder", str, "lean", "decoder stack: lean (Llama/Mistral/Qwen2: HF's ops without HF's Python plumbing and a "
                             "compiled decode attention; other models fall back to hf), exact (the same with SDPA: "
                             "bit-identical to hf on CPU) or hf (HF's modules)"),
    ("cuda_graphs", str, "on", "on or off: on CUDA, replay decode steps from CUDA graphs captured at start "
                               "(padded batch sizes 1, 2, 4, 8, 16, 24, ...; attention spans 256, 512, ... up to max_model_len)"),
    ("allowed_origins", str, "", "comma-separated origins that browsers may call the API from (CORS), * for any; "
                                 "empty = no CORS headers"),
    ("root_path", str, "", "the path prefix a reverse proxy serves the API under (and strips before forwarding): "
                           "ASGI's root_path, which the OpenAPI schema and /docs use in their links"),
    ("ssl_certfile", str, "", "serve HTTPS: the server's certificate (PEM; its chain after it), with --ssl-keyfile"),
    ("ssl_keyfile", str, "", "serve HTTPS: the certificate's private key (PEM, unencrypted), with --ssl-certfile"),
    ("threads", int, 0, "torch threads (0 = torch's default)"),
    ("log_level", str, "info", "debug, info, warning or error"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with the same fields (underscores)")
    for name, kind, default, help_ in OPTIONS:
        flag = "--" + name.replace("_", "-")
        if kind is list:
            p.add_argument(flag, action="append", default=None, metavar="NAME=PATH", help=help_)
        else:
            shown = "" if "(default" in help_ else f" (default: {default})" if default != "" else " (default: none)"
            p.add_argument(flag, type=kind, default=None, help=help_ + shown)
    return p


def load_settings(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    settings = {name: (list(default) if isinstance(default, list) else default) for name, _, default, _ in OPTIONS}
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"error: --config {args.config}: {e}")
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: --config {args.config}: expected a mapping of field: value")
        unknown = sorted(set(str(k).replace("-", "_") for k in loaded) - set(settings))
        if unknown:
            raise SystemExit(f"error: --config {args.config}: unknown field(s) {', '.join(unknown)}")
        typed, bad = typed_fields(loaded, {name: kind for name, kind, _, _ in OPTIONS}, "NAME=PATH strings",
                                  split_lists=False)
        if bad:
            raise SystemExit(f"error: --config {args.config}:\n  - " + "\n  - ".join(bad))
        settings.update(typed)
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    if not settings["api_key"]:
        settings["api_key"] = os.environ.get("REMIX_API_KEY", "")
    adapters, bad = {}, []  # (every --adapter checked before the model loads, and each problem said at once)
    for spec in settings["adapter"]:
        if "=" not in spec:
            bad.append(f"--adapter expects NAME=PATH, got {spec!r}")
            continue
        name, path = spec.split("=", 1)
        if not name:
            bad.append(f"--adapter {spec!r}: the name before '=' is empty")
        elif name in adapters:
            bad.append(f"--adapter {spec!r}: the name {name!r} is given twice")
        elif not Path(path).is_dir():
            bad.append(f"--adapter {spec!r}: {path} is not a directory")
        elif not (Path(path) / "adapter_config.json").is_file():
            bad.append(f"--adapter {spec!r}: {path} has no adapter_config.json (not a ReMix or peft adapter directory)")
        adapters[name] = path
    if len(bad) == 1:
        raise SystemExit(f"error: {bad[0]}")
    if bad:
        raise SystemExit("error: the --adapter flags:\n  - " + "\n  - ".join(bad))
    for name in ("cuda_graphs", "prefix_caching", "batch_invariant", "lazy_adapters"):
        if settings[name] not in ("on", "off"):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be on or off, got {settings[name]!r}")
    if settings["lazy_adapters"] == "on" and not settings["adapter_dir"]:
        raise SystemExit("error: --lazy-adapters on loads adapters from --adapter-dir: give the folder")
    if settings["adapter_dir"]:
        root = Path(settings["adapter_dir"])
        if not root.is_dir():
            raise SystemExit(f"error: --adapter-dir {root} is not a directory")
        for child in sorted(root.iterdir()) if settings["lazy_adapters"] == "off" else []:
            if (child / "adapter_config.json").is_file():
                adapters.setdefault(child.name, str(child))
    if (not settings["adapter"] and not settings["adapter_dir"] and argv_is_default(argv) and DEMO_ADAPTER.is_dir()
            and settings["base"] == "smollm2-135m-instruct"):  # the demo adapter was trained on the default base
        adapters["demo"] = str(DEMO_ADAPTER)
    settings["adapters"] = adapters
    if settings["max_adapters"] > 0 and len(adapters) > settings["max_adapters"]:  # (a negative one: refused below)
        raise SystemExit(f"error: {len(adapters)} adapters to serve (--adapter, --adapter-dir), but --max-adapters is "
                         f"{settings['max_adapters']}")
    served = settings["served_name"] or settings["base"]
    if served in adapters:  # (requests name one model: the base's name must stay the base's)
        flag = "--served-name" if settings["served_name"] else "--base"
        raise SystemExit(f"error: --adapter {served}=...: {served!r} is the base model's name ({flag}); give the adapter "
                         "another")
    if settings["dtype"] not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {', '.join(DTYPES)}, got {settings['dtype']!r}")
    try:
        resolve_device(settings["device"])
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}")
    from server.engine.fastpath import DECODERS

    if settings["decoder"] not in DECODERS:
        raise SystemExit(f"error: --decoder must be one of {', '.join(DECODERS)}, got {settings['decoder']!r}")
    from server.engine.cache import KV_DTYPES

    if settings["kv_cache_dtype"] not in KV_DTYPES:
        raise SystemExit(f"error: --kv-cache-dtype must be one of {', '.join(KV_DTYPES)}, "
                         f"got {settings['kv_cache_dtype']!r}")
    if settings["kv_cache_dtype"] == "int8" and resolve_device(settings["device"]).type != "cpu":
        raise SystemExit("error: --kv-cache-dtype int8 runs on CPU only (its kernels are CPU kernels); use auto on CUDA")
    if settings["adapter_loading"] not in ("on", "off", "auto"):
        raise SystemExit(f"error: --adapter-loading must be on, off or auto, got {settings['adapter_loading']!r}")
    if settings["batch_invariant"] == "on":
        from server.engine.engine import batch_invariant_unsupported

        device = resolve_device(settings["device"])
        why = batch_invariant_unsupported(device, resolve_dtype(settings["dtype"], device), settings["decoder"])
        if why:
            raise SystemExit(f"error: --batch-invariant: {why}")
    if settings["num_speculative_tokens"] < 0:
        raise SystemExit(f"error: --num-speculative-tokens must be >= 0, got {settings['num_speculative_tokens']}")
    if not 1 <= settings["prompt_lookup_min"] <= settings["prompt_lookup_max"]:
        raise SystemExit(f"error: --prompt-lookup-min and --prompt-lookup-max must satisfy 1 <= min <= max, got "
                         f"{settings['prompt_lookup_min']} and {settings['prompt_lookup_max']}")
    from server.engine.speculative import SCHEDULES

    if settings["speculative_schedule"] not in SCHEDULES:
        raise SystemExit(f"error: --speculative-schedule must be one of {', '.join(SCHEDULES)}, got "
                         f"{settings['speculative_schedule']!r}")
    if settings["speculative_max_seqs"] < 1:
        raise SystemExit(f"error: --speculative-max-seqs must be >= 1, got {settings['speculative_max_seqs']}")
    if settings["chat_template"]:
        settings["chat_template"] = read_chat_template(settings["chat_template"])
    if settings["root_path"] and (not settings["root_path"].startswith("/") or settings["root_path"].endswith("/")):
        raise SystemExit(f"error: --root-path must start with / and not end with one, got {settings['root_path']!r}")
    check_tls(settings["ssl_certfile"], settings["ssl_keyfile"])
    for name in ("port", "max_num_seqs", "max_queue", "max_batched_tokens", "max_prefill_chunk"):
        if settings[name] < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["max_model_len"] < 0:
        raise SystemExit(f"error: --max-model-len must be >= 1 (or 0: the base's), got {settings['max_model_len']}")
    if settings["port"] > 65535:
        raise SystemExit(f"error: --port must be at most 65535, got {settings['port']}")
    if settings["max_request_mb"] < 0:
        raise SystemExit(f"error: --max-request-mb must be >= 0, got {settings['max_request_mb']}")
    if not settings["kv_memory_gb"] > 0:
        raise SystemExit(f"error: --kv-memory-gb must be > 0, got {settings['kv_memory_gb']}")
    for name in ("drain_timeout", "threads", "max_adapters"):
        if settings[name] < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {settings[name]}")
    if settings["log_level"].lower() not in ("debug", "info", "warning", "error"):
        raise SystemExit(f"error: --log-level must be debug, info, warning or error, got {settings['log_level']!r}")
    return settings


def check_tls(certfile: str, keyfile: str) -> None:
    """--ssl-certfile and --ssl-keyfile: both or neither, readable, and a key that matches the certificate - loaded
    here as uvicorn will load them, so a bad pair stops the server before the model loads, naming the flag."""
    if not certfile and not keyfile:
        return
    if not (certfile and keyfile):
        given, missing = ("--ssl-certfile", "--ssl-keyfile") if certfile else ("--ssl-keyfile", "--ssl-certfile")
        raise SystemExit(f"error: {given} serves HTTPS together with {missing}: give both")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not Path(path).is_file():
            raise SystemExit(f"error: {flag} {path}: no such file")
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, password=lambda: b"")
    except ssl.SSLError as e:
        raise SystemExit(f"error: --ssl-certfile {certfile} with --ssl-keyfile {keyfile}: not a PEM certificate and "
                         f"its unencrypted private key ({e.reason or e})")
    except OSError as e:
        raise SystemExit(f"error: --ssl-certfile / --ssl-keyfile: {e}")


def adapter_loading(settings: dict) -> bool:
    """--adapter-loading resolved: auto is on where only this machine can reach the server (a loopback --host) or
    a client needs the API key, off where anyone who reaches the address could load and unload adapters."""
    if settings["adapter_loading"] != "auto":
        return settings["adapter_loading"] == "on"
    return bool(settings["api_key"]) or is_loopback(settings["host"])


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: where it points is not known here
        return False


def read_chat_template(spec: str) -> str:
    """--chat-template: a file's text, or the argument itself when it is a template (it has Jinja's {{ or {%);
    checked to compile, so a broken template stops the server before anything loads."""
    path = Path(spec)
    looks_inline = "{{" in spec or "{%" in spec
    if not looks_inline and not path.is_file():
        raise SystemExit(f"error: --chat-template: {spec} is neither a file nor a Jinja template")
    text = spec if looks_inline else path.read_text()
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)  # (as transformers' environment)
    except jinja2.TemplateSyntaxError as e:
        raise SystemExit(f"error: --chat-template: line {e.lineno}: {e.message}")
    return text


def argv_is_default(argv) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return not any(a.startswith("--adapter") for a in args)


class RemixServer(uvicorn.Server):
    """uvicorn, with a graceful SIGTERM: refuse new requests (503), finish in-flight ones, then exit 0."""

    def __init__(self, config, state, drain_timeout: float):
        super().__init__(config)
        self.remix_state, self.drain_timeout = state, drain_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self.remix_state.draining = True
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        log.info("draining: finishing %d in-flight request(s), %.0f s deadline", self.remix_state.in_flight, self.drain_timeout)
        deadline = time.monotonic() + self.drain_timeout
        while (self.remix_state.in_flight > 0 or self.remix_state.engine.has_work()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def resolve_device(name: str):
    """cpu, cuda, cuda:N, or for "auto" the first CUDA device when one is present, else the CPU.

    Raises ValueError (naming the problem) for anything else or for a CUDA device this machine does not have."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"must be one of {', '.join(DEVICES)} or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"must be one of {', '.join(DEVICES)} or cuda:N, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name!r} asked for, but torch sees no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name!r} asked for, but torch sees {count} CUDA device(s)")
    return device


DEVICES = ("cpu", "cuda", "auto")


def max_model_len(asked: int, config, base: str) -> int:
    """--max-model-len resolved against the base: 0 takes its trained context up to DEFAULT_MAX_MODEL_LEN; a length
    past that context is refused (its positions were never trained: the text degrades, silently) unless
    REMIX_ALLOW_LONG_MAX_MODEL_LEN=1, as vLLM refuses it unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."""
    trained = trained_context(config)
    if not asked:
        return min(DEFAULT_MAX_MODEL_LEN, trained or DEFAULT_MAX_MODEL_LEN)
    if trained is not None and asked > trained and os.environ.get("REMIX_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        raise SystemExit(f"error: --max-model-len {asked} is past the context {base} was trained for "
                         f"({trained} positions); give at most {trained}, or set REMIX_ALLOW_LONG_MAX_MODEL_LEN=1 to "
                         "run it anyway")
    return asked


def build_state(settings: dict):
    import remix
    from server.app import ServerState
    from server.engine import Engine, EngineConfig

    device = resolve_device(settings["device"])
    model, tokenizer = remix.load_base(settings["base"], dtype=resolve_dtype(settings["dtype"], device), device=device)
    if settings["chat_template"]:
        tokenizer.chat_template = settings["chat_template"]
    engine = Engine(model, tokenizer, EngineConfig(
        max_model_len=max_model_len(settings["max_model_len"], model.config, settings["base"]),
        max_num_seqs=settings["max_num_seqs"], max_queue=settings["max_queue"],
        max_adapters=settings["max_adapters"],
        max_batched_tokens=settings["max_batched_tokens"], max_prefill_chunk=settings["max_prefill_chunk"],
        kv_budget_bytes=int(settings["kv_memory_gb"] * (1 << 30)),
        decoder=settings["decoder"], cuda_graphs=settings["cuda_graphs"] == "on", kv_cache_dtype=settings["kv_cache_dtype"],
        prefix_caching=settings["prefix_caching"] == "on", batch_invariant=settings["batch_invariant"] == "on",
        num_speculative_tokens=settings["num_speculative_tokens"], prompt_lookup_min=settings["prompt_lookup_min"],
        prompt_lookup_max=settings["prompt_lookup_max"], speculative_max_seqs=settings["speculative_max_seqs"],
        speculative_schedule=settings["speculative_schedule"]))
    for name, path in settings["adapters"].items():
        engine.load_adapter(name, path)  # AdapterError lists every problem
        log.info("loaded adapter %s from %s", name, path)
    loading = adapter_loading(settings)
    if not loading and settings["adapter_loading"] == "auto":
        log.warning("loading and unloading adapters through the API is off: the server listens on %s without an API "
                    "key (--api-key, or --adapter-loading on, turns it on)", settings["host"])
    return ServerState(engine=engine, base_name=settings["served_name"] or settings["base"],
                       api_key=settings["api_key"] or None, adapter_loading=loading,
                       max_body_bytes=int(settings["max_request_mb"] * (1 << 20)),
                       lazy_dir=Path(settings["adapter_dir"]) if settings["lazy_adapters"] == "on" else None,
                       allowed_origins=[o.strip() for o in settings["allowed_origins"].split(",") if o.strip()])


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening: a client is refused, not left waiting) before the model loads,
    so a port that is taken is said at once instead of after the load (vLLM binds first for the same reason)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn does: a port in TIME_WAIT rebinds)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = " (another server on it? pick another --port)" if e.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"error: --host/--port: cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


def prepare(settings: dict):
    """What python -m server and python -m server.batch do before serving: logging, no hub, torch's threads, the
    model and adapters (build_state; AdapterError or FileNotFoundError where one cannot be read), the CPU kernels
    built now rather than on the first request. Returns the ServerState."""
    logging.basicConfig(level=settings["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    state = build_state(settings)
    from remix.kernels import cpu_ext

    if state.engine.runner.device.type == "cpu":
        cpu_ext.load()
    return state


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    sock = bind_socket(settings["host"], settings["port"])
    from remix.adapter import AdapterError
    from remix.kernels.cpu_ext import name_os_thread
    from server.app import create_app

    try:
        state = prepare(settings)
    except (AdapterError, FileNotFoundError) as e:
        sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(state)
    config = uvicorn.Config(app, host=settings["host"], port=settings["port"], log_level=settings["log_level"],
                            access_log=False, timeout_graceful_shutdown=5, root_path=settings["root_path"],
                            ssl_certfile=settings["ssl_certfile"] or None, ssl_keyfile=settings["ssl_keyfile"] or None)
    server = RemixServer(config, state, settings["drain_timeout"])
    log.info("serving %s with adapters [%s]%s on %s://%s:%d", state.base_name, ", ".join(settings["adapters"]),
             f" and, on demand, those of {state.lazy_dir}" if state.lazy_dir is not None else "",
             "https" if settings["ssl_certfile"] else "http", settings["host"], settings["port"])
    # HTTP on a thread of its own, the engine on this one, which loaded the model (Engine.run_here says why: a step
    # on another thread took 1.6-1.8x as long). uvicorn installs no signal handlers off the main thread, so the
    # graceful SIGTERM / SIGINT is installed here.
    def serve_http():
        name_os_thread("remix-http")  # (as the OS shows it too: top -H, and server.bench_live's CPU accounting)
        server.run(sockets=[sock])

    http = threading.Thread(target=serve_http, name="remix-http", daemon=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    http.start()
    state.engine.run_here(until=lambda: not http.is_alive())
    http.join()
    state.engine.stop(drain_timeout=1.0)
    return 0 if server.started else 1  # (one that never started has said why in its log)
