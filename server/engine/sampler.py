"""Sampling: greedy, temperature, top-k, top-p, penalties and logit bias, per-request seeds, and log-probabilities.

Each sequence owns a ``torch.Generator`` seeded from its request's seed, so its draws depend on
nothing but its own logits, tokens and seed (never on its batch-mates or the step it landed in).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from remix.kernels import cpu_ext
from server.engine.grammar import Matcher, allocate_bitmask, apply_bitmask_


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # vLLM's / HF's: tokens below min_p times the most likely one's probability dropped (0 = off)
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives to report per sampled token (0 = only the sampled one)
    echo: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated so far
    repetition_penalty: float = 1.0  # HF's / vLLM's: a seen token's (prompt or output) logit / p if > 0, else * p
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's, -100 to 100)
    min_tokens: int = 0  # vLLM's: EOS and stop_token_ids banned, stop strings not checked, before this many tokens
    prompt_logprobs: int | None = None  # log p of each prompt token (and its top-N) under the tokens before it
    prompt_ranks: bool = False  # ... and each prompt token's rank in its distribution (vLLM's prompt_logprobs)
    grammar: tuple | None = None  # structured output: (kind of server.engine.grammar.KINDS, spec, request field)
    compiled_grammar: object | None = None  # its xgrammar compilation (the engine's Grammars.compile)
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be sampled
    _allowed: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (their ids as a tensor, made once)
    bad_words_ids: list[list[int]] | None = None  # vLLM's bad_words, tokenized: a word's last token is banned where
    # the output ends with the tokens before it (a one-token word: everywhere)
    include_stop_str_in_output: bool = False  # vLLM's: the matched stop string (or stop token's text) stays in the text
    skip_special_tokens: bool = True  # vLLM's: special tokens' text left out of the output text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def problems(self, vocab: int) -> list[tuple[str, str]]:
        """(field, message) for every value no step could sample with, for a model of ``vocab`` tokens - the engine's
        own contract (Engine.submit), so a caller of the Python API gets an error at submit, not a failed step that
        takes the running requests with it (the HTTP layer checks narrower bounds before)."""
        finite = lambda v: v == v and v not in (float("inf"), float("-inf"))  # noqa: E731
        ids_ok = lambda ids: all(0 <= t < vocab for t in ids)  # noqa: E731
        must = lambda name, want: f"{name} must be {want}, got {getattr(self, name)!r}"  # noqa: E731
        checks = (
            ("max_tokens", self.max_tokens >= 0, must("max_tokens", ">= 0")),
            ("temperature", finite(self.temperature) and self.temperature >= 0, must("temperature", "a finite number >= 0")),
            ("top_p", 0 < self.top_p <= 1, must("top_p", "in (0, 1]")),
            ("top_k", self.top_k >= 0, must("top_k", ">= 0 (0: off)")),
            ("min_p", 0 <= self.min_p <= 1, must("min_p", "in [0, 1]")),
            ("n", self.n >= 1, must("n", ">= 1")),
            ("seed", self.seed is None or self.seed >= 0, must("seed", ">= 0")),
            ("min_tokens", 0 <= self.min_tokens <= max(self.max_tokens, 0),
             f"min_tokens ({self.min_tokens}) must be >= 0 and not exceed max_tokens ({self.max_tokens})"),
            *((name, getattr(self, name) is None or 0 <= getattr(self, name) <= vocab,  # (top-N: at most the vocabulary)
               must(name, f"between 0 and the vocabulary's {vocab} tokens")) for name in ("logprobs", "prompt_logprobs")),
            ("presence_penalty", finite(self.presence_penalty), must("presence_penalty", "finite")),
            ("frequency_penalty", finite(self.frequency_penalty), must("frequency_penalty", "finite")),
            ("repetition_penalty", finite(self.repetition_penalty) and self.repetition_penalty > 0,
             must("repetition_penalty", "a finite number > 0")),
            ("logit_bias", all(finite(v) for v in (self.logit_bias or {}).values()), must("logit_bias", "finite biases")),
            ("logit_bias", ids_ok(self.logit_bias or ()), f"logit_bias token ids must be in [0, {vocab})"),
            ("stop_token_ids", ids_ok(self.stop_token_ids), f"stop_token_ids must be in [0, {vocab})"),
            ("allowed_token_ids", self.allowed_token_ids is None or (bool(self.allowed_token_ids)
                                                                     and ids_ok(self.allowed_token_ids)),
             f"allowed_token_ids must be a non-empty list of ids in [0, {vocab})"),
            ("allowed_token_ids", self.allowed_token_ids is None or self.grammar is None,
             "allowed_token_ids cannot be combined with structured output or tools (a grammar)"),
            ("bad_words", all(w and ids_ok(w) for w in self.bad_words_ids or ()),
             f"bad words must be non-empty token sequences in [0, {vocab})"),
            ("stop", self.stop is None or isinstance(self.stop, list) and all(isinstance(t, str) and t for t in self.stop),
             must("stop", "a list of non-empty strings")))
        return [(name, message) for name, ok, message in checks if not ok]

    @property
    def adjusts(self) -> bool:
        """Whether the logits change before sampling (penalties, a bias, min_tokens, a grammar)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
                    or self.min_tokens > 0 or self.grammar is not None or self.allowed_token_ids or self.bad_words_ids)


class TokenHistory:
    """One sequence's tokens as its logit adjustments read them: the distinct ids of its prompt and output, how often
    each output id was generated, its stop ids (banned below min_tokens) and its grammar's matcher (fed each output
    token). Kept by the sequence and brought up to date with each new token (``update``), so a long prompt is read
    once, not at every step."""

    def __init__(self, prompt_ids: list[int], stop_ids=(), matcher=None):
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)  # banned below min_tokens
        self.matcher = matcher  # structured output (server.engine.grammar.Matcher): fed every output token
        self.seen = set(prompt_ids)
        self.counts: dict[int, int] = {}
        self.done = 0  # output tokens counted so far
        self.output: list[int] = []  # the output's tokens (bad words match its end)
        self._seen_t: torch.Tensor | None = None
        self._count_t: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, output_ids: list[int]) -> "TokenHistory":
        for t in output_ids[self.done:]:
            if self.matcher is not None:
                self.matcher.accept(t)
            self.counts[t] = self.counts.get(t, 0) + 1
            self._count_t = None
            if t not in self.seen:
                self.seen.add(t)
                self._seen_t = None
        self.done = len(output_ids)
        self.output = output_ids
        return self

    def grammar_only(self, p: SamplingParams) -> bool:
        """Whether, at this step, the grammar is the only thing that changes this sequence's logits."""
        return (self.matcher is not None and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty and not p.logit_bias and not p.allowed_token_ids and not p.bad_words_ids
                and not (self.done < p.min_tokens and self.stop_ids.numel()))

    def seen_ids(self) -> torch.Tensor:
        if self._seen_t is None:
            self._seen_t = torch.tensor(sorted(self.seen), dtype=torch.long)
        return self._seen_t

    def output_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._count_t is None:
            self._count_t = (torch.tensor(list(self.counts), dtype=torch.long),
                             torch.tensor(list(self.counts.values()), dtype=torch.float32))
        return self._count_t


def banned_words(p: SamplingParams, output: list[int]) -> list[int]:
    """The tokens ``p.bad_words_ids`` ban next after ``output``: each word's last token where the output ends with the
    tokens before it (vLLM's rule: a word is never completed, though its first tokens may be sampled)."""
    out = []
    for word in p.bad_words_ids or ():
        head = word[:-1]
        if not head or (len(output) >= len(head) and output[len(output) - len(head):] == head):
            out.append(word[-1])
    return out


def adjust_logits(row: torch.Tensor, p: SamplingParams, history: TokenHistory) -> torch.Tensor:
    """One sequence's float32 logits [V] adjusted, in vLLM's order: the repetition penalty
    over every token of the prompt and the output, then the frequency and presence penalties over the output's
    tokens (OpenAI: logit - count * frequency - (count > 0) * presence), then the bias, every token but
    ``allowed_token_ids`` to -inf, a grammar's disallowed tokens to -inf, the tokens that would complete a bad word
    to -inf unless nothing else is left (a grammar may allow only such a token), and below ``min_tokens`` output
    tokens the stop tokens (EOS unless ignored, stop_token_ids) to -inf unless nothing else is left. In place;
    returns row."""
    if p.repetition_penalty != 1.0 and history.seen:
        seen = history.seen_ids().to(row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and history.counts:
        ids, counts = history.output_counts()
        row[ids.to(row.device)] -= (counts * p.frequency_penalty + p.presence_penalty).to(row.device)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
        row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=row.device)
    if p.allowed_token_ids:
        if p._allowed is None or p._allowed.device != row.device:
            p._allowed = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=row.device)
        ids = p._allowed
        kept = row[ids]
        row.fill_(float("-inf"))
        row[ids] = kept
    if history.matcher is not None:
        history.matcher.mask_(row)
    if p.bad_words_ids and (banned := banned_words(p, history.output)):
        _ban(row, torch.tensor(banned, dtype=torch.long, device=row.device))
    if history.done < p.min_tokens and history.stop_ids.numel():
        _ban(row, history.stop_ids.to(row.device))
    return row


def _ban(row: torch.Tensor, ids: torch.Tensor) -> None:
    """``ids`` to -inf in ``row``, unless nothing else is left to sample: a grammar that allows only a bad word's last
    token, or only a stop token before min_tokens (complete already), wins."""
    kept = row[ids].clone()
    row[ids] = float("-inf")
    if not bool(torch.isfinite(row).any()):
        row[ids] = kept


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum, as a CPU int64 tensor: the compiled kernel's on CPU (rows split among
    threads, vectorised: ~60 us for [32, 49152] float32 where ATen's max(dim) took ~1 ms), else max(dim).indices (not
    argmax: the same first-maximum ids, ~2.5x faster on CPU)."""
    ext = cpu_ext.for_input(logits)
    if ext is not None:
        return ext.argmax_rows(logits)
    return logits.max(-1).indices.cpu()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           history: list[TokenHistory | None] | None = None) -> torch.Tensor:
    """One token per row. logits [b, V] (float32 or the model's dtype; each sampled row is widened to float32 first,
    so the draws are those of float32 logits). Greedy rows take the argmax (ties: lowest id). A row whose params
    adjust the logits (penalties, bias, min_tokens, a grammar) is widened and adjusted first (:func:`adjust_logits`),
    from ``history[i]``: its sequence's tokens so far."""
    b = logits.shape[0]
    out = torch.empty(b, dtype=torch.long)
    greedy = [i for i, p in enumerate(params) if p.greedy and not p.adjusts]
    if len(greedy) == b:
        out[:] = first_argmax(logits)
    elif greedy:
        rows = torch.tensor(greedy)
        out[rows] = first_argmax(logits[rows])
    # greedy rows held only by a grammar, together: one bitmask, then on CPU one compiled pass over their rows that
    # takes each row's first maximum among its allowed tokens (nothing copied or written), elsewhere (or with
    # Matcher.APPLY "torch") one mask application to a copy of the rows and one argmax: -inf and widening are exact,
    # so either gives the token the row-by-row path (widen, mask, argmax) gives
    masked = [i for i, p in enumerate(params) if p.greedy and p.adjusts and history is not None
              and history[i] is not None and history[i].grammar_only(p)]
    if masked:
        rows = torch.tensor(masked)
        vocab = history[masked[0]].matcher.vocab_size
        bits = allocate_bitmask(len(masked), vocab)
        for k, i in enumerate(masked):
            history[i].matcher.fill(bits, k)
        ext = cpu_ext.for_input(logits)
        if ext is not None and Matcher.APPLY == "xgrammar":
            out[rows] = ext.masked_argmax_rows(logits, rows, bits, vocab)
        else:
            out[rows] = first_argmax(apply_bitmask_(logits[rows.to(logits.device)], bits, vocab))
    done = set(greedy) | set(masked)
    ext = cpu_ext.for_input(logits)
    # sampled rows whose logits nothing adjusts, together: the compiled kernel (one uniform draw per row from its own
    # generator), else the same in batched torch ops; on CPU sampled rows held only by a grammar together too, their
    # bitmasks filled into one and applied inside the kernel (as the mask on a copy does below)
    plain = [i for i, p in enumerate(params) if i not in done and not p.greedy and not p.adjusts]
    if plain:
        us = [torch.rand((), generator=generators[i]).item() for i in plain]
        ps = [params[i] for i in plain]
        out[torch.tensor(plain)] = (_sample_rows(ext, logits, plain, ps, us) if ext else
                                    sample_torch(logits[torch.tensor(plain, device=logits.device)].float(), ps, us))
        done |= set(plain)
    held = [i for i, p in enumerate(params) if i not in done and not p.greedy and history is not None
            and history[i] is not None and history[i].grammar_only(p)] if ext and Matcher.APPLY == "xgrammar" else []
    if held:
        vocab = history[held[0]].matcher.vocab_size
        bits = allocate_bitmask(len(held), vocab)
        for k, i in enumerate(held):
            history[i].matcher.fill(bits, k)
        out[torch.tensor(held)] = _sample_rows(ext, logits, held, [params[i] for i in held],
                                               [torch.rand((), generator=generators[i]).item() for i in held], bits, vocab)
        done |= set(held)
    # the rest one by one: widened (into one buffer for the rows that are then drawn together) and adjusted
    # (penalties, bias, min_tokens, a grammar beside them)
    rest = [i for i in range(b) if i not in done]
    drawn = [i for i in rest if not params[i].greedy]
    slot = {i: k for k, i in enumerate(drawn)}  # row -> its row of the buffer
    buf = torch.empty(len(drawn), logits.shape[1], dtype=torch.float32, device=logits.device) if drawn else None
    for i in rest:
        p = params[i]
        row = buf[slot[i]].copy_(logits[i]) if i in slot else logits[i].float()
        if p.adjusts:
            if history is None or history[i] is None:
                raise ValueError("adjusted logits (penalties, bias, min_tokens, grammars) need each sequence's history")
            row = adjust_logits(row.clone() if row.data_ptr() == logits[i].data_ptr() else row, p, history[i])
        if p.greedy:
            out[i] = int(first_argmax(row.view(1, -1))[0])
    if drawn:  # (adjust_logits works in place: the buffer's rows are the adjusted ones)
        us = [torch.rand((), generator=generators[i]).item() for i in drawn]
        ps = [params[i] for i in drawn]
        out[torch.tensor(drawn)] = (_sample_rows(ext, buf, list(range(len(drawn))), ps, us) if ext else
                                    sample_torch(buf, ps, us))
    return out


def sample_torch(rows: torch.Tensor, params: list[SamplingParams], us: list[float]) -> torch.Tensor:
    """sample_reference over a batch of float32 rows on any device, in batched torch ops (the path without the
    compiled kernel: CUDA, or no compiler): one sort for top-p, one transfer of the tokens at the end. CPU int64."""
    dev, V = rows.device, rows.shape[1]
    x = rows / torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)[:, None]
    ks = [min(p.top_k, V) for p in params]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values
        k = torch.tensor(ks, device=dev)
        kth = torch.where(k > 0, top.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1), float("-inf"))
        x = x.masked_fill(x < kth[:, None], float("-inf"))
    probs = torch.softmax(x, -1)
    if any(p.top_p < 1.0 for p in params):
        q = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)[:, None]
        ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep = (torch.cumsum(ordered, -1) - ordered < q) | (q >= 1.0)  # (a row with top_p 1 keeps everything)
        probs = torch.zeros_like(probs).scatter_(1, order, ordered * keep)
    if any(p.min_p > 0.0 for p in params):
        m = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)[:, None]
        probs = probs.masked_fill(probs < m * probs.max(-1, keepdim=True).values, 0.0)
    cdf = torch.cumsum(probs.double(), -1)
    goal = torch.tensor(us, dtype=torch.float64, device=dev) * cdf[:, -1]
    return torch.searchsorted(cdf, goal[:, None]).squeeze(1).clamp(max=V - 1).cpu()


def _sample_rows(ext, logits: torch.Tensor, rows: list[int], params: list[SamplingParams], us: list[float],
                 bits: torch.Tensor | None = None, vocab: int = 0) -> torch.Tensor:
    """The compiled kernel's tokens for ``rows`` of logits (sample_reference's distribution; no sort of the
    vocabulary), under a grammar bitmask per row where ``bits`` is given."""
    return ext.sample_rows(logits, torch.tensor(rows, dtype=torch.long),
                           torch.tensor([p.temperature for p in params], dtype=torch.float32),
                           torch.tensor([p.top_k for p in params], dtype=torch.long),
                           torch.tensor([p.top_p for p in params], dtype=torch.float32),
                           torch.tensor(us, dtype=torch.float64), bits if bits is not None else torch.empty(0), vocab,
                           torch.tensor([p.min_p for p in params], dtype=torch.float32))


def reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a float32 row is sampled from, plainly: softmax of row / temperature, top-k (tokens below the
    k-th largest value dropped, ties kept), top-p (over probability descending, token ascending: a token kept while
    the mass before it is < top_p), min-p (then tokens below min_p times the top token's probability dropped, as HF's
    warper after top-p). Dropped tokens are 0; the kept ones are not renormalised (the draw scales by their total)."""
    row = row / p.temperature
    if p.top_k > 0:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, -1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < p.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def sample_reference(row: torch.Tensor, p: SamplingParams, u: float) -> int:
    """The plain reference draw: the token whose interval of reference_probs' cumulative sum, in token order, holds u
    (in [0, 1)) times the total. The compiled kernel (sample_rows) and sample_torch draw from the same distribution."""
    cdf = torch.cumsum(reference_probs(row, p).double().cpu(), 0)
    return min(int(torch.searchsorted(cdf, torch.tensor(u * float(cdf[-1]), dtype=torch.float64))), row.numel() - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """(log p(token), top-N (id, log p)) per row, from the model's distribution (before temperature)."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(1, tokens.view(-1, 1).to(logp.device)).squeeze(1).tolist()
    if top > 0:
        values, ids = torch.topk(logp, top, dim=-1)
        alts = [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
    else:
        alts = [[] for _ in chosen]
    return list(zip(chosen, alts))
