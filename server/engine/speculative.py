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

import math
from dataclasses import dataclass


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


SCHEDULES = ("cost", "constant")  # EngineConfig.speculative_schedule


@dataclass
class DraftStats:
    """How a sequence's drafts fared: decayed counts of draft tokens taken and of tokens checked (a draft's tokens up to
    and including its first rejected one), from a prior of 0.6 over two tokens; steps it went without a draft."""

    taken: float = 1.2
    checked: float = 2.0
    idle: int = 0

    @property
    def rate(self) -> float:
        """The chance that its next draft token is taken (each token taken with one chance, given the one before was)."""
        return self.taken / self.checked


class DraftPolicy:
    """How long each sequence's draft is, from what a draft token costs against what it is likely to bring.

    A decode step of b rows takes t(b) without drafts (b tokens out: t(b) / b a token) and t(b) + F + c d with d draft
    tokens (F: what checking drafts costs a step at all - the chunked forward, the LM head over every drafted row, the
    position-by-position sampling; c: each draft token). A sequence's j-th draft token comes out with probability
    rate^j (it is taken only if every one before it was). So a draft token pays where rate^j t(b) / b >= c, and a
    sequence's draft is as long as its tokens pay (up to k); a step then checks its drafts only if their expected tokens
    are worth F + c d as well. Drafts come out long where the model follows its context and the step is cheap (one
    sequence on a CPU, whose small steps read the weights once whatever their rows), short or none where drafts fail
    or where each draft token costs what a row does (many sequences). t(b) is timed on the engine's own steps without
    drafts (one such step whenever the rows are new, and every ``refresh`` steps), F and c are fitted (least squares
    over decayed sums) to its steps with drafts, so the policy needs no tuning per device: where drafts cost nearly
    nothing it drafts k, where they cost as much as rows it drafts what is nearly sure. A sequence without a draft for
    ``probe_every`` steps checks a one-token draft (in a step that checks drafts anyway), so its rate can recover."""

    def __init__(self, decay: float = 0.8, refresh: int = 128, probe_every: int = 8, constant: bool = False):
        self.decay, self.refresh, self.probe_every = decay, refresh, probe_every
        self.constant = constant  # the "constant" schedule: k tokens wherever an n-gram matches, nothing timed
        self.plain: dict[int, float] = {}  # rows -> a step's time without drafts (seconds, moving average)
        self.since: dict[int, int] = {}  # rows -> steps since that time was last taken
        self.sums = [0.0] * 5  # decayed sums over steps with drafts: n, x, y, xx, xy (x: draft tokens, y: seconds over t(b))

    def observe_step(self, rows: int, drafted: int, seconds: float) -> None:
        """A decode step's time (its forward, sampling and emission) with ``drafted`` draft tokens over ``rows`` rows."""
        if not drafted:
            old = self.plain.get(rows)
            self.plain[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds
            self.since[rows] = 0
        elif rows in self.plain:
            x, y = float(drafted), seconds - self.plain[rows]
            self.sums = [0.95 * a + b for a, b in zip(self.sums, (1.0, x, y, x * x, x * y))]

    def costs(self) -> tuple[float, float]:
        """(F, c) in seconds: a step's cost of checking drafts at all, and each draft token's (0, 0 before any)."""
        n, sx, sy, sxx, sxy = self.sums
        if n <= 0 or sx <= 0:
            return 0.0, 0.0
        var = n * sxx - sx * sx
        c = (n * sxy - sx * sy) / var if var > 1e-6 * n * sxx else sy / sx  # all drafts alike: no F to tell apart
        fixed = (sy - c * sx) / n
        if c < 0:
            c, fixed = 0.0, sy / n
        if fixed < 0:
            c, fixed = sy / sx, 0.0
        return max(0.0, fixed), max(0.0, c)

    def ratio(self, rows: int) -> float | None:
        """c / (t(rows) / rows): what a draft token costs in tokens of a step without drafts; None when this step should
        run without drafts to time t(rows) (rows not timed yet, or not for ``refresh`` steps)."""
        if self.constant:
            return 0.0
        t = self.plain.get(rows)
        since = self.since.get(rows, 0)
        if t is None or since >= self.refresh:
            return None
        self.since[rows] = since + 1
        return self.costs()[1] * rows / t

    def length(self, stats: DraftStats, ratio: float, k: int) -> int:
        """The draft length for a sequence with these stats: the largest j <= k with rate^j >= ratio (0: none, but a
        one-token draft after ``probe_every`` steps without one)."""
        rate = stats.rate
        if ratio <= 0 or rate >= 1:
            d = k
        elif ratio >= 1 or rate <= 0:
            d = 0
        else:
            d = min(k, int(math.log(ratio) / math.log(rate)))
        if d > 0:
            stats.idle = 0
            return d
        stats.idle += 1
        if stats.idle >= self.probe_every:
            stats.idle = 0
            return min(1, k)
        return 0

    def worth(self, rows: int, drafts: list[tuple[DraftStats, int]]) -> bool:
        """Whether a step of ``rows`` rows checks these drafts ((stats, length) per sequence with one): their expected
        tokens, at t(rows) / rows each, against F + c a draft token."""
        if self.constant:
            return True
        t = self.plain.get(rows)
        if t is None:
            return False
        fixed, c = self.costs()
        expected = sum(st.rate * (1 - st.rate ** d) / (1 - st.rate) if st.rate < 1 else d for st, d in drafts)
        return expected * t / rows >= fixed + c * sum(d for _, d in drafts)

    def observe_check(self, stats: DraftStats, drafted: int, taken: int) -> None:
        """A checked draft of ``drafted`` tokens of which the first ``taken`` were the sequence's own."""
        d = self.decay
        stats.taken = d * stats.taken + taken
        stats.checked = d * stats.checked + taken + (1 if taken < drafted else 0)
