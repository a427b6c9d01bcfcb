"""OpenAI-shaped request and response models (one request model per endpoint, fields in the order of
OpenAI's docs, bounds in ``Field``), and the translation of a request into engine sampling parameters."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from remix.chat import HERMES
from server import tools
from server.engine import SamplingParams

MAX_STOP = 8
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")  # vLLM's fields before structured_outputs
MAX_LOGIT_BIAS = 1024


class FieldError(ValueError):
    """A check across fields that blames one of them: the 400 names ``param`` (a plain ValueError from a model
    validator names no field)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or json_schema; and vLLM's
    structural_tag (xgrammar's ``format``, or the older ``structures`` and ``triggers``)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    format: dict | None = None
    structures: list[dict] | None = None
    triggers: list[str] | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type json_schema needs json_schema.schema")
        tagged = self.format is not None or self.structures is not None or self.triggers is not None
        if self.type == "structural_tag" and (self.format is None) == (self.structures is None or self.triggers is None):
            raise ValueError("type structural_tag needs format, or structures and triggers")
        if self.type != "structural_tag" and tagged:
            raise ValueError("format, structures and triggers go with type structural_tag")
        return self

    def structural_tag(self) -> dict:
        if self.format is not None:
            return {"type": "structural_tag", "format": self.format}
        return {"structures": self.structures, "triggers": self.triggers}


def _json_spec(v, param: str):
    """A JSON schema or structural tag given as an object or as JSON text (vLLM takes either): the object."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError as e:
            raise FieldError(param, f"not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise FieldError(param, "must be a JSON object")
    return v


def closed_objects(schema):
    """vLLM's disable_additional_properties: every object schema that does not say otherwise gets
    ``additionalProperties: false`` (so a model cannot add keys of its own)."""
    if isinstance(schema, list):
        return [closed_objects(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (its form since v0.12, which replaced the guided_* fields): exactly one of json
    (a JSON schema: an object or JSON text), regex, choice, grammar (EBNF, as xgrammar and llama.cpp's GBNF write it,
    or Lark), json_object (true: any JSON object) and structural_tag (xgrammar's, or vLLM's older structures and
    triggers). disable_additional_properties closes the schema's objects; disable_any_whitespace is accepted, since
    JSON is generated without free whitespace either way; whitespace_pattern is refused (no free whitespace to shape)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1, max_length=10_000)
    choice: list[str] | None = Field(default=None, max_length=256)
    grammar: str | None = Field(default=None, min_length=1, max_length=100_000)
    json_object: bool | None = None
    structural_tag: dict | str | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [name for name, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                      ("grammar", self.grammar), ("json_object", self.json_object),
                                      ("structural_tag", self.structural_tag)) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object and structural_tag"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.whitespace_pattern is not None:
            raise FieldError("whitespace_pattern", "whitespace_pattern is not supported: JSON is generated without "
                                                   "free whitespace")
        if self.json_object is False:
            raise FieldError("json_object", "json_object must be true where given")
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise FieldError("choice", "choice must be a non-empty list of non-empty strings")
        if self.json_ is not None:
            self.json_ = _json_spec(self.json_, "json")
        if self.structural_tag is not None:
            self.structural_tag = _json_spec(self.structural_tag, "structural_tag")
        return self

    def grammar_spec(self) -> tuple:
        """(kind, spec, field) for the engine's compiler (server.engine.grammar)."""
        where = "structured_outputs."
        if self.json_ is not None:
            schema = closed_objects(self.json_) if self.disable_additional_properties else self.json_
            return ("json_schema", schema, where + "json")
        if self.regex is not None:
            return ("regex", self.regex, where + "regex")
        if self.choice is not None:
            return ("choice", list(self.choice), where + "choice")
        if self.grammar is not None:
            return ("grammar", self.grammar, where + "grammar")
        if self.json_object:
            return ("json_object", None, where + "json_object")
        return ("structural_tag", self.structural_tag, where + "structural_tag")


def valid_unicode(data, path: str = "") -> None:
    """Raises FieldError naming the first string of a request body (nested: its dotted path) that is not valid Unicode:
    JSON's escapes can carry a lone surrogate (\\ud800), which no tokenizer encodes - it had surfaced as a 500."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FieldError(path or "body", f"not valid Unicode: it holds a lone surrogate (U+{ord(data[e.start]):04X})"
                             ) from None
    elif isinstance(data, dict):
        for k, v in data.items():
            valid_unicode(k, path)
            valid_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            valid_unicode(v, f"{path}.{i}" if path else str(i))


def null_is_default(model: type[BaseModel], data):
    """A request body with every null of an optional field dropped, so that field's default applies: OpenAI's API reads
    null as "not given" for each of them (temperature, n, stream, max_tokens, ...), and clients such as LangChain's and
    LiteLLM's send it. A required field's null (model, prompt, messages) stays, and fails as a missing value."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if v is not None or k not in model.model_fields or model.model_fields[k].is_required()}


def check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's limits on ``metadata``: at most 16 pairs, keys of at most 64 characters, values of at most 512."""
    if v is None:
        return v
    if len(v) > 16:
        raise ValueError(f"at most 16 key-value pairs, got {len(v)}")
    for key, value in v.items():
        if len(key) > 64:
            raise ValueError(f"keys may have at most 64 characters, got one of {len(key)}")
        if len(value) > 512:
            raise ValueError(f"values may have at most 512 characters; {key!r}'s has {len(value)}")
    return v


class RequestBody(BaseModel):
    """A request body of the generating endpoints and /tokenize: unknown fields refused, every string valid Unicode
    (valid_unicode), and an optional field's null its default (null_is_default)."""
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data):
        valid_unicode(data)
        return null_is_default(cls, data)


class _Common(RequestBody):
    """The fields both endpoints take (OpenAI's, then the extensions), their checks, and the sampling parameters
    they make; each endpoint adds its prompt, max_tokens and logprobs fields."""

    model: str
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # extensions
    top_k: int = Field(default=0, ge=0, le=100_000)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # vLLM's: tokens below min_p x the top token's probability dropped
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(default=0, ge=0, le=1_000_000)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's (since v0.12)
    guided_json: dict | str | None = None  # vLLM's earlier fields, which tools written for it still send
    guided_regex: str | None = Field(default=None, min_length=1, max_length=10_000)
    guided_choice: list[str] | None = Field(default=None, max_length=256)
    guided_grammar: str | None = Field(default=None, min_length=1, max_length=100_000)
    guided_decoding_backend: str | None = None  # accepted: xgrammar serves every grammar
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the text stays in it
    skip_special_tokens: bool = True  # vLLM's: false keeps special tokens' text in the output
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1, max_length=1_000_000)  # vLLM's
    bad_words: list[str] | None = Field(default=None, max_length=256)  # vLLM's: words never completed
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # vLLM's: the prompt cut to its last k tokens
    truncation_side: Literal["left", "right"] | None = None  # vLLM's: "right" keeps the first k instead
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:{id}"
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids beside the text
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: each prompt token's log p, rank, top-N
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)  # vLLM's: lower is admitted first
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)  # vLLM's: prefix cache per salt
    remix_routing: Literal["summary", "full"] | None = None  # the LoRAs each module chose for this request

    @model_validator(mode="after")
    def _one_grammar(self):
        given = [name for name, on in (("response_format", self.response_format is not None
                                        and self.response_format.type != "text"),
                                       ("structured_outputs", self.structured_outputs is not None),
                                       *((f, getattr(self, f) is not None) for f in GUIDED)) if on]
        if len(given) > 1:
            raise ValueError(f"give at most one of response_format, structured_outputs and the guided_* fields (got "
                             f"{', '.join(given)})")
        if self.guided_json is not None:
            self.guided_json = _json_spec(self.guided_json, "guided_json")
        return self

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, v):
        if v is not None and any(not w.strip() for w in v):
            raise ValueError("bad words must be non-empty")
        return v or None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate(cls, v):
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be -1 (as many as fit beside max_tokens) or at least 1")
        return v

    def truncated(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's ids as truncate_prompt_tokens (and truncation_side) cut them; -1: to as many as leave room in
        the model's context for the tokens asked for (max_tokens; a chat request that gives none: one)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        if k == -1:
            room = getattr(self, "max_completion_tokens", None) or self.max_tokens
            k = max(1, max_model_len - (1 if room is None else room))
        return ids[:k] if self.truncation_side == "right" else ids[-k:]

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, v):
        if v is not None and (not v or any(not c for c in v)):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        """OpenAI's form: token ids (as strings, JSON object keys) to a bias in [-100, 100]."""
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        for key, bias in v.items():
            if not key.strip().isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def sampling(self, max_tokens: int, logprobs: int | None, grammar: tuple | None = None, **more) -> SamplingParams:
        """grammar: (kind, spec, field) for the engine's compiler; None: the one this request's own fields ask for."""
        bias = {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None
        more.setdefault("n", self.n)
        if self.prompt_logprobs is not None:  # (vLLM's; beside echo's, the more alternatives of the two)
            more["prompt_logprobs"] = max(self.prompt_logprobs, more.get("prompt_logprobs") or 0)
            more["prompt_ranks"] = True
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p,
                              seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, logit_bias=bias, min_tokens=self.min_tokens,
                              stop_token_ids=list(self.stop_token_ids or []), grammar=grammar or _grammar(self),
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              skip_special_tokens=self.skip_special_tokens,
                              allowed_token_ids=list(self.allowed_token_ids) if self.allowed_token_ids else None,
                              **more)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=1, le=16)  # sequences generated per prompt; the n best returned
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int = Field(default=16, ge=0, le=1_000_000)  # 0: the prompt alone (with echo + logprobs: scored)
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's (and HF's): the tokenizer's own special tokens (a BOS) around a text

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of < self.n:
            raise FieldError("best_of", f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.ranked and self.stream:
            raise FieldError("best_of", "best_of above n cannot be streamed (the best are known only at the end)")
        return self

    @property
    def ranked(self) -> bool:
        """Whether more sequences are generated than returned (best_of > n): the n best by mean token log-probability."""
        return self.best_of is not None and self.best_of > self.n

    def to_sampling(self) -> SamplingParams:
        # ranking needs every generated token's log-probability: asked of the engine even when not returned
        logprobs = self.logprobs if not self.ranked or self.logprobs is not None else 0
        return self.sampling(self.max_tokens, logprobs, echo=self.echo, n=self.best_of if self.ranked else self.n,
                             prompt_logprobs=self.logprobs if self.echo else None)


TEMPLATE_ARGS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                 "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                 "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


class _Template(BaseModel):
    """vLLM's chat-template controls (chat and /tokenize): add_generation_prompt (the assistant turn's header after the
    messages), continue_final_message (the last message, an assistant's, left open: the model goes on with it; then
    no generation prompt unless asked for, which is an error) and chat_template_kwargs (the template's own variables)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None

    @model_validator(mode="after")
    def _template(self):
        if self.continue_final_message:
            if "add_generation_prompt" in self.model_fields_set and self.add_generation_prompt:
                raise FieldError("continue_final_message", "continue_final_message and add_generation_prompt cannot "
                                                           "both be true")
            self.add_generation_prompt = False
            if self.messages is None or self.messages[-1].role != "assistant":
                raise FieldError("continue_final_message", "continue_final_message needs an assistant message last")
        clash = sorted(TEMPLATE_ARGS & set(self.chat_template_kwargs or {}))
        if clash:
            raise FieldError("chat_template_kwargs", f"{', '.join(clash)} cannot be set through chat_template_kwargs")
        return self


class TextPart(BaseModel):
    """A part of a message's content: text only (this server has no image or audio input)."""
    model_config = ConfigDict(extra="ignore")  # (an image part's own fields: its type is what gets refused)
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported (this model takes text only)")
        if self.text is None:
            raise ValueError("a text part needs text")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant message made earlier in the conversation."""
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """OpenAI's message forms: system / developer / user (content: text or text parts), assistant (content and / or
    tool_calls), tool (the result of a call, by tool_call_id)."""
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text_chars(self) -> int:
        """Characters of text the message carries (its content): a lower bound on what its turn adds to a prompt."""
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(part.text or "") for part in self.content or ())

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal is not None)):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; None: any object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Template, _Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI's fields for its own platform, accepted (so clients and SDKs that send them work) and not used: nothing is
    # stored for OpenAI's dashboard, there is one service tier, and the prefix cache needs no key
    store: bool = False
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    safety_identifier: str | None = Field(default=None, max_length=1024)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        return check_metadata(v)

    @model_validator(mode="after")
    def _tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise FieldError("tools", "function names must be unique")
        if not names and self.tool_choice not in (None, "none"):
            raise FieldError("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise FieldError("tool_choice", f"{self.tool_choice.function.name!r} is not among the tools")
        if self.tool_mode in ("required", "named") and _grammar(self) is not None:
            raise FieldError("tool_choice", "a required or named tool_choice cannot be combined with response_format, "
                                            "structured_outputs or the guided_* fields")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools offered), "auto", "required" or "named" (tool_choice names one function)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def to_sampling(self, default_max: int, call_format: str = HERMES) -> SamplingParams:
        """call_format: the chat template's (remix.chat.call_format), which calls are held to."""
        grammar = None
        if self.tool_mode is not None and _grammar(self) is None:  # tool calls held to their schemas
            named = self.tool_choice.function.name if self.tool_mode == "named" else None
            grammar = ("structural_tag", tools.structural_tag(self.tools, self.tool_mode, self.parallel_tool_calls, named,
                                                              call_format), "tools")
        return self.sampling(self.max_completion_tokens or self.max_tokens or default_max,
                             (self.top_logprobs or 0) if self.logprobs else None, grammar)


def _grammar(body) -> tuple | None:
    """(kind, spec, field) of the structured output a request asks for (server.engine.grammar), or None."""
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        return ("json_object", None, "response_format")
    if rf is not None and rf.type == "json_schema":
        return ("json_schema", rf.json_schema.schema_, "response_format")
    if rf is not None and rf.type == "structural_tag":
        return ("structural_tag", rf.structural_tag(), "response_format")
    if body.structured_outputs is not None:
        return body.structured_outputs.grammar_spec()
    if body.guided_json is not None:
        return ("json_schema", body.guided_json, "guided_json")
    if body.guided_grammar is not None:
        return ("grammar", body.guided_grammar, "guided_grammar")
    if body.guided_regex is not None:
        return ("regex", body.guided_regex, "guided_regex")
    if body.guided_choice is not None:
        return ("choice", list(body.guided_choice), "guided_choice")
    return None


class TokenizeRequest(_Template, RequestBody):
    """vLLM's /tokenize: a prompt (tokenized as /v1/completions tokenizes it) or chat messages (with the chat
    template and, by default, the generation prompt, as /v1/chat/completions builds its prompt)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)  # (with messages: written into the prompt)
    add_special_tokens: bool = True  # (a prompt's: as /v1/completions takes it; messages get the template's alone)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")
    path: str = Field(min_length=1)
    check_fingerprint: bool = True


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body (its tooling drives ours unchanged)."""
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # replace a loaded adapter of that name: not supported (unload it first)


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's internal id; adapters here are named only


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
