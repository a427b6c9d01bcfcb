"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) over the chat path, as vLLM and
llama.cpp serve it, so Anthropic's SDK and the tools built on it can call the server.

A request becomes a chat completion request: ``system`` -> a system message; each message's text blocks -> its
content, an assistant's ``tool_use`` blocks -> its ``tool_calls`` (``input`` as JSON arguments), a user's
``tool_result`` blocks -> ``tool`` messages; ``tools`` (``input_schema``) and ``tool_choice`` (auto / any / tool /
none, ``disable_parallel_tool_use``) -> the chat forms, held to the tools' schemas as chat's are;
``stop_sequences`` -> ``stop``, ``output_config.format`` (a JSON schema) -> ``response_format``. The result becomes
a message whose ``content`` lists a ``text`` block and a ``tool_use`` block per call, with Anthropic's
``stop_reason`` (``end_turn``, ``max_tokens``, ``stop_sequence`` with the sequence that matched, ``tool_use``) and
``usage`` (prompt tokens from the prefix cache as ``cache_read_input_tokens``). A stream is the chat stream
re-emitted as Anthropic's events (``message_start``, ``content_block_start`` / ``_delta`` / ``_stop``,
``message_delta``, ``message_stop``; ``error`` where generating failed). Errors have Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}`` (server.app).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from server.protocol import MAX_STOP, FieldError, RequestBody

# HTTP status -> Anthropic's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error"}
# chat fields named in a 400 -> the Messages request's own
PARAMS = {"max_completion_tokens": "max_tokens", "max_tokens": "max_tokens", "stop": "stop_sequences",
          "response_format": "output_config"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict]


class SystemBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (cache_control, citations: nothing to do here)
    type: Literal["text"]
    text: str


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (cache_control)
    type: Literal["custom"] | None = None  # (Anthropic's server tools - web search, code execution - are not served)
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    input_schema: dict


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice of type tool names the tool (name), and only it")
        return self


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(BaseModel):
    """Anthropic's structured output (``format``: a JSON schema the text follows, as chat's response_format) and
    ``effort`` (accepted: this model does not think, so there is no effort to spend)."""
    model_config = ConfigDict(extra="forbid")
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class CountTokensRequest(RequestBody):
    """``POST /v1/messages/count_tokens``: the fields that make the prompt."""
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[SystemBlock] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: dict | None = None
    _chat_messages: list[dict] = PrivateAttr(default_factory=list)  # (conversation's, made while validating)

    @model_validator(mode="after")
    def _checks(self):
        if self.thinking and self.thinking.get("type") not in (None, "disabled"):
            raise FieldError("thinking", "this model does not think: leave thinking unset or disabled")
        names = [t.name for t in self.tools or []]
        if self.tool_choice is not None and self.tool_choice.type == "tool" and self.tool_choice.name not in names:
            raise FieldError("tool_choice", f"{self.tool_choice.name!r} is not among the tools")
        self._chat_messages = conversation(self)  # (every block checked here: a 400 naming messages)
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=1_000_000)
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    metadata: dict | None = None  # ({"user_id": ...}: accepted, not used)
    service_tier: str | None = None  # (one tier here)
    output_config: OutputConfig | None = None
    cache_control: dict | None = None  # (accepted: the prefix cache reuses any prompt's opening unasked)
    # extensions (as on the chat endpoint)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)


def _text(blocks, where: str) -> str:
    """The text of a string or of text blocks (a tool result's content, a system prompt)."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for b in blocks:
        b = b if isinstance(b, dict) else b.model_dump()
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise FieldError("messages", f"{where}: blocks of type {b.get('type')!r} are not supported (this model "
                                         "takes text only)")
        parts.append(b["text"])
    return "\n".join(parts)


def conversation(body: CountTokensRequest) -> list[dict]:
    """The chat messages of a Messages request: the system prompt, then each message's blocks in chat's forms."""
    out: list[dict] = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls, results = [], [], 0
        for b in m.content:
            kind = b.get("type")
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # (a thinking model's earlier turn: this model does not read thoughts)
            elif kind == "tool_use" and m.role == "assistant":
                if not (isinstance(b.get("id"), str) and isinstance(b.get("name"), str)
                        and isinstance(b.get("input"), dict)):
                    raise FieldError("messages", f"messages.{i}: a tool_use block needs id, name and input (an object)")
                calls.append({"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b["input"])}})
            elif kind == "tool_result" and m.role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise FieldError("messages", f"messages.{i}: a tool_result block needs tool_use_id")
                result = _text(b.get("content"), f"messages.{i}.tool_result")
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                            "content": ("Error: " + result) if b.get("is_error") else result})
                results += 1
            else:
                raise FieldError("messages", f"messages.{i}: {m.role} blocks of type {kind!r} are not supported "
                                             "(this model takes text, and tool_use / tool_result blocks)")
        if m.role == "assistant":
            out.append({"role": "assistant", "content": "".join(texts) or (None if calls else ""),
                        **({"tool_calls": calls} if calls else {})})
        elif texts or not results:  # (a turn of tool results alone is those results)
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def chat_body(body: CountTokensRequest, stream: bool = False) -> dict:
    """The chat completion request that computes this message (or, for count_tokens, renders its prompt)."""
    out: dict[str, Any] = {"model": body.model, "messages": body._chat_messages}
    if body.tools:
        out["tools"] = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                                          **({"description": t.description} if t.description else {})}}
                        for t in body.tools]
    choice = body.tool_choice
    if choice is not None and body.tools:
        out["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool" else
                              {"auto": "auto", "any": "required", "none": "none"}[choice.type])
        if choice.disable_parallel_tool_use:
            out["parallel_tool_calls"] = False
    if isinstance(body, MessagesRequest):
        out.update(max_completion_tokens=body.max_tokens, stream=stream, priority=body.priority)
        for ours in ("temperature", "top_p", "top_k", "seed", "cache_salt"):
            if getattr(body, ours) is not None:
                out[ours] = getattr(body, ours)
        fmt = body.output_config.format if body.output_config else None
        if fmt is not None:
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
        if body.stop_sequences:  # (kept in the text, so the one that matched can be named, then cut here)
            out.update(stop=body.stop_sequences, include_stop_str_in_output=True)
        if stream:  # (every chunk with the usage so far: message_start reports the prompt's tokens)
            out["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _matched(text: str, stops: list[str] | None) -> str | None:
    """The stop sequence the text ends with (it was kept in the text: chat_body), or None."""
    return next((s for s in sorted(stops or (), key=len, reverse=True) if text.endswith(s)), None)


def usage_of(chat_usage: dict | None) -> dict:
    u = chat_usage or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": u.get("prompt_tokens", 0) - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": u.get("completion_tokens", 0)}


def stop_reason(finish: str | None, called: bool, stop: str | None) -> str:
    if finish == "length":
        return "max_tokens"
    if called:
        return "tool_use"
    return "stop_sequence" if stop is not None else "end_turn"


def _input(arguments: str) -> dict:
    """A call's arguments as the tool_use block's input ({} where max_tokens cut them before they parse)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def from_chat(body: MessagesRequest, mid: str, chat: dict) -> dict:
    """The message object from a finished chat completion."""
    choice = chat["choices"][0]
    message, finish = choice["message"], choice["finish_reason"]
    text = message.get("content") or ""
    stop = _matched(text, body.stop_sequences) if finish == "stop" else None
    if stop is not None:
        text = text[: len(text) - len(stop)]
    content = [{"type": "text", "text": text}] if text else []
    calls = message.get("tool_calls") or []
    content += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": _input(c["function"]["arguments"])} for c in calls]
    return {"id": mid, "type": "message", "role": "assistant", "model": body.model, "content": content,
            "stop_reason": stop_reason(finish, bool(calls), stop), "stop_sequence": stop,
            "usage": usage_of(chat.get("usage"))}


class EventStream:
    """Chat stream chunks in, Anthropic's message stream events out (SSE lines)."""

    def __init__(self, body: MessagesRequest, mid: str):
        self.body, self.mid = body, mid
        self.started = False
        self.index = -1  # the open content block's index (-1: none)
        self.open: str | None = None  # its type: "text" or "tool_use"
        self.calls: dict[int, int] = {}  # chat tool-call index -> its block's index
        self.text = ""  # all text so far (a stop sequence is cut from its end)
        self.finish: str | None = None
        self.stop: str | None = None  # the stop sequence that ended it
        self.usage: dict | None = None

    @staticmethod
    def _event(type_: str, **fields) -> str:
        return f"event: {type_}\ndata: {json.dumps({'type': type_, **fields})}\n\n"

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [self._event("content_block_stop", index=self.index)]

    def _block(self, block: dict) -> list[str]:
        out = self._close()
        self.index += 1
        self.open = block["type"]
        return out + [self._event("content_block_start", index=self.index, content_block=block)]

    def chunk(self, chunk: dict) -> list[str]:
        out = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if not self.started:
            self.started = True
            usage = {**usage_of(self.usage), "output_tokens": 0}
            out += [self._event("message_start", message={"id": self.mid, "type": "message", "role": "assistant",
                                                          "model": self.body.model, "content": [], "stop_reason": None,
                                                          "stop_sequence": None, "usage": usage}),
                    self._event("ping")]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                whole = self.text + text
                self.stop = _matched(whole, self.body.stop_sequences) if self.finish == "stop" else None
                if self.stop is not None:  # (all of it comes in the last chunk: the engine held its start back)
                    text = whole[len(self.text) : len(whole) - len(self.stop)]
            if text:
                if self.open != "text":
                    out += self._block({"type": "text", "text": ""})
                self.text += text
                out.append(self._event("content_block_delta", index=self.index,
                                       delta={"type": "text_delta", "text": text}))
            for tc in delta.get("tool_calls") or []:
                fn = tc.get("function") or {}
                if tc["index"] not in self.calls:
                    out += self._block({"type": "tool_use", "id": tc.get("id") or new_id("toolu"),
                                        "name": fn.get("name", ""), "input": {}})
                    self.calls[tc["index"]] = self.index
                if fn.get("arguments"):
                    out.append(self._event("content_block_delta", index=self.calls[tc["index"]],
                                           delta={"type": "input_json_delta", "partial_json": fn["arguments"]}))
        return out

    def end(self) -> list[str]:
        usage = usage_of(self.usage)
        return self._close() + [
            self._event("message_delta", delta={"stop_reason": stop_reason(self.finish, bool(self.calls), self.stop),
                                                "stop_sequence": self.stop},
                        usage={"output_tokens": usage["output_tokens"]}),
            self._event("message_stop")]

    def start(self) -> list[str]:
        return []  # (message_start comes with the first chunk: it carries the prompt's token count)

    def fail(self, error: dict) -> str:
        """The stream's last event where generating failed (``error``: the chat stream's error object)."""
        return f"event: error\ndata: {json.dumps(error_body(500, error.get('message') or 'internal error'))}\n\n"
