"""Structured output: the tokens a sequence may take next, by a grammar (JSON, a JSON schema, a regex, one of a list of
strings, an EBNF or Lark grammar) compiled by xgrammar - the constrained-decoding library vLLM, SGLang and
TensorRT-LLM use.

A request's grammar is compiled once (``Grammars.compile``; xgrammar caches compiled grammars) and each of its
sequences keeps a matcher that accepts every token the sequence takes; before each sampling step the matcher's
bitmask of allowed tokens sets every other logit to -inf (greedy and sampled rows alike). The matcher ends the
sequence when it accepts a stop token once the grammar is complete.

xgrammar is optional: ``scripts/setup.sh`` installs it without its dependency on triton (~1 GB, used only by its
CUDA kernels; the bitmask is applied here with torch ops on any device). Without it, requests that ask for
structured output get a 400 naming the field.
"""

from __future__ import annotations

import json
import re
import threading

import torch

try:
    import xgrammar as xgr
except ImportError:  # structured output is refused with a clear message
    xgr = None


class GrammarError(ValueError):
    """A grammar that cannot be compiled (or no xgrammar); ``param`` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "structural_tag")


def _clean(error: Exception) -> str:
    """xgrammar's C++ messages start with a time stamp and a source location: keep the message."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error)).strip()


# xgrammar 0.2's JSON-schema converter writes the characters of a string with a length bound (minLength / maxLength)
# as [^"\\\r\n], which admits raw control characters (U+0000-U+001F but CR and LF) that JSON forbids in strings and
# strict parsers (Python's json.loads, JavaScript's JSON.parse) refuse; its unbounded strings use the right class.
# The schema's grammar is therefore taken as EBNF text and that class narrowed to JSON's before it is compiled.
_BOUNDED_CHARS = '[^\\"\\\\\\r\\n]'
_JSON_CHARS = '[^\\0-\\x1f\\"\\\\]'


def json_ebnf(schema) -> str:
    """The EBNF of a JSON schema (dict or JSON text) without free whitespace, its strings free of raw control
    characters."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return str(xgr.Grammar.from_json_schema(text, any_whitespace=False)).replace(_BOUNDED_CHARS, _JSON_CHARS)


def grammar_of(text: str):
    """An EBNF grammar (xgrammar's, as llama.cpp's GBNF writes it: ``root ::= ...``) or a Lark one (``start: ...``,
    which vLLM takes too): EBNF where a rule is defined with ``::=``."""
    if re.search(r"^\s*[\w.-]+\s*::=", text, re.M):
        return xgr.Grammar.from_ebnf(text)
    return xgr.Grammar.from_lark(text)


def _structural(tag: dict) -> dict:
    """A structural tag in xgrammar's form, from that form or from vLLM's older one ({"structures": [{"begin",
    "schema", "end"}], "triggers": [...]}, which vLLM still reads)."""
    if "structures" not in tag:
        return tag
    structures, triggers = tag["structures"], tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not all(
            isinstance(s, dict) and {"begin", "schema", "end"} <= s.keys() for s in structures):
        raise ValueError('the older form is {"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}')
    items = [xgr.StructuralTagItem(begin=s["begin"], schema=s["schema"], end=s["end"]) for s in structures]
    return json.loads(xgr.StructuralTag.from_legacy_structural_tag(items, triggers).model_dump_json())


def _strict_tag(node):
    """A structural tag (server.tools) with every json_schema content replaced by its json_ebnf grammar."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            return {"type": "grammar", "grammar": json_ebnf(node["json_schema"])}
        return {k: _strict_tag(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strict_tag(v) for v in node]
    return node


class Grammars:
    """Compiles a request's grammar for one tokenizer (thread-safe: the HTTP layer compiles off the engine's thread)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        if xgr is None:
            raise GrammarError("structured output needs the xgrammar package (pip install --no-deps xgrammar "
                               "apache-tvm-ffi; scripts/setup.sh does)", "response_format")
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()

    def compile(self, kind: str, value, param: str):
        """kind: json_object (any JSON object), json_schema (a schema: dict or JSON text), regex (a pattern), choice
        (a list of strings, exactly one of which is the output), grammar (EBNF or Lark text: grammar_of),
        structural_tag (xgrammar's structural tag, or vLLM's older form: dict or JSON text; server.tools builds the
        tool-call ones). JSON comes without free whitespace, its strings without raw control characters."""
        if kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {kind!r}", param)
        try:
            with self._lock:
                # JSON without free whitespace (separators ", " and ": "): with it, a model that likes a newline can
                # fill max_tokens with them inside the braces (the tiny test model does)
                if kind == "json_object":
                    return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                if kind == "json_schema":
                    return self.compiler.compile_grammar(json_ebnf(value))
                if kind == "regex":
                    return self.compiler.compile_regex(value)
                if kind == "grammar":
                    return self.compiler.compile_grammar(grammar_of(value))
                if kind == "structural_tag":
                    tag = json.loads(value) if isinstance(value, str) else value
                    return self.compiler.compile_structural_tag(json.dumps(_strict_tag(_structural(tag))))
                # choice: EBNF string literals take JSON's escapes
                return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value))
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"{param}: {_clean(e)}", param) from None


class Matcher:
    """One sequence's position in its grammar: the allowed-token mask for its next token, and the tokens it took.

    ``APPLY`` (class-wide): "xgrammar" (the default: on CPU, greedy rows held only by a grammar take the compiled
    ``masked_argmax_rows`` over their bitmasks (server.engine.sampler), sampled ones ``sample_rows`` with the same
    bitmasks, and other rows xgrammar's own
    ``apply_token_bitmask_inplace``; torch ops elsewhere) or "torch" (the bitmask unpacked and applied with torch ops
    on every device, to a copy of a step's greedy grammar rows at once). server.bench_structured times the two."""

    APPLY = "xgrammar"

    def __init__(self, compiled, vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def mask_(self, row: torch.Tensor) -> torch.Tensor:
        """row [V] (float32): every token the grammar does not allow next set to -inf, in place."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        apply_bitmask_(row.view(1, -1), self.bitmask, self.vocab_size)
        return row

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """Row ``index`` of a batch's bitmask (``allocate_bitmask``): the tokens this sequence may take next."""
        self.matcher.fill_next_token_bitmask(bitmask, index)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return xgr.allocate_token_bitmask(rows, vocab_size)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """logits [b, V'] (any float dtype, V' >= vocab_size): every token a row's bitmask [b, ceil(vocab_size / 32)]
    does not allow set to -inf, in place, by ``Matcher.APPLY``'s path (padded vocabulary columns beyond the
    tokenizer's are never allowed)."""
    if Matcher.APPLY == "xgrammar" and logits.device.type == "cpu" and logits.shape[1] == vocab_size:
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        return logits
    allowed = ((bitmask.unsqueeze(2) >> _SHIFTS.to(bitmask.device)) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab_size]
    n = min(logits.shape[1], vocab_size)
    logits[:, :n].masked_fill_(~allowed[:, :n].to(logits.device), float("-inf"))
    logits[:, n:] = float("-inf")
    return logits
