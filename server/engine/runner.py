"""Model runner: one forward over contiguous cache slots, with every token routed to its adapter.

The base's Hugging Face modules hold the weights; each wrapped linear is a ``remix.stack.StackedLinear``
that reads the step's :class:`remix.stack.RoutingContext` (token -> adapter slot, -1 = bare base) and
calls the grouped gather kernel. For Llama-family models the decoder stack runs through
:class:`server.engine.fastpath.LeanForward` (HF's ops without its Python plumbing, a few compiled on CPU);
any other model runs HF's modules. No Python loop over tokens or requests happens inside a forward.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn as nn

from remix.kernels import cpu_ext
from remix.kernels.cpu_alloc import huge_page_shares, move_to_huge_pages, thp_policy
from remix.stack import RoutingContext, StackedLinear, set_context
from server.engine.cache import SlotKVCache, attention_mask
from server.engine.fastpath import DECODERS, LeanForward, unsupported_reason
from server.engine.graphs import DecodeGraphs

log = logging.getLogger(__name__)


HEAD_BLOCK = 64  # rows of one LM head call over several tokens a row (below the compiled GEMM's batch limits)


class ModelRunner:
    def __init__(self, model: nn.Module, slots: int, max_len: int, max_chunk: int, decoder: str = "lean",
                 cuda_graphs: bool = True, kv_dtype: torch.dtype | None = None, batch_invariant: bool = False):
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len, self.max_chunk = max_len, max_chunk
        # the compiled GEMMs' batch-invariant mode is process-wide: set before every forward of this runner (~1 us)
        self.batch_invariant = batch_invariant
        self._ext = cpu_ext.load() if self.device.type == "cpu" else None
        self.cache = SlotKVCache(cfg.num_hidden_layers, slots, max_len, cfg.num_key_value_heads, head_dim, max_chunk,
                                 self.dtype, self.device, kv_dtype=kv_dtype)
        self.stacked: dict[str, StackedLinear] = {}
        # the decoder stack's cache argument: ``cache`` since transformers 5.24, ``past_key_values`` before (5.24 still
        # takes it, with a deprecation warning on every call until 5.40)
        inner = getattr(model, "model", None)
        self._cache_arg = "cache" if inner is not None and "cache" in inspect.signature(type(inner).forward).parameters \
            else "past_key_values"
        self.last_trace: list | None = None
        self.last_every: dict[int, torch.Tensor] = {}  # forward(every_token=...)'s logits at every token of those rows
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        reason = unsupported_reason(model, max_len) if decoder != "hf" else None
        # None: HF's modules run the decoder stack
        self.lean = LeanForward(model, compiled=decoder == "lean") if decoder != "hf" and reason is None else None
        self.decoder = decoder if self.lean is not None else "hf"  # the mode in effect (/health reports it)
        self.decoder_fallback = reason  # why a lean / exact request runs HF's modules, or None
        if reason is not None:
            log.warning("--decoder %s does not apply to this model (%s): HF's modules run the decoder stack", decoder, reason)
        if self.device.type == "cpu":  # the weights a decode step streams, in one block on transparent huge pages
            fused = [t for f in (self.lean.qkv if self.lean is not None else []) if f is not None for t in f[:2]]
            moved = move_to_huge_pages([*model.parameters(), *model.buffers(), *fused])
            if moved:
                log.info("weights on transparent huge pages: %.0f MB", moved / 2**20)
        # the share of the weights' and the KV cache's blocks the kernel backed with huge pages (0-1; a block left out
        # where not measurable), read once: /health, /metrics and the benches report it (4 KiB pages stream slower)
        blocks = {"weights": param, "kv_cache": self.cache.k[0]} if self.device.type == "cpu" else {}
        self.huge_pages = {k: v for k, v in zip(blocks, huge_page_shares(*blocks.values())) if v is not None}
        if any(v < 0.5 for v in self.huge_pages.values()):
            log.warning("%s mostly on 4 KiB pages (transparent huge pages: %s): decode steps stream them a few %% "
                        "slower; see README, Troubleshooting", " and ".join(k.replace("_", " ") for k, v in
                                                                          self.huge_pages.items() if v < 0.5),
                        thp_policy())
        # decode steps replayed from CUDA graphs (server.engine.graphs): CUDA and the lean forward only
        self.graphs = DecodeGraphs(self) if cuda_graphs and self.device.type == "cuda" and self.lean is not None else None

    def ensure_wrapped(self, names: list[str]) -> None:
        """Wrap these linear modules (if not yet) so adapters can be stacked on them."""
        for name in names:
            if name in self.stacked:
                continue
            module = self.model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"module {name} is {type(module).__name__}, not nn.Linear")
            parent, _, child = name.rpartition(".")
            wrapped = StackedLinear(module, name)
            setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)
            self.stacked[name] = wrapped

    @torch.inference_mode()
    def forward(self, first_slot: int, tokens: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                adapter_slots: torch.Tensor, trace: bool = False, decode: bool = False,
                every_token: list[int] | None = None, prompt: bool = False) -> torch.Tensor:
        """Run rows [first_slot, first_slot + b) of the cache.

        tokens [b, q] (row i's first counts[i] are real, the rest padding), starts [b] position of
        each row's first token, adapter_slots [b]. Returns logits [b, V] (the model's dtype; float32 from a CUDA graph) of
        each row's last real token (a decode step replayed from a CUDA graph returns a view of the graph's output buffer: read it before
        the next forward). ``every_token``: rows whose logits at every real token are wanted too (prompt
        log-probabilities); they are left in ``last_every`` {row: [counts[row], V]}.

        ``decode``: the engine's decode step (one token per row, rows from slot 0). Only such a step takes the decode
        paths (the compiled decode stack, a CUDA graph); a prefill chunk of one token does not, so every prompt token
        goes through the same attention whatever shares its step (on CPU the same compiled kernel as a decode token;
        elsewhere SDPA, which rounds differently from the decode paths).

        ``prompt``: the tokens are prompt tokens (the engine's prefill chunks, not checked drafts): on the compiled CPU
        path their attention takes the prompt kernel (``slot_attention``'s ``prompt``): in bfloat16 (AVX512-BF16) on
        AMX tiles or vectors, each token's output its own whatever shares its chunk, though not the decode kernel's
        rounding (not in batch-invariant mode); in float32 (AVX-512 or AVX2) on vectors of positions, the decode
        kernel's bits.
        """
        if decode:
            assert tokens.shape[1] == 1 and bool((counts == 1).all()), "a decode step has one token per row"
        if self._ext is not None:
            self._ext._batch_invariant(self.batch_invariant)
        lean = self.lean is not None and self.lean.applies()  # scans the decoder modules' hooks: once a forward
        if self.graphs is not None and lean and decode and first_slot == 0 and not trace:
            key = self.graphs.bucket(tokens.shape[0], int(starts.max()) + 1)
            if key is not None:
                self.last_trace = None
                return self.graphs.run(tokens, starts, adapter_slots, key)
        tokens, starts, counts, adapter_slots = (t.to(self.device) for t in (tokens, starts, counts, adapter_slots))
        b, q = tokens.shape
        positions = starts[:, None] + torch.arange(q, device=starts.device)[None, :]
        span = int((starts + counts).max())
        self.cache.prepare(first_slot, positions, span)
        mask = attention_mask(starts, counts, q, span)
        real = torch.arange(q, device=starts.device)[None, :] < counts[:, None]
        token_slots = torch.where(real, adapter_slots[:, None], -1).reshape(-1)  # padding: no adapter, not counted
        rows = None  # a prefill step with padding, on the compiled path: per-token work on the real tokens only
        if lean and not decode and self.lean.packs(self.dtype, self.device) and not bool(real.all()):
            rows = real.reshape(-1).nonzero().squeeze(1)
            token_slots = token_slots[rows]
        ctx = RoutingContext.build(token_slots, count=True, trace=trace)
        set_context(ctx)
        try:
            if lean:
                hidden = self.lean(tokens, positions, mask, self.cache, lens=starts + 1 if decode else None, rows=rows,
                                   prompt=prompt and not decode)
            else:
                hidden = self.model.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                                          use_cache=True, **{self._cache_arg: self.cache}).last_hidden_state
        finally:
            set_context(None)
        if rows is None:
            self.last_trace = ctx.trace
            last = hidden[torch.arange(b, device=hidden.device), counts - 1]
        else:  # packed: row i's tokens are [cumsum(counts)[i - 1], cumsum(counts)[i]); the trace back in [b * q] terms
            self.last_trace = None if ctx.trace is None else [
                (name, slot, rows if sel_rows is None else rows[sel_rows], sel) for name, slot, sel_rows, sel in ctx.trace]
            last = hidden[torch.cumsum(counts, 0) - 1]
        head = self.lean.head if lean else self.model.lm_head
        self.last_every = {}
        if not every_token:
            # in the model's dtype: the sampler widens only what it reads (a bfloat16 [32, 49152] copy to float32 took
            # ~0.25 ms of every decode step at 32 sequences; greedy rows read the bfloat16 logits as they are)
            return head(last)
        # the LM head over every real token of the every_token rows and the last token of the others at once, in
        # blocks of HEAD_BLOCK rows (its weights, 57 MB for the default base, are read once a block instead of once a
        # row: a checked draft of four sequences paid four extra passes); each row's logits are what head(last) gives
        # it (the compiled GEMM's rows do not depend on the call below its batch limits, and a block stays below them)
        counts_l, every = counts.tolist(), set(every_token)
        flat = hidden.reshape(-1, hidden.shape[-1])
        starts_flat = [i * q for i in range(b)] if rows is None else [e - c for e, c in zip(
            torch.cumsum(counts, 0).tolist(), counts_l)]
        index, spans = [], []
        for i in range(b):
            c = counts_l[i]
            first = starts_flat[i] if i in every else starts_flat[i] + c - 1
            spans.append((len(index), c if i in every else 1))
            index.extend(range(first, starts_flat[i] + c))
        picked = flat[torch.tensor(index, device=flat.device)]
        logits = torch.cat([head(picked[j : j + HEAD_BLOCK]) for j in range(0, len(index), HEAD_BLOCK)])
        for i in every_token:
            o, c = spans[i]
            self.last_every[i] = logits[o : o + c]
        return logits[torch.tensor([o + c - 1 for o, c in spans], device=logits.device)]
