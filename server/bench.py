"""End-to-end generation benchmark: our engine against Hugging Face ``generate``, in one run.

    python -m server.bench --json out.json [--concurrency 1,8,32] [--new-tokens 128] [--prompt-tokens 128]
                           [--dtype auto|bfloat16|float32] [--device cpu|cuda|auto] [--repeats 2]
                           [--kv-cache-dtype auto|int8] [--peft] [--peft-mixed N] [--temperature T --top-p P]
                           [--max-batched-tokens N]

On the default base (prompts of ~128 tokens, 128 new tokens, greedy - or, with --temperature, every contender
sampling alike: HF generate with do_sample, the engine seeded per request -, prefill included) it measures:
  hf_generate        HF generate, static batch, base only (the peer everyone has)
  hf_loop            HF generate with a ReMix adapter applied by a per-expert Python loop (what a MixLoRA user runs)
  engine_base        our engine, base only
  engine_remix       our engine, one ReMix adapter (n=8, k=2, r=8 on every FFN projection)
  engine_4adapters   our engine, four such adapters mixed round-robin in every batch
and with --peft, a plain LoRA as peft saves it (r 16, alpha 32, on every linear of every layer, B random):
  hf_peft            HF generate on peft's PeftModel with that LoRA (what a peft user runs)
  engine_peft        our engine serving the same directory (read as a router-"lora" adapter)
and with --peft-mixed N, N such LoRAs (other seeds), request i taking LoRA i mod N - many LoRAs in one batch, what
S-LoRA and Punica serve:
  hf_peft_mixed      HF generate on one PeftModel holding the N LoRAs, each row given its own by peft's mixed-batch
                     inference (``adapter_names``: peft runs each layer's LoRA once per adapter on its rows)
  engine_peft_mixed  our engine serving the same N directories, mixed in every batch
at each concurrency, plus the engine's median decode-step time and the time of that step's weight GEMMs alone at the
same batch (the floor on this machine: the faster of ATen's GEMMs and, on CPU, the compiled kernels' GEMM, which
the engine runs), and prints/writes the ratios with their goals. On CPU the compiled decode stack also times its ops
during those steps, and the JSON (``decode_breakdown_ms``) and the tables show where a step goes: attention, the FFN
projections (the ReMix modules), the attention projections, the small ops, and what lies outside the decoder layers.
Each engine's wall time is also split between its steps that carried prompt tokens (chunked prefill, decode rows beside
them) and its decode-only steps (``runs_seconds_in_prompt_steps`` / ``runs_seconds``), and the ratio
``adapter_cost_share_in_prompt_steps@c`` (no goal) says what share of the adapter's extra seconds over the bare engine,
round by round, fell in the steps with prompt tokens. Every contender runs ``--repeats`` times, in rounds with the floor timed in the same rounds: the tables report each
contender's fastest run, and each ratio is the median over the rounds of that ratio within a round, so one lucky round
of one of them does not decide it - on a shared VM one slow spell had moved a single run's figures by 10-20 %. Within
a round the engine's contenders run at the same time: each is an engine of its own (its own copy of the base, the
adapters its requests name loaded), all serving the same prompts, stepped in turn one step each (in the same order
every sweep, so no engine's step follows its own), each on the clock of its own steps - so a slow spell of the machine
lands on all of them alike instead of on whichever ran in it (runs of a contender after another had put the adapter's
ratio to the bare engine anywhere from 0.77 to 0.97 within one bench run). The HF peers run after them in the round.
On CUDA every timing ends with a device synchronisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import remix
from remix import routing
from remix.kernels import cpu_ext, tune_cpu_allocator
from remix.settings import HelpFormatter
from server.cli import DEVICES, DTYPES, resolve_device, resolve_dtype
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

TEXT = ("The history of the river valley is long and varied. Farmers, traders and travellers have passed through it "
        "for centuries, leaving behind roads, bridges, mills and stories that are still told today. ")


class PerExpertLoopLinear(nn.Module):
    """MixLoRA-style forward: route, then one masked pass per expert (a Python loop over the n LoRAs)."""

    def __init__(self, base: nn.Linear, A, B, router, k, omega):
        super().__init__()
        self.base, self.A, self.B, self.router, self.k, self.omega = base, A, B, router, k, omega

    def forward(self, x):
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = self.base(x2)
        idx = routing.topk_lower_index(routing.router_logits(x2, self.router), self.k)
        for i in range(self.A.shape[0]):
            rows, _ = torch.where(idx == i)
            if rows.numel():
                y.index_add_(0, rows, self.omega * F.linear(F.linear(x2[rows], self.A[i]), self.B[i]))
        return y.view(*shape, -1)


def make_adapter(model, path: Path, seed: int) -> Path:
    layers = remix.inject(model, remix.MixtureConfig(n=8, k=2, r=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
            layer.router.copy_(torch.randn(layer.router.shape, generator=g) * 0.05)
    remix.save_adapter(model, path)
    remix.unwrap(model)
    return path


PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(model, path: Path, seed: int = 0, scale: float = 0.01, **lora):
    """A LoRA saved by peft itself on ``model`` (LoraConfig ``lora``, default r 16, alpha 32 on every linear of every
    layer), B random (peft starts it at zero: a no-op would prove nothing). Returns the PeftModel (eval mode)."""
    try:
        import peft
    except ImportError:
        raise SystemExit("error: --peft needs the peft package (pip install peft)") from None
    config = {"r": 16, "lora_alpha": 32, "target_modules": PEFT_TARGETS, "lora_dropout": 0.0, **lora}
    pm = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(str(path))
    return pm.eval()


def prompts_of(tokenizer, count: int, length: int) -> list[list[int]]:
    ids = tokenizer(TEXT * (length // 20 + 2)).input_ids
    return [ids[i : i + length] for i in range(count)]  # distinct prompts of exactly `length` tokens


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_hf(model, prompts, new_tokens, sampling: dict | None = None, warm_tokens: int = 4,
             adapter_names: list[str] | None = None) -> float:
    """Seconds for HF generate over the batch, after an untimed warm-up of ``warm_tokens`` new tokens at the same batch,
    as the engine gets one: whatever a library sets up on first use (cuBLAS handles and workspaces on CUDA, oneDNN
    primitives on CPU) is no part of serving. On CUDA the first round warms up with every new token (``main``): HF's
    cache grows by a concatenation a step, and the caching allocator met each new size first in the timed run (H200,
    bfloat16: HF generate 485 tok/s at 32 sequences in the first round, 1227 in the second, after a 4-token warm-up;
    the engine's cache is allocated once). ``adapter_names``: peft's mixed-batch inference, row i's LoRA named
    ``adapter_names[i % len(adapter_names)]`` (as the engine's request i takes its adapter)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    mixed = {"adapter_names": [adapter_names[i % len(adapter_names)] for i in range(len(prompts))]} if adapter_names else {}
    with torch.inference_mode():
        for n in (min(warm_tokens, new_tokens), new_tokens):  # the warm-up, then the timed run
            synchronize(device)
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0, **hf_sampling(sampling), **mixed)
            synchronize(device)
    return time.perf_counter() - start


def hf_first_and_all(model, prompts, new_tokens) -> tuple[float, float]:
    """HF generate's time to its first token (``max_new_tokens=1``: the prompts' forward) and to all ``new_tokens``,
    each the faster of two calls (each warmed up first, untimed: :func:`bench_hf`)."""
    first = min(bench_hf(model, prompts, 1) for _ in range(2))
    return first, min(bench_hf(model, prompts, new_tokens) for _ in range(2))


def best_of_rounds(rounds: list[dict], names) -> dict:
    """Per engine of ``names``: its best round's time to first token and tokens/s, and every round's ({"ttft_s",
    "tokens_per_s"} per engine a round) - the tables' figures; ratios are taken within rounds."""
    return {name: {"ttft_s": min(x[name]["ttft_s"] for x in rounds),
                   "tokens_per_s": max(x[name]["tokens_per_s"] for x in rounds),
                   "runs": [x[name] for x in rounds]} for name in names}


def hf_sampling(sampling: dict | None) -> dict:
    """HF generate's arguments for greedy (None) or {"temperature", "top_p"} sampling (top_k off: HF's default is 50)."""
    if not sampling:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling.get("top_p", 1.0), "top_k": 0}


def bench_engine(engine: Engine, prompts, new_tokens, adapters: list[str | None],
                 sampling: dict | None = None, breakdown: dict | None = None) -> tuple[float, float]:
    """One engine alone (:func:`bench_engines_in_turn` with one contender): its wall time on the clock of its steps
    and the median time of its full-batch decode-only steps. sampling: None (greedy) or {"temperature", "top_p"}
    (each request seeded by its index). ``breakdown``: filled, where the compiled decode stack ran those steps, with
    where they went (ms a step, means: see :func:`decode_breakdown`)."""
    parts: dict | None = {} if breakdown is not None else None
    wall, step = bench_engines_in_turn({"engine": (engine, adapters)}, prompts, new_tokens, sampling, parts)["engine"]
    if breakdown is not None:
        breakdown.update(parts.get("engine", {}))
    return wall, step


def bench_engines_in_turn(contenders: dict[str, tuple[Engine, list[str | None]]], prompts, new_tokens,
                          sampling: dict | None = None, breakdowns: dict | None = None,
                          prompt_clock: dict | None = None) -> dict[str, tuple[float, float]]:
    """Every contender (an engine of its own and the adapters its requests name, round-robin) serves the same prompts,
    submitted together; the engines are stepped in turn, one step each, so a slow spell of a shared machine lands on
    all of them alike. The order is the same every sweep: no engine's step follows its own. (Reversed every sweep, as it
    was until the thirtieth session, the first and last contenders ran two steps back to back at every turn of the
    order, half of their steps, and the middle ones never. A one-sequence step right after the same engine's, in three
    runs of scripts/back_to_back.py: 9.954 / 10.346 / 10.029 ms against 9.992 / 10.469 / 10.131 for the bare engine,
    10.793 / 11.201 / 10.808 against 10.902 / 11.181 / 10.886 with an adapter - the cache still holding some of that
    engine's state - so at one sequence the bare engine, first of the order, had ~0.3 % on the adapter's engines in the
    middle for nothing; at 8 sequences no difference.) Per contender: (the wall time on the clock of its own steps, the
    median of its full-batch decode-only steps). ``sampling``: None (greedy) or {"temperature", "top_p"} (each request
    seeded by its index). ``breakdowns``: filled per contender, where the compiled decode stack ran its steps, with
    where they went (ms a step, means: :func:`decode_breakdown`; the stack's clock is read after every step, so each
    engine's ops are its own). ``prompt_clock``: filled per contender with the seconds of its steps that carried prompt
    tokens (chunked prefill, with whatever decode rows ran beside them) - the rest of its wall time went to decode-only
    steps."""
    for name, (engine, adapters) in contenders.items():
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=True,
                                    **({"temperature": 0.0} if not sampling else {**sampling, "seed": i}))
            engine.submit(GenerationRequest(f"b-{name}-{time.monotonic_ns()}-{i}", p, params, adapters[i % len(adapters)]),
                          lambda e: None)
    first = next(iter(contenders.values()))[0]
    clocked = breakdowns is not None and first.runner.model.device.type == "cpu" and cpu_ext.available()
    if clocked:
        cpu_ext.stack_clock(True)
    clock = {name: 0.0 for name in contenders}
    in_prompt_steps = {name: 0.0 for name in contenders}
    decode_steps: dict[str, list[float]] = {name: [] for name in contenders}
    timed_steps: dict[str, list[float]] = {name: [] for name in contenders}
    parts: dict[str, dict[str, float]] = {name: {} for name in contenders}
    while any(engine.has_work() for engine, _ in contenders.values()):
        for name in contenders:
            engine = contenders[name][0]
            if not engine.has_work():
                continue
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            ops, runs = cpu_ext.stack_clock(True) if clocked else ({}, 0)  # (read after the step's clock stopped)
            clock[name] += dt
            if engine.last_step["prefill_tokens"] > 0:
                in_prompt_steps[name] += dt
            if engine.last_step["prefill_tokens"] == 0 and engine.last_step["decode_rows"] == len(prompts):
                decode_steps[name].append(dt)
                if runs == 1:  # the step ran the compiled stack once: its ops were timed
                    timed_steps[name].append(dt)
                    for op, ms in ops.items():
                        parts[name][op] = parts[name].get(op, 0.0) + ms
    if clocked:
        cpu_ext.stack_clock(False)
        for name in contenders:
            if timed_steps[name]:
                breakdowns[name] = decode_breakdown(parts[name], timed_steps[name])
    if prompt_clock is not None:
        prompt_clock.update(in_prompt_steps)
    return {name: (clock[name], statistics.median(decode_steps[name]) if decode_steps[name] else float("nan"))
            for name in contenders}


# a decode step's parts as the README's table groups them: the stack's ops (cpu_ext.STACK_OPS) and the rest of the step
BREAKDOWN_GROUPS = {"attention": ("attention",), "ffn_projections": ("gate", "up", "down"),
                    "attention_projections": ("qkv", "o_proj"), "norms_rotary_kv_act": ("norms", "rotary", "kv_write", "act")}


def decode_breakdown(parts: dict[str, float], steps: list[float]) -> dict:
    """Where the timed decode steps went, in ms a step (means, so the parts add up to ``step``): each kind of op of the
    compiled decoder layers (``ops``: cpu_ext.STACK_OPS, summed over the steps in ``parts``), those ops grouped
    (BREAKDOWN_GROUPS: the FFN projections are the ReMix modules where an adapter is on, their base GEMMs included),
    and ``outside_layers``: the rest of the step (embedding, LM head, sampling, detokenization, scheduling)."""
    n = len(steps)
    ops = {name: ms / n for name, ms in parts.items()}
    step = 1000 * statistics.mean(steps)
    out = {"steps": n, "step": step, "ops": ops}
    out.update({group: sum(ops.get(o, 0.0) for o in members) for group, members in BREAKDOWN_GROUPS.items()})
    out["outside_layers"] = step - sum(ops.values())
    return out


def serve_in_turn(engines: dict[str, Engine], prompts: dict[str, list[list[int]]],
                  params: SamplingParams | dict[str, SamplingParams], adapter: str | None = "a0",
                  before_step: dict | None = None) -> dict[str, dict]:
    """Each engine serves its prompts (submitted together), the engines stepped in turn, one step each, so a slow
    spell of a shared machine lands on all of them (whole runs in turn had moved a decode step by 20 % between two runs
    of the same engine). Per engine, on the clock of its own steps (submission not counted): ``wall_s``, ``ttft_s``
    (the mean time to the step that emits a request's first token), ``decode_step_s`` (the median of its full-batch
    decode-only steps; nan if none), and each request's ``tokens`` and chosen tokens' ``logprobs`` (when asked).
    ``params``: one for all, or per engine; ``before_step``: per engine, a function called (untimed) before each of
    its steps (a process-wide setting the engines differ in)."""
    clock = {name: 0.0 for name in engines}
    first: dict[str, list[float]] = {name: [] for name in engines}
    steps: dict[str, list[float]] = {name: [] for name in engines}
    tokens = {name: [[] for _ in prompts[name]] for name in engines}
    logprobs = {name: [[] for _ in prompts[name]] for name in engines}
    fresh: dict[str, int] = {name: 0 for name in engines}  # first tokens emitted during the engine's current step

    def sink(name: str, i: int):
        def on_event(ev):
            if ev.token_ids and not tokens[name][i]:
                fresh[name] += 1
            tokens[name][i] += ev.token_ids
            logprobs[name][i] += [lp for _, lp, _ in ev.logprobs]
        return on_event

    for name, engine in engines.items():
        own = params[name] if isinstance(params, dict) else params
        for i, p in enumerate(prompts[name]):
            engine.submit(GenerationRequest(f"turn-{name}-{time.monotonic_ns()}-{i}", p, own, adapter), sink(name, i))
    while any(e.has_work() for e in engines.values()):
        for name, engine in engines.items():
            if not engine.has_work():
                continue
            if before_step and name in before_step:
                before_step[name]()
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            clock[name] += dt
            first[name] += [clock[name]] * fresh[name]
            fresh[name] = 0
            if engine.last_step["prefill_tokens"] == 0 and engine.last_step["decode_rows"] == len(prompts[name]):
                steps[name].append(dt)
    return {name: {"wall_s": clock[name], "ttft_s": statistics.mean(first[name]) if first[name] else float("nan"),
                   "decode_step_s": statistics.median(steps[name]) if steps[name] else float("nan"),
                   "tokens": tokens[name], "logprobs": logprobs[name]} for name in engines}


def common_prefix(a: list, b: list) -> int:
    """How many leading items a and b share (greedy decoding: one flipped near-tie changes everything after it)."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def add_output_args(ap: argparse.ArgumentParser) -> None:
    """--json, --markdown and --base, as every bench here takes them."""
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--markdown", help="write the README's table(s) here")
    ap.add_argument("--base", default=remix.DEFAULT_BASE,
                    help="base model: the embedded smollm2-135m-instruct, tiny, a local HF directory or a .gguf file")


def write_outputs(args, out: dict, markdown) -> None:
    """The results as JSON (--json) and the README's table(s) made by ``markdown(out)`` (--markdown)."""
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(out))


def gemm_floor(model, batch: int, repeats: int = 5, linear=F.linear) -> float:
    """Seconds for the weight GEMMs of one decode step at this batch: every linear of the model, in order (the median
    of ``repeats`` timed passes), each computed by ``linear`` (ATen's, or the compiled kernels' GEMM).

    On CUDA, after one untimed pass (library handles, workspaces), they are replayed from a CUDA graph as the engine's
    decode steps are (timed eagerly, ~200 GEMMs of a small model measure launches, not the GPU); eagerly if the
    capture fails."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    device = weights[0].device
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=device) for w in weights}

    def gemms():
        for w in weights:
            linear(xs[w.shape[1]], w)

    step = gemms
    times = []
    with torch.inference_mode():
        if device.type == "cuda":  # pragma: no cover - CUDA only
            step = _captured(gemms, device) or gemms
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _captured(fn, device: torch.device):  # pragma: no cover - CUDA only
    """fn run once on a side stream, then captured: the graph's replay, or None (with a note) if the capture fails."""
    try:
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except RuntimeError as e:
        print(f"GEMM floor: CUDA graph capture failed ({e}); timing eagerly", flush=True)
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__, formatter_class=HelpFormatter)
    add_output_args(ap)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="tokens of every prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated for every request")
    ap.add_argument("--skip-hf-loop", action="store_true", help="skip the slowest peer")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (the default); above 0, every contender samples (HF generate with do_sample)")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling for every contender")
    ap.add_argument("--peft", action="store_true", help="also a peft LoRA: HF generate on peft's PeftModel against the "
                    "engine serving the same directory (needs peft)")
    ap.add_argument("--peft-mixed", type=int, default=0, metavar="N",
                    help="also N peft LoRAs mixed in every batch (request i takes LoRA i mod N): HF generate with "
                         "peft's mixed-batch inference (adapter_names) against the engine serving the same directories")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of every contender at each concurrency (all of them in rounds); the fastest is reported")
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="weights and activations of every contender (the same for all, so ratios stay fair); auto, "
                         "the server's default: bfloat16 on CUDA or a CPU with AMX-BF16 / AVX512-BF16, else float32")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                    help="the engine's KV cache (the server's --kv-cache-dtype; int8: CPU only); HF's is its own")
    ap.add_argument("--device", default="cpu", help=f"where every contender runs: {', '.join(DEVICES)} or cuda:N (auto: cuda if present)")
    ap.add_argument("--max-batched-tokens", type=int, default=0,
                    help="the engine's tokens a step (the server's --max-batched-tokens; 0: 512, or the prompt length plus "
                         "the largest concurrency if that is more). HF generate prefills every prompt of a batch in one "
                         "forward; the engine in steps of this many tokens")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats: must be at least 1")
    if args.peft_mixed < 0 or args.peft_mixed == 1:
        ap.error(f"--peft-mixed: 0 (off) or at least 2 LoRAs, got {args.peft_mixed}")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency: comma-separated whole numbers, got {args.concurrency!r}")
    if min(levels) < 1:
        ap.error(f"--concurrency: each level must be at least 1, got {args.concurrency!r}")
    for name in ("prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.max_batched_tokens < 0:
        ap.error(f"--max-batched-tokens: must be 0 (the default budget) or more, got {args.max_batched_tokens}")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1:
        ap.error(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    if args.max_batched_tokens and args.max_batched_tokens <= max(levels):
        ap.error("--max-batched-tokens: must exceed the largest concurrency (a step holds every decode row)")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    dtype = resolve_dtype(args.dtype, device)
    if args.kv_cache_dtype == "int8" and device.type != "cpu":
        ap.error("--kv-cache-dtype int8 runs on CPU only")
    tune_cpu_allocator()
    if device.type == "cpu":
        cpu_ext.load()
    model, tok = remix.load_base(args.base)  # float32: the adapters are made (and stored) in full precision
    tmp = Path(tempfile.mkdtemp(prefix="remix-bench-"))
    adapter_paths = [make_adapter(model, tmp / f"a{i}", seed=i) for i in range(4)]
    model.to(device=device, dtype=dtype)  # the engines' weights (the adapters are already written)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature must be >= 0 and --top-p in (0, 1]")
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else None
    max_len = args.prompt_tokens + args.new_tokens + 8
    if args.peft:
        peft_path = tmp / "peft"
        make_peft_adapter(remix.load_base(args.base)[0], peft_path)
    mixed_paths = {f"p{i}": tmp / f"p{i}" for i in range(args.peft_mixed)}
    for i, path in enumerate(mixed_paths.values()):
        make_peft_adapter(remix.load_base(args.base)[0], path, seed=100 + i)
    engines = (("engine_base", [None]), ("engine_remix", ["a0"]), ("engine_4adapters", ["a0", "a1", "a2", "a3"]))
    if args.peft:
        engines += (("engine_peft", ["peft"]),)
    if mixed_paths:
        engines += (("engine_peft_mixed", list(mixed_paths)),)
    # one engine per contender, each on its own copy of the weights with the adapters its requests name loaded (as a
    # server of those adapters has them; with the rank-16 peft LoRA loaded in all of them, the ReMix adapters' pools
    # had been padded to rank 16 until the kernels learned to skip a padded rank), stepped in turn
    # (bench_engines_in_turn)
    copies = [model] + [copy.deepcopy(model) for _ in engines[1:]]
    contenders: dict[str, tuple[Engine, list]] = {}
    for (name, adapters), weights in zip(engines, copies):
        engine = Engine(weights, tok, EngineConfig(
            max_model_len=max_len, max_num_seqs=max(levels), max_queue=1024,
            max_batched_tokens=args.max_batched_tokens or max(512, args.prompt_tokens + max(levels)),
            kv_cache_dtype=args.kv_cache_dtype,
            # every round submits the same prompts, and HF computes every prompt: so does the engine (no prefix cache)
            prefix_caching=False))
        for i, path in enumerate(adapter_paths):
            if f"a{i}" in adapters:
                engine.load_adapter(f"a{i}", str(path))
        if "peft" in adapters:
            engine.load_adapter("peft", str(peft_path))
        for name_, path in mixed_paths.items():
            if name_ in adapters:
                engine.load_adapter(name_, str(path))
        engine.warm_up()  # CUDA: capture the decode graphs now, as the server does when it starts
        contenders[name] = (engine, adapters)
    # each engine's weights and KV cache on transparent huge pages (CPU): where the kernel finds too few free 2 MiB frames
    # for one engine's copy, that engine streams 4 KiB pages and every op of its steps runs slower than its rivals'. (A
    # 47th-session run had one engine's attention, LM head and q/k/v 13-20 % slower than the others' in the same sweeps,
    # from its first steps on; not seen in the runs before or after it, and its pages were not recorded then - they are
    # now.)
    huge_pages = {name: e.huge_pages for name, (e, _) in contenders.items()}
    for line in huge_page_warnings(huge_pages):
        print(line, flush=True)
    engine = contenders["engine_remix"][0]  # the floor's weights, the config the JSON records
    # the HF peers run on plain copies of the base (the engine's model has serving wrappers): one as it is, one with the
    # adapter applied by a per-expert Python loop
    peers = {"hf_generate": remix.load_base(args.base, dtype=dtype, device=device)[0]}
    if not args.skip_hf_loop:
        looped, _ = remix.load_base(args.base, dtype=dtype, device=device)
        for name, layer in remix.load_adapter(looped, adapter_paths[0]).items():
            parent, _, child = name.rpartition(".")
            setattr(looped.get_submodule(parent), child, PerExpertLoopLinear(
                layer.base, layer.lora_A.detach(), layer.lora_B.detach(), layer.router.detach(), layer.k, layer.omega))
        peers["hf_loop"] = looped
    if args.peft:
        from peft import PeftModel

        peers["hf_peft"] = PeftModel.from_pretrained(remix.load_base(args.base, dtype=dtype, device=device)[0],
                                                     str(peft_path)).eval()
    if mixed_paths:
        from peft import PeftModel

        first, *others = mixed_paths.items()
        pm = PeftModel.from_pretrained(remix.load_base(args.base, dtype=dtype, device=device)[0], str(first[1]),
                                       adapter_name=first[0])
        for name_, path in others:
            pm.load_adapter(str(path), adapter_name=name_)
        peers["hf_peft_mixed"] = pm.eval()
    results, rounds_of = {}, {}  # rounds_of[c][name]: every round's (wall, decode step or None), for the ratios
    for c in levels:
        prompts = prompts_of(tok, c, args.prompt_tokens)
        tokens = c * args.new_tokens
        row = {}
        for e, adapters in contenders.values():  # warm-up: loads the routing op, touches the cache
            bench_engine(e, prompts_of(tok, 2, args.prompt_tokens), 4, adapters)
        # every contender --repeats times, in rounds (a slow spell of this shared machine then hits all of them alike,
        # the HF peers included: HF generate alone ran at 96 to 140 tok/s at 32 sequences in one session's runs), and
        # each one's best run reported in the tables (its fastest wall time and, for the engine, separately its fastest
        # median decode step); the ratios are taken within each round (see ``ratio`` below), and within a round the
        # engine's contenders run in turn, step by step (bench_engines_in_turn)
        runs: dict[str, list] = {}
        floors: dict[str, list] = {}
        breakdowns: dict[str, list] = {}
        in_prompt: dict[str, list[float]] = {}  # per contender and round: seconds of its steps with prompt tokens
        for rep in range(args.repeats):
            parts: dict = {}
            prompt_clock: dict = {}
            for name, (wall, step) in bench_engines_in_turn(contenders, prompts, args.new_tokens, sampling,
                                                            breakdowns=parts, prompt_clock=prompt_clock).items():
                runs.setdefault(name, []).append((wall, step))
                in_prompt.setdefault(name, []).append(prompt_clock[name])
                breakdowns.setdefault(name, []).append(parts.get(name, {}))
                print(f"c={c:<3} {name:18s} {tokens / wall:8.1f} tok/s  step {1000 * step:7.1f} ms  (run {rep + 1})", flush=True)
            # the floor in the same rounds, right after the engine's runs: timed once after all of them, it had met a
            # slower moment than the steps it divides (fourteenth session: a 60 ms floor under a 64 ms step at 32
            # sequences, 36 ms under 24 at one) - the fastest of the rounds is kept, as for the step
            floors.setdefault("aten", []).append(1000 * gemm_floor(engine.runner.model, c))
            if device.type == "cpu" and cpu_ext.available():
                floors.setdefault("compiled", []).append(1000 * gemm_floor(engine.runner.model, c, linear=cpu_ext.linear))
            print(f"c={c:<3} {'gemm floor':18s} " + "  ".join(f"{k} {v[-1]:7.1f} ms" for k, v in floors.items())
                  + f"  (run {rep + 1})", flush=True)
            for name, model_ in peers.items():
                warm = args.new_tokens if device.type == "cuda" and rep == 0 else 4
                wall = bench_hf(model_, prompts, args.new_tokens, sampling, warm_tokens=warm,
                                adapter_names=list(mixed_paths) if name == "hf_peft_mixed" else None)
                runs.setdefault(name, []).append((wall, None))
                print(f"c={c:<3} {name:18s} {tokens / wall:8.1f} tok/s  (run {rep + 1})", flush=True)
        for name, got in runs.items():
            wall = min(w for w, _ in got)
            row[name] = {"seconds": wall, "tokens_per_s": tokens / wall, "latency_per_token_ms": 1000 * wall / args.new_tokens,
                         "runs_tokens_per_s": [round(tokens / w, 2) for w, _ in got]}
            if got[0][1] is not None:  # the engine's contenders also report their decode step
                # and how their wall time split between steps with prompt tokens and decode-only steps (each round)
                row[name]["runs_seconds_in_prompt_steps"] = [round(v, 6) for v in in_prompt[name]]
                row[name]["runs_seconds"] = [round(w, 6) for w, _ in got]
                row[name]["decode_step_ms"] = 1000 * min(st for _, st in got)
                row[name]["runs_decode_step_ms"] = [round(1000 * st, 3) for _, st in got]
                fastest = min(range(len(got)), key=lambda j: got[j][1])
                if breakdowns[name][fastest]:  # where that run's decode steps went (CPU, compiled decode stack)
                    row[name]["decode_breakdown_ms"] = breakdowns[name][fastest]
        # the floor is the faster of ATen's GEMMs (what HF runs) and the compiled kernels' GEMM (what the engine runs
        # on CPU: their own float32 kernel, oneDNN (Intel: MKL) from 256 rows; bfloat16 their own below 128 rows, else ATen's): a
        # step cannot beat the weight GEMMs of the best GEMM this machine has
        row["gemm_floor_aten_ms"] = min(floors["aten"])
        if "compiled" in floors:
            row["gemm_floor_compiled_ms"] = min(floors["compiled"])
        row["gemm_floor_runs_ms"] = {k: list(got) for k, got in floors.items()}
        row["gemm_floor_ms"] = min(min(got) for got in floors.values())
        results[c], rounds_of[c] = row, runs
    del peers
    ratios, goals, rounds = {}, {}, {}

    def ratio(name, per_round, op, target, where):
        """The ratio of two contenders within each round (run back to back there), its median over the rounds: each
        contender's fastest run alone (the tables) let one lucky round of one of them decide a ratio on this VM."""
        rounds[name] = [round(v, 4) for v in per_round]
        value = statistics.median(per_round)
        ratios[name] = value
        if op is not None:
            goals[name] = {"value": round(value, 3), "goal": f"{op} {target}", "at": where,
                           "met": value <= target if op == "<=" else value >= target}

    def over(c: int, a: str, b: str) -> list[float]:  # tokens/s of a over b at c, round by round (same tokens: walls)
        return [wb / wa for (wa, _), (wb, _) in zip(rounds_of[c][a], rounds_of[c][b])]

    top = max(levels)
    for c in levels:
        ratio(f"engine_remix_over_hf_generate@{c}", over(c, "engine_remix", "hf_generate"), ">=" if c == top else None, 2.0, c)
        if "hf_loop" in rounds_of[c]:
            ratio(f"engine_remix_over_hf_loop@{c}", over(c, "engine_remix", "hf_loop"), ">=" if c == top else None, 3.0, c)
        ratio(f"engine_remix_over_engine_base@{c}", over(c, "engine_remix", "engine_base"), ">=", 0.90, c)
        ratio(f"engine_4adapters_over_engine_remix@{c}", over(c, "engine_4adapters", "engine_remix"), ">=", 0.90, c)
        floor_rounds = [min(got) for got in zip(*results[c]["gemm_floor_runs_ms"].values())]  # the faster GEMM of each round
        ratio(f"decode_step_over_gemm_floor@{c}", [1000 * st / f for (_, st), f in zip(rounds_of[c]["engine_remix"], floor_rounds)],
              "<=" if c == top else None, 1.25, c)
        # where the adapter's cost lies: its engine's extra seconds (over the bare engine's, in the same round) that
        # fell in steps with prompt tokens, as a share of all its extra seconds (a diagnostic, no goal; noisy where
        # the extra is small)
        ar, br = results[c]["engine_remix"], results[c]["engine_base"]
        extra = [(pa - pb, wa - wb) for pa, pb, wa, wb in zip(ar["runs_seconds_in_prompt_steps"],
                                                              br["runs_seconds_in_prompt_steps"], ar["runs_seconds"],
                                                              br["runs_seconds"])]
        if all(total > 0 for _, total in extra):
            ratio(f"adapter_cost_share_in_prompt_steps@{c}", [p / total for p, total in extra], None, 0, c)
        if "hf_peft" in rounds_of[c]:
            ratio(f"engine_peft_over_hf_peft@{c}", over(c, "engine_peft", "hf_peft"), None, 0, c)
            ratio(f"engine_peft_over_engine_base@{c}", over(c, "engine_peft", "engine_base"), None, 0, c)
        if "hf_peft_mixed" in rounds_of[c]:
            ratio(f"engine_peft_mixed_over_hf_peft_mixed@{c}", over(c, "engine_peft_mixed", "hf_peft_mixed"), None, 0, c)
            ratio(f"engine_peft_mixed_over_engine_base@{c}", over(c, "engine_peft_mixed", "engine_base"), None, 0, c)
    if 1 in results:  # the batch-1 goal only where batch 1 was measured (--concurrency 32 alone reported it from 32)
        ratio("engine_remix_bs1_over_hf_generate_bs1", over(1, "engine_remix", "hf_generate"), ">=", 2.0, 1)
    for name, g in goals.items():
        print(f"goal {name:45s} {g['value']:7.3f} (goal {g['goal']}) {'met' if g['met'] else 'NOT met'}")
    out = {"config": {"base": args.base, "dtype": str(dtype).removeprefix("torch."), "device": device_name(device),
                      "kv_cache_dtype": args.kv_cache_dtype, "sampling": sampling or "greedy", "peft_targets": PEFT_TARGETS if args.peft or args.peft_mixed else None,
                      "peft_mixed_loras": args.peft_mixed,
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                      "max_batched_tokens": engine.config.max_batched_tokens,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_ext.cpu_model(),
                      # which bfloat16 GEMM the engine ran (AMX tiles, or not: no AMX, or REMIX_DISABLE_AMX=1)
                      "amx_bf16": device.type == "cpu" and cpu_ext.amx_bf16(),
                      # each engine's weights / KV cache share on transparent huge pages (CPU; see above)
                      "huge_pages": huge_pages},
           "results": results, "ratios": ratios, "ratio_rounds": rounds, "goals": goals}
    write_outputs(args, out, markdown)
    return out


def huge_page_warnings(huge_pages: dict[str, dict[str, float]], least: float = 0.9) -> list[str]:
    """What to say about the engines' shares on huge pages ({engine: {block: share}}, a block left out where it holds
    no huge page): one warning an engine with a block under ``least`` while another engine is not (that engine streams
    4 KiB pages and runs slower than its rivals: the comparison is unfair), or one note where every measured engine
    has such a block (fair, but none at its best: THP off, or REMIX_HUGE_PAGES=0)."""
    lows = {name: {k: v for k, v in shares.items() if v < least} for name, shares in huge_pages.items()}
    measured = [name for name, shares in huge_pages.items() if shares]
    if measured and all(lows[name] for name in measured):
        return ["note: no engine's memory is all on transparent huge pages (THP off, or REMIX_HUGE_PAGES=0?): every "
                "engine streams 4 KiB pages"]
    return [f"warning: {name}'s " + " and ".join(f"{k} {100 * v:.0f} %" for k, v in low.items())
            + " on huge pages (each engine's least: " + ", ".join(f"{n} {min(huge_pages[n].values()):.2f}" for n in measured)
            + "): its steps run on 4 KiB pages, slower than its rivals'" for name, low in lows.items() if low]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"


def markdown(out: dict) -> str:
    """The README's tables: tokens/s per contender and concurrency, decode step against its GEMM floor, the ratios."""
    names = [("hf_generate", "HF generate"), ("hf_loop", "HF + per-expert loop adapter"), ("engine_base", "engine, base"),
             ("engine_remix", "engine, 1 ReMix adapter"), ("engine_4adapters", "engine, 4 adapters mixed"),
             ("hf_peft", "HF + peft LoRA"), ("engine_peft", "engine, same peft LoRA"),
             ("hf_peft_mixed", "HF + peft, LoRAs mixed"), ("engine_peft_mixed", "engine, same LoRAs mixed")]
    present = [(k, label) for k, label in names if any(k in row for row in out["results"].values())]
    lines = ["| concurrency | " + " | ".join(label for _, label in present)
             + " | decode step (1 adapter) | its GEMMs alone (fastest GEMM here) |",
             "|" + "---|" * (len(present) + 3)]
    for c, row in out["results"].items():
        cells = [f"{row[k]['tokens_per_s']:.1f}" if k in row else "–" for k, _ in present]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {row['engine_remix']['decode_step_ms']:.0f} ms | "
                     f"{row['gemm_floor_ms']:.0f} ms |")
    lines += breakdown_table(out)
    lines += ["", "| ratio (median over rounds of the ratio within each round) | value | goal |", "|---|---|---|"]
    for name, value in out["ratios"].items():
        g = out["goals"].get(name)
        lines.append(f"| {name} | {value:.3f} | " + (f"{g['goal']} ({'met' if g['met'] else 'not met'})" if g else "") + " |")
    return "\n".join(lines) + "\n"


def breakdown_table(out: dict) -> list[str]:
    """Where a decode step goes (the engine's contenders, where the compiled decode stack timed its ops): ms a step,
    means over the fastest run's full-batch decode steps, beside the step's GEMM floor; [] when nothing was timed."""
    contenders = [("engine_base", "base"), ("engine_remix", "1 ReMix adapter"), ("engine_4adapters", "4 adapters")]
    rows = [(c, label, row[k]["decode_breakdown_ms"], row["gemm_floor_ms"]) for c, row in out["results"].items()
            for k, label in contenders if "decode_breakdown_ms" in row.get(k, {})]
    if not rows:
        return []
    lines = ["", "| concurrency | engine | decode step | attention | FFN projections (gate, up, down) | q/k/v and o "
                 "| norms, rotary, KV writes, activation | outside the layers (LM head, sampling, scheduling) "
                 "| the step's GEMMs alone |", "|---|---|---|---|---|---|---|---|---|"]
    for c, label, b, floor in rows:
        lines.append(f"| {c} | {label} | {b['step']:.2f} | {b['attention']:.2f} | {b['ffn_projections']:.2f} | "
                     f"{b['attention_projections']:.2f} | {b['norms_rotary_kv_act']:.2f} | {b['outside_layers']:.2f} | "
                     f"{floor:.2f} |")
    return lines


if __name__ == "__main__":
    main()
