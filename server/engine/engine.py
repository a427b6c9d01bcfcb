"""The engine: continuous batching of many ReMix adapters over one frozen base.

Contract (driven by the HTTP layer from another thread, mlx-lm/TGI style):
    engine.submit(request, callback)  -> queues it (raises EngineError subclasses for bad input / full queue)
    callback(Event)                   <- called on the engine thread for every new token and at the end
    engine.cancel(request_id)         -> frees its sequences' cache at the next step boundary; each sequence not
                                         yet finished (or not yet started) gets a final event, "cancelled"
    engine.step()                     -> one scheduling step (the thread calls it in a loop; tests may call it)

Each step: admit waiting requests into free cache slots (taking the longest prefix of each prompt that some slot
already holds: server.engine.prefix); one decode forward for every decoding sequence ([b, 1]; with speculative
decoding, [b, 1 + d]: each greedy sequence's next input and its prompt-lookup draft, checked: server.engine.speculative);
one chunked-prefill forward for prompts (under a token budget per step); sample; stream; free finished sequences; keep
decoding slots contiguous so attention reads cache views.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from remix.adapter import AdapterError
from remix.kernels import cpu_ext, tune_cpu_allocator
from server.engine.cache import KV_DTYPES, SlotKVCache
from server.engine.grammar import GrammarError, Grammars
from server.engine.prefix import BLOCK, PrefixIndex, chain
from server.engine.registry import AdapterRegistry
from server.engine.runner import ModelRunner
from server.engine.sampler import first_argmax, sample, token_logprobs
from server.engine.speculative import SCHEDULES, DraftPolicy, DraftStats, NgramIndex
from server.engine.sequence import Event, GenerationRequest, Sequence, Status, decoder, prefix_owner, update_text

log = logging.getLogger(__name__)


class EngineError(Exception):
    status = 400
    code = "invalid_request"
    param: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class QueueFull(EngineError):
    status, code = 429, "queue_full"


class UnknownAdapter(EngineError):
    status, code, param = 404, "model_not_found", "model"


class ShuttingDown(EngineError):
    status, code = 503, "shutting_down"


class AdaptersBusy(EngineError):
    """An adapter to load on demand, and every loaded one that could make room for it in use."""
    status, code, param = 429, "adapter_limit", "model"


class EngineStopped(EngineError):
    """The engine's thread ended on an error no step handler caught: nothing queued now would ever run."""
    status, code = 503, "engine_stopped"


# why an accepted request ended with an error event (``Event.error_code``; its ``error`` says it in words)
INTERNAL_ERROR = "internal_error"  # generating failed (the step, its sampling or emitting; the log has the traceback)
INTERNAL_MESSAGE = "internal error while generating"
ROOM_WANT_S = 2.0  # an adapter waiting for room (Engine._want_room) stops wanting it unless asked again within this
GIVE_WAY_AFTER_S = 1.0  # ... and makes another give way only once it has waited this long for one to fall idle
HOLD_S = 2.0  # an adapter ensured for a request on its way (ensure_adapter(hold=True)) is not unloaded to make room
# until that request is submitted, or this long has passed
ENGINE_STOPPED = EngineStopped.code  # the engine thread ended
ADAPTER_GONE = UnknownAdapter.code  # its adapter was removed before it started


@dataclass
class EngineConfig:
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    max_num_seqs: int = 32  # running sequences (cache slots)
    max_queue: int = 256  # waiting requests before 429
    max_adapters: int = 0  # adapters loaded at once (0: no limit); a load past it is refused
    max_batched_tokens: int = 512  # tokens per step (decode rows + prefill chunk)
    max_prefill_chunk: int = 512  # longest prefill chunk per sequence per step (its spare positions in each cache slot)
    kv_budget_bytes: int = 4 << 30  # KV cache memory; slots = min(max_num_seqs, budget / bytes per slot)
    decoder: str = "lean"  # "lean" | "exact" | "hf": how the decoder stack runs (see server.engine.fastpath)
    cuda_graphs: bool = True  # on CUDA, replay decode steps from captured graphs (see server.engine.graphs)
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) | "int8" (CPU; see server.engine.cache)
    prefix_caching: bool = True  # reuse the K/V of prompt prefixes that cache slots hold (server.engine.prefix)
    batch_invariant: bool = False  # CPU, lean decoder: the compiled GEMM at every size (no row depends on its step)
    # speculative decoding by prompt lookup (server.engine.speculative): up to this many draft tokens a greedy sequence
    # per step (0: off), from n-grams of min..max tokens, in steps of at most speculative_max_seqs decoding sequences
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    speculative_max_seqs: int = 8
    # "cost": each sequence's draft as long as its tokens are worth their time (speculative.DraftPolicy);
    # "constant": num_speculative_tokens wherever an n-gram matches (HF's "constant" schedule)
    speculative_schedule: str = "cost"


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        tune_cpu_allocator()
        self._threads = torch.get_num_threads()  # (the steps' team, as set where the engine is built: thread_shares)
        self._home = threading.current_thread()  # (the thread that built it, normally the one that loaded the model)
        self.config = cfg = config or EngineConfig()
        self.tokenizer = tokenizer
        # ids -> text, for each new token (incremental detokenization): special tokens left out, or (vLLM's
        # skip_special_tokens false) kept
        self._decoders = {True: decoder(tokenizer), False: decoder(tokenizer, skip_special_tokens=False)}
        mc = model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        dtype = next(model.parameters()).dtype
        if cfg.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {cfg.kv_cache_dtype!r}")
        kv_dtype = torch.int8 if cfg.kv_cache_dtype == "int8" else None
        if kv_dtype is not None and next(model.parameters()).device.type != "cpu":
            raise ValueError("kv_cache_dtype int8 runs on CPU only (its kernels are CPU kernels)")
        if cfg.num_speculative_tokens < 0 or cfg.speculative_max_seqs < 1:
            raise ValueError("num_speculative_tokens must be >= 0 and speculative_max_seqs >= 1")
        if cfg.num_speculative_tokens:
            NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max)  # checks the n-gram sizes
        if cfg.speculative_schedule not in SCHEDULES:
            raise ValueError(f"speculative_schedule must be one of {', '.join(SCHEDULES)}, got {cfg.speculative_schedule!r}")
        if cfg.batch_invariant:
            why = batch_invariant_unsupported(next(model.parameters()).device, dtype, cfg.decoder)
            if why:
                raise ValueError(f"batch_invariant: {why}")
        per_token = SlotKVCache.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, head_dim, dtype, kv_dtype)
        slots = min(cfg.max_num_seqs, max(1, cfg.kv_budget_bytes // (per_token * (cfg.max_model_len + cfg.max_prefill_chunk))))
        if slots < cfg.max_num_seqs:  # (the server's --kv-memory-gb caps what --max-num-seqs asked for)
            log.warning("the KV cache budget (%.2f GiB) holds %d sequences of %d + %d tokens, not the %d asked for: "
                        "raise --kv-memory-gb or lower --max-model-len to run more at once", cfg.kv_budget_bytes / 2**30,
                        slots, cfg.max_model_len, cfg.max_prefill_chunk, cfg.max_num_seqs)
        self.runner = ModelRunner(model, slots, cfg.max_model_len, cfg.max_prefill_chunk, decoder=cfg.decoder,
                                  cuda_graphs=cfg.cuda_graphs, kv_dtype=kv_dtype, batch_invariant=cfg.batch_invariant)
        self.registry = AdapterRegistry(self.runner, reserve=cfg.max_adapters)
        self.num_slots = slots
        self.slot_seq: list[Sequence | None] = [None] * slots
        self.prefix = PrefixIndex(slots) if cfg.prefix_caching else None
        self.waiting: collections.deque[tuple[GenerationRequest, object]] = collections.deque()
        self.prefilling: list[Sequence] = []  # FIFO
        self.decoding: list[Sequence] = []
        self.requests: dict[str, list[Sequence]] = {}
        self._cancels: set[str] = set()
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loading = threading.Lock()  # adapter loads, one at a time
        self.adapter_events = {"loads_on_demand": 0, "evictions": 0}  # since start (Engine.ensure_adapter)
        self._room_wanted: dict[str, tuple[float, float]] = {}  # adapter to load on demand -> (since when, until
        # when) it waits for room (engine thread; see _want_room)
        self.stopped_by: str | None = None  # the error that ended the engine thread, if one did (then 503s)
        self._running = False
        self.accepting = True
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self._grammars: Grammars | None = None  # structured output's compiler, made on first use
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            self.eos_ids |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos)
        self.steps = 0
        self.last_step = {"decode_rows": 0, "prefill_tokens": 0, "draft_tokens": 0, "accepted_tokens": 0}
        self.spec_totals = {"draft_tokens": 0, "accepted_tokens": 0, "steps": 0}  # speculative decoding, since start
        self.draft_policy = DraftPolicy(constant=cfg.speculative_schedule == "constant")  # each draft's length

    # -- public, thread-safe -----------------------------------------------------------------------
    def submit(self, request: GenerationRequest, callback) -> None:
        """Validate and queue a request. Raises EngineError (400/404/429/503) without queueing it."""
        p = request.params
        if self.stopped_by is not None:
            raise EngineStopped(f"the engine has stopped ({self.stopped_by}); the server needs a restart")
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        adapter = None
        if request.adapter is not None:
            adapter = self.registry.adapters.get(request.adapter)
            if adapter is None or adapter.unloading:
                raise UnknownAdapter(f"the model {request.adapter!r} does not exist")
            adapter.last_used = time.monotonic()
        vocab = self.runner.model.config.vocab_size
        if bad := p.problems(vocab):
            raise EngineError("; ".join(message for _, message in bad), bad[0][0])
        if not request.prompt_ids:
            raise EngineError("the prompt is empty", "prompt")
        if any(not (0 <= t < vocab) for t in request.prompt_ids):
            raise EngineError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(request.prompt_ids) > self.config.max_model_len:  # (the prompt alone: max_tokens is not to blame)
            raise EngineError(f"this model's maximum context length is {self.config.max_model_len} tokens; the prompt "
                              f"has {len(request.prompt_ids)}", "prompt", "context_length_exceeded")
        if len(request.prompt_ids) + p.max_tokens > self.config.max_model_len:
            raise EngineError(
                f"this model's maximum context length is {self.config.max_model_len} tokens; the prompt has "
                f"{len(request.prompt_ids)} and max_tokens is {p.max_tokens}", "max_tokens", "context_length_exceeded")
        if p.n > self.num_slots:
            raise EngineError(f"n must be at most {self.num_slots} here", "n")
        if p.grammar is not None and p.compiled_grammar is None:  # (the HTTP layer compiles it before, off the loop)
            p.compiled_grammar = self.compile_grammar(*p.grammar)
        with self._lock:
            if request.request_id in self.requests or any(r.request_id == request.request_id for r, _ in self.waiting):
                raise EngineError(f"duplicate request id {request.request_id}")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests); retry later")
            at = len(self.waiting)  # behind every waiting request of the same or a lower (earlier) priority
            while at > 0 and self.waiting[at - 1][0].priority > request.priority:
                at -= 1
            self.waiting.insert(at, (request, callback))
            if adapter is not None and request.held and adapter.holds > 0:  # (arrived: waiting, it is not idle)
                adapter.holds -= 1
        self._wake.set()

    def compile_grammar(self, kind: str, spec, param: str = "response_format"):
        """A request's grammar (server.engine.grammar.KINDS), compiled for this tokenizer; EngineError (400, naming
        ``param``) when it cannot be. Thread-safe: the HTTP layer calls it off the engine's thread, before submit."""
        try:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.runner.model.config.vocab_size, self.eos_ids)
            return self._grammars.compile(kind, spec, param)
        except GrammarError as e:
            raise EngineError(str(e), param) from None

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)
        self._wake.set()

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the engine thread between steps (or now, if no thread); returns its result."""
        if self._thread is None or not self._thread.is_alive() or self._thread is threading.current_thread():
            return fn(*args)
        future: Future = Future()
        self._commands.put((fn, args, future))
        self._wake.set()
        return future.result()

    def load_adapter(self, name: str, path: str, check_fingerprint: bool = True):
        """Validate and stack an adapter between steps: AdapterError lists every problem with it; an EngineError
        (adapter_limit) where max_adapters are loaded already, before anything is read."""
        with self._loading:  # (one load at a time: a load's checks read the modules another's install may wrap)
            self._check_room()
            if name in self.registry.adapters:  # (before reading it; checked again where it is stacked)
                raise AdapterError(path, [f"an adapter named {name!r} is already loaded"])
            self._single_threaded_off_loop()
            prepared = self.registry.prepare(path, check_fingerprint)  # (read and checked here: the engine goes on)

            def install():
                try:  # (an idle adapter loaded on demand gives way; one loaded like this one stays)
                    self._make_room()
                except AdaptersBusy:
                    raise self._limit_error() from None
                return self.registry.install(name, path, prepared)

            return self.call(install)

    def _single_threaded_off_loop(self) -> None:
        """A thread other than the running engine loop's that is about to read an adapter (torch ops over its tensors
        and the base's, for the fingerprint) opens its parallel regions alone from now on: a pool of OpenMP workers
        of its own would slow every later step (cpu_ext.single_threaded_here). Not the thread that built the engine
        (its pool is there already) or the loop's."""
        here = threading.current_thread()
        if here is not self._home and here is not self._thread and self.runner.device.type == "cpu":
            cpu_ext.single_threaded_here()

    def ensure_adapter(self, name: str, path: str, hold: bool = False) -> None:
        """``name`` loaded from ``path`` unless it is already (on-demand loading: a request names an adapter of the
        server's folder). Where ``max_adapters`` are loaded, the least recently used on-demand adapter that no
        running or waiting request uses (or one being unloaded) is unloaded first. Where none is idle: AdaptersBusy,
        and the least recently used on-demand adapter gives way (:meth:`_want_room`) so that the caller, asking again,
        finds room once that one's running requests finish; while ``name`` itself gives way, AdaptersBusy too.
        AdapterError lists what is wrong with the adapter.

        ``hold``: a request for it is on its way (the HTTP layer's): until it is submitted (with ``held``) or HOLD_S
        has passed, the adapter is not idle, so no other waiter unloads it in between. (Under contention a waiter for
        another adapter took the adapter just loaded, idle until its request came, and that request found it gone,
        three times over: a 404.)"""
        with self._loading:
            self._ensure(name, path)
            if hold:
                with self._lock:
                    adapter = self.registry.adapters[name]
                    now = time.monotonic()
                    adapter.holds = adapter.holds + 1 if adapter.held_until > now else 1
                    adapter.held_until = now + HOLD_S

    def _ensure(self, name: str, path: str) -> None:
        """(ensure_adapter's work, under self._loading.)"""
        adapter = self.registry.adapters.get(name)
        if adapter is not None:
            if adapter.giving_way:
                self.call(self._lift_giving_way)  # (where no adapter wants room any more, though no step ran)
                if adapter.giving_way:
                    raise AdaptersBusy(f"the adapter {name!r} is giving way to another that waits for room "
                                       f"(--max-adapters {self.config.max_adapters}); retry shortly")
            if adapter.unloading:  # (being unloaded through the API: wanted again)
                def revive():
                    adapter.unloading = False
                    adapter.last_used = time.monotonic()
                self.call(revive)
            return
        self.call(self._want_room, name)  # (before reading it: a caller that waits for room reads nothing)
        self._single_threaded_off_loop()
        prepared = self.registry.prepare(path)

        def install():
            self._make_room()
            loaded = self.registry.install(name, path, prepared)
            loaded.evictable, loaded.last_used = True, time.monotonic()
            self._room_wanted.pop(name, None)
            self.adapter_events["loads_on_demand"] += 1
            log.info("loaded adapter %s from %s on demand", name, path)

        self.call(install)

    def _idle_adapters(self) -> list[LoadedAdapter]:
        """Adapters that may be unloaded now to make room: loaded on demand (or being unloaded through the API), and
        no running or waiting request uses them."""
        now = time.monotonic()
        with self._lock:
            waiting = {r.adapter for r, _ in self.waiting}
            held = {a.name for a in self.registry.adapters.values() if a.holds > 0 and a.held_until > now}
        return [a for a in self.registry.adapters.values()
                if (a.evictable or a.unloading) and a.active <= 0 and a.name not in waiting and a.name not in held]

    def _want_room(self, name: str) -> None:
        """(Engine thread.) Return where ``name`` could be loaded now (making room where an idle adapter can give
        it); else note that it wants room (for
        ROOM_WANT_S, renewed as its waiter asks again) and raise AdaptersBusy. Once an adapter has wanted room for
        GIVE_WAY_AFTER_S with none falling idle, as many on-demand adapters give way as such adapters want room (the
        least recently used first: they take no new requests, their running ones finish, then they are idle).
        Without this, steady traffic to the loaded adapters kept every one of them in use, and a request for another
        waited its whole 30 s for a 429; the grace spares the adapter that would give way where one falls idle anyway
        (its new requests would wait for their turn)."""
        try:  # room made now, while one is idle, not after reading the adapter (by then a new request may be using
            self._make_room()  # it again: a waiter had to find one idle twice)
            return
        except AdaptersBusy:
            pass
        cap, now = self.config.max_adapters, time.monotonic()
        since = self._room_wanted.get(name, (now, 0.0))[0]
        self._room_wanted[name] = (since, now + ROOM_WANT_S)
        self._expire_wants(now)
        giving = [a for a in self.registry.adapters.values() if a.giving_way]
        candidates = sorted((a for a in self.registry.adapters.values() if a.evictable and not a.giving_way),
                            key=lambda a: a.last_used)
        overdue = sum(now - w[0] >= GIVE_WAY_AFTER_S for w in self._room_wanted.values())
        for a in candidates[: max(0, overdue - len(giving))]:
            a.giving_way = True
            log.info("adapter %s gives way: %d adapters are loaded (--max-adapters %d) and another waits for room",
                     a.name, len(self.registry.adapters), cap)
        if not candidates and not giving:
            raise AdaptersBusy(f"{len(self.registry.adapters)} adapters are loaded (--max-adapters {cap}), none of "
                               "them loaded on demand, so none can make room; retry later")
        raise AdaptersBusy(f"{len(self.registry.adapters)} adapters are loaded (--max-adapters {cap}) and those that "
                           "can make room are in use: the least recently used gives way (after "
                           f"{GIVE_WAY_AFTER_S:g} s) once its requests finish; retry shortly")

    def _lift_giving_way(self) -> None:
        """(Each step, while an adapter gives way.) Once no adapter wants room any more (its waiters gave up), those
        giving way take requests again."""
        self._expire_wants(time.monotonic())
        if not self._room_wanted:
            for a in self.registry.adapters.values():
                a.giving_way = False

    def _expire_wants(self, now: float) -> None:
        self._room_wanted = {k: w for k, w in self._room_wanted.items() if w[1] > now}

    def _make_room(self) -> None:
        cap = self.config.max_adapters
        while cap and len(self.registry.adapters) >= cap:
            idle = self._idle_adapters()  # (one being unloaded through the API may go now)
            if not idle:
                raise AdaptersBusy(f"{len(self.registry.adapters)} adapters are loaded (--max-adapters {cap}) and none "
                                   "that was loaded on demand is idle to make room; retry later")
            victim = min(idle, key=lambda a: (not a.giving_way, a.last_used))  # (one giving way first)
            self.registry.remove(victim.name)
            self.adapter_events["evictions"] += 1
            if self.prefix is not None:
                self.prefix.forget(victim.slot)
            log.info("unloaded adapter %s (least recently used) to make room", victim.name)

    def _check_room(self) -> None:
        """Before a load reads anything: room, or an idle adapter loaded on demand that could give way."""
        cap, loaded = self.config.max_adapters, len(self.registry.adapters)
        if cap and loaded >= cap and not any(a.evictable for a in self.registry.adapters.values()):
            raise self._limit_error()

    def _limit_error(self) -> EngineError:
        cap, loaded = self.config.max_adapters, len(self.registry.adapters)
        return EngineError(f"{loaded} adapters are loaded, the most this server holds (--max-adapters {cap}): unload "
                           "one first", "name", "adapter_limit")

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for ``name``; it is removed once its running requests finish."""
        def mark():
            adapter = self.registry.adapters.get(name)
            if adapter is None:
                raise UnknownAdapter(f"the model {name!r} does not exist")
            adapter.unloading = True
            self._reap_adapters()
        self.call(mark)

    @property
    def huge_pages(self) -> dict[str, float]:
        """On CPU, the share of each block a decode step streams (``weights``, ``kv_cache``) that the kernel backed
        with transparent huge pages, read when the engine started; a block left out where it holds no huge page."""
        return {k: round(v, 3) for k, v in self.runner.huge_pages.items()}

    @property
    def thread_shares(self) -> list[float] | None:
        """On CPU with the compiled kernels, each thread's share of the work they split by the threads' measured speed
        (``cpu_ext.thread_shares``: even unless one vCPU has run slower than the other); None elsewhere."""
        return cpu_ext.thread_shares(self._threads) if self.runner.device.type == "cpu" else None

    def stats(self) -> dict:
        used = sum(s.num_computed for s in self.slot_seq if s is not None)
        shares = self.thread_shares
        capacity = self.num_slots * self.config.max_model_len
        return {"engine": "stopped" if self.stopped_by is not None else "running",
                "running": len(self.prefilling) + len(self.decoding), "waiting": len(self.waiting),
                "slots_used": sum(s is not None for s in self.slot_seq), "slots": self.num_slots,
                "kv_tokens_used": used, "kv_tokens_capacity": capacity, "kv_usage": used / capacity, "steps": self.steps,
                "prefix_caching": self.prefix is not None, "batch_invariant": self.config.batch_invariant,
                "adapters_loaded": len(self.registry.adapters),
                "adapters_giving_way": sum(a.giving_way for a in list(self.registry.adapters.values())),
                **{f"adapter_{k}": v for k, v in self.adapter_events.items()},
                **({f"prefix_cache_{k}": v for k, v in self.prefix.stats().items()} if self.prefix is not None else {}),
                **({f"spec_{k}": v for k, v in self.spec_totals.items()} if self.config.num_speculative_tokens else {}),
                **(self._spec_costs() if self.config.num_speculative_tokens else {}),
                "device": str(self.runner.device), "dtype": str(self.runner.dtype).removeprefix("torch."),
                "kv_cache_dtype": str(self.runner.cache.k[0].dtype).removeprefix("torch."),
                "cuda_graphs": self.runner.graphs is not None and not self.runner.graphs.eager,
                **{f"{k}_on_huge_pages": v for k, v in self.huge_pages.items()},
                **({"cpu_thread_shares": shares} if shares is not None else {}),
                "decoder": self.runner.decoder, **({"decoder_fallback": self.runner.decoder_fallback}
                                                   if self.runner.decoder_fallback else {})}

    def _spec_costs(self) -> dict:
        """The draft schedule and, for "cost", what it has measured: a step's cost of checking drafts at all (F) and
        each draft token's (c), in milliseconds (0 until steps with drafts were timed)."""
        fixed, per_token = self.draft_policy.costs()
        return {"spec_schedule": self.config.speculative_schedule, "spec_check_cost_ms": round(fixed * 1e3, 4),
                "spec_draft_token_cost_ms": round(per_token * 1e3, 4)}

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding or self._cancels)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture the decode steps' CUDA graphs now (a no-op without them); the engine thread calls it on start."""
        graphs = self.runner.graphs
        if graphs is not None:
            start = time.perf_counter()
            n = graphs.capture_all()
            if n:
                log.info("captured %d CUDA graphs (batch sizes %s, spans %s) in %.1f s", n, graphs.batches, graphs.spans,
                         time.perf_counter() - start)

    def start(self) -> None:
        """The engine loop on a thread of its own; ``run_here`` runs it on the caller's thread instead, which is what
        a server on CPU should do (see there)."""
        self._prepare()
        self._thread = threading.Thread(target=self._loop, name="remix-engine", daemon=True)
        self._thread.start()

    def run_here(self, until) -> None:
        """The engine loop on the calling thread until ``until()`` is true (checked between steps, and every 50 ms
        while idle) or ``stop()``; submit, cancel and call work from other threads meanwhile, as with ``start``.

        On CPU, run it on the thread that loaded the model (python -m server and server.batch run it on the main
        thread, and their HTTP side on another). The compiled kernels' parallel regions are OpenMP's, and GNU OpenMP
        keeps a pool of worker threads for each thread that has opened a region: the loading thread's (its worker
        idle, but counted) and then the engine thread's make more OpenMP threads than CPUs, and there libgomp stops
        spinning between regions - every region of a step then wakes its workers from sleep. On the 2-vCPU VMs of
        this project a decode step took 1.6-1.8x as long on a thread of its own as on the loading thread (one
        sequence 24-26 against 13-14 ms, 32 sequences 46 against 27-28 ms)."""
        self._thread = threading.current_thread()  # (first: what other threads do meanwhile sees the loop's thread)
        try:
            self._prepare()
            self._loop(until)
        finally:
            self._running = False
            self._thread = None

    def _prepare(self) -> None:
        if not self.config.max_adapters:  # room for as many adapters again as start with, made now, before requests
            # run: the loads that follow write only their own pools (past it, a load copies every loaded pool once as
            # the room doubles; --max-adapters makes room for all at the first load)
            for module in self.runner.stacked.values():
                module.stack.make_room(2 * sum(w.n for w in module.stack.slots.values()))
        self.warm_up()
        self._running = True

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, let running requests finish (up to the deadline), then stop the thread."""
        self.accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.has_work() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        with self._lock:
            ids = list(self.requests) + [r.request_id for r, _ in self.waiting]
        for rid in ids:
            self.cancel(rid)
        self._running = False
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self, until=None) -> None:
        try:
            self._serve(until)
        except BaseException as e:  # noqa: BLE001 - whatever ended the thread: said, and nothing left to hang
            self.stopped_by = f"{type(e).__name__}: {e}"
            log.critical("the engine thread stopped: %s; failing every request", self.stopped_by, exc_info=True)
            self._fail_everything("the engine stopped", ENGINE_STOPPED)

    def _fail_everything(self, error: str, code: str) -> None:
        """Every running and waiting request ends with an error event (best effort: the engine's state may be bad)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for r, cb in waiting:
            self._end_unstarted(r, cb, "error", error, code)
        self._fail(list(self.prefilling) + list(self.decoding), error, code)

    def _fail(self, seqs: list[Sequence], error: str = INTERNAL_MESSAGE, code: str = INTERNAL_ERROR) -> None:
        """Each of ``seqs`` not yet finished ends with an error event, each on its own (one that cannot be ended - the
        bookkeeping may be what broke - does not keep the others from it)."""
        for seq in seqs:
            if seq.status is Status.FINISHED:
                continue
            try:
                seq.finish_reason = "error"
                self._finish(seq, error=error, error_code=code)
            except Exception:
                log.exception("request %s: could not be ended", seq.request.request_id)

    def _contain(self, seqs: list[Sequence], what: str, forward: bool = False) -> None:
        """After ``what`` failed for ``seqs`` alone (logged here with the traceback being handled): those of them still
        running end with an error and the rest of the step goes on. Where a forward may have failed (``forward``) the
        prefix cache forgets what it held: one that failed half-way may have written anywhere it was given. (A
        sequence that failed after its forward holds keys and values as valid as a finished one's.)"""
        ids = sorted({s.request.request_id for s in seqs})
        log.exception("%s failed; ending %d sequence(s) of request(s) %s, the others go on", what, len(seqs),
                      ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else ""))
        self._fail(seqs)
        if forward and self.prefix is not None:
            self.prefix.forget()

    def _serve(self, until=None) -> None:
        while self._running and not (until is not None and until()):
            self._run_commands()
            if not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception:  # never die: fail the running requests, keep serving
                self._contain(list(self.prefilling) + list(self.decoding), "an engine step", forward=True)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                future.set_exception(e)

    def step(self) -> None:
        self._run_commands()
        self._apply_cancels()
        if self.prefix is not None and (self.waiting or self.prefilling):  # what seating and planning will match against
            self._refresh_prefix()
        self._admit()
        decode = sorted(self.decoding, key=lambda s: s.slot)
        drafts = self._propose(decode)
        drafted = sum(map(len, drafts)) if drafts else 0
        prefill = self._plan_prefill(self.config.max_batched_tokens - len(decode) - drafted)
        accepted = 0
        # a failure inside one of the step's two forwards ends that forward's sequences only (each sequence's own
        # sampling and emitting fails it alone: _sample_and_emit); anything else that fails ends every running one
        if decode:
            start = time.perf_counter()
            try:
                if drafted:
                    accepted = self._run_verify(decode, drafts)
                else:
                    self._run_decode(decode)
            except Exception:
                self._contain(decode, "the decode step", forward=True)
            if self.config.num_speculative_tokens:
                self.draft_policy.observe_step(len(decode), drafted, time.perf_counter() - start)
        if prefill:
            try:
                self._run_prefill(prefill)
            except Exception:
                self._contain([s for s, _ in prefill], "the prefill step", forward=True)
        self.last_step = {"decode_rows": len(decode), "prefill_tokens": sum(c for _, c in prefill),
                          "draft_tokens": drafted, "accepted_tokens": accepted}
        self._arrange()
        self._reap_adapters()
        if self._room_wanted:
            self._lift_giving_way()
        self.steps += 1

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, set()
            dropped = [(r, cb) for r, cb in self.waiting if r.request_id in cancels] if cancels else []
            if dropped:
                self.waiting = collections.deque((r, cb) for r, cb in self.waiting if r.request_id not in cancels)
        for r, cb in dropped:
            self._end_unstarted(r, cb, "cancelled")
        for rid in cancels:
            for seq in list(self.requests.get(rid, [])):
                if seq.status is not Status.FINISHED:
                    seq.finish_reason = "cancelled"
                    self._finish(seq)
        if cancels:
            self._arrange()

    @staticmethod
    def _end_unstarted(request: GenerationRequest, callback, reason: str, error: str | None = None,
                       error_code: str | None = None, first: int = 0) -> None:
        """A request that ends before any of its sequences started (``first``: before those from this choice on
        started): each of those choices still gets its final event."""
        for index in range(first, request.params.n):
            try:
                callback(Event(request.request_id, index, [], "", [], True, reason, len(request.prompt_ids), 0,
                               error=error, error_code=error_code))
            except Exception:  # a broken consumer must not take the engine down
                log.exception("request %s: callback failed", request.request_id)

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.slot_seq) if s is None]
        while True:
            with self._lock:
                if not self.waiting or len(free) < self.waiting[0][0].params.n:
                    return
                request, callback = self.waiting.popleft()
            try:
                seated = self._seat_request(request, callback, free)
            except Exception:  # (its prefix match or cache copy): this request ends, the running ones go on
                self._fail_admission(request, callback)
                seated = False
            if seated:
                self._arrange()
            free = [i for i, s in enumerate(self.slot_seq) if s is None]

    def _seat_request(self, request: GenerationRequest, callback, free: list[int]) -> bool:
        """Seat a request's n sequences in free slots (with what the prefix cache holds of its prompt); False where
        it ended instead (its adapter was removed while it waited)."""
        slot = -1
        if request.adapter is not None:
            adapter = self.registry.adapters.get(request.adapter)
            if adapter is None:  # accepted requests of an unloading adapter still run; a removed one cannot
                self._end_unstarted(request, callback, "error", "adapter was unloaded", ADAPTER_GONE)
                return False
            slot = adapter.slot
        seqs = self.requests[request.request_id] = []  # (filled as they are seated: a failure ends those seated)
        # (a traced request, or one that wants its prompt's log-probabilities, computes its whole prompt)
        computes_all = request.trace or request.params.prompt_logprobs is not None
        hashes = (chain(request.prompt_ids, prefix_owner(slot, request.cache_salt))
                  if self.prefix is not None and not computes_all else None)
        for index in range(request.params.n):
            gen = None
            if not request.params.greedy:
                seed = request.params.seed + index if request.params.seed is not None else random.getrandbits(63)
                gen = torch.Generator().manual_seed(seed)
            seq = Sequence(request, index, slot, callback, gen)
            seq.hashes = hashes
            if self.prefix is None:
                seq.slot = free.pop(0)
            else:
                self._seat(seq, free)
            self.slot_seq[seq.slot] = seq
            seqs.append(seq)
            self.prefilling.append(seq)
            if request.adapter is not None:  # (each seated sequence holds its adapter; released in _release)
                self.registry.adapters[request.adapter].active += 1
        return True

    def _fail_admission(self, request: GenerationRequest, callback) -> None:
        """Seating ``request`` failed: its seated sequences end with an error (each giving back its slot and its
        adapter reference), and so do the choices not seated yet; the prefix cache forgets what it held (a copy may
        have stopped half-way). Logged with the traceback being handled."""
        log.exception("admitting request %s failed; it ends, the others go on", request.request_id)
        seated = self.requests.pop(request.request_id, [])
        self._fail(seated)
        self._end_unstarted(request, callback, "error", INTERNAL_MESSAGE, INTERNAL_ERROR, first=len(seated))
        if self.prefix is not None:
            self.prefix.forget()

    def _refresh_prefix(self) -> None:
        """Tell the prefix index what the running sequences have computed since (new complete blocks); once a step,
        before seating and planning (sequences seated in the step tell it themselves)."""
        for slot, s in enumerate(self.slot_seq):
            if s is not None:
                self.prefix.hold(slot, s.prompt_ids, s.output_ids, s.prefix_owner, s.num_computed)

    def _seat(self, seq: Sequence, free: list[int]) -> None:
        """Give a new sequence a free slot, with the longest prefix of its prompt that a slot holds: the free slot that
        holds it when it holds nothing more (nothing to copy), else the least recently freed other one, into which the
        prefix is copied (a finished chat's whole history stays for its next turn while others reuse its system
        prompt)."""
        prompt = seq.prompt_ids
        donor, length = -1, 0
        if seq.hashes is not None:  # (a traced request computes its whole prompt: its trace counts every token)
            self.prefix.queries += 1
            donor, length = self.prefix.match(seq.hashes, prompt, len(prompt) - 1, prefer=free)
        others = [s for s in free if s != donor]
        if donor in free and (not others or len(self.prefix.blocks[donor]) * BLOCK < length + BLOCK):
            seq.slot = donor
        else:
            seq.slot = self.prefix.victim(others)
        free.remove(seq.slot)
        if length and donor != seq.slot:
            self.runner.cache.move(donor, seq.slot, length)
        keep = length // BLOCK if donor == seq.slot else 0
        self.prefix.hold(seq.slot, prompt, seq.output_ids, seq.prefix_owner, length, keep=keep)
        if length:
            seq.num_computed = seq.cached_tokens = length
            self.prefix.hits += 1
            self.prefix.tokens += length

    def _take_cached(self, seq: Sequence) -> None:
        """A prefilling sequence takes what other slots computed of its prompt since it was seated (a request's n
        sequences, or requests that arrived together with one system prompt: one computes, the others copy)."""
        prompt = seq.prompt_ids
        donor, length = self.prefix.match(seq.hashes, prompt, len(prompt) - 1, prefer=(seq.slot,))
        if length <= seq.num_computed or donor == seq.slot:
            return
        self.runner.cache.move(donor, seq.slot, length, start=seq.num_computed)
        if not seq.cached_tokens:
            self.prefix.hits += 1
        self.prefix.tokens += length - seq.num_computed
        seq.cached_tokens += length - seq.num_computed
        seq.num_computed = length
        self.prefix.hold(seq.slot, prompt, seq.output_ids, seq.prefix_owner, length)

    @staticmethod
    def _waits(seq: Sequence, plan: list[tuple[Sequence, int]]) -> bool:
        """Whether a sequence planned before it in this step computes the block of the prompt it needs next (the same
        tokens under the same adapter): it then waits a step and copies that block instead of computing it too."""
        j = seq.num_computed // BLOCK
        if seq.hashes is None or j >= len(seq.hashes):
            return False
        h = seq.hashes[j]
        return any(s.hashes is not None and j < len(s.hashes) and s.hashes[j] == h
                   and s.num_computed < (j + 1) * BLOCK and s.num_computed + c > j * BLOCK for s, c in plan)

    def _plan_prefill(self, budget: int) -> list[tuple[Sequence, int]]:
        plan, waiting = [], False
        for seq in self.prefilling:
            if budget <= 0:
                break
            if seq.hashes is not None and seq.num_computed < len(seq.prompt_ids) - 1:
                self._take_cached(seq)
                if self._waits(seq, plan):
                    waiting = True
                    continue
            chunk = min(len(seq.prompt_ids) - seq.num_computed, budget, self.config.max_prefill_chunk)
            plan.append((seq, chunk))
            budget -= chunk
        if waiting and plan:  # the planned rows first (a forward runs contiguous slots), the waiting ones after them
            planned = {id(s) for s, _ in plan}
            self.prefilling.sort(key=lambda s: id(s) not in planned)  # stable: FIFO within each group
            self._arrange()
        return plan

    def _run_decode(self, seqs: list[Sequence]) -> None:
        b = len(seqs)
        assert [s.slot for s in seqs] == list(range(b)), "decode rows must occupy slots [0, b)"
        tokens = torch.tensor([[s.next_input()] for s in seqs])
        starts = torch.tensor([s.num_computed for s in seqs])
        trace = any(s.request.trace for s in seqs)
        logits = self.runner.forward(0, tokens, starts, torch.ones(b, dtype=torch.long),
                                     torch.tensor([s.adapter_slot for s in seqs]), trace=trace, decode=True)
        self._collect_trace(seqs, torch.ones(b, dtype=torch.long), trace)
        for s in seqs:
            s.num_computed += 1
        self._sample_and_emit(seqs, logits)

    def _propose(self, seqs: list[Sequence]) -> list[list[int]] | None:
        """Each decoding sequence's draft (server.engine.speculative; empty where it has none or may not take one),
        or None when this step does not speculate: speculation off, more than ``speculative_max_seqs`` sequences (a
        large step is bound by arithmetic, which drafts add to), or a routing trace kept (its counts are the tokens a
        request generated). Drafts stay within max_tokens, max_model_len and, all of them, max_batched_tokens."""
        cfg = self.config
        k = cfg.num_speculative_tokens
        if not k or not seqs or len(seqs) > cfg.speculative_max_seqs or any(s.request.trace for s in seqs):
            return None
        ratio = self.draft_policy.ratio(len(seqs))
        if ratio is None:  # a step without drafts, timed: what draft tokens are weighed against
            return None
        drafts = []
        k = min(k, (cfg.max_batched_tokens - len(seqs)) // len(seqs))  # the step's tokens within max_batched_tokens
        for s in seqs:
            p = s.params
            room = min(k, p.max_tokens - len(s.output_ids) - 1, cfg.max_model_len - s.length - 1)
            if room <= 0:
                drafts.append([])
                continue
            if s.ngrams is None:
                s.ngrams = NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max, s.prompt_ids)
                s.drafts = DraftStats()
            idx = s.ngrams  # its tokens: the prompt and the output up to the last step; the new ones appended
            want = self.draft_policy.length(s.drafts, ratio, room)
            drafts.append(idx.propose(want, s.output_ids[len(idx.tokens) - len(s.prompt_ids):]))
        if not self.draft_policy.worth(len(seqs), [(s.drafts, len(d)) for s, d in zip(seqs, drafts) if d]):
            return None  # the drafts' expected tokens are not worth checking them: a plain step (timed)
        return drafts

    def _run_verify(self, seqs: list[Sequence], drafts: list[list[int]]) -> int:
        """A decode step with drafts: each sequence's next input and its draft in one forward (a chunk of 1 + d
        tokens per row, from its cache slot, as a prefill chunk), then per sequence the token its sampler picks at each
        position (greedy: the argmax; sampled: one draw of its generator a token, as a decode step draws; penalties and
        grammars from its history up to that position), kept up to and including the first that differs from the
        draft (or ends the sequence). A sampled sequence thus gets the
        tokens it would get without speculation (its seed's), and a draft token is accepted with exactly the
        probability the sampler gives it - what rejection sampling accepts a deterministic draft with. The cache keeps the
        rejected positions' keys and values past num_computed, where nothing reads them and the next tokens overwrite
        them. Returns the number of draft tokens accepted."""
        b = len(seqs)
        assert [s.slot for s in seqs] == list(range(b)), "decode rows must occupy slots [0, b)"
        counts = [1 + len(d) for d in drafts]
        tokens = torch.full((b, max(counts)), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for i, (s, d) in enumerate(zip(seqs, drafts)):
            tokens[i, : counts[i]] = torch.tensor([s.next_input(), *d])
        every = [i for i, d in enumerate(drafts) if d]
        logits = self.runner.forward(0, tokens, torch.tensor([s.num_computed for s in seqs]), torch.tensor(counts),
                                     torch.tensor([s.adapter_slot for s in seqs]), every_token=every)
        plain = [i for i, d in enumerate(drafts) if not d]  # sampled as a decode step samples them
        for i in plain:
            seqs[i].num_computed += 1
        if plain:
            self._sample_and_emit([seqs[i] for i in plain], logits[torch.tensor(plain)])
        accepted, vocab = 0, self.runner.model.config.vocab_size
        for i in every:
            try:
                accepted += self._check_draft(seqs[i], drafts[i], self.runner.last_every[i], vocab)
            except Exception:
                self._contain([seqs[i]], "checking a draft")
        totals = self.spec_totals
        totals["draft_tokens"] += sum(counts) - b
        totals["accepted_tokens"] += accepted
        totals["steps"] += 1
        return accepted

    def _check_draft(self, s: Sequence, d: list[int], rows: torch.Tensor, vocab: int) -> int:
        """Emit the tokens ``s`` takes at its draft's positions (``rows``: their logits); the draft tokens accepted."""
        # position by position, the token a decode step would pick there - the same sampler on the same logits
        # with the sequence's own generator (one draw per token it emits, in order) and, where its logits are
        # adjusted, its history up to that token (penalties, min_tokens, a grammar's state) - emitted, up to and
        # including the first that is not the draft's: the tokens (and the draws) of decoding without a draft
        p, took = s.params, 0
        tokens = lps = None
        if p.greedy and not p.adjusts:  # nothing depends on history: every position's argmax (what sample takes
            tokens = first_argmax(rows).tolist()  # for such a row) and log-probabilities at once
            if p.logprobs is not None:
                lps = token_logprobs(rows, torch.tensor(tokens), p.logprobs)
        for j in range(len(d) + 1):
            if tokens is not None:
                token, lp = tokens[j], lps[j] if lps is not None else None
            else:
                row = rows[j : j + 1]
                history = [s.token_history(self.eos_ids, vocab)] if p.adjusts else None
                token = int(sample(row, [p], [s.generator], history)[0])
                lp = token_logprobs(row, torch.tensor([token]), p.logprobs)[0] if p.logprobs is not None else None
            s.num_computed += 1  # the input at position j: its keys and values are the sequence's now
            if self._emit(s, token, lp) or j == len(d) or token != d[j]:
                break
            took += 1  # draft token j was this token: its keys and values (position j + 1) stand too
        self.draft_policy.observe_check(s.drafts, len(d), took)  # what its next drafts' lengths weigh
        return took

    def _run_prefill(self, plan: list[tuple[Sequence, int]]) -> None:
        seqs = [s for s, _ in plan]
        first = seqs[0].slot
        assert [s.slot for s in seqs] == list(range(first, first + len(seqs))), "prefill rows must be contiguous"
        q = max(c for _, c in plan)
        tokens = torch.full((len(plan), q), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for i, (s, c) in enumerate(plan):
            tokens[i, :c] = torch.tensor(s.prompt_ids[s.num_computed : s.num_computed + c])
        counts = torch.tensor([c for _, c in plan])
        trace = any(s.request.trace for s in seqs)
        every = [i for i, s in enumerate(seqs) if s.params.prompt_logprobs is not None]
        logits = self.runner.forward(first, tokens, torch.tensor([s.num_computed for s in seqs]), counts,
                                     torch.tensor([s.adapter_slot for s in seqs]), trace=trace, every_token=every,
                                     prompt=True)
        self._collect_trace(seqs, counts, trace)
        for i in every:
            self._prompt_logprobs(seqs[i], plan[i][1], self.runner.last_every[i])
        done_rows = []
        for i, (s, c) in enumerate(plan):
            s.num_computed += c
            if s.num_computed == len(s.prompt_ids):
                done_rows.append(i)
        if done_rows:
            ready = []
            for i in done_rows:
                s = seqs[i]
                self.prefilling.remove(s)
                if s.params.max_tokens == 0:  # the prompt alone (scored with echo + logprobs): nothing to generate
                    s.finish_reason = "length"
                    self._finish(s)
                    continue
                s.status = Status.DECODE
                self.decoding.append(s)
                ready.append(i)
            if ready:
                self._sample_and_emit([seqs[i] for i in ready], logits[torch.tensor(ready)])

    def _prompt_logprobs(self, seq: Sequence, count: int, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens this chunk's logits predict: position p's logits give token p + 1's
        (the last prompt position's predict the first generated token: sampled, not kept here)."""
        p0, prompt = seq.num_computed, seq.prompt_ids
        if seq.prompt_lps is None:
            seq.prompt_lps = [(prompt[0], None, None)] if p0 == 0 else []
            seq.prompt_rks = ([None] if p0 == 0 else []) if seq.params.prompt_ranks else None
        m = min(count, len(prompt) - 1 - p0)
        if m > 0:
            targets = torch.tensor(prompt[p0 + 1 : p0 + 1 + m])
            scored = token_logprobs(logits[:m], targets, seq.params.prompt_logprobs)
            seq.prompt_lps += [(int(t), lp, alts) for t, (lp, alts) in zip(targets, scored)]
            if seq.prompt_rks is not None:  # (1 + the tokens more likely: the logits order them as the probabilities)
                rows = logits[:m].float()
                chosen = rows.gather(1, targets.view(-1, 1).to(rows.device))
                seq.prompt_rks += ((rows > chosen).sum(1) + 1).tolist()

    def _collect_trace(self, seqs: list[Sequence], counts: torch.Tensor, enabled: bool) -> None:
        """Accumulate per-request selection counts {module: [count per LoRA]} from the step's trace."""
        if not enabled or not self.runner.last_trace:
            return
        q = int(counts.max())
        for module, slot, rows, idx in self.runner.last_trace:
            flat_rows = rows if rows is not None else torch.arange(idx.shape[0])
            owner = flat_rows // q  # which row (sequence) of this forward each routed token belongs to
            for i, s in enumerate(seqs):
                if not s.request.trace or s.adapter_slot != slot:
                    continue
                picked = idx[owner == i].flatten()
                if picked.numel():
                    n = self.runner.stacked[module].stack.slots[slot].n
                    counts_i = torch.bincount(picked, minlength=n).tolist()
                    s.routing_counts = s.routing_counts or {}
                    prev = s.routing_counts.get(module, [0] * n)
                    s.routing_counts[module] = [a + b for a, b in zip(prev, counts_i)]

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each row's token (and log-probabilities), sampled together, then emitted. Where sampling them together
        fails, each row is sampled alone from its generator's state before the try (the same draws, so the same
        tokens: sampling does not depend on batch-mates) and a row that fails alone ends with an error; a sequence
        whose emitting fails (its grammar, stop strings, detokenizing) ends with an error too. The others go on."""
        states = [s.generator.get_state() if s.generator is not None else None for s in seqs]
        try:
            tokens, lps = self._sample(seqs, logits)
        except Exception:
            if len(seqs) == 1:
                self._contain(seqs, "sampling")
                return
            log.exception("sampling %d rows together failed; sampling each alone", len(seqs))
            for s, state in zip(seqs, states):
                if state is not None:
                    s.generator.set_state(state)
            for i, s in enumerate(seqs):
                self._sample_and_emit([s], logits[i : i + 1])
            return
        for i, s in enumerate(seqs):
            try:
                self._emit(s, int(tokens[i]), lps[i] if lps is not None else None)
            except Exception:
                self._contain([s], "emitting a token")

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[torch.Tensor, list | None]:
        """One token per row and, for the rows that ask for them, its log-probabilities (None for the others)."""
        vocab = self.runner.model.config.vocab_size
        history = [s.token_history(self.eos_ids, vocab) if s.params.adjusts else None for s in seqs]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], history)
        want_lp = [s.params.logprobs is not None for s in seqs]
        if not any(want_lp):
            return tokens, None
        lps = token_logprobs(logits, tokens, max((s.params.logprobs or 0) for s in seqs))
        return tokens, [lp if want else None for lp, want in zip(lps, want_lp)]

    def _emit(self, s: Sequence, token: int, lp: tuple | None) -> bool:
        """Append one generated token to ``s``, apply its stop conditions and send its event; True if it finished.
        ``lp``: (the token's log-probability, the top alternatives) when the request asked for log-probabilities."""
        s.output_ids.append(token)
        if s.history is not None and s.history.matcher is not None:  # a grammar that took a stop token ends here
            if s.history.update(s.output_ids).matcher.terminated:
                s.finish_reason = "stop"
        text, finished = update_text(s, self._decoders[s.params.skip_special_tokens], self.eos_ids,
                                     self.config.max_model_len)
        lps = [] if lp is None else [(token, lp[0], lp[1][: s.params.logprobs])]
        event = Event(s.request.request_id, s.index, [token], text, lps, finished, s.finish_reason,
                      len(s.prompt_ids), len(s.output_ids), cached_tokens=s.cached_tokens,
                      prompt_logprobs=s.prompt_lps, prompt_ranks=s.prompt_rks)
        s.prompt_lps = s.prompt_rks = None  # (with the sequence's first event only)
        if finished:
            self._finish(s, event=event)
        else:
            s.callback(event)
        return finished

    def _finish(self, seq: Sequence, event: Event | None = None, error: str | None = None,
                error_code: str | None = None) -> None:
        """``seq`` is done: its slot and adapter reference are released and its final event (``event``, or one with
        ``error``) sent - sent even where releasing fails, which then raises; a sequence gets one final event."""
        seq.status = Status.FINISHED
        try:
            self._release(seq)
        finally:
            self._send_final(seq, event, error, error_code)

    def _release(self, seq: Sequence) -> None:
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq in self.decoding:
            self.decoding.remove(seq)
        if 0 <= seq.slot < self.num_slots and self.slot_seq[seq.slot] is seq:
            self.slot_seq[seq.slot] = None
            if self.prefix is not None:  # its keys and values stay for later prompts
                self.prefix.hold(seq.slot, seq.prompt_ids, seq.output_ids, seq.prefix_owner, seq.num_computed)
                self.prefix.release(seq.slot)
        seq.slot = -1
        if seq.request.adapter is not None and seq.request.adapter in self.registry.adapters:
            self.registry.adapters[seq.request.adapter].active -= 1

    def _send_final(self, seq: Sequence, event: Event | None, error: str | None, error_code: str | None) -> None:
        rid = seq.request.request_id
        if event is None:
            event = Event(rid, seq.index, [], "", [], True, seq.finish_reason or "error", len(seq.prompt_ids),
                          len(seq.output_ids), error=error, error_code=error_code, cached_tokens=seq.cached_tokens,
                          prompt_logprobs=seq.prompt_lps, prompt_ranks=seq.prompt_rks)
        if seq.routing_counts is not None:
            event.routing = seq.routing_counts
        siblings = self.requests.get(rid, [])
        if all(s.status is Status.FINISHED for s in siblings):
            self.requests.pop(rid, None)
        try:
            seq.callback(event)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("request %s: callback failed", rid)

    def _place(self, seq: Sequence, pos: int) -> None:
        if seq.slot == pos:
            return
        other = self.slot_seq[pos]
        held = len(self.prefix.blocks[pos]) * BLOCK if self.prefix is not None and other is None else 0
        if other is None and not held:
            self.runner.cache.move(seq.slot, pos, seq.num_computed)
            if self.prefix is not None:
                self.prefix.moved(seq.slot, pos)
            self.slot_seq[seq.slot] = None
        else:  # another sequence, or a free slot's contents (kept for later prompts: they go where seq was)
            self.runner.cache.swap(seq.slot, pos, max(seq.num_computed, other.num_computed if other else held))
            if self.prefix is not None:
                self.prefix.swapped(seq.slot, pos)
            self.slot_seq[seq.slot] = other
            if other is not None:
                other.slot = seq.slot
        self.slot_seq[pos] = seq
        seq.slot = pos

    def _arrange(self) -> None:
        """Decoding sequences in slots [0, D), prefilling ones (FIFO) in [D, D + P): forwards read views."""
        D = len(self.decoding)
        outside = [s for s in self.decoding if s.slot >= D]
        for pos in range(D):
            occupant = self.slot_seq[pos]
            if occupant is None or occupant.status is not Status.DECODE:
                self._place(outside.pop(), pos)
        for i, seq in enumerate(self.prefilling):
            self._place(seq, D + i)

    def _reap_adapters(self) -> None:
        for name, adapter in list(self.registry.adapters.items()):
            if adapter.unloading and adapter.active <= 0 and not any(r.adapter == name for r, _ in self.waiting):
                self.registry.remove(name)
                if self.prefix is not None:
                    self.prefix.forget(adapter.slot)


def batch_invariant_unsupported(device: torch.device, dtype: torch.dtype, decoder: str) -> str | None:
    """Why batch-invariant mode cannot hold for this device, dtype and decoder, or None: it needs the lean decoder on
    CPU with the compiled dot-product GEMM for the dtype (AVX-512 or AVX2 + FMA; AVX512-BF16 for bfloat16), whose rows never depend
    on the batch; ATen's, oneDNN's and cuBLAS's GEMMs choose kernels by shape."""
    from remix.kernels import cpu_ext

    if torch.device(device).type != "cpu":
        return "CPU only (cuBLAS chooses its kernels by shape)"
    if decoder != "lean":
        return f"needs --decoder lean (the {decoder} decoder runs ATen's GEMMs)"
    if not cpu_ext.dot_gemm(dtype):
        return (f"this CPU has no compiled dot-product GEMM for {str(dtype).removeprefix('torch.')} ("
                f"{'AVX512-BF16' if dtype == torch.bfloat16 else 'AVX-512 or AVX2 + FMA'} and the compiled kernels)")
    return None


def collect(engine: Engine, request: GenerationRequest, max_steps: int = 100000) -> list[Event]:
    """Test/CLI helper without a thread: submit, step until this request is done, return its events."""
    events: list[Event] = []
    engine.submit(request, events.append)
    finished = 0
    for _ in range(max_steps):
        if finished == request.params.n:
            break
        engine.step()
        finished = sum(e.finished for e in events)
    return events
