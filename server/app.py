"""The HTTP layer: OpenAI-compatible routes over the engine. No model code runs on the event loop:
requests go to the engine thread through ``Engine.submit`` and tokens come back through a callback
that puts each event in the request's inbox (``_Inbox``), which wakes the event loop for it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import functools
import hmac
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from remix import __version__
from remix import chat as chat_format
from remix.adapter import AdapterError
from server import messages as messages_api
from server import responses, tools
from server.engine import (ADAPTER_GONE, ENGINE_STOPPED, INTERNAL_ERROR, AdaptersBusy, Engine, EngineError,
                           GenerationRequest, UnknownAdapter)
from server.metrics import Metrics
from server.messages import CountTokensRequest, MessagesRequest
from server.responses import ResponsesRequest
from server.protocol import (AdapterLoadRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                             FieldError, LoadLoRAAdapterRequest, TokenizeRequest, UnloadLoRAAdapterRequest, error_body)

log = logging.getLogger("server")


@dataclass
class ServerState:
    engine: Engine
    base_name: str
    api_key: str | None = None
    adapter_loading: bool = True  # the load / unload endpoints work (--adapter-loading)
    max_body_bytes: int = 64 << 20  # request bodies past this are a 413 (--max-request-mb; 0: no limit)
    lazy_dir: Path | None = None  # --adapter-dir with --lazy-adapters: its adapters load when a request names one
    metrics: Metrics = None
    draining: bool = False
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no CORS headers
    responses: responses.Store = field(default_factory=responses.Store)  # stored Responses API responses
    call_format: str = ""  # the chat template's tool-call format (remix.chat.call_format), set by create_app
    # characters of text past which a prompt cannot fit the context, whatever it says: max_model_len tokens of the
    # vocabulary's longest token (set by create_app). Longer prompts are refused before the tokenizer reads them
    max_prompt_chars: int = 0
    tokenize_gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))  # /tokenize's one at a time
    # the requests' encoding, one at a time: it runs on worker threads, and a fast tokenizer called from two threads
    # at once can fail with "Already borrowed" where a call changes its truncation or padding (huggingface/tokenizers
    # #537; vLLM wraps its tokenizers in a lock for the same reason)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    # /tokenize's and /detokenize's own copy of the tokenizer (set by create_app), used one call at a time
    # (tokenize_gate): text of any length there never holds up the requests' encoding behind tokenizer_lock
    side_tokenizer: object = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    @classmethod
    def of(cls, e: EngineError) -> "APIError":
        """The engine's refusal as the HTTP error it maps to."""
        return cls(e.status, str(e), ERROR_TYPES.get(e.status, "error"), e.param, e.code)

    @classmethod
    def failed(cls, ev, model: str) -> "APIError":
        """An accepted request that ended with an error event (``ev.error_code``, server.engine's codes), as the
        HTTP error it is: not a 200 whose text stops short."""
        if ev.error_code == ADAPTER_GONE:
            return cls(404, f"the model {model!r} was unloaded before this request started", "not_found_error",
                       "model", ADAPTER_GONE)
        if ev.error_code == ENGINE_STOPPED:
            return cls(503, f"{ev.error}; the server needs a restart", "service_unavailable", None, ENGINE_STOPPED)
        return cls(500, f"{ev.error or 'internal error'} (the server's log has the details)", "server_error", None,
                   ev.error_code or INTERNAL_ERROR)


def bad_word_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's reading of bad_words: each word's tokens as written (leading spaces dropped) and, where the word after a
    space (as it stands mid-text) is as many tokens with another first one, those too."""
    out = []
    for word in words:
        bare = tokenizer(word.lstrip(), add_special_tokens=False).input_ids
        out.append(bare)
        spaced = tokenizer(" " + word.lstrip(), add_special_tokens=False).input_ids
        if len(spaced) == len(bare) and spaced[0] != bare[0]:
            out.append(spaced)
    return out


def prompt_char_bound(tokenizer, max_model_len: int) -> int:
    """Characters of text past which no prompt fits max_model_len tokens: that many of the vocabulary's longest token.
    A token's string is at least as long as the text it stands for (a byte-level token has a character a byte, a
    SentencePiece one its text with its space marked), so the bound never refuses a prompt that would have fit."""
    longest = max((len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t), default=1)
    return max(1, longest) * max_model_len


def _error_response(state: ServerState | None, status: int, message: str, type_: str, param=None, code=None,
                    request: Request | None = None, headers: dict | None = None):
    """OpenAI's error object; for Anthropic's Messages endpoints (``request``'s path), Anthropic's."""
    if state is not None and state.metrics is not None:
        state.metrics.http_errors.labels(str(status)).inc()
    # a full queue: when to try again (RFC 9110's Retry-After, which OpenAI's clients honour before their own backoff)
    headers = {"Retry-After": "1"} if status == 429 else headers
    if request is not None and request.scope.get("path", "").rstrip("/").endswith(
            ("/v1/messages", "/v1/messages/count_tokens")):
        return JSONResponse(messages_api.error_body(status, message), status_code=status, headers=headers)
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def _paths(app) -> set[str]:
    """Every path the app routes (for the hint a 404 gives)."""
    return {getattr(r, "path", "") for r in app.routes}


def _worker_start() -> None:
    from remix.kernels import cpu_ext

    cpu_ext.name_os_thread("remix-worker")
    cpu_ext.single_threaded_here()


def worker_threads() -> ThreadPoolExecutor:
    """The event loop's default executor (asyncio.to_thread's: tokenizing, rendering chat prompts, compiling grammars,
    reading adapters): asyncio's own, except that each worker opens its parallel regions alone, so that no torch op
    run there gives it a pool of OpenMP workers of its own, which would slow every later engine step
    (cpu_ext.single_threaded_here; Engine.run_here)."""
    return ThreadPoolExecutor(thread_name_prefix="remix-worker", initializer=_worker_start)


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        asyncio.get_running_loop().set_default_executor(worker_threads())
        yield

    app = FastAPI(title="remix-serve", description="OpenAI-compatible server for ReMix adapters", version="0.1.0",
                  lifespan=lifespan)
    app.state.remix = state
    state.metrics = state.metrics or Metrics(state.engine)
    state.call_format = chat_format.call_format(state.engine.tokenizer)  # (the template is fixed once serving)
    state.max_prompt_chars = prompt_char_bound(state.engine.tokenizer, state.engine.config.max_model_len)
    state.side_tokenizer = copy.deepcopy(state.engine.tokenizer)
    app.add_middleware(BodyLimitMiddleware, state=state)
    app.add_middleware(RequestIdMiddleware)
    if state.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # the first of our own checks' errors if any (a value that fits no member of a union fails each member's
        # check: "not a valid string" for a list of parts says less than the parts' own check), else the first
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        loc = [str(p) for p in first.get("loc", []) if p != "body" and not _UNION_TAG.search(str(p))]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        blamed = (first.get("ctx") or {}).get("error")
        if isinstance(blamed, FieldError):  # a check across fields that names one
            param = ".".join(loc + [blamed.param]) if loc else blamed.param
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):  # (no JSON object)
            ctype, given = request.headers.get("content-type", ""), first.get("input")
            msg = "the request body must be a JSON object" + (
                " (it is empty)" if first.get("type") == "missing" else
                f" sent as Content-Type: application/json (this one is {ctype!r})" if "json" not in ctype else
                f", not {'null' if given is None else type(given).__name__}")
        elif first.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}"
        elif param:
            msg = f"{param}: {msg}"
        return _error_response(state, 400, msg, "invalid_request_error", param, "invalid_value", request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(state, exc.status, exc.message, exc.type, exc.param, exc.code, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """The router's own errors (our handlers raise APIError): a path it does not serve, or a method the path does
        not take, said as OpenAI says them ("Invalid URL (POST /completions)"), with what would have worked."""
        status, message, code = exc.status_code, str(exc.detail), None
        where = f"{request.method} {request.url.path}"
        if status == 404 and message == "Not Found":
            hint = (f"; the API is under /v1 ({request.method} /v1{request.url.path})"
                    if not request.url.path.startswith("/v1/") and ("/v1" + request.url.path) in _paths(app) else "")
            message, code = f"Invalid URL ({where}){hint}; GET /openapi.json lists every route", "unknown_url"
        elif status == 405:
            allow = (exc.headers or {}).get("Allow", "")  # (Starlette's router sets it)
            message, code = f"{where} is not allowed: this path takes {allow or 'another method'}", "method_not_allowed"
        type_ = ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
        return _error_response(state, status, message, type_, code=code, request=request, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(state, 500, "internal server error", "server_error", request=request)

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not scheme and "x-api-key" in request.headers:  # (Anthropic's clients send the key so)
            scheme, token = "bearer", request.headers["x-api-key"]
        # the scheme in any case (RFC 9110), the key compared in constant time (no timing to guess it by)
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>', or Anthropic's "
                                "'x-api-key: <key>')", "authentication_error", code="invalid_api_key")

    def check_loading(request: Request) -> None:
        check_key(request)
        if not state.adapter_loading:
            raise APIError(403, "loading and unloading adapters while serving is off on this server (its "
                                "--adapter-loading; auto turns it off on a non-loopback address without --api-key)",
                           "permission_error", code="adapter_loading_off")

    def check_open() -> None:
        if state.draining or not state.engine.accepting:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down")

    def lazy_path(name: str) -> str | None:
        """The folder of an adapter of --adapter-dir that a request may load (--lazy-adapters), else None."""
        if state.lazy_dir is None or not ADAPTER_NAME.fullmatch(name):
            return None
        path = state.lazy_dir / name
        return str(path) if (path / "adapter_config.json").is_file() else None

    async def resolve_model(name: str, load: bool = True, request: Request | None = None) -> str | None:
        """The adapter a request's model names (None: the base), loaded first where it is one of --adapter-dir's
        that --lazy-adapters loads on demand (``load``: False where only its name matters, as in /tokenize)."""
        if name == state.base_name:
            return None
        adapter = state.engine.registry.adapters.get(name)
        if adapter is not None and not adapter.unloading and not adapter.giving_way:
            return name
        path = lazy_path(name)
        if path is None:
            raise APIError(404, f"the model {name!r} does not exist", "not_found_error", "model", "model_not_found")
        if load:
            await ensure_loaded(name, path, request)
        return name

    async def ensure_loaded(name: str, path: str, request: Request | None = None) -> None:
        """Load an adapter of the folder; where every adapter that could make room is in use, wait (up to
        LAZY_WAIT_S, while the client stays) while the least recently used gives way (Engine._want_room), then a 429.
        A request for an adapter that is giving way waits here too, for its turn to be loaded again."""
        start = time.monotonic()
        deadline = start + LAZY_WAIT_S
        while True:
            try:
                await asyncio.to_thread(state.engine.ensure_adapter, name, path, True)  # (held until submitted)
                if request is not None:
                    request.state.adapter_held = True  # (its first prompt's submit releases the hold)
                state.metrics.adapter_wait.observe(time.monotonic() - start)
                return
            except AdapterError as e:  # (the server's folder holds a broken adapter: not the client's doing)
                raise APIError(500, f"the model {name!r} could not be loaded: {e}", "server_error", "model",
                               "invalid_adapter") from None
            except AdaptersBusy as e:
                if time.monotonic() > deadline or (request is not None and await request.is_disconnected()):
                    raise APIError.of(e) from None
                await asyncio.sleep(0.1)
            except EngineError as e:
                raise APIError.of(e) from None

    @app.get("/version")
    async def version():  # (vLLM's)
        return {"version": __version__}

    @app.get("/ping")
    @app.post("/ping")
    async def ping():
        """SageMaker's and vLLM's liveness check: /health's status, without the engine's figures."""
        out = await health()
        return out if isinstance(out, JSONResponse) else {"status": "ok"}

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        stats = state.engine.stats()
        if state.engine.stopped_by is not None:  # (an orchestrator's health check then restarts the server)
            return JSONResponse({"status": "engine_stopped", "error": state.engine.stopped_by, **stats}, status_code=503)
        return {"status": "ok", **stats}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)

        def entry(name: str, adapter: dict | None = None) -> dict:
            # OpenAI's fields, vLLM's max_model_len, and Anthropic's (type, display_name, created_at, its two limits),
            # so each API's client reads its own
            return {"id": name, "object": "model", "created": state.created, "owned_by": "remix-serve",
                    "parent": None if adapter is None else state.base_name, "root": state.base_name,
                    "max_model_len": state.engine.config.max_model_len,
                    "type": "model", "display_name": name, "created_at": created_at,
                    "max_input_tokens": state.engine.config.max_model_len,
                    "max_tokens": state.engine.config.max_model_len,
                    **({} if adapter is None else {"adapter": adapter})}

        created_at = datetime.datetime.fromtimestamp(state.created, datetime.timezone.utc).isoformat().replace(
            "+00:00", "Z")

        served = {name: a for name, a in state.engine.registry.adapters.items() if not a.unloading}
        data = [entry(state.base_name)] + [entry(name, {"path": a.path, "loaded": True, **a.info})
                                           for name, a in served.items()]
        if state.lazy_dir is not None:  # (--lazy-adapters: the folder's others, loaded when a request names one)
            data += [entry(child.name, {"path": str(child), "loaded": False})
                     for child in (sorted(state.lazy_dir.iterdir()) if state.lazy_dir.is_dir() else [])
                     if child.name not in served and lazy_path(child.name) is not None]
        return {"object": "list", "data": data, "has_more": False,  # (Anthropic's list: one page)
                "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_key(request)
        found = [m for m in (await models(request))["data"] if m["id"] == model_id]
        if not found:
            raise APIError(404, f"the model {model_id!r} does not exist", "not_found_error", "model", "model_not_found")
        return found[0]

    def check_new_name(name: str, param: str) -> None:
        """A name an adapter may be loaded under: not the base model's, not a loaded adapter's."""
        if name == state.base_name:
            raise APIError(400, f"{name!r} is the base model's name; load the adapter under another", param=param,
                           code="invalid_adapter")
        if name in state.engine.registry.adapters:
            raise APIError(400, f"an adapter named {name!r} is already loaded; unload it first", param=param,
                           code="invalid_adapter")

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoadRequest, request: Request):
        check_loading(request)
        check_new_name(body.name, "name")
        try:
            loaded = await asyncio.to_thread(state.engine.load_adapter, body.name, body.path, body.check_fingerprint)
        except AdapterError as e:
            raise APIError(400, str(e), param="path", code="invalid_adapter") from None
        except EngineError as e:  # (max_adapters loaded already)
            raise APIError.of(e) from None
        return {"id": loaded.name, "object": "model", "parent": state.base_name, "adapter": {"path": loaded.path, **loaded.info}}

    # vLLM's names for the same two operations (its LoRA tooling works unchanged; peft adapters load as they are)
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
        check_loading(request)
        if body.load_inplace and body.lora_name in state.engine.registry.adapters:
            raise APIError(400, f"load_inplace: the adapter {body.lora_name!r} is loaded; unload it first",
                           param="load_inplace", code="invalid_adapter")
        check_new_name(body.lora_name, "lora_name")
        try:
            await asyncio.to_thread(state.engine.load_adapter, body.lora_name, body.lora_path, True)
        except AdapterError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
        except EngineError as e:  # (max_adapters loaded already: the field is lora_name here)
            err = APIError.of(e)
            err.param = "lora_name"
            raise err from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
        check_loading(request)
        try:
            await asyncio.to_thread(state.engine.unload_adapter, body.lora_name)
        except EngineError as e:
            raise APIError.of(e) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        check_loading(request)
        try:
            await asyncio.to_thread(state.engine.unload_adapter, name)
        except EngineError as e:
            raise APIError.of(e) from None
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        check_key(request)
        if body.model is not None:
            await resolve_model(body.model, load=False)
        tok = state.side_tokenizer

        def encode():  # (off the event loop: a long text takes the tokenizer a while)
            if body.messages is not None:
                ids = chat_prompt(body, body.tools, side=True)
            else:
                ids = tok(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
            return ids, tok.convert_ids_to_tokens(ids)
        async with state.tokenize_gate:  # (one /tokenize at a time: it takes text of any length, and a flood of long
            ids, strs = await asyncio.to_thread(encode)  # ones would hold every worker thread the requests tokenize on)
        return {"count": len(ids), "max_model_len": state.engine.config.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        check_key(request)
        if body.model is not None:
            await resolve_model(body.model, load=False)
        vocab = state.engine.runner.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
        async with state.tokenize_gate:  # (off the event loop, one at a time, as /tokenize)
            return {"prompt": await asyncio.to_thread(state.side_tokenizer.decode, body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_key(request)
        check_open()
        adapter = await resolve_model(body.model, request=request)
        prompts = _prompt_list(body.prompt)
        check_truncation(body)
        long = any(isinstance(p, str) and len(p) > state.max_prompt_chars for p in prompts)
        if long and body.truncate_prompt_tokens is None:
            raise APIError(400, f"the prompt is longer than this model's context ({state.engine.config.max_model_len} "
                                "tokens)", param="prompt", code="context_length_exceeded")
        vocab = state.engine.runner.model.config.vocab_size
        if any(not isinstance(p, str) and any(not 0 <= t < vocab for t in p) for p in prompts):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")

        def encode(tok, lock):  # (off the event loop: a long prompt takes the tokenizer a while)
            with lock:
                ids = [tok(p, add_special_tokens=body.add_special_tokens).input_ids if isinstance(p, str) else p
                       for p in prompts]
                cut = [body.truncated(p, state.engine.config.max_model_len) for p in ids]
                return cut, [p if isinstance(p, str) and len(c) == len(i) else tok.decode(c)
                             for p, i, c in zip(prompts, ids, cut)]
        if long:  # (a text longer than any context, to be truncated: on /tokenize's tokenizer, as its long texts are)
            async with state.tokenize_gate:
                prompt_ids, prompt_texts = await asyncio.to_thread(encode, state.side_tokenizer,
                                                                   contextlib.nullcontext())
        else:
            prompt_ids, prompt_texts = await asyncio.to_thread(encode, state.engine.tokenizer, state.tokenizer_lock)
        return await _generate(request, body, adapter, prompt_ids, prompt_texts, chat=False)

    def check_truncation(body) -> None:
        k = body.truncate_prompt_tokens
        if k is not None and k > state.engine.config.max_model_len:
            raise APIError(400, f"truncate_prompt_tokens ({k}) must not exceed this model's context "
                                f"({state.engine.config.max_model_len} tokens)", param="truncate_prompt_tokens",
                           code="invalid_value")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_key(request)
        check_open()
        adapter = await resolve_model(body.model, request=request)
        check_truncation(body)
        offered = body.tools if body.tool_mode else None
        if sum(m.text_chars() for m in body.messages) <= state.max_prompt_chars:  # (before the template and tokenizer)
            ids = await asyncio.to_thread(chat_prompt, body, offered)
        elif body.truncate_prompt_tokens is not None:  # (to be truncated: on /tokenize's tokenizer, as its long texts)
            async with state.tokenize_gate:
                ids = await asyncio.to_thread(chat_prompt, body, offered, True)
        else:
            raise APIError(400, f"the messages are longer than this model's context ({state.engine.config.max_model_len}"
                                " tokens)", param="messages", code="context_length_exceeded")
        return await _generate(request, body, adapter, [body.truncated(ids, state.engine.config.max_model_len)], [""],
                               chat=True)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        """OpenAI's Responses API, computed by the chat path (server/responses.py translates both ways)."""
        check_key(request)
        history = []
        if body.previous_response_id is not None:
            stored = state.responses.get(body.previous_response_id)
            if stored is None:
                raise APIError(404, f"no stored response with id {body.previous_response_id!r}", "invalid_request_error",
                               "previous_response_id", "not_found")
            history = stored[1]
        messages = responses.conversation(body, history)
        chat_req = chat_request(responses.chat_body(body, messages), responses.PARAMS, "input")
        rid, created = responses.new_id("resp"), responses.now()
        result = await via_chat(chat_req, request, responses.PARAMS)
        if isinstance(result, JSONResponse):  # (the client went away)
            return result
        if not body.stream:
            response, assistant = responses.from_chat(body, rid, created, result)
            if body.store:
                state.responses.put(response, messages + [assistant])
            return response

        async def events():
            stream = responses.EventStream(body, rid, created)
            async for line in relay(result.body_iterator, stream):
                yield line
            if body.store and stream.response["status"] != "failed":  # (a failed generation: not stored)
                state.responses.put(stream.response, messages + [stream.assistant()])

        return StreamingResponse(events(), media_type="text/event-stream")

    def chat_request(data: dict, params: dict[str, str], default: str) -> ChatCompletionRequest:
        """The chat request another API's request translates to (responses.py, messages.py); a 400 names that API's
        field (``params``: chat field -> its own; ``default`` where no field is to blame)."""
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            first = next((x for x in e.errors() if x.get("type") == "value_error"), e.errors()[0])
            blamed = (first.get("ctx") or {}).get("error")
            field = blamed.param if isinstance(blamed, FieldError) else str((first.get("loc") or [default])[0])
            param = params.get(field, field)
            raise APIError(400, f"{param}: " + first.get("msg", "invalid request").removeprefix("Value error, "),
                           param=param, code="invalid_value") from None

    async def via_chat(chat_req: ChatCompletionRequest, request: Request, params: dict[str, str]):
        """The chat endpoint's result for a translated request; its 400s name the other API's field (``params``)."""
        try:
            return await chat(chat_req, request)
        except APIError as e:
            e.param = params.get(e.param, e.param)
            raise

    async def relay(inner, stream):
        """A chat stream (``inner``: its body) re-emitted as another API's events by ``stream``
        (responses.EventStream, messages.EventStream): ``start()`` once the first chunk came (the chat stream's
        clean-up on a disconnect is armed then), ``chunk(data)`` each chunk, ``end()``; where the generation failed,
        ``fail(error)`` with chat's error object ends it."""
        try:
            piece, started = await anext(inner), False
            while piece is not None:
                if not started:
                    started = True
                    for line in stream.start():
                        yield line
                for block in piece.split("\n\n"):
                    if block.startswith("data: ") and block != "data: [DONE]":
                        data = json.loads(block[len("data: "):])
                        if "error" in data:
                            yield stream.fail(data["error"])
                            return
                        for line in stream.chunk(data):
                            yield line
                piece = await anext(inner, None)
            for line in stream.end():
                yield line
        finally:
            await inner.aclose()

    @app.post("/v1/messages")
    async def create_message(body: MessagesRequest, request: Request):
        """Anthropic's Messages API, computed by the chat path (server/messages.py translates both ways)."""
        check_key(request)
        chat_req = chat_request(messages_api.chat_body(body, body.stream), messages_api.PARAMS, "messages")
        mid = messages_api.new_id("msg")
        result = await via_chat(chat_req, request, messages_api.PARAMS)
        if isinstance(result, JSONResponse):  # (the client went away)
            return result
        if not body.stream:
            return messages_api.from_chat(body, mid, result)

        return StreamingResponse(relay(result.body_iterator, messages_api.EventStream(body, mid)),
                                 media_type="text/event-stream")

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(body: CountTokensRequest, request: Request):
        """Anthropic's token count of a Messages request's prompt (its system prompt, messages and tools), as the chat
        template renders it."""
        check_key(request)
        await resolve_model(body.model, load=False)
        chat_req = chat_request(messages_api.chat_body(body), messages_api.PARAMS, "messages")
        async with state.tokenize_gate:  # (as /tokenize: text of any length, on its own tokenizer)
            ids = await asyncio.to_thread(chat_prompt, chat_req, chat_req.tools if chat_req.tool_mode else None, True)
        return {"input_tokens": len(ids)}

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        check_key(request)
        stored = state.responses.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response with id {response_id!r}", "not_found_error", "response_id", "not_found")
        return stored[0]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        check_key(request)
        if not state.responses.delete(response_id):
            raise APIError(404, f"no stored response with id {response_id!r}", "not_found_error", "response_id", "not_found")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def chat_prompt(body, offered_tools, side: bool = False) -> list[int]:
        """A request's conversation (and the tools offered) through the chat template (server.tools), as token ids:
        on a worker thread, with the engine's tokenizer under its lock, or (side) /tokenize's own copy."""
        tok = state.side_tokenizer if side else state.engine.tokenizer
        if not tok.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            with contextlib.nullcontext() if side else state.tokenizer_lock:
                return tools.prompt_ids(tok, body.messages, offered_tools, body.add_generation_prompt,
                                        body.continue_final_message, body.chat_template_kwargs)
        except Exception as e:  # (a template may raise on a conversation it does not take, e.g. roles out of order)
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None

    async def _generate(request: Request, body, adapter, prompt_ids: list[list[int]], prompt_texts: list[str], chat: bool):
        params = (body.to_sampling(state.engine.config.max_model_len - max(len(p) for p in prompt_ids),
                                   state.call_format) if chat else body.to_sampling())
        if chat and params.max_tokens < 1:
            raise APIError(400, f"this model's maximum context length is {state.engine.config.max_model_len} tokens; the "
                                f"prompt has {len(prompt_ids[0])}, which leaves no room for a reply", param="messages",
                           code="context_length_exceeded")
        slots, queue_cap = state.engine.num_slots, state.engine.config.max_queue
        if params.n > slots:  # (a request's sequences run side by side: best_of of them where it ranks)
            name = "best_of" if getattr(body, "ranked", False) else "n"
            raise APIError(400, f"{name} must be at most {slots} here (the server's --max-num-seqs), got {params.n}",
                           param=name, code="invalid_value")
        if len(prompt_ids) > queue_cap:  # (each prompt waits as a request of its own: more could never be taken)
            raise APIError(400, f"a request may carry at most {queue_cap} prompts here (the server's --max-queue), got "
                           f"{len(prompt_ids)}", param="prompt", code="invalid_value")
        if body.bad_words:
            def words():
                with state.tokenizer_lock:
                    return bad_word_ids(state.engine.tokenizer, body.bad_words)
            params.bad_words_ids = await asyncio.to_thread(words)
        if params.grammar is not None:  # compiled off the event loop (a large schema takes a while), before submit
            try:
                params.compiled_grammar = await asyncio.to_thread(state.engine.compile_grammar, *params.grammar)
            except EngineError as e:
                raise APIError.of(e) from None
        loop = asyncio.get_running_loop()
        arrival = time.monotonic()
        for attempt in range(3):
            inbox = _Inbox(loop, eager=body.stream)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            sub_ids = []
            try:
                for i, ids in enumerate(prompt_ids):
                    sub = f"{rid}-{i}"
                    req = GenerationRequest(sub, ids, params, adapter, trace=body.remix_routing is not None,
                                            priority=body.priority, cache_salt=body.cache_salt,
                                            held=i == 0 and getattr(request.state, "adapter_held", False))
                    state.engine.submit(req, functools.partial(inbox.put, i))
                    sub_ids.append(sub)
                break
            except EngineError as e:
                for sub in sub_ids:
                    state.engine.cancel(sub)
                path = lazy_path(adapter) if adapter is not None and isinstance(e, UnknownAdapter) else None
                if path is not None and attempt < 2:  # unloaded to make room since it was loaded for this request:
                    await ensure_loaded(adapter, path, request)  # loaded again
                    continue
                err = APIError.of(e)
                if chat and err.param == "prompt":  # (a chat request's prompt is its messages)
                    err.param = "messages"
                raise err from None
        state.in_flight += 1
        tracker = _Tracker(state, adapter or state.base_name, arrival, len(prompt_ids) * params.n,
                           getattr(request.state, "request_id", None))
        builder = _ResponseBuilder(state, body, rid, chat, prompt_ids, prompt_texts, params.n)
        if body.stream:
            return StreamingResponse(_stream(request, inbox, sub_ids, tracker, builder), media_type="text/event-stream")
        try:
            while not tracker.done():
                i, ev, at = await inbox.get(request)
                tracker.observe(ev, at)
                if ev.error is not None:  # one choice failed: the request did (its other choices end now)
                    raise APIError.failed(ev, body.model)
                builder.add(i, ev)
        except (_Disconnected, APIError, asyncio.CancelledError) as e:  # (the client went away, a choice failed or
            for sub in sub_ids:  # the handler was cancelled: the others end now)
                state.engine.cancel(sub)
            if not isinstance(e, _Disconnected):
                raise
            return JSONResponse({}, status_code=499)
        finally:
            inbox.close()
            tracker.close()
        return builder.final()

    async def _stream(request: Request, inbox: _Inbox, sub_ids, tracker, builder):
        try:
            while not tracker.done():
                out = []  # the chunks of every event there is now, sent in one write
                while True:
                    i, ev, at = await inbox.get(request)
                    tracker.observe(ev, at)
                    if ev.error is not None:  # one choice failed: the stream ends with the error (OpenAI's clients
                        for sub in sub_ids:  # raise it), as vLLM ends it, and its other choices end now
                            state.engine.cancel(sub)
                        e = APIError.failed(ev, builder.body.model)
                        out.append(f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
                                   "data: [DONE]\n\n")
                        yield "".join(out)
                        return
                    chunk = builder.chunk(i, ev)
                    if chunk is not None:
                        out.append(f"data: {json.dumps(chunk)}\n\n")
                    if tracker.done() or not inbox.ready():
                        break
                if out:
                    yield "".join(out)
            if builder.include_usage:
                yield f"data: {json.dumps(builder.usage_chunk())}\n\n"
            yield "data: [DONE]\n\n"
        except (_Disconnected, asyncio.CancelledError, GeneratorExit) as e:  # (GeneratorExit: closed by a wrapping
            for sub in sub_ids:  # stream)
                state.engine.cancel(sub)
            if not isinstance(e, _Disconnected):  # (the inbox's look found the client gone: the stream just ends,
                raise  # with nothing to report - raised on, it was a traceback logged for every dropped stream)
        finally:
            inbox.close()
            tracker.close()

    return app


LAZY_WAIT_S = 30.0  # how long a request waits for an on-demand adapter to find room before its 429
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # an adapter folder's name a request may load: no path

_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[(]")  # pydantic's names of union members in locs


class BodyLimitMiddleware:
    """A request body over ``state.max_body_bytes`` is a 413 before it is read (by its Content-Length) or as soon as
    it passes the limit (a chunked upload): a JSON body is read and parsed whole, on the event loop, so an unbounded
    one holds up every other request and takes its size in memory several times over. Plain ASGI."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        limit = self.state.max_body_bytes
        if scope["type"] != "http" or not limit:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:  # (the HTTP layer reads no more than it declares)
            if declared.isdigit() and int(declared) > limit:
                return await self._refuse(send, f"the request body is {int(declared) / (1 << 20):.3g} MB, over")
            return await self.app(scope, receive, send)
        chunks, size = [], 0  # no length given: read it here, up to the limit, then hand it on whole
        while True:
            message = await receive()
            if message["type"] != "http.request":  # (the client went away: the app hears it)
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(send, "the request body passed")
            if not message.get("more_body"):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _refuse(self, send, what: str) -> None:
        mb = self.state.max_body_bytes / (1 << 20)
        response = _error_response(self.state, 413, f"{what} this server's limit of {mb:g} MB (--max-request-mb)",
                                   "invalid_request_error", code="request_too_large")
        # (and the connection closes: the rest of a body it refused would only be read to be thrown away)
        await send({"type": "http.response.start", "status": 413,
                    "headers": response.raw_headers + [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": response.body})


def _replay(messages: list[dict], receive):
    """An ASGI receive that gives ``messages`` first, then what ``receive`` gives."""
    async def replay():
        return messages.pop(0) if messages else await receive()
    return replay


class RequestIdMiddleware:
    """Every response carries X-Request-Id: the client's own (up to 128 printable characters) or a new one, also in
    the request's log line. Plain ASGI, so streamed responses pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, with_id)


class _Disconnected(Exception):
    pass


class _Inbox:
    """One request's engine events, from the engine's thread to the event loop. The engine's callback appends each
    event with the time it came; the loop is woken once for whatever came since it last looked, and for an answer
    sent whole (``eager`` False) only when a sequence ends or fails, since nothing before that needs the loop. A
    step's events for 32 streams are 32 wake-ups, not 32 queue hand-offs each waking a task, and a whole answer of
    128 tokens is one. A reader waiting is also woken every ``TICK_S`` to look whether its client went away (and a
    whole answer's reader then takes what has come, so no more than that much waits here), by one timer that re-arms
    itself while someone waits (not a timer armed and cancelled for each event)."""

    TICK_S = 0.5
    __slots__ = ("eager", "items", "loop", "pending", "ticked", "timer", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, eager: bool):
        self.loop, self.eager = loop, eager
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.pending = False  # a wake-up is on its way to the loop
        self.ticked = False  # the timer went off since the reader last looked at its client
        self.timer: asyncio.TimerHandle | None = None

    def put(self, i: int, ev) -> None:
        """The engine's callback (its thread) for the request's ``i``-th sequence."""
        self.items.append((i, ev, time.monotonic()))
        # (``pending`` is shared with the loop under the GIL: an event appended before the loop's _wake clears it is
        # seen by the reader that wake-up wakes; one appended after finds it clear and sends a wake-up of its own)
        if not self.pending and (self.eager or ev.finished or ev.error is not None):
            self.pending = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self.pending = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _tick(self) -> None:
        self.ticked = True
        if self.waiter is None:  # (nobody waits: the next get arms it again)
            self.timer = None
            return
        self.timer = self.loop.call_later(self.TICK_S, self._tick)
        if not self.waiter.done():
            self.waiter.set_result(None)

    def ready(self) -> bool:
        return bool(self.items)

    async def get(self, request: Request) -> tuple:
        """The next ``(sequence index, event, time it came)``, looking every ``TICK_S`` whether the client went away
        (an answer sent whole looks even while its tokens come: nothing wakes it for them)."""
        while True:
            if self.ticked:
                self.ticked = False
                if await request.is_disconnected():
                    raise _Disconnected()
            if self.items:
                return self.items.popleft()
            if self.timer is None:
                self.timer = self.loop.call_later(self.TICK_S, self._tick)
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


class _Tracker:
    """Latency metrics, token counters and the one log line per request."""

    def __init__(self, state: ServerState, adapter: str, arrival: float, sequences: int, request_id: str | None = None):
        self.state, self.adapter, self.arrival, self.left = state, adapter, arrival, sequences
        self.request_id = request_id
        self.last: dict = {}
        self.prompt_tokens = 0
        self.cached: dict[str, int] = {}  # per prompt (request id): the most of its tokens a sequence took from the cache
        self.completion_tokens = 0
        self.reasons: list[str] = []
        self.closed = False
        m = state.metrics  # (each token observes these: their children looked up once)
        self.ttft, self.itl = m.ttft.labels(adapter), m.itl.labels(adapter)
        self.generation_tokens = m.generation_tokens.labels(adapter)

    def done(self) -> bool:
        return self.left == 0

    def observe(self, ev, at: float) -> None:
        """``ev`` came from the engine at ``at`` (``time.monotonic()``)."""
        m = self.state.metrics
        key = (ev.request_id, ev.index)
        if ev.token_ids:
            if key not in self.last:
                self.ttft.observe(at - self.arrival)
            else:
                self.itl.observe(at - self.last[key])
            self.last[key] = at
            self.generation_tokens.inc(len(ev.token_ids))
        if ev.finished:
            self.left -= 1
            if ev.index == 0:
                self.prompt_tokens += ev.prompt_tokens
                m.prompt_tokens.labels(self.adapter).inc(ev.prompt_tokens)
            self.completion_tokens += ev.completion_tokens
            self.cached[ev.request_id] = max(self.cached.get(ev.request_id, 0), ev.cached_tokens)
            self.reasons.append(ev.finish_reason or "error")
            m.finished.labels(self.adapter, ev.finish_reason or "error").inc()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.state.in_flight -= 1
        elapsed = time.monotonic() - self.arrival
        if self.done():
            self.state.metrics.e2e.labels(self.adapter).observe(elapsed)
        log.info("request id=%s adapter=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d latency=%.3fs "
                 "status=%s", self.request_id, self.adapter, self.prompt_tokens, sum(self.cached.values()), self.completion_tokens, elapsed,
                 ",".join(sorted(set(self.reasons))) or "disconnected")


class _ResponseBuilder:
    """Assembles OpenAI completion / chat responses (whole or as stream chunks) from engine events."""

    def __init__(self, state, body, rid, chat, prompt_ids, prompt_texts, n):
        self.state, self.body, self.rid, self.chat, self.n = state, body, rid, chat, n
        self.prompt_ids, self.prompt_texts = prompt_ids, prompt_texts
        self.created = int(time.time())
        self.tok = state.engine.tokenizer
        self.text: dict[int, str] = {}
        self.tokens: dict[int, list] = {}
        self.finish: dict[int, str] = {}
        self.routing: dict[int, dict] = {}
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.cached: dict[int, int] = {}  # per prompt: the most of its tokens a sequence took from the prefix cache
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}  # streamed: each choice's text_offset so far
        so = getattr(body, "stream_options", None)
        self.include_usage = bool(so and so.include_usage)
        self.continuous_usage = bool(so and so.continuous_usage_stats)
        self.generated = 0  # tokens generated so far, all choices (continuous usage)
        self.tool_mode = body.tool_mode if chat else None  # (server.tools: calls parsed out of the text)
        self.ranked = not chat and body.ranked  # best_of > n: n = best_of sequences per prompt, the body's n returned
        self.scores: dict[int, tuple[float, int]] = {}  # ranked: each sequence's summed log-probability and tokens
        self.parsers: dict[int, tools.CallParser] = {}  # streamed: each choice's
        self.held: dict[int, str] = {}  # streamed: each choice's trailing whitespace, sent once text follows it
        self.as_ids = body.return_tokens_as_token_ids  # logprobs name tokens "token_id:{id}" (vLLM's)
        self.ids: dict[int, list[int]] = {}  # return_token_ids: each choice's generated ids (streamed: not yet sent)
        self.prompt_lps: dict[int, list] = {}  # vLLM's prompt_logprobs, per prompt
        self.sent: set[int] = set()  # streamed: the choices a chunk went out for (the prompt's ids and
        # log-probabilities go with the first)

    def _choice(self, i: int, ev) -> int:
        return i * self.n + ev.index

    def add(self, i: int, ev) -> None:
        c = self._choice(i, ev)
        if c not in self.text:
            self.text[c] = self.prompt_texts[i] if (not self.chat and self.body.echo) else ""
            self.tokens[c] = []
        self.text[c] += ev.text
        self.tokens[c] += self._echoed(ev) + ev.logprobs
        self.ids.setdefault(c, []).extend(ev.token_ids)
        if ev.prompt_ranks is not None and i not in self.prompt_lps:
            self.prompt_lps[i] = self._prompt_view(ev.prompt_logprobs, ev.prompt_ranks)
        self.generated += len(ev.token_ids)
        if self.ranked:
            total, count = self.scores.get(c, (0.0, 0))
            self.scores[c] = (total + sum(e[1] for e in ev.logprobs), count + len(ev.logprobs))
        if ev.finished:
            self.finish[c] = ev.finish_reason if ev.finish_reason in ("stop", "length") else (ev.finish_reason or "error")
            if ev.index == 0:
                self.usage["prompt_tokens"] += ev.prompt_tokens
            self.usage["completion_tokens"] += ev.completion_tokens
            self.cached[i] = max(self.cached.get(i, 0), ev.cached_tokens)
            if ev.routing is not None:
                self.routing[c] = _routing_view(ev.routing, self.body.remix_routing)

    def _echoed(self, ev) -> list:
        """The prompt's log-probability entries an echoed completion's logprobs start with (none without echo; top-N
        as many as its logprobs asks for, where prompt_logprobs asked for more)."""
        if self.chat or not self.body.echo or not ev.prompt_logprobs:
            return []
        n = self.body.logprobs or 0
        return [(t, lp, alts if alts is None else alts[:n]) for t, lp, alts in ev.prompt_logprobs]

    def _prompt_view(self, entries, ranks) -> list:
        """vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: {logprob, rank,
        decoded_token}} for the token and its top-N alternatives (ranked 1 to N)."""
        out = []
        for (tid, lp, alts), rank in zip(entries, ranks):
            if lp is None:
                out.append(None)
                continue
            view = {str(tid): {"logprob": lp, "rank": rank, "decoded_token": self.tok.decode([tid])}}
            for r, (a, v) in enumerate(alts[: self.body.prompt_logprobs], 1):
                view.setdefault(str(a), {"logprob": v, "rank": r, "decoded_token": self.tok.decode([a])})
            out.append(view)
        return out

    def _name(self, tid: int, text: str) -> str:
        """A token as logprobs name it: its text, or with return_tokens_as_token_ids "token_id:{id}"."""
        return f"token_id:{tid}" if self.as_ids else text

    def _logprobs(self, entries, offset0: int = 0):
        """(text_offset counts the tokens' texts, also where return_tokens_as_token_ids names them by id; bytes are
        their texts' bytes)"""
        if self.chat:
            content = []
            for tid, lp, alts in entries:
                s = self.tok.decode([tid])
                content.append({"token": self._name(tid, s), "logprob": lp, "bytes": list(s.encode()),
                                "top_logprobs": [{"token": self._name(a, self.tok.decode([a])), "logprob": v,
                                                  "bytes": list(self.tok.decode([a]).encode())} for a, v in alts]})
            return {"content": content}
        toks, lps, tops, offsets = [], [], [], []
        offset = offset0
        for tid, lp, alts in entries:
            s = self.tok.decode([tid])
            toks.append(self._name(tid, s))
            lps.append(lp)
            tops.append(None if alts is None else self._top_dict(alts))  # (None: a prompt's first token)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _top_dict(self, alts) -> dict[str, float]:
        """{token text: logprob}; ids whose text is ambiguous (partial UTF-8 bytes, or the same text as another
        alternative) are keyed by their vocabulary entry instead, so no alternative is lost (with
        return_tokens_as_token_ids: by "token_id:{id}")."""
        out = {}
        for a, v in alts:
            key = self.tok.decode([a])
            if self.as_ids:
                key = self._name(a, key)
            elif "\ufffd" in key or key in out:
                key = self.tok.convert_ids_to_tokens(a)
            out[key] = v
        return out

    def _wants_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    def _usage(self):
        return {**self.usage, "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}

    def final(self) -> dict:
        choices = []
        for c in sorted(self.text):
            choice = {"index": c, "finish_reason": self.finish.get(c)}
            lp = self._logprobs(self.tokens[c]) if self._wants_logprobs() else None  # (with echo: the prompt's first)
            if self.chat and self.tool_mode:
                parser = tools.CallParser(self.state.call_format)
                parser.feed(self.text[c])
                parser.finish()
                calls = parser.tool_calls()
                self._count_calls(calls)
                choice["message"] = {"role": "assistant", "content": (parser.content.rstrip() or None) if calls
                                     else parser.content}
                if calls:
                    choice["message"]["tool_calls"] = calls
                choice["finish_reason"] = self._finish_reason(c, bool(calls))
                choice["logprobs"] = lp
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": self.text[c]}
                choice["logprobs"] = lp
            else:
                choice["text"] = self.text[c]
                choice["logprobs"] = lp
            if c in self.routing:
                choice["remix_routing"] = self.routing[c]
            if self.body.return_token_ids:  # (vLLM's places: a completion's choices carry their prompt's ids, a
                choice["token_ids"] = self.ids.get(c, [])  # chat response carries them once)
                if not self.chat:
                    choice["prompt_token_ids"] = self.prompt_ids[c // self.n]
            if not self.chat and self.body.prompt_logprobs is not None:  # (the same places)
                choice["prompt_logprobs"] = self.prompt_lps.get(c // self.n)
            choices.append(choice)
        if self.ranked:
            choices = self._best(choices)
        out = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
               "model": self.body.model, "choices": choices, "usage": self._usage()}
        if self.chat and self.body.return_token_ids:
            out["prompt_token_ids"] = self.prompt_ids[0]
        if self.chat and self.body.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_lps.get(0)
        return out

    def chunk(self, i: int, ev) -> dict | None:
        c = self._choice(i, ev)
        self.add(i, ev)
        text = ev.text
        if not self.chat and self.body.echo and c not in self.started:
            text = self.prompt_texts[i] + text
        first = c not in self.started
        self.started.add(c)
        if not text and not ev.finished and not (self.chat and first):
            return None
        entries = self._echoed(ev) + ev.logprobs
        lp = None
        if self._wants_logprobs() and entries:  # text_offset runs on across a choice's chunks
            lp = self._logprobs(entries, self.offsets.get(c, 0))
            if not self.chat:
                self.offsets[c] = lp["text_offset"][-1] + len(self.tok.decode([entries[-1][0]]))  # (the text's length,
                # also where return_tokens_as_token_ids names the token by its id)
        if self.chat:
            delta = {"role": "assistant"} if first else {}
            if self.tool_mode:
                delta.update(self._tool_delta(c, text, ev.finished))
                if not delta and lp is None and not ev.finished:
                    return None  # (all of it held back: it may be the start of a call)
            else:
                delta["content"] = text
            finish = self._finish_reason(c, bool(self.parsers[c].calls) if self.tool_mode else False) if ev.finished else None
            if ev.finished and self.tool_mode:
                self._count_calls(self.parsers[c].tool_calls())
            choice = {"index": c, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": c, "text": text, "logprobs": lp, "finish_reason": self.finish.get(c) if ev.finished else None}
        if ev.finished and c in self.routing:
            choice["remix_routing"] = self.routing[c]
        out = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.body.model, "choices": [choice]}
        opening, where = c not in self.sent, out if self.chat else choice  # (vLLM's places, as in final)
        self.sent.add(c)
        if self.body.return_token_ids:  # the ids since the last chunk sent (a chunk with no text to send is not
            choice["token_ids"] = self.ids.pop(c, [])  # sent: its ids go with the next); the prompt's with the first
            if opening:
                where["prompt_token_ids"] = self.prompt_ids[i]
        if self.body.prompt_logprobs is not None and opening:  # (its own first event brought them, if not another's)
            where["prompt_logprobs"] = self.prompt_lps.get(i)
        if self.continuous_usage:  # the request's usage so far (all its choices; each prompt counted once)
            prompt = sum(len(p) for p in self.prompt_ids)
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": self.generated,
                            "total_tokens": prompt + self.generated,
                            "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}
        elif self.include_usage:
            out["usage"] = None
        return out

    def _best(self, choices: list[dict]) -> list[dict]:
        """best_of: per prompt, the body's n sequences of highest mean log-probability per generated token (OpenAI's
        "best"; ties to the earlier sequence), best first, numbered as n choices per prompt."""
        def mean(c):
            total, count = self.scores.get(c, (0.0, 0))
            return total / count if count else 0.0

        best = []
        for i in range(len(self.prompt_ids)):
            mine = sorted((ch for ch in choices if ch["index"] // self.n == i), key=lambda ch: (-mean(ch["index"]), ch["index"]))
            for rank, ch in enumerate(mine[: self.body.n]):
                best.append({**ch, "index": i * self.body.n + rank})
        return best

    def _count_calls(self, calls: list[dict]) -> None:
        """A choice offered tools has ended: its calls by function, and whether it called at all."""
        m, adapter = self.state.metrics, self.body.model
        m.tool_choices.labels(adapter, "true" if calls else "false").inc()
        for call in calls:
            m.tool_calls.labels(adapter, call["function"]["name"]).inc()

    def _finish_reason(self, c: int, called: bool) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call (tool_choice auto or required), "stop" for a call
        tool_choice named."""
        finish = self.finish.get(c)
        return "tool_calls" if called and finish == "stop" and self.tool_mode in ("auto", "required") else finish

    def _tool_delta(self, c: int, text: str, finished: bool) -> dict:
        """A streamed chat choice's delta with tools offered: its content (whitespace that may end the content before
        a call held back until text follows it, so the pieces add up to the whole response's content) and, per call,
        its id and name once, then pieces of its arguments."""
        if c not in self.parsers:
            self.parsers[c] = tools.CallParser(self.state.call_format)
        parser = self.parsers[c]
        events = parser.feed(text) + (parser.finish() if finished else [])
        held = self.held.get(c, "") + "".join(e[1] for e in events if e[0] == "content")
        delta = {}
        if sent := held.rstrip():
            delta["content"], held = sent, held[len(sent):]
        if finished and held and not parser.calls:
            delta["content"], held = delta.get("content", "") + held, ""
        self.held[c] = held
        calls: dict[int, dict] = {}
        for e in events:
            if e[0] == "call":
                calls[e[1]] = {"index": e[1], "id": parser.calls[e[1]][0], "type": "function",
                               "function": {"name": e[2], "arguments": ""}}
            elif e[0] == "arguments":
                calls.setdefault(e[1], {"index": e[1], "function": {"arguments": ""}})["function"]["arguments"] += e[2]
        if calls:
            delta["tool_calls"] = [calls[i] for i in sorted(calls)]
        return delta

    def usage_chunk(self) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": [], "usage": self._usage()}


def _routing_view(counts: dict, mode: str | None) -> dict:
    """'full': per module, selections per LoRA; 'summary': per module, the most used LoRAs (bounded)."""
    if mode == "full":
        return {"modules": counts}
    summary = {}
    for module, per_lora in counts.items():
        top = sorted(range(len(per_lora)), key=lambda i: (-per_lora[i], i))[:4]
        summary[module] = {"top": [[i, per_lora[i]] for i in top if per_lora[i] > 0], "tokens": sum(per_lora)}
    return {"modules": summary}
