"""Requests, their sequences, and the per-sequence output state (detokenization and stop handling)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.sampler import SamplingParams

_ids = itertools.count()


@dataclass
class GenerationRequest:
    """What the HTTP layer submits. ``adapter`` None = the bare base model."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    trace: bool = False


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
    error: str | None = None


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
    text: str = ""
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    routing_counts: dict | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def next_input(self) -> int:
        return self.output_ids[-1]


def update_text(seq: Sequence, tokenizer, eos_ids: set[int], max_len: int) -> tuple[str, bool]:
    """After a new token: refresh the decoded text, apply stop conditions; return (new text to emit, finished).

    Text that could still become a stop string, or ends in an incomplete UTF-8 character, is held back
    until it is decided, so a stream never emits what the final text will not contain.
    """
    p = seq.params
    token = seq.output_ids[-1]
    if not p.ignore_eos and token in eos_ids:
        seq.finish_reason = "stop"
    elif token in p.stop_token_ids:
        seq.finish_reason = "stop"
    ids = seq.output_ids[:-1] if seq.finish_reason == "stop" else seq.output_ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if seq.finish_reason is None and p.stop:
        start = max(0, seq.emitted_chars - max(len(s) for s in p.stop))
        hits = [(text.find(s, start), s) for s in p.stop if s]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            text = text[: min(hits)[0]]
            seq.finish_reason = "stop"
    if seq.finish_reason is None and (len(seq.output_ids) >= p.max_tokens or seq.length >= max_len):
        seq.finish_reason = "length"
    seq.text = text
    finished = seq.finish_reason is not None
    end = len(text)
    if not finished:
        while end > seq.emitted_chars and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete multi-byte character: wait for the rest
        if p.stop:
            hold = max(len(s) for s in p.stop) - 1
            for h in range(min(hold, end - seq.emitted_chars), 0, -1):
                if any(s.startswith(text[end - h : end]) for s in p.stop):
                    end -= h
                    break
    new = text[seq.emitted_chars : end] if end > seq.emitted_chars else ""
    seq.emitted_chars = max(seq.emitted_chars, end)
    return new, finished
