"""Tool calling for /v1/chat/completions, the serving half: the grammar that holds calls to the tools' schemas, and
the parser that turns the model's output back into OpenAI ``tool_calls``. The prompt side (tools and calls written
into the chat template, Hermes' call format) is remix.chat, shared with training.

Generation is held to the format by an xgrammar structural tag (server.engine.grammar): with tool_choice "auto" the
model writes text freely until it opens a call (``<tool_call>``; llama3_json: ``{"name": ``), from where the call must
name one of the tools and give arguments that satisfy that tool's parameters schema; "required" allows calls only
(one or more, Hermes' on separate lines, llama3_json's separated by "; "; exactly one with parallel_tool_calls false);
a named function, exactly one call of it. ``CallParser`` splits the output, whole or as it streams, back into content
and calls. The format is the chat template's (remix.chat.call_format).
"""

from __future__ import annotations

import json
import re
import uuid

from remix import chat
from remix.chat import CLOSE, HERMES, LLAMA3_JSON, OPEN

END = "}\n" + CLOSE  # the call object's closing brace, then the closing tag
L3_OPEN = '{"name": '  # llama3_json: a call is the object itself


def prompt_ids(tokenizer, messages, tools=None, add_generation_prompt: bool = True, continue_final_message: bool = False,
               template_kwargs: dict | None = None) -> list[int]:
    """remix.chat.prompt_ids for the request models (protocol.ChatMessage, protocol.Tool)."""
    return chat.prompt_ids(tokenizer, [m.model_dump(exclude_none=True) for m in messages],
                           [t.model_dump(exclude_none=True) for t in tools or []] or None, add_generation_prompt,
                           continue_final_message, template_kwargs)


def structural_tag(tools, mode: str, parallel: bool, named: str | None = None, call_format: str = HERMES) -> dict:
    """xgrammar's structural tag for mode "auto", "required" or "named" (the function ``named``), in ``call_format``.
    Arguments follow each tool's parameters schema (any object without one); server.engine.grammar compiles each
    schema as it compiles response_format's: no free whitespace (a small model otherwise can fill max_tokens with
    newlines inside the braces), strings without raw control characters."""
    llama = call_format == LLAMA3_JSON

    def tag(t):
        schema = t.function.parameters if t.function.parameters is not None else {"type": "object"}
        name = json.dumps(t.function.name)
        begin = L3_OPEN + name + ', "parameters": ' if llama else OPEN + "\n" + '{"name": ' + name + ', "arguments": '
        return {"type": "tag", "begin": begin, "end": "}" if llama else END,
                "content": {"type": "json_schema", "json_schema": schema}}

    if mode == "named":
        fmt = tag(next(t for t in tools if t.function.name == named))
    elif mode == "required":
        fmt = {"type": "tags_with_separator", "tags": [tag(t) for t in tools], "separator": "; " if llama else "\n",
               "at_least_one": True, "stop_after_first": not parallel}
    elif mode == "auto":
        fmt = {"type": "triggered_tags", "triggers": [L3_OPEN if llama else OPEN], "tags": [tag(t) for t in tools],
               "at_least_one": False, "stop_after_first": not parallel}
    else:
        raise ValueError(f"unknown tool mode {mode!r}")
    return {"type": "structural_tag", "format": fmt}


def _held(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that could be the start of ``marker`` (kept back until it is
    known whether the marker follows)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class CallParser:
    """Splits one choice's output, as it arrives, into content and tool calls (Hermes' format, or llama3_json's).

    ``feed(text)`` and, at the end, ``finish()`` return events: ("content", text), ("call", index, name) when a
    call's name is known, ("arguments", index, text) for each further piece of its arguments (JSON text). Text that
    could still become a call's opening is held back until it is known. A call cut off (max_tokens) keeps the
    arguments it got; an opening never followed by a readable name is content after all. llama3_json's arguments end
    where their JSON object closes (strings and escapes followed), then the call's own brace and a "; " separator
    are dropped."""

    HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
    L3_HEADER = re.compile(r'"((?:[^"\\]|\\.)*)"\s*,\s*"(?:parameters|arguments)"\s*:\s*')

    def __init__(self, call_format: str = HERMES):
        self.llama = call_format == LLAMA3_JSON
        self.open = L3_OPEN if self.llama else OPEN
        self.buf = ""
        self.state = "text"  # text | header | arguments (| close: llama3_json's brace and separator after them)
        self.calls: list[list[str]] = []  # [id, name, arguments]
        self.content = ""
        self.depth, self.in_string, self.escaped = 0, False, False  # llama3_json: where the arguments are in their JSON

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        out = []
        while True:
            if self.state == "text":
                if not self._through(self.open, self._content, out):
                    return out
                self.state = "header"
            elif self.state == "header":
                m = (self.L3_HEADER if self.llama else self.HEADER).match(self.buf)
                if m is None or m.end() == len(self.buf):
                    return out  # (not yet: the header, or the whitespace after its colon, may go on)
                self.calls.append([f"call_{uuid.uuid4().hex[:24]}", json.loads(f'"{m.group(1)}"'), ""])
                out.append(("call", len(self.calls) - 1, self.calls[-1][1]))
                self.buf, self.state = self.buf[m.end():], "arguments"
                self.depth, self.in_string, self.escaped = 0, False, False
            elif self.state == "arguments" and not self.llama:
                if not self._through(END, self._arguments, out):
                    return out
                self.state = "text"
            elif self.state == "arguments":
                end = self._json_end()
                self._arguments(out, self.buf[:end])
                self.buf = self.buf[end:]
                if self.depth > 0 or end == 0:
                    return out
                self.state = "close"
            else:  # llama3_json: the call's closing brace, then a separator before the next call
                m = re.match(r"\s*\}?\s*;?\s*", self.buf)
                if m.end() == len(self.buf):
                    return out  # (more may come)
                self.buf, self.state = self.buf[m.end():], "text"

    def _json_end(self) -> int:
        """How much of the buffer belongs to the arguments: all of it while their object is open, else up to the
        character that closes it."""
        for i, ch in enumerate(self.buf):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return len(self.buf)

    def _through(self, marker: str, emit, out: list) -> bool:
        """Emit the buffer up to ``marker`` and drop the marker; without it, emit all but an end that could be its
        start (kept for the next piece). Whether the marker came."""
        i = self.buf.find(marker)
        cut = i if i >= 0 else len(self.buf) - _held(self.buf, marker)
        emit(out, self.buf[:cut])
        self.buf = self.buf[i + len(marker):] if i >= 0 else self.buf[cut:]
        return i >= 0

    def finish(self) -> list[tuple]:
        out = []
        if self.state == "header":
            self._content(out, self.open + self.buf)
        elif self.state == "arguments" and not self.llama:  # cut off: without the part of the closing that came (one
            k = _held(self.buf, END)                          # "}" may be the arguments' own)
            self._arguments(out, self.buf[:len(self.buf) - k] if k > 1 else self.buf)
        elif self.state in ("arguments", "close"):  # (llama3_json: its arguments went out as they came)
            self._arguments(out, self.buf if self.state == "arguments" else "")
        else:
            self._content(out, self.buf)
        self.buf, self.state = "", "text"
        return out

    def _content(self, out: list, text: str) -> None:
        if text:
            self.content += text
            out.append(("content", text))

    def _arguments(self, out: list, text: str) -> None:
        if text:
            self.calls[-1][2] += text
            out.append(("arguments", len(self.calls) - 1, text))

    def tool_calls(self) -> list[dict]:
        """The calls so far, in OpenAI's message form."""
        return [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                for cid, name, args in self.calls]
