"""Prefix caching over the slot KV cache (the server's ``--prefix-caching``, on by default).

A cache slot keeps its keys and values after its sequence ends, and a running sequence's computed positions stay
where they are, so a new prompt that starts with tokens some slot already holds - under the same adapter - need not
compute them again: the engine copies those positions into the new sequence's slot (or takes the free slot itself)
and prefills from there. Chats resend their whole history and a system prompt opens every request of an app: their
time to first token no longer grows with what came before.

What matches: blocks of :data:`BLOCK` tokens, each identified by a hash of its tokens chained to every block before
it and seeded with the adapter's slot id (:func:`chain`; an adapter's blocks are forgotten when it is unloaded, so an
adapter loaded later into its slot id never meets keys and values its predecessor computed) and the request's cache
salt, if any (vLLM's ``cache_salt``: a tenant's prompts then never share blocks with another's, so none can learn
from a faster first token what another sent). A match is then checked token by token against the slot's contents, so
a hash collision cannot hand a sequence another prompt's cache. At most ``len(prompt) - 1`` tokens are taken: the last
prompt token is always computed, its logits choose the first new token.

Keys and values depend on the adapter (its deltas change every later layer's input) and on nothing else of the
request, so a reused position holds what the sequence would have computed itself - bit for bit wherever a token's
computation does not depend on its step (float32 on the compiled CPU path, steps below 256 tokens: see the README's
"What does not depend on batch-mates"); elsewhere within the rounding of another kernel choice, as in vLLM.

The index below knows, per slot, the chain of its complete blocks and where its tokens live (the running
sequence's lists, or those of the sequence that left it); the engine tells it when sequences take, leave, move and
swap slots. Free slots with contents are reused least recently freed first.
"""

from __future__ import annotations

import itertools

BLOCK = 16  # tokens a hash covers (a match is a whole number of blocks, capped at the prompt's length - 1)


def chain(tokens: list[int], adapter, start: list[int] | None = None, upto: int | None = None) -> list[int]:
    """Hashes of the complete blocks of ``tokens[:upto]``, each chained to every block before it, for ``adapter``
    (its slot id, -1 = the bare base, or (slot id, cache salt): server.engine.sequence.prefix_owner); ``start``:
    hashes already known for the first blocks (extended, not copied)."""
    out = [] if start is None else start
    n = (len(tokens) if upto is None else min(upto, len(tokens))) // BLOCK
    h = out[-1] if out else hash(("remix-prefix", adapter))
    for i in range(len(out), n):
        h = hash((h, *tokens[i * BLOCK : (i + 1) * BLOCK]))
        out.append(h)
    return out


class PrefixIndex:
    """Which slots hold which prefixes (block hash chains), and the least recently freed slot to overwrite."""

    def __init__(self, slots: int):
        self.blocks: list[list[int]] = [[] for _ in range(slots)]  # each slot's chain of complete blocks
        self.source: list[tuple] = [((), (), -1)] * slots  # (prompt ids, output ids, adapter) whose tokens it holds
        self.index: dict[int, set[int]] = {}  # block hash -> slots that hold that prefix
        self._clock = itertools.count(1)
        self.freed: list[int] = [0] * slots  # when each slot's sequence left it (0: never used)
        self.queries = self.hits = self.tokens = 0  # lookups for new sequences, those that reused, tokens reused

    # -- what a slot holds -------------------------------------------------------------------------------------------
    def _drop(self, slot: int, keep: int = 0) -> None:
        chain_ = self.blocks[slot]
        for h in chain_[keep:]:
            holders = self.index.get(h)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self.index[h]
        del chain_[keep:]

    def hold(self, slot: int, prompt: list[int], output: list[int], adapter: int, computed: int,
             keep: int | None = None) -> None:
        """Slot ``slot`` holds the first ``computed`` tokens of prompt + output for ``adapter``. ``keep``: how many of
        its current blocks stay valid (a new owner: only those it reused; None: the same owner, whose tokens only
        grow, so all of them)."""
        if keep is not None or self.source[slot][2] != adapter:
            self._drop(slot, 0 if keep is None else min(keep, len(self.blocks[slot])))
        self.source[slot] = (prompt, output, adapter)
        chain_ = self.blocks[slot]
        before = len(chain_)
        if computed // BLOCK > before:
            tokens = prompt if computed <= len(prompt) else [*prompt, *output]
            chain(tokens, adapter, chain_, computed)
            for h in chain_[before:]:
                self.index.setdefault(h, set()).add(slot)

    def release(self, slot: int) -> None:
        """The slot's sequence left: its contents stay (as last held) for later prompts, until it is overwritten."""
        self.freed[slot] = next(self._clock)

    def moved(self, src: int, dst: int) -> None:
        """``dst`` now holds a copy of ``src``'s contents; ``src``, left by its sequence, keeps them."""
        self._drop(dst)
        self.freed[src] = next(self._clock)
        self.blocks[dst] = list(self.blocks[src])
        self.source[dst] = self.source[src]
        for h in self.blocks[dst]:
            self.index.setdefault(h, set()).add(dst)

    def swapped(self, a: int, b: int) -> None:
        for h in self.blocks[a]:
            self.index[h].discard(a)
        for h in self.blocks[b]:
            self.index[h].discard(b)
        self.blocks[a], self.blocks[b] = self.blocks[b], self.blocks[a]
        self.source[a], self.source[b] = self.source[b], self.source[a]
        self.freed[a], self.freed[b] = self.freed[b], self.freed[a]
        for s in (a, b):
            for h in self.blocks[s]:
                self.index.setdefault(h, set()).add(s)

    def has_contents(self, slot: int) -> bool:
        return bool(self.blocks[slot])

    def forget(self, adapter: int | None = None) -> None:
        """Drop every slot's blocks (``adapter`` given: the slots holding that adapter's tokens, salted or not)."""
        for slot, (_, _, a) in enumerate(self.source):
            if adapter is None or a == adapter or (isinstance(a, tuple) and a[0] == adapter):
                self._drop(slot)

    # -- lookups -----------------------------------------------------------------------------------------------------
    def match(self, hashes: list[int], prompt: list[int], limit: int, prefer=()) -> tuple[int, int]:
        """(slot, tokens) of the longest verified prefix of ``prompt`` (whose block chain is ``hashes``) some slot
        holds, at most ``limit`` tokens; (-1, 0) when none. Ties go to a slot in ``prefer``, then to the lowest.

        The chain is walked to its deepest held block (a chained hash stands for every block before it), and only
        there are the tokens compared, once; should they differ (a hash collision), one block shallower, and so on -
        so a long prompt costs one dictionary lookup a block and one comparison, on every prefill step it asks."""
        depth = 0
        for i, h in enumerate(hashes):
            if i * BLOCK >= limit or not self.index.get(h):  # (a block that starts at the limit adds nothing)
                break
            depth = i + 1
        for d in range(depth, 0, -1):
            for slot in sorted(self.index.get(hashes[d - 1], ()), key=lambda s: (s not in prefer, s)):
                if self._holds(slot, prompt, d * BLOCK):
                    return slot, min(d * BLOCK, limit)
        return -1, 0

    def _holds(self, slot: int, prompt: list[int], n: int) -> bool:
        """Whether the slot's first n tokens are prompt[:n] (hashes matched; this rules out a collision)."""
        p, o, _ = self.source[slot]
        if n <= len(p):
            return p[:n] == prompt[:n]
        return p == prompt[: len(p)] and list(o[: n - len(p)]) == prompt[len(p) : n]

    def victim(self, free: list[int]) -> int:
        """The free slot to give a new sequence: one with no contents, else the least recently freed."""
        return min(free, key=lambda s: (bool(self.blocks[s]), self.freed[s], s))

    def stats(self) -> dict:
        return {"queries": self.queries, "hits": self.hits, "tokens": self.tokens,
                "slots_with_contents": sum(bool(b) for b in self.blocks)}
