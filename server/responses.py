"""OpenAI's Responses API (``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``) over the chat path.

A request becomes a chat completion request (instructions -> a system message, input items -> messages, function
tools and tool_choice -> the chat forms, ``text.format`` -> ``response_format``, ``max_output_tokens`` ->
``max_completion_tokens``); its result becomes a response object whose output lists a ``message`` item (the text)
and a ``function_call`` item per call. A stream is the chat stream re-emitted as the Responses API's semantic events
(``response.created`` ... ``response.output_text.delta`` ... ``response.completed``), each with its
``sequence_number``. Stored responses (``store``, the default) are kept in memory, the most recent
``STORE_LIMIT``, so that ``previous_response_id`` continues a conversation and ``GET`` returns one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.protocol import FieldError, JsonSchemaFormat, RequestBody, check_metadata

STORE_LIMIT = 1000


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (an output_text part's annotations / logprobs)
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type not in ("input_text", "output_text"):
            raise ValueError(f"content parts of type {self.type!r} are not supported (this model takes text only)")
        if self.text is None:
            raise ValueError("a text part needs text")
        return self


class InputItem(BaseModel):
    """One item of ``input``: a message (``type`` "message" or absent), a ``function_call`` the model made earlier,
    or a ``function_call_output`` (a call's result)."""
    model_config = ConfigDict(extra="ignore")  # (ids and statuses of items echoed back from earlier output)
    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputText] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputText] | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type == "message" and (self.role is None or self.content is None):
            raise ValueError("a message item needs role and content")
        if self.type == "function_call" and (self.call_id is None or self.name is None or self.arguments is None):
            raise ValueError("a function_call item needs call_id, name and arguments")
        if self.type == "function_call_output" and (self.call_id is None or self.output is None):
            raise ValueError("a function_call_output item needs call_id and output")
        return self


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


class TextFormat(JsonSchemaFormat):
    type: Literal["text", "json_object", "json_schema"]


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (verbosity: a reasoning model's)
    format: TextFormat | None = None


class ResponsesRequest(RequestBody):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    # accepted with their one value here
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None
    include: list[str] | None = Field(default=None, max_length=0)
    reasoning: dict | None = None
    service_tier: str | None = None
    # extensions (as on the chat endpoint)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    top_k: int = Field(default=0, ge=0, le=100_000)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        return check_metadata(v)

    @model_validator(mode="after")
    def _checks(self):
        if isinstance(self.input, list) and not self.input:
            raise FieldError("input", "input must not be empty")
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise FieldError("reasoning", "this model does not reason: leave reasoning unset")
        if self.text and self.text.format and self.text.format.type == "json_schema" and self.text.format.schema_ is None:
            raise FieldError("text", "text.format of type json_schema needs a schema")
        return self


class Store:
    """The most recent ``STORE_LIMIT`` stored responses: the response object and the conversation that led to it
    (its messages without the instructions, and its output as the assistant's message), oldest dropped first."""

    def __init__(self, limit: int = STORE_LIMIT):
        self.limit, self.items = limit, OrderedDict()

    def put(self, response: dict, messages: list[dict]) -> None:
        self.items[response["id"]] = (response, messages)
        self.items.move_to_end(response["id"])
        while len(self.items) > self.limit:
            self.items.popitem(last=False)

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        return self.items.get(rid)

    def delete(self, rid: str) -> bool:
        return self.items.pop(rid, None) is not None


def _content(content):
    """A string, or the parts as the chat endpoint's text parts (joined there as for any chat request)."""
    return content if isinstance(content, str) else [{"type": "text", "text": part.text} for part in content]


def conversation(body: ResponsesRequest, history: list[dict]) -> list[dict]:
    """The chat messages of this turn, instructions not included: the stored conversation, then the input items."""
    messages = list(history)
    items = [InputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for item in items:
        if item.type == "message":
            messages.append({"role": item.role, "content": _content(item.content)})
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _content(item.output)})
    return messages


def chat_body(body: ResponsesRequest, messages: list[dict]) -> dict:
    """The chat completion request that computes this response (non-streamed or streamed with usage)."""
    out: dict[str, Any] = {"model": body.model, "messages": ([{"role": "system", "content": body.instructions}]
                                                             if body.instructions else []) + messages,
                           "stream": body.stream, "parallel_tool_calls": body.parallel_tool_calls,
                           "top_k": body.top_k, "priority": body.priority}
    if body.stream:
        out["stream_options"] = {"include_usage": True}
    for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("seed", "seed"), ("user", "user"), ("cache_salt", "cache_salt")):
        if getattr(body, ours) is not None:
            out[theirs] = getattr(body, ours)
    if body.tools:
        out["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                        for t in body.tools]
    if isinstance(body.tool_choice, FunctionChoice):
        out["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        out["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text":
        out["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            out["response_format"]["json_schema"] = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
    return out


# chat fields named in a 400 -> the Responses request's own
PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
          "response_format": "text"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_object(body: ResponsesRequest, rid: str, created: int, status: str, output: list[dict],
                    usage: dict | None, finish: str | None = None) -> dict:
    """The response object (OpenAI's fields, in its order)."""
    fmt = body.text.format if body.text and body.text.format else None
    fmt = fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None and fmt.type == "json_schema" else \
        {"type": fmt.type if fmt is not None else "text"}
    tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, FunctionChoice) else (body.tool_choice or "auto")
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" and finish == "length" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
        "output": output, "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id, "reasoning": None, "store": body.store,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": fmt}, "tool_choice": tool_choice,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled", "usage": usage,
        "user": body.user, "metadata": body.metadata or {},
    }


def usage_of(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def message_item(text: str, status: str, mid: str | None = None) -> dict:
    return {"type": "message", "id": mid or new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(call: dict, status: str = "completed", fid: str | None = None) -> dict:
    return {"type": "function_call", "id": fid or new_id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


def status_of(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


def from_chat(body: ResponsesRequest, rid: str, created: int, chat: dict) -> tuple[dict, dict]:
    """(the response object, the assistant's chat message) from a finished chat completion."""
    choice = chat["choices"][0]
    message, finish = choice["message"], choice["finish_reason"]
    status = status_of(finish)
    output = []
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        output.append(message_item(message.get("content") or "", status))
    output += [call_item(call) for call in calls]
    assistant = {"role": "assistant", "content": message.get("content")}
    if calls:
        assistant["tool_calls"] = calls
    return response_object(body, rid, created, status, output, usage_of(chat.get("usage")), finish), assistant


class EventStream:
    """Chat stream chunks in, Responses API events out (SSE lines), then the final response and assistant message."""

    def __init__(self, body: ResponsesRequest, rid: str, created: int):
        self.body, self.rid, self.created = body, rid, created
        self.seq = 0
        self.output: list[dict] = []
        self.text: dict | None = None  # the open message item
        self.calls: dict[int, dict] = {}  # chat tool-call index -> its open function_call item
        self.finish: str | None = None
        self.usage: dict | None = None
        self.response: dict | None = None

    def _event(self, type_: str, **fields) -> str:
        event = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(event)}\n\n"

    def start(self) -> list[str]:
        response = response_object(self.body, self.rid, self.created, "in_progress", [], None)
        return [self._event("response.created", response=response), self._event("response.in_progress", response=response)]

    def _close_text(self) -> list[str]:
        if self.text is None:
            return []
        item, self.text = self.text, None
        i = self.output.index(item)
        text = item["content"][0]["text"]
        item["status"] = "completed"
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [self._event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0, part=part),
                self._event("response.output_item.done", output_index=i, item=item)]

    def _close_calls(self) -> list[str]:
        out = []
        for _, item in sorted(self.calls.items()):
            i = self.output.index(item)
            item["status"] = "completed"
            out += [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=i, item=item)]
        self.calls = {}
        return out

    def chunk(self, chunk: dict) -> list[str]:
        out = []
        if chunk.get("usage"):
            self.usage = usage_of(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.text is None:
                    self.text = message_item("", "in_progress")
                    self.output.append(self.text)
                    i = len(self.output) - 1
                    out += [self._event("response.output_item.added", output_index=i,
                                        item={**self.text, "content": []}),
                            self._event("response.content_part.added", item_id=self.text["id"], output_index=i,
                                        content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                               "logprobs": []})]
                self.text["content"][0]["text"] += delta["content"]
                out.append(self._event("response.output_text.delta", item_id=self.text["id"],
                                       output_index=self.output.index(self.text), content_index=0,
                                       delta=delta["content"], logprobs=[]))
            for tc in delta.get("tool_calls") or []:
                fn = tc.get("function") or {}
                if tc["index"] not in self.calls:
                    out += self._close_text()  # text before a call ends with it
                    item = call_item({"id": tc.get("id") or new_id("call"),
                                      "function": {"name": fn.get("name", ""), "arguments": ""}}, "in_progress")
                    self.calls[tc["index"]] = item
                    self.output.append(item)
                    out.append(self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
                item = self.calls[tc["index"]]
                if fn.get("arguments"):
                    item["arguments"] += fn["arguments"]
                    out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                           output_index=self.output.index(item), delta=fn["arguments"]))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def end(self) -> list[str]:
        status = status_of(self.finish)
        out = self._close_text() + self._close_calls()
        if not self.output:  # nothing was written: an empty message, as the non-streamed response has
            self.output.append(message_item("", status))
        for item in self.output:
            if item["type"] == "message" and status == "incomplete":
                item["status"] = "incomplete"
        self.response = response_object(self.body, self.rid, self.created, status, self.output, self.usage, self.finish)
        return out + [self._event("response.completed" if status == "completed" else "response.incomplete",
                                  response=self.response)]

    def fail(self, error: dict) -> str:
        """The stream's last event where generating failed: ``response.failed``, its response's error OpenAI's
        ``{code, message}`` (``error``: the chat stream's error object), its unfinished items incomplete."""
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        self.response = response_object(self.body, self.rid, self.created, "failed", self.output, self.usage)
        self.response["error"] = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        return self._event("response.failed", response=self.response)

    def assistant(self) -> dict:
        text = "".join(i["content"][0]["text"] for i in self.output if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.output if i["type"] == "function_call"]
        return {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}


def now() -> int:
    return int(time.time())
