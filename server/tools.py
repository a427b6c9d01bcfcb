"""Tool calling for /v1/chat/completions: the request's tools go into the prompt, and the model's calls come back as
OpenAI ``tool_calls``.

One call format, Hermes' (Qwen2.5, Qwen3, NousResearch Hermes)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that writes this format itself (its source mentions ``<tool_call>``) renders the tools, the earlier
calls and their results. Any other template (SmolLM2's has no tool support) gets them written in that format by this
module: the tools in a system message (Qwen2.5's wording), earlier calls inside the assistant's content, results as
user turns in ``<tool_response>`` tags.

Generation is held to the format by an xgrammar structural tag (server.engine.grammar): with tool_choice "auto" the
model writes text freely until it opens ``<tool_call>``, from where the call must name one of the tools and give
arguments that satisfy that tool's parameters schema; "required" allows calls only (one or more; exactly one with
parallel_tool_calls false); a named function, exactly one call of it. ``CallParser`` splits the output, whole or as it
streams, back into content and calls.
"""

from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
END = "}\n" + CLOSE  # the call object's closing brace, then the closing tag

SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def native(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes tools and calls in this format itself."""
    template = tokenizer.chat_template
    return isinstance(template, str) and OPEN in template


def _arguments(text: str):
    """A call's arguments as templates want them: the object when the text is JSON, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call_text(name: str, arguments: str) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': _arguments(arguments)}, ensure_ascii=False)}\n{CLOSE}"


def conversation(tokenizer, messages, tools) -> tuple[list[dict], dict]:
    """The messages (protocol.ChatMessage) and tools (protocol.Tool, or None) as the chat template's arguments:
    (messages as dicts, extra keyword arguments). Without tools or tool messages, each message is {role, content}
    (and name), as before tool support."""
    own = native(tokenizer)
    out: list[dict] = []
    last_tool = False  # the previous message was a tool result (merged into one user turn when written here)
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        d = {"role": role, "content": m.text}
        if m.name is not None:
            d["name"] = m.name
        if m.role == "tool" and own:
            d = {"role": "tool", "content": m.text, "tool_call_id": m.tool_call_id}
        elif m.role == "tool":
            block = f"<tool_response>\n{m.text}\n</tool_response>"
            if last_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            last_tool = True
            continue
        elif m.tool_calls and own:
            d["tool_calls"] = [{"type": "function", **({"id": c.id} if c.id else {}),
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
        elif m.tool_calls:
            d["content"] = "\n".join(([m.text] if m.text else [])
                                     + [_call_text(c.function.name, c.function.arguments) for c in m.tool_calls])
        last_tool = False
        out.append(d)
    specs = [t.model_dump(exclude_none=True) for t in tools or []]
    if specs and own:
        return out, {"tools": specs}
    if specs:
        text = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(s, ensure_ascii=False) for s in specs))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def prompt_ids(tokenizer, messages, tools=None, add_generation_prompt: bool = True, continue_final_message: bool = False,
               template_kwargs: dict | None = None) -> list[int]:
    """The chat template applied to the conversation (and tools), as token ids; continue_final_message: the last
    (assistant) message left open for the model to go on with; template_kwargs: the template's own variables."""
    msgs, extra = conversation(tokenizer, messages, tools)
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        continue_final_message=continue_final_message, **(template_kwargs or {}), **extra)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def structural_tag(tools, mode: str, parallel: bool, named: str | None = None) -> dict:
    """xgrammar's structural tag for mode "auto", "required" or "named" (the function ``named``). Arguments follow
    each tool's parameters schema (any object without one), with at most one whitespace character in a row (a
    small model otherwise can fill max_tokens with newlines inside the braces)."""
    def tag(t):
        schema = t.function.parameters if t.function.parameters is not None else {"type": "object"}
        begin = OPEN + "\n" + '{"name": ' + json.dumps(t.function.name) + ', "arguments": '
        return {"type": "tag", "begin": begin, "end": END,
                "content": {"type": "json_schema", "json_schema": schema, "style": "json", "max_whitespace_cnt": 1}}

    if mode == "named":
        fmt = tag(next(t for t in tools if t.function.name == named))
    elif mode == "required":
        fmt = {"type": "tags_with_separator", "tags": [tag(t) for t in tools], "separator": "\n",
               "at_least_one": True, "stop_after_first": not parallel}
    elif mode == "auto":
        fmt = {"type": "triggered_tags", "triggers": [OPEN], "tags": [tag(t) for t in tools],
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
    """Splits one choice's output, as it arrives, into content and tool calls.

    ``feed(text)`` and, at the end, ``finish()`` return events: ("content", text), ("call", index, name) when a
    call's name is known, ("arguments", index, text) for each further piece of its arguments (JSON text). Text that
    could still become a call's opening tag is held back until it is known. A call cut off (max_tokens) keeps the
    arguments it got; an opening tag never followed by a readable name is content after all."""

    HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def __init__(self):
        self.buf = ""
        self.state = "text"  # text | header | arguments
        self.calls: list[list[str]] = []  # [id, name, arguments]
        self.content = ""

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        out = []
        while True:
            if self.state == "text":
                i = self.buf.find(OPEN)
                cut = i if i >= 0 else len(self.buf) - _held(self.buf, OPEN)
                self._content(out, self.buf[:cut])
                if i < 0:
                    self.buf = self.buf[cut:]
                    return out
                self.buf, self.state = self.buf[i + len(OPEN):], "header"
            elif self.state == "header":
                m = self.HEADER.match(self.buf)
                if m is None or m.end() == len(self.buf):
                    return out  # (not yet: the header, or the whitespace after its colon, may go on)
                self.calls.append([f"call_{uuid.uuid4().hex[:24]}", json.loads(f'"{m.group(1)}"'), ""])
                out.append(("call", len(self.calls) - 1, self.calls[-1][1]))
                self.buf, self.state = self.buf[m.end():], "arguments"
            else:
                i = self.buf.find(END)
                cut = i if i >= 0 else len(self.buf) - _held(self.buf, END)
                self._arguments(out, self.buf[:cut])
                if i < 0:
                    self.buf = self.buf[cut:]
                    return out
                self.buf, self.state = self.buf[i + len(END):], "text"

    def finish(self) -> list[tuple]:
        out = []
        if self.state == "header":
            self._content(out, OPEN + self.buf)
        elif self.state == "arguments":  # cut off: without the part of the closing that came (one "}" may be the
            k = _held(self.buf, END)      # arguments' own)
            self._arguments(out, self.buf[:len(self.buf) - k] if k > 1 else self.buf)
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
