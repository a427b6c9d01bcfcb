"""Requests, their sequences, and the per-sequence output state (detokenization and stop handling)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.grammar import Matcher
from server.engine.sampler import SamplingParams, TokenHistory

_ids = itertools.count()


@dataclass
class GenerationRequest:
    """What the HTTP layer submits. ``adapter`` None = the bare base model."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    trace: bool = False
    priority: int = 0  # lower first (vLLM's convention); arrival order among equals
    cache_salt: str | None = None  # vLLM's: prefix-cache entries shared only with requests of the same salt
    held: bool = False  # its adapter was held for it (Engine.ensure_adapter(hold=True)): submitting it releases that


@dataclass
class Event:
    """One step's news for one sequence (choice ``index`` of a request)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    routing: dict | None = None  # per-module selection summary (when the request asked for a trace)
    error: str | None = None  # (final event) why the request failed, where it did
    error_code: str | None = None  # and as a code: server.engine's INTERNAL_ERROR, ENGINE_STOPPED or ADAPTER_GONE
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not computed for this sequence)
    prompt_logprobs: list | None = None  # (first event) the prompt's tokens: (id, log p, top-N), None for the first
    prompt_ranks: list | None = None  # (first event, params.prompt_ranks) each prompt token's rank (1: the most
    # likely), None for the first


class Status(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class Sequence:
    request: GenerationRequest
    index: int
    adapter_slot: int
    callback: Callable[[Event], None]
    generator: torch.Generator | None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int = -1
    status: Status = Status.PREFILL
    emitted_chars: int = 0
    text: str = ""  # the output decoded so far (up to read_offset; at the end, all of it)
    prefix_offset: int = 0  # incremental detokenization: output_ids[prefix_offset:read_offset] decoded to text's end
    read_offset: int = 0
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    routing_counts: dict | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    hashes: list[int] | None = None  # the prompt's block chain (server.engine.prefix); None: no prefix caching
    history: TokenHistory | None = None  # for penalties: the prompt's and output's tokens, kept up to date

    stop_floor: int = 0  # text emitted before min_tokens was reached: stop strings are matched after it only
    prompt_lps: list | None = None  # the prompt's log-probabilities so far (params.prompt_logprobs), until emitted
    prompt_rks: list | None = None  # ... and its tokens' ranks (params.prompt_ranks)
    ngrams: object | None = None  # speculative decoding's n-gram index of its tokens (server.engine.speculative)
    drafts: object | None = None  # ... and how its drafts fared (speculative.DraftStats: their next lengths)

    def token_history(self, eos_ids=(), vocab_size: int = 0) -> TokenHistory:
        if self.history is None:
            p = self.params
            matcher = Matcher(p.compiled_grammar, vocab_size) if p.compiled_grammar is not None else None
            self.history = TokenHistory(self.prompt_ids, [*(() if p.ignore_eos else eos_ids), *p.stop_token_ids], matcher)
        return self.history.update(self.output_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prefix_owner(self):
        """What the prefix cache keys this sequence's keys and values by beside their tokens (server.engine.prefix):
        its adapter's slot id, with its request's cache salt where it has one."""
        return prefix_owner(self.adapter_slot, self.request.cache_salt)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def next_input(self) -> int:
        return self.output_ids[-1]


def prefix_owner(adapter_slot: int, salt: str | None):
    return adapter_slot if salt is None else (adapter_slot, salt)


def decoder(tokenizer, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """ids -> text as ``tokenizer.decode(ids, skip_special_tokens=...)`` returns it, called on every new token of every
    sequence. A fast (Rust) tokenizer without clean-up decodes through its backend directly: transformers' decode
    converts every id through ``to_py_obj`` first (~25 us a call at 16 ids, 0.3 ms at 4000)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _decode_more(seq: Sequence, decode: Callable[[list[int]], str], ids: list[int], final: bool) -> None:
    """Append the text of ids[read_offset:] to seq.text, decoding a short window, not the whole output (vLLM's and
    TGI's incremental detokenization): the window starts one emission back (prefix_offset), so a tokenizer that drops a
    leading space of the first token (SentencePiece) or merges across tokens decodes the prefix and the window alike
    and their difference is the new text. Text ending in an incomplete UTF-8 character waits for the next token
    (unless ``final``)."""
    if seq.read_offset >= len(ids):
        return
    prefix = decode(ids[seq.prefix_offset : seq.read_offset]) if seq.read_offset > seq.prefix_offset else ""
    window = decode(ids[seq.prefix_offset :])
    if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):
        seq.text += window[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def update_text(seq: Sequence, decode: Callable[[list[int]], str], eos_ids: set[int], max_len: int) -> tuple[str, bool]:
    """After a new token: extend the decoded text, apply stop conditions; return (new text to emit, finished).
    ``decode``: :func:`decoder` of the tokenizer (the one of the request's ``skip_special_tokens``). A stop string
    (or a stop token) ends the text before it, or with ``include_stop_str_in_output`` after it.

    Text that could still become a stop string, or ends in an incomplete UTF-8 character, is held back
    until it is decided, so a stream never emits what the final text will not contain. Each call decodes a window
    of the last few tokens, not the whole output (which made a step's cost grow with the output's length: 32
    sequences of 4000 tokens spent ~24 ms a step re-decoding); the text is the same as decoding everything at once
    wherever the tokenizer decodes a concatenation of tokens as the concatenation of their texts.
    """
    p = seq.params
    token = seq.output_ids[-1]
    early = len(seq.output_ids) < p.min_tokens  # no stop condition but the length yet (min_tokens)
    if not early and ((not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids):
        seq.finish_reason = "stop"
    ids = seq.output_ids[:-1] if seq.finish_reason == "stop" and not p.include_stop_str_in_output else seq.output_ids
    if seq.finish_reason is None and (len(seq.output_ids) >= p.max_tokens or seq.length >= max_len):
        seq.finish_reason = "length"
    _decode_more(seq, decode, ids, final=seq.finish_reason is not None)
    text = seq.text
    if early:  # everything decoded is emitted (nothing held back for a stop string), and no match may start in it
        seq.stop_floor = len(text)
    elif p.stop:
        start = max(seq.stop_floor, seq.emitted_chars - max(len(s) for s in p.stop))
        hits = [(text.find(s, start), s) for s in p.stop if s]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            at, stop = min(hits)
            text = seq.text = text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
            seq.finish_reason = "stop"
    finished = seq.finish_reason is not None
    end = len(text)
    if not finished and p.stop and not early:  # (an incomplete UTF-8 character never reached text: see _decode_more)
        hold = max(len(s) for s in p.stop) - 1
        for h in range(min(hold, end - max(seq.emitted_chars, seq.stop_floor)), 0, -1):
            if any(s.startswith(text[end - h : end]) for s in p.stop):
                end -= h
                break
    new = text[seq.emitted_chars : end] if end > seq.emitted_chars else ""
    seq.emitted_chars = max(seq.emitted_chars, end)
    return new, finished
