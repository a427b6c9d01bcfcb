"""Optional C++ kernels for the CPU: the per-token top-k routing and LoRA gather of one module, fused.

On this class of CPU a torch op costs ~5-15 us of dispatch, and the dense-masked torch path (one GEMM
over every pool's A, a mask, one GEMM over every B) does n/k times the useful work in shapes that GEMM
libraries handle poorly (K = n*r = 64). These kernels compute only the selected LoRAs:

    route_gather_(x, y, ...)   for each token: logits = P_s x (float32), J = top-k (ties to the lower
                               index), y += omega_s * sum_{i in J} B_i (A_i x); returns J (global ids)
    gather_(x, y, a, bt, idx, w)   the kernel contract with given ids and weights (-1 = none)
    ModuleCall(...)            the whole module with its arguments bound once (see :func:`bind_module`): the base
                               GEMM and route_gather_ into its output in one parallel region (float32 below 256
                               rows, bfloat16 below 128; above, oneDNN's GEMM first); call(x) -> (y, idx), or None
                               when it does not apply
                               (autograd, changed weights, not a CPU float tensor)
    linear(x, w, bias)         that base GEMM alone, each thread on its own slice of the outputs: with AVX-512 or
                               AVX2 + FMA a dot-product kernel (a row's outputs bit-identical in any batch, and the
                               same in both builds; ~2x ATen's MKL GEMM at small batches on the AMD machines
                               measured; from 256 rows oneDNN's linear, MKL's on Intel CPUs: F32_LARGE_GEMM), else MKL;
                               bfloat16 its own kernel below 128 rows (AMX tiles where the CPU has AMX-BF16, else
                               AVX512-BF16), else ATen's
    kv_write_(cache, fresh, row0, pos)   a slot KV cache's write of new keys or values (a memcpy per head and token)
    decode_attention(qk, K, V, row0, lens, Hq, scale)   one decode token per row over its own slot of the cache
    slot_attention(qk, K, V, slots, lens, Hq, scale, prompt=False)   the same with query row i reading slot slots[i]
                               (prefill tokens); prompt=True (prompt tokens, not checked drafts): the prompt kernel
                               (attention_prompt.h: 16 / nrep tokens of a slot at a time) - in bfloat16 with
                               AVX512-BF16 scores and weighted values as AMX tile products where the CPU has AMX, else
                               on vectors (each row's output its own whatever shares the call; not in batch-invariant
                               mode); in float32 with AVX-512 or AVX2 on vectors of positions, the decode kernel's
                               outputs bit for bit (in every mode). _prompt_dtypes() lists the dtypes it serves here
    kv_write_q8_(cache, scales, fresh, row0, pos), decode_attention_q8(qk, K, V, Ks, Vs, row0, lens, Hq, scale)
                               the same two over an 8-bit cache (int8 values, a float32 scale per position and head)
    add_rms_norm_, rotary_     small fused ops of a Llama decoder layer, for the engine's lean forward
    argmax_rows(logits)        each row's first maximum (as torch.max(dim).indices), for greedy sampling
    masked_argmax_rows(logits, rows, mask, nbits)   the same for given rows under a grammar's token bitmask
    sample_rows(logits, rows, temperature, top_k, top_p, u[, mask, nbits, min_p])   sampled tokens, one uniform draw
                               a row (the sampler's reference distribution, no sort of the vocabulary; a grammar's
                               bitmask applied as the logits are read)
    DecodeStack(layers, ...).run(h, ...)   every decoder layer of a decode step in one call (those ops in order);
                               stack_clock(on) reads and resets its time per kind of op (server.bench's breakdown)
    module_clock(on)           one module call's time per thread and stage (routing, phase A, GEMM, phase B, the
                               barriers), read and reset (scripts/module_stages.py)

The gather is blocked by LoRA (phase A: U = w * A_i x for four tokens per load of A_i; phase B: each LoRA's
rows of B held in registers while its tokens' y are updated), with explicit SIMD (GCC/Clang vector types)
and one OpenMP region per call: below 64 tokens the threads split the pools' reads (they dominate a small
batch), from 64 tokens they split the tokens. Every token's sums run in the same order whoever shares the
call and however the work is split, so a token's result is bit-identical alone or in any batch. x and y
may be float32 or bfloat16, and so may the pools A and B (a bfloat16 model's: widened as they are read, half the
bytes); routers and all arithmetic stay float32, and a bfloat16 y is rounded once.

The C++ is in ``remix/kernels/csrc/``, one translation unit (``remix_cpu.cpp``: its parts in order, then the
Python bindings) split by concern, each part self-contained (it includes what it uses) and headed by what it holds:

    common.h        includes, build switches, the 16-lane vector type vf and its loads / sums
    gather.h        the gather: routing, phase A (dots4x4), phase B (axpy_lora), Pairs, Pools, bfloat16 widen / narrow
    gemm.h          the compiled base GEMM (dot_gemm), the parallel-region helpers, Ahead (pools prefetched early)
    amx.h           the bfloat16 GEMM on AMX tiles
    base_gemm.h     BaseGemm: which GEMM a layer's base output takes (compiled, AMX, oneDNN / ATen)
    module.h        run / run_pair: one module call (base GEMM + routing + gather) in one parallel region
    vec_math.h      vector exp and the int32 / 8-lane vector types
    attention.h     decode attention over the slot KV cache (float32 / bfloat16)
    attention_q8.h  the same over the 8-bit cache
    ops.h           the operators above that take tensors: gather_, route_gather_, linear, ModuleCall, attention
    sampling.h      argmax_rows, masked_argmax_rows, sample_rows
    layer_ops.h     add_rms_norm_, silu_mul_, rotary_, kv_write_, kv_write_q8_
    decode_stack.h  DecodeStack

Compiled once on first use with torch's JIT extension loader (~30 s, cached under
``~/.cache/torch_extensions`` in a directory named after this CPU's instruction-set flags, since it is
built with ``-march=native``). If there is no compiler, or ``REMIX_DISABLE_EXT=1``, :func:`load`
returns None and callers use the torch-ops path (:mod:`remix.kernels.torch_ops`). ``REMIX_SPLIT_ADAPT=0`` keeps every
split of work between threads even (:func:`thread_shares`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import threading
import time

import torch

log = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")  # the C++ source: remix_cpu.cpp and its parts

_lock = threading.Lock()
_state: dict = {}
FLAG_SETS = [["-march=native", "-fopenmp"], ["-fopenmp"], []]  # without OpenMP, torch's parallel_for runs serially


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, family and model number from /proc/cpuinfo (``platform.machine()`` where there is none), so a
    benchmark's JSON says which machine it ran on: e.g. ``AMD EPYC (family 26, model 2)`` for a Zen 5 VM."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    if "model name" not in fields:
        return platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def _cpu_tag() -> str:
    """A short hash of the machine and its instruction-set flags (the build uses -march=native)."""
    return hashlib.sha1((platform.machine() + " ".join(sorted(cpu_flags()))).encode()).hexdigest()[:8]


def _env_tag() -> str:
    """A short hash of the torch build and the environment that imports it: two virtual environments (a developer's
    and CI's fresh one) had shared one build directory and rebuilt it in turn, each for its own torch headers."""
    return hashlib.sha1(f"{torch.__version__} {sys.prefix}".encode()).hexdigest()[:6]


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """Hold an advisory lock on ``build_dir`` (fcntl.flock: the kernel releases it when its holder dies) while building;
    once held, a ``lock`` file torch's own build baton left there is stale - its builder was killed mid-build (a
    server stopped during its first start) - and is removed: torch would otherwise wait on it forever, and every later
    start hang without a word. Where flock is missing (not Linux/macOS) nothing is done."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "remix.flock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # waits for a live builder (ours hold this too)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                log.warning("removing a stale build lock %s (a build was interrupted)", stale)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_root(default) -> str:
    """Where the builds go: ``$TORCH_EXTENSIONS_DIR`` where set (as torch's own loader reads it; the container sets it
    to its cache volume), else ``default()`` (torch's user cache, ``~/.cache/torch_extensions``). torch's
    ``get_default_build_root`` does not read the variable, and a build directory given explicitly overrides it."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or default()


def load():
    """The compiled module, or None when disabled or unbuildable (then a warning is logged once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("REMIX_DISABLE_EXT", "") not in ("", "0"):
            log.info("REMIX_DISABLE_EXT is set: using the torch-ops path")
        else:
            from torch.utils.cpp_extension import get_default_build_root, load as cpp_load

            errors = []
            for i, flags in enumerate(FLAG_SETS):  # the fastest build this compiler accepts
                try:
                    name = f"remix_cpu_ops_v250_{_cpu_tag()}_{_env_tag()}_{i}"
                    build_dir = os.path.join(build_root(get_default_build_root), name)
                    fresh = not os.path.exists(os.path.join(build_dir, f"{name}.so"))
                    if fresh:  # (a silent minute or two at a server's first start otherwise)
                        log.info("building the C++ kernels for this CPU in %s (once per environment and CPU; 1-2 "
                                 "minutes on 2 cores)", build_dir)
                    started = time.perf_counter()
                    with _build_lock(build_dir):  # (ninja rebuilds when remix_cpu.cpp or any part it includes changes)
                        module = cpp_load(
                            name, sources=[os.path.join(CSRC, "remix_cpu.cpp")], extra_include_paths=[CSRC],
                            build_directory=build_dir, extra_cflags=["-O3", *flags],
                            extra_ldflags=[f for f in flags if f == "-fopenmp"],
                        )
                    if fresh:
                        log.info("built the C++ kernels in %.0f s", time.perf_counter() - started)
                    if i:
                        log.warning("built the C++ kernels without %s (%s)", FLAG_SETS[0], errors[0])
                    break
                except Exception as e:  # no compiler, no ninja, no OpenMP, read-only cache...: try less, then fall back
                    errors.append(str(e).splitlines()[0][:300])
            else:
                log.warning("could not build the C++ kernels (%s); using torch ops, which are slower on CPU", errors[-1])
        if module is not None and os.environ.get("REMIX_SPLIT_ADAPT", "") == "0":
            module._split_adapt(False)  # every split even, whatever the threads' speeds (thread_shares)
            log.info("REMIX_SPLIT_ADAPT=0: the kernels split their work evenly between threads")
        _state["module"] = module
        return module


def available() -> bool:
    return load() is not None


_off = threading.local()


@contextlib.contextmanager
def disabled():
    """Within this block (this thread) the layers take the torch-ops path: for tests and benchmarks."""
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def bind_module(base, router, a, bt, tables: tuple, r: int, kmax: int, watched: tuple = (), ranks=None):
    """The compiled whole-module call (base GEMM, routing, gather) bound to ``base`` and one pool stack, or
    None where it cannot stand in for the base: no compiled kernels, or a base that is not a plain CPU ``nn.Linear``.
    It watches the base's tensors and ``watched`` (the parameters the pools were copied from) and declines a call
    once any of them changed; :func:`bound_applies` covers what it cannot see (hooks, replaced tensors). ``ranks``
    (int64 [N], or None where every LoRA has rank r): each LoRA's own rank in a stack padded to r, whose padding the
    kernel then skips."""
    ext = load()
    if ext is None or type(base) is not torch.nn.Linear or base.weight.device.type != "cpu":
        return None
    own = [t for t in (base.weight, base.bias) if t is not None]
    return ext.ModuleCall(base.weight, NONE if base.bias is None else base.bias, router, a, bt, *tables, r, kmax,
                          [*own, *watched], NONE if ranks is None else ranks)


def base_key(base) -> tuple:
    """What a bound call depends on beyond the tensors it watches: the base module and its parameter objects."""
    return (base, base._parameters.get("weight"), base._parameters.get("bias"))


def bound_applies(base, key: tuple) -> bool:
    """True when a call bound for ``key`` (:func:`base_key`) may stand in for ``base`` now: the same module and
    parameter objects, no forward hooks on it, and not inside :func:`disabled`. On every module call: a few lookups."""
    params = base._parameters
    return (base is key[0] and params["weight"] is key[1] and params.get("bias") is key[2]
            and not (base._forward_hooks or base._forward_pre_hooks or getattr(_off, "on", False)))


def for_input(x) -> object | None:
    """The compiled kernels when they apply to ``x`` (a CPU float32/bfloat16 tensor, no autograd needed), else None.

    On every module call of a forward, so kept to a few attribute reads.
    """
    if not x.is_cpu or x.dtype not in _DTYPES or getattr(_off, "on", False) or (x.requires_grad and torch.is_grad_enabled()):
        return None
    module = _state.get("module", _MISSING)
    return load() if module is _MISSING else module


def dot_gemm(dtype: torch.dtype = torch.float32) -> bool:
    """True when the base GEMM of ``dtype`` (:func:`linear`, the fused module call) is the compiled dot-product kernel,
    whose row outputs do not depend on the batch: float32 with AVX-512 or AVX2 + FMA (below ``load().ONEDNN_F32_FROM`` rows),
    bfloat16 with AVX512-BF16 (below ``load().DOT_BF16_BELOW`` rows); oneDNN's GEMM above. False without the kernels
    or those instructions (float32 then runs MKL, bfloat16 ATen's oneDNN GEMM)."""
    ext = load()
    return ext is not None and ext.dot_gemm(dtype == torch.bfloat16)


def set_batch_invariant(on: bool) -> bool:
    """Batch-invariant mode of this process's compiled base GEMMs (:func:`linear`, the fused module call; the serving
    engine sets it before each forward from its ``batch_invariant`` setting): the dot-product kernel (or AMX tiles) at
    every row count instead of oneDNN's GEMM for large calls, so where :func:`dot_gemm` is True a row's outputs never
    depend on how many rows share the call. Returns the previous setting (False without the kernels)."""
    ext = load()
    return bool(ext is not None and ext._batch_invariant(on))


def amx_bf16() -> bool:
    """True when bfloat16 base GEMMs run on AMX tiles (an Intel CPU with AMX-BF16, Sapphire Rapids or later, and a Linux
    that grants the tile state): for weights of whole tiles (inputs a multiple of 32, outputs of 16) below
    ``load().DOT_BF16_BELOW`` rows, in place of the AVX512-BF16 dot-product kernel; a row's outputs still the same in any
    batch (:func:`dot_gemm` stays True). ``REMIX_DISABLE_AMX=1`` in the environment (read once per process) turns it off:
    the AVX512-BF16 kernel then runs, for comparisons."""
    ext = load()
    return ext is not None and ext.amx_bf16()


# the kinds of op the decode stack's clock times, in its order (``StackOp`` in the C++ source)
STACK_OPS = ("norms", "qkv", "rotary", "kv_write", "attention", "o_proj", "gate", "up", "act", "down")


def stack_clock(on: bool) -> tuple[dict[str, float], int]:
    """The compiled decode stack's (``DecodeStack``) time in each kind of op since the last call, in milliseconds by
    :data:`STACK_OPS` name (norms: both RMSNorms of a layer with their residual adds; act: ``silu(gate) * up``;
    where a step of few rows runs a routed gate, up and act in one region, all three on gate; each op from the end
    of the one before it, so they add up to the stack's whole run), and the number of runs (decode steps) they
    cover; resets both, then switches the clock on (or off). ({}, 0) without the kernels."""
    ext = load()
    if ext is None:
        return {}, 0
    ns, runs = ext.stack_clock(on)
    return {name: v / 1e6 for name, v in zip(STACK_OPS, ns)}, runs


# the stages the module clock times, in its order (``ModuleStage`` in the C++ source)
MODULE_STAGES = ("route", "wait_1", "pairs_pack", "phase_a", "wait_2", "gemm", "phase_b")


def module_clock(on: bool) -> tuple[list[dict[str, float]], int]:
    """The compiled module calls' (``run`` in the C++ source: routing, gather and, where fused, the base GEMM) time
    per thread of their parallel regions and per :data:`MODULE_STAGES` stage since the last call, in milliseconds
    (one dict a thread that ran, in thread order; each stage from the end of the one before it, so a thread's stages
    add up to its time in the calls; ``wait_1`` / ``wait_2`` are the barriers, ``pairs_pack`` the pairs' sort and x
    packed for AMX tiles), and the number of calls they cover; resets both, then switches the clock on (or off).
    Below 64 rows a call splits each stage between the threads; from 64 each thread routes and gathers its own
    tokens, tile by tile. A call that routes no token takes the base linear alone and is not counted, nor is the
    decode stack's gate-and-up pair of small steps (``run_pair``). A developer's tool: one caller at a time (the
    counters are plain globals). ([], 0) without the kernels."""
    ext = load()
    if ext is None:
        return [], 0
    ns, calls = ext.module_clock(on)
    if len(ns[0]) != len(MODULE_STAGES):
        raise RuntimeError(f"the kernels' module clock has {len(ns[0])} stages, MODULE_STAGES names {len(MODULE_STAGES)}")
    return [{name: v / 1e6 for name, v in zip(MODULE_STAGES, row)} for row in ns if any(row)], calls


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads():
    """libgomp's omp_set_num_threads (the runtime torch loaded: dlopen finds it by its soname), or None."""
    import ctypes

    try:
        return ctypes.CDLL("libgomp.so.1").omp_set_num_threads
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (up to 15 bytes) where the OS shows thread names (Linux: ``top -H``, ``ps -L``,
    /proc/PID/task/TID/comm, which server.bench_live reads to find the server's HTTP thread). Best effort."""
    from remix.kernels.cpu_alloc import _libc

    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def single_threaded_here() -> bool:
    """From now on this thread's parallel regions (torch's CPU ops and the compiled kernels alike) run on this thread
    alone; other threads keep their own count. For work off the engine's thread, such as reading an adapter beside
    the steps: a thread that opens a region of two or more threads gets a pool of OpenMP workers of its own, and with
    more OpenMP threads than CPUs, GNU OpenMP stops spinning between regions, so every region of every later step
    wakes its workers from sleep (the engine's decode steps took 1.6-1.8x as long on the 2-vCPU VMs:
    server.engine.Engine.run_here). True where done (GNU OpenMP found), False elsewhere."""
    fn = _omp_set_num_threads()
    if fn is None:
        return False
    torch.get_num_threads()  # torch's own first-use set-up of this thread's count, which would set it back
    fn(1)
    return True


def thread_shares(threads: int | None = None) -> list[float] | None:
    """Each thread's share now of the work the compiled kernels split by speed (a GEMM's outputs, the decode attention's
    rows; in thread order, summing to 1): even, until each thread's timed GEMM slices have shown one slower than the
    other by 8 % or more for two windows of 128 parallel regions in a row - a vCPU whose host core another guest
    shares, say. Then each thread's share follows its measured speed (within half to one and a half of an even share).
    Which thread computes what never changes a value. Even throughout with ``REMIX_SPLIT_ADAPT=0`` in the environment.
    ``threads``: the team's size when even (default: torch's threads as this thread sees them). None without the
    compiled kernels."""
    ext = load()
    if ext is None:
        return None
    shares = list(ext._split_state())
    if not shares:
        n = max(1, threads or torch.get_num_threads())
        shares = [1.0 / n] * n
    return [round(v, 4) for v in shares]


def pool_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the compiled kernel keeps a model's ReMix pools (A and B) in: bfloat16 for a bfloat16 model (widened as
    they are read, every sum in float32: half the bytes a decode step reads), else float32. Routers stay float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


_MISSING = object()
_DTYPES = (torch.float32, torch.bfloat16)
NONE = torch.empty(0, dtype=torch.int64)  # for route_gather_'s optional tensors: no slot map (all slot 0), no counts
NONE_F = torch.empty(0, dtype=torch.float32)  # linear's "no bias", add_rms_norm_'s "no residual" (any dtype when empty)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the compiled kernels' base GEMM where it applies (CPU float32 or bfloat16, contiguous weight, no
    autograd): each thread its own slice of the outputs, with AVX-512 or AVX2 by the dot-product kernel (see BaseGemm in the
    source: the default base's float32 linears at batch 1 / 32 in 0.39 / 0.52 of ATen's time on the AMD Zen 5 VM,
    a row's outputs the same in any batch - :func:`dot_gemm` says which), else MKL; bfloat16 below 128 rows with
    AVX512-BF16 (1.7x oneDNN's GEMV at one row), else ATen's; elsewhere plain ``F.linear``. The kernel bench times
    both (base / base_aten) and measures the ReMix module against the faster."""
    ext = for_input(x)
    if ext is None or (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))):
        return torch.nn.functional.linear(x, weight, bias)
    return ext.linear(x, weight, NONE_F if bias is None else bias)

