"""Speculative decoding by prompt lookup (n-gram drafts), as vLLM's ``ngram`` method and HF's
``prompt_lookup_num_tokens`` do it: no draft model, the drafts come from the sequence's own tokens.

Where the last n tokens of a sequence (prompt and output; n from ``max_n`` down to ``min_n``) occurred before, the
tokens that followed that occurrence are proposed as the next ones: the latest occurrence's where k tokens follow it,
else the earliest's (a loop's latest occurrence is followed by one token only; HF takes the earliest always). The
engine then runs the sequence's next input and its draft in one forward (a chunk of 1 + d tokens over its cache slot,
as a prefill chunk runs) and, position by position, takes the token the sequence's own sampler picks there (greedy: the
argmax; sampled: one draw of its generator a token, as a decode step draws; penalties, bias, min_tokens and grammars
from its history up to that position), up to and including the first that differs from the draft (server.engine.engine, ``Engine._run_verify``). Each position's logits are computed from exactly
the tokens a plain decode step would have given them, so the output is the output without speculation - greedy, and
seeded sampling with its seed's tokens (a draft token is accepted with the probability the sampler gives it, what
rejection sampling accepts a deterministic draft with): on CPU with the lean decoder bit for bit (every per-token op,
the GEMMs below their batch-size limits and the attention kernel compute a token alike in a decode step and in a
chunk; tests compare), elsewhere up to the rounding a prefill chunk and a decode step differ by. A draft costs its
tokens' compute; on a CPU whose small decode steps are bound by reading the weights, 1 + d tokens cost about one, so
text that repeats its context (summaries, extraction, code edits, quoting) comes out several tokens a step.
"""

from __future__ import annotations


class NgramIndex:
    """One sequence's tokens (the prompt given at the start, each call's new tokens appended) and where each of its
    n-grams (``min_n`` <= n <= ``max_n``) occurred, kept up to date as it grows: ``propose`` indexes only the tokens
    added since its last call (a long prompt once, then ``max_n - min_n + 1`` dictionary writes a token)."""

    def __init__(self, min_n: int, max_n: int, tokens=()):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = list(tokens)
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence's continuation starts
        self.earliest: dict[tuple[int, ...], int] = {}  # ... and its earliest's
        self.indexed = 0  # n-grams ending before this position are in the tables

    def propose(self, k: int, new=()) -> list[int]:
        """Append ``new`` tokens; then up to ``k`` tokens that followed an earlier occurrence of the longest n-gram
        ending the sequence (the latest where k tokens follow it, else the earliest; empty: none occurred before). The
        continuation may run into the tail itself (a repeating pattern)."""
        tokens = self.tokens
        tokens.extend(new)
        L = len(tokens)
        latest, earliest, lo, hi = self.latest, self.earliest, self.min_n, self.max_n
        # every n-gram that ends at e <= L - 2 (its continuation then starts at or before the last token)
        for e in range(self.indexed, L - 1):
            for n in range(lo, min(hi, e + 1) + 1):
                gram = tuple(tokens[e - n + 1 : e + 1])
                latest[gram] = e + 1
                earliest.setdefault(gram, e + 1)
        self.indexed = max(self.indexed, L - 1)
        if k <= 0:
            return []
        for n in range(min(hi, L), lo - 1, -1):
            gram = tuple(tokens[L - n :])
            start = latest.get(gram)
            if start is not None:
                if start + k > L:
                    start = earliest[gram]
                return tokens[start : start + k]
        return []
